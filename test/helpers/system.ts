/**
 * The whole system as `npm start` runs it: the built runner in a child process, talked to over real
 * HTTP on a free loopback port.
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { freshDatabaseUri, onMongo } from "./store";

/** The project's root: two levels up in the sources, three when compiled to `dist/` (the benchmarks). */
const ROOT = [path.resolve(__dirname, "../.."), path.resolve(__dirname, "../../..")].find(dir =>
	fs.existsSync(path.join(dir, "package.json"))
) as string;

/** Ports this process has handed out: a port closed again may be offered twice (a system's gateway and ops ports). */
const handedOut = new Set<number>();

export async function freePort(): Promise<number> {
	for (;;) {
		const port = await new Promise<number>((resolve, reject) => {
			const server = net.createServer();
			server.once("error", reject);
			server.listen(0, "127.0.0.1", () => {
				const { port } = server.address() as net.AddressInfo;
				server.close(() => resolve(port));
			});
		});
		if (handedOut.has(port)) continue;
		handedOut.add(port);
		return port;
	}
}

/** Tokens every test system accepts (API_KEYS): staff, and merchants 20 and 21. */
export const TOKENS = {
	staff: "staff-token-0123456789",
	merchant20: "merchant-20-token-0123456789",
	merchant21: "merchant-21-token-0123456789"
};
const API_KEYS = `${TOKENS.staff}=staff,${TOKENS.merchant20}=merchant:20,${TOKENS.merchant21}=merchant:21`;

/** An answer's body as text, and parsed when it is JSON (an error page, a CSV: the text). */
export async function bodyOf(res: Response): Promise<{ text: string; parsed: unknown }> {
	const text = await res.text();
	try {
		return { text, parsed: text ? JSON.parse(text) : undefined };
	} catch {
		return { text, parsed: text };
	}
}

export interface Reply<T = any> {
	status: number;
	body: T;
	headers: Headers;
}

/**
 * One Moleculer node in its own process: all services by default, or those named in `SERVICES`.
 * Ready when its `/ready` probe (on `opsPort`) answers 200.
 */
export class System {
	private child?: ChildProcess;
	private output = "";
	readonly dataDir: string;
	/** Its own database when the suites run on MongoDB, kept across restarts like its data folder. */
	readonly mongoUri?: string;
	/** How long `start` waits for the node to be ready (a large data folder loads for a while). */
	startTimeoutMs = 30_000;

	constructor(
		readonly port: number,
		readonly env: NodeJS.ProcessEnv = {},
		readonly opsPort = 0,
		dataDir?: string,
		/** Open the Moleculer REPL on the node's stdin (`--repl`), to be driven by `type`. */
		readonly repl = false
	) {
		this.dataDir = dataDir ?? fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-e2e-"));
		this.mongoUri = env.MONGO_URI ?? (onMongo() ? freshDatabaseUri() : undefined);
	}

	static async start(env: NodeJS.ProcessEnv = {}, repl = false): Promise<System> {
		const system = new System(await freePort(), env, await freePort(), undefined, repl);
		await system.start();
		return system;
	}

	get url(): string {
		return `http://127.0.0.1:${this.port}`;
	}

	/** Starts (or restarts) the node on the same data folder and waits until it answers. Its output
	 * is kept across restarts: what a killed node printed is what a failed test needs. */
	async start(): Promise<void> {
		if (this.output) this.output += `\n--- restarted at ${new Date().toISOString()} ---\n`;
		const from = this.output.length;
		this.child = spawn(
			process.execPath,
			[
				"--disable-warning=ExperimentalWarning",
				path.join(ROOT, "node_modules/moleculer/bin/moleculer-runner.js"),
				"--config",
				"dist/moleculer.config.js",
				...(this.repl ? ["--repl"] : [])
			],
			{
				cwd: ROOT,
				env: {
					...process.env,
					LOG_LEVEL: "warn",
					API_KEYS,
					SERVICEDIR: "dist/services",
					...this.env,
					PORT: String(this.port),
					HOST: "127.0.0.1",
					METRICS_PORT: String(this.opsPort),
					DATA_DIR: this.dataDir,
					MONGO_URI: this.mongoUri ?? ""
				},
				stdio: [this.repl ? "pipe" : "ignore", "pipe", "pipe"]
			}
		);
		this.child.stdout?.on("data", chunk => (this.output += chunk));
		this.child.stderr?.on("data", chunk => (this.output += chunk));
		const deadline = Date.now() + this.startTimeoutMs;
		while (Date.now() < deadline) {
			if (this.child.exitCode != null)
				throw new Error(`The system exited at start:\n${this.output.slice(from)}`);
			if (await this.ready()) return;
			await new Promise(resolve => setTimeout(resolve, 100));
		}
		throw new Error(
			`The system did not answer within ${this.startTimeoutMs / 1000} s:\n${this.output.slice(from)}`
		);
	}

	/** The node's readiness probe. */
	async ready(): Promise<boolean> {
		try {
			return (await fetch(`http://127.0.0.1:${this.opsPort}/ready`)).status === 200;
		} catch {
			return false;
		}
	}

	get pid(): number | undefined {
		return this.child?.pid;
	}

	/** Stops the node the way an operator would (SIGTERM), or kills it (SIGKILL). */
	async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
		const child = this.child;
		if (!child || child.exitCode != null || child.signalCode != null) return;
		const exited = new Promise(resolve => child.once("exit", resolve));
		child.kill(signal);
		await exited;
	}

	/** Resolves with the exit code once the node's process has ended by itself. */
	exited(): Promise<number | null> {
		const child = this.child;
		if (!child || child.exitCode != null) return Promise.resolve(child?.exitCode ?? null);
		return new Promise(resolve => child.once("exit", code => resolve(code)));
	}

	get log(): string {
		return this.output;
	}

	/** Types a line into the node's REPL, as an operator would, and returns what it printed up to `until`. */
	async type(line: string, until: RegExp, timeoutMs = 10_000): Promise<string> {
		if (!this.child?.stdin) throw new Error("This node was started without its REPL");
		const from = this.output.length;
		this.child.stdin.write(`${line}\n`);
		const deadline = Date.now() + timeoutMs;
		while (!until.test(this.output.slice(from))) {
			if (Date.now() > deadline)
				throw new Error(
					`The REPL did not print ${until} after '${line}':\n${this.output.slice(from)}`
				);
			await new Promise(resolve => setTimeout(resolve, 25));
		}
		return this.output.slice(from);
	}

	/** One HTTP request, as staff unless `headers` carry another `authorization` (or `null` for none). */
	async call<T = any>(
		method: string,
		urlPath: string,
		body?: unknown,
		headers: Record<string, string | null> = {}
	): Promise<Reply<T>> {
		const all: Record<string, string | null> = {
			authorization: `Bearer ${TOKENS.staff}`,
			...(body !== undefined ? { "content-type": "application/json" } : {}),
			...headers
		};
		const res = await fetch(this.url + urlPath, {
			method,
			headers: Object.fromEntries(
				Object.entries(all).filter((e): e is [string, string] => e[1] !== null)
			),
			body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body)
		});
		const { parsed } = await bodyOf(res);
		return { status: res.status, body: parsed as T, headers: res.headers };
	}
}
