/**
 * Tiers (TIERS): the rules without a broker, then, on each store and a clock the test moves, a
 * member rising through the tiers as saves and an order accumulate, a save's bonus at each tier with
 * its returns and cancellation, the merchant's statement billing the base and showing the bonus, and
 * the member falling back as earnings leave the 12-month window.
 */
import type { ServiceBroker } from "moleculer";
import { consume, type PostedEntry } from "../../contracts/channels";
import {
	bonusLeft,
	bonusOf,
	earnedAfter,
	tierFor,
	tierStanding,
	windowStart,
	type Tier
} from "../../lib/tiers";
import BillingService, { type SettlementView } from "../../services/billing.service";
import DashboardService from "../../services/dashboard.service";
import DealsService, { type DealView } from "../../services/deals.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import PointsService, { type AccountView, type TierReview } from "../../services/points.service";
import { createTestBroker, drained, withSettings } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

const TIERS = "basic:0:1,silver:500:1.25,gold:2000:1.5";
const tiers: Tier[] = [
	{ name: "basic", threshold: 0, multiplierBp: 10_000 },
	{ name: "silver", threshold: 500, multiplierBp: 12_500 },
	{ name: "gold", threshold: 2000, multiplierBp: 15_000 }
];

describe("the tier rules (lib/tiers.ts)", () => {
	it("reckon the window as this month and the 11 before it, and the tier from what was earned in it", () => {
		expect(windowStart("2027-01-15T10:00:00.000Z")).toBe("202602");
		expect(tierFor(tiers, 0).name).toBe("basic");
		expect(tierFor(tiers, 499).name).toBe("basic");
		expect(tierFor(tiers, 500).name).toBe("silver");
		expect(tierFor(tiers, 1_000_000).name).toBe("gold");
		// Earnings count in the month posted, a revocation (shortfall included) in its earning's month; old months drop.
		expect(
			earnedAfter(
				{ "202501": 900, "202603": 300 },
				[
					{ _id: "deal:d1", kind: "earn", amount: 100 },
					{ _id: "deal-bonus:d1", kind: "bonus", amount: 50 },
					{ _id: "deal-cancel:d0", kind: "revoke", amount: -20, shortfall: 10, earnedIn: "202603" },
					{ _id: "adjustment:a1", kind: "adjust", amount: 1000 }
				],
				"2026-05-02T00:00:00.000Z"
			)
		).toEqual({ "202603": 270, "202605": 100 });
	});

	it("make a save's bonus the multiplier's extra, rounded down, and share it among returns on their total", () => {
		expect(bonusOf(333, tiers[1])).toBe(83);
		expect(bonusOf(200, tiers[2])).toBe(100);
		expect(bonusOf(1, tiers[1])).toBe(0);
		// A bonus of 3 on 10 points returned as 3 + 3 + 4: shares 0, 1 and the 2 left.
		const left = [0, 3, 6, 10].map(returned => bonusLeft(3, 10, returned));
		expect(left).toEqual([3, 3, 2, 0]);
	});

	it("record a change of tier as a zero entry, and when earnings leaving the window make it fall", () => {
		const account = {
			_id: "m1",
			balance: 0,
			status: "active" as const,
			updatedAt: "2026-04-01T00:00:00.000Z",
			openedAt: "2026-01-01T00:00:00.000Z",
			earned: { "202601": 1500 }
		};
		const standing = tierStanding(
			tiers,
			account,
			[{ _id: "order:o1", kind: "earn", amount: 600 }],
			"2026-04-10T00:00:00.000Z",
			7,
			false
		);
		expect(standing).toEqual({
			drafts: [
				{
					_id: "tier:m1:7",
					kind: "tier",
					amount: 0,
					sourceType: "member",
					sourceId: "m1",
					reason: "basic → gold"
				}
			],
			earned: { "202601": 1500, "202604": 600 },
			tier: { name: "gold", since: "2026-04-10T00:00:00.000Z" },
			// January leaves the window when January 2027 begins: 600 is below gold.
			tierReview: "202701"
		});
		// Closing the account keeps its tier as it was.
		expect(tierStanding(tiers, account, [], "2026-04-10T00:00:00.000Z", 7, true)).toMatchObject({
			drafts: [],
			tier: { name: "basic", since: account.openedAt }
		});
	});
});

