import fs from "node:fs";
import path from "node:path";
import type { ServiceBroker, ServiceSchema } from "moleculer";
import DeadLettersService from "../../services/dead-letters.service";
import { collect, SERIES } from "../../lib/ops/metrics";
import { createTestBroker, eventually, type AnyServiceSchema } from "../helpers/broker";

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
	const start = async (services: AnyServiceSchema[]) => {
		const broker = createTestBroker(services);
		brokers.push(broker);
		await broker.start();
		return {
			broker,
			send: (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker)
		};
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
			{
				name: "watcher",
				channels: {
					DEAD_LETTERS: {
						group: "watcher",
						handler: async (payload: unknown) => void dead.push(payload)
					}
				}
			}
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

	it("after a restart, redelivers a message only to the groups that had not handled it, and skips a torn last line", async () => {
		const other = (seen: unknown[], fail: boolean): ServiceSchema => ({
			name: "other",
			channels: {
				"thing.happened": {
					group: "other",
					async handler(payload: unknown) {
						if (fail) throw new Error("not now");
						seen.push(payload);
					}
				}
			}
		});
		const handled: unknown[] = [];
		const { broker, send } = await start([consumer(handled), other([], true)]);
		await send("thing.happened", { id: "g1" });
		await eventually(() => expect(handled).toEqual([{ id: "g1" }]));
		await broker.stop();
		brokers.splice(0);
		// A process killed halfway through writing a line.
		fs.appendFileSync(
			path.join(process.env.DATA_DIR as string, "channels", "messages.db"),
			'{"_id":"0torn","chan'
		);
		const [again, late]: unknown[][] = [[], []];
		await start([consumer(again), other(late, false)]);
		await eventually(() => expect(late).toEqual([{ id: "g1" }]));
		await new Promise(resolve => setTimeout(resolve, 100));
		expect(again).toEqual([]);
	});

	it("keeps its file short while running: rewritten once mostly superseded, the messages still waiting kept", async () => {
		// Channels of their own: a group that earlier tests made known keeps their messages waiting for it.
		const group = (name: string, seen: unknown[], fail = false): ServiceSchema => ({
			name,
			channels: {
				[`thing.${name}`]: {
					group: name,
					maxRetries: 1000,
					async handler(payload: unknown) {
						if (fail) throw new Error("not now");
						seen.push(payload);
					}
				}
			}
		});
		const file = path.join(process.env.DATA_DIR as string, "channels", "messages.db");
		const handled: unknown[] = [];
		const { broker, send } = await start([group("flood", handled), group("stuck", [], true)]);
		await send("thing.stuck", { id: "waiting1" });
		// A line as published and one as handled each: 12,000 lines without a rewrite.
		for (let i = 0; i < 6000; i++) await send("thing.flood", { id: `h${i}` });
		await eventually(() => expect(handled).toHaveLength(6000));
		const lines = fs.readFileSync(file, "utf8").split("\n").filter(Boolean);
		expect(lines.length).toBeLessThan(10_000);
		expect(lines.some(line => line.includes("waiting1"))).toBe(true);
		await broker.stop();
		brokers.splice(0);
		const [again, late]: unknown[][] = [[], []];
		await start([group("flood", again), group("stuck", late)]);
		await eventually(() => expect(late).toEqual([{ id: "waiting1" }]));
		await new Promise(resolve => setTimeout(resolve, 100));
		expect(again).toEqual([]);
	});

	it("holds a message published from a service's started() until the adapter has connected, and delivers it", async () => {
		const seen: unknown[] = [];
		const errors: unknown[] = [];
		const publisher: ServiceSchema = {
			name: "publisher",
			// As the outbox does at start-up: the broker connects the adapter only after this.
			started() {
				(this.broker as unknown as { sendToChannel: Send })
					.sendToChannel("thing.happened", { id: "early1" })
					.catch(err => errors.push(err));
			}
		};
		await start([consumer(seen), publisher]);
		await eventually(() => expect(seen).toEqual([{ id: "early1" }]));
		expect(errors).toEqual([]);
	});

	it("hands a message stored without a group to the groups known at the next start", async () => {
		const first = await start([consumer([])]);
		await first.broker.stop();
		brokers.splice(0);
		// What a publish before the groups were loaded left: an orphan, though groups.db knows the group.
		const orphan = {
			_id: `0orphan${Date.now()}`,
			channel: "onepoint.thing.happened",
			payload: { id: "orphan1" },
			pending: [],
			orphan: true
		};
		fs.appendFileSync(
			path.join(process.env.DATA_DIR as string, "channels", "messages.db"),
			`${JSON.stringify(orphan)}\n`
		);
		const seen: unknown[] = [];
		await start([consumer(seen)]);
		await eventually(() => expect(seen).toEqual([{ id: "orphan1" }]));
	});

	it("keeps a dead letter with its error and replays it once, to the group that failed it only", async () => {
		let broken = true;
		const seen: { id: string }[] = [];
		const others: { id: string }[] = [];
		const { broker, send } = await start([
			{
				name: "flaky",
				channels: {
					"thing.broke": {
						group: "flaky",
						maxRetries: 1,
						async handler(payload: { id: string }) {
							if (broken) throw new Error("store unavailable");
							seen.push(payload);
						}
					}
				}
			},
			{
				name: "other",
				channels: {
					"thing.broke": {
						group: "other",
						handler: async (payload: { id: string }) => void others.push(payload)
					}
				}
			},
			DeadLettersService
		]);
		await send("thing.broke", { id: "dl1" });
		const letters = await eventually(async () => {
			const list = await broker.call<{ rows: { id: string }[] }, object>("dead-letters.list", {});
			expect(list.rows).toEqual([
				expect.objectContaining({
					channel: "onepoint.thing.broke",
					group: "flaky",
					error: "store unavailable",
					tries: 2,
					payload: { id: "dl1" },
					status: "dead"
				})
			]);
			return list.rows;
		});
		expect(await broker.call("dead-letters.count")).toEqual({ waiting: 1 });
		await collect(broker);
		expect(broker.metrics.getMetric(SERIES.deadLetters)?.get()?.value).toBe(1);

		broken = false;
		expect(await broker.call("dead-letters.replay", { id: letters[0].id })).toMatchObject({
			count: 1
		});
		await eventually(() => expect(seen).toEqual([{ id: "dl1" }]));
		await expect(broker.call("dead-letters.replay", { id: letters[0].id })).rejects.toMatchObject({
			code: 409,
			type: "DEAD_LETTER_ALREADY_REPLAYED"
		});
		expect(await broker.call("dead-letters.replay", { id: "all" })).toMatchObject({ count: 0 });
		await expect(broker.call("dead-letters.replay", { id: "nosuchletter" })).rejects.toMatchObject({
			code: 404,
			type: "DEAD_LETTER_NOT_FOUND"
		});
		expect(await broker.call("dead-letters.count")).toEqual({ waiting: 0 });
		await collect(broker);
		expect(broker.metrics.getMetric(SERIES.deadLetters)?.get()?.value).toBe(0);
		// The other group had it once, when it was first published; the replay was not for it.
		await new Promise(resolve => setTimeout(resolve, 200));
		expect(seen).toEqual([{ id: "dl1" }]);
		expect(others).toEqual([{ id: "dl1" }]);
	});

	it("tells whether a group has handled everything published before a moment (billing's month close)", async () => {
		const { broker, send } = await start([consumer([], 1)]);
		const adapter = (
			broker as unknown as {
				channelAdapter: {
					caughtUp(channels: string[], group: string, before: Date): Promise<boolean>;
				};
			}
		).channelAdapter;
		await send("thing.happened", { id: "c1" });
		const published = Date.now();
		expect(
			await adapter.caughtUp(["onepoint.thing.happened"], "consumer", new Date(published + 60_000))
		).toBe(false);
		expect(
			await adapter.caughtUp(["onepoint.thing.happened"], "consumer", new Date(published - 60_000))
		).toBe(true);
		// The retry a second later succeeds.
		await eventually(async () =>
			expect(
				await adapter.caughtUp(
					["onepoint.thing.happened"],
					"consumer",
					new Date(published + 60_000)
				)
			).toBe(true)
		);
	});
});
