import type { ServiceBroker, ServiceSchema } from "moleculer";
import { EVENT_ID } from "../../lib/channels/redelivery";
import { previousMonth } from "../../lib/months";
import { B3 } from "../../lib/ops/tracing";
import BillingService, { type SettlementView } from "../../services/billing.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";

type Send = (channel: string, payload: object) => Promise<void>;
interface Closed {
	closedThrough: string | null;
	months: { billingMonth: string; created: number; settlements: SettlementView[] }[];
}

/** The billing service on a clock the test moves, checking for a month end every 20 ms. */
describe("settlements across month ends (controlled clock)", () => {
	let broker: ServiceBroker;
	let clock = new Date("2026-10-20T12:00:00.000Z");
	let send: Send;
	const deal = (dealId: string, merchantId: string, point: number, dealDate: string) => ({
		dealId,
		memberId: "0001",
		merchantId,
		point,
		dealDate,
		type: "use"
	});
	const used = async (dealId: string, merchantId: string, point: number, dealDate: string) => {
		await send("deal.used", deal(dealId, merchantId, point, dealDate));
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId })).toMatchObject({ point })
		);
	};
	const cancelled = async (dealId: string, merchantId: string, point: number, dealDate: string) => {
		await send("deal.cancelled", deal(dealId, merchantId, point, dealDate));
		await eventually(() =>
			expect(broker.call("billing.view", { dealId })).rejects.toMatchObject({ code: 404 })
		);
	};
	const settlement = (merchantId: string, billingMonth: string) =>
		broker.call<SettlementView, object>("billing.get", { merchantId, billingMonth });
	const lines = (s: SettlementView) =>
		s.lines.map(
			l => `${l.kind} ${l.dealId} ${l.points}${l.month ? ` ${l.month} ${l.reason}` : ""}`
		);

	beforeAll(async () => {
		broker = createTestBroker([
			{
				name: "billing",
				// Moleculer types a mixin as the plain schema; this one is typed with its own settings.
				mixins: [BillingService as unknown as Partial<ServiceSchema>],
				settings: { monthEnd: { graceMs: 10 * 60_000, firstCheckMs: 20, checkEveryMs: 20 } },
				methods: { now: () => clock }
			}
		]);
		await broker.start();
		send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
	});
	afterAll(() => broker.stop());

	it("names the month that just ended, across a year's turn", () => {
		expect(previousMonth(new Date("2026-11-01T00:00:00.000Z"))).toBe("202610");
		expect(previousMonth(new Date("2027-01-15T08:00:00.000Z"))).toBe("202612");
	});

	it("settles an open month provisionally, recomputed on every read, with its lines", async () => {
		await used("m1", "20", 100, "2026-10-02T09:00:00.000Z");
		await used("m2", "20", 400, "2026-10-20T10:00:00.000Z");
		await used("m3", "21", 1000, "2026-10-15T09:00:00.000Z");
		const first = await broker.call<SettlementView, object>("billing.settle", {
			merchantId: "20",
			billingMonth: "202610"
		});
		expect(first).toMatchObject({
			id: "20:202610",
			status: "provisional",
			usedPoints: 500,
			dealCount: 2,
			adjustmentPoints: 0,
			fee: 10,
			billingAmount: 490,
			computedAt: clock.toISOString()
		});
		expect(lines(first)).toEqual(["use m1 100", "use m2 400"]);

		await used("m4", "20", 50, "2026-10-31T23:59:59.000Z");
		expect(await settlement("20", "202610")).toMatchObject({
			status: "provisional",
			usedPoints: 550,
			dealCount: 3,
			billingAmount: 539
		});
		// Not yet closed: a cancellation simply leaves the month.
		await cancelled("m2", "20", 400, "2026-10-20T10:00:00.000Z");
		expect(lines(await settlement("20", "202610"))).toEqual(["use m1 100", "use m4 50"]);
	});

	it("becomes final once the month's end and grace have passed, with the events that arrived in the grace", async () => {
		await used("n1", "20", 70, "2026-11-01T00:00:30.000Z");
		// Month end, inside the grace period: still provisional, and a late event still counts.
		clock = new Date("2026-11-01T00:05:00.000Z");
		await used("m5", "20", 200, "2026-10-31T23:59:00.000Z");
		await new Promise(resolve => setTimeout(resolve, 200));
		expect(await settlement("20", "202610")).toMatchObject({
			status: "provisional",
			usedPoints: 350
		});

		clock = new Date("2026-11-01T00:10:00.000Z");
		const final = await eventually(async () => {
			const s = await settlement("20", "202610");
			expect(s.status).toBe("final");
			return s;
		});
		expect(final).toMatchObject({
			usedPoints: 350,
			dealCount: 3,
			billingAmount: 343,
			settledAt: "2026-11-01T00:10:00.000Z"
		});
		expect(lines(final)).toEqual(["use m1 100", "use m5 200", "use m4 50"]);
		expect(await settlement("21", "202610")).toMatchObject({
			status: "final",
			usedPoints: 1000,
			billingAmount: 980
		});
		// November has its own use only.
		expect(lines(await settlement("20", "202611"))).toEqual(["use n1 70"]);
	});

	it("carries a late cancellation and a late use of a final month into the next open settlement, naming them", async () => {
		clock = new Date("2026-11-05T12:00:00.000Z");
		const final = await settlement("20", "202610");
		await cancelled("m1", "20", 100, "2026-10-02T09:00:00.000Z");
		await used("m6", "20", 300, "2026-10-15T09:00:00.000Z");
		expect(await settlement("20", "202610")).toEqual(final);
		expect(
			await broker.call("billing.settle", { merchantId: "20", billingMonth: "202610" })
		).toEqual(final);

		const november = await settlement("20", "202611");
		expect(lines(november)).toEqual([
			"adjustment m1 -100 202610 CANCELLED_AFTER_SETTLEMENT",
			"adjustment m6 300 202610 LATE_USE",
			"use n1 70"
		]);
		expect(november).toMatchObject({
			status: "provisional",
			usedPoints: 70,
			dealCount: 1,
			adjustmentPoints: 200,
			fee: 6,
			billingAmount: 264
		});

		// November closes with them; December starts clean, and October is as it was.
		clock = new Date("2026-12-01T00:10:00.000Z");
		await eventually(async () =>
			expect(await settlement("20", "202611")).toMatchObject({
				status: "final",
				adjustmentPoints: 200,
				billingAmount: 264
			})
		);
		expect(lines(await settlement("20", "202612"))).toEqual([]);
		expect(await settlement("20", "202610")).toEqual(final);
	});

	it("closes every missed month in order after two month-ends without a check, and a rerun changes nothing", async () => {
		await used("d1", "22", 500, "2026-12-10T09:00:00.000Z");
		await used("j1", "22", 800, "2027-01-10T09:00:00.000Z");
		clock = new Date("2027-02-01T00:11:00.000Z");
		await eventually(async () =>
			expect(await settlement("22", "202701")).toMatchObject({ status: "final", usedPoints: 800 })
		);
		expect(await settlement("22", "202612")).toMatchObject({
			status: "final",
			usedPoints: 500,
			billingAmount: 490
		});

		const rerun = await broker.call<Closed, object>("billing.closeMonth", {
			billingMonth: "202701"
		});
		expect(rerun).toEqual({ closedThrough: "202701", months: [] });
		// A closed month asked for a merchant that had nothing in it: an empty final settlement.
		expect(
			await broker.call("billing.settle", { merchantId: "23", billingMonth: "202612" })
		).toMatchObject({
			status: "final",
			usedPoints: 0,
			billingAmount: 0,
			lines: []
		});
		await expect(settlement("24", "202612")).rejects.toMatchObject({
			code: 404,
			type: "SETTLEMENT_NOT_FOUND"
		});
	});

	describe("the first close stopped after its settlements, before it recorded its month", () => {
		let fresh: ServiceBroker;
		let freshClock = new Date("2030-04-01T10:00:00.000Z");
		beforeAll(async () => {
			fresh = createTestBroker([
				{
					name: "billing",
					mixins: [BillingService as unknown as Partial<ServiceSchema>],
					// No check of its own: the test closes the month.
					settings: {
						monthEnd: { graceMs: 10 * 60_000, firstCheckMs: 3_600_000, checkEveryMs: 3_600_000 }
					},
					methods: { now: () => freshClock }
				}
			]);
			await fresh.start();
		});
		afterAll(() => fresh.stop());

		it("closes that month at the next check, with the settlements made before the stop", async () => {
			const sendTo = (fresh as unknown as { sendToChannel: Send }).sendToChannel.bind(fresh);
			await sendTo("deal.used", deal("a1", "20", 182, "2030-04-01T09:00:00.000Z"));
			await eventually(async () =>
				expect(await fresh.call("billing.view", { dealId: "a1" })).toMatchObject({ point: 182 })
			);
			freshClock = new Date("2030-05-01T00:30:00.000Z");
			// The first half of a close, as a node that died before recording the month leaves it.
			const billing = fresh.getLocalService("billing") as unknown as {
				compute(month: string, carry: boolean, status: string): Promise<Map<string, object>>;
				finalize(made: object): Promise<unknown>;
			};
			for (const made of (await billing.compute("203004", true, "final")).values())
				await billing.finalize(made);

			const closed = await fresh.call<Closed, object>("billing.closeMonth", {});
			expect(closed.closedThrough).toBe("203004");
			expect(
				await fresh.call("billing.get", { merchantId: "20", billingMonth: "203004" })
			).toMatchObject({
				status: "final",
				usedPoints: 182,
				lines: [expect.objectContaining({ dealId: "a1" })]
			});
		});
	});
});

