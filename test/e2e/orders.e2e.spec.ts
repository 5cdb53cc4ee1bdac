/**
 * Food orders over real HTTP, as `npm start` runs them: payment, points, delivery, cancellation; and
 * a slow payment provider, whose circuit breaker answers at once while the accounts stay exact.
 */
import { eventually } from "../helpers/broker";
import { System, TOKENS } from "../helpers/system";

jest.setTimeout(90_000);

interface Order {
	id: string;
	status: string;
	points: number;
	payment: { id?: string; status: string };
	delivery: { status: string };
}

describe("food orders over HTTP", () => {
	let system: System;
	const api = <T = any>(
		method: string,
		urlPath: string,
		body?: unknown,
		headers?: Record<string, string | null>
	) => system.call<T>(method, `/api${urlPath}`, body, headers);
	const balance = async (memberId: string) =>
		(await api("GET", `/points/${memberId}`)).body.balance as number;
	const order = (memberId: string, qty: unknown, unitPrice: unknown) =>
		api<Order & { type?: string }>("POST", "/orders", {
			memberId,
			productId: "breakfast-set",
			qty,
			unitPrice
		});

	beforeAll(async () => {
		system = await System.start();
		for (const memberId of ["f001", "f002", "f003"])
			expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);
		await eventually(async () => expect(await balance("f003")).toBe(0));
	});
	afterAll(() => system.stop());

	it("2 × 5000 is paid, delivered and earns 1000 points (10%), named in the ledger", async () => {
		const res = await order("f001", 2, 5000);
		expect(res.status).toBe(201);
		expect(res.body).toMatchObject({
			memberId: "f001",
			qty: 2,
			unitPrice: 5000,
			totalPrice: 10_000,
			status: "paid",
			pointRate: 0.1,
			points: 1000,
			payment: { status: "approved" },
			delivery: { status: "started" }
		});
		await eventually(async () => expect(await balance("f001")).toBe(1000));
		const history = (await api("GET", "/points/f001/history")).body;
		expect(history.rows[0]).toMatchObject({
			cause: `order:${res.body.id}`,
			kind: "earn",
			amount: 1000,
			sourceType: "order",
			sourceId: res.body.id
		});
		expect((await api("GET", `/orders/${res.body.id}`)).body).toEqual(res.body);
		await eventually(async () =>
			expect((await api("GET", `/deliveries/${res.body.id}`)).body).toMatchObject({
				status: "started"
			})
		);
	});

	it("5 × 3000 earns 3000 points (20% from 5 items), shown in my-points", async () => {
		const res = await order("f002", "5", " 3000");
		expect(res.body).toMatchObject({
			status: "paid",
			totalPrice: 15_000,
			pointRate: 0.2,
			points: 3000
		});
		await eventually(async () => expect(await balance("f002")).toBe(3000));
		await eventually(async () =>
			expect((await api("GET", "/my-points/f002")).body).toMatchObject({
				memberId: "f002",
				total: 3000,
				rows: [{ orderId: res.body.id, qty: 5, rate: 0.2, points: 3000, status: "accrued" }]
			})
		);
	});

	it("a declined payment (over PAYMENT_LIMIT) earns nothing", async () => {
		const res = await order("f003", 2, 600_000);
		expect(res.status).toBe(201);
		expect(res.body).toMatchObject({
			status: "payment_failed",
			reason: "PAYMENT_DECLINED",
			points: 0,
			payment: { status: "declined" },
			delivery: { status: "not_started" }
		});
		const payments = (await api("GET", `/payments?orderId=${res.body.id}`)).body;
		expect(payments.rows).toMatchObject([{ status: "declined", amount: 1_200_000 }]);
		await new Promise(resolve => setTimeout(resolve, 300));
		expect(await balance("f003")).toBe(0);
		expect((await api("GET", "/my-points/f003")).body).toEqual({
			memberId: "f003",
			total: 0,
			rows: [],
			orderCount: 0,
			page: 1,
			pageSize: 20,
			adjustments: [],
			adjustedTotal: 0
		});
		expect((await api("POST", `/orders/${res.body.id}/cancel`)).body).toMatchObject({
			code: 409,
			type: "ORDER_NOT_CANCELLABLE"
		});
	});

	it("cancelling revokes the points exactly once, and cancels payment and delivery", async () => {
		const paid = (await order("f001", 1, 4000)).body;
		await eventually(async () => expect(await balance("f001")).toBe(1400));
		const cancelled = await api("POST", `/orders/${paid.id}/cancel`);
		expect(cancelled.status).toBe(200);
		expect(cancelled.body).toMatchObject({ status: "cancelled", cancelledAt: expect.any(String) });
		const again = await api("POST", `/orders/${paid.id}/cancel`);
		expect(again.status).toBe(409);
		expect(again.body).toMatchObject({ type: "ORDER_ALREADY_CANCELLED" });
		await eventually(async () =>
			expect((await api("GET", `/orders/${paid.id}`)).body).toMatchObject({
				payment: { id: paid.payment.id, status: "cancelled" },
				delivery: { status: "cancelled" }
			})
		);
		expect(await balance("f001")).toBe(1000);
		const history = (await api("GET", "/points/f001/history")).body;
		expect(
			history.rows.filter((e: { cause: string }) => e.cause === `order-cancel:${paid.id}`)
		).toMatchObject([{ kind: "revoke", amount: -400 }]);
		expect((await api("GET", `/payments/${paid.payment.id}`)).body).toMatchObject({
			status: "cancelled"
		});
		expect((await api("GET", `/deliveries/${paid.id}`)).body).toMatchObject({
			status: "cancelled"
		});
		const mine = (await api("GET", "/my-points/f001")).body;
		expect(mine.total).toBe(1000);
		expect(mine.rows.map((r: { status: string }) => r.status)).toEqual(["revoked", "accrued"]);
	});

	it("lists a member's orders, paged; merchants may not see orders; bad input is refused and changes nothing", async () => {
		const page = (await api("GET", "/orders?memberId=f001&pageSize=1")).body;
		expect(page).toMatchObject({ total: 2, page: 1, pageSize: 1 });
		expect(page.rows).toHaveLength(1);
		expect(
			(await api("GET", "/orders", undefined, { authorization: `Bearer ${TOKENS.merchant20}` }))
				.status
		).toBe(403);
		expect((await api("GET", "/my-points/f001", undefined, { authorization: null })).status).toBe(
			401
		);
		const before = (await api("GET", "/orders?memberId=f001")).body.total;
		for (const [qty, unitPrice, status, type] of [
			[0, 100, 422, "VALIDATION_ERROR"],
			[-1, 100, 422, "VALIDATION_ERROR"],
			["two", 100, 422, "VALIDATION_ERROR"],
			[1, 0.5, 422, "VALIDATION_ERROR"],
			[1, { $gt: 0 }, 422, "VALIDATION_ERROR"],
			[1000, 10_000_000_000, 422, "ORDER_TOO_LARGE"]
		] as const) {
			const res = await order("f001", qty, unitPrice);
			expect({ qty, unitPrice, status: res.status, type: res.body.type }).toEqual({
				qty,
				unitPrice,
				status,
				type
			});
		}
		expect((await order("zz99", 1, 100)).status).toBe(404);
		expect(
			(
				await api("POST", "/orders", {
					memberId: "f001",
					productId: "x",
					qty: 1,
					unitPrice: 1,
					points: 999
				})
			).status
		).toBe(422);
		expect(
			(await api("POST", "/payments", { orderId: "x", memberId: "f001", amount: 1 })).status
		).toBe(404);
		expect((await api("GET", "/orders?memberId=f001")).body.total).toBe(before);
		expect(await balance("f001")).toBe(1000);
	});
});

