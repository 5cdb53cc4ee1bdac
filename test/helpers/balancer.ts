/**
 * What a load balancer in front of several gateways does, for the redeploy tests: it forwards each
 * request to a gateway whose readiness probe last answered 200 (probed every 50 ms, round robin among
 * them), and retries nothing: a request that fails behind it fails for the client.
 */
import http from "node:http";
import { bodyOf, freePort, TOKENS, type Reply, type System } from "./system";

export class Balancer {
	private readonly pool = new Map<System, boolean>();
	/** Requests forwarded to each gateway and not yet answered in full. */
	private readonly inFlight = new Map<System, number>();
	private next = 0;
	private probing = true;
	private readonly probe: Promise<void>;

	private constructor(
		private readonly server: http.Server,
		readonly port: number
	) {
		this.probe = (async () => {
			while (this.probing) {
				for (const node of [...this.pool.keys()]) {
					const ready = await node.ready();
					if (this.pool.has(node)) this.pool.set(node, ready);
				}
				await new Promise(resolve => setTimeout(resolve, 50));
			}
		})();
	}

	static async start(): Promise<Balancer> {
		const port = await freePort();
		let balancer: Balancer | undefined = undefined;
		const server = http.createServer((req, res) => balancer?.forward(req, res));
		await new Promise<void>(resolve => server.listen(port, "127.0.0.1", resolve));
		balancer = new Balancer(server, port);
		return balancer;
	}

	/** Routes to `gateway` from its first ready probe on. */
	add(gateway: System): void {
		this.pool.set(gateway, false);
	}

	/** Stops routing to `gateway` (what Kubernetes does when a pod starts terminating). */
	remove(gateway: System): void {
		this.pool.delete(gateway);
	}

	/**
	 * Resolves once every request forwarded to `gateway` has been answered: a balancer's connection
	 * draining, which the pod's preStop gives time for before SIGTERM.
	 */
	async drained(gateway: System): Promise<void> {
		while ((this.inFlight.get(gateway) ?? 0) > 0)
			await new Promise(resolve => setTimeout(resolve, 20));
	}

	/** How many gateways it routes to now. */
	get ready(): number {
		return [...this.pool.values()].filter(Boolean).length;
	}

	private forward(req: http.IncomingMessage, res: http.ServerResponse): void {
		const ready = [...this.pool].filter(([, ok]) => ok).map(([node]) => node);
		if (!ready.length) {
			res.writeHead(503, { "content-type": "application/json" });
			return void res.end(JSON.stringify({ balancer: "no gateway is ready" }));
		}
		const gateway = ready[this.next++ % ready.length];
		this.inFlight.set(gateway, (this.inFlight.get(gateway) ?? 0) + 1);
		res.once("close", () => this.inFlight.set(gateway, (this.inFlight.get(gateway) ?? 1) - 1));
		const upstream = http.request(
			{
				host: "127.0.0.1",
				port: gateway.port,
				method: req.method,
				path: req.url,
				headers: req.headers
			},
			answer => {
				res.writeHead(answer.statusCode ?? 502, answer.headers);
				answer.pipe(res);
			}
		);
		upstream.on("error", err => {
			res.writeHead(502, { "content-type": "application/json" });
			res.end(JSON.stringify({ balancer: `gateway ${gateway.port}: ${err.message}` }));
		});
		req.pipe(upstream);
	}

	/** One HTTP request through the balancer, as staff. */
	async call<T = any>(method: string, urlPath: string, body?: unknown): Promise<Reply<T>> {
		const res = await fetch(`http://127.0.0.1:${this.port}${urlPath}`, {
			method,
			headers: {
				authorization: `Bearer ${TOKENS.staff}`,
				...(body === undefined ? {} : { "content-type": "application/json" })
			},
			body: body === undefined ? undefined : JSON.stringify(body)
		});
		const { parsed } = await bodyOf(res);
		return { status: res.status, body: parsed as T, headers: res.headers };
	}

	async stop(): Promise<void> {
		this.probing = false;
		await this.probe;
		this.server.closeAllConnections();
		await new Promise(resolve => this.server.close(resolve));
	}
}
