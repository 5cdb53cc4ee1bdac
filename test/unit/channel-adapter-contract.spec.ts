/**
 * The channel adapters' contract, run against both (as @moleculer/channels runs one suite against
 * every adapter): the embedded adapter on a fresh data folder, NATS JetStream on a real nats-server.
 * Both must: hand a message to each consumer group once (to one broker of a group that several
 * share); keep a message published before a group first subscribes until it does; retry a failing
 * handler after a growing delay and dead-letter it after `maxRetries`, with its error, origin and
 * headers; answer `caughtUp` (billing's month close) for what waits; deliver a payload intact.
 *
 * Brokers are built as the project builds them (`createTestBroker`), then given short retry delays
 * (no setting has them), no stop delay, and fatal-only logs (the retries and dead letters provoked
 * here log errors on purpose). Each case has brokers and channels of its own, so the cases run
 * concurrently. What one adapter cannot do (one process per data folder) is skipped there, saying
 * why; what it gets wrong is listed in its `knownGaps` and runs as `it.failing`, so that a fix is
 * noticed. Adapter-specific behaviour (restarts, the store, replays, racing consumers) stays in
 * embedded-channel-adapter.spec.ts and nats-channel-adapter.spec.ts.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Errors, type ServiceBroker } from "moleculer";
import { DEAD_LETTER } from "../../lib/channels/redelivery";
import { createTestBroker, eventually, type AnyServiceSchema } from "../helpers/broker";
import { NatsServer } from "../helpers/nats";

/** The project's retries wait 1 s, 2 s, 4 s …: a tenth of that keeps the retry cases short. */
const RETRY = { retryDelayMs: 100, maxRetryDelayMs: 400 };
/** Timers and clocks may round a wait down by a millisecond or two. */
const SLACK_MS = 15;
/** How long a duplicate delivery is given to show up after the expected ones. */
const SETTLE_MS = 150;

type Headers = Record<string, string>;
interface ContractAdapter {
	opts: typeof RETRY;
	addPrefixTopic(name: string): string;
	parseMessageHeaders(raw: unknown): Headers | null;
	caughtUp(channels: string[], group: string, before: Date): Promise<boolean>;
}
type Broker = ServiceBroker & {
	channelAdapter: ContractAdapter;
	sendToChannel(channel: string, payload: unknown, opts?: { headers?: Headers }): Promise<void>;
};

interface AdapterUnderTest {
	name: string;
	/** Environment for one test's brokers: the store they share (a data folder, a server), where no other test publishes on their channels. */
	storeEnv(): Promise<NodeJS.ProcessEnv>;
	tearDown(): Promise<void>;
	/** Why brokers cannot share a consumer group, where they cannot. */
	noSharedGroup?: string;
	/** Cases this adapter fails, and how: they run as `it.failing`, so that a fix is noticed. */
	knownGaps: Partial<Record<GapCase, string>>;
}
type GapCase = "new group beside others";

const folders: string[] = [];
function freshFolder(): string {
	const dir = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-channel-contract-"));
	folders.push(dir);
	return dir;
}
afterAll(() => {
	for (const dir of folders) fs.rmSync(dir, { recursive: true, force: true });
});

const embedded: AdapterUnderTest = {
	name: "embedded",
	storeEnv: async () => ({ TRANSPORTER: "", DATA_DIR: freshFolder() }),
	tearDown: async () => undefined,
	noSharedGroup: "the embedded store serves one process: brokers cannot share its data folder",
	knownGaps: {
		"new group beside others":
			"a message goes to the groups known when it is published; only one published before any group subscribed waits for the first"
	}
};

/** One server for all the NATS cases, started by the first (concurrent tests may start before a `beforeAll` has finished). */
let nats: Promise<NatsServer> | undefined;
const jetStream: AdapterUnderTest = {
	name: "NATS JetStream",
	storeEnv: async () => ({
		TRANSPORTER: (await (nats ??= NatsServer.start())).url,
		DATA_DIR: freshFolder()
	}),
	tearDown: async () => {
		const server = await nats;
		await server?.stop();
		if (server) fs.rmSync(server.storeDir, { recursive: true, force: true });
	},
	knownGaps: {}
};

