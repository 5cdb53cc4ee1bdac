import type { ServiceBroker, ServiceSchema } from "moleculer";
import { createTestBroker, eventually } from "../helpers/broker";

type Send = (channel: string, payload: object) => Promise<void>;

/** A consumer whose handler fails the first `failFirst` deliveries of each message. */
function consumer(seen: unknown[], failFirst = 0, maxRetries?: number): ServiceSchema {
	const tries = new Map<string, number>();
	return {
		name: "consumer",
		channels: {
			"thing.happened": {
				group: "consumer",
				maxRetries,
				async handler(payload: { id: string }) {
					const n = (tries.get(payload.id) ?? 0) + 1;
					tries.set(payload.id, n);
					if (n <= failFirst) throw new Error(`failing try ${n}`);
					seen.push(payload);
				}
			}
		}
	};
}

describe("embedded channel adapter", () => {
	const brokers: ServiceBroker[] = [];
	const start = async (services: ServiceSchema[]) => {
		const broker = createTestBroker(services);
		brokers.push(broker);
		await broker.start();
		return { broker, send: (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker) };
	};
	afterEach(async () => {
		await Promise.all(brokers.splice(0).map(b => b.stop()));
	});

	it("delivers each message once to the group", async () => {
		const seen: unknown[] = [];
		const { send } = await start([consumer(seen)]);
		for (let i = 0; i < 20; i++) await send("thing.happened", { id: `a${i}` });
		await eventually(() => expect(seen).toHaveLength(20));
		await new Promise(resolve => setTimeout(resolve, 100));
		expect(seen).toHaveLength(20);
	});

	it("retries a failing handler until it succeeds", async () => {
		const seen: unknown[] = [];
		const { send } = await start([consumer(seen, 2)]);
		await send("thing.happened", { id: "r1" });
		await eventually(() => expect(seen).toEqual([{ id: "r1" }]));
	});

	it("dead-letters a message that keeps failing instead of dropping it", async () => {
		const seen: unknown[] = [];
		const dead: unknown[] = [];
		const { send } = await start([
			consumer(seen, 100, 2),
			{ name: "watcher", channels: { DEAD_LETTERS: { group: "watcher", handler: async (payload: unknown) => void dead.push(payload) } } }
		]);
		await send("thing.happened", { id: "d1" });
		await eventually(() => expect(dead).toEqual([{ id: "d1" }]));
		expect(seen).toEqual([]);
	});

	it("keeps a message across a restart until its consumer has handled it", async () => {
		const { broker, send } = await start([consumer([], 100)]);
		await send("thing.happened", { id: "k1" });
		await new Promise(resolve => setTimeout(resolve, 50));
		await broker.stop();
		brokers.splice(0);
		const seen: unknown[] = [];
		await start([consumer(seen)]);
		await eventually(() => expect(seen).toEqual([{ id: "k1" }]));
	});
});
