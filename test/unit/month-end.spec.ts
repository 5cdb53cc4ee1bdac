import type { ServiceBroker, ServiceSchema } from "moleculer";
import BillingService, { previousMonth } from "../../services/billing.service";
import { createTestBroker, eventually } from "../helpers/broker";

type Send = (channel: string, payload: object) => Promise<void>;
interface Closed {
	billingMonth: string;
	created: number;
	settlements: { merchantId: string; usedPoints: number; billingAmount: number }[];
}

/** The billing service on a clock the test moves, checking for a month end every 20 ms. */
describe("billing month-end job (controlled clock)", () => {
	let broker: ServiceBroker;
	let clock = new Date("2026-10-20T12:00:00.000Z");
	let send: Send;
	const used = (dealId: string, merchantId: string, point: number, dealDate: string) =>
		send("deal.used", { dealId, memberId: "0001", merchantId, point, dealDate, type: "use" });
	const settlement = (merchantId: string, billingMonth: string) => broker.call("billing.get", { merchantId, billingMonth });

	beforeAll(async () => {
		broker = createTestBroker([
			{
				name: "billing",
				// Moleculer types a mixin as the plain schema; this one is typed with its own settings.
				mixins: [BillingService as unknown as Partial<ServiceSchema>],
				settings: { monthEnd: { graceMs: 10 * 60_000, checkEveryMs: 20 } },
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

	it("settles every merchant with activity once the month has ended and the grace passed, and only those", async () => {
		await used("m1", "20", 100, "2026-10-02T09:00:00.000Z");
		await used("m2", "20", 400, "2026-10-31T23:59:59.000Z");
		await used("m3", "21", 1000, "2026-10-15T09:00:00.000Z");
		await used("m4", "22", 700, "2026-09-30T23:59:59.000Z");
		await eventually(async () => expect(await broker.call("billing.view", { dealId: "m4" })).toBeTruthy());

		// Month end, but still inside the grace period: nothing yet.
		clock = new Date("2026-11-01T00:05:00.000Z");
		await new Promise(resolve => setTimeout(resolve, 200));
		await expect(settlement("20", "202610")).rejects.toMatchObject({ code: 404 });

		clock = new Date("2026-11-01T00:10:00.000Z");
		await eventually(async () => expect(await settlement("20", "202610")).toMatchObject({ usedPoints: 500, billingAmount: 490 }));
		await eventually(async () => expect(await settlement("21", "202610")).toMatchObject({ usedPoints: 1000, billingAmount: 980, settledAt: "2026-11-01T00:10:00.000Z" }));
		// Merchant 22 was active in September only.
		await expect(settlement("22", "202610")).rejects.toMatchObject({ code: 404 });
	});

	it("changes nothing when run again, even after a late event for the closed month", async () => {
		const before = await settlement("20", "202610");
		await used("m5", "20", 300, "2026-10-30T10:00:00.000Z");
		await eventually(async () => expect(await broker.call("billing.view", { dealId: "m5" })).toBeTruthy());
		clock = new Date("2026-11-20T00:00:00.000Z");

		const rerun = await broker.call<Closed, object>("billing.closeMonth", { billingMonth: "202610" });
		expect(rerun.created).toBe(0);
		expect(rerun.settlements.map(s => s.merchantId)).toEqual(["20", "21"]);
		expect(await settlement("20", "202610")).toEqual(before);
	});

	it("closes the last month by default, and an empty month settles nobody", async () => {
		clock = new Date("2026-12-01T00:11:00.000Z");
		await new Promise(resolve => setTimeout(resolve, 200));
		expect(await broker.call<Closed, object>("billing.closeMonth", {})).toEqual({ billingMonth: "202611", settlements: [], created: 0 });
	});
});
