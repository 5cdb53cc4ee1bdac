/**
 * Food orders: order → payment → delivery. The order is recorded as `pending` first, then
 * `payments.pay` is called under a timeout and the circuit breaker:
 * - approved: the order is `paid` and its delivery started; `order.paid` (outbox, durable) accrues
 *   floor(totalPrice × rate) points, rate 20% from 5 items, else 10%, and starts the delivery;
 * - declined: `payment_failed`, no points;
 * - no answer (slow, failing or breaker open): `payment_failed` at once with a 503 and Retry-After;
 *   `order.voided` makes payments cancel a payment that still happens late, or refuse it. So no order
 *   is paid without its points, and no points exist for an order that was not paid.
 *
 * Cancelling a paid order is accepted at once, even while payments is overloaded: the order becomes
 * `cancelled` and `order.cancelled` (durable) cancels the payment, the delivery and the points, each
 * consumer once, whenever it is able to. The order then records `payment.cancelled` and
 * `delivery.cancelled` as they come back.
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { consume, outboxEvent, type OutboxEvent } from "../contracts/channels";
import { assertOwnMember, type CallerMeta } from "../lib/gateway/access";
import { created, type AnswerMeta } from "../lib/gateway/answers";
import { clientError, conflict, notFound } from "../lib/errors";
import { sortableId } from "../lib/ids";
import { assertActiveMember } from "../lib/active-member";
import * as P from "../lib/params";
import { createdBefore, REQUEST_ID_INDEX, requestIdOf, type RequestMeta } from "../lib/request-id";
import { DbMixin, type DbThis } from "../mixins/db.mixin";
import {
	OutboxMixin,
	OUTBOX_INDEX,
	type OutboxMethods,
	type WithOutbox
} from "../mixins/outbox.mixin";
import {
	PendingMixin,
	type Outcome,
	type PendingMethods,
	type PendingSettings
} from "../mixins/pending.mixin";
import type { PaymentView } from "./payments.service";

export type OrderStatus = "pending" | "paid" | "payment_failed" | "cancelled";

export interface Order extends WithOutbox {
	memberId: string;
	productId: string;
	qty: number;
	unitPrice: number;
	totalPrice: number;
	status: OrderStatus;
	reason?: string;
	payment: { id?: string; status: string };
	delivery: { status: string };
	/** The share of the total earned as points; `points` is what the order earns (0 unless paid). */
	pointRate: number;
	points: number;
	orderedAt: string;
	paidAt?: string;
	cancelledAt?: string;
	/** The requests (Idempotency-Key) that created and cancelled the order, if they had one. */
	requestId?: string;
	cancelRequestId?: string;
}

export interface OrderView extends Omit<Order, "_id" | "outbox" | "requestId" | "cancelRequestId"> {
	id: string;
}

interface CreateParams {
	memberId: string;
	productId: string;
	qty: number;
	unitPrice: number;
}

interface Methods {
	pay(ctx: Context, order: Order): Promise<Order>;
	eventOf(channel: OrderChannel, order: Order): OutboxEvent;
	findOrder(id: string): Promise<Order>;
	failed(order: Order, reason: string): Outcome<Order>;
	abandoned(order: Order): Outcome<Order>;
	toView(order: Order): OrderView;
}

/** The channels an order's events go to. */
type OrderChannel = "order.paid" | "order.voided" | "order.cancelled";

interface Settings extends PendingSettings {
	/** How long a call to members may take (ms). */
	callTimeoutMs: number;
}

type This = Service<Settings> & DbThis<Order> & OutboxMethods & PendingMethods<Order> & Methods;

/** Orders of this many items or more earn the higher rate. */
export const BULK_QTY = 5;

/** Percent of the total earned: integers, so floor() is exact (10% of 15 000 is 1 500, not 1 499). */
export function pointPercent(qty: number): number {
	return qty >= BULK_QTY ? 20 : 10;
}

export function pointsFor(totalPrice: number, qty: number): number {
	return Math.floor((totalPrice * pointPercent(qty)) / 100);
}

