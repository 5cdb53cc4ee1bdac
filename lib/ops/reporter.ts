/**
 * Moleculer's Prometheus reporter, which already runs an HTTP server on every node, also answering
 * the node's probes: `/live` (the process answers) and `/ready` (every local service has started and
 * its durable channels are connected, and the node is not stopping) — so an orchestrator can route
 * to, and drain, each node on its own.
 *
 * OnePoint's own series (`onepoint_*`, lib/ops/metrics.ts) are written here rather than by Moleculer's
 * writer, which leaves a registered series without values out altogether, and the gateway's request
 * series come from prom-client's registry; every label is snake_case (`node_id`, not Moleculer's `nodeID`), as
 * `promtool check metrics` asks. Moleculer's own series are written as Moleculer writes them. The
 * reporter's methods this overrides are fenced in lib/patches.ts.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { MetricReporters, type MetricRegistry, type ServiceBroker } from "moleculer";
import { assertPatchable, PATCHES } from "../patches";
import { collect, httpSeriesText, onScrape, SERIES, type MetricSnapshot } from "./metrics";

const OWN = "onepoint_*";

const escape = (value: string) =>
	value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');

/** Every local service started, the channel adapter connected, and not stopping. */
export function isReady(broker: ServiceBroker): boolean {
	const channels = (broker as ServiceBroker & { channelAdapter?: { connected: boolean } })
		.channelAdapter;
	return broker.started && !broker.stopping && (channels?.connected ?? true);
}

export class OpsReporter extends MetricReporters.Prometheus {
	declare server: import("node:http").Server;
	declare opts: { port: number };
	declare defaultLabels: Record<string, string>;
	/** The gateway's request series, read (prom-client reads asynchronously) just before a scrape is written. */
	private httpSeries = "";

	constructor(opts: { port: number }) {
		assertPatchable(PATCHES.prometheusReporter, MetricReporters.Prometheus.prototype);
		super({
			...opts,
			excludes: [OWN],
			defaultLabels: (registry: MetricRegistry) => ({
				namespace: registry.broker.namespace,
				node_id: registry.broker.nodeID
			})
		});
	}

	/**
	 * Moleculer's reporter listens without an error handler: a port taken by another node on the
	 * host would crash the process with an unhandled stack. Say which variable to set, and stop.
	 */
	override init(registry: MetricRegistry): void {
		super.init(registry);
		const broker = registry.broker;
		onScrape(broker, () => [{ name: SERIES.nodeReady, value: isReady(broker) ? 1 : 0 }]);
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
		if (req.url !== "/metrics") return super.handler(req, res);
		const broker = this.registry.broker;
		collect(broker)
			.catch((err: Error) => broker.logger.warn("Metrics not collected:", err.message))
			.then(() => httpSeriesText(broker))
			.then(
				text => (this.httpSeries = text),
				(err: Error) => broker.logger.warn("HTTP series not read:", err.message)
			)
			.finally(() => super.handler(req, res));
	}

	override generatePrometheusResponse(): string {
		return `${super.generatePrometheusResponse()}\n${this.ownSeries()}${this.httpSeries}\n`;
	}

	/** OnePoint's series: a HELP and TYPE for each, also before it has a value. */
	private ownSeries(): string {
		const lines: string[] = [];
		for (const metric of this.registry.list({ includes: OWN }) as unknown as MetricSnapshot[]) {
			lines.push(`# HELP ${metric.name} ${metric.description ?? metric.name}`);
			lines.push(`# TYPE ${metric.name} ${metric.type}`);
			for (const item of metric.values)
				lines.push(`${metric.name}${this.labels(item.labels)} ${item.value ?? 0}`);
		}
		return `${lines.join("\n")}\n`;
	}

	private labels(labels: Record<string, string>): string {
		const all = { ...this.defaultLabels, ...labels };
		return `{${Object.entries(all)
			.map(([key, value]) => `${key}="${escape(String(value))}"`)
			.join(",")}}`;
	}
}
