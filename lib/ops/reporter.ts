/**
 * Moleculer's Prometheus reporter, which already runs an HTTP server on every node, also answering
 * the node's probes: `/live` (the process answers) and `/ready` (every local service has started and
 * its durable channels are connected, and the node is not stopping) — so an orchestrator can route
 * to, and drain, each node on its own.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { MetricReporters, type MetricRegistry, type ServiceBroker } from "moleculer";

/** Every local service started, the channel adapter connected, and not stopping. */
export function isReady(broker: ServiceBroker): boolean {
	const channels = (broker as ServiceBroker & { channelAdapter?: { connected: boolean } })
		.channelAdapter;
	return broker.started && !broker.stopping && (channels?.connected ?? true);
}

export class OpsReporter extends MetricReporters.Prometheus {
	declare server: import("node:http").Server;
	declare opts: { port: number };

	/**
	 * Moleculer's reporter listens without an error handler: a port taken by another node on the
	 * host would crash the process with an unhandled stack. Say which variable to set, and stop.
	 */
	override init(registry: MetricRegistry): void {
		super.init(registry);
		this.server.on("error", (err: NodeJS.ErrnoException) => {
			const why =
				err.code === "EADDRINUSE"
					? "is in use (another node on this host?)"
					: `cannot be opened (${err.code ?? err.message})`;
			registry.broker.logger.fatal(
				`METRICS_PORT ${this.opts.port} ${why}: give each node on a host its own METRICS_PORT, 0 for any free port, or off for none.`
			);
			process.exit(1);
		});
	}

	override handler(req: IncomingMessage, res: ServerResponse): void {
		if (req.url === "/live" || req.url === "/ready") {
			const broker = this.registry.broker;
			const ready = req.url === "/live" || isReady(broker);
			res.writeHead(ready ? 200 : 503, { "Content-Type": "application/json" });
			res.end(
				JSON.stringify({
					status: ready ? "ok" : "not ready",
					nodeID: broker.nodeID,
					services: broker.services.map(s => s.fullName)
				})
			);
			return;
		}
		super.handler(req, res);
	}
}
