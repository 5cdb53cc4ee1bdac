/**
 * Both sides of a merchant's month: the points redeemed there (its uses, paid to it less the fee)
 * and the points its saves issued (paid by it at its point price), each line at the rate its deal
 * recorded, netted to the unit; a change after the month closed carried into the next open month;
 * every merchant's month with the coalition's totals; the statement as CSV, through the gateway,
 * agreeing with the JSON line by line; the tier bonus the coalition funded shown beside the figures,
 * never in them. Then the same on real deals whose merchant's terms changed between them.
 */
import { parse } from "csv-parse/sync";
import type { ServiceBroker } from "moleculer";
import type { DealTerms } from "../../contracts/channels";
import ApiService from "../../services/api.service";
import BillingService, {
	type MonthSettlements,
	type SettlementView
} from "../../services/billing.service";
import DealsService, { type DealView } from "../../services/deals.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained, withSettings } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freePort } from "../helpers/system";

type Send = (channel: string, payload: object) => Promise<void>;

const terms = (redemptionFeeBp: number, pointPriceBp: number): DealTerms => ({
	earnRateBp: 100,
	redemptionFeeBp,
	pointPriceBp
});

const sum = (values: number[]) => values.reduce((total, value) => total + value, 0);

/** Every figure of a settlement is a sum of its lines (invariant 5). */
function expectSumsOfLines(s: SettlementView): void {
	const side = (type: string) => s.lines.filter(line => line.type === type);
	const points = (type: string) => sum(side(type).map(line => line.points));
	const amount = (type: string) => sum(side(type).map(line => line.amount));
	const uses = s.lines.filter(line => line.kind === "use");
	expect(s).toMatchObject({
		usedPoints: sum(uses.map(line => line.points)),
		dealCount: uses.length,
		adjustmentPoints: points("use") - sum(uses.map(line => line.points)),
		redeemed: {
			points: points("use"),
			fee: points("use") - amount("use"),
			amount: amount("use")
		},
		issued: { points: points("save"), amount: amount("save") },
		fee: s.redeemed.fee,
		billingAmount: s.redeemed.amount,
		net: amount("use") - amount("save")
	});
}

/** A month's totals are the sums of its settlements. */
function expectTotalsOfSettlements(month: MonthSettlements): void {
	const of = (figure: (s: SettlementView) => number) => sum(month.settlements.map(figure));
	expect(month.totals).toEqual({
		redeemed: {
			points: of(s => s.redeemed.points),
			fee: of(s => s.redeemed.fee),
			amount: of(s => s.redeemed.amount)
		},
		issued: { points: of(s => s.issued.points), amount: of(s => s.issued.amount) },
		net: of(s => s.net),
		bonus: { points: of(s => s.bonus.points) }
	});
	expect(month.totals.net).toBe(month.totals.redeemed.amount - month.totals.issued.amount);
	for (const s of month.settlements) expectSumsOfLines(s);
}

/** The statement's rows, each cell as text: the settlement's lines, then its totals. */
function statementRows(s: SettlementView): Record<string, string>[] {
	const cell = (value?: string | number) => (value === undefined ? "" : String(value));
	const row = (fields: Record<string, string | number | undefined>) =>
		Object.fromEntries(
			["kind", "type", "dealId", "dealDate", "points", "amount", "reason", "month"].map(column => [
				column,
				cell(fields[column])
			])
		);
	return [
		...s.lines.map(line => row({ ...line })),
		row({ kind: "total", type: "redeemed", points: s.redeemed.points, amount: s.redeemed.amount }),
		row({ kind: "total", type: "fee", amount: s.redeemed.fee }),
		row({ kind: "total", type: "issued", points: s.issued.points, amount: s.issued.amount }),
		row({ kind: "total", type: "net", amount: s.net }),
		row({ kind: "total", type: "bonus", points: s.bonus.points })
	];
}

