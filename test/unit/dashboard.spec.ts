import type { ServiceBroker } from "moleculer";
import BillingService from "../../services/billing.service";
import DashboardService from "../../services/dashboard.service";
import { createTestBroker, eventually } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

type Send = (channel: string, payload: object) => Promise<void>;

describe("dashboard read model", () => {
	// "This month" is November 2026, when the deals below were made.
	clockFrom("2026-11-20T12:00:00.000Z");
	let broker: ServiceBroker;
	let send: Send;
	const at = (minute: number) => new Date(Date.UTC(2026, 10, 2, 10, minute)).toISOString();
	const entry = (
		cause: string,
		kind: string,
		amount: number,
		balanceAfter: number,
		minute: number,
		merchantId = "20"
	) => ({
		cause,
		memberId: "0001",
		kind,
		amount,
		balanceAfter,
		sourceType: "deal",
		sourceId: cause.split(":")[1],
		merchantId,
		at: at(minute)
	});
	const member = () => broker.call<any, object>("dashboard.member", { memberId: "0001" });
	/** A merchant's month in the overview with saves only: what it pays for `points` at 1 a point. */
	const issuedOnly = (merchantId: string, points: number) => ({
		merchantId,
		billingMonth: "202611",
		usedPoints: 0,
		adjustmentPoints: 0,
		billingAmount: 0,
		redeemed: { points: 0, fee: 0, amount: 0 },
		issued: { points, amount: points },
		net: -points
	});

	beforeAll(async () => {
		// Billing too: the overview's settlement preview is billing's own figures.
		broker = createTestBroker([DashboardService, BillingService]);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
	});
	afterAll(() => broker.stop());

	it("follows the ledger into balance, totals, series, months and merchants — once per entry, in any order", async () => {
		const deal = (
			dealId: string,
			type: string,
			point: number,
			minute: number,
			merchantId = "20"
		) => ({
			dealId,
			memberId: "0001",
			merchantId,
			dealAmount: point * 100,
			type,
			point,
			dealDate: at(minute)
		});
		// The ledger arrives before the joining, twice.
		const postings = [
			{
				memberId: "0001",
				entries: [entry("deal:d1", "earn", 1000, 1000, 1)],
				lots: {},
				version: 1
			},
			{ memberId: "0001", entries: [entry("deal:d2", "use", -100, 900, 2)], lots: {}, version: 2 },
			{
				memberId: "0001",
				entries: [entry("deal:d3", "earn", 500, 1400, 3, "21")],
				lots: {},
				version: 3
			},
			{
				memberId: "0001",
				entries: [entry("deal-cancel:d2", "restore", 100, 1500, 4)],
				lots: {},
				version: 4
			}
		];
		// Out of order, and each twice.
		for (const i of [0, 2, 1, 3, 3, 0, 1, 2]) await send("points.posted", postings[i]);
		await send("member.joined", { memberId: "0001", name: "Kim", joinedAt: at(0) });
		await send("deal.saved", deal("d1", "save", 1000, 1));
		await send("deal.cancelled", deal("d2", "use", 100, 2));
		await send("deal.used", deal("d2", "use", 100, 2));
		await send("deal.saved", deal("d3", "save", 500, 3, "21"));
		await send("deal.saved", deal("d3", "save", 500, 3, "21"));
		await send("deal.failed", { ...deal("d4", "use", 99999, 5), reason: "INSUFFICIENT_POINTS" });

		await eventually(async () => expect((await member()).transactions).toBe(4));
		await eventually(async () =>
			expect((await member()).member).toMatchObject({
				name: "Kim",
				status: "active",
				balance: 1500,
				earned: 1500,
				used: 100,
				cancelled: 100,
				expired: 0
			})
		);
		const view = await member();
		expect(view.series.map((p: { balance: number }) => p.balance)).toEqual([1000, 900, 1400, 1500]);
		expect(view.monthly).toEqual([
			{
				month: "202611",
				earned: 1500,
				used: 100,
				cancelled: 100,
				expired: 0,
				adjusted: 0,
				imported: 0
			}
		]);
		expect(view.byMerchant).toEqual([
			{ merchantId: "20", earned: 1000, used: 100 },
			{ merchantId: "21", earned: 500, used: 0 }
		]);
		// The use's cancellation (on a channel of its own) may land last.
		await eventually(async () =>
			expect(
				(await member()).latest.map((t: { id: string; status: string }) => `${t.id} ${t.status}`)
			).toEqual(["d4 fail", "d3 success", "d2 cancelled", "d1 success"])
		);
	});

	it("pages a member's transactions", async () => {
		const page = await broker.call<any, object>("dashboard.transactions", {
			memberId: "0001",
			page: 2,
			pageSize: 3
		});
		expect(page).toMatchObject({ total: 4, page: 2, pageSize: 3 });
		expect(page.rows.map((t: { id: string }) => t.id)).toEqual(["d1"]);
	});

	it("sums the overview, with the cancelled use kept out of the settlement preview and the saves in it", async () => {
		const overview = await broker.call<any, object>("dashboard.overview", { days: 92 });
		expect(overview).toMatchObject({ members: 1, activeAccounts: 1, pointsOutstanding: 1500 });
		expect(overview.dealsPerDay).toEqual([{ day: "2026-11-02", deals: 4 }]);
		expect(overview.topMerchants[0]).toEqual({
			merchantId: "20",
			deals: 3,
			earnedPoints: 1000,
			usedPoints: 0
		});
		expect(overview.settlementPreview).toEqual([issuedOnly("20", 1000), issuedOnly("21", 500)]);
	});

	it("counts a withdrawal and its expiry", async () => {
		await send("member.withdrawn", { memberId: "0001", withdrawnAt: at(9) });
		await send("points.posted", {
			memberId: "0001",
			closed: true,
			entries: [
				{
					...entry("expiry:0001", "expire", -1500, 0, 9),
					sourceType: "member",
					merchantId: undefined
				}
			],
			lots: {},
			version: 5
		});
		await eventually(async () =>
			expect((await member()).member).toMatchObject({
				status: "withdrawn",
				balance: 0,
				expired: 1500
			})
		);
		await eventually(async () =>
			expect(await broker.call("dashboard.overview", {})).toMatchObject({
				members: 1,
				activeAccounts: 0,
				pointsOutstanding: 0
			})
		);
	});

	it("repairs on a replay what a crash between two writes left uncounted", async () => {
		const dashboard = broker.getLocalService("dashboard") as unknown as {
			store: { insertUnique(row: object): Promise<boolean> };
			transactions: { insertUnique(row: object): Promise<boolean> };
		};
		await send("member.joined", { memberId: "0002", name: "Lee", joinedAt: at(10) });
		// The crash: the ledger entry's copy and the deal's row were written, nothing after them.
		const { cause, ...earned } = {
			...entry("deal:c1", "earn", 700, 700, 11, "22"),
			memberId: "0002"
		};
		await dashboard.store.insertUnique({ _id: cause, ...earned });
		const used = {
			dealId: "c2",
			memberId: "0002",
			merchantId: "22",
			dealAmount: 5000,
			type: "use",
			point: 50,
			dealDate: "2026-11-20T11:00:00.000Z"
		};
		await dashboard.transactions.insertUnique({
			_id: "deal:c2",
			kind: "deal",
			id: "c2",
			memberId: "0002",
			type: "use",
			merchantId: "22",
			amount: 5000,
			point: 50,
			status: "success",
			at: used.dealDate,
			day: used.dealDate.slice(0, 10),
			month: used.dealDate.slice(0, 7).replace("-", "")
		});
		// The events are delivered again, as they are after a crash before their acknowledgement.
		await send("points.posted", {
			memberId: "0002",
			entries: [{ cause, ...earned }],
			lots: {},
			version: 1
		});
		await send("deal.used", used);
		await eventually(async () =>
			expect(
				(await broker.call<any, object>("dashboard.member", { memberId: "0002" })).member
			).toMatchObject({ balance: 700, earned: 700 })
		);
		const overview = await broker.call<any, object>("dashboard.overview", {});
		expect(overview).toMatchObject({ members: 2, activeAccounts: 1, pointsOutstanding: 700 });
		expect(overview.topMerchants).toContainEqual({
			merchantId: "22",
			deals: 1,
			earnedPoints: 0,
			usedPoints: 50
		});
		// 50 × 0.98 = 49 to merchant 22; the saves of 20 and 21 as before.
		await eventually(async () =>
			expect((await broker.call<any, object>("dashboard.overview", {})).settlementPreview).toEqual([
				{
					merchantId: "22",
					billingMonth: "202611",
					usedPoints: 50,
					adjustmentPoints: 0,
					billingAmount: 49,
					redeemed: { points: 50, fee: 1, amount: 49 },
					issued: { points: 0, amount: 0 },
					net: 49
				},
				issuedOnly("20", 1000),
				issuedOnly("21", 500)
			])
		);
	});

	it("answers 404 for a member it has not seen", async () => {
		await expect(broker.call("dashboard.member", { memberId: "nobody" })).rejects.toMatchObject({
			code: 404
		});
	});
});

