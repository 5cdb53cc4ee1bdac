/**
 * SERVICE_WAIT_MS: while the one node of a service is being replaced (a redeploy: the old one has left
 * the registry, the new one has not joined yet), a call to it waits for the new one instead of failing.
 * Only then: a service whose nodes are all there but unavailable (their circuit breaker open, their
 * heartbeats missed) still fails at once, so that shedding load stays fast. A call that waits was never
 * sent, so sending it later cannot apply it twice.
 *
 * Not Moleculer's `retryPolicy`: its middleware wraps an action's handler, which a call to a service no
 * node serves never reaches (`broker.call` rejects with SERVICE_NOT_FOUND before), and for a call made
 * inside another action it would run the calling action again from the start.
 */
import type { Errors, Middleware, ServiceBroker } from "moleculer";

/** No node serves `action` at all: none registered, or the last one has left. */
export function noNodeServes(broker: ServiceBroker, action: string): boolean {
	return (broker.registry.getActionEndpoints(action)?.count() ?? 0) === 0;
}

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms));

/** Resolves once some node serves `action`, or after `waitMs`; at once when one does. */
export async function untilServed(
	broker: ServiceBroker,
	action: string | undefined,
	waitMs: number
): Promise<void> {
	if (!action || waitMs <= 0) return;
	const deadline = performance.now() + waitMs;
	while (noNodeServes(broker, action) && performance.now() < deadline) await sleep(100);
}

type Call = (
	actionName: string,
	params?: unknown,
	opts?: object
) => Promise<unknown> & { ctx?: unknown };

/**
 * The broker middleware for calls between services: a call that found no node of its service waits up
 * to `waitMs` for one, then fails as it would have at once. The promise keeps the context of the call
 * that was made (the caller merges its `meta`).
 */
export function WaitForService(waitMs: number): Middleware {
	const unserved = new Set(["SERVICE_NOT_FOUND", "SERVICE_NOT_AVAILABLE"]);
	let broker: ServiceBroker;
	return {
		name: "WaitForService",
		created(created: ServiceBroker) {
			broker = created;
		},
		call(next: Call): Call {
			return (actionName, params, opts) => {
				const deadline = performance.now() + waitMs;
				const waits = (err: Errors.MoleculerError) =>
					unserved.has(err.type) &&
					typeof actionName === "string" &&
					noNodeServes(broker, actionName) &&
					performance.now() < deadline;
				const retry = async (err: Errors.MoleculerError): Promise<unknown> => {
					if (!waits(err)) throw err;
					await sleep(100);
					const call = next(actionName, params, opts);
					result.ctx = call.ctx;
					return call.catch(retry);
				};
				const first = next(actionName, params, opts);
				const result: ReturnType<Call> = first.catch(retry);
				result.ctx = first.ctx;
				return result;
			};
		}
	} as unknown as Middleware;
}
