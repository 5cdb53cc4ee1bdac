/**
 * Rates are basis points applied in integer arithmetic: a table of rates and amounts with their
 * exact points and fees (the float rates got 100 × 0.29 = 28, and 1000 × (1 − 0.07) = 929), then the
 * deals and billing services earning and settling with such rates.
 */
import type { ServiceBroker } from "moleculer";
import { applyRate, earnedPoints, parseRate, settlementAmounts } from "../../lib/rates";
import { eventually } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

describe("rates", () => {
	it.each([
		["0.01", 100],
		["0.29", 2900],
		["0.57", 5700],
		["0.0175", 175],
		["0.5000", 5000],
		["1", 10_000],
		["0", 0],
		[" 0.02 ", 200]
	])("reads %p as %p basis points", (text, bp) => expect(parseRate("EARN_RATE", text)).toBe(bp));

	it.each(["0.00001", "1.5", "-0.01", "2%", "1e-2", "", "abc"])("refuses %p", text => {
		expect(() => parseRate("SETTLEMENT_FEE", text)).toThrow(/^SETTLEMENT_FEE must be/);
	});

	it.each([
		// rate, amount, points earned
		["0.01", 100_000, 1000],
		["0.01", 99, 0],
		["0.29", 100, 29],
		["0.29", 200, 58],
		["0.57", 100, 57],
		["0.57", 700, 399],
		["0.57", 10_000, 5700],
		["0.57", 10_000_000_000, 5_700_000_000],
		["0.0175", 12_345, 216],
		["1", 9_007_199_254_740_991, 9_007_199_254_740_991]
	])("earns at %p on %p exactly %p points", (rate, amount, points) => {
		expect(earnedPoints(amount, parseRate("EARN_RATE", rate))).toBe(points);
	});

	it.each([
		// fee rate, points used, fee, billing amount
		["0.02", 500, 10, 490],
		["0.07", 1000, 70, 930],
		["0.33", 1000, 330, 670],
		["0.33", 700, 231, 469],
		["0.56", 50, 28, 22],
		["0.56", 10_000_000_000, 5_600_000_000, 4_400_000_000],
		["0.02", 101, 3, 98],
		["0.02", -101, -3, -98],
		["0", 777, 0, 777]
	])(
		"settles at fee %p on %p points: fee %p, billing amount %p",
		(rate, points, fee, billingAmount) => {
			expect(settlementAmounts(points, parseRate("SETTLEMENT_FEE", rate))).toEqual({
				fee,
				billingAmount
			});
		}
	);

	it("refuses an amount that is not a safe integer rather than round it", () => {
		expect(() => applyRate(0.5, 100)).toThrow(RangeError);
		expect(() => applyRate(2 ** 53, 100)).toThrow(RangeError);
	});
});

describe("services with EARN_RATE=0.29 and SETTLEMENT_FEE=0.07", () => {
	// The test's clock: the use is made, and settled, in May 2026.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;

	beforeAll(async () => {
		// The configuration is read once, at its first import: import it afresh with these rates.
		process.env.EARN_RATE = "0.29";
		process.env.SETTLEMENT_FEE = "0.07";
		jest.resetModules();
		const { createTestBroker } = await import("../helpers/broker");
		const services = await Promise.all(
			["members", "merchants", "points", "deals", "billing"].map(
				async name => (await import(`../../services/${name}.service`)).default
			)
		);
		broker = createTestBroker(services);
		await broker.start();
		await broker.call("members.join", { memberId: "r001", name: "Rate" });
	});
	afterAll(() => broker.stop());

	it("earns 29 points on 100 and bills 930 of 1000 used points", async () => {
		expect(
			await broker.call("deals.create", {
				memberId: "r001",
				merchantId: "20",
				dealAmount: 100,
				type: "save"
			})
		).toMatchObject({
			point: 29
		});
		expect(
			await broker.call("deals.create", {
				memberId: "r001",
				merchantId: "20",
				dealAmount: 400_000,
				type: "save"
			})
		).toMatchObject({
			point: 116_000
		});
		await eventually(async () =>
			expect(await broker.call("points.get", { memberId: "r001" })).toMatchObject({
				balance: 116_029
			})
		);
		const used = await broker.call<{ id: string }, object>("deals.create", {
			memberId: "r001",
			merchantId: "20",
			dealAmount: 5000,
			type: "use",
			point: 1000
		});
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: used.id })).toMatchObject({ point: 1000 })
		);
		expect(
			await broker.call("billing.settle", { merchantId: "20", billingMonth: "202605" })
		).toMatchObject({
			usedPoints: 1000,
			feeRate: 0.07,
			fee: 70,
			billingAmount: 930
		});
	});
});
