/**
 * Idempotency keys on the store the project runs: a key is taken once, answered once, refused for
 * another request, released, taken over after its lease, forgotten after its retention; and the
 * actions that create things, run again under the same request id, answer what they made instead of
 * making it twice.
 */
import { createHash } from "node:crypto";
import type { ServiceBroker } from "moleculer";
import DealsService, { type DealView } from "../../services/deals.service";
import IdempotencyService, {
	type Begun,
	type StoredResponse
} from "../../services/idempotency.service";
import MembersService, { type MemberView } from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import OrdersService, { type OrderView } from "../../services/orders.service";
import PaymentsService from "../../services/payments.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained, eventually, withSettings } from "../helpers/broker";

const hash = (text: string) => createHash("sha256").update(text).digest("base64url");
const alice = hash("alice-token");
const bob = hash("bob-token");
const request = hash("POST /api/deals {}");
const answer: StoredResponse = {
	status: 201,
	headers: { "Content-Type": "application/json; charset=utf-8", Location: "/api/deals/1" },
	body: Buffer.from('{"id":"1"}').toString("base64")
};

describe("the idempotency service", () => {
	let broker: ServiceBroker;
	const begin = (key: string, fingerprint = request, scope = alice) =>
		broker.call<Begun, object>("idempotency.begin", { scope, key, fingerprint });
	const running = async (key: string, fingerprint = request, scope = alice) => {
		const begun = await begin(key, fingerprint, scope);
		if (begun.outcome !== "run")
			throw new Error(`'${key}' was not taken: ${JSON.stringify(begun)}`);
		return begun.requestId;
	};

	beforeAll(async () => {
		// Long enough that no stall of a loaded machine ends a lease a test counts on; the test of a
		// lease running out waits for it.
		broker = createTestBroker([withSettings(IdempotencyService, { leaseMs: 2_000 })]);
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("takes a key once, refuses a retry while it runs, then replays the answer that was stored first", async () => {
		const requestId = await running("k-1");
		expect(requestId).toMatch(/^[0-9A-Z]{26}$/);
		await expect(begin("k-1")).rejects.toMatchObject({
			code: 409,
			type: "REQUEST_IN_PROGRESS",
			data: { key: "k-1", retryAfter: 2 }
		});
		expect(
			await broker.call("idempotency.complete", {
				scope: alice,
				key: "k-1",
				requestId,
				response: answer
			})
		).toBe(true);
		expect(
			await broker.call("idempotency.complete", {
				scope: alice,
				key: "k-1",
				requestId,
				response: { ...answer, status: 200 }
			})
		).toBe(false);
		expect(await begin("k-1")).toEqual({ outcome: "replay", response: answer });
		expect(await begin("k-1")).toEqual({ outcome: "replay", response: answer });
	});

	it("refuses the key for another request (422), while it runs and once answered", async () => {
		const requestId = await running("k-2");
		await expect(begin("k-2", hash("POST /api/deals {other}"))).rejects.toMatchObject({
			code: 422,
			type: "IDEMPOTENCY_KEY_REUSED"
		});
		await broker.call("idempotency.complete", {
			scope: alice,
			key: "k-2",
			requestId,
			response: answer
		});
		await expect(begin("k-2", hash("POST /api/orders {}"))).rejects.toMatchObject({
			code: 422,
			type: "IDEMPOTENCY_KEY_REUSED"
		});
	});

	it("keeps each token's keys apart", async () => {
		const first = await running("shared");
		const second = await running("shared", hash("POST /api/orders {}"), bob);
		expect(second).not.toBe(first);
	});

	it("lets exactly one of 20 concurrent first requests run", async () => {
		const results = await Promise.allSettled(Array.from({ length: 20 }, () => begin("k-race")));
		expect(results.filter(r => r.status === "fulfilled")).toHaveLength(1);
		for (const r of results)
			if (r.status === "rejected")
				expect(r.reason).toMatchObject({ code: 409, type: "REQUEST_IN_PROGRESS" });
	});

	it("runs a released request again at once: under the same request id, or a new one when it was undone", async () => {
		const requestId = await running("k-3");
		expect(
			await broker.call("idempotency.release", {
				scope: alice,
				key: "k-3",
				requestId,
				renew: false
			})
		).toBe(true);
		expect(await running("k-3")).toBe(requestId);
		expect(
			await broker.call("idempotency.release", { scope: alice, key: "k-3", requestId, renew: true })
		).toBe(true);
		const renewed = await running("k-3");
		expect(renewed).not.toBe(requestId);
		// The run it replaced can no longer answer for the key.
		expect(
			await broker.call("idempotency.complete", {
				scope: alice,
				key: "k-3",
				requestId,
				response: answer
			})
		).toBe(false);
	});

	it("lets one retry take over a lease that ran out (its gateway died), under the same request id", async () => {
		const requestId = await running("k-4");
		// The lease is the subject: wait until a retry is no longer refused.
		const taken = await eventually(
			async () =>
				Promise.allSettled(Array.from({ length: 10 }, () => begin("k-4"))).then(results => {
					const won = results.flatMap(r => (r.status === "fulfilled" ? [r.value] : []));
					if (!won.length) throw new Error("still leased");
					return won;
				}),
			5000
		);
		expect(taken).toEqual([{ outcome: "run", requestId }]);
	});

	it("refuses keys and answers that are not well formed", async () => {
		for (const key of ["", "x".repeat(256), "line\nbreak", "caf\u00e9"])
			await expect(begin(key)).rejects.toMatchObject({ code: 422, type: "VALIDATION_ERROR" });
		await expect(begin("k-5", "not-a-hash")).rejects.toMatchObject({ code: 422 });
		const requestId = await running("k-5");
		await expect(
			broker.call("idempotency.complete", {
				scope: alice,
				key: "k-5",
				requestId,
				response: { ...answer, status: 99 }
			})
		).rejects.toMatchObject({ code: 422 });
		await expect(
			broker.call("idempotency.complete", {
				scope: alice,
				key: "k-5",
				requestId,
				response: { ...answer, extra: 1 }
			})
		).rejects.toMatchObject({ code: 422 });
		await expect(begin("k-5")).rejects.toMatchObject({ type: "REQUEST_IN_PROGRESS" });
		expect(await running("x".repeat(255))).toMatch(/^[0-9A-Z]{26}$/);
	});
});

describe("idempotency keys past their retention", () => {
	let broker: ServiceBroker;
	const begin = (key: string, fingerprint = request) =>
		broker.call<Begun, object>("idempotency.begin", { scope: alice, key, fingerprint });

	beforeAll(async () => {
		// A retention of a second stands for 24 hours.
		broker = createTestBroker([withSettings(IdempotencyService, { retentionHours: 1 / 3600 })]);
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("forgets an expired key, whether swept or not yet, and sweeps only the expired ones", async () => {
		const first = await begin("old");
		if (first.outcome !== "run") throw new Error("not taken");
		await broker.call("idempotency.complete", {
			scope: alice,
			key: "old",
			requestId: first.requestId,
			response: answer
		});
		// Expired but not swept: taken again as new, by another request.
		await eventually(
			async () =>
				expect(await begin("old", hash("another request"))).toMatchObject({ outcome: "run" }),
			5000
		);
		await begin("gone");
		let swept = 0;
		await eventually(async () => {
			swept += await broker.call<number>("idempotency.sweep");
			expect(swept).toBe(2);
		}, 5000);
		await begin("kept");
		expect(await broker.call("idempotency.sweep")).toBe(0);
		expect(await begin("gone")).toMatchObject({ outcome: "run" });
	});
});

describe("write actions run again under their request id", () => {
	let broker: ServiceBroker;
	const as = (requestId: string) => ({ meta: { requestId } });
	const balance = async (memberId: string) =>
		(await broker.call<{ balance: number }, object>("points.get", { memberId })).balance;

	beforeAll(async () => {
		broker = createTestBroker([
			MembersService,
			MerchantsService,
			PointsService,
			DealsService,
			OrdersService,
			withSettings(PaymentsService, { delayMs: 0, limit: 1_000_000 })
		]);
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("joins a member once, with a generated number too", async () => {
		const runs = await Promise.all(
			Array.from({ length: 5 }, () =>
				broker.call<MemberView, object>(
					"members.join",
					{ name: "Once" },
					as("01JREQUESTMEMBER0000000001")
				)
			)
		);
		expect(new Set(runs.map(m => m.memberId)).size).toBe(1);
		expect(
			await broker.call<MemberView, object>(
				"members.join",
				{ name: "Once" },
				as("01JREQUESTMEMBER0000000001")
			)
		).toEqual(runs[0]);
		expect(runs[0]).not.toHaveProperty("requestId");
		// Another request id is another member.
		expect(
			(
				await broker.call<MemberView, object>(
					"members.join",
					{ name: "Once" },
					as("01JREQUESTMEMBER0000000002")
				)
			).memberId
		).not.toBe(runs[0].memberId);
	});

	it("makes a deal once and earns once, however often and concurrently it runs", async () => {
		await broker.call("members.join", { memberId: "r001", name: "r001" });
		const params = { memberId: "r001", merchantId: "20", dealAmount: 50_000, type: "save" };
		const runs = await Promise.all(
			Array.from({ length: 10 }, () =>
				broker.call<DealView, object>("deals.create", params, as("01JREQUESTDEAL000000000001"))
			)
		);
		expect(new Set(runs.map(d => d.id)).size).toBe(1);
		expect(runs[0]).not.toHaveProperty("requestId");
		await drained(broker);
		expect(await balance("r001")).toBe(500);
		expect(
			(await broker.call<{ total: number }, object>("deals.list", { memberId: "r001" })).total
		).toBe(1);

		const use = { memberId: "r001", merchantId: "20", dealAmount: 1000, type: "use", point: 200 };
		const uses = await Promise.all(
			Array.from({ length: 10 }, () =>
				broker.call<DealView, object>("deals.create", use, as("01JREQUESTDEAL000000000002"))
			)
		);
		expect(new Set(uses.map(d => d.id)).size).toBe(1);
		await eventually(async () =>
			expect(await broker.call("deals.get", { id: uses[0].id })).toMatchObject({
				status: "success"
			})
		);
		expect(await balance("r001")).toBe(300);
	});

	it("cancels a deal once: its own re-run answers the cancellation, another request is refused", async () => {
		const use = await broker.call<DealView, object>("deals.create", {
			memberId: "r001",
			merchantId: "20",
			dealAmount: 1000,
			type: "use",
			point: 100
		});
		const cancelled = await broker.call<DealView, object>(
			"deals.cancel",
			{ id: use.id },
			as("01JREQUESTCANCEL0000000001")
		);
		expect(cancelled).toMatchObject({ status: "cancelled" });
		expect(
			await broker.call("deals.cancel", { id: use.id }, as("01JREQUESTCANCEL0000000001"))
		).toEqual(cancelled);
		await expect(
			broker.call("deals.cancel", { id: use.id }, as("01JREQUESTCANCEL0000000002"))
		).rejects.toMatchObject({
			code: 409,
			type: "DEAL_ALREADY_CANCELLED"
		});
		await expect(broker.call("deals.cancel", { id: use.id })).rejects.toMatchObject({
			code: 409,
			type: "DEAL_ALREADY_CANCELLED"
		});
		await drained(broker);
		expect(await balance("r001")).toBe(300);
	});

	it("makes each partial return once: its own re-run answers it, another request returns more", async () => {
		await broker.call("members.join", { memberId: "r002", name: "r002" });
		const save = await broker.call<DealView, object>("deals.create", {
			memberId: "r002",
			merchantId: "20",
			dealAmount: 10000,
			type: "save"
		});
		const first = await broker.call<DealView, object>(
			"deals.cancel",
			{ id: save.id, amount: 3000 },
			as("01JREQUESTRETURN0000000001")
		);
		expect(first).toMatchObject({ status: "partially_cancelled", returnedAmount: 3000 });
		expect(
			await broker.call(
				"deals.cancel",
				{ id: save.id, amount: 3000 },
				as("01JREQUESTRETURN0000000001")
			)
		).toMatchObject({
			returnedAmount: 3000,
			returns: [{ n: 1 }]
		});
		const second = await broker.call<DealView, object>(
			"deals.cancel",
			{ id: save.id, amount: 2000 },
			as("01JREQUESTRETURN0000000002")
		);
		expect(second).toMatchObject({ returnedAmount: 5000, returns: [{ n: 1 }, { n: 2 }] });
		await drained(broker);
		expect(await balance("r002")).toBe(50);
	});

	it("orders once and cancels once", async () => {
		const params = { memberId: "r001", productId: "toast", qty: 1, unitPrice: 3000 };
		const runs = await Promise.all(
			Array.from({ length: 5 }, () =>
				broker.call<OrderView, object>("orders.create", params, as("01JREQUESTORDER00000000001"))
			)
		);
		expect(new Set(runs.map(o => o.id)).size).toBe(1);
		const payments = await broker.call<{ total: number }, object>("payments.list", {
			orderId: runs[0].id
		});
		expect(payments.total).toBe(1);
		await drained(broker);
		expect(await balance("r001")).toBe(600);
		// Two runs of one cancellation at once: the one whose write loses answers the winner's cancellation.
		const [cancelled, racing] = await Promise.all(
			[1, 2].map(() =>
				broker.call<OrderView, object>(
					"orders.cancel",
					{ id: runs[0].id },
					as("01JREQUESTORDER00000000002")
				)
			)
		);
		expect(racing).toMatchObject({ id: cancelled.id, status: "cancelled" });
		expect(
			await broker.call("orders.cancel", { id: runs[0].id }, as("01JREQUESTORDER00000000002"))
		).toMatchObject({
			id: cancelled.id,
			status: "cancelled"
		});
		await expect(broker.call("orders.cancel", { id: runs[0].id })).rejects.toMatchObject({
			code: 409,
			type: "ORDER_ALREADY_CANCELLED"
		});
		await drained(broker);
		expect(await balance("r001")).toBe(300);
	});
});
