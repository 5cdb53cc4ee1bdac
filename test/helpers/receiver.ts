/**
 * A partner's webhook endpoint: a real HTTP server on a loopback port that records every request it
 * gets and answers each path as the test says (a status by the request's number, or never).
 */
import http from "node:http";
import { freePort } from "./system";

export interface Received {
	path: string;
	headers: Record<string, string>;
	body: string;
}

/** What a path answers to its n-th request (1, 2, …): a status, or `hang` to never answer. */
export type Answer = (n: number) => number | "hang";

export class Receiver {
	readonly received: Received[] = [];
	private readonly answers = new Map<string, Answer>();
	private server?: http.Server;

	constructor(readonly port: number) {}

	static async start(): Promise<Receiver> {
		const receiver = new Receiver(await freePort());
		await receiver.start();
		return receiver;
	}

	/** Listens (again) on its port. */
	async start(): Promise<void> {
		const server = http.createServer((req, res) => {
			const chunks: Buffer[] = [];
			req.on("data", chunk => chunks.push(chunk));
			req.on("end", () => {
				const path = req.url ?? "/";
				this.received.push({
					path,
					headers: req.headers as Record<string, string>,
					body: Buffer.concat(chunks).toString("utf8")
				});
				const status = (this.answers.get(path) ?? (() => 200))(this.at(path).length);
				if (status !== "hang") res.writeHead(status).end();
			});
		});
		await new Promise<void>(resolve => server.listen(this.port, "127.0.0.1", resolve));
		this.server = server;
	}

	answer(path: string, answer: Answer): void {
		this.answers.set(path, answer);
	}

	url(path: string): string {
		return `http://127.0.0.1:${this.port}${path}`;
	}

	/** The requests a path got, in order. */
	at(path: string): Received[] {
		return this.received.filter(r => r.path === path);
	}

	/** Stops listening and drops the connections it holds (those left hanging too). */
	async stop(): Promise<void> {
		const server = this.server;
		if (!server) return;
		this.server = undefined;
		server.closeAllConnections();
		await new Promise(resolve => server.close(resolve));
	}
}
