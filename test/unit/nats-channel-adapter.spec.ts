/**
 * The NATS JetStream channel adapter against a real nats-server: a consumer whose store is down for
 * 30 s catches up through redeliveries with backoff, and nothing is dead-lettered; a message that
 * keeps failing is dead-lettered with its error and replayed once, to its group only; nodes of one
 * group starting at once all join its consumer; a consumer stalled past several `ack_wait`s does not
 * dead-letter what it had not finished; an event sent twice is stored once.
 */
import type { ServiceBroker } from "moleculer";
import { AckPolicy, type JetStreamManager, type JsMsg } from "nats";
import { EVENT_ID } from "../../lib/channels/redelivery";
import DeadLettersService from "../../services/dead-letters.service";
import { createTestBroker, eventually, type AnyServiceSchema } from "../helpers/broker";
import { NatsServer } from "../helpers/nats";

jest.setTimeout(240_000);

type Send = (
	channel: string,
	payload: object,
	opts?: { headers: Record<string, string> }
) => Promise<void>;

/** A consumer redelivered every 300 ms while unacknowledged: a stall of a few ack_waits, quickly. */
const shortAckWait = { nats: { consumerOptions: { config: { ack_wait: 300_000_000 } } } };

/** A store that refuses connections: what the handler sees while MongoDB is down. */
const storeDown = () =>
	Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:27017"), { code: "ECONNREFUSED" });

