import { parse } from "csv-parse/sync";
import type { ServiceBroker } from "moleculer";
import PointsService, { type AccountView } from "../../services/points.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";

type Send = (channel: string, payload: object) => Promise<void>;

describe("points service", () => {
	let broker: ServiceBroker;
	let send: Send;
	const balance = async (memberId: string) =>
		(await broker.call<AccountView, object>("points.get", { memberId })).balance;
	const history = (memberId: string) =>
		broker.call<
			{
				rows: { cause: string; amount: number; kind: string; shortfall?: number }[];
				total: number;
			},
			object
		>("points.history", {
			memberId,
			pageSize: 100
		});
	const debit = (memberId: string, sourceId: string, amount: number) =>
		broker.call<{ applied: boolean; reason?: string; balance: number }, object>("points.debit", {
			memberId,
			sourceType: "deal",
			sourceId,
			amount
		});

	beforeAll(async () => {
		broker = createTestBroker([PointsService]);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
	});
	afterAll(() => broker.stop());

	afterEach(async () => {
		// A consumer's writes are readable before its handler is done (group commit): audit once it is.
		await drained(broker);
		const audit = await broker.call<{ mismatches: unknown[] }>("points.audit");
		expect(audit.mismatches).toEqual([]);
	});

	it("opens an account with balance 0 when a member joins", async () => {
		await send("member.joined", { memberId: "m1", joinedAt: "2026-05-14T10:00:00.000Z" });
		await eventually(async () => expect(await balance("m1")).toBe(0));
	});

	it("applies the same accrual event once, even when delivered twice or concurrently", async () => {
		const event = { dealId: "d1", memberId: "m2", merchantId: "20", point: 1000 };
		await Promise.all([send("deal.saved", event), send("deal.saved", event)]);
		await send("deal.saved", event);
		await eventually(async () => expect((await history("m2")).total).toBe(1));
		await drained(broker);
		expect(await balance("m2")).toBe(1000);
		expect((await history("m2")).rows[0]).toMatchObject({
			cause: "deal:d1",
			amount: 1000,
			kind: "earn"
		});
	});

	it("debits only what the balance covers, and a repeated debit is not taken twice", async () => {
		await send("deal.saved", { dealId: "d2", memberId: "m3", merchantId: "20", point: 500 });
		await eventually(async () => expect(await balance("m3")).toBe(500));
		expect(await debit("m3", "u1", 600)).toMatchObject({
			applied: false,
			reason: "INSUFFICIENT_POINTS",
			balance: 500
		});
		expect(await debit("m3", "u2", 200)).toMatchObject({ applied: true, balance: 300 });
		expect(await debit("m3", "u2", 200)).toMatchObject({ applied: true });
		expect(await balance("m3")).toBe(300);
	});

	it("ends a posting with its entry in the ledger, nothing pending and its event sent; an event that cannot be sent yet waits in the outbox", async () => {
		type Stored = { pending?: unknown[]; pendingSince?: string; outbox?: unknown[] };
		const account = (memberId: string) =>
			(
				broker.getLocalService("points") as unknown as {
					store: { findById(id: string): Promise<Stored> };
				}
			).store.findById(memberId);
		await send("deal.saved", { dealId: "o1", memberId: "m9", merchantId: "20", point: 300 });
		await eventually(async () => expect(await balance("m9")).toBe(300));
		expect(await debit("m9", "o2", 100)).toMatchObject({ applied: true, balance: 200 });
		expect(await account("m9")).toMatchObject({ outbox: [] });
		expect(await account("m9")).not.toHaveProperty("pending");
		expect((await history("m9")).rows.map(r => r.cause)).toEqual(["deal:o2", "deal:o1"]);

		// The channel is down for a moment: the posting still ends, and its event is sent once it is back.
		const channels = broker as unknown as { sendToChannel: Send };
		const sendToChannel = channels.sendToChannel;
		channels.sendToChannel = () => Promise.reject(new Error("channel down"));
		try {
			expect(await debit("m9", "o3", 50)).toMatchObject({ applied: true, balance: 150 });
			expect(await account("m9")).toMatchObject({
				outbox: [expect.objectContaining({ channel: "points.posted" })]
			});
			expect(await account("m9")).not.toHaveProperty("pendingSince");
		} finally {
			channels.sendToChannel = sendToChannel;
		}
		await eventually(async () => expect(await account("m9")).toMatchObject({ outbox: [] }));
	});

	it("sends a posting's events after releasing the account's lock: a send that hangs holds up no other posting of the account", async () => {
		type SendWith = (channel: string, payload: object, opts?: object) => Promise<void>;
		const channels = broker as unknown as { sendToChannel: SendWith };
		const sendToChannel = channels.sendToChannel;
		await send("deal.saved", { dealId: "h1", memberId: "m10", merchantId: "20", point: 300 });
		await eventually(async () => expect(await balance("m10")).toBe(300));
		let sendHangs = () => undefined as void;
		const hanging = new Promise<void>(resolve => (sendHangs = resolve));
		let channelFails = (_err: Error) => undefined as void;
		const stuck = new Promise<void>((_resolve, reject) => (channelFails = reject));
		let sends = 0;
		// The first posting's send does not answer until the test says so (NATS down, a publish timeout).
		channels.sendToChannel = (channel, payload, opts) => {
			if (++sends > 1) return sendToChannel.call(broker, channel, payload, opts);
			sendHangs();
			return stuck;
		};
		try {
			const first = debit("m10", "h2", 100);
			await hanging;
			expect(await debit("m10", "h3", 50)).toMatchObject({ applied: true, balance: 150 });
			channelFails(new Error("channel down"));
			expect(await first).toMatchObject({ applied: true, balance: 200 });
		} finally {
			channels.sendToChannel = sendToChannel;
		}
		expect((await history("m10")).rows.map(r => r.cause)).toEqual([
			"deal:h3",
			"deal:h2",
			"deal:h1"
		]);
		// The events the hung send left in the outbox go with the retry.
		const account = () =>
			(
				broker.getLocalService("points") as unknown as {
					store: { findById(id: string): Promise<{ outbox?: unknown[]; pending?: unknown[] }> };
				}
			).store.findById("m10");
		await eventually(async () => expect(await account()).toMatchObject({ outbox: [] }));
		expect(await account()).not.toHaveProperty("pending");
	});

	it("lets exactly the affordable share of racing debits succeed", async () => {
		await send("deal.saved", { dealId: "d3", memberId: "m4", merchantId: "20", point: 1000 });
		await eventually(async () => expect(await balance("m4")).toBe(1000));
		const results = await Promise.all(
			Array.from({ length: 30 }, (_, i) => debit("m4", `race${i}`, 100))
		);
		expect(results.filter(r => r.applied)).toHaveLength(10);
		expect(await balance("m4")).toBe(0);
	});

	it("restores a cancelled use once and revokes a cancelled earning only as far as the balance allows", async () => {
		await send("deal.saved", { dealId: "d4", memberId: "m5", merchantId: "20", point: 1000 });
		await eventually(async () => expect(await balance("m5")).toBe(1000));
		await debit("m5", "u4", 700);
		await send("deal.cancelled", { dealId: "u4", memberId: "m5", merchantId: "20" });
		await send("deal.cancelled", { dealId: "u4", memberId: "m5", merchantId: "20" });
		await eventually(async () => expect(await balance("m5")).toBe(1000));
		await debit("m5", "u5", 800);
		// 1000 earned by d4, 800 of it spent: revoking d4 can take back only the 200 left.
		await send("deal.cancelled", { dealId: "d4", memberId: "m5", merchantId: "20" });
		await eventually(async () => expect(await balance("m5")).toBe(0));
		const revoke = (await history("m5")).rows.find(r => r.cause === "deal-cancel:d4");
		expect(revoke).toMatchObject({ kind: "revoke", amount: -200, shortfall: 800 });
	});

	it("refuses an accrual that arrives after its cancellation", async () => {
		await send("deal.cancelled", { dealId: "d6", memberId: "m6", merchantId: "20" });
		await eventually(async () => expect((await history("m6")).total).toBe(1));
		await send("deal.saved", { dealId: "d6", memberId: "m6", merchantId: "20", point: 300 });
		await drained(broker);
		expect(await balance("m6")).toBe(0);
		expect((await history("m6")).rows.map(r => r.cause)).toEqual(["deal-cancel:d6"]);
	});

	it("expires the remaining points on withdrawal and expires late accruals on arrival", async () => {
		await send("deal.saved", { dealId: "d7", memberId: "m7", merchantId: "20", point: 400 });
		await eventually(async () => expect(await balance("m7")).toBe(400));
		await send("member.withdrawn", { memberId: "m7" });
		await send("member.withdrawn", { memberId: "m7" });
		await eventually(async () =>
			expect(
				(await broker.call<AccountView, object>("points.get", { memberId: "m7" })).status
			).toBe("closed")
		);
		expect(await balance("m7")).toBe(0);
		await send("deal.saved", { dealId: "d8", memberId: "m7", merchantId: "20", point: 50 });
		await eventually(async () => expect((await history("m7")).total).toBe(4));
		const causes = (await history("m7")).rows.map(r => `${r.cause} ${r.amount}`);
		expect(causes).toEqual(
			expect.arrayContaining(["expiry:m7 -400", "deal:d8 50", "expiry:m7:deal:d8 -50"])
		);
		expect(await balance("m7")).toBe(0);
		expect(await debit("m7", "u7", 1)).toMatchObject({ applied: false, reason: "ACCOUNT_CLOSED" });
	});

	it("pages the ledger newest first", async () => {
		for (let i = 0; i < 5; i++)
			await send("deal.saved", { dealId: `p${i}`, memberId: "m8", merchantId: "20", point: 10 });
		await eventually(async () => expect(await balance("m8")).toBe(50));
		const page = await broker.call<
			{ rows: { cause: string }[]; total: number; page: number; pageSize: number },
			object
		>("points.history", {
			memberId: "m8",
			page: "2",
			pageSize: "2"
		});
		expect(page).toMatchObject({ total: 5, page: 2, pageSize: 2 });
		const all = (await history("m8")).rows.map(r => r.cause);
		expect(page.rows.map(r => r.cause)).toEqual(all.slice(2, 4));
	});

	it("refuses an id that smuggles a query operator", async () => {
		await expect(broker.call("points.get", { memberId: { $gt: "" } })).rejects.toMatchObject({
			code: 422,
			type: "VALIDATION_ERROR"
		});
		await expect(
			broker.call("points.history", { memberId: "m1", $where: "1" })
		).rejects.toMatchObject({ code: 422 });
	});

	it("exports a member's whole ledger as CSV, oldest first, the same entries as the history", async () => {
		for (let i = 0; i < 3; i++)
			await send("deal.saved", {
				dealId: `csv-${i}`,
				memberId: "csv1",
				merchantId: "20",
				dealAmount: 1000,
				type: "save",
				point: 10 + i,
				dealDate: new Date().toISOString()
			});
		await drained(broker);
		await debit("csv1", "csv-use", 15);
		const csv = await broker.call<string, object>("points.historyCsv", { memberId: "csv1" });
		const rows = parse(csv, { columns: true }) as Record<string, string>[];
		const entries = (await history("csv1")).rows.reverse();
		expect(rows.map(r => [r.cause, r.kind, Number(r.amount)])).toEqual(
			entries.map(e => [e.cause, e.kind, e.amount])
		);
		expect(rows.at(-1)).toMatchObject({ cause: "deal:csv-use", balanceAfter: "18" });
		await expect(broker.call("points.historyCsv", { memberId: "a b" })).rejects.toMatchObject({
			code: 422
		});
	});
});
