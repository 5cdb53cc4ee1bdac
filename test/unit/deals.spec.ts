import type { Service, ServiceBroker } from "moleculer";
import DealsService, { type DealView } from "../../services/deals.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import PointsService from "../../services/points.service";
import { createTestBroker, eventually } from "../helpers/broker";

describe("deals service", () => {
	let broker: ServiceBroker;
	const deal = (params: object) =>
		broker.call<DealView, object>("deals.create", { merchantId: "20", ...params });
	const balance = async (memberId: string) =>
		(await broker.call<{ balance: number }, object>("points.get", { memberId })).balance;

	beforeAll(async () => {
		broker = createTestBroker([MembersService, MerchantsService, PointsService, DealsService], {
			CALL_TIMEOUT_MS: "300"
		});
		await broker.start();
		for (const memberId of ["0001", "0002", "0003"])
			await broker.call("members.join", { memberId, name: memberId });
	});
	afterAll(() => broker.stop());

	it("earns 1% of a save deal, applied by event", async () => {
		const saved = await deal({ memberId: "0001", dealAmount: 100000, type: "save" });
		expect(saved).toMatchObject({
			type: "save",
			point: 1000,
			status: "success",
			dealAmount: 100000
		});
		await eventually(async () => expect(await balance("0001")).toBe(1000));
	});

	it("uses points with a confirmed debit and fails a use beyond the balance, changing nothing", async () => {
		const used = await deal({ memberId: "0001", dealAmount: "10000", type: "use", point: " 100" });
		expect(used).toMatchObject({ status: "success", point: 100 });
		expect(await balance("0001")).toBe(900);
		const failed = await deal({ memberId: "0001", dealAmount: 10000, type: "use", point: 10000 });
		expect(failed).toMatchObject({ status: "fail", reason: "INSUFFICIENT_POINTS" });
		expect(await balance("0001")).toBe(900);
		expect(await broker.call("deals.get", { id: failed.id })).toMatchObject({ status: "fail" });
	});

	it("cancels a use once, restoring its points; a second cancel is 409", async () => {
		const used = await deal({ memberId: "0001", dealAmount: 1000, type: "use", point: 400 });
		expect(await balance("0001")).toBe(500);
		expect(await broker.call("deals.cancel", { id: used.id })).toMatchObject({
			status: "cancelled"
		});
		await expect(broker.call("deals.cancel", { id: used.id })).rejects.toMatchObject({
			code: 409,
			type: "DEAL_ALREADY_CANCELLED"
		});
		await eventually(async () => expect(await balance("0001")).toBe(900));
	});

	it("refuses to cancel a failed deal", async () => {
		const failed = await deal({ memberId: "0002", dealAmount: 1000, type: "use", point: 5 });
		await expect(broker.call("deals.cancel", { id: failed.id })).rejects.toMatchObject({
			code: 409,
			type: "DEAL_NOT_CANCELLABLE"
		});
	});

	it("lists deals by member and merchant, paged, newest first", async () => {
		const page = await broker.call<{ rows: DealView[]; total: number }, object>("deals.list", {
			memberId: "0001",
			pageSize: 2
		});
		expect(page.total).toBeGreaterThanOrEqual(4);
		expect(page.rows).toHaveLength(2);
		expect(page.rows[0].id > page.rows[1].id).toBe(true);
		const none = await broker.call<{ total: number }, object>("deals.list", { merchantId: "99" });
		expect(none.total).toBe(0);
	});

	it("refuses unknown members, withdrawn members and bad input", async () => {
		await expect(deal({ memberId: "9999", dealAmount: 100, type: "save" })).rejects.toMatchObject({
			code: 404,
			type: "MEMBER_NOT_FOUND"
		});
		await broker.call("members.join", { memberId: "0900", name: "Gone" });
		await broker.call("members.withdraw", { memberId: "0900" });
		await expect(deal({ memberId: "0900", dealAmount: 100, type: "save" })).rejects.toMatchObject({
			code: 409,
			type: "MEMBER_WITHDRAWN"
		});
		for (const bad of [
			{ memberId: "0001", type: "save" },
			{ memberId: "0001", dealAmount: -5, type: "save" },
			{ memberId: "0001", dealAmount: "abc", type: "save" },
			{ memberId: "0001", dealAmount: 1.5, type: "save" },
			// Not numbers, though JavaScript would make numbers of them.
			{ memberId: "0001", dealAmount: true, type: "save" },
			{ memberId: "0001", dealAmount: [100], type: "save" },
			{ memberId: "0001", dealAmount: "", type: "save" },
			{ memberId: "0001", dealAmount: "1e3", type: "save" },
			{ memberId: "0001", dealAmount: null, type: "save" },
			{ memberId: "0001", dealAmount: 100, type: "steal" },
			{ memberId: "0001", dealAmount: 100, type: "use" },
			{ memberId: "0001", dealAmount: 100, type: "use", point: 0 }
		])
			await expect(deal(bad)).rejects.toMatchObject({ code: 422 });
		expect(await balance("0001")).toBe(900);
	});

	it("answers a fast 503 when points cannot be reached, and the unconfirmed use never takes points", async () => {
		await deal({ memberId: "0003", dealAmount: 50000, type: "save" });
		await eventually(async () => expect(await balance("0003")).toBe(500));
		await broker.destroyService(broker.getLocalService("points") as Service);
		await expect(
			deal({ memberId: "0003", dealAmount: 100, type: "use", point: 100 })
		).rejects.toMatchObject({
			code: 503,
			type: "POINTS_UNAVAILABLE",
			data: { retryAfter: expect.any(Number) }
		});
		const [failed] = (
			await broker.call<{ rows: DealView[] }, object>("deals.list", {
				memberId: "0003",
				pageSize: 1
			})
		).rows;
		expect(failed).toMatchObject({ type: "use", status: "fail", reason: "POINTS_UNAVAILABLE" });
		broker.createService(PointsService);
		await broker.waitForServices("points");
		// The void reaches points once it is back; a late debit for that deal would be refused.
		await eventually(async () => {
			const history = await broker.call<{ rows: { cause: string }[] }, object>("points.history", {
				memberId: "0003"
			});
			expect(history.rows.map(r => r.cause)).toContain(`deal-cancel:${failed.id}`);
		});
		const late = await broker.call<{ applied: boolean; reason: string }, object>("points.debit", {
			memberId: "0003",
			sourceType: "deal",
			sourceId: failed.id,
			amount: 100
		});
		expect(late).toMatchObject({ applied: false, reason: "CANCELLED" });
		expect(await balance("0003")).toBe(500);
	});
});