/** Traced (logs with trace ids), a month's close as a request made it. */
describe("a final settlement's event, traced", () => {
	let broker: ServiceBroker;
	const clock = new Date("2030-06-01T00:30:00.000Z");
	/** The headers of each `settlement.finalized` message, by settlement. */
	const received = new Map<string, Record<string, string>>();

	beforeAll(async () => {
		broker = createTestBroker(
			[
				{
					name: "billing",
					mixins: [BillingService as unknown as Partial<ServiceSchema>],
					// No check of its own: the test's request closes the month.
					settings: {
						monthEnd: { graceMs: 10 * 60_000, firstCheckMs: 3_600_000, checkEveryMs: 3_600_000 }
					},
					methods: { now: () => clock }
				},
				{
					name: "settlement-watcher",
					channels: {
						"settlement.finalized": {
							group: "settlement-watcher",
							async handler(payload: { settlementId: string }, raw: unknown) {
								received.set(payload.settlementId, adapter().parseMessageHeaders(raw) ?? {});
							}
						}
					}
				}
			],
			{ LOG_FORMAT: "json" }
		);
		const adapter = () =>
			(
				broker as unknown as {
					channelAdapter: { parseMessageHeaders(raw: unknown): Record<string, string> | null };
				}
			).channelAdapter;
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("carries the trace of the request that closed the month and its event id, as every outbox event does", async () => {
		const send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
		await send("deal.used", {
			dealId: "t1",
			memberId: "0001",
			merchantId: "30",
			point: 90,
			dealDate: "2030-05-10T09:00:00.000Z",
			type: "use"
		});
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: "t1" })).toMatchObject({ point: 90 })
		);
		// The view is readable before its handler is done; a month closes once billing has caught up.
		await drained(broker);
		await broker.call("billing.closeMonth", {}, { requestID: "close-203005" });
		// The file's earlier closes left their own events in the channel: this close's is told by its id.
		const headers = await eventually(() => {
			expect(received.has("30:203005")).toBe(true);
			return received.get("30:203005") as Record<string, string>;
		});
		expect(headers).toEqual(
			expect.objectContaining({
				[B3.traceId]: "close-203005",
				[B3.sampled]: "0",
				[EVENT_ID]: expect.stringMatching(/^[0-9A-Z]{26}$/)
			})
		);
		expect(headers[B3.spanId]).toEqual(expect.any(String));
	});
});
