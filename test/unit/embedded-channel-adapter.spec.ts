import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ServiceBroker, ServiceSchema } from "moleculer";
import DeadLettersService from "../../services/dead-letters.service";
import { collect, SERIES } from "../../lib/ops/metrics";
import { Database } from "../../lib/store/sqlite";
import { createTestBroker, eventually, type AnyServiceSchema } from "../helpers/broker";
import { openDatabase, storeChannelMessage, storedIds } from "../helpers/channel-store";

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

const dataDir = process.env.DATA_DIR as string;

describe("embedded channel adapter", () => {
	const brokers: ServiceBroker[] = [];
	const start = async (services: AnyServiceSchema[], env: NodeJS.ProcessEnv = {}) => {
		const broker = createTestBroker(services, env);
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

	it("after a restart, redelivers a message only to the groups that had not handled it", async () => {
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
		const [again, late]: unknown[][] = [[], []];
		await start([consumer(again), other(late, false)]);
		await eventually(() => expect(late).toEqual([{ id: "g1" }]));
		await new Promise(resolve => setTimeout(resolve, 100));
		expect(again).toEqual([]);
	});

	it("deletes a message's row once every group has handled it, and keeps the rows of the messages still waiting", async () => {
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
		const handled: unknown[] = [];
		const { broker, send } = await start([group("flood", handled), group("stuck", [], true)]);
		await send("thing.stuck", { id: "waiting1" });
		for (let i = 0; i < 1000; i++) await send("thing.flood", { id: `h${i}` });
		await eventually(() => expect(handled).toHaveLength(1000));
		await eventually(() => expect(storedIds(dataDir, "onepoint.thing.flood")).toEqual([]));
		expect(storedIds(dataDir, "onepoint.thing.stuck")).toEqual(["waiting1"]);
		await broker.stop();
		brokers.splice(0);
		const [again, late]: unknown[][] = [[], []];
		await start([group("flood", again), group("stuck", late)]);
		await eventually(() => expect(late).toEqual([{ id: "waiting1" }]));
		await new Promise(resolve => setTimeout(resolve, 100));
		expect(again).toEqual([]);
	});

	it("answers a publish only once its row is committed", async () => {
		// A handler held until the end: the message's row stays meanwhile.
		let release = () => undefined as void;
		const held = new Promise<void>(resolve => (release = resolve));
		const { send } = await start([
			{ name: "holder", channels: { "thing.held": { group: "holder", handler: () => held } } }
		]);
		let seenOnAnswer: string[] = [];
		await send("thing.held", { id: "c1" }).then(() => {
			seenOnAnswer = storedIds(dataDir, "onepoint.thing.held");
		});
		release();
		expect(seenOnAnswer).toEqual(["c1"]);
	});

	it("hands a group up to maxInFlight of its waiting messages in one turn, and acknowledges those handled in one turn with one commit", async () => {
		// Waiting since before the start, as a crash or a consumer's absence leaves them.
		for (let i = 0; i < 40; i++)
			storeChannelMessage(dataDir, {
				id: `0batch${String(i).padStart(4, "0")}`,
				channel: "onepoint.thing.batched",
				payload: JSON.stringify({ id: `b${i}` }),
				pending: ["batcher"]
			});
		const started: string[] = [];
		let startedInFirstTurn = 0;
		let release = () => undefined as void;
		const gate = new Promise<void>(resolve => (release = resolve));
		await start([
			{
				name: "batcher",
				channels: {
					"thing.batched": {
						group: "batcher",
						async handler({ id }: { id: string }) {
							if (!started.length) setImmediate(() => (startedInFirstTurn = started.length));
							started.push(id);
							await gate;
						}
					}
				}
			}
		]);
		await eventually(() => expect(startedInFirstTurn).toBeGreaterThan(0));
		// config/broker.ts: 16 at once.
		expect(startedInFirstTurn).toBe(16);
		const database = Database.acquire(path.join(dataDir, "onepoint.sqlite"));
		try {
			const exec = jest.spyOn(database.db, "exec");
			// Each handler that finishes frees a slot for the next message, within the same turn.
			release();
			await eventually(() => expect(storedIds(dataDir, "onepoint.thing.batched")).toEqual([]));
			expect(started).toHaveLength(40);
			expect(exec.mock.calls.filter(([sql]) => sql === "COMMIT")).toHaveLength(1);
		} finally {
			await database.release();
		}
	});

	it("imports the messages still waiting in an earlier version's files once, then renames them", async () => {
		const oldDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-channel-files-"));
		const dir = path.join(oldDataDir, "channels");
		fs.mkdirSync(dir);
		// As the NeDB-format store left them: messages, acknowledgements, tombstones, a line torn by a kill.
		const happened = "onepoint.thing.happened";
		fs.writeFileSync(
			path.join(dir, "messages.db"),
			[
				{
					_id: "0aaaaaaaa0001",
					channel: happened,
					payload: { id: "m1" },
					pending: ["consumer", "other"]
				},
				{ _id: "0aaaaaaaa0002", channel: happened, payload: { id: "m2" }, pending: ["consumer"] },
				{ _id: "0aaaaaaaa0001", handledBy: "other" },
				{
					_id: "0aaaaaaaa0003",
					channel: happened,
					payload: { id: "m3", at: { $$date: Date.UTC(2026, 0, 1) } },
					headers: { "x-trace": "t3" },
					pending: ["consumer"]
				},
				{ $$deleted: true, _id: "0aaaaaaaa0002" },
				{
					_id: "0aaaaaaaa0004",
					channel: "onepoint.thing.orphaned",
					payload: { id: "o4" },
					pending: [],
					orphan: true
				},
				{ _id: "0aaaaaaaa0005", channel: happened, payload: { id: "m5" }, pending: ["consumer"] },
				{ _id: "0aaaaaaaa0005", handledBy: "consumer" }
			]
				.map(line => `${JSON.stringify(line)}\n`)
				.join("") + '{"_id":"0torn","chan'
		);
		// A NeDB datastore: an index declared, a group superseded by a later line, one removed.
		fs.writeFileSync(
			path.join(dir, "groups.db"),
			[
				{ _id: `${happened}|consumer`, channel: happened, group: "consumer" },
				{ $$indexCreated: { fieldName: "channel", unique: false, sparse: false } },
				{ _id: `${happened}|other`, channel: happened, group: "another" },
				{ _id: "onepoint.thing.gone|old", channel: "onepoint.thing.gone", group: "old" },
				{ _id: `${happened}|other`, channel: happened, group: "other" },
				{ $$deleted: true, _id: "onepoint.thing.gone|old" }
			]
				.map(line => `${JSON.stringify(line)}\n`)
				.join("")
		);
		const headersOf = new Map<string, Record<string, string>>();
		const reader = (seen: unknown[]): ServiceSchema => ({
			name: "consumer",
			channels: {
				"thing.happened": {
					group: "consumer",
					async handler(payload: { id: string }, raw: { headers?: Record<string, string> }) {
						seen.push(payload);
						if (raw.headers) headersOf.set(payload.id, raw.headers);
					}
				}
			}
		});
		const orphans: unknown[] = [];
		const adopter: ServiceSchema = {
			name: "adopter",
			channels: {
				"thing.orphaned": { group: "adopter", handler: async (p: unknown) => void orphans.push(p) }
			}
		};
		const seen: unknown[] = [];
		const { broker, send } = await start([reader(seen), adopter], { DATA_DIR: oldDataDir });
		await eventually(() => {
			expect(seen).toEqual([{ id: "m1" }, { id: "m3", at: "2026-01-01T00:00:00.000Z" }]);
			expect(orphans).toEqual([{ id: "o4" }]);
		});
		expect(headersOf.get("m3")).toEqual({ "x-trace": "t3" });
		expect(fs.readdirSync(dir).sort()).toEqual(["groups.db.migrated", "messages.db.migrated"]);
		// The groups came too: a message published now waits for `other` as well, not for `another` or `old`.
		await send("thing.happened", { id: "m6" });
		await eventually(() => expect(seen).toHaveLength(3));
		await eventually(() => {
			const db = openDatabase(oldDataDir);
			try {
				expect(
					db.prepare("SELECT channel, group_name FROM channel_groups ORDER BY 1, 2").all()
				).toEqual([
					{ channel: happened, group_name: "consumer" },
					{ channel: happened, group_name: "other" },
					{ channel: "onepoint.thing.orphaned", group_name: "adopter" }
				]);
				expect(db.prepare("SELECT pending FROM channel_messages").all()).toEqual([
					{ pending: '["other"]' }
				]);
			} finally {
				db.close();
			}
		});
		await broker.stop();
		brokers.splice(0);
		// Imported once: nothing handled comes again.
		const again: unknown[] = [];
		await start([reader(again), adopter], { DATA_DIR: oldDataDir });
		await new Promise(resolve => setTimeout(resolve, 100));
		expect(again).toEqual([]);
		fs.rmSync(oldDataDir, { recursive: true, force: true });
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
		// What a publish before the groups were loaded left: an orphan, though the group is known.
		storeChannelMessage(dataDir, {
			id: "0orphan1",
			channel: "onepoint.thing.happened",
			payload: JSON.stringify({ id: "orphan1" }),
			pending: [],
			orphan: true
		});
		const seen: unknown[] = [];
		await start([consumer(seen)]);
		await eventually(() => expect(seen).toEqual([{ id: "orphan1" }]));
	});

	it("hands a message stored before any group of its channel was known to every group starting with the node", async () => {
		storeChannelMessage(dataDir, {
			id: "0orphan2",
			channel: "onepoint.thing.shared",
			payload: JSON.stringify({ id: "orphan2" }),
			pending: [],
			orphan: true
		});
		const seen: Record<string, unknown[]> = { first: [], second: [] };
		const group = (name: string): ServiceSchema => ({
			name,
			channels: {
				"thing.shared": {
					group: name,
					handler: async (p: unknown) => void seen[name].push(p)
				}
			}
		});
		await start([group("first"), group("second")]);
		await eventually(() =>
			expect(seen).toEqual({ first: [{ id: "orphan2" }], second: [{ id: "orphan2" }] })
		);
		await eventually(() => expect(storedIds(dataDir, "onepoint.thing.shared")).toEqual([]));
	});

	it("keeps a message no group consumes on disk, not in memory, and hands it to the first group that subscribes", async () => {
		const { broker, send } = await start([]);
		for (const id of ["u1", "u2", "u3"]) await send("thing.unheard", { id });
		expect(storedIds(dataDir, "onepoint.thing.unheard")).toEqual(["u1", "u2", "u3"]);
		// A node running some of the services publishes to channels it does not consume: what it
		// holds in memory must not grow with them (the adapter's private map, read for this only).
		const { stored } = (
			broker as unknown as { channelAdapter: { stored: Map<string, { channel: string }> } }
		).channelAdapter;
		const held = () => [...stored.values()].filter(m => m.channel === "onepoint.thing.unheard");
		expect(held()).toEqual([]);
		const seen: unknown[] = [];
		await broker
			.createService({
				name: "late",
				channels: {
					"thing.unheard": { group: "late", handler: async (p: unknown) => void seen.push(p) }
				}
			})
			._start();
		await eventually(() => expect(seen).toEqual([{ id: "u1" }, { id: "u2" }, { id: "u3" }]));
		await eventually(() => expect(storedIds(dataDir, "onepoint.thing.unheard")).toEqual([]));
		expect(held()).toEqual([]);
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
