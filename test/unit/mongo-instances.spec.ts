/**
 * Two instances of the stateful services sharing one MongoDB, as nodes that scale out do: each
 * broker has its own points, deals and members service (own in-process locks, own channel store)
 * over the same database. The in-process lock serialises nothing between them; the store's
 * conditional writes must.
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { MongoClient } from "mongodb";
import { ulid } from "ulid";
import type { ServiceBroker, ServiceSchema } from "moleculer";
import DealsService, { type DealView } from "../../services/deals.service";
import IdempotencyService, { type Begun } from "../../services/idempotency.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import OrdersService, { type OrderView } from "../../services/orders.service";
import PaymentsService from "../../services/payments.service";
import PointsService, { type PostResult } from "../../services/points.service";
import { createTestBroker, eventually, withSettings } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

type Send = (channel: string, payload: object) => Promise<void>;

interface Entry {
	cause: string;
	kind: string;
	amount: number;
}

/** Counts, per deal and per order, the `deal.voided` and `order.voided` events the instances published. */
const voidedCounts = new Map<string, number>();
const count = (id: string) => voidedCounts.set(id, (voidedCounts.get(id) ?? 0) + 1);
const VoidedCounter: ServiceSchema = {
	name: "voided-counter",
	channels: {
		"deal.voided": {
			group: "voided-counter",
			handler: async (payload: { dealId: string }) => void count(payload.dealId)
		},
		"order.voided": {
			group: "voided-counter",
			handler: async (payload: { orderId: string }) => void count(payload.orderId)
		}
	}
};

