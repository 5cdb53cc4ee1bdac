/**
 * Deliveries: a paid order's delivery starts when `order.paid` arrives and is cancelled by
 * `order.cancelled`, whichever comes first (a cancellation that overtakes the start leaves the
 * delivery cancelled). Each cancellation is answered with `delivery.cancelled` (outbox) for orders.
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { consume, outboxEvent } from "../contracts/channels";
import { notFound } from "../lib/errors";
import * as P from "../lib/params";
import { DbMixin, type DbThis } from "../mixins/db.mixin";
import {
	OutboxMixin,
	OUTBOX_INDEX,
	type OutboxMethods,
	type WithOutbox
} from "../mixins/outbox.mixin";

export interface Delivery extends WithOutbox {
	/** The order's id: one delivery per order. */
	_id: string;
	memberId: string;
	productId?: string;
	qty?: number;
	status: "started" | "cancelled";
	startedAt?: string;
	cancelledAt?: string;
}

type This = Service & DbThis<Delivery> & OutboxMethods;

const DeliveriesService: ServiceSchema<object, object, object, This> = {
	name: "deliveries",
	mixins: [DbMixin("deliveries", [{ fields: { memberId: 1 } }, OUTBOX_INDEX]), OutboxMixin],

	actions: {
		get: {
			rest: "GET /deliveries/:orderId",
			summary: "An order's delivery",
			params: { $$strict: true, orderId: P.id },
			async handler(this: This, ctx: Context<{ orderId: string }>) {
				const delivery = await this.store.findById(ctx.params.orderId);
				if (!delivery)
					throw notFound(
						"DELIVERY_NOT_FOUND",
						`No delivery for order '${ctx.params.orderId}'`,
						ctx.params
					);
				const { _id, outbox: _outbox, ...rest } = delivery;
				return { orderId: _id, ...rest };
			}
		}
	},

	channels: consume<This>("deliveries", {
		async "order.paid"(order) {
			// Once per order: a repeated event, or one after the cancellation, finds the record taken.
			const { orderId, memberId, productId, qty } = order;
			await this.store.insertUnique({
				_id: orderId,
				memberId,
				productId,
				qty,
				status: "started",
				startedAt: new Date().toISOString()
			});
		},
		async "order.cancelled"(order) {
			const cancelledAt = new Date().toISOString();
			const events = [outboxEvent("delivery.cancelled", { orderId: order.orderId })];
			// Not started yet: the cancelled record takes its place. Started: cancelled, once.
			const record: Delivery = {
				_id: order.orderId,
				memberId: order.memberId,
				status: "cancelled",
				cancelledAt
			};
			if (!(await this.changeWithEvents({ insert: record }, events)))
				await this.changeWithEvents(
					{
						filter: { _id: order.orderId, status: "started" },
						update: { $set: { status: "cancelled", cancelledAt } }
					},
					events
				);
		}
	})
};

export default DeliveriesService;