const OrdersService: ServiceSchema<Settings, Methods, object, This> = {
	name: "orders",
	// An order waits `pendingTimeoutMs` for its payment's answer; one pending twice as long was abandoned.
	mixins: [
		DbMixin("orders", [
			{ fields: { memberId: 1 } },
			{ fields: { status: 1 } },
			OUTBOX_INDEX,
			REQUEST_ID_INDEX
		]),
		OutboxMixin,
		PendingMixin<Order>("orderedAt"),
		ConfiguredSettings<Settings>(config => ({ callTimeoutMs: config.callTimeoutMs }))
	],

	actions: {
		create: {
			rest: "POST /orders",
			summary: "Order food: paid at once, points accrue once paid (10%, 20% from 5 items)",
			params: {
				$$strict: true,
				memberId: P.id,
				productId: P.id,
				qty: P.amount(1000),
				unitPrice: P.amount(P.MAX_AMOUNT)
			},
			async handler(this: This, ctx: Context<CreateParams, RequestMeta & AnswerMeta>) {
				const { memberId, productId, qty, unitPrice } = ctx.params;
				const answer = (order: Order) =>
					created(ctx, `/api/orders/${order._id}`, this.toView(order));
				// A request run again (its gateway died before answering) answers the order it made, as it stands.
				const before = await createdBefore(this.store, ctx);
				if (before) return answer(before);
				const totalPrice = qty * unitPrice;
				if (totalPrice > P.MAX_AMOUNT)
					throw clientError(422, "ORDER_TOO_LARGE", `An order may total at most ${P.MAX_AMOUNT}`, {
						totalPrice
					});
				await assertActiveMember(ctx, memberId, this.settings.callTimeoutMs);

				const order: Order = {
					_id: sortableId(),
					memberId,
					productId,
					qty,
					unitPrice,
					totalPrice,
					status: "pending",
					payment: { status: "requested" },
					delivery: { status: "not_started" },
					pointRate: pointPercent(qty) / 100,
					points: 0,
					orderedAt: new Date().toISOString(),
					...requestIdOf(ctx)
				};
				if (!(await this.store.insertUnique(order))) {
					// Refused for its request id: the same request, running at the same time, stored its order first.
					const racing = await createdBefore(this.store, ctx);
					if (racing) return answer(racing);
					// A ULID is never taken in practice; if it were, that must not pass for success.
					throw new Error(`Could not store a new order: id '${order._id}' is taken`);
				}
				return answer(await this.pay(ctx, order));
			}
		},

		get: {
			rest: "GET /orders/:id",
			summary: "One order",
			params: { $$strict: true, id: P.id },
			async handler(this: This, ctx: Context<{ id: string }, CallerMeta>) {
				const order = await this.findOrder(ctx.params.id);
				assertOwnMember(ctx, order.memberId);
				return this.toView(order);
			}
		},

		list: {
			rest: "GET /orders",
			summary: "Orders, newest first, paged",
			params: {
				$$strict: true,
				memberId: P.optionalId,
				status: {
					type: "enum",
					values: ["pending", "paid", "payment_failed", "cancelled"],
					optional: true
				},
				...P.paging
			},
			async handler(
				this: This,
				ctx: Context<{ memberId?: string; status?: OrderStatus; page: number; pageSize: number }>
			) {
				const { page, pageSize, ...filters } = ctx.params;
				return this.store.newestFirst(filters, page, pageSize, row => this.toView(row));
			}
		},

		/** Accepted at once; the payment, delivery and points follow by a durable event (see above). */
		cancel: {
			rest: "POST /orders/:id/cancel",
			summary: "Cancel a paid order: its payment is cancelled and its points revoked",
			params: { $$strict: true, id: P.id },
			async handler(this: This, ctx: Context<{ id: string }, RequestMeta & CallerMeta>) {
				const order = await this.findOrder(ctx.params.id);
				assertOwnMember(ctx, order.memberId);
				const { requestId } = requestIdOf(ctx);
				// A request run again (its gateway died before answering) answers its cancellation.
				if (requestId && order.status === "cancelled" && order.cancelRequestId === requestId)
					return this.toView(order);
				if (order.status === "cancelled")
					throw conflict("ORDER_ALREADY_CANCELLED", `Order '${order._id}' is already cancelled`, {
						id: order._id
					});
				if (order.status !== "paid")
					throw conflict(
						"ORDER_NOT_CANCELLABLE",
						`Order '${order._id}' is '${order.status}' and cannot be cancelled`,
						{
							id: order._id,
							status: order.status
						}
					);
				const cancelled: Order = {
					...order,
					status: "cancelled",
					cancelledAt: new Date().toISOString(),
					payment: { ...order.payment, status: "cancelling" },
					delivery: { status: "cancelling" }
				};
				const { status, cancelledAt, payment, delivery } = cancelled;
				// Conditional on `paid`: of two racing cancellations, one wins.
				const change = {
					filter: { _id: order._id, status: "paid" },
					update: {
						$set: {
							status,
							cancelledAt,
							payment,
							delivery,
							...(requestId ? { cancelRequestId: requestId } : {})
						}
					}
				};
				if (!(await this.changeWithEvents(change, [this.eventOf("order.cancelled", cancelled)]))) {
					// The same request, run again at the same time, may be the one that won: it answers that.
					const now = await this.findOrder(order._id);
					if (requestId && now.cancelRequestId === requestId) return this.toView(now);
					throw conflict("ORDER_ALREADY_CANCELLED", `Order '${order._id}' is already cancelled`, {
						id: order._id
					});
				}
				return this.toView(cancelled);
			}
		}
	},

	channels: consume<This>("orders", {
		async "payment.cancelled"(payment) {
			await this.store.update(
				{ _id: payment.orderId },
				{ $set: { payment: { id: payment.paymentId, status: payment.status } } }
			);
		},
		async "delivery.cancelled"(delivery) {
			await this.store.update(
				{ _id: delivery.orderId },
				{ $set: { delivery: { status: "cancelled" } } }
			);
		}
	}),

	methods: {
		async pay(this: This, ctx: Context, order: Order): Promise<Order> {
			// Unconfirmed, the payment may still happen: `failed` voids it.
			const payment = await this.confirm(
				order,
				timeout =>
					ctx.call<PaymentView, { orderId: string; memberId: string; amount: number }>(
						"payments.pay",
						{ orderId: order._id, memberId: order.memberId, amount: order.totalPrice },
						{ timeout }
					),
				"PAYMENTS_UNAVAILABLE",
				"Payments cannot be confirmed right now; try again later"
			);
			if (payment.status !== "approved")
				return this.settle(order, {
					changes: {
						status: "payment_failed",
						reason: "PAYMENT_DECLINED",
						payment: { id: payment.id, status: payment.status }
					},
					events: []
				});
			const paid: Order = {
				...order,
				status: "paid",
				paidAt: payment.at,
				payment: { id: payment.id, status: "approved" },
				delivery: { status: "started" },
				points: pointsFor(order.totalPrice, order.qty)
			};
			const { status, paidAt, delivery, points } = paid;
			return this.settle(order, {
				changes: { status, paidAt, payment: paid.payment, delivery, points },
				events: [this.eventOf("order.paid", paid)]
			});
		},

		/** An order whose payment is unconfirmed fails, and `order.voided` cancels the payment should it happen. */
		failed(this: This, order: Order, reason: string): Outcome<Order> {
			return {
				changes: { status: "payment_failed", reason, payment: { status: "unconfirmed" } },
				events: [this.eventOf("order.voided", order)]
			};
		},

		/** An order left pending by an instance that died waiting for its payment. */
		abandoned(this: This, order: Order): Outcome<Order> {
			return this.failed(order, "INTERRUPTED");
		},

		eventOf(channel: OrderChannel, order: Order): OutboxEvent {
			const {
				_id,
				memberId,
				productId,
				qty,
				unitPrice,
				totalPrice,
				pointRate,
				points,
				paidAt,
				cancelledAt
			} = order;
			return outboxEvent<OrderChannel>(channel, {
				orderId: _id,
				memberId,
				productId,
				qty,
				unitPrice,
				totalPrice,
				rate: pointRate,
				points,
				...(paidAt ? { paidAt } : {}),
				...(cancelledAt ? { cancelledAt } : {})
			});
		},

		async findOrder(this: This, id: string): Promise<Order> {
			const order = await this.store.findById(id);
			if (!order) throw notFound("ORDER_NOT_FOUND", `Order '${id}' not found`, { id });
			return order;
		},

		toView(order: Order): OrderView {
			const {
				_id,
				outbox: _outbox,
				requestId: _request,
				cancelRequestId: _cancelRequest,
				...rest
			} = order;
			return { id: _id, ...rest };
		}
	}
};

export default OrdersService;
