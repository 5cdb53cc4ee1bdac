/**
 * Erasure, on each store: a member's name, phone and email leave the members store and every read
 * model; an active member is withdrawn with it (points forfeited as at withdrawal); deals and the
 * ledger stay under the member's id; a record says who erased and when. Idempotent.
 */
import type { ServiceBroker } from "moleculer";
import DashboardService from "../../services/dashboard.service";
import DealsService from "../../services/deals.service";
import MembersService, { type Member, type MemberView } from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import MyPointsService from "../../services/my-points.service";
import PointsService from "../../services/points.service";
import type { Collection } from "../../mixins/db.mixin";
import { createTestBroker, drained } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

type Send = (channel: string, payload: object) => Promise<void>;

describe("erasure", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	const staff = { meta: { user: { kind: "staff", name: "dpo" } } };
	const erase = (memberId: string) =>
		broker.call<MemberView, object>("members.erase", { memberId }, staff);
	const dashboardMember = async (memberId: string) =>
		(
			await broker.call<{ member: Record<string, unknown> }, object>("dashboard.member", {
				memberId
			})
		).member;
	/** Everything a store holds about the member, as text: no personal datum may be in it. */
	const stored = async (service: string, collection: string) =>
		JSON.stringify(
			await (
				broker.getLocalService(service) as unknown as Record<string, Collection<{ _id: string }>>
			)[collection].find({ query: {} })
		);

	beforeAll(async () => {
		broker = createTestBroker([
			MembersService,
			MerchantsService,
			PointsService,
			DealsService,
			DashboardService,
			MyPointsService
		]);
		await broker.start();
		await broker.call("members.join", {
			memberId: "e001",
			name: "Erin Park",
			phone: "010-9999-0001",
			email: "erin@example.com"
		});
		await broker.call("members.join", { memberId: "e002", name: "Kept Kim" });
		await broker.call("deals.create", {
			memberId: "e001",
			merchantId: "20",
			dealAmount: 50_000,
			type: "save"
		});
		await drained(broker);
	});
	afterAll(() => broker.stop());

	it("erases an active member: withdrawn, no personal data anywhere, its deals and ledger kept by id", async () => {
		const erased = await erase("e001");
		expect(erased).toEqual({
			memberId: "e001",
			name: null,
			phone: null,
			email: null,
			status: "erased",
			joinedAt: expect.any(String),
			withdrawnAt: expect.any(String),
			erasedAt: expect.any(String),
			erasedBy: "dpo"
		});
		expect(await broker.call("members.get", { memberId: "e001" })).toEqual(erased);
		await drained(broker);

		for (const datum of ["Erin", "010-9999-0001", "erin@example.com"]) {
			expect(await stored("members", "store")).not.toContain(datum);
			expect(await stored("dashboard", "members")).not.toContain(datum);
			expect(await stored("dashboard", "transactions")).not.toContain(datum);
		}
		expect(await stored("members", "store")).toContain("Kept Kim");
		expect(await dashboardMember("e001")).toMatchObject({ status: "erased", balance: 0 });
		expect((await dashboardMember("e001")).name).toBeUndefined();

		// Withdrawn as at withdrawal: the 500 points expire as an entry; the earning stays.
		const history = await broker.call<{ rows: { cause: string; amount: number }[] }, object>(
			"points.history",
			{ memberId: "e001" }
		);
		expect(history.rows.map(e => [e.cause.replace(/:\w+$/, ":<id>"), e.amount])).toEqual([
			["expiry:<id>", -500],
			["deal:<id>", 500]
		]);
		expect(
			(await broker.call<{ total: number }, object>("deals.list", { memberId: "e001" })).total
		).toBe(1);
		expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([]);
	});

	it("is idempotent, and a join redelivered later does not bring the name back", async () => {
		const first = await broker.call<MemberView, object>("members.get", { memberId: "e001" });
		expect(await erase("e001")).toEqual(first);
		const send = (broker as unknown as { sendToChannel: Send }).sendToChannel.bind(broker);
		await send("member.joined", { memberId: "e001", name: "Erin Park", joinedAt: first.joinedAt });
		await send("member.withdrawn", { memberId: "e001", withdrawnAt: first.withdrawnAt });
		await drained(broker);
		expect(await stored("dashboard", "members")).not.toContain("Erin");
		expect((await dashboardMember("e001")).status).toBe("erased");
	});

	it("erases a withdrawn member without withdrawing it twice, and refuses its deals as before", async () => {
		await broker.call("members.withdraw", { memberId: "e002" });
		await drained(broker);
		const erased = await erase("e002");
		expect(erased).toMatchObject({ status: "erased", name: null, erasedBy: "dpo" });
		await drained(broker);
		const expiries = (
			await broker.call<{ rows: { kind: string }[] }, object>("points.history", {
				memberId: "e002"
			})
		).rows.filter(e => e.kind === "expire");
		expect(expiries).toHaveLength(1);
		await expect(
			broker.call("deals.create", {
				memberId: "e002",
				merchantId: "20",
				dealAmount: 100,
				type: "save"
			})
		).rejects.toMatchObject({ code: 409, type: "MEMBER_WITHDRAWN" });
		const member = (await (
			broker.getLocalService("members") as unknown as { store: Collection<Member> }
		).store.findById("e002")) as Member;
		expect([member.name, member.phone, member.email]).toEqual([null, null, null]);
	});

	it("answers 404 for an unknown member, and 422 for a bad id, changing nothing", async () => {
		await expect(erase("nobody")).rejects.toMatchObject({ code: 404, type: "MEMBER_NOT_FOUND" });
		await expect(erase("a b")).rejects.toMatchObject({ code: 422, type: "VALIDATION_ERROR" });
		await expect(
			broker.call("members.erase", { memberId: "e002", reason: "x" })
		).rejects.toMatchObject({ code: 422 });
	});
});