describe("two instances sharing MongoDB", () => {
	// The test's clock: the lots below are earned in May 2026.
	clockFrom("2026-05-14T10:00:00.000Z");
	let a: ServiceBroker;
	let b: ServiceBroker;
	let mongo: MongoClient;
	const send = (broker: ServiceBroker, channel: string, payload: object) =>
		(broker as unknown as { sendToChannel: Send }).sendToChannel(channel, payload);
	const balance = async (memberId: string) =>
		(await a.call<{ balance: number }, object>("points.get", { memberId })).balance;
	const history = async (memberId: string) =>
		(await a.call<{ rows: Entry[] }, object>("points.history", { memberId, pageSize: 100 })).rows;
	const debit = (broker: ServiceBroker, memberId: string, sourceId: string, amount: number) =>
		broker.call<PostResult, object>("points.debit", {
			memberId,
			sourceType: "deal",
			sourceId,
			merchantId: "20",
			amount
		});
	const earn = async (memberId: string, point: number) => {
		// Joined on either instance: one members store.
		await (memberId.charCodeAt(memberId.length - 1) % 2 ? a : b).call("members.join", {
			memberId,
			name: memberId
		});
		await send(a, "deal.saved", { dealId: `earn-${memberId}`, memberId, merchantId: "20", point });
		await eventually(async () => expect(await balance(memberId)).toBe(point));
	};

	const instance = () =>
		createTestBroker(
			[
				MembersService,
				MerchantsService,
				withSettings(PointsService, { sweepIntervalMs: 200 }),
				withSettings(DealsService, { pendingTimeoutMs: 300, pendingSweepMs: 200 }),
				withSettings(OrdersService, { pendingTimeoutMs: 300, pendingSweepMs: 200 }),
				PaymentsService,
				withSettings(IdempotencyService, { leaseMs: 300 }),
				VoidedCounter
			],
			{ DATA_DIR: fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-instance-")) }
		);

	beforeAll(async () => {
		[a, b] = [instance(), instance()];
		await Promise.all([a.start(), b.start()]);
		mongo = await MongoClient.connect(process.env.MONGO_URI as string);
	});
	afterAll(async () => {
		await mongo.close();
		await Promise.all([a.stop(), b.stop()]);
	});
	afterEach(async () => {
		expect((await a.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([]);
	});

	it("lets exactly the affordable share of uses racing on both instances succeed", async () => {
		await earn("i001", 1000);
		const results = await Promise.all(
			Array.from({ length: 30 }, (_, i) => debit(i % 2 ? a : b, "i001", `race${i}`, 100))
		);
		expect(results.filter(r => r.applied)).toHaveLength(10);
		expect(await balance("i001")).toBe(0);
	});

	it("takes an Idempotency-Key once across both instances, and hands a lease that ran out to one retry, under the same request id", async () => {
		const hash = (text: string) => createHash("sha256").update(text).digest("base64url");
		const begin = (broker: ServiceBroker) =>
			broker.call<Begun, object>("idempotency.begin", {
				scope: hash("token"),
				key: "k-instances",
				fingerprint: hash("POST /api/deals {}")
			});
		const race = async () => {
			const results = await Promise.allSettled(
				Array.from({ length: 20 }, (_, i) => begin(i % 2 ? a : b))
			);
			for (const r of results)
				if (r.status === "rejected")
					expect(r.reason).toMatchObject({ code: 409, type: "REQUEST_IN_PROGRESS" });
			return results.flatMap(r => (r.status === "fulfilled" ? [r.value] : []));
		};
		const [first, ...others] = await race();
		expect(others).toEqual([]);
		expect(first).toMatchObject({ outcome: "run" });
		// Its gateway died: once the lease has run out, exactly one retry, on either instance, takes it over.
		const taken = await eventually(async () => {
			const won = await race();
			if (!won.length) throw new Error("still leased");
			return won;
		}, 5000);
		expect(taken).toEqual([first]);
	});

	it("never lets a debit land after its own void on the other instance, though a void leaves the balance as it was", async () => {
		await earn("i002", 1000);
		const deals = Array.from({ length: 40 }, (_, i) => `aba${i}`);
		await Promise.all(
			deals.map(dealId =>
				Promise.all([
					debit(a, "i002", dealId, 50),
					send(b, "deal.voided", { dealId, memberId: "i002", merchantId: "20" })
				])
			)
		);
		await eventually(async () =>
			expect(
				(await history("i002")).filter(e => e.cause.startsWith("deal-cancel:aba"))
			).toHaveLength(deals.length)
		);
		// Each debit was refused (voided first) or undone by its void: nothing is spent.
		expect(await balance("i002")).toBe(1000);
		for (const dealId of deals) {
			const entries = (await history("i002")).filter(e => e.cause.endsWith(`:${dealId}`));
			expect(entries.reduce((sum, e) => sum + e.amount, 0)).toBe(0);
		}
	});

	it("finishes a posting a store error interrupted with the account's next posting, on either instance", async () => {
		await earn("i003", 500);
		// The ledger copy fails once (a failover, a hiccup): the account holds the posting as pending.
		await mongo.db("admin").command({
			configureFailPoint: "failCommand",
			mode: { times: 1 },
			data: { failCommands: ["insert"], errorCode: 8 }
		});
		await expect(debit(a, "i003", "hiccup", 100)).rejects.toThrow();
		await send(b, "deal.saved", {
			dealId: "after-hiccup",
			memberId: "i003",
			merchantId: "20",
			point: 200
		});
		await eventually(async () => expect(await balance("i003")).toBe(600));
		expect((await history("i003")).map(e => e.cause).sort()).toEqual([
			"deal:after-hiccup",
			"deal:earn-i003",
			"deal:hiccup"
		]);
	});

	it("finishes, within seconds and without a restart, a posting an instance died in the middle of", async () => {
		await earn("i004", 300);
		const entry = {
			_id: "deal:died",
			memberId: "i004",
			kind: "use",
			amount: -100,
			balanceAfter: 200,
			sourceType: "deal",
			sourceId: "died",
			at: "2026-01-01T00:00:00.000Z",
			seq: "0"
		};
		// What `post` leaves when its process is killed between the account write and the ledger copy
		// (the use took 100 of this month's earning lot).
		const lots = { "202605": 200 };
		await mongo
			.db()
			.collection<{ _id: string }>("accounts")
			.updateOne(
				{ _id: "i004" },
				{
					$set: { pending: [entry], pendingSince: entry.at, updatedAt: entry.at, lots },
					$inc: { balance: -100, version: 1 }
				}
			);
		await eventually(async () =>
			expect((await history("i004")).map(e => e.cause)).toContain("deal:died")
		);
		expect(await balance("i004")).toBe(200);
		expect(
			await mongo
				.db()
				.collection("accounts")
				.countDocuments({
					$or: [{ "pending.0": { $exists: true } }, { pendingSince: { $exists: true } }]
				})
		).toBe(0);
	});

	it("settles, within seconds, the uses a dead instance left pending — once, though both instances sweep", async () => {
		await earn("i005", 1000);
		const dealDate = new Date(Date.now() - 60_000).toISOString();
		const abandoned = Array.from({ length: 10 }, (_, i) => `dead${i}`);
		// Half of them had their debit taken before the instance died.
		for (const [i, id] of abandoned.entries()) if (i % 2) await debit(b, "i005", id, 30);
		await mongo
			.db()
			.collection<{ _id: string }>("deals")
			.insertMany(
				abandoned.map(_id => ({
					_id,
					memberId: "i005",
					merchantId: "20",
					dealAmount: 1000,
					type: "use",
					point: 30,
					status: "pending",
					dealDate
				}))
			);
		await eventually(async () => {
			for (const id of abandoned)
				expect(await a.call<DealView, object>("deals.get", { id })).toMatchObject({
					status: "fail",
					reason: "INTERRUPTED"
				});
		});
		await eventually(async () => expect(await balance("i005")).toBe(1000));
		await eventually(() =>
			expect(abandoned.map(id => voidedCounts.get(id))).toEqual(abandoned.map(() => 1))
		);
		// Both instances kept sweeping meanwhile: still once each.
		await new Promise(resolve => setTimeout(resolve, 600));
		expect(abandoned.map(id => voidedCounts.get(id))).toEqual(abandoned.map(() => 1));
	});

	it("settles, within seconds, the orders a dead instance left waiting for their payment — once, though both instances sweep", async () => {
		const orderedAt = new Date(Date.now() - 60_000).toISOString();
		const abandoned = Array.from({ length: 6 }, (_, i) => `gone${i}`);
		await mongo
			.db()
			.collection<{ _id: string }>("orders")
			.insertMany(
				abandoned.map(_id => ({
					_id,
					memberId: "i006",
					productId: "toast",
					qty: 1,
					unitPrice: 5000,
					totalPrice: 5000,
					status: "pending",
					payment: { status: "requested" },
					delivery: { status: "not_started" },
					pointRate: 0.1,
					points: 0,
					orderedAt
				}))
			);
		await eventually(async () => {
			for (const id of abandoned)
				expect(await b.call<OrderView, object>("orders.get", { id })).toMatchObject({
					status: "payment_failed",
					reason: "INTERRUPTED"
				});
		});
		await eventually(() =>
			expect(abandoned.map(id => voidedCounts.get(id))).toEqual(abandoned.map(() => 1))
		);
		await new Promise(resolve => setTimeout(resolve, 600));
		expect(abandoned.map(id => voidedCounts.get(id))).toEqual(abandoned.map(() => 1));
	});

	it("sends, within seconds and without a restart, the events a dead instance wrote but never sent", async () => {
		const joinedAt = new Date(Date.now() - 60_000).toISOString();
		// What `join` leaves when its process is killed between the write and the send.
		const event = {
			id: ulid(Date.now() - 60_000),
			channel: "member.joined",
			payload: { memberId: "i007", name: "left", joinedAt }
		};
		const members = mongo.db().collection<Record<string, unknown> & { _id: string }>("members");
		await members.insertOne({
			_id: "i007",
			name: "left",
			phone: null,
			email: null,
			status: "active",
			joinedAt,
			outbox: [event]
		});
		await eventually(
			async () =>
				expect(await b.call("points.get", { memberId: "i007" })).toMatchObject({
					balance: 0,
					status: "active"
				}),
			20_000
		);
		await eventually(async () =>
			expect((await members.findOne({ _id: "i007" }))?.outbox).toEqual([])
		);
	});
});