describe("settlements with both sides, on the terms each deal recorded", () => {
	// The test's clock: March and April 2021 are long over; May 2026 is this month, open.
	clockFrom("2026-05-14T10:00:00.000Z");
	const TOKENS = {
		staff: "settlement-staff-token-0123",
		n1: "settlement-merchant-n1-token",
		p1: "settlement-merchant-p1-token",
		p2: "settlement-merchant-p2-token"
	};
	let broker: ServiceBroker;
	let send: Send;
	let url: string;

	/** A deal's event, as the deals service publishes it. */
	const deal = (
		dealId: string,
		merchantId: string,
		type: "save" | "use",
		point: number,
		dealDate: string,
		dealTerms?: DealTerms
	) => ({
		dealId,
		memberId: "0001",
		merchantId,
		dealAmount: point * 100,
		type,
		point,
		dealDate,
		...(dealTerms ? { terms: dealTerms } : {})
	});
	type Deal = ReturnType<typeof deal>;
	const made = (d: Deal) => send(d.type === "save" ? "deal.saved" : "deal.used", d);
	const cancelled = (d: Deal) => send("deal.cancelled", d);
	/** A partial return: the deal's returned points in total after it. */
	const returned = (d: Deal, n: number, returnedPoints: number) =>
		send("deal.returned", {
			...d,
			return: { n, amount: 0, points: 0, at: new Date().toISOString() },
			returnedAmount: returnedPoints * 100,
			returnedPoints,
			status: "partially_cancelled"
		});
	const get = (merchantId: string, billingMonth: string) =>
		broker.call<SettlementView, object>("billing.get", { merchantId, billingMonth });
	const list = (billingMonth: string) =>
		broker.call<MonthSettlements, object>("billing.list", { billingMonth });
	const lines = (s: SettlementView) =>
		s.lines.map(
			l =>
				`${l.kind} ${l.type} ${l.dealId} ${l.points} ${l.amount}${l.month ? ` ${l.month} ${l.reason}` : ""}`
		);
	const statement = (merchantId: string, billingMonth: string, token = TOKENS.staff) =>
		fetch(`${url}/api/billings/${merchantId}/${billingMonth}/statement.csv`, {
			headers: { authorization: `Bearer ${token}` }
		});

	// Merchant n1's terms: a 3 % redemption fee, 0.9 a point issued.
	const n1 = terms(300, 9000);
	const A = deal("n1-A", "n1", "save", 1001, "2021-03-02T10:00:00.000Z", n1);
	const B = deal("n1-B", "n1", "save", 333, "2021-03-05T10:00:00.000Z", n1);
	const C = deal("n1-C", "n1", "use", 777, "2021-03-10T10:00:00.000Z", n1);
	const D = deal("n1-D", "n1", "use", 250, "2021-03-15T10:00:00.000Z", n1);
	const E = deal("n1-E", "n1", "use", 90, "2021-03-20T10:00:00.000Z", n1);
	const F = deal("n1-F", "n1", "save", 40, "2021-03-25T10:00:00.000Z", n1);

	beforeAll(async () => {
		const port = await freePort();
		broker = createTestBroker(
			[
				// The test closes months itself: the month-end job does not run meanwhile.
				withSettings(BillingService, { monthEnd: { firstCheckMs: 3_600_000 } }),
				ApiService
			],
			{
				PORT: String(port),
				HOST: "127.0.0.1",
				API_KEYS: [
					`${TOKENS.staff}=staff`,
					`${TOKENS.n1}=merchant:n1`,
					`${TOKENS.p1}=merchant:p1`,
					`${TOKENS.p2}=merchant:p2`
				].join(",")
			}
		);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
		url = `http://127.0.0.1:${port}`;
	});
	afterAll(() => broker.stop());

	it("nets a month of saves, uses and partial returns on both sides, each line at its deal's rate", async () => {
		for (const d of [A, B, C, D, E, F]) await made(d);
		await returned(B, 1, 111);
		await returned(C, 1, 101);
		await cancelled(E);
		await cancelled(F);
		await drained(broker);

		const march = await get("n1", "202103");
		// Saves at 0.9: A 1001 → 900.9 → 900; B 333 − 111 = 222 → 199.8 → 199. Uses at 1 − 0.03:
		// C 777 − 101 = 676 → 655.72 → 655; D 250 → 242.5 → 242. E and F, cancelled, bill nothing.
		expect(lines(march)).toEqual([
			"save save n1-A 1001 900",
			"save save n1-B 222 199",
			"use use n1-C 676 655",
			"use use n1-D 250 242"
		]);
		// Redeemed 926 points → 655 + 242 = 897 (each line toward zero; 926 × 0.97 would be 898),
		// fee 29; issued 1223 points → 900 + 199 = 1099; net 897 − 1099 = −202: n1 pays.
		expect(march).toMatchObject({
			status: "provisional",
			usedPoints: 926,
			dealCount: 2,
			adjustmentPoints: 0,
			feeRate: 0.03,
			fee: 29,
			billingAmount: 897,
			redeemed: { points: 926, fee: 29, amount: 897 },
			issued: { points: 1223, amount: 1099 },
			net: -202
		});
		expectSumsOfLines(march);

		// Closing makes the same figures final.
		const closed = await broker.call<{ months: { settlements: SettlementView[] }[] }, object>(
			"billing.closeMonth",
			{ billingMonth: "202103" }
		);
		expect(closed.months.map(m => m.settlements.map(s => s.merchantId))).toEqual([["n1"]]);
		const {
			status: _provisional,
			computedAt: _computedAt,
			...figures
		} = march as SettlementView & { computedAt: string };
		expect(await get("n1", "202103")).toMatchObject({ ...figures, status: "final" });
	});

	it("carries a save's return after the month closed, a late save and a late cancellation into the next month, at the deal's own rate", async () => {
		const final = await get("n1", "202103");
		const G = deal("n1-G", "n1", "save", 50, "2021-03-28T10:00:00.000Z", n1);
		const H = deal("n1-H", "n1", "save", 100, "2021-04-02T10:00:00.000Z", n1);
		const I = deal("n1-I", "n1", "use", 200, "2021-04-03T10:00:00.000Z", n1);
		// B returned further: 222 returned in all, 111 left of the 222 billed.
		await returned(B, 2, 222);
		await made(G);
		await cancelled(D);
		await made(H);
		await made(I);
		await drained(broker);

		expect(await get("n1", "202103")).toEqual(final);
		const april = await get("n1", "202104");
		// −111 × 0.9 = −99.9 → −99 (toward zero, the mirror of 99); 50 × 0.9 = 45; −250 × 0.97 → −242;
		// April's own: 100 × 0.9 = 90, 200 × 0.97 = 194.
		expect(lines(april)).toEqual([
			"adjustment save n1-B -111 -99 202103 RETURNED_AFTER_SETTLEMENT",
			"adjustment use n1-D -250 -242 202103 CANCELLED_AFTER_SETTLEMENT",
			"adjustment save n1-G 50 45 202103 LATE_SAVE",
			"save save n1-H 100 90",
			"use use n1-I 200 194"
		]);
		// Redeemed 200 − 250 = −50 points → 194 − 242 = −48, fee −2; issued −111 + 50 + 100 = 39
		// points → −99 + 45 + 90 = 36; net −48 − 36 = −84.
		expect(april).toMatchObject({
			status: "provisional",
			usedPoints: 200,
			dealCount: 1,
			adjustmentPoints: -250,
			feeRate: 0.03,
			redeemed: { points: -50, fee: -2, amount: -48 },
			issued: { points: 39, amount: 36 },
			net: -84
		});
		expectSumsOfLines(april);
	});

	it("reverses each deal at the terms it recorded when the terms changed between them, after the month closed", async () => {
		// t2's terms changed within April: first a 2 % fee and 1 a point, then 10 % and 0.75.
		const before = terms(200, 10_000);
		const after = terms(1000, 7500);
		const X = deal("t2-X", "t2", "save", 500, "2021-04-05T10:00:00.000Z", before);
		const U = deal("t2-U", "t2", "use", 400, "2021-04-06T10:00:00.000Z", before);
		const Y = deal("t2-Y", "t2", "save", 500, "2021-04-20T10:00:00.000Z", after);
		const V = deal("t2-V", "t2", "use", 400, "2021-04-21T10:00:00.000Z", after);
		for (const d of [X, U, Y, V]) await made(d);
		await drained(broker);
		await broker.call("billing.closeMonth", { billingMonth: "202104" });

		const april = await get("t2", "202104");
		// X 500 × 1 = 500, U 400 × 0.98 = 392, Y 500 × 0.75 = 375, V 400 × 0.9 = 360.
		expect(lines(april)).toEqual([
			"save save t2-X 500 500",
			"use use t2-U 400 392",
			"save save t2-Y 500 375",
			"use use t2-V 400 360"
		]);
		// Two fees: no one fee rate. Redeemed 800 → 752, fee 48; issued 1000 → 875; net −123.
		expect(april).toMatchObject({
			status: "final",
			feeRate: null,
			redeemed: { points: 800, fee: 48, amount: 752 },
			issued: { points: 1000, amount: 875 },
			net: -123
		});
		// n1's April closed with it, as it stood.
		expect(await get("n1", "202104")).toMatchObject({ status: "final", net: -84 });

		// 100 points of each returned after April closed: each at its own deal's rate.
		for (const d of [X, U, Y, V]) await returned(d, 1, 100);
		await drained(broker);
		const may = await get("t2", "202105");
		expect(lines(may)).toEqual([
			"adjustment save t2-X -100 -100 202104 RETURNED_AFTER_SETTLEMENT",
			"adjustment use t2-U -100 -98 202104 RETURNED_AFTER_SETTLEMENT",
			"adjustment save t2-Y -100 -75 202104 RETURNED_AFTER_SETTLEMENT",
			"adjustment use t2-V -100 -90 202104 RETURNED_AFTER_SETTLEMENT"
		]);
		// Redeemed −200 → −188, fee −12; issued −200 → −175; net −188 + 175 = −13.
		expect(may).toMatchObject({
			status: "provisional",
			usedPoints: 0,
			dealCount: 0,
			adjustmentPoints: -200,
			feeRate: null,
			redeemed: { points: -200, fee: -12, amount: -188 },
			issued: { points: -200, amount: -175 },
			net: -13
		});
		expectSumsOfLines(may);
		expect(await get("t2", "202104")).toEqual(april);
	});

	it("lists every merchant's month on its own terms, with the coalition's totals", async () => {
		// p1: a 2 % fee, 1 a point; p2: 15 %, 0.5 a point; d1: a deal from before terms were recorded,
		// on this node's defaults (SETTLEMENT_FEE 0.02, POINT_PRICE 1).
		for (const d of [
			deal("p1-s", "p1", "save", 1000, "2026-05-02T10:00:00.000Z", terms(200, 10_000)),
			deal("p1-u", "p1", "use", 300, "2026-05-03T10:00:00.000Z", terms(200, 10_000)),
			deal("p2-s", "p2", "save", 1000, "2026-05-02T11:00:00.000Z", terms(1500, 5000)),
			deal("p2-u", "p2", "use", 300, "2026-05-03T11:00:00.000Z", terms(1500, 5000)),
			deal("d1-s", "d1", "save", 100, "2026-05-04T10:00:00.000Z"),
			deal("d1-u", "d1", "use", 100, "2026-05-04T11:00:00.000Z")
		])
			await made(d);
		await drained(broker);

		const may = await list("202605");
		expect(may).toMatchObject({ billingMonth: "202605", status: "provisional" });
		// d1: 100 → 98 paid, 100 issued → 100; p1: 300 → 294, 1000 → 1000; p2: 300 → 255, 1000 → 500.
		expect(
			may.settlements.map(({ merchantId, feeRate, redeemed, issued, net }) => ({
				merchantId,
				feeRate,
				redeemed,
				issued,
				net
			}))
		).toEqual([
			{
				merchantId: "d1",
				feeRate: 0.02,
				redeemed: { points: 100, fee: 2, amount: 98 },
				issued: { points: 100, amount: 100 },
				net: -2
			},
			{
				merchantId: "p1",
				feeRate: 0.02,
				redeemed: { points: 300, fee: 6, amount: 294 },
				issued: { points: 1000, amount: 1000 },
				net: -706
			},
			{
				merchantId: "p2",
				feeRate: 0.15,
				redeemed: { points: 300, fee: 45, amount: 255 },
				issued: { points: 1000, amount: 500 },
				net: -245
			}
		]);
		expect(may.totals).toEqual({
			redeemed: { points: 700, fee: 53, amount: 647 },
			issued: { points: 2100, amount: 1600 },
			net: -953,
			bonus: { points: 0 }
		});
		expectTotalsOfSettlements(may);
		// As `get` answers each (a provisional one says when it was computed: compare the rest).
		for (const { computedAt: _at, ...s } of may.settlements)
			expect(await get(s.merchantId, "202605")).toMatchObject(s);

		// A closed month: its final settlements as they were made.
		const april = await list("202104");
		expect(april.status).toBe("final");
		expect(april.settlements.map(s => s.merchantId)).toEqual(["n1", "t2"]);
		expect(april.totals.net).toBe(-84 - 123);
		expectTotalsOfSettlements(april);
		await expect(list("209901")).rejects.toMatchObject({
			code: 422,
			type: "BILLING_MONTH_NOT_STARTED"
		});
	});

	it("has no billing view for a save", async () => {
		await expect(broker.call("billing.view", { dealId: "p1-s" })).rejects.toMatchObject({
			code: 404,
			type: "BILLING_VIEW_NOT_FOUND"
		});
		expect(await broker.call("billing.view", { dealId: "p1-u" })).toMatchObject({ point: 300 });
	});

	it("answers a statement as CSV through the gateway, the same numbers as the JSON to the unit", async () => {
		for (const [merchantId, month] of [
			["n1", "202103"],
			["n1", "202104"],
			["t2", "202105"],
			["p2", "202605"]
		]) {
			const response = await statement(merchantId, month);
			expect(response.status).toBe(200);
			expect(response.headers.get("content-type")).toBe("text/csv; charset=utf-8");
			expect(response.headers.get("content-disposition")).toBe(
				`attachment; filename="${merchantId}-${month}.csv"`
			);
			const text = await response.text();
			expect(text.split("\r\n")[0]).toBe("kind,type,dealId,dealDate,points,amount,reason,month");
			const json = await get(merchantId, month);
			expect(parse(text, { columns: true })).toEqual(statementRows(json));
		}
		// A merchant reads its own statement, not another's; the month's list is the staff's.
		expect((await statement("p2", "202605", TOKENS.p2)).status).toBe(200);
		expect((await statement("p2", "202605", TOKENS.p1)).status).toBe(403);
		expect((await statement("n1", "202103", TOKENS.p1)).status).toBe(403);
		const listed = (token: string) =>
			fetch(`${url}/api/billings?billingMonth=202605`, {
				headers: { authorization: `Bearer ${token}` }
			});
		expect((await listed(TOKENS.p1)).status).toBe(403);
		const staffList = await listed(TOKENS.staff);
		expect(staffList.status).toBe(200);
		expect(((await staffList.json()) as MonthSettlements).totals.net).toBe(-953);
		// Unknown settlements and bad months answer as JSON errors, as every route does.
		const missing = await statement("zz", "202103");
		expect(missing.status).toBe(404);
		expect(await missing.json()).toMatchObject({ type: "SETTLEMENT_NOT_FOUND" });
		expect((await statement("p2", "2026-05")).status).toBe(422);
	});

	it("reads a final settlement made before settlements had two sides as one of uses only", async () => {
		const billing = broker.getLocalService("billing") as unknown as {
			settlements: { insertUnique(doc: object): Promise<boolean> };
		};
		// As an earlier version stored it: no sides, no type or amount on its line.
		await billing.settlements.insertUnique({
			_id: "old:202102",
			merchantId: "old",
			billingMonth: "202102",
			status: "final",
			usedPoints: 300,
			dealCount: 1,
			adjustmentPoints: 0,
			feeRate: 0.02,
			fee: 6,
			billingAmount: 294,
			lines: [{ kind: "use", dealId: "o1", dealDate: "2021-02-03T10:00:00.000Z", points: 300 }],
			settledAt: "2021-03-01T00:10:00.000Z"
		});
		const old = await get("old", "202102");
		expect(old).toMatchObject({
			redeemed: { points: 300, fee: 6, amount: 294 },
			issued: { points: 0, amount: 0 },
			net: 294,
			lines: [{ kind: "use", type: "use", dealId: "o1", points: 300 }]
		});
		// The line's amount was never recorded: its cell is empty, the totals as they were made.
		expect(parse(await (await statement("old", "202102")).text(), { columns: true })).toEqual(
			statementRows(old)
		);
		expect(old.bonus).toEqual({ points: 0 });
	});

	it("documents the statement as text/csv in the published contract", async () => {
		const contract = (await (await fetch(`${url}/api/openapi.json`)).json()) as {
			paths: Record<string, Record<string, { responses: Record<string, { content: object }> }>>;
		};
		const csv = contract.paths["/api/billings/{merchantId}/{billingMonth}/statement.csv"]?.get;
		expect(csv?.responses["2XX"].content).toEqual({ "text/csv": { schema: { type: "string" } } });
		expect(contract.paths["/api/billings"]?.get?.responses["2XX"].content).toHaveProperty(
			"application/json"
		);
	});

	it("shows the tier bonus its saves keep, funded by the coalition and outside net; the least a deal's bonus events state stands", async () => {
		const b1 = terms(200, 10_000);
		const S1 = deal("b1-S1", "b1", "save", 400, "2026-05-02T10:00:00.000Z", b1);
		const S2 = deal("b1-S2", "b1", "save", 200, "2026-05-03T10:00:00.000Z", b1);
		const S3 = deal("b1-S3", "b1", "save", 100, "2026-05-04T10:00:00.000Z", b1);
		const bonus = (d: Deal, bonusPoints: number) =>
			send("deal.bonus", {
				dealId: d.dealId,
				merchantId: d.merchantId,
				memberId: d.memberId,
				dealDate: d.dealDate,
				bonusPoints
			});
		// S3's bonus arrives before its save: the save still bills, and the bonus still shows.
		await bonus(S3, 50);
		for (const d of [S1, S2, S3]) await made(d);
		await bonus(S1, 100);
		await bonus(S2, 100);
		// S2 returned a third: its bonus keeps 67, and a stale redelivery of 100 does not win.
		await returned(S2, 1, 66);
		await bonus(S2, 67);
		await bonus(S2, 100);
		// S1 cancelled whole: no bonus left, whatever comes again.
		await cancelled(S1);
		await bonus(S1, 0);
		await bonus(S1, 100);
		await drained(broker);

		const may = await get("b1", "202605");
		// Issued at 1 a point: S2 200 − 66 = 134, S3 100; S1 cancelled. The bonus 67 + 50 is no line.
		expect(lines(may)).toEqual(["save save b1-S2 134 134", "save save b1-S3 100 100"]);
		expect(may).toMatchObject({
			issued: { points: 234, amount: 234 },
			net: -234,
			bonus: { points: 117 }
		});
		expectSumsOfLines(may);
		const csv = await (await statement("b1", "202605")).text();
		expect(csv.split("\r\n")).toContain("total,bonus,,,117,,,");
		expect(parse(csv, { columns: true })).toEqual(statementRows(may));
		const month = await list("202605");
		expect(month.totals.bonus).toEqual({ points: 117 });
		expectTotalsOfSettlements(month);
	});
});