describe("orders against a slow payment provider", () => {
	const DELAY_MS = 4000;
	let system: System;
	const api = <T = any>(method: string, urlPath: string, body?: unknown) =>
		system.call<T>(method, `/api${urlPath}`, body);
	const order = () =>
		api("POST", "/orders", {
			memberId: "s001",
			productId: "breakfast-set",
			qty: 2,
			unitPrice: 5000
		});

	beforeAll(async () => {
		system = await System.start({ PAYMENT_DELAY_MS: String(DELAY_MS), CALL_TIMEOUT_MS: "300" });
		expect((await api("POST", "/members", { memberId: "s001", name: "hungry" })).status).toBe(201);
	});
	afterAll(() => system.stop());

	it("times out, then the breaker opens and answers 503 with Retry-After without waiting; no unpaid points, no paid unrecorded order", async () => {
		// 12 orders wait for their payment past the timeout: enough failures to open the breaker.
		const first = await Promise.all(Array.from({ length: 12 }, order));
		for (const res of first) {
			expect(res.status).toBe(503);
			expect(res.body).toMatchObject({ type: "PAYMENTS_UNAVAILABLE", data: { reason: "TIMEOUT" } });
			expect(Number(res.headers.get("retry-after"))).toBeGreaterThan(0);
		}

		const startedAt = Date.now();
		const shed = await order();
		const waited = Date.now() - startedAt;
		expect(shed.status).toBe(503);
		expect(shed.body).toMatchObject({
			type: "PAYMENTS_UNAVAILABLE",
			data: { reason: "UNAVAILABLE", retryAfter: 5 }
		});
		expect(shed.headers.get("retry-after")).toBe("5");
		// Never left hanging: nothing waited for the provider (behaviour, not a speed claim).
		expect(waited).toBeLessThan(DELAY_MS);

		// Every order was recorded as failed; once the provider's late answers are in, no payment
		// stands approved and no points exist.
		const orders = (await api("GET", "/orders?memberId=s001&pageSize=100")).body;
		expect(orders.total).toBe(13);
		expect(new Set(orders.rows.map((o: Order) => `${o.status}/${o.points}`))).toEqual(
			new Set(["payment_failed/0"])
		);
		await new Promise(resolve => setTimeout(resolve, DELAY_MS + 500));
		await eventually(async () => {
			const payments = (await api("GET", "/payments?memberId=s001&pageSize=100")).body;
			expect(payments.total).toBe(13);
			expect(new Set(payments.rows.map((p: { status: string }) => p.status))).toEqual(
				new Set(["voided"])
			);
		});
		expect((await api("GET", "/points/s001")).body.balance).toBe(0);
		expect((await api("GET", "/points/s001/history")).body.total).toBe(0);
		expect((await api("GET", "/my-points/s001")).body.total).toBe(0);
	});

	it("keeps no 503 under an Idempotency-Key: the order was undone, so a retry is a new order, not a replay", async () => {
		const before = (await api("GET", "/orders?memberId=s001")).body.total as number;
		const retry = () =>
			system.call(
				"POST",
				"/api/orders",
				{ memberId: "s001", productId: "breakfast-set", qty: 2, unitPrice: 5000 },
				{ "idempotency-key": "till-3:sale-88" }
			);
		for (let attempt = 1; attempt <= 2; attempt++) {
			const res = await retry();
			expect(res.status).toBe(503);
			expect(res.body).toMatchObject({ type: "PAYMENTS_UNAVAILABLE" });
			expect(res.headers.has("idempotent-replayed")).toBe(false);
			expect((await api("GET", "/orders?memberId=s001")).body.total).toBe(before + attempt);
		}
		const latest = (await api("GET", "/orders?memberId=s001&pageSize=2")).body.rows as Order[];
		expect(latest.map(o => o.status)).toEqual(["payment_failed", "payment_failed"]);
	});
});
