/**
 * OnePoint's own series on every node's `/metrics` (docs/monitoring.md). Labels are low-cardinality
 * and snake_case: never a member's, deal's or order's id.
 *
 * Counters and the request histogram are counted where things happen (the gateway's requests in
 * prom-client, the rest in Moleculer's registry). The gauges are read when Prometheus scrapes
 * (`collect`): each service that knows one of them registers a collector with `onScrape`, so that
 * nothing runs on a timer and a scrape sees the stores as they are.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import * as Moleculer from "moleculer";
import type {
	ActionHandler,
	ActionSchema,
	MetricRegistry,
	Middleware,
	ServiceBroker
} from "moleculer";
import { Counter, Histogram, Registry } from "prom-client";
import { assertPatchable, PATCHES } from "../patches";

/** Moleculer's built-in middlewares, exported by the package but not named in its typings. */
const MoleculerMiddlewares = (
	Moleculer as unknown as {
		Middlewares: {
			Metrics: (broker: ServiceBroker) => Middleware & {
				localAction(this: ServiceBroker, next: ActionHandler, action: ActionSchema): ActionHandler;
			};
		};
	}
).Middlewares;

export const SERIES = {
	deals: "onepoint_deals_total",
	pointsPosted: "onepoint_points_posted_total",
	httpRequests: "onepoint_http_requests_total",
	httpDuration: "onepoint_http_request_duration_seconds",
	channelBacklog: "onepoint_channel_backlog",
	channelOldest: "onepoint_channel_oldest_seconds",
	outboxPending: "onepoint_outbox_pending",
	deadLetters: "onepoint_dead_letters_waiting",
	breakerOpen: "onepoint_breaker_open",
	webhookDeliveries: "onepoint_webhook_deliveries",
	settlementsOpen: "onepoint_settlements_open",
	nodeReady: "onepoint_node_ready"
} as const;

type SeriesName = (typeof SERIES)[keyof typeof SERIES];

/** Seconds: a trivial request takes well under a millisecond, a deal a few, a slow store a second. */
const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

type Definition = (MetricRegistry.CounterMetricOptions | MetricRegistry.GaugeMetricOptions) & {
	name: SeriesName;
};

const DEFINITIONS: Definition[] = [
	{
		name: SERIES.deals,
		type: "counter",
		labelNames: ["type", "status"],
		description: "Deals finished, by type (save, use) and outcome (success, fail)"
	},
	{
		name: SERIES.pointsPosted,
		type: "counter",
		labelNames: ["kind"],
		description: "Points posted to the ledger, by the entry's kind (earn, use, expire, ...)"
	},
	{
		name: SERIES.channelBacklog,
		type: "gauge",
		labelNames: ["channel", "group"],
		description: "Messages of a durable channel its consumer group has still to handle"
	},
	{
		name: SERIES.channelOldest,
		type: "gauge",
		labelNames: ["channel", "group"],
		description: "Age of the oldest message a consumer group has still to handle (s)"
	},
	{
		name: SERIES.outboxPending,
		type: "gauge",
		labelNames: [],
		description: "Events stored in this node's services' outboxes, not yet published"
	},
	{
		name: SERIES.deadLetters,
		type: "gauge",
		labelNames: [],
		description: "Dead letters waiting for a replay"
	},
	{
		name: SERIES.breakerOpen,
		type: "gauge",
		labelNames: ["action"],
		description:
			"1 while this node's circuit breaker to an action is open (on any of its endpoints)"
	},
	{
		name: SERIES.webhookDeliveries,
		type: "gauge",
		labelNames: ["status"],
		description: "Webhook deliveries waiting to be sent (pending) or given up (failed)"
	},
	{
		name: SERIES.settlementsOpen,
		type: "gauge",
		labelNames: ["month"],
		description: "1 for each month past its end and grace whose settlements are not final yet"
	},
	{
		name: SERIES.nodeReady,
		type: "gauge",
		labelNames: [],
		description: "1 while the node is ready (its /ready probe answers 200)"
	}
];

/** The gauges that collectors fill at each scrape. */
const COLLECTED = new Set<string>(
	DEFINITIONS.filter(d => d.type === "gauge" && d.name !== SERIES.breakerOpen).map(d => d.name)
);

export interface Sample {
	name: SeriesName;
	labels?: Record<string, string>;
	value: number;
}

export type Collector = () => Promise<Sample[]> | Sample[];

const collectors = new WeakMap<ServiceBroker, Set<Collector>>();

