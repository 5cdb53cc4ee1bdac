/**
 * The gauges a scrape reads (lib/ops/metrics.ts): a consumer group's backlog and its oldest
 * message's age, the circuit breakers by action, and the months past their grace that are not final;
 * and which actions Moleculer's own per-action series measure.
 */
import type { ServiceBroker, ServiceSchema } from "moleculer";
import { collect, SERIES } from "../../lib/ops/metrics";
import BillingService from "../../services/billing.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";

type Send = (channel: string, payload: object) => Promise<void>;

/** The values of a series now, by their labels (the node's own labels left out). */
async function scrape(broker: ServiceBroker, name: string): Promise<Record<string, number>> {
	await collect(broker);
	const values = broker.metrics.getMetric(name)?.snapshot() as {
		labels: Record<string, string>;
		value: number;
	}[];
	return Object.fromEntries(
		values.map(({ labels, value }) => [Object.values(labels).join(" "), value])
	);
}

describe("the gauges a scrape reads", () => {
	let broker: ServiceBroker;
	afterEach(() => broker.stop());

	it("give a consumer group's backlog and its oldest message's age, until it catches up", async () => {
		let failing = true;
		broker = createTestBroker([
			{
				name: "slow",
				channels: {
					"thing.happened": {
						group: "slow",
						async handler() {
							if (failing) throw new Error("store unavailable");
						}
					}
				}
			}
		]);
		await broker.start();
		const send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
		await send("thing.happened", { id: "a" });
		await send("thing.happened", { id: "b" });
		expect(await scrape(broker, SERIES.channelBacklog)).toEqual({ "thing.happened slow": 2 });
		const [age] = Object.values(await scrape(broker, SERIES.channelOldest));
		expect(age).toBeGreaterThanOrEqual(0);

		failing = false;
		await drained(broker, 15_000);
		expect(await scrape(broker, SERIES.channelBacklog)).toEqual({ "thing.happened slow": 0 });
		expect(await scrape(broker, SERIES.channelOldest)).toEqual({ "thing.happened slow": 0 });
	});

	it("hold a breaker open while any endpoint of its action is open", async () => {
		broker = createTestBroker([]);
		await broker.start();
		const breaker = async (event: string, nodeID: string) => {
			broker.broadcastLocal(`$circuit-breaker.${event}`, { nodeID, action: "points.debit" });
			return (await scrape(broker, SERIES.breakerOpen))["points.debit"];
		};
		expect(await scrape(broker, SERIES.breakerOpen)).toEqual({
			"points.debit": 0,
			"payments.pay": 0
		});
		expect(await breaker("opened", "points-1")).toBe(1);
		expect(await breaker("opened", "points-2")).toBe(1);
		expect(await breaker("closed", "points-1")).toBe(1);
		expect(await breaker("closed", "points-2")).toBe(0);
	});

	it("name each month past its grace that is not final, and none once it is", async () => {
		let clock = new Date("2026-10-20T12:00:00.000Z");
		broker = createTestBroker([
			{
				name: "billing",
				mixins: [BillingService as unknown as Partial<ServiceSchema>],
				// The month-end job stays out of the way: the test closes months itself.
				settings: {
					monthEnd: { graceMs: 10 * 60_000, firstCheckMs: 3_600_000, checkEveryMs: 3_600_000 }
				},
				methods: { now: () => clock }
			}
		]);
		await broker.start();
		const send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
		await send("deal.used", {
			dealId: "m1",
			memberId: "0001",
			merchantId: "20",
			point: 100,
			dealDate: "2026-10-02T09:00:00.000Z",
			type: "use"
		});
		await eventually(async () =>
			expect(await broker.call("billing.view", { dealId: "m1" })).toMatchObject({ point: 100 })
		);
		const open = () => scrape(broker, SERIES.settlementsOpen);
		expect(await open()).toEqual({});
		clock = new Date("2026-11-01T00:09:00.000Z");
		expect(await open()).toEqual({});
		clock = new Date("2026-11-01T00:11:00.000Z");
		expect(await open()).toEqual({ "202610": 1 });
		await broker.call("billing.closeMonth", { billingMonth: "202610" });
		expect(await open()).toEqual({});
		clock = new Date("2027-01-01T01:00:00.000Z");
		expect(await open()).toEqual({ "202611": 1, "202612": 1 });
	});
});

describe("Moleculer's per-action series", () => {
	let broker: ServiceBroker;
	afterEach(() => broker.stop());

	it("leave out the gateway's own actions, which the HTTP series measure, and keep every other", async () => {
		broker = createTestBroker([
			{ name: "api", actions: { me: () => ({ role: "staff" }) } },
			{ name: "points", actions: { get: () => ({ balance: 0 }) } }
		]);
		await broker.start();
		await broker.call("api.me");
		await broker.call("points.get");
		const measured = broker.metrics.getMetric("moleculer.request.total")?.snapshot() ?? [];
		expect(measured.map(value => (value.labels as { action: string }).action)).toEqual([
			"points.get"
		]);
	});
});
