/**
 * A real nats-server with JetStream on a free loopback port, for the cluster tests; or three of them
 * clustered (`NatsCluster`), as production runs them.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { freePort } from "./system";

export function natsServerBinary(): string {
	for (const candidate of ["/usr/sbin/nats-server", "/usr/bin/nats-server"])
		if (fs.existsSync(candidate)) return candidate;
	return execFileSync("sh", ["-c", "command -v nats-server"]).toString().trim();
}

export class NatsServer {
	private child?: ChildProcess;
	readonly storeDir = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-nats-"));

	constructor(
		readonly port: number,
		/** More of the server's options: a clustered server's name and routes. */
		private readonly options: string[] = []
	) {}

	static async start(): Promise<NatsServer> {
		const server = new NatsServer(await freePort());
		await server.start();
		return server;
	}

	get url(): string {
		return `nats://127.0.0.1:${this.port}`;
	}

	/** Starts (or restarts) the server on the same port and JetStream store. */
	async start(): Promise<void> {
		this.child = spawn(
			natsServerBinary(),
			["-js", "-a", "127.0.0.1", "-p", String(this.port), "-sd", this.storeDir, ...this.options],
			{ stdio: "ignore" }
		);
		const deadline = Date.now() + 10_000;
		while (Date.now() < deadline) {
			if (await accepts(this.port)) return;
			await new Promise(resolve => setTimeout(resolve, 50));
		}
		throw new Error("nats-server did not start");
	}

	async stop(): Promise<void> {
		const child = this.child;
		if (!child || child.exitCode != null || child.signalCode != null) return;
		const exited = new Promise(resolve => child.once("exit", resolve));
		child.kill("SIGTERM");
		await exited;
	}
}

/** Three servers routed to each other, JetStream over all three: a stream may have 3 replicas. */
export class NatsCluster {
	private constructor(readonly servers: NatsServer[]) {}

	static async start(): Promise<NatsCluster> {
		const ports = await Promise.all(
			[0, 1, 2].map(async () => [await freePort(), await freePort()])
		);
		const routes = ports.map(([, route]) => `nats://127.0.0.1:${route}`).join(",");
		const servers = ports.map(
			([port, route], i) =>
				new NatsServer(port, [
					"--name",
					`n${i + 1}`,
					"--cluster_name",
					"onepoint-test",
					"--cluster",
					`nats://127.0.0.1:${route}`,
					"--routes",
					routes
				])
		);
		await Promise.all(servers.map(server => server.start()));
		return new NatsCluster(servers);
	}

	/** Every server, as the nodes' TRANSPORTER names them. */
	get url(): string {
		return this.servers.map(server => server.url).join(",");
	}

	async stop(): Promise<void> {
		await Promise.all(this.servers.map(server => server.stop()));
	}
}

function accepts(port: number): Promise<boolean> {
	return new Promise(resolve => {
		const socket = net.connect(port, "127.0.0.1");
		socket.once("connect", () => {
			socket.destroy();
			resolve(true);
		});
		socket.once("error", () => resolve(false));
	});
}
