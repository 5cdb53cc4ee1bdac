/**
 * Billing: the month-end settlement of each merchant. It reads only its own CQRS view — one row per
 * successful, not cancelled `use` deal — fed by deal events, never the deals store.
 * billingAmount = floor(points used at the merchant in the month × (1 − fee)). A merchant and month
 * are settled once: asking again returns the same settlement. Months are calendar months in UTC.
 *
 * The month-end job settles every merchant with activity in the month that just ended, a grace
 * period (`MONTH_END_GRACE_MINUTES`) after the month's end so late events reach the view first. It
 * checks the clock once a minute rather than sleeping until the month's end, so a node that was
 * down at the time, or a clock that jumped, still closes the month. Settling is idempotent: a rerun,
 * or two billing nodes closing the same month, changes nothing.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { consume } from "../contracts/channels";
import { assertOwnMerchant, type CallerMeta } from "../lib/access";
import { clientError, notFound } from "../lib/errors";
import * as P from "../lib/params";
import { DbMixin, openCollection, type Collection, type DbThis } from "../mixins/db.mixin";

export interface BillingAmountView {
	/** The deal's id: the view row follows the deal. */
	_id: string;
	merchantId?: string;
	memberId?: string;
	point?: number;
	dealDate?: string;
	cancelled?: boolean;
}

export interface Settlement {
	_id: string;
	merchantId: string;
	billingMonth: string;
	usedPoints: number;
	dealCount: number;
	feeRate: number;
	fee: number;
	billingAmount: number;
	settledAt: string;
}

interface Methods {
	settlementOf(merchantId: string, billingMonth: string): Promise<{ settlement: Settlement; created: boolean }>;
	closeMonth(billingMonth: string): Promise<{ billingMonth: string; settlements: ReturnType<Methods["toView"]>[]; created: number }>;
	monthEndCheck(): Promise<void>;
	/** The clock; a test may run the service with another. */
	now(): Date;
	toView(settlement: Settlement): Omit<Settlement, "_id"> & { id: string };
}

interface Settings extends ServiceSettingSchema {
	/** How long after a month's end it is closed (MONTH_END_GRACE_MINUTES), and how often the clock is checked (ms). */
	monthEnd: { graceMs: number; checkEveryMs: number };
	/** The share of used points a merchant pays as a fee (SETTLEMENT_FEE). */
	settlementFee: number;
}

type This = Service<Settings> &
	DbThis<BillingAmountView> &
	Methods & { settlements: Collection<Settlement>; monthEndTimer?: NodeJS.Timeout; lastClosedMonth?: string };

const billingMonth = { type: "string", pattern: /^\d{4}(0[1-9]|1[0-2])$/, messages: { stringPattern: "billingMonth must be YYYYMM" } } as const;

/** The month before the one `date` falls in, as YYYYMM (UTC). */
export function previousMonth(date: Date): string {
	const d = new Date(Date.UTC(date.getUTCFullYear(), date.getUTCMonth() - 1, 1));
	return `${d.getUTCFullYear()}${String(d.getUTCMonth() + 1).padStart(2, "0")}`;
}

/** [first instant of the month, first instant of the next) in UTC, as ISO strings. */
export function monthBounds(month: string): [string, string] {
	const year = Number(month.slice(0, 4));
	const index = Number(month.slice(4, 6)) - 1;
	return [new Date(Date.UTC(year, index, 1)).toISOString(), new Date(Date.UTC(year, index + 1, 1)).toISOString()];
}

