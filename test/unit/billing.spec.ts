import type { ServiceBroker } from "moleculer";
import { monthBounds } from "../../lib/months";
import BillingService from "../../services/billing.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

type Send = (channel: string, payload: object) => Promise<void>;

describe("billing service", () => {
	// The test's clock: the months of 2020 below are long closed; 2099 has not started.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let send: Send;
	const used = (dealId: string, point: number, dealDate: string, merchantId = "20") =>
		send("deal.used", { dealId, memberId: "0001", merchantId, point, dealDate, type: "use" });

	beforeAll(async () => {
		broker = createTestBroker([BillingService]);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
	});
	afterAll(() => broker.stop());

	it("knows the true bounds of a month, in UTC", () => {
		expect(monthBounds("202002")).toEqual(["2020-02-01T00:00:00.000Z", "2020-03-01T00:00:00.000Z"]);
		expect(monthBounds("202012")).toEqual(["2020-12-01T00:00:00.000Z", "2021-01-01T00:00:00.000Z"]);
		expect(monthBounds("000101")[0]).toBe("0001-01-01T00:00:00.000Z");
	});

	it("builds the view from use events, and drops a cancelled use even when the cancellation comes first", async () => {
		await used("v1", 100, "2020-07-10T10:00:00.000Z");
		await send("deal.cancelled", {
			dealId: "v2",
			memberId: "0001",
			merchantId: "20",
			point: 50,
			type: "use"
		});
		await used("v2", 50, "2020-07-11T10:00:00.000Z");
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: "v1" })).toMatchObject({
				dealId: "v1",
				point: 100,
				merchantId: "20"
			})
		);
		await drained(broker);
		await expect(broker.call("billing.view", { dealId: "v2" })).rejects.toMatchObject({
			code: 404,
			type: "BILLING_VIEW_NOT_FOUND"
		});
	});

	it("settles a closed month once: each use's points × 0.98 toward zero, only that month and merchant; a late use goes to the next month", async () => {
		await used("s1", 200, "2020-07-31T23:59:59.999Z");
		await used("s2", 200, "2020-07-01T00:00:00.000Z");
		await used("s3", 999, "2020-08-01T00:00:00.000Z");
		await used("s4", 999, "2020-06-30T23:59:59.999Z");
		await used("s5", 999, "2020-07-15T00:00:00.000Z", "21");
		await send("deal.cancelled", {
			dealId: "s5",
			memberId: "0001",
			merchantId: "21",
			point: 999,
			type: "use"
		});
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: "s4" })).toBeTruthy()
		);
		await eventually(() =>
			expect(broker.call("billing.view", { dealId: "s5" })).rejects.toMatchObject({ code: 404 })
		);
		// Long past its end and grace, and every event published until then handled: it closes now.
		const settlement = await broker.call("billing.settle", {
			merchantId: "20",
			billingMonth: "202007"
		});
		// v1 (100) + s1 (200) + s2 (200); v2 was cancelled.
		expect(settlement).toMatchObject({
			id: "20:202007",
			status: "final",
			usedPoints: 500,
			dealCount: 3,
			billingAmount: 490,
			fee: 10
		});
		await used("s6", 300, "2020-07-20T00:00:00.000Z");
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: "s6" })).toBeTruthy()
		);
		expect(
			await broker.call("billing.settle", { merchantId: "20", billingMonth: "202007" })
		).toEqual(settlement);
		expect(await broker.call("billing.get", { merchantId: "20", billingMonth: "202007" })).toEqual(
			settlement
		);
		expect(
			await broker.call("billing.settle", { merchantId: "21", billingMonth: "202007" })
		).toMatchObject({
			status: "final",
			usedPoints: 0,
			billingAmount: 0
		});
		const august = await broker.call<{ lines: object[] }, object>("billing.settle", {
			merchantId: "20",
			billingMonth: "202008"
		});
		expect(august).toMatchObject({
			status: "final",
			usedPoints: 999,
			adjustmentPoints: 300,
			billingAmount: 1273
		});
		expect(august.lines).toEqual([
			// Each line at its deal's fee, toward zero: 300 × 0.98 = 294, 999 × 0.98 = 979.02.
			{
				kind: "adjustment",
				type: "use",
				dealId: "s6",
				dealDate: "2020-07-20T00:00:00.000Z",
				points: 300,
				amount: 294,
				month: "202007",
				reason: "LATE_USE"
			},
			{
				kind: "use",
				type: "use",
				dealId: "s3",
				dealDate: "2020-08-01T00:00:00.000Z",
				points: 999,
				amount: 979
			}
		]);
	});

	it("settles concurrent requests into one settlement", async () => {
		await used("c1", 1000, "2020-09-05T00:00:00.000Z", "30");
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: "c1" })).toBeTruthy()
		);
		const results = await Promise.all(
			Array.from({ length: 5 }, () =>
				broker.call<{ settledAt: string; billingAmount: number }, object>("billing.settle", {
					merchantId: "30",
					billingMonth: "202009"
				})
			)
		);
		expect(new Set(results.map(r => r.settledAt)).size).toBe(1);
		expect(results[0].billingAmount).toBe(980);
	});

	it("refuses bad months, future months and unknown settlements", async () => {
		for (const billingMonth of [
			"2020-07",
			"202013",
			"202000",
			"20207",
			"abcdef",
			"000101",
			"190001",
			"199912",
			"210001"
		])
			await expect(
				broker.call("billing.settle", { merchantId: "20", billingMonth })
			).rejects.toMatchObject({ code: 422 });
		await expect(
			broker.call("billing.settle", { merchantId: "20", billingMonth: "209901" })
		).rejects.toMatchObject({
			code: 422,
			type: "BILLING_MONTH_NOT_STARTED"
		});
		await expect(
			broker.call("billing.get", { merchantId: "20", billingMonth: "201901" })
		).rejects.toMatchObject({
			code: 404,
			type: "SETTLEMENT_NOT_FOUND"
		});
	});
});
