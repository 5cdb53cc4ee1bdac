import type { ServiceBroker } from "moleculer";
import DeliveriesService from "../../services/deliveries.service";
import MembersService from "../../services/members.service";
import MyPointsService from "../../services/my-points.service";
import OrdersService, { pointsFor, type OrderView } from "../../services/orders.service";
import PaymentsService, { type PaymentView } from "../../services/payments.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained, eventually, withSettings } from "../helpers/broker";

interface Paged<T> {
	rows: T[];
	total: number;
}

/** The order flow in one broker; `payments` answers after `delayMs`, `orders` waits `timeoutMs`. */
function orderBroker(delayMs: number, timeoutMs: number): ServiceBroker {
	return createTestBroker([
		MembersService,
		PointsService,
		withSettings(OrdersService, { pendingTimeoutMs: timeoutMs }),
		withSettings(PaymentsService, { delayMs, limit: 1_000_000 }),
		DeliveriesService,
		MyPointsService
	]);
}

describe("orders, payments, deliveries and my-points", () => {
	let broker: ServiceBroker;
	const order = (params: object) =>
		broker.call<OrderView, object>("orders.create", {
			memberId: "0001",
			productId: "toast",
			...params
		});
	const balance = async (memberId = "0001") =>
		(await broker.call<{ balance: number }, object>("points.get", { memberId })).balance;

	beforeAll(async () => {
		broker = orderBroker(0, 2000);
		await broker.start();
		for (const memberId of ["0001", "0002"])
			await broker.call("members.join", { memberId, name: memberId });
	});
	afterAll(() => broker.stop());

	it("earns 10% below 5 items and 20% from 5, exactly", () => {
		expect(pointsFor(10_000, 2)).toBe(1000);
		expect(pointsFor(15_000, 5)).toBe(3000);
		expect(pointsFor(15_000, 4)).toBe(1500);
		expect(pointsFor(9, 1)).toBe(0);
	});

	it("pays an order, starts its delivery and accrues its points by event", async () => {
		const paid = await order({ qty: 2, unitPrice: 5000 });
		expect(paid).toMatchObject({
			status: "paid",
			totalPrice: 10_000,
			pointRate: 0.1,
			points: 1000,
			payment: { status: "approved" },
			delivery: { status: "started" }
		});
		await eventually(async () => expect(await balance()).toBe(1000));
		await eventually(async () =>
			expect(await broker.call("deliveries.get", { orderId: paid.id })).toMatchObject({
				status: "started",
				qty: 2
			})
		);
		expect(await broker.call("payments.get", { id: paid.payment.id })).toMatchObject({
			orderId: paid.id,
			amount: 10_000,
			status: "approved"
		});
		await eventually(async () =>
			expect(await broker.call("my-points.get", { memberId: "0001" })).toMatchObject({
				total: 1000,
				rows: [{ orderId: paid.id, qty: 2, rate: 0.1, points: 1000, status: "accrued" }]
			})
		);
	});

	it("records a declined payment as payment_failed, with no points and no delivery", async () => {
		const declined = await order({ memberId: "0002", qty: 2, unitPrice: 600_000 });
		expect(declined).toMatchObject({
			status: "payment_failed",
			reason: "PAYMENT_DECLINED",
			points: 0,
			payment: { status: "declined" },
			delivery: { status: "not_started" }
		});
		await expect(broker.call("orders.cancel", { id: declined.id })).rejects.toMatchObject({
			code: 409,
			type: "ORDER_NOT_CANCELLABLE"
		});
		await drained(broker);
		expect(await balance("0002")).toBe(0);
		await expect(broker.call("deliveries.get", { orderId: declined.id })).rejects.toMatchObject({
			code: 404
		});
	});

	it("cancels once: payment, delivery and points follow by events; two racing cancels give one 409", async () => {
		const paid = await order({ qty: 5, unitPrice: 3000 });
		await eventually(async () => expect(await balance()).toBe(4000));
		const results = await Promise.allSettled([
			broker.call("orders.cancel", { id: paid.id }),
			broker.call("orders.cancel", { id: paid.id })
		]);
		expect(results.map(r => r.status).sort()).toEqual(["fulfilled", "rejected"]);
		expect(
			(results.find(r => r.status === "rejected") as PromiseRejectedResult).reason
		).toMatchObject({
			code: 409,
			type: "ORDER_ALREADY_CANCELLED"
		});
		await eventually(async () => expect(await balance()).toBe(1000));
		await eventually(async () =>
			expect(await broker.call("orders.get", { id: paid.id })).toMatchObject({
				status: "cancelled",
				payment: { id: paid.payment.id, status: "cancelled" },
				delivery: { status: "cancelled" }
			})
		);
		expect(await broker.call("payments.get", { id: paid.payment.id })).toMatchObject({
			status: "cancelled"
		});
		expect(await broker.call("deliveries.get", { orderId: paid.id })).toMatchObject({
			status: "cancelled"
		});
		const mine = await broker.call<
			{ total: number; rows: { orderId: string; status: string }[] },
			object
		>("my-points.get", {
			memberId: "0001"
		});
		expect(mine.total).toBe(1000);
		expect(mine.rows.find(r => r.orderId === paid.id)).toMatchObject({
			status: "revoked",
			points: 3000,
			rate: 0.2
		});
		const history = await broker.call<Paged<{ cause: string; amount: number }>, object>(
			"points.history",
			{ memberId: "0001" }
		);
		expect(
			history.rows.filter(e => e.cause.endsWith(paid.id)).map(e => [e.cause, e.amount])
		).toEqual([
			[`order-cancel:${paid.id}`, -3000],
			[`order:${paid.id}`, 3000]
		]);
	});

	it("lists a member's orders, newest first, and refuses bad input", async () => {
		const page = await broker.call<Paged<OrderView>, object>("orders.list", { memberId: "0001" });
		expect(page.total).toBe(2);
		expect(page.rows[0].id > page.rows[1].id).toBe(true);
		await expect(order({ memberId: "9999", qty: 1, unitPrice: 100 })).rejects.toMatchObject({
			code: 404,
			type: "MEMBER_NOT_FOUND"
		});
		for (const bad of [
			{ qty: 0, unitPrice: 100 },
			{ qty: 1.5, unitPrice: 100 },
			{ qty: 1, unitPrice: -1 },
			{ qty: 1 },
			{ qty: 1, unitPrice: 1, extra: 1 }
		])
			await expect(order(bad)).rejects.toMatchObject({ code: 422 });
		await expect(order({ qty: 1000, unitPrice: 1e10 })).rejects.toMatchObject({
			code: 422,
			type: "ORDER_TOO_LARGE"
		});
		expect(
			(await broker.call<Paged<OrderView>, object>("orders.list", { memberId: "0001" })).total
		).toBe(2);
	});
});