/** A service whose group (its name) hands each payload to `handle`. */
function consumer(
	name: string,
	channel: string,
	handle: (payload: any, raw: unknown) => unknown,
	maxRetries?: number
): AnyServiceSchema {
	return {
		name,
		channels: {
			[channel]: {
				group: name,
				maxRetries,
				handler: async (payload: unknown, raw: unknown) => void (await handle(payload, raw))
			}
		}
	};
}

/** A group of its own on DEAD_LETTERS, recording the dead letters of the payload with `id` (other cases' letters share the channel). */
const deadLetterWatcher = (name: string, id: string, letters: string[]): AnyServiceSchema => ({
	name,
	channels: {
		DEAD_LETTERS: {
			group: name,
			handler: async (payload: { id?: string }) => void (payload?.id === id && letters.push(id))
		}
	}
});

/** A consumer that records the `id` of each payload. */
const recorder = (name: string, channel: string, seen: string[]): AnyServiceSchema =>
	consumer(name, channel, ({ id }) => seen.push(id));

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms));
const sorted = (list: string[]) => [...list].sort();
const ids = (prefix: string, n: number) =>
	sorted(Array.from({ length: n }, (_, i) => `${prefix}${i}`));

/** One test's brokers: on a store of their own (a data folder) or a shared one (the server) with channels of their own. */
interface Scenario {
	channel(name: string): string;
	start(services: AnyServiceSchema[], node?: string): Promise<Broker>;
	stop(broker: Broker): Promise<void>;
}

async function scenario(
	adapter: AdapterUnderTest,
	testNo: number,
	run: (t: Scenario) => Promise<void>
): Promise<void> {
	const store = await adapter.storeEnv();
	let running: Broker[] = [];
	const t: Scenario = {
		channel: name => `contract.t${testNo}.${name}`,
		async start(services, node = "a") {
			const broker = createTestBroker(services, {
				...store,
				LOG_LEVEL: "fatal",
				NODE_ID: `contract-${testNo}-${node}-${process.pid}`
			}) as Broker;
			Object.assign(broker.channelAdapter.opts, RETRY);
			// No other node routes requests to these: stopping need not wait for them to hear of it (500 ms).
			broker.options.registry = { ...broker.options.registry, stopDelay: 0 };
			running.push(broker);
			await broker.start();
			return broker;
		},
		async stop(broker) {
			running = running.filter(b => b !== broker);
			await broker.stop();
		}
	};
	try {
		await run(t);
	} finally {
		await Promise.all(running.map(broker => broker.stop()));
	}
}