/** Registers what a scrape asks for; the returned function takes it back (a service stopping). */
export function onScrape(broker: ServiceBroker, collector: Collector): () => void {
	if (!broker.isMetricsEnabled()) return () => undefined;
	let set = collectors.get(broker);
	if (!set) collectors.set(broker, (set = new Set()));
	set.add(collector);
	return () => set.delete(collector);
}

/**
 * Fills the collected gauges afresh: a value no collector gives any more (a month gone final, a
 * stopped service's backlog) disappears. Samples of one series and labels from several services on
 * the node add up (an age is the oldest). A failing collector (its store is down) leaves its series out and says why.
 */
export async function collect(broker: ServiceBroker): Promise<void> {
	const results = await Promise.allSettled(
		[...(collectors.get(broker) ?? [])].map(async collector => collector())
	);
	const sums = new Map<string, Sample>();
	for (const result of results) {
		if (result.status === "rejected") {
			broker.logger.warn("A metric could not be read:", (result.reason as Error).message);
			continue;
		}
		for (const sample of result.value) {
			const key = `${sample.name}${JSON.stringify(sample.labels ?? {})}`;
			const sum = sums.get(key);
			if (!sum) sums.set(key, { ...sample });
			else if (sample.name === SERIES.channelOldest) sum.value = Math.max(sum.value, sample.value);
			else sum.value += sample.value;
		}
	}
	for (const name of COLLECTED) broker.metrics.getMetric(name)?.clear();
	for (const { name, labels, value } of sums.values()) broker.metrics.set(name, value, labels);
}

/** Counts points posted, by entry kind (a use's negative amount counts as the points it spent). */
export function countPosted(broker: ServiceBroker, entries: { kind: string; amount: number }[]) {
	if (!broker.isMetricsEnabled()) return;
	for (const { kind, amount } of entries)
		if (amount !== 0) broker.metrics.increment(SERIES.pointsPosted, { kind }, Math.abs(amount));
}

/** Counts a deal that reached its outcome. */
export function countDeal(broker: ServiceBroker, type: string, status: string) {
	if (broker.isMetricsEnabled()) broker.metrics.increment(SERIES.deals, { type, status });
}

/** A series of Moleculer's registry as a scrape writes it (what `MetricRegistry.list` gives). */
export interface MetricSnapshot {
	name: string;
	type: string;
	description?: string;
	values: { labels: Record<string, string>; value?: number }[];
}

const HTTP_LABELS = ["namespace", "node_id", "route", "method", "status"] as const;

/**
 * The gateway's requests by route, in prom-client's counter and histogram. Moleculer's own histogram
 * cost several microseconds a request (a number turned into a property name per bucket, rates kept
 * per label set); prom-client's `observe` finds the bucket and adds. The node's labels are the
 * series' first labels, as in Moleculer's (prom-client's default labels would come last).
 */
class HttpSeries {
	readonly registry = new Registry();
	private readonly requests: Counter<(typeof HTTP_LABELS)[number]>;
	private readonly duration: Histogram<Exclude<(typeof HTTP_LABELS)[number], "status">>;

	constructor(private readonly node: { namespace: string; node_id: string }) {
		this.requests = new Counter({
			name: SERIES.httpRequests,
			help: "HTTP requests answered by the gateway, by route template, method and status",
			labelNames: HTTP_LABELS,
			registers: [this.registry]
		});
		this.duration = new Histogram({
			name: SERIES.httpDuration,
			help: "Time the gateway took to answer, by route template and method (s)",
			labelNames: HTTP_LABELS.filter(label => label !== "status"),
			buckets: LATENCY_BUCKETS,
			registers: [this.registry]
		});
	}

	record(route: string, method: string, status: number, seconds: number): void {
		const { namespace, node_id } = this.node;
		this.requests.inc({ namespace, node_id, route, method, status });
		this.duration.observe({ namespace, node_id, route, method }, seconds);
	}
}

const httpSeries = new WeakMap<ServiceBroker, HttpSeries>();

function httpSeriesOf(broker: ServiceBroker): HttpSeries {
	let series = httpSeries.get(broker);
	if (!series)
		httpSeries.set(
			broker,
			(series = new HttpSeries({ namespace: broker.namespace, node_id: broker.nodeID }))
		);
	return series;
}

/** The gateway's request series of this node in Prometheus' text format (declared, without values, on a node without one). */
export function httpSeriesText(broker: ServiceBroker): Promise<string> {
	return httpSeriesOf(broker).registry.metrics();
}

/**
 * Times one gateway request from now until its answer is sent. `route` is the matched route's
 * template (`/api/points/:memberId`), `other` when none matched: never the raw path.
 */
