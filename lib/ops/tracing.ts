/**
 * Traces (docs/monitoring.md#traces): with `TRACING=zipkin`, Moleculer's Zipkin exporter sends the
 * spans of actions and of channel messages to `ZIPKIN_URL`.
 *
 * Moleculer traces a request through its action calls, but not through @moleculer/channels unless
 * every handler takes a Context, and not at all through an outbox, whose events are sent after the
 * action's change (or by a retry, after a crash). So: an action's or a channel message's trace
 * context is kept for the time its handler runs (`AsyncLocalStorage`); an event recorded in an outbox
 * meanwhile carries it (`traceHeaders`) in the message's headers, as Zipkin's B3 propagation names
 * them (the stores refuse @moleculer/channels' own `$`-names, in an outbox or a dead letter); and a
 * consumer's handler runs in a span of that trace, whose context an event it records carries on.
 */
import { AsyncLocalStorage } from "node:async_hooks";
import { randomBytes } from "node:crypto";
import type { Context, Middleware, ServiceBroker } from "moleculer";
import type { Channel } from "@moleculer/channels/types/src";

/** This process's half of every trace id it makes; the other half counts. */
const PROCESS_PART = randomBytes(4).toString("hex");
let counter = 0;

/**
 * A new trace id: 16 hex digits, the form Zipkin keeps as it is (it cuts longer ids to 16), so the
 * `X-Trace-Id` a client sees is the trace's id in the collector. Cheaper than random bytes per request.
 */
export function newTraceId(): string {
	counter = (counter + 1) >>> 0;
	return PROCESS_PART + counter.toString(16).padStart(8, "0");
}

/**
 * What a handler's trace context is: its trace, its span (the parent of what it causes), sampled or
 * not, and (an action's) the request id an `Idempotency-Key` gave it (lib/request-id.ts).
 */
interface Trace {
	requestID: string | null;
	id: string;
	tracing: boolean | null;
	meta?: { requestId?: unknown };
}

const current = new AsyncLocalStorage<Trace>();

/** B3 propagation's headers (github.com/openzipkin/b3-propagation), as NATS and the stores keep them. */
export const B3 = {
	traceId: "x-b3-traceid",
	spanId: "x-b3-spanid",
	sampled: "x-b3-sampled"
} as const;

/** The trace context of the handler running, for the message headers of the events it records. */
export function traceHeaders(): Record<string, string> | undefined {
	const trace = current.getStore();
	if (!trace?.requestID) return undefined;
	return {
		[B3.traceId]: trace.requestID,
		[B3.spanId]: trace.id,
		[B3.sampled]: trace.tracing ? "1" : "0"
	};
}

/** The ids a log line written now carries: the trace's (as `X-Trace-Id`) and the request's, if any. */
export function traceFields(): { traceId?: string; requestId?: string } {
	const trace = current.getStore();
	if (!trace?.requestID) return {};
	const requestId = trace.meta?.requestId;
	return typeof requestId === "string"
		? { traceId: trace.requestID, requestId }
		: { traceId: trace.requestID };
}

type ChannelHandler = (payload: unknown, raw: unknown) => Promise<unknown>;

interface HeaderReader {
	parseMessageHeaders(raw: unknown): Record<string, string> | null;
}

/**
 * Keeps each action's Context as the trace context of its handler's run, and runs each channel
 * message whose headers name a trace in that trace: in a span of it when tracing is on (named after
 * the channel, under its group's name). `enabled`: tracing is on, or log lines carry the ids; when
 * not, nothing is wrapped and a request costs nothing more.
 */
export function TraceContext(enabled: boolean): Middleware {
	let broker: ServiceBroker;
	return {
		name: "TraceContext",
		created(created: ServiceBroker) {
			broker = created;
		},
		localAction(handler: (ctx: Context) => Promise<unknown>) {
			if (!enabled) return handler;
			return (ctx: Context) => current.run(ctx, () => handler(ctx));
		},
		localChannel(handler: ChannelHandler, chan: Channel) {
			if (!enabled) return handler;
			const adapter = (broker as ServiceBroker & { channelAdapter: HeaderReader }).channelAdapter;
			return async (payload: unknown, raw: unknown) => {
				const headers = adapter.parseMessageHeaders(raw);
				const traceID = headers?.[B3.traceId];
				if (!headers || !traceID) return handler(payload, raw);
				if (!broker.isTracingEnabled())
					return current.run({ requestID: traceID, id: headers[B3.spanId], tracing: false }, () =>
						handler(payload, raw)
					);
				const span = broker.tracer.startSpan(`channel '${chan.name}'`, {
					type: "channel",
					traceID,
					parentID: headers[B3.spanId],
					sampled: headers[B3.sampled] === "1",
					service: chan.group,
					tags: { channel: chan.name, group: chan.group, nodeID: broker.nodeID }
				});
				try {
					return await current.run(
						{ requestID: span.traceID, id: span.id, tracing: span.sampled },
						() => handler(payload, raw)
					);
				} catch (err) {
					span.setError(err as Error);
					throw err;
				} finally {
					span.finish();
				}
			};
		}
	} as Middleware;
}
