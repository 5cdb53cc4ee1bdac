import type { BrokerOptions, Errors, Middleware as BrokerMiddleware } from "moleculer";
import { Middleware } from "@moleculer/channels";
import { config as defaults, type Config } from ".";
import { EmbeddedAdapter } from "../lib/embedded-channel-adapter";

/**
 * Moleculer's internal middlewares in their stock order, except that `Timeout` sits inside
 * `CircuitBreaker`: stock order lets the breaker wrap the timeout, so a dependency that only hangs
 * never trips it. Here a timed-out call counts as a failure and a slow dependency is shed.
 */
/**
 * @moleculer/channels' typings (generated from JSDoc) mark every option as required and list adapter
 * names only; the middleware defaults the options and also takes an adapter instance.
 */
const ChannelsMiddleware = Middleware as unknown as (opts: { adapter: InstanceType<typeof EmbeddedAdapter> }) => BrokerMiddleware;

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
	"Metrics",
	"Debounce",
	"Throttle"
];

/**
 * Broker options for one node. A function, not a shared object: every broker (a test may start
 * several) needs its own channel adapter.
 */
export function createBrokerOptions(config: Config = defaults): BrokerOptions {
	return {
		namespace: config.namespace,
		nodeID: config.nodeID,
		logger: { type: "Console", options: { level: config.logLevel, formatter: "short", colors: config.logColors } },
		transporter: (config.transporter ?? null) as BrokerOptions["transporter"],
		requestTimeout: 10_000,
		circuitBreaker: {
			enabled: true,
			threshold: 0.5,
			minRequestCount: 10,
			windowTime: 30,
			halfOpenTime: 5_000,
			// Only the callee's own failures count, not the caller's bad input (4xx).
			check: (err: Error) => Number((err as Errors.MoleculerError).code) >= 500
		},
		internalMiddlewares: false,
		middlewares: [
			ChannelsMiddleware({
				adapter: new EmbeddedAdapter({
					dataDir: config.dataDir,
					maxInFlight: 16,
					maxRetries: 8,
					deadLettering: { enabled: true, queueName: "DEAD_LETTERS" }
				})
			}),
			...INTERNAL_MIDDLEWARES
		]
	};
}