export function timeHttpRequest(broker: ServiceBroker, req: IncomingMessage, res: ServerResponse) {
	const series = httpSeriesOf(broker);
	const start = performance.now();
	res.once("finish", () => {
		const alias = (req as { $alias?: { fullPath?: string } }).$alias;
		series.record(
			alias?.fullPath ?? "other",
			req.method ?? "GET",
			res.statusCode,
			(performance.now() - start) / 1000
		);
	});
}

/**
 * Moleculer's per-action series (`moleculer_request_*`), except for the gateway's own actions: its
 * `api.rest` and the actions behind its own routes (`GET /api/me`) are each one HTTP request, which
 * `onepoint_http_*` already count and time. Measured twice they were a fifth of a trivial request's
 * CPU. Calls the gateway makes to other services are still measured (`caller="api"`).
 * (Moleculer calls a middleware given as a function with the broker; its typings name only objects.)
 */
export function ActionMetrics(gateway: string): Middleware {
	const create = (broker: ServiceBroker): Middleware => {
		const stock = MoleculerMiddlewares.Metrics(broker);
		assertPatchable(PATCHES.moleculerMetrics, stock);
		return {
			...stock,
			localAction(next: ActionHandler, action: ActionSchema) {
				return action.service?.name === gateway
					? next
					: stock.localAction.call(broker, next, action);
			}
		};
	};
	return create as unknown as Middleware;
}

/** What a channel adapter tells of a consumer group's messages still to handle. */
export interface Waiting {
	count: number;
	/** When the oldest of them was published (ms since the epoch); none when nothing waits. */
	oldestAt?: number;
}

interface WaitingAdapter {
	addPrefixTopic(name: string): string;
	waiting(channel: string, group: string): Promise<Waiting>;
}

/** The backlog of every consumer group of this node's services, on either channel adapter. */
async function channelSamples(broker: ServiceBroker): Promise<Sample[]> {
	const adapter = (broker as ServiceBroker & { channelAdapter?: WaitingAdapter }).channelAdapter;
	if (!adapter?.waiting) return [];
	const now = Date.now();
	const samples: Sample[] = [];
	for (const service of broker.services)
		for (const [channel, def] of Object.entries(service.schema.channels ?? {})) {
			const group = (def as { group?: string }).group ?? service.fullName;
			// A group not subscribed yet (a node starting) has no JetStream consumer to ask: left out.
			const waiting = await adapter
				.waiting(adapter.addPrefixTopic(channel), group)
				.catch(() => undefined);
			if (!waiting) continue;
			const { count, oldestAt } = waiting;
			const labels = { channel, group };
			samples.push(
				{ name: SERIES.channelBacklog, labels, value: count },
				{
					name: SERIES.channelOldest,
					labels,
					value: oldestAt === undefined ? 0 : Math.max(0, (now - oldestAt) / 1000)
				}
			);
		}
	return samples;
}

interface BreakerEvent {
	nodeID: string;
	action: string;
}

/**
 * Registers the series on the node (every node has them all) and follows its circuit breakers:
 * Moleculer's own gauge has one series per endpoint (`affectedNodeID`); operators alert on the action.
 */
export function OnePointMetrics(): Middleware {
	return {
		name: "OnePointMetrics",
		created(broker: ServiceBroker) {
			if (!broker.isMetricsEnabled()) return;
			for (const definition of DEFINITIONS)
				broker.metrics.register(definition as MetricRegistry.GaugeMetricOptions);
			// Open endpoints, per action: the action's breaker is open while any of its endpoints' is.
			const open = new Map<string, Set<string>>();
			const change = (event: BreakerEvent, isOpen: boolean) => {
				let endpoints = open.get(event.action);
				if (!endpoints) open.set(event.action, (endpoints = new Set()));
				if (isOpen) endpoints.add(event.nodeID);
				else endpoints.delete(event.nodeID);
				broker.metrics.set(SERIES.breakerOpen, endpoints.size > 0 ? 1 : 0, {
					action: event.action
				});
			};
			// Half-open lets one trial call through: still open until a call succeeds and closes it.
			broker.localBus.on("$circuit-breaker.opened", (e: BreakerEvent) => change(e, true));
			broker.localBus.on("$circuit-breaker.closed", (e: BreakerEvent) => change(e, false));
			// The synchronous calls on the money path are always there, at 0 while closed.
			for (const action of ["points.debit", "payments.pay"])
				broker.metrics.set(SERIES.breakerOpen, 0, { action });
			onScrape(broker, () => channelSamples(broker));
		}
	};
}
