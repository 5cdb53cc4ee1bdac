import type { ServiceBroker } from "moleculer";
import type { Role } from "../../config";
import DashboardService from "../../services/dashboard.service";
import MembersService from "../../services/members.service";
import MyPointsService from "../../services/my-points.service";
import PointsService, {
	type AccountView,
	type AdjustmentView
} from "../../services/points.service";
import { createTestBroker, drained, eventually, withSettings } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";

interface Entry {
	cause: string;
	kind: string;
	amount: number;
	balanceAfter: number;
	reason?: string;
	by?: string;
	sourceType: string;
	sourceId: string;
}

describe("staff adjustments", () => {
	// The test's clock: "this month" below is May 2026.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	const alice: Role = { kind: "staff", name: "alice" };
	const adjust = (memberId: string, params: object, user: Role | null = alice) =>
		broker.call<AdjustmentView, object>(
			"points.adjust",
			{ memberId, ...params },
			{ meta: { user } }
		);
	const history = async (memberId: string) =>
		(
			await broker.call<{ rows: Entry[]; total: number }, object>("points.history", {
				memberId,
				pageSize: 100
			})
		).rows;
	const account = (memberId: string) =>
		broker.call<AccountView, object>("points.get", { memberId });
	const join = async (memberId: string) => {
		await broker.call("members.join", { memberId, name: `Member ${memberId}` });
		await eventually(() => account(memberId));
	};

	beforeAll(async () => {
		broker = createTestBroker([
			MembersService,
			withSettings(PointsService, { pointsValidMonths: 12 }),
			MyPointsService,
			DashboardService
		]);
		await broker.start();
	});
	afterAll(() => broker.stop());
	afterEach(() =>
		eventually(async () =>
			expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([])
		)
	);

	it("adds and takes points with a ledger entry naming the reason and who made it", async () => {
		await join("a001");
		const added = await adjust("a001", {
			amount: 500,
			reason: "  Goodwill: the terminal was down  "
		});
		expect(added).toMatchObject({
			memberId: "a001",
			amount: 500,
			reason: "Goodwill: the terminal was down",
			by: "alice",
			balance: 500
		});
		expect(added.adjustmentId).toMatch(/^[0-9A-Z]{26}$/);
		const taken = await adjust(
			"a001",
			{ amount: -200, reason: "Earned twice by mistake" },
			{ kind: "staff" }
		);
		expect(taken).toMatchObject({ amount: -200, by: "staff", balance: 300 });
		// From inside the cluster (the REPL), without a gateway user.
		expect(await adjust("a001", { amount: 1, reason: "Rounding" }, null)).toMatchObject({
			by: "operator",
			balance: 301
		});

		await eventually(async () => expect(await history("a001")).toHaveLength(3));
		expect(
			(await history("a001")).map(
				({ cause, kind, amount, balanceAfter, reason, by, sourceType, sourceId }) => ({
					cause,
					kind,
					amount,
					balanceAfter,
					reason,
					by,
					sourceType,
					sourceId
				})
			)
		).toEqual([
			expect.objectContaining({ kind: "adjust", amount: 1, balanceAfter: 301, by: "operator" }),
			{
				cause: `adjustment:${taken.adjustmentId}`,
				kind: "adjust",
				amount: -200,
				balanceAfter: 300,
				reason: "Earned twice by mistake",
				by: "staff",
				sourceType: "adjustment",
				sourceId: taken.adjustmentId
			},
			{
				cause: `adjustment:${added.adjustmentId}`,
				kind: "adjust",
				amount: 500,
				balanceAfter: 500,
				reason: "Goodwill: the terminal was down",
				by: "alice",
				sourceType: "adjustment",
				sourceId: added.adjustmentId
			}
		]);
		// A positive adjustment is an earning of this month; the negative one took from it.
		const current = "202605";
		const valid = await account("a001");
		expect(valid.expiring).toHaveLength(3);
		expect(valid.expiring.every(e => e.points === 0)).toBe(true);
		expect(valid.expiring[0].month).toBe(current);
	});

	it("never takes the balance below 0: 409 INSUFFICIENT_POINTS, nothing changed", async () => {
		await join("a002");
		await adjust("a002", { amount: 100, reason: "Welcome gift" });
		await expect(adjust("a002", { amount: -101, reason: "Too much" })).rejects.toMatchObject({
			code: 409,
			type: "INSUFFICIENT_POINTS",
			data: { balance: 100, amount: -101 }
		});
		expect(await adjust("a002", { amount: -100, reason: "Gift withdrawn" })).toMatchObject({
			balance: 0
		});
		await expect(adjust("a002", { amount: -1, reason: "Below zero" })).rejects.toMatchObject({
			code: 409,
			type: "INSUFFICIENT_POINTS"
		});
		expect((await history("a002")).map(e => e.amount)).toEqual([-100, 100]);
	});

	it.each([
		["no amount", { reason: "x" }],
		["a zero amount", { amount: 0, reason: "x" }],
		["a fraction", { amount: 1.5, reason: "x" }],
		["not a number", { amount: "lots", reason: "x" }],
		["a boolean", { amount: true, reason: "x" }],
		["a number in an array", { amount: [10], reason: "x" }],
		["an empty string", { amount: "", reason: "x" }],
		["more than a billion", { amount: 1_000_000_001, reason: "x" }],
		["less than minus a billion", { amount: -1_000_000_001, reason: "x" }],
		["no reason", { amount: 10 }],
		["an empty reason", { amount: 10, reason: "" }],
		["a blank reason", { amount: 10, reason: "   " }],
		["a reason over 500 characters", { amount: 10, reason: "x".repeat(501) }],
		["a reason that is not text", { amount: 10, reason: { $gt: "" } }],
		["an unknown field", { amount: 10, reason: "x", by: "mallory" }]
	])("refuses %s with 422 VALIDATION_ERROR, nothing changed", async (_, params) => {
		await join("a003").catch(() => undefined);
		await expect(adjust("a003", params)).rejects.toMatchObject({
			code: 422,
			type: "VALIDATION_ERROR"
		});
		expect(await history("a003")).toEqual([]);
		expect((await account("a003")).balance).toBe(0);
	});

	it("accepts a reason of exactly 500 characters", async () => {
		expect(await adjust("a003", { amount: 5, reason: "y".repeat(500) })).toMatchObject({
			balance: 5
		});
	});

	it("refuses an unknown member (404) and a withdrawn one (409), nothing changed", async () => {
		await expect(adjust("nobody", { amount: 10, reason: "x" })).rejects.toMatchObject({
			code: 404,
			type: "MEMBER_NOT_FOUND"
		});
		await expect(account("nobody")).rejects.toMatchObject({ code: 404 });
		await join("a004");
		await adjust("a004", { amount: 40, reason: "Before leaving" });
		await broker.call("members.withdraw", { memberId: "a004" });
		await expect(adjust("a004", { amount: 10, reason: "After leaving" })).rejects.toMatchObject({
			code: 409,
			type: "MEMBER_WITHDRAWN"
		});
		await eventually(async () =>
			expect((await history("a004")).map(e => e.kind)).toEqual(["expire", "adjust"])
		);
		expect(await account("a004")).toMatchObject({ status: "closed", balance: 0 });
	});

	it("makes each request its own adjustment, also when they race", async () => {
		await join("a005");
		await adjust("a005", { amount: 100, reason: "Start" });
		const results = await Promise.allSettled(
			Array.from({ length: 20 }, () => adjust("a005", { amount: -10, reason: "Race" }))
		);
		expect(results.filter(r => r.status === "fulfilled")).toHaveLength(10);
		expect(
			results
				.filter(r => r.status === "rejected")
				.map(r => (r as PromiseRejectedResult).reason.type)
		).toEqual(Array(10).fill("INSUFFICIENT_POINTS"));
		expect((await account("a005")).balance).toBe(0);
		expect(new Set((await history("a005")).map(e => e.cause)).size).toBe(11);
	});

	it("shows adjustments in the audit, the my-points view and the dashboard", async () => {
		await join("a006");
		const added = await adjust("a006", { amount: 300, reason: "Complaint 17" });
		await adjust(
			"a006",
			{ amount: -120, reason: "Duplicate earning" },
			{ kind: "staff", name: "bob" }
		);
		await drained(broker);

		const audit = await broker.call<{
			adjustments: { count: number; added: number; taken: number };
		}>("points.audit");
		// a001: +500 -200 +1; a002: +100 -100; a003: +5; a004: +40; a005: +100 and ten -10; a006: +300 -120.
		expect(audit.adjustments).toEqual({ count: 20, added: 1046, taken: 520 });

		const mine = await broker.call<
			{
				adjustments: { adjustmentId: string; amount: number; reason: string; by: string }[];
				adjustedTotal: number;
			},
			object
		>("my-points.get", { memberId: "a006" });
		expect(mine.adjustments.map(({ amount, reason, by }) => ({ amount, reason, by }))).toEqual([
			{ amount: -120, reason: "Duplicate earning", by: "bob" },
			{ amount: 300, reason: "Complaint 17", by: "alice" }
		]);
		expect(mine.adjustments[1].adjustmentId).toBe(added.adjustmentId);
		expect(mine.adjustedTotal).toBe(180);

		const dashboard = await broker.call<
			{
				member: { balance: number; adjusted: number };
				latest: { kind: string; point: number; reason?: string; by?: string }[];
				expiring: unknown[];
			},
			object
		>("dashboard.member", { memberId: "a006" });
		expect(dashboard.member).toMatchObject({ balance: 180, adjusted: 180 });
		expect(
			dashboard.latest.map(({ kind, point, reason, by }) => ({ kind, point, reason, by }))
		).toEqual(
			expect.arrayContaining([
				{ kind: "adjustment", point: -120, reason: "Duplicate earning", by: "bob" },
				{ kind: "adjustment", point: 300, reason: "Complaint 17", by: "alice" }
			])
		);
		expect(dashboard.latest).toHaveLength(2);
	});

	it("adjusts once for one request run twice (Idempotency-Key: its gateway died before answering)", async () => {
		await join("a007");
		const request = { meta: { user: alice, requestId: "01JREQUESTADJUST0000000001" } };
		const [first, again] = await Promise.all(
			[1, 2].map(() =>
				broker.call<AdjustmentView, object>(
					"points.adjust",
					{ memberId: "a007", amount: 70, reason: "Once" },
					request
				)
			)
		);
		expect(again).toMatchObject({
			adjustmentId: first.adjustmentId,
			amount: 70,
			reason: "Once",
			by: "alice"
		});
		expect((await history("a007")).map(e => [e.cause, e.amount])).toEqual([
			["adjustment:01JREQUESTADJUST0000000001", 70]
		]);
		expect((await account("a007")).balance).toBe(70);
	});
});
