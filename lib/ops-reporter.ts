/**
 * Moleculer's Prometheus reporter, which already runs an HTTP server on every node, also answering
 * the node's probes: `/live` (the process answers) and `/ready` (every local service has started and
 * the node is not stopping) — so an orchestrator can route to, and drain, each node on its own.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { MetricReporters } from "moleculer";

export class OpsReporter extends MetricReporters.Prometheus {

	override handler(req: IncomingMessage, res: ServerResponse): void {
		if (req.url === "/live" || req.url === "/ready") {
			const broker = this.registry.broker;
			const ready = req.url === "/live" || broker.started;
			res.writeHead(ready ? 200 : 503, { "Content-Type": "application/json" });
			res.end(JSON.stringify({ status: ready ? "ok" : "not ready", nodeID: broker.nodeID, services: broker.services.map(s => s.fullName) }));
			return;
		}
		super.handler(req, res);
	}
}
