/**
 * Partial returns of deals (`deals.cancel` with an `amount`), on each store: the points of each
 * return, the deal's status and list of returns, the ledger, and the read models that follow —
 * billing's view and settlements, the dashboard.
 */
import type { ServiceBroker } from "moleculer";
import type { DealReturnedEvent } from "../../contracts/channels";
import BillingService, { type SettlementView } from "../../services/billing.service";
import DashboardService from "../../services/dashboard.service";
import DealsService, { type DealView } from "../../services/deals.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

type Send = (channel: string, payload: object) => Promise<void>;

interface Entry {
	cause: string;
	kind: string;
	amount: number;
	shortfall?: number;
}

describe("partial returns", () => {
	// The test's clock: the deals are made in May 2026; March 2021 is long closed.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let send: Send;
	const deal = (params: object) =>
		broker.call<DealView, object>("deals.create", { merchantId: "20", ...params });
	const cancel = (id: string, amount?: unknown, meta: object = {}) =>
		broker.call<DealView, object>(
			"deals.cancel",
			{ id, ...(amount === undefined ? {} : { amount }) },
			{ meta }
		);
	const getDeal = (id: string) => broker.call<DealView, object>("deals.get", { id });
	const balance = async (memberId: string) =>
		(await broker.call<{ balance: number }, object>("points.get", { memberId })).balance;
	const history = async (memberId: string) =>
		(await broker.call<{ rows: Entry[] }, object>("points.history", { memberId, pageSize: 100 }))
			.rows;
	const returnsOf = async (memberId: string, dealId: string) =>
		(await history(memberId)).filter(e => e.cause.startsWith(`deal-return:${dealId}:`));
	const join = (memberId: string) => broker.call("members.join", { memberId, name: memberId });
	/** A member holding `points`, from a save of 100 × points (the default rate earns 1 %). */
	const memberWith = async (memberId: string, points: number) => {
		await join(memberId);
		await deal({ memberId, dealAmount: points * 100, type: "save" });
		await eventually(async () => expect(await balance(memberId)).toBe(points));
	};

	beforeAll(async () => {
		broker = createTestBroker([
			MembersService,
			MerchantsService,
			PointsService,
			DealsService,
			BillingService,
			DashboardService
		]);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
	});
	afterAll(() => broker.stop());
	afterEach(async () => {
		await drained(broker);
		expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([]);
	});

	it("revokes a save's points in proportion, rounded down, and the return that completes the deal revokes exactly the rest", async () => {
		await join("r001");
		const saved = await deal({ memberId: "r001", dealAmount: 10001, type: "save" });
		expect(saved.point).toBe(100);
		await eventually(async () => expect(await balance("r001")).toBe(100));

		const first = await cancel(saved.id, 3333);
		expect(first).toMatchObject({
			status: "partially_cancelled",
			returnedAmount: 3333,
			returnedPoints: 33
		});
		expect(first.cancelledAt).toBeUndefined();
		expect(await cancel(saved.id, "3333")).toMatchObject({
			status: "partially_cancelled",
			returnedAmount: 6666,
			returnedPoints: 66
		});
		// Without an amount: the whole remainder, which completes the deal.
		const last = await cancel(saved.id);
		expect(last).toMatchObject({ status: "cancelled", returnedAmount: 10001, returnedPoints: 100 });
		expect(last.cancelledAt).toEqual(expect.any(String));
		expect(last.returns?.map(({ n, amount, points }) => ({ n, amount, points }))).toEqual([
			{ n: 1, amount: 3333, points: 33 },
			{ n: 2, amount: 3333, points: 33 },
			{ n: 3, amount: 3335, points: 34 }
		]);
		expect(await getDeal(saved.id)).toEqual(last);

		await drained(broker);
		expect(await balance("r001")).toBe(0);
		expect(
			(await returnsOf("r001", saved.id)).map(e => [e.cause, e.kind, e.amount]).sort()
		).toEqual([
			[`deal-return:${saved.id}:1`, "revoke", -33],
			[`deal-return:${saved.id}:2`, "revoke", -33],
			[`deal-return:${saved.id}:3`, "revoke", -34]
		]);
		await expect(cancel(saved.id, 1)).rejects.toMatchObject({
			code: 409,
			type: "DEAL_ALREADY_CANCELLED"
		});
	});

	it("gives back a use's points in proportion, until the use is returned whole", async () => {
		await memberWith("r002", 1000);
		const used = await deal({ memberId: "r002", dealAmount: 3000, type: "use", point: 1000 });
		expect(await balance("r002")).toBe(0);
		expect(await cancel(used.id, 1000)).toMatchObject({
			status: "partially_cancelled",
			returnedAmount: 1000,
			returnedPoints: 333
		});
		await eventually(async () => expect(await balance("r002")).toBe(333));
		expect(await cancel(used.id, 1999)).toMatchObject({
			status: "partially_cancelled",
			returnedAmount: 2999,
			returnedPoints: 999
		});
		expect(await cancel(used.id, 1)).toMatchObject({
			status: "cancelled",
			returnedAmount: 3000,
			returnedPoints: 1000
		});
		await drained(broker);
		expect(await balance("r002")).toBe(1000);
		expect((await returnsOf("r002", used.id)).map(e => [e.kind, e.amount]).sort()).toEqual([
			["restore", 1],
			["restore", 333],
			["restore", 666]
		]);
	});

	it("cancels a deal never returned from, without an amount, as before: one cancellation of all its points", async () => {
		await memberWith("r003", 500);
		const used = await deal({ memberId: "r003", dealAmount: 1000, type: "use", point: 200 });
		expect(await cancel(used.id)).toMatchObject({
			status: "cancelled",
			returnedAmount: 1000,
			returnedPoints: 200,
			returns: [expect.objectContaining({ n: 1, amount: 1000, points: 200 })]
		});
		await drained(broker);
		expect(await balance("r003")).toBe(500);
		expect((await history("r003")).find(e => e.cause === `deal-cancel:${used.id}`)).toMatchObject({
			kind: "restore",
			amount: 200
		});
		expect(await returnsOf("r003", used.id)).toEqual([]);
	});

	it("refuses a return over the remainder, and bad amounts, with a code, changing nothing", async () => {
		await join("r004");
		const saved = await deal({ memberId: "r004", dealAmount: 5000, type: "save" });
		await cancel(saved.id, 2000);
		await drained(broker);
		const before = {
			deal: await getDeal(saved.id),
			balance: await balance("r004"),
			entries: (await history("r004")).length
		};

		await expect(cancel(saved.id, 3001)).rejects.toMatchObject({
			code: 409,
			type: "RETURN_EXCEEDS_REMAINDER",
			data: { amount: 3001, remainder: 3000 }
		});
		for (const amount of [0, -5, 1.5, "ten", "", 10_000_000_001, { $gt: 0 }])
			await expect(cancel(saved.id, amount)).rejects.toMatchObject({
				code: 422,
				type: "VALIDATION_ERROR",
				data: [expect.objectContaining({ field: "amount" })]
			});
		await expect(
			broker.call("deals.cancel", { id: saved.id, amount: 10, extra: 1 })
		).rejects.toMatchObject({
			code: 422,
			type: "VALIDATION_ERROR"
		});

		await drained(broker);
		expect({
			deal: await getDeal(saved.id),
			balance: await balance("r004"),
			entries: (await history("r004")).length
		}).toEqual(before);
	});

	it("lets a merchant return only its own deals", async () => {
		await join("r005");
		const saved = await deal({ memberId: "r005", dealAmount: 1000, type: "save" });
		await expect(
			cancel(saved.id, 100, { user: { kind: "merchant", merchantId: "21" } })
		).rejects.toMatchObject({
			code: 403,
			type: "FORBIDDEN"
		});
		expect((await getDeal(saved.id)).status).toBe("success");
		expect(
			await cancel(saved.id, 100, { user: { kind: "merchant", merchantId: "20" } })
		).toMatchObject({
			status: "partially_cancelled",
			returnedAmount: 100
		});
	});

	it("lets racing returns together return at most the deal, each once", async () => {
		await join("r006");
		const saved = await deal({ memberId: "r006", dealAmount: 1000, type: "save" });
		await eventually(async () => expect(await balance("r006")).toBe(10));
		const results = await Promise.allSettled(
			Array.from({ length: 15 }, () => cancel(saved.id, 100))
		);
		const refused = results
			.filter(r => r.status === "rejected")
			.map(r => (r as PromiseRejectedResult).reason as { type: string });
		expect(results.filter(r => r.status === "fulfilled")).toHaveLength(10);
		expect(refused.map(e => e.type)).toEqual(
			Array(5).fill(expect.stringMatching(/^(RETURN_EXCEEDS_REMAINDER|DEAL_ALREADY_CANCELLED)$/))
		);
		const final = await getDeal(saved.id);
		expect(final).toMatchObject({ status: "cancelled", returnedAmount: 1000, returnedPoints: 10 });
		expect(final.returns?.map(r => r.n)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
		await drained(broker);
		expect(await balance("r006")).toBe(0);
		expect(await returnsOf("r006", saved.id)).toHaveLength(10);
	});

	it("applies a redelivered return once, and a return that overtakes its save earns the save first", async () => {
		await join("r007");
		const saved = await deal({ memberId: "r007", dealAmount: 2000, type: "save" });
		const returned = await cancel(saved.id, 500);
		await drained(broker);
		const event: DealReturnedEvent = {
			dealId: saved.id,
			memberId: "r007",
			merchantId: "20",
			dealAmount: 2000,
			type: "save",
			point: 20,
			dealDate: saved.dealDate,
			return: (returned.returns ?? [])[0],
			returnedAmount: 500,
			returnedPoints: 5,
			status: "partially_cancelled"
		};
		await send("deal.returned", event);
		await send("deal.returned", event);
		await drained(broker);
		expect(await balance("r007")).toBe(15);
		expect(await returnsOf("r007", saved.id)).toHaveLength(1);

		// A save whose `deal.saved` comes after its return (as a redelivery may).
		await join("r008");
		const early = {
			...event,
			dealId: "early-save",
			memberId: "r008",
			return: { ...event.return, n: 1 }
		};
		await send("deal.returned", early);
		await eventually(async () => expect(await balance("r008")).toBe(15));
		await send("deal.saved", { ...early, status: undefined, return: undefined });
		await drained(broker);
		expect(await balance("r008")).toBe(15);
		expect((await history("r008")).map(e => [e.cause, e.amount]).sort()).toEqual([
			["deal-return:early-save:1", -5],
			["deal:early-save", 20]
		]);
	});

	it("revokes no more than the balance: points already spent are the shortfall", async () => {
		await join("r009");
		const saved = await deal({ memberId: "r009", dealAmount: 10000, type: "save" });
		await eventually(async () => expect(await balance("r009")).toBe(100));
		await deal({ memberId: "r009", dealAmount: 9000, type: "use", point: 90 });
		await cancel(saved.id, 5000);
		await drained(broker);
		expect(await balance("r009")).toBe(0);
		expect((await returnsOf("r009", saved.id))[0]).toMatchObject({
			kind: "revoke",
			amount: -10,
			shortfall: 40
		});
	});

	it("expires at once what a return gives back to a member who has withdrawn, and revokes nothing the member no longer has", async () => {
		await memberWith("r012", 100);
		const used = await deal({ memberId: "r012", dealAmount: 1000, type: "use", point: 60 });
		const saved = await deal({ memberId: "r012", dealAmount: 2000, type: "save" });
		await drained(broker);
		await broker.call("members.withdraw", { memberId: "r012" });
		await drained(broker);
		expect(await balance("r012")).toBe(0);
		await cancel(used.id, 500);
		await cancel(saved.id, 1000);
		await drained(broker);
		expect(await balance("r012")).toBe(0);
		expect((await returnsOf("r012", used.id)).map(e => [e.kind, e.amount])).toEqual([
			["restore", 30]
		]);
		expect(
			(await history("r012")).find(e => e.cause === `expiry:r012:deal-return:${used.id}:1`)
		).toMatchObject({
			kind: "expire",
			amount: -30
		});
		expect((await returnsOf("r012", saved.id))[0]).toMatchObject({
			kind: "revoke",
			amount: 0,
			shortfall: 10
		});
	});

	it("bills a use less its returns: the view, the month's settlement, and a return after the month closed as an adjustment", async () => {
		await memberWith("r010", 5000);
		const used = await deal({
			memberId: "r010",
			merchantId: "30",
			dealAmount: 3000,
			type: "use",
			point: 1000
		});
		await cancel(used.id, 1000);
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: used.id })).toMatchObject({
				dealId: used.id,
				point: 667,
				returnedPoints: 333
			})
		);
		const month = used.dealDate.slice(0, 7).replace("-", "");
		const settlement = await broker.call<SettlementView, object>("billing.get", {
			merchantId: "30",
			billingMonth: month
		});
		expect(settlement).toMatchObject({
			status: "provisional",
			usedPoints: 667,
			dealCount: 1,
			lines: [{ kind: "use", dealId: used.id, points: 667 }]
		});
		await cancel(used.id);
		await drained(broker);
		await expect(broker.call("billing.view", { dealId: used.id })).rejects.toMatchObject({
			code: 404,
			type: "BILLING_VIEW_NOT_FOUND"
		});
		expect(
			await broker.call("billing.get", { merchantId: "30", billingMonth: month })
		).toMatchObject({
			usedPoints: 0,
			dealCount: 0,
			lines: []
		});

		// A use of a month long closed, returned in two parts afterwards, in the wrong order and twice.
		const old = {
			dealId: "old-use",
			memberId: "r010",
			merchantId: "31",
			dealAmount: 3000,
			type: "use",
			point: 900,
			dealDate: "2021-03-10T10:00:00.000Z"
		};
		await send("deal.used", old);
		await drained(broker);
		await broker.call("billing.closeMonth", { billingMonth: "202103" });
		expect(
			await broker.call("billing.get", { merchantId: "31", billingMonth: "202103" })
		).toMatchObject({
			status: "final",
			usedPoints: 900,
			billingAmount: 882
		});
		const at = new Date().toISOString();
		const second = {
			...old,
			return: { n: 2, amount: 1000, points: 300, at },
			returnedAmount: 2000,
			returnedPoints: 600,
			status: "partially_cancelled"
		};
		await send("deal.returned", second);
		await send("deal.returned", {
			...old,
			return: { n: 1, amount: 1000, points: 300, at },
			returnedAmount: 1000,
			returnedPoints: 300,
			status: "partially_cancelled"
		});
		await send("deal.returned", second);
		await drained(broker);
		// Carried into the first open month.
		const carried = await broker.call<SettlementView, object>("billing.get", {
			merchantId: "31",
			billingMonth: "202104"
		});
		expect(carried).toMatchObject({
			status: "provisional",
			usedPoints: 0,
			adjustmentPoints: -600,
			lines: [
				{
					kind: "adjustment",
					dealId: "old-use",
					points: -600,
					month: "202103",
					reason: "RETURNED_AFTER_SETTLEMENT"
				}
			]
		});
		expect(
			await broker.call("billing.get", { merchantId: "31", billingMonth: "202103" })
		).toMatchObject({
			status: "final",
			usedPoints: 900
		});
	});

	it("shows returns on the dashboard: the member's transactions, totals and the month's counters", async () => {
		await memberWith("r011", 1000);
		const used = await deal({
			memberId: "r011",
			merchantId: "40",
			dealAmount: 4000,
			type: "use",
			point: 400
		});
		await cancel(used.id, 1000);
		await drained(broker);
		const page = await broker.call<{ rows: Array<Record<string, unknown>> }, object>(
			"dashboard.transactions",
			{ memberId: "r011" }
		);
		expect(page.rows.find(t => t.id === used.id)).toMatchObject({
			status: "partially_cancelled",
			amount: 4000,
			point: 400,
			returnedAmount: 1000,
			returnedPoints: 100
		});
		expect(
			(await broker.call<{ member: object }, object>("dashboard.member", { memberId: "r011" }))
				.member
		).toMatchObject({
			balance: 700,
			used: 400,
			cancelled: 100
		});
		const overview = await broker.call<{ topMerchants: Array<{ merchantId: string }> }, object>(
			"dashboard.overview",
			{}
		);
		expect(overview.topMerchants.find(m => m.merchantId === "40")).toMatchObject({
			deals: 1,
			usedPoints: 300
		});

		await cancel(used.id);
		await drained(broker);
		const after = await broker.call<{ rows: Array<Record<string, unknown>> }, object>(
			"dashboard.transactions",
			{ memberId: "r011" }
		);
		expect(after.rows.find(t => t.id === used.id)).toMatchObject({
			status: "cancelled",
			returnedAmount: 4000,
			returnedPoints: 400
		});
		expect(
			(await broker.call<{ member: object }, object>("dashboard.member", { memberId: "r011" }))
				.member
		).toMatchObject({
			balance: 1000,
			cancelled: 400
		});
		const counters = await broker.call<{ topMerchants: Array<{ merchantId: string }> }, object>(
			"dashboard.overview",
			{}
		);
		expect(counters.topMerchants.find(m => m.merchantId === "40")).toMatchObject({
			deals: 1,
			usedPoints: 0
		});
	});
});