// Concurrently: a broker on NATS takes half a second to start (Moleculer waits for the other nodes' INFO).
describe.each([embedded, jetStream])("channel adapter contract: $name", adapter => {
	let testNo = 0;
	afterAll(() => adapter.tearDown());

	/** A case of the contract; `gap`: one this adapter may be known to fail; `skip`: why it does not apply. */
	function contract(
		name: string,
		run: (t: Scenario) => Promise<void>,
		opts: { gap?: GapCase; skip?: string } = {}
	): void {
		const gap = opts.gap && adapter.knownGaps[opts.gap];
		const test = opts.skip ? it.concurrent.skip : gap ? it.concurrent.failing : it.concurrent;
		const note = opts.skip ? ` [skipped: ${opts.skip}]` : gap ? ` [known gap: ${gap}]` : "";
		const n = ++testNo;
		test(`${name}${note}`, () => scenario(adapter, n, run));
	}

	contract("hands each message to every consumer group once", async ({ channel, start }) => {
		const ch = channel("delivered");
		const [points, billing]: string[][] = [[], []];
		const broker = await start([recorder("points", ch, points), recorder("billing", ch, billing)]);
		for (const id of ids("m", 10)) await broker.sendToChannel(ch, { id });
		await eventually(() => {
			expect(sorted(points)).toEqual(ids("m", 10));
			expect(sorted(billing)).toEqual(ids("m", 10));
		});
		await sleep(SETTLE_MS);
		expect(sorted(points)).toEqual(ids("m", 10));
		expect(sorted(billing)).toEqual(ids("m", 10));
	});

	contract(
		"hands each message to one of the brokers sharing a group",
		async ({ channel, start }) => {
			const ch = channel("shared");
			const [first, second, audit]: string[][] = [[], [], []];
			const [broker] = await Promise.all([
				start([recorder("worker", ch, first), recorder("audit", ch, audit)], "a"),
				start([recorder("worker", ch, second)], "b")
			]);
			for (const id of ids("s", 20)) await broker.sendToChannel(ch, { id });
			await eventually(() => {
				expect(sorted([...first, ...second])).toEqual(ids("s", 20));
				expect(sorted(audit)).toEqual(ids("s", 20));
			});
			await sleep(SETTLE_MS);
			expect(sorted([...first, ...second])).toEqual(ids("s", 20));
			expect(sorted(audit)).toEqual(ids("s", 20));
		},
		{ skip: adapter.noSharedGroup }
	);

	contract(
		"keeps a message published before any group subscribed to its channel, for the first group that does",
		async ({ channel, start, stop }) => {
			const ch = channel("early");
			const publisher = await start([], "publisher");
			await publisher.sendToChannel(ch, { id: "e1" });
			await stop(publisher);
			const seen: string[] = [];
			await start([recorder("late", ch, seen)], "consumer");
			await eventually(() => expect(seen).toEqual(["e1"]));
			await sleep(SETTLE_MS);
			expect(seen).toEqual(["e1"]);
		}
	);

	contract(
		"keeps a message published before a new group first subscribed, for it too, beside the channel's other groups",
		async ({ channel, start, stop }) => {
			const ch = channel("newcomer");
			const [old, newcomer]: string[][] = [[], []];
			const before = await start([recorder("old", ch, old)], "before");
			await before.sendToChannel(ch, { id: "n1" });
			await eventually(() => expect(old).toEqual(["n1"]));
			await stop(before);
			const after = await start(
				[recorder("old", ch, old), recorder("newcomer", ch, newcomer)],
				"after"
			);
			// A message published now reaches the newcomer in any case: once it has, so has the earlier one, if at all.
			await after.sendToChannel(ch, { id: "n2" });
			await eventually(() => expect(newcomer).toContain("n2"));
			await eventually(() => expect(sorted(newcomer)).toEqual(["n1", "n2"]), 1000);
			await eventually(() => expect(old).toEqual(["n1", "n2"]));
		},
		{ gap: "new group beside others" }
	);

	contract(
		"retries a failing handler after a growing delay, and applies the message once, when it succeeds",
		async ({ channel, start }) => {
			const ch = channel("retried");
			const tries: number[] = [];
			let applied = 0;
			const broker = await start([
				consumer("flaky", ch, () => {
					tries.push(Date.now());
					if (tries.length <= 2) throw new Error(`failing try ${tries.length}`);
					applied++;
				})
			]);
			await broker.sendToChannel(ch, { id: "r1" });
			await eventually(() => expect(applied).toBe(1));
			await sleep(SETTLE_MS);
			expect(applied).toBe(1);
			expect(tries).toHaveLength(3);
			expect(tries[1] - tries[0]).toBeGreaterThanOrEqual(RETRY.retryDelayMs - SLACK_MS);
			expect(tries[2] - tries[1]).toBeGreaterThanOrEqual(2 * RETRY.retryDelayMs - SLACK_MS);
		}
	);

	contract(
		"dead-letters a message after maxRetries, with its error, original channel and group, and its own headers",
		async ({ channel, start }) => {
			const ch = channel("poison");
			const tries: string[] = [];
			const letters: { payload: unknown; headers: Headers }[] = [];
			const broker: Broker = await start([
				consumer(
					"poisoned",
					ch,
					({ id }) => {
						tries.push(id);
						throw new Error(`cannot apply ${id}`);
					},
					2
				),
				{
					name: "watcher",
					channels: {
						// The dead letters of every case on this store: this one's are told by their payload.
						DEAD_LETTERS: {
							group: `watcher-${ch}`,
							async handler(payload: { id?: string }, raw: unknown) {
								if (payload?.id === "p1")
									letters.push({
										payload,
										headers: broker.channelAdapter.parseMessageHeaders(raw) ?? {}
									});
							}
						}
					}
				}
			]);
			const adapterOf = broker.channelAdapter;
			const sentAt = Date.now();
			await broker.sendToChannel(
				ch,
				{ id: "p1", note: "poison" },
				{ headers: { "x-trace": "trace-p1" } }
			);
			await eventually(() => expect(letters).toHaveLength(1));
			expect(Date.now() - sentAt).toBeGreaterThanOrEqual(3 * RETRY.retryDelayMs - SLACK_MS);
			expect(letters[0].payload).toEqual({ id: "p1", note: "poison" });
			expect(letters[0].headers).toEqual(
				expect.objectContaining({
					[DEAD_LETTER.channel]: adapterOf.addPrefixTopic(ch),
					[DEAD_LETTER.group]: "poisoned",
					[DEAD_LETTER.error]: "cannot apply p1",
					[DEAD_LETTER.tries]: "3",
					[DEAD_LETTER.id]: expect.any(String),
					"x-trace": "trace-p1"
				})
			);
			// A dead-lettered message is done with: it does not hold its group back.
			await eventually(async () =>
				expect(
					await adapterOf.caughtUp([adapterOf.addPrefixTopic(ch)], "poisoned", new Date())
				).toBe(true)
			);
			await sleep(SETTLE_MS);
			expect(tries).toEqual(["p1", "p1", "p1"]);
			expect(letters).toHaveLength(1);
		}
	);

	contract(
		"retries a message whose handler finds a dependency unavailable for as long as that lasts, and never dead-letters it for that",
		async ({ channel, start }) => {
			const ch = channel("unavailable");
			const tries: string[] = [];
			const letters: string[] = [];
			let applied = 0;
			const broker = await start([
				consumer(
					"waiting",
					ch,
					({ id }) => {
						tries.push(id);
						// A store or a service down: more failures than maxRetries, none of them the message's fault.
						if (tries.length <= 4)
							throw new Errors.MoleculerRetryableError("store unavailable", 503);
						applied++;
					},
					1
				),
				deadLetterWatcher(`watcher-${ch}`, "a1", letters)
			]);
			await broker.sendToChannel(ch, { id: "a1" });
			await eventually(() => expect(applied).toBe(1));
			await sleep(SETTLE_MS);
			expect(tries).toEqual(["a1", "a1", "a1", "a1", "a1"]);
			expect(letters).toEqual([]);
		}
	);

	contract(
		"counts only the handler's own failures toward maxRetries, not a dependency's unavailability between them",
		async ({ channel, start }) => {
			const ch = channel("mixed");
			const tries: string[] = [];
			const letters: string[] = [];
			const broker = await start([
				consumer(
					"mixed",
					ch,
					({ id }) => {
						tries.push(id);
						// Unavailable, poison, unavailable, poison …: the second poison failure is its last.
						if (tries.length % 2) throw new Errors.MoleculerRetryableError("timed out", 504);
						throw new TypeError(`cannot read ${id}`);
					},
					1
				),
				deadLetterWatcher(`watcher-${ch}`, "x1", letters)
			]);
			await broker.sendToChannel(ch, { id: "x1" });
			await eventually(() => expect(letters).toEqual(["x1"]));
			await sleep(SETTLE_MS);
			expect(tries).toHaveLength(4);
		}
	);

	contract(
		"keeps handling a group's other messages while more than maxInFlight of them fail again and again",
		async ({ channel, start }) => {
			const ch = channel("crowded");
			const failing = ids("f", 24);
			const healthy = ids("h", 10);
			const handled: string[] = [];
			let mended = false;
			const broker = await start([
				consumer(
					"crowded",
					ch,
					({ id }) => {
						if (id.startsWith("f") && !mended) throw new Error(`cannot apply ${id} yet`);
						handled.push(id);
					},
					// Not dead-lettered while the case runs: they only keep failing.
					1000
				)
			]);
			// More failing messages than the group handles at once (maxInFlight 16), then healthy ones.
			for (const id of failing) await broker.sendToChannel(ch, { id });
			for (const id of healthy) await broker.sendToChannel(ch, { id });
			await eventually(() => expect(sorted(handled)).toEqual(healthy));
			mended = true;
			await eventually(() => expect(sorted(handled)).toEqual(sorted([...failing, ...healthy])));
		}
	);

	contract(
		"tells whether a group has handled everything published on its channels before a moment (billing's month close)",
		async ({ channel, start }) => {
			const [quick, slow] = [channel("quick"), channel("slow")];
			const handled: string[] = [];
			let release = () => undefined as void;
			const gate = new Promise<void>(resolve => (release = resolve));
			const broker = await start([
				{
					name: "closer",
					channels: {
						[quick]: {
							group: "closer",
							handler: async ({ id }: { id: string }) => void handled.push(id)
						},
						[slow]: {
							group: "closer",
							async handler({ id }: { id: string }) {
								await gate;
								handled.push(id);
							}
						}
					}
				}
			]);
			try {
				const adapterOf = broker.channelAdapter;
				const both = [quick, slow].map(name => adapterOf.addPrefixTopic(name));
				expect(await adapterOf.caughtUp(both, "closer", new Date())).toBe(true);
				await broker.sendToChannel(quick, { id: "q1" });
				await eventually(async () =>
					expect(await adapterOf.caughtUp(both, "closer", new Date())).toBe(true)
				);

				const beforePublish = new Date(Date.now() - 1);
				await broker.sendToChannel(slow, { id: "w1" });
				const afterPublish = new Date(Date.now() + 1);
				expect(await adapterOf.caughtUp(both, "closer", afterPublish)).toBe(false);
				expect(await adapterOf.caughtUp([both[1]], "closer", afterPublish)).toBe(false);
				expect(await adapterOf.caughtUp([both[0]], "closer", afterPublish)).toBe(true);
				// A moment before it was published, the group had handled everything.
				expect(await adapterOf.caughtUp(both, "closer", beforePublish)).toBe(true);
				expect(handled).toEqual(["q1"]);

				release();
				await eventually(async () =>
					expect(await adapterOf.caughtUp(both, "closer", afterPublish)).toBe(true)
				);
				expect(handled).toEqual(["q1", "w1"]);
			} finally {
				// Stopping waits for the handlers in flight.
				release();
			}
		}
	);

	contract(
		"delivers a payload intact: objects, arrays, unicode, numbers",
		async ({ channel, start }) => {
			const ch = channel("payload");
			const payload = {
				id: "u1",
				text: 'Grüße, 日本語, עברית, 🎉 👩‍👩‍👧, e\u0301, line\nbreak, "quoted" \\ tab\t \u2028 end',
				numbers: {
					zero: 0,
					negative: -42,
					float: 0.1 + 0.2,
					tiny: 5e-324,
					huge: 1.7976931348623157e308,
					maxSafe: Number.MAX_SAFE_INTEGER,
					minSafe: Number.MIN_SAFE_INTEGER
				},
				flags: [true, false, null],
				nested: {
					list: [1, "two", { three: [3, 3.5] }],
					empty: {},
					none: [] as unknown[],
					deep: { a: { b: { c: { d: "e" } } } }
				},
				"key with spaces": "ok",
				ключ: "значение",
				"🔑": "emoji key",
				large: "ü".repeat(32 * 1024)
			};
			const bare = ["a bare string: ☃", 12.5, -0.001, [1, "zwei", { drei: 3 }], true];
			const seen: unknown[] = [];
			const broker = await start([consumer("reader", ch, p => seen.push(p))]);
			await broker.sendToChannel(ch, payload);
			for (const value of bare) await broker.sendToChannel(ch, value);
			await eventually(() => expect(seen).toHaveLength(1 + bare.length));
			expect(seen).toEqual(expect.arrayContaining([payload, ...bare]));
			const received = seen.find(p => (p as { id?: string })?.id === "u1") as typeof payload;
			expect(received.text).toBe(payload.text);
			expect(received.large).toHaveLength(32 * 1024);
			expect(Object.is(received.numbers.float, 0.1 + 0.2)).toBe(true);
		}
	);

	contract(
		"delivers a payload whose keys have a dot or a leading $ intact",
		async ({ channel, start }) => {
			const ch = channel("keys");
			const payload = {
				id: "k1",
				"utm.source": "mail",
				$type: "member",
				nested: { "a.b": { $c: 1 } }
			};
			const seen: unknown[] = [];
			const broker = await start([consumer("reader", ch, p => seen.push(p))]);
			await broker.sendToChannel(ch, payload);
			await eventually(() => expect(seen).toEqual([payload]));
		}
	);
});