describe("NATS channel adapter: redelivery and dead letters", () => {
	let nats: NatsServer;
	let broker: ServiceBroker;
	let send: Send;
	/** The outage: the store fails every message until this moment. */
	let outageUntil = 0;
	let broken = true;
	const applied = new Map<string, number>();
	const others: string[] = [];
	const replayed: string[] = [];

	const services: AnyServiceSchema[] = [
		{
			name: "store-user",
			channels: {
				"thing.saved": {
					group: "store-user",
					// Far fewer than the failures of a 30 s outage: they are not the messages' fault.
					maxRetries: 1,
					async handler(payload: { id: string }) {
						if (Date.now() < outageUntil) throw storeDown();
						applied.set(payload.id, (applied.get(payload.id) ?? 0) + 1);
					}
				},
				"thing.broke": {
					group: "store-user",
					maxRetries: 1,
					async handler(payload: { id: string }) {
						if (broken) throw new Error("cannot apply");
						replayed.push(payload.id);
					}
				}
			}
		},
		{
			name: "bystander",
			channels: {
				"thing.broke": {
					group: "bystander",
					handler: async (payload: { id: string }) => void others.push(payload.id)
				}
			}
		},
		DeadLettersService
	];

	beforeAll(async () => {
		nats = await NatsServer.start();
		broker = createTestBroker(services, { TRANSPORTER: nats.url });
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
	});
	afterAll(async () => {
		await broker.stop();
		await nats.stop();
	});

	it("applies every message of a consumer that fails for 30 s, once each, with nothing dead-lettered", async () => {
		outageUntil = Date.now() + 30_000;
		const ids = Array.from({ length: 20 }, (_, i) => `s${i}`);
		for (const id of ids) await send("thing.saved", { id });
		await eventually(
			() => expect([...applied.keys()].sort()).toEqual([...ids].sort()),
			200_000,
			500
		);
		expect([...applied.values()].every(n => n === 1)).toBe(true);
		expect(await broker.call("dead-letters.list", { status: "all" })).toMatchObject({ total: 0 });
	});

	it("dead-letters a message that keeps failing, with its error, and replays it once to its group only", async () => {
		// An outbox event: its replay, within the stream's duplicate window, is not taken for a repeat.
		await send(
			"thing.broke",
			{ id: "b1" },
			{ headers: { [EVENT_ID]: "01JEVENT0000000000000000B1" } }
		);
		const letter = await eventually(async () => {
			const { rows } = await broker.call<
				{ rows: { id: string; channel: string; group: string; error: string }[] },
				object
			>("dead-letters.list", {});
			expect(rows).toEqual([
				expect.objectContaining({
					channel: "onepoint.thing.broke",
					group: "store-user",
					error: "cannot apply",
					tries: 2,
					payload: { id: "b1" }
				})
			]);
			return rows[0];
		}, 30_000);
		expect(await broker.call("dead-letters.count")).toEqual({ waiting: 1 });

		broken = false;
		expect(await broker.call("dead-letters.replay", { id: "all" })).toMatchObject({
			count: 1,
			replayed: [expect.objectContaining({ id: letter.id })]
		});
		await eventually(() => expect(replayed).toEqual(["b1"]));
		await expect(broker.call("dead-letters.replay", { id: letter.id })).rejects.toMatchObject({
			type: "DEAD_LETTER_ALREADY_REPLAYED"
		});
		// A message after the replay: once it is handled, the replay has been passed by every group.
		await send("thing.broke", { id: "b2" });
		await eventually(() => expect(others).toEqual(["b1", "b2"]));
		expect(replayed).toEqual(["b1", "b2"]);
		expect(await broker.call("dead-letters.count")).toEqual({ waiting: 0 });
	});

	it("tells whether a group has acknowledged everything published before a moment (billing's month close)", async () => {
		const adapter = (
			broker as unknown as {
				channelAdapter: {
					caughtUp(channels: string[], group: string, before: Date): Promise<boolean>;
				};
			}
		).channelAdapter;
		outageUntil = Date.now() + 3_000;
		await send("thing.saved", { id: "late1" });
		const published = new Date();
		const later = new Date(published.getTime() + 60_000);
		expect(await adapter.caughtUp(["onepoint.thing.saved"], "store-user", later)).toBe(false);
		// Before the waiting message was published, the group had handled everything.
		expect(
			await adapter.caughtUp(
				["onepoint.thing.saved"],
				"store-user",
				new Date(published.getTime() - 60_000)
			)
		).toBe(true);
		await eventually(
			async () =>
				expect(await adapter.caughtUp(["onepoint.thing.saved"], "store-user", later)).toBe(true),
			30_000,
			200
		);
		expect(applied.get("late1")).toBe(1);
	});

	it("starts every node of a group when they all create its consumer at once, and hands each message to one of them", async () => {
		const handled: string[] = [];
		const group = (n: number): AnyServiceSchema => ({
			name: "late-user",
			channels: {
				"thing.started": {
					group: "late-user",
					handler: async (payload: { id: string }) => void handled.push(`${n}:${payload.id}`)
				}
			}
		});
		const nodes = [1, 2, 3, 4].map(n =>
			createTestBroker([group(n)], { TRANSPORTER: nats.url, NODE_ID: `late-${n}-${process.pid}` })
		);
		const errors = jest.spyOn(console, "error");
		try {
			await Promise.all(nodes.map(node => node.start()));
			// Losing the race to create the consumer is expected, not an error of the node's.
			expect(errors).not.toHaveBeenCalled();
			for (const id of ["m1", "m2", "m3", "m4"]) await send("thing.started", { id });
			await eventually(() =>
				expect(handled.map(h => h.split(":")[1]).sort()).toEqual(["m1", "m2", "m3", "m4"])
			);
		} finally {
			errors.mockRestore();
			await Promise.all(nodes.map(node => node.stop()));
		}
	});
	it("dead-letters by the handler's own failures: a consumer stalled past several ack_waits keeps the messages it had not finished", async () => {
		const deliveries: number[] = [];
		const applied: string[] = [];
		let resume = () => undefined as void;
		const stalled = new Promise<void>(resolve => (resume = resolve));
		let failedOnce = false;
		const node = createTestBroker(
			[
				{
					name: "stalled-user",
					channels: {
						"thing.stalled": {
							group: "stalled-user",
							maxRetries: 1,
							...shortAckWait,
							async handler(payload: { id: string }, raw: JsMsg) {
								deliveries.push(raw.info.redeliveryCount);
								// The first deliveries stall (a paused node) while JetStream redelivers the message.
								if (raw.info.redeliveryCount < 4) return stalled;
								// Then one failure of its own: one of maxRetries + 1, whatever JetStream counted.
								if (!failedOnce) {
									failedOnce = true;
									throw new Error("one bad moment");
								}
								applied.push(payload.id);
							}
						}
					}
				}
			],
			{ TRANSPORTER: nats.url, NODE_ID: `stalled-${process.pid}` }
		);
		await node.start();
		try {
			await send("thing.stalled", { id: "t1" });
			await eventually(() => expect(applied).toContain("t1"), 30_000);
			expect(failedOnce).toBe(true);
			expect(Math.max(...deliveries)).toBeGreaterThanOrEqual(4);
			// Any dead letter would have been sent before the retry that applied it.
			await new Promise(resolve => setTimeout(resolve, 500));
			const { rows } = await broker.call<{ rows: { channel: string }[] }, object>(
				"dead-letters.list",
				{ status: "all" }
			);
			expect(rows.filter(row => row.channel === "onepoint.thing.stalled")).toEqual([]);
		} finally {
			resume();
			await node.stop();
		}
	});

	it("stores an event sent twice (a publish retried after its acknowledgement was lost) once: its outbox id is its Nats-Msg-Id", async () => {
		const manager = (broker as unknown as { channelAdapter: { manager: JetStreamManager } })
			.channelAdapter.manager;
		const event = (id: string) => ({ headers: { [EVENT_ID]: id } });
		await send("thing.sent", { id: "e1" }, event("01JEVENT0000000000000000E1"));
		await send("thing.sent", { id: "e1" }, event("01JEVENT0000000000000000E1"));
		await send("thing.sent", { id: "e2" }, event("01JEVENT0000000000000000E2"));
		await send("thing.sent", { id: "no-id" });
		await send("thing.sent", { id: "no-id" });
		const { state } = await manager.streams.info("onepoint_thing_sent");
		expect(state.messages).toBe(4);
	});
	it("lets a consumer made by an earlier version (max_ack_pending 16) hold the messages waiting for their retry too", async () => {
		const manager = (broker as unknown as { channelAdapter: { manager: JetStreamManager } })
			.channelAdapter.manager;
		await manager.streams.add({ name: "onepoint_thing_older", subjects: ["onepoint.thing.older"] });
		await manager.consumers.add("onepoint_thing_older", {
			durable_name: "older-user",
			deliver_subject: "older-deliveries",
			deliver_group: "onepoint_thing_older",
			ack_policy: AckPolicy.Explicit,
			max_ack_pending: 16
		});
		const seen: string[] = [];
		const node = createTestBroker(
			[
				{
					name: "older-user",
					channels: {
						"thing.older": {
							group: "older-user",
							handler: async (payload: { id: string }) => void seen.push(payload.id)
						}
					}
				}
			],
			{ TRANSPORTER: nats.url, NODE_ID: `older-${process.pid}` }
		);
		await node.start();
		try {
			await eventually(async () => {
				const { config } = await manager.consumers.info("onepoint_thing_older", "older-user");
				expect(config.max_ack_pending).toBe(16 + 1000);
			});
			await send("thing.older", { id: "o1" });
			await eventually(() => expect(seen).toEqual(["o1"]));
		} finally {
			await node.stop();
		}
	});
});
