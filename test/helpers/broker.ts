import { ServiceBroker, type ServiceSchema } from "moleculer";
import { createBrokerOptions } from "../../config/broker";
import { loadConfig } from "../../config";

/** Any service schema, whatever its typed `this`. */
export type AnyServiceSchema = ServiceSchema<any, any, any, any>;

/** `schema` with some of its settings changed, as a test's own configuration of a service. */
export function withSettings(schema: AnyServiceSchema, settings: object): AnyServiceSchema {
	return { name: schema.name, mixins: [schema as unknown as Partial<ServiceSchema>], settings };
}

/** An in-process broker with the real options (channels, breaker, middlewares) and the given services. */
export function createTestBroker(
	services: AnyServiceSchema[],
	env: NodeJS.ProcessEnv = {}
): ServiceBroker {
	const config = loadConfig({ ...process.env, ...env });
	const broker = new ServiceBroker({
		...createBrokerOptions(config),
		nodeID: config.nodeID ?? `test-${process.pid}`
	});
	for (const service of services) broker.createService(service);
	return broker;
}

/** Retries `check` until it stops throwing: for what events make true a little later. */
export async function eventually<T>(
	check: () => Promise<T> | T,
	timeoutMs = 10_000,
	intervalMs = 25
): Promise<T> {
	const deadline = Date.now() + timeoutMs;
	for (;;) {
		try {
			return await check();
		} catch (err) {
			if (Date.now() > deadline) throw err;
			await new Promise(resolve => setTimeout(resolve, intervalMs));
		}
	}
}

/**
 * Waits until every consumer group has handled every message published on `broker`'s channels so
 * far (the embedded adapter's backlog is empty): the moment by which an event can no longer change
 * anything, instead of a guessed sleep. Only while every group with messages waiting is subscribed.
 */
export async function drained(broker: ServiceBroker, timeoutMs = 10_000): Promise<void> {
	const adapter = (broker as ServiceBroker & { channelAdapter: { backlog?(): Promise<number> } })
		.channelAdapter;
	if (!adapter.backlog) throw new Error("drained() needs the embedded channel adapter");
	const backlog = adapter.backlog.bind(adapter);
	await eventually(async () => {
		const waiting = await backlog();
		if (waiting > 0)
			throw new Error(
				`${waiting} message(s) still waiting for their consumers after ${timeoutMs} ms`
			);
	}, timeoutMs);
}
