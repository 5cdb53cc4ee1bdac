/**
 * My points: a member's points from orders, as a CQRS read view fed by `order.paid` and
 * `order.cancelled`. One row per order, so a repeated event changes nothing, and a cancellation
 * that overtakes the payment still leaves the order revoked. Staff adjustments of the member's
 * balance are listed beside them (one row per adjustment, from the ledger's `points.posted`).
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { consume } from "../contracts/channels";
import * as P from "../lib/params";
import { DbMixin, type DbThis } from "../mixins/db.mixin";

export interface MyPointsRow {
	/** The order's id, or `adjustment:<id>`. */
	_id: string;
	memberId: string;
	/** An adjustment's points, reason, who made it and when. */
	adjustment?: { amount: number; reason?: string; by?: string; at: string };
	qty?: number;
	rate?: number;
	points?: number;
	paidAt?: string;
	revoked?: boolean;
}

type This = Service & DbThis<MyPointsRow>;

const MyPointsService: ServiceSchema<object, object, object, This> = {
	name: "my-points",
	mixins: [DbMixin("my-points", [{ fields: { memberId: 1 } }])],

	actions: {
		/** The member's order points, newest first: `total` counts what is accrued and not revoked. */
		get: {
			rest: "GET /my-points/:memberId",
			summary: "A member's order points, newest first, and their total (read view, fed by events)",
			params: { $$strict: true, memberId: P.id, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ memberId: string; page: number; pageSize: number }>
			) {
				const { memberId, page, pageSize } = ctx.params;
				const [all, adjusted] = await Promise.all([
					this.store.find({
						query: { memberId, adjustment: { $exists: false } },
						sort: ["-paidAt"]
					}),
					this.store.find({ query: { memberId, adjustment: { $exists: true } }, sort: ["-_id"] })
				]);
				const total = all.reduce((sum, row) => sum + (row.revoked ? 0 : (row.points ?? 0)), 0);
				const adjustments = adjusted.map(row => ({
					adjustmentId: row._id.slice("adjustment:".length),
					...row.adjustment
				}));
				const rows = all.slice((page - 1) * pageSize, page * pageSize).map(row => ({
					orderId: row._id,
					qty: row.qty,
					rate: row.rate,
					points: row.points,
					status: row.revoked ? "revoked" : "accrued",
					...(row.paidAt ? { paidAt: row.paidAt } : {})
				}));
				return {
					memberId,
					total,
					rows,
					orderCount: all.length,
					page,
					pageSize,
					adjustments,
					adjustedTotal: adjustments.reduce((sum, a) => sum + (a.amount ?? 0), 0)
				};
			}
		}
	},

	channels: consume<This>("my-points", {
		async "order.paid"(order) {
			const { orderId, memberId, qty, rate, points, paidAt } = order;
			await this.store.upsert({ _id: orderId }, { $set: { memberId, qty, rate, points, paidAt } });
		},
		async "order.cancelled"(order) {
			const { orderId, memberId, qty, rate, points, paidAt } = order;
			await this.store.upsert(
				{ _id: orderId },
				{ $set: { memberId, qty, rate, points, paidAt, revoked: true } }
			);
		},
		async "points.posted"(posting) {
			for (const { cause, kind, memberId, amount, reason, by, at } of posting.entries)
				if (kind === "adjust")
					await this.store.upsert(
						{ _id: cause },
						{ $set: { memberId, adjustment: { amount, reason, by, at } } }
					);
		}
	})
};

export default MyPointsService;
