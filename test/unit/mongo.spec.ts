/**
 * The same ledger guarantees on MongoDB (moleculer-db-adapter-mongoose). Needs a server: runs when
 * MONGO_URI is set (each run uses its own database), and is reported as skipped otherwise.
 */
import type { ServiceBroker } from "moleculer";
import DealsService from "../../services/deals.service";
import MembersService from "../../services/members.service";
import PointsService from "../../services/points.service";
import BillingService from "../../services/billing.service";
import { createTestBroker, eventually } from "../helpers/broker";

const mongoUri = process.env.MONGO_URI;
const describeWithMongo = mongoUri ? describe : describe.skip;

describeWithMongo(mongoUri ? "on MongoDB" : "on MongoDB (skipped: MONGO_URI is not set)", () => {
	let broker: ServiceBroker;
	const balance = async (memberId: string) => (await broker.call<{ balance: number }, object>("points.get", { memberId })).balance;

	beforeAll(async () => {
		broker = createTestBroker([MembersService, PointsService, DealsService, BillingService]);
		await broker.start();
	});
	afterAll(async () => {
		const mongoose = (await import("mongoose")).default;
		await mongoose.connection.db?.dropDatabase();
		await broker.stop();
	});

	it("runs the seed's scenario with exact balances and settlement", async () => {
		const suffix = Date.now().toString(36);
		const [a, b] = [`a${suffix}`, `b${suffix}`];
		for (const memberId of [a, b]) await broker.call("members.join", { memberId, name: memberId });
		const deal = (memberId: string, type: string, dealAmount: number, point?: number) =>
			broker.call<{ status: string }, object>("deals.create", { memberId, merchantId: `m${suffix}`, dealAmount, type, ...(point ? { point } : {}) });
		await deal(a, "save", 100000);
		await eventually(async () => expect(await balance(a)).toBe(1000));
		expect(await deal(a, "use", 10000, 100)).toMatchObject({ status: "success" });
		expect(await deal(a, "use", 10000, 10000)).toMatchObject({ status: "fail" });
		await deal(b, "save", 100000);
		await eventually(async () => expect(await balance(b)).toBe(1000));
		await deal(b, "use", 10000, 200);
		await deal(b, "use", 10000, 200);
		expect(await balance(a)).toBe(900);
		expect(await balance(b)).toBe(600);
		const month = new Date().toISOString().slice(0, 7).replace("-", "");
		await eventually(async () => expect(await broker.call("billing.settle", { merchantId: `m${suffix}`, billingMonth: month })).toMatchObject({ billingAmount: 490 }));
	});

	it("lets exactly the affordable share of racing uses succeed", async () => {
		const memberId = `r${Date.now().toString(36)}`;
		await broker.call("members.join", { memberId, name: "race" });
		await broker.call("deals.create", { memberId, merchantId: "20", dealAmount: 100000, type: "save" });
		await eventually(async () => expect(await balance(memberId)).toBe(1000));
		const results = await Promise.all(
			Array.from({ length: 30 }, () => broker.call<{ status: string }, object>("deals.create", { memberId, merchantId: "20", dealAmount: 1, type: "use", point: 100 }))
		);
		expect(results.filter(r => r.status === "success")).toHaveLength(10);
		expect(await balance(memberId)).toBe(0);
		expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([]);
	});
});
