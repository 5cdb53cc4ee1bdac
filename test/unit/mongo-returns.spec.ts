/**
 * Partial returns racing on two instances of the deals and points services that share one MongoDB:
 * the in-process locks serialise nothing between them, so only the store's conditional writes keep
 * the returns of one deal from exceeding it.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ServiceBroker } from "moleculer";
import DealsService, { type DealView } from "../../services/deals.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";

interface Entry {
	cause: string;
	kind: string;
	amount: number;
}

describe("partial returns racing on two instances sharing MongoDB", () => {
	let a: ServiceBroker;
	let b: ServiceBroker;
	const balance = async (memberId: string) =>
		(await a.call<{ balance: number }, object>("points.get", { memberId })).balance;
	const returnsOf = async (memberId: string, dealId: string) =>
		(
			await a.call<{ rows: Entry[] }, object>("points.history", { memberId, pageSize: 100 })
		).rows.filter(e => e.cause.startsWith(`deal-return:${dealId}:`));
	const instance = () =>
		createTestBroker([MembersService, MerchantsService, PointsService, DealsService], {
			DATA_DIR: fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-instance-"))
		});
	/** Returns `amounts` of the deal all at once, alternating between the instances; the accepted amounts and the refusals' codes. */
	const race = async (dealId: string, amounts: number[]) => {
		const results = await Promise.allSettled(
			amounts.map((amount, i) =>
				(i % 2 ? a : b).call<DealView, object>("deals.cancel", { id: dealId, amount })
			)
		);
		const accepted = amounts.filter((_, i) => results[i].status === "fulfilled");
		const refused = results.flatMap(r =>
			r.status === "rejected" ? [(r.reason as { type: string }).type] : []
		);
		return { accepted, refused };
	};

	beforeAll(async () => {
		[a, b] = [instance(), instance()];
		await Promise.all([a.start(), b.start()]);
		await a.call("members.join", { memberId: "m001", name: "m001" });
	});
	afterAll(() => Promise.all([a.stop(), b.stop()]));
	afterEach(async () => {
		await Promise.all([drained(a), drained(b)]);
		expect((await a.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([]);
	});

	it("never returns more of a save than the deal, and revokes each accepted return once", async () => {
		const saved = await a.call<DealView, object>("deals.create", {
			memberId: "m001",
			merchantId: "20",
			dealAmount: 1000,
			type: "save"
		});
		await eventually(async () => expect(await balance("m001")).toBe(10));
		const { accepted, refused } = await race(saved.id, Array(16).fill(100));
		expect(accepted).toHaveLength(10);
		expect(refused).toEqual(
			Array(6).fill(expect.stringMatching(/^(RETURN_EXCEEDS_REMAINDER|DEAL_ALREADY_CANCELLED)$/))
		);
		const deal = await b.call<DealView, object>("deals.get", { id: saved.id });
		expect(deal).toMatchObject({ status: "cancelled", returnedAmount: 1000, returnedPoints: 10 });
		expect(deal.returns?.map(r => r.n)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
		await Promise.all([drained(a), drained(b)]);
		expect(await balance("m001")).toBe(0);
		expect((await returnsOf("m001", saved.id)).map(e => e.amount)).toEqual(Array(10).fill(-1));
	});

	it("gives back, of a use returned in racing parts of different sizes, exactly the points of the parts accepted", async () => {
		await a.call("deals.create", {
			memberId: "m001",
			merchantId: "20",
			dealAmount: 100000,
			type: "save"
		});
		await eventually(async () => expect(await balance("m001")).toBe(1000));
		const used = await b.call<DealView, object>("deals.create", {
			memberId: "m001",
			merchantId: "20",
			dealAmount: 900,
			type: "use",
			point: 900
		});
		expect(await balance("m001")).toBe(100);
		const { accepted } = await race(used.id, [400, 300, 200, 500, 100, 300, 250, 150]);
		const deal = await a.call<DealView, object>("deals.get", { id: used.id });
		const returnedAmount = accepted.reduce((sum, x) => sum + x, 0);
		expect(returnedAmount).toBeLessThanOrEqual(900);
		expect(deal).toMatchObject({
			returnedAmount,
			status: returnedAmount === 900 ? "cancelled" : "partially_cancelled"
		});
		expect(deal.returns?.map(r => r.amount).sort()).toEqual([...accepted].sort());
		await Promise.all([drained(a), drained(b)]);
		expect(await balance("m001")).toBe(100 + (deal.returnedPoints as number));
		expect((await returnsOf("m001", used.id)).reduce((sum, e) => sum + e.amount, 0)).toBe(
			deal.returnedPoints
		);
	});
});
