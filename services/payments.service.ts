/**
 * Payments: a simulated payment provider behind a real service boundary. It declines a total above
 * `PAYMENT_LIMIT` and takes `PAYMENT_DELAY_MS` to answer, so overload can be shown.
 *
 * One payment per order (a unique `orderId`): asking to pay an order twice answers the first
 * payment. Orders never calls back to undo; it sends durable events instead:
 * - `order.voided`: the order gave up waiting for its answer. A payment made anyway is cancelled; one
 *   not made yet is refused when it comes, because a `voided` record already holds its place.
 * - `order.cancelled`: a paid order was cancelled; its payment is cancelled.
 * Each cancellation is answered with `payment.cancelled` (outbox), which orders records.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { setTimeout as sleep } from "node:timers/promises";
import { ConfiguredSettings } from "../config/settings";
import { consume, outboxEvent, type OrderEvent } from "../contracts/channels";
import { notFound } from "../lib/errors";
import { sortableId } from "../lib/ids";
import * as P from "../lib/params";
import { DbMixin, type DbThis } from "../mixins/db.mixin";
import {
	OutboxMixin,
	OUTBOX_INDEX,
	type OutboxMethods,
	type WithOutbox
} from "../mixins/outbox.mixin";

export type PaymentStatus = "approved" | "declined" | "cancelled" | "voided";

export interface Payment extends WithOutbox {
	orderId: string;
	memberId: string;
	amount: number;
	status: PaymentStatus;
	reason?: string;
	at: string;
	cancelledAt?: string;
}

export interface PaymentView extends Omit<Payment, "_id" | "outbox"> {
	id: string;
}

interface Methods {
	findByOrder(orderId: string): Promise<Payment | null>;
	undo(order: OrderEvent, status: "cancelled" | "voided"): Promise<void>;
	toView(payment: Payment): PaymentView;
}

interface Settings extends ServiceSettingSchema {
	/** Totals above this are declined (PAYMENT_LIMIT). */
	limit: number;
	/** How long an answer takes (ms, PAYMENT_DELAY_MS). */
	delayMs: number;
}

type This = Service<Settings> & DbThis<Payment> & OutboxMethods & Methods;

const PaymentsService: ServiceSchema<Settings, Methods, object, This> = {
	name: "payments",
	mixins: [
		DbMixin("payments", [
			{ fields: { orderId: 1 }, unique: true },
			{ fields: { memberId: 1 } },
			OUTBOX_INDEX
		]),
		OutboxMixin,
		ConfiguredSettings<Settings>(config => ({
			limit: config.paymentLimit,
			delayMs: config.paymentDelayMs
		}))
	],

	actions: {
		/** Internal: called by orders under its timeout and circuit breaker. */
		pay: {
			visibility: "public",
			params: { $$strict: true, orderId: P.id, memberId: P.id, amount: P.amount(P.MAX_AMOUNT) },
			async handler(
				this: This,
				ctx: Context<{ orderId: string; memberId: string; amount: number }>
			): Promise<PaymentView> {
				if (this.settings.delayMs > 0) await sleep(this.settings.delayMs);
				const { orderId, memberId, amount } = ctx.params;
				const declined = amount > this.settings.limit;
				const payment: Payment = {
					_id: sortableId(),
					orderId,
					memberId,
					amount,
					status: declined ? "declined" : "approved",
					...(declined ? { reason: "LIMIT_EXCEEDED" } : {}),
					at: new Date().toISOString()
				};
				if (await this.store.insertUnique(payment)) return this.toView(payment);
				// Paid before, or voided while this request waited: the record that holds the place answers.
				return this.toView((await this.findByOrder(orderId)) as Payment);
			}
		},

		get: {
			rest: "GET /payments/:id",
			summary: "One payment",
			params: { $$strict: true, id: P.id },
			async handler(this: This, ctx: Context<{ id: string }>) {
				const payment = await this.store.findById(ctx.params.id);
				if (!payment)
					throw notFound("PAYMENT_NOT_FOUND", `Payment '${ctx.params.id}' not found`, ctx.params);
				return this.toView(payment);
			}
		},

		list: {
			rest: "GET /payments",
			summary: "Payments, newest first, paged",
			params: { $$strict: true, orderId: P.optionalId, memberId: P.optionalId, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ orderId?: string; memberId?: string; page: number; pageSize: number }>
			) {
				const { page, pageSize, ...filters } = ctx.params;
				return this.store.newestFirst(filters, page, pageSize, row => this.toView(row));
			}
		}
	},

	channels: consume<This>("payments", {
		"order.voided"(order) {
			return this.undo(order, "voided");
		},
		"order.cancelled"(order) {
			return this.undo(order, "cancelled");
		}
	}),

	methods: {
		async undo(this: This, order: OrderEvent, status: "cancelled" | "voided") {
			const at = new Date().toISOString();
			const placeholder: Payment = {
				_id: sortableId(),
				orderId: order.orderId,
				memberId: order.memberId,
				amount: 0,
				status,
				at,
				cancelledAt: at
			};
			// No payment yet: the placeholder takes its place, and a late `pay` finds it instead.
			if (await this.store.insertUnique(placeholder)) return;
			const payment = (await this.findByOrder(order.orderId)) as Payment;
			// Only an approved payment is undone; a declined, cancelled or voided one stays as it is.
			await this.changeWithEvents(
				{
					filter: { _id: payment._id, status: "approved" },
					update: { $set: { status, cancelledAt: at } }
				},
				[
					outboxEvent("payment.cancelled", {
						orderId: payment.orderId,
						paymentId: payment._id,
						status
					})
				]
			);
		},

		async findByOrder(this: This, orderId: string) {
			const [payment] = await this.store.find({ query: { orderId }, limit: 1 });
			return payment ?? null;
		},

		toView(payment: Payment): PaymentView {
			const { _id, outbox: _outbox, ...rest } = payment;
			return { id: _id, ...rest };
		}
	}
};

export default PaymentsService;