const BillingService: ServiceSchema<Settings, Methods, object, This> = {
	name: "billing",
	mixins: [
		DbMixin("billing-amount-views", [{ fields: { merchantId: 1, dealDate: 1 } }, { fields: { dealDate: 1 } }]),
		ConfiguredSettings<Settings>(config => ({ monthEnd: { graceMs: config.monthEndGraceMs, checkEveryMs: 60_000 }, settlementFee: config.settlementFee }))
	],

	actions: {
		view: {
			rest: "GET /billing-amount-views/:dealId",
			params: { $$strict: true, dealId: P.id },
			async handler(this: This, ctx: Context<{ dealId: string }, CallerMeta>) {
				const row = await this.store.findById(ctx.params.dealId);
				if (!row || row.cancelled || row.point == null)
					throw notFound("BILLING_VIEW_NOT_FOUND", `No billing amount for deal '${ctx.params.dealId}'`, ctx.params);
				assertOwnMerchant(ctx, row.merchantId);
				const { _id, merchantId, memberId, point, dealDate } = row;
				return { dealId: _id, merchantId, memberId, point, dealDate };
			}
		},

		settle: {
			rest: "POST /billings",
			params: { $$strict: true, merchantId: P.id, billingMonth },
			async handler(this: This, ctx: Context<{ merchantId: string; billingMonth: string }, { $statusCode?: number; $location?: string }>) {
				const { settlement, created } = await this.settlementOf(ctx.params.merchantId, ctx.params.billingMonth);
				ctx.meta.$statusCode = created ? 201 : 200;
				ctx.meta.$location = `/api/billings/${settlement.merchantId}/${settlement.billingMonth}`;
				return this.toView(settlement);
			}
		},

		/** The month-end job: settles every merchant with activity in the month (default: the last one). */
		closeMonth: {
			visibility: "public",
			params: { $$strict: true, billingMonth: { ...billingMonth, optional: true } },
			handler(this: This, ctx: Context<{ billingMonth?: string }>) {
				return this.closeMonth(ctx.params.billingMonth ?? previousMonth(this.now()));
			}
		},

		get: {
			rest: "GET /billings/:merchantId/:billingMonth",
			params: { $$strict: true, merchantId: P.id, billingMonth },
			async handler(this: This, ctx: Context<{ merchantId: string; billingMonth: string }>) {
				const settlement = await this.settlements.findById(`${ctx.params.merchantId}:${ctx.params.billingMonth}`);
				if (!settlement) throw notFound("SETTLEMENT_NOT_FOUND", `Merchant '${ctx.params.merchantId}' is not settled for ${ctx.params.billingMonth}`, ctx.params);
				return this.toView(settlement);
			}
		}
	},

	channels: consume<This>("billing", {
		async "deal.used"(deal) {
			const { dealId, merchantId, memberId, point, dealDate } = deal;
			await this.store.upsert({ _id: dealId }, { $set: { merchantId, memberId, point, dealDate } });
		},
		async "deal.cancelled"(deal) {
			// Also when the cancellation overtakes the use: the row stays out of every settlement.
			if (deal.type === "use") await this.store.upsert({ _id: deal.dealId }, { $set: { cancelled: true } });
		}
	}),

	methods: {
		now: () => new Date(),

		async closeMonth(this: This, month: string) {
			const [from, to] = monthBounds(month);
			const rows = await this.store.find({ query: { dealDate: { $gte: from, $lt: to } } });
			const merchants = [...new Set(rows.map(row => row.merchantId).filter((id): id is string => !!id))].sort();
			const settlements = [];
			let created = 0;
			for (const merchantId of merchants) {
				const result = await this.settlementOf(merchantId, month);
				if (result.created) created++;
				settlements.push(this.toView(result.settlement));
			}
			if (created) this.logger.info(`Month-end ${month}: settled ${created} merchant(s).`);
			return { billingMonth: month, settlements, created };
		},

		/** Closes the last month whose end (plus grace) has passed, unless this node already did. */
		async monthEndCheck(this: This) {
			const month = previousMonth(new Date(this.now().getTime() - this.settings.monthEnd.graceMs));
			if (month === this.lastClosedMonth) return;
			await this.closeMonth(month);
			this.lastClosedMonth = month;
		},

		async settlementOf(this: This, merchantId: string, month: string) {
			const now = this.now();
			const id = `${merchantId}:${month}`;
			const existing = await this.settlements.findById(id);
			if (existing) return { settlement: existing, created: false };

			const [from, to] = monthBounds(month);
			if (from > now.toISOString()) throw clientError(422, "BILLING_MONTH_NOT_STARTED", `${month} has not started yet`, { billingMonth: month });
			const rows = await this.store.find({ query: { merchantId, dealDate: { $gte: from, $lt: to }, cancelled: { $ne: true } } });
			const usedPoints = rows.reduce((sum, row) => sum + (row.point ?? 0), 0);
			const billingAmount = Math.floor(usedPoints * (1 - this.settings.settlementFee));
			const settlement: Settlement = {
				_id: id,
				merchantId,
				billingMonth: month,
				usedPoints,
				dealCount: rows.length,
				feeRate: this.settings.settlementFee,
				fee: usedPoints - billingAmount,
				billingAmount,
				settledAt: now.toISOString()
			};
			// Two settling at once: the unique id lets one win, and both answer with its result.
			if (await this.settlements.insertUnique(settlement)) return { settlement, created: true };
			return { settlement: (await this.settlements.findById(id)) as Settlement, created: false };
		},

		toView(settlement: Settlement) {
			const { _id, ...rest } = settlement;
			return { id: _id, ...rest };
		}
	},

	created(this: This) {
		this.settlements = openCollection<Settlement>(this, "settlements", [{ fields: { merchantId: 1 } }]);
	},

	async started(this: This) {
		await this.settlements.connect(this.logger);
		// The first check comes a while after start, so events queued while this node was down reach
		// the view before a missed month is closed.
		const check = () => {
			this.monthEndTimer = setTimeout(() => {
				this.monthEndCheck()
					.catch(err => this.logger.error("Month-end job failed; retrying at the next check:", err))
					.finally(check);
			}, this.settings.monthEnd.checkEveryMs);
		};
		check();
	},

	async stopped(this: This) {
		clearTimeout(this.monthEndTimer);
		await this.settlements.disconnect();
	}
};

export default BillingService;
