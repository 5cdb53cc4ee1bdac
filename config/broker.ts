import {
	Validators,
	type BrokerOptions,
	type Errors,
	type Middleware as BrokerMiddleware,
	type MetricRegistry,
	type ReplOptions
} from "moleculer";
import { Middleware } from "@moleculer/channels";
import { config as defaults, type Config } from ".";
import { EmbeddedAdapter } from "../lib/channels/embedded-adapter";
import { isDependencyUnavailable } from "../lib/errors";
import { amountRule, DECIMAL_MESSAGES, decimalRule } from "../lib/params";
import { DurableNatsAdapter } from "../lib/channels/nats-adapter";
import { settleMetricRateShape } from "../lib/ops/metric-rate-shape";
import { WaitForService } from "../lib/service-wait";
import { loggerOptions } from "../lib/ops/logs";
import { ActionMetrics, OnePointMetrics } from "../lib/ops/metrics";
import { TraceContext } from "../lib/ops/tracing";
import { OpsReporter } from "../lib/ops/reporter";
import { operatorCommands } from "../lib/ops/repl-commands";
import { NodeConfig } from "./settings";

/**
 * @moleculer/channels' typings (generated from JSDoc) mark every option as required and list adapter
 * names only; the middleware defaults the options and also takes an adapter instance.
 */
const ChannelsMiddleware = Middleware as unknown as (opts: {
	adapter: EmbeddedAdapter | DurableNatsAdapter;
}) => BrokerMiddleware;

/**
 * Moleculer's internal middlewares in their stock order, except that `Timeout` sits inside
 * `CircuitBreaker`: stock order lets the breaker wrap the timeout, so a dependency that only hangs
 * never trips it. Here a timed-out call counts as a failure and a slow dependency is shed. `Metrics`
 * leaves out the gateway's own actions, which `onepoint_http_*` measure (`ActionMetrics`).
 */
const INTERNAL_MIDDLEWARES = [
	"ActionHook",
	"Validator",
	"Bulkhead",
	"Cacher",
	"ContextTracker",
	"Timeout",
	"CircuitBreaker",
	"Retry",
	"Fallback",
	"ErrorHandler",
	"Tracing",
	ActionMetrics("api"),
	"Debounce",
	"Throttle"
];

type MetricsReporter = MetricRegistry.MetricsReporter;

/**
 * A message its handler fails is retried after 1, 2, 4 … 60 s. One that fails for itself (a poison
 * message) goes to the DEAD_LETTERS channel after 8 retries (about 3 minutes); one that finds a
 * store or a service unavailable is retried every minute at most, for as long as that lasts
 * (lib/channels/redelivery.ts). On NATS, up to 1000 messages of a group may wait for their retry
 * without holding back the others (its consumer's `max_ack_pending` is 16 + 1000).
 */
export const CHANNEL_OPTIONS = {
	maxInFlight: 16,
	maxWaiting: 1000,
	maxRetries: 8,
	retryDelayMs: 1000,
	maxRetryDelayMs: 60_000,
	deadLettering: { enabled: true, queueName: "DEAD_LETTERS" }
};

/**
 * Durable channels: NATS JetStream when the nodes talk over NATS (they then share the streams),
 * otherwise the embedded store in DATA_DIR (its SQLite file), which serves one process.
 */
function channelAdapter(config: Config): EmbeddedAdapter | DurableNatsAdapter {
	if (config.transporter?.startsWith("nats://"))
		return new DurableNatsAdapter(config.transporter, {
			...CHANNEL_OPTIONS,
			streamReplicas: config.natsStreamReplicas
		});
	if (config.transporter)
		throw new Error(
			`TRANSPORTER must be a nats:// URL (durable channels use NATS JetStream), got '${config.transporter}'`
		);
	return new EmbeddedAdapter({
		dataDir: config.dataDir,
		sqliteSynchronous: config.sqliteSynchronous,
		...CHANNEL_OPTIONS
	});
}

/**
 * Broker options for one node. A function, not a shared object: every broker (a test may start
 * several) needs its own channel adapter.
 */
export function createBrokerOptions(config: Config = defaults): BrokerOptions {
	if (config.metricsPort !== undefined) settleMetricRateShape();
	return {
		namespace: config.namespace,
		nodeID: config.nodeID,
		logger: loggerOptions(config),
		transporter: config.transporter ? { type: "NATS", options: { url: config.transporter } } : null,
		requestTimeout: 10_000,
		// Params are checked by fastest-validator, with the project's own rules (lib/params.ts).
		validator: new Validators.Fastest({
			customRules: { amount: amountRule, decimal: decimalRule },
			messages: DECIMAL_MESSAGES
		}),
		// moleculer's typings give a custom command's arguments as a string array; moleculer-repl
		// passes them as an object by name, which is what the commands are written against.
		replOptions: {
			customCommands: operatorCommands as unknown as NonNullable<ReplOptions["customCommands"]>
		},
		// A node that died without a word (SIGKILL) is dropped within seconds, not the default 15 s.
		heartbeatInterval: 2,
		heartbeatTimeout: 6,
		circuitBreaker: {
			enabled: true,
			threshold: 0.5,
			minRequestCount: 10,
			windowTime: 30,
			halfOpenTime: 5_000,
			// Only the callee's own failures count: not the caller's bad input (4xx), nor the callee's
			// fast "my dependency is unavailable" answer (its own breaker is already shedding that load).
			check: (err: Error) =>
				Number((err as Errors.MoleculerError).code) >= 500 && !isDependencyUnavailable(err)
		},
		// Graceful shutdown: stopping waits for the requests in flight (and channels for their messages).
		tracking: { enabled: true, shutdownTimeout: 10_000 },
		// On SIGTERM a node first tells the others to stop routing to it, then waits this long for
		// requests already on their way before its services stop.
		registry: { stopDelay: 500 },
		// The reporter's typings name the built-in types only; Moleculer also takes a reporter instance.
		metrics:
			config.metricsPort === undefined
				? false
				: {
						enabled: true,
						reporter: [new OpsReporter({ port: config.metricsPort }) as unknown as MetricsReporter],
						// Request times are histograms with buckets, from which Prometheus computes any quantile
						// (`histogram_quantile`). Moleculer's own quantiles would keep every sample of the last
						// minute in arrays, two per gateway request: memory and GC that grow with the load.
						defaultQuantiles: false as unknown as number[]
					},
		// Spans of actions and channel messages, sent to Zipkin; no params or meta in them (member data).
		tracing: config.tracing && {
			enabled: true,
			exporter: { type: "Zipkin", options: { baseURL: config.tracing.zipkinUrl } },
			sampling: { rate: config.tracing.sample },
			errorFields: ["name", "message", "code", "type"],
			tags: { action: { params: false, meta: false } }
		},
		internalMiddlewares: false,
		middlewares: [
			NodeConfig(config),
			...(config.serviceWaitMs > 0 ? [WaitForService(config.serviceWaitMs)] : []),
			ChannelsMiddleware({ adapter: channelAdapter(config) }),
			OnePointMetrics(),
			TraceContext(config.tracing !== undefined || config.logFormat === "json"),
			...INTERNAL_MIDDLEWARES
		]
	};
}