describe("an order whose payment answers too late", () => {
	let broker: ServiceBroker;

	// Same data folder as above (one per test file): a member of its own.
	beforeAll(async () => {
		broker = orderBroker(600, 150);
		await broker.start();
		await broker.call("members.join", { memberId: "0100", name: "Late" });
	});
	afterAll(() => broker.stop());

	it("fails at once with 503, and the late payment is voided: no points, no paid payment", async () => {
		const err = await broker
			.call("orders.create", { memberId: "0100", productId: "toast", qty: 2, unitPrice: 5000 })
			.catch(e => e);
		expect(err).toMatchObject({
			code: 503,
			type: "PAYMENTS_UNAVAILABLE",
			data: { retryAfter: expect.any(Number) }
		});
		const [failed] = (
			await broker.call<Paged<OrderView>, object>("orders.list", { memberId: "0100" })
		).rows;
		expect(failed).toMatchObject({
			status: "payment_failed",
			reason: "PAYMENTS_UNAVAILABLE",
			points: 0
		});
		// The provider still answers after 600 ms; whatever it did, the payment ends up undone.
		await eventually(async () => {
			const payments = await broker.call<Paged<PaymentView>, object>("payments.list", {
				orderId: failed.id
			});
			expect(payments.rows).toHaveLength(1);
			expect(payments.rows[0].status).toBe("voided");
		});
		await new Promise(resolve => setTimeout(resolve, 700));
		expect(
			(
				await broker.call<Paged<PaymentView>, object>("payments.list", { orderId: failed.id })
			).rows.map(p => p.status)
		).toEqual(["voided"]);
		expect(await broker.call("points.get", { memberId: "0100" })).toMatchObject({ balance: 0 });
		expect(
			(await broker.call<Paged<unknown>, object>("my-points.get", { memberId: "0100" })).total
		).toBe(0);
	});
});