interface Entry {
	cause: string;
	kind: string;
	amount: number;
	shortfall?: number;
	earnedIn?: string;
	reason?: string;
	at: string;
}

type Send = (channel: string, payload: object) => Promise<void>;

describe("tiers, on a clock the test moves", () => {
	clockFrom("2026-01-10T10:00:00.000Z");
	let broker: ServiceBroker;
	let send: Send;
	/** Tier changes as `points.posted` carried them. */
	const postedTiers: PostedEntry[] = [];
	const Watcher = {
		name: "tier-watcher",
		channels: consume("tier-watcher", {
			async "points.posted"(posting) {
				postedTiers.push(...posting.entries.filter(e => e.kind === "tier"));
			}
		})
	};

	const at = async (iso: string) => {
		await drained(broker);
		jest.setSystemTime(new Date(iso));
	};
	const save = async (memberId: string, dealAmount: number) => {
		const made = await broker.call<DealView, object>("deals.create", {
			memberId,
			merchantId: "20",
			dealAmount,
			type: "save"
		});
		await drained(broker);
		return made;
	};
	const cancel = async (id: string, amount?: number) => {
		const deal = await broker.call<DealView, object>(
			"deals.cancel",
			amount === undefined ? { id } : { id, amount }
		);
		await drained(broker);
		return deal;
	};
	const account = (memberId: string) =>
		broker.call<AccountView, object>("points.get", { memberId });
	const history = async (memberId: string) =>
		(await broker.call<{ rows: Entry[] }, object>("points.history", { memberId, pageSize: 100 }))
			.rows;
	const entriesOf = async (memberId: string, dealId: string) =>
		(await history(memberId))
			.filter(e => e.cause.includes(`:${dealId}`))
			.map(({ cause, kind, amount }) => [cause, kind, amount])
			.sort();
	const tierChanges = async (memberId: string) =>
		(await history(memberId))
			.filter(e => e.kind === "tier")
			.reverse()
			.map(e => [e.amount, e.reason]);
	/** When the member's latest change of tier was posted: the tier's `since`. */
	const changedAt = async (memberId: string) =>
		(await history(memberId)).find(e => e.kind === "tier")?.at;
	const review = () => broker.call<TierReview, object>("points.reviewTiers", {});
	const settlement = (billingMonth: string) =>
		broker.call<SettlementView, object>("billing.get", { merchantId: "20", billingMonth });

	beforeAll(async () => {
		broker = createTestBroker(
			[
				MembersService,
				MerchantsService,
				// The test runs the daily review and closes no month: neither job runs meanwhile.
				withSettings(PointsService, { expiryCheckMs: 3_600_000 }),
				DealsService,
				withSettings(BillingService, { monthEnd: { firstCheckMs: 3_600_000 } }),
				DashboardService,
				Watcher
			],
			{ TIERS }
		);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
		for (const memberId of ["t001", "t002"])
			await broker.call("members.join", { memberId, name: memberId });
		await drained(broker);
	});
	afterAll(() => broker.stop());
	afterEach(async () => {
		await drained(broker);
		expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([]);
	});

	it("rises through the tiers as saves and an order accumulate, with a bonus at each tier above the first", async () => {
		const opened = await account("t001");
		expect(opened.tier).toEqual({
			name: "basic",
			since: opened.openedAt,
			earned12m: 0,
			next: { name: "silver", needed: 500 }
		});

		// January: 300 at basic, no bonus.
		const jan = await save("t001", 30_000);
		expect(await entriesOf("t001", jan.id)).toEqual([[`deal:${jan.id}`, "earn", 300]]);

		// February: 300 more reach silver; the save was made at basic, so it has no bonus.
		await at("2026-02-10T10:00:00.000Z");
		const feb = await save("t001", 30_000);
		expect(await entriesOf("t001", feb.id)).toEqual([[`deal:${feb.id}`, "earn", 300]]);
		expect(await tierChanges("t001")).toEqual([[0, "basic → silver"]]);
		expect((await account("t001")).tier).toEqual({
			name: "silver",
			since: await changedAt("t001"),
			earned12m: 600,
			next: { name: "gold", needed: 1400 }
		});

		// March, at silver (1.25): 400 earn 100 more; 333 earn floor(416.25) − 333 = 83 more.
		await at("2026-03-10T10:00:00.000Z");
		const mar1 = await save("t001", 40_000);
		const mar2 = await save("t001", 33_300);
		expect(await entriesOf("t001", mar1.id)).toEqual([
			[`deal-bonus:${mar1.id}`, "bonus", 100],
			[`deal:${mar1.id}`, "earn", 400]
		]);
		expect(await entriesOf("t001", mar2.id)).toEqual([
			[`deal-bonus:${mar2.id}`, "bonus", 83],
			[`deal:${mar2.id}`, "earn", 333]
		]);
		// The deal's points stay the base: what the merchant is billed for.
		expect(mar2.point).toBe(333);
		expect((await account("t001")).tier).toMatchObject({ name: "silver", earned12m: 1333 });

		// April: an order's 700 points count too, and reach gold.
		await at("2026-04-10T10:00:00.000Z");
		await send("order.paid", {
			orderId: "t-o1",
			memberId: "t001",
			productId: "p1",
			qty: 1,
			unitPrice: 7000,
			totalPrice: 7000,
			rate: 0.1,
			points: 700,
			paidAt: new Date().toISOString()
		});
		await drained(broker);
		expect(await tierChanges("t001")).toEqual([
			[0, "basic → silver"],
			[0, "silver → gold"]
		]);
		expect(await entriesOf("t001", "t-o1")).toEqual([["order:t-o1", "earn", 700]]);
		expect((await account("t001")).tier).toEqual({
			name: "gold",
			since: await changedAt("t001"),
			earned12m: 2033,
			next: null
		});
		expect(postedTiers.map(e => [e.cause, e.amount, e.reason])).toEqual(
			(await history("t001"))
				.filter(e => e.kind === "tier")
				.reverse()
				.map(e => [e.cause, 0, e.reason])
		);
		expect(postedTiers.map(e => e.cause)).toEqual([
			expect.stringMatching(/^tier:t001:\d+$/),
			expect.stringMatching(/^tier:t001:\d+$/)
		]);
	});

	it("revokes a save's bonus with its returns, in shares of their total, and whole with its cancellation", async () => {
		// At gold (1.5): 200 earn 100 more.
		const returned = await save("t001", 20_001);
		expect(returned.point).toBe(200);
		const before = (await history("t001")).length;
		// 6667 of 20001 returns 66 points, and floor(100 × 66 / 200) = 33 of the bonus.
		await cancel(returned.id, 6667);
		await expect(cancel(returned.id, 999_999)).rejects.toMatchObject({
			code: 409,
			type: "RETURN_EXCEEDS_REMAINDER"
		});
		expect((await history("t001")).length).toBe(before + 2);
		// The rest completes the deal: 134 points and all 67 left of the bonus.
		await cancel(returned.id);
		expect(await entriesOf("t001", returned.id)).toEqual([
			[`deal-bonus-return:${returned.id}:1`, "revoke", -33],
			[`deal-bonus-return:${returned.id}:2`, "revoke", -67],
			[`deal-bonus:${returned.id}`, "bonus", 100],
			[`deal-return:${returned.id}:1`, "revoke", -66],
			[`deal-return:${returned.id}:2`, "revoke", -134],
			[`deal:${returned.id}`, "earn", 200]
		]);
		// The tier counts what the returns took back, in the month the save was earned in.
		const taken = (await history("t001")).filter(e =>
			e.cause.startsWith(`deal-return:${returned.id}`)
		);
		expect(taken.map(e => e.earnedIn)).toEqual(["202604", "202604"]);

		// Half of a save returned: half its base, and half its bonus.
		const kept = await save("t001", 10_000);
		await cancel(kept.id, 5000);
		expect(await entriesOf("t001", kept.id)).toEqual([
			[`deal-bonus-return:${kept.id}:1`, "revoke", -25],
			[`deal-bonus:${kept.id}`, "bonus", 50],
			[`deal-return:${kept.id}:1`, "revoke", -50],
			[`deal:${kept.id}`, "earn", 100]
		]);

		// Cancelled whole: the base, then the bonus.
		const cancelled = await save("t001", 10_000);
		await cancel(cancelled.id);
		expect(await entriesOf("t001", cancelled.id)).toEqual([
			[`deal-bonus-cancel:${cancelled.id}`, "revoke", -50],
			[`deal-bonus:${cancelled.id}`, "bonus", 50],
			[`deal-cancel:${cancelled.id}`, "revoke", -100],
			[`deal:${cancelled.id}`, "earn", 100]
		]);

		// A return that overtakes its save posts the save, its bonus and their shares at once.
		const deal = {
			dealId: "t-ov1",
			memberId: "t001",
			merchantId: "20",
			dealAmount: 10_000,
			type: "save",
			point: 100,
			dealDate: new Date().toISOString(),
			terms: { earnRateBp: 100, redemptionFeeBp: 200, pointPriceBp: 10_000 }
		};
		await send("deal.returned", {
			...deal,
			return: { n: 1, amount: 5000, points: 50, at: new Date().toISOString() },
			returnedAmount: 5000,
			returnedPoints: 50,
			status: "partially_cancelled"
		});
		await drained(broker);
		await send("deal.saved", deal);
		await drained(broker);
		expect(await entriesOf("t001", "t-ov1")).toEqual([
			["deal-bonus-return:t-ov1:1", "revoke", -25],
			["deal-bonus:t-ov1", "bonus", 50],
			["deal-return:t-ov1:1", "revoke", -50],
			["deal:t-ov1", "earn", 100]
		]);
		// 2033 + (200 − 200) + (100 − 50) + (100 − 100) + (100 − 50): still gold.
		expect((await account("t001")).tier).toMatchObject({ name: "gold", earned12m: 2133 });
		expect(await tierChanges("t001")).toHaveLength(2);
	});

	it("bills the merchant the base only, and shows the bonus the coalition funded", async () => {
		// March: 400 + 333 issued; the bonus 100 + 83 beside them.
		const march = await settlement("202603");
		expect(march).toMatchObject({
			issued: { points: 733, amount: 733 },
			net: -733,
			bonus: { points: 183 }
		});
		expect(march.lines.map(l => [l.kind, l.points])).toEqual([
			["save", 400],
			["save", 333]
		]);
		// April: what stands of the saves (50 of each half returned) and of their bonus (25 each).
		const april = await settlement("202604");
		expect(april).toMatchObject({
			issued: { points: 100, amount: 100 },
			net: -100,
			bonus: { points: 50 }
		});
		const csv = await broker.call<string, object>("billing.statement", {
			merchantId: "20",
			billingMonth: "202604"
		});
		expect(csv.split("\r\n")).toEqual(
			expect.arrayContaining([
				"total,issued,,,100,100,,",
				"total,net,,,,-100,,",
				"total,bonus,,,50,,,"
			])
		);
		// January and February were earned at basic: no bonus.
		expect((await settlement("202601")).bonus).toEqual({ points: 0 });
	});

	it("counts an order's revocation against the tier, and falls at once", async () => {
		const order = {
			orderId: "t-o2",
			memberId: "t002",
			productId: "p1",
			qty: 1,
			unitPrice: 6000,
			totalPrice: 6000,
			rate: 0.1,
			points: 600,
			paidAt: new Date().toISOString()
		};
		await send("order.paid", order);
		await drained(broker);
		expect((await account("t002")).tier).toMatchObject({ name: "silver", earned12m: 600 });
		await send("order.cancelled", { ...order, cancelledAt: new Date().toISOString() });
		await drained(broker);
		expect(await tierChanges("t002")).toEqual([
			[0, "basic → silver"],
			[0, "silver → basic"]
		]);
		expect((await account("t002")).tier).toMatchObject({ name: "basic", earned12m: 0 });
	});

	it("falls back as earnings leave the 12-month window, when the daily review runs", async () => {
		// January 2027: January 2026's 300 have left; 1833 is below gold.
		await at("2027-01-15T10:00:00.000Z");
		expect((await account("t001")).tier).toMatchObject({ name: "gold", earned12m: 1833 });
		expect(await review()).toEqual({ month: "202701", members: 1 });
		expect(await review()).toEqual({ month: "202701", members: 0 });
		expect((await account("t001")).tier).toEqual({
			name: "silver",
			since: await changedAt("t001"),
			earned12m: 1833,
			next: { name: "gold", needed: 167 }
		});

		// March 2027: April's 800 still hold silver.
		await at("2027-03-20T10:00:00.000Z");
		expect(await review()).toEqual({ month: "202703", members: 0 });
		expect((await account("t001")).tier).toMatchObject({ name: "silver", earned12m: 800 });

		// April 2027: nothing earned in the window is left.
		await at("2027-04-02T00:30:00.000Z");
		expect(await review()).toEqual({ month: "202704", members: 1 });
		expect((await account("t001")).tier).toEqual({
			name: "basic",
			since: await changedAt("t001"),
			earned12m: 0,
			next: { name: "silver", needed: 500 }
		});
		expect(await tierChanges("t001")).toEqual([
			[0, "basic → silver"],
			[0, "silver → gold"],
			[0, "gold → silver"],
			[0, "silver → basic"]
		]);
		await drained(broker);
		expect(postedTiers.filter(e => e.memberId === "t001").map(e => e.reason)).toEqual([
			"basic → silver",
			"silver → gold",
			"gold → silver",
			"silver → basic"
		]);

		// The dashboard shows the tier and lists each change among the member's transactions.
		const { tier } = await broker.call<{ tier: object }, object>("dashboard.member", {
			memberId: "t001"
		});
		expect(tier).toEqual({ name: "basic", since: await changedAt("t001") });
		const transactions = await broker.call<{ rows: { kind: string; reason?: string }[] }, object>(
			"dashboard.transactions",
			{ memberId: "t001", pageSize: 100 }
		);
		expect(transactions.rows.filter(t => t.kind === "tier").map(t => t.reason)).toEqual([
			"silver → basic",
			"gold → silver",
			"silver → gold",
			"basic → silver"
		]);
	});

	it("refuses bad input with a code, changing nothing", async () => {
		const before = { account: await account("t001"), entries: (await history("t001")).length };
		await expect(broker.call("points.get", { memberId: { $gt: "" } })).rejects.toMatchObject({
			code: 422,
			type: "VALIDATION_ERROR"
		});
		await expect(broker.call("points.get", { memberId: "nobody" })).rejects.toMatchObject({
			code: 404,
			type: "ACCOUNT_NOT_FOUND"
		});
		await expect(broker.call("points.reviewTiers", { month: "202601" })).rejects.toMatchObject({
			code: 422,
			type: "VALIDATION_ERROR"
		});
		for (const dealAmount of [0, -100, 1.5, "ten", { $gt: 0 }])
			await expect(
				broker.call("deals.create", {
					memberId: "t001",
					merchantId: "20",
					dealAmount,
					type: "save"
				})
			).rejects.toMatchObject({ code: 422, type: "VALIDATION_ERROR" });
		await expect(
			broker.call("billing.get", { merchantId: "20", billingMonth: "2026-04" })
		).rejects.toMatchObject({ code: 422, type: "VALIDATION_ERROR" });
		await drained(broker);
		expect({ account: await account("t001"), entries: (await history("t001")).length }).toEqual(
			before
		);
	});
});
