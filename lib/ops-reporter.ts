/**
 * Moleculer's Prometheus reporter, which already runs an HTTP server on every node, also answering
 * the node's probes: `/live` (the process answers) and `/ready` (every local service has started and
 * its durable channels are connected, and the node is not stopping) — so an orchestrator can route
 * to, and drain, each node on its own.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { MetricReporters, type ServiceBroker } from "moleculer";

/** Every local service started, the channel adapter connected, and not stopping. */
export function isReady(broker: ServiceBroker): boolean {
	const channels = (broker as ServiceBroker & { channelAdapter?: { connected: boolean } }).channelAdapter;
	return broker.started && !broker.stopping && (channels?.connected ?? true);
}

export class OpsReporter extends MetricReporters.Prometheus {

	override handler(req: IncomingMessage, res: ServerResponse): void {
		if (req.url === "/live" || req.url === "/ready") {
			const broker = this.registry.broker;
			const ready = req.url === "/live" || isReady(broker);
			res.writeHead(ready ? 200 : 503, { "Content-Type": "application/json" });
			res.end(JSON.stringify({ status: ready ? "ok" : "not ready", nodeID: broker.nodeID, services: broker.services.map(s => s.fullName) }));
			return;
		}
		super.handler(req, res);
	}
}