describe("a merchant's terms changed between two deals, then both returned", () => {
	// The test's clock: everything happens in May 2026, an open month.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	const create = (params: object) =>
		broker.call<DealView, object>("deals.create", {
			memberId: "m001",
			merchantId: "t1",
			...params
		});
	const giveBack = (id: string, amount: number) =>
		broker.call<DealView, object>("deals.cancel", { id, amount });

	beforeAll(async () => {
		broker = createTestBroker([
			MembersService,
			MerchantsService,
			PointsService,
			DealsService,
			withSettings(BillingService, { monthEnd: { firstCheckMs: 3_600_000 } })
		]);
		await broker.start();
		await broker.call("members.join", { memberId: "m001", name: "Terms" });
	});
	afterAll(() => broker.stop());

	it("bills each deal, and each return, at the terms the deal recorded", async () => {
		await broker.call("merchants.register", {
			merchantId: "t1",
			name: "Terms Shop",
			earnRate: 0.05,
			redemptionFee: 0.05,
			pointPrice: 0.8
		});
		// Under the first terms: a save of 10000 earns 500 points; a use of 200.
		const save1 = await create({ dealAmount: 10_000, type: "save" });
		expect(save1.point).toBe(500);
		await drained(broker);
		const use1 = await create({ dealAmount: 2000, type: "use", point: 200 });
		expect(use1.status).toBe("success");

		await broker.call("merchants.changeTerms", {
			merchantId: "t1",
			earnRate: 0.1,
			redemptionFee: 0.1,
			pointPrice: 1.2
		});
		// Under the new terms: a save of 10000 earns 1000 points; a use of 300.
		const save2 = await create({ dealAmount: 10_000, type: "save" });
		expect(save2.point).toBe(1000);
		await drained(broker);
		const use2 = await create({ dealAmount: 3000, type: "use", point: 300 });
		expect(use2.status).toBe("success");

		// Returned in part, after the change: 3/10 of each save, 1/4 of one use, 1/3 of the other.
		expect((await giveBack(save1.id, 3000)).returnedPoints).toBe(150);
		expect((await giveBack(save2.id, 3000)).returnedPoints).toBe(300);
		expect((await giveBack(use1.id, 500)).returnedPoints).toBe(50);
		expect((await giveBack(use2.id, 1000)).returnedPoints).toBe(100);
		await drained(broker);

		const month = save1.dealDate.slice(0, 7).replace("-", "");
		const settlement = await broker.call<SettlementView, object>("billing.get", {
			merchantId: "t1",
			billingMonth: month
		});
		// save1 350 × 0.8 = 280; use1 150 × 0.95 = 142.5 → 142; save2 700 × 1.2 = 840;
		// use2 200 × 0.9 = 180.
		expect(settlement.lines.map(l => [l.kind, l.dealId, l.points, l.amount])).toEqual([
			["save", save1.id, 350, 280],
			["use", use1.id, 150, 142],
			["save", save2.id, 700, 840],
			["use", use2.id, 200, 180]
		]);
		// Redeemed 350 → 322, fee 28; issued 1050 → 1120; net 322 − 1120 = −798; two fees, no one rate.
		expect(settlement).toMatchObject({
			status: "provisional",
			usedPoints: 350,
			dealCount: 2,
			feeRate: null,
			redeemed: { points: 350, fee: 28, amount: 322 },
			issued: { points: 1050, amount: 1120 },
			net: -798
		});
		expectSumsOfLines(settlement);
	});
});