describe("dashboard: points expiring soon", () => {
	let broker: ServiceBroker;
	let send: Send;
	const clock = new Date("2026-11-20T10:00:00.000Z");
	const posting = (memberId: string, version: number, lots: Record<string, number>) => ({
		memberId,
		closed: false,
		entries: [
			{
				cause: `deal:${memberId}-${version}`,
				memberId,
				kind: "earn",
				amount: 1,
				balanceAfter: 1,
				sourceType: "deal",
				sourceId: `${memberId}-${version}`,
				at: clock.toISOString()
			}
		],
		lots,
		version
	});

	beforeAll(async () => {
		// Valid two months: at the end of November, September's earnings expire.
		broker = createTestBroker([
			{
				name: "dashboard",
				mixins: [DashboardService as any],
				settings: { pointsValidMonths: 2 },
				methods: { now: () => clock }
			}
		]);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
	});
	afterAll(() => broker.stop());

	it("shows each member's and the overall points expiring in the next three months, from the newest lots whatever the order postings arrive in", async () => {
		await send("member.joined", { memberId: "e001", name: "Han", joinedAt: clock.toISOString() });
		await send("member.joined", { memberId: "e002", name: "Yoon", joinedAt: clock.toISOString() });
		// e001's third posting arrives before its second.
		await send("points.posted", posting("e001", 1, { "202609": 100 }));
		await send("points.posted", posting("e001", 3, { "202609": 40, "202610": 200, "202611": 7 }));
		await send("points.posted", posting("e001", 2, { "202609": 100, "202610": 200 }));
		await send("points.posted", posting("e002", 5, { "202610": 30 }));
		await eventually(async () =>
			expect(
				(await broker.call<any, object>("dashboard.member", { memberId: "e001" })).member.earned
			).toBe(3)
		);
		await eventually(async () =>
			expect(
				(await broker.call<any, object>("dashboard.member", { memberId: "e002" })).member.earned
			).toBe(1)
		);

		// The lots land in the member's row after the entries: wait for them as well.
		await eventually(async () =>
			expect(
				(await broker.call<any, object>("dashboard.member", { memberId: "e001" })).expiring
			).toEqual([
				{ month: "202611", expiresAt: "2026-12-01T00:00:00.000Z", points: 40 },
				{ month: "202612", expiresAt: "2027-01-01T00:00:00.000Z", points: 200 },
				{ month: "202701", expiresAt: "2027-02-01T00:00:00.000Z", points: 7 }
			])
		);
		await eventually(async () =>
			expect((await broker.call<any, object>("dashboard.overview", {})).expiringSoon).toEqual({
				months: [
					{ month: "202611", expiresAt: "2026-12-01T00:00:00.000Z", points: 40 },
					{ month: "202612", expiresAt: "2027-01-01T00:00:00.000Z", points: 230 },
					{ month: "202701", expiresAt: "2027-02-01T00:00:00.000Z", points: 7 }
				],
				members: [
					{ memberId: "e001", name: "Han", points: 247, firstMonth: "202611" },
					{ memberId: "e002", name: "Yoon", points: 30, firstMonth: "202612" }
				]
			})
		);
	});
});
