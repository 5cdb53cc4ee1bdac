/**
 * Billing: each merchant's monthly settlement. It reads only its own CQRS view — one row per `use`
 * deal, fed by `deal.used`, `deal.cancelled` and `deal.returned`, never the deals store. Months are calendar months
 * in UTC; billingAmount = (points of the settlement's lines) × (1 − fee), toward zero, in basis points.
 *
 * A month that has not closed is settled `provisional`: its figures are recomputed on every read and
 * request. A month closes — its settlements become `final` and never change — once its end plus
 * `MONTH_END_GRACE_MINUTES` has passed and this service has handled every deal event published
 * before then. Months close in order. A change that reaches a closed month (a late use, a
 * cancellation after the settlement) is carried into the merchant's next open settlement as an
 * adjustment line naming the deal and its month: never lost, and no final figure changes.
 *
 * How: every view row knows how many of its points final settlements have billed (`billed`, with the
 * settlements that did it, so applying one twice changes nothing). What a row should be billed is its
 * points less those given back by its returns, or 0 once cancelled; a difference is a line of the month's settlement, or an adjustment in
 * the first open month once the row's own month has closed. Rows are `open` until they agree.
 *
 * The month-end job checks the clock soon after start and then once a minute, and closes every past
 * month that can close, so a node down through two month-ends, or a clock that jumped, still closes
 * each month. Closing is
 * idempotent: a rerun, or two billing nodes closing the same month, changes nothing.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { consume } from "../contracts/channels";
import { assertOwnMerchant, type CallerMeta } from "../lib/gateway/access";
import { clientError, notFound } from "../lib/errors";
import { KeyedLock } from "../lib/keyed-lock";
import * as P from "../lib/params";
import { addMonths, monthBounds, monthOf, previousMonth } from "../lib/months";
import { rateOf, settlementAmounts } from "../lib/rates";
import { DbMixin, openCollection, type Collection, type DbThis } from "../mixins/db.mixin";

export interface BillingAmountView {
	/** The deal's id: the view row follows the deal. */
	_id: string;
	merchantId?: string;
	memberId?: string;
	point?: number;
	dealDate?: string;
	cancelled?: boolean;
	/** Points given back by the deal's partial returns, in total (the latest total known: totals only grow). */
	returnedPoints?: number;
	/** Points billed by final settlements, and which settlements (`<merchantId>:<YYYYMM>`) billed them. */
	billed?: number;
	billedBy?: Record<string, true>;
	/** Set by every change; cleared once what is billed matches what should be. */
	open?: boolean;
}

export interface SettlementLine {
	kind: "use" | "adjustment";
	dealId: string;
	dealDate: string;
	/** Points this line bills (negative: taken back). */
	points: number;
	/** An adjustment's month: the final month the change reached. */
	month?: string;
	reason?: "LATE_USE" | "CANCELLED_AFTER_SETTLEMENT" | "RETURNED_AFTER_SETTLEMENT" | "CORRECTION";
}

export interface Settlement {
	_id: string;
	merchantId: string;
	billingMonth: string;
	status: "provisional" | "final";
	/** Points of the month's own uses, and how many. */
	usedPoints: number;
	dealCount: number;
	/** Points carried from closed months. */
	adjustmentPoints: number;
	feeRate: number;
	fee: number;
	billingAmount: number;
	lines: SettlementLine[];
	/** When a final settlement was made; when a provisional one was computed. */
	settledAt?: string;
	computedAt?: string;
}

export type SettlementView = Omit<Settlement, "_id"> & { id: string };

interface ClosedMonth {
	billingMonth: string;
	settlements: SettlementView[];
	created: number;
}

interface ChannelLag {
	caughtUp(channels: string[], group: string, before: Date): Promise<boolean>;
	addPrefixTopic(name: string): string;
}

interface Methods {
	settlementOf(
		merchantId: string,
		month: string
	): Promise<{ settlement: Settlement; created: boolean }>;
	compute(
		merchantId: string,
		month: string,
		closedThrough: string | undefined,
		status: Settlement["status"]
	): Promise<Settlement>;
	closeMonths(upTo: string): Promise<ClosedMonth[]>;
	closeMonth(month: string): Promise<ClosedMonth>;
	finalize(
		merchantId: string,
		month: string,
		closing: boolean
	): Promise<{ settlement: Settlement; created: boolean }>;
	apply(settlement: Settlement): Promise<void>;
	canClose(month: string): Promise<boolean>;
	closedThrough(): Promise<string | undefined>;
	monthEndCheck(): Promise<void>;
	assertStarted(month: string): void;
	/** The clock; a test may run the service with another. */
	now(): Date;
	toView(settlement: Settlement): SettlementView;
}

interface Settings extends ServiceSettingSchema {
	/** How long after a month's end it is closed (MONTH_END_GRACE_MINUTES), when the clock is first checked after start, and how often after (ms). */
	monthEnd: { graceMs: number; firstCheckMs: number; checkEveryMs: number };
	/** The share of used points a merchant pays as a fee, in basis points (SETTLEMENT_FEE). */
	settlementFeeBp: number;
}

type This = Service<Settings> &
	DbThis<BillingAmountView> &
	Methods & {
		settlements: Collection<Settlement>;
		state: Collection<{ _id: string; month: string }>;
		lock: KeyedLock;
		monthEndTimer?: NodeJS.Timeout;
		monthEndStopped?: boolean;
	};

/** The channels whose events make the view, for the "caught up" check. */
const VIEW_CHANNELS = ["deal.used", "deal.cancelled", "deal.returned"];

/** What a row should have billed: its points less those returned, or nothing once cancelled (or before its use is known). */
const due = (row: BillingAmountView): number =>
	row.cancelled || row.point == null ? 0 : Math.max(0, row.point - (row.returnedPoints ?? 0));

const STATE_ID = "closed-through";

const BillingService: ServiceSchema<Settings, Methods, object, This> = {
	name: "billing",
	mixins: [
		DbMixin("billing-amount-views", [
			{ fields: { merchantId: 1, dealDate: 1 } },
			{ fields: { dealDate: 1 } }
		]),
		ConfiguredSettings<Settings>(config => ({
			monthEnd: { graceMs: config.monthEndGraceMs, firstCheckMs: 10_000, checkEveryMs: 60_000 },
			settlementFeeBp: config.settlementFeeBp
		}))
	],

	actions: {
		view: {
			rest: "GET /billing-amount-views/:dealId",
			summary: "The billing view of one use deal: the points it settles at its merchant",
			params: { $$strict: true, dealId: P.id },
			async handler(this: This, ctx: Context<{ dealId: string }, CallerMeta>) {
				const row = await this.store.findById(ctx.params.dealId);
				// A use returned whole, at once or in parts, bills nothing: it has no billing amount.
				if (!row || due(row) === 0)
					throw notFound(
						"BILLING_VIEW_NOT_FOUND",
						`No billing amount for deal '${ctx.params.dealId}'`,
						ctx.params
					);
				assertOwnMerchant(ctx, row.merchantId);
				const { _id, merchantId, memberId, dealDate, returnedPoints } = row;
				// `point`: what the use bills, after its partial returns.
				return {
					dealId: _id,
					merchantId,
					memberId,
					point: due(row),
					dealDate,
					...(returnedPoints ? { returnedPoints } : {})
				};
			}
		},

		/**
		 * The merchant's settlement of the month: provisional while the month is open (200); made final
		 * when the month can close (201 the first time, 200 after).
		 */
		settle: {
			rest: "POST /billings",
			summary: "Settle a merchant's month: points used there, less the fee",
			params: { $$strict: true, merchantId: P.id, billingMonth: P.month },
			async handler(
				this: This,
				ctx: Context<
					{ merchantId: string; billingMonth: string },
					{ $statusCode?: number; $location?: string }
				>
			) {
				const { settlement, created } = await this.settlementOf(
					ctx.params.merchantId,
					ctx.params.billingMonth
				);
				ctx.meta.$statusCode = created ? 201 : 200;
				ctx.meta.$location = `/api/billings/${settlement.merchantId}/${settlement.billingMonth}`;
				return this.toView(settlement);
			}
		},

		/** The month-end job: closes every month up to `billingMonth` (default: the last one) that can close. */
		closeMonth: {
			visibility: "public",
			params: { $$strict: true, billingMonth: { ...P.month, optional: true } },
			async handler(this: This, ctx: Context<{ billingMonth?: string }>) {
				const months = await this.closeMonths(ctx.params.billingMonth ?? previousMonth(this.now()));
				return { closedThrough: (await this.closedThrough()) ?? null, months };
			}
		},

		/**
		 * Every merchant's settlement of a month, as `get` answers each: what the dashboard previews.
		 * Only merchants with something to bill in it (their uses, or changes carried into it).
		 */
		preview: {
			visibility: "public",
			params: { $$strict: true, billingMonth: P.month },
			async handler(this: This, ctx: Context<{ billingMonth: string }>) {
				const month = ctx.params.billingMonth;
				this.assertStarted(month);
				const closedThrough = await this.closedThrough();
				if (closedThrough && month <= closedThrough)
					return (
						await this.settlements.find({ query: { billingMonth: month }, sort: ["merchantId"] })
					).map(s => this.toView(s));
				const rows = await this.store.find({
					query: { open: true, dealDate: { $lt: monthBounds(month)[1] } }
				});
				const merchants = [
					...new Set(rows.flatMap(row => (row.merchantId ? [row.merchantId] : [])))
				].sort();
				const settlements = await Promise.all(
					merchants.map(merchantId => this.compute(merchantId, month, closedThrough, "provisional"))
				);
				return settlements.filter(s => s.lines.length).map(s => this.toView(s));
			}
		},

		/** A final settlement as it was made, or an open month's provisional one as of now. */
		get: {
			rest: "GET /billings/:merchantId/:billingMonth",
			summary: "A merchant's settlement for a month (provisional until the month is closed)",
			params: { $$strict: true, merchantId: P.id, billingMonth: P.month },
			async handler(this: This, ctx: Context<{ merchantId: string; billingMonth: string }>) {
				const { merchantId, billingMonth: month } = ctx.params;
				const closedThrough = await this.closedThrough();
				if (closedThrough && month <= closedThrough) {
					const settlement = await this.settlements.findById(`${merchantId}:${month}`);
					if (!settlement)
						throw notFound(
							"SETTLEMENT_NOT_FOUND",
							`Merchant '${merchantId}' has no settlement for ${month}`,
							ctx.params
						);
					return this.toView(settlement);
				}
				this.assertStarted(month);
				return this.toView(await this.compute(merchantId, month, closedThrough, "provisional"));
			}
		}
	},

	channels: consume<This>("billing", {
		async "deal.used"(deal) {
			const { dealId, merchantId, memberId, point, dealDate } = deal;
			await this.store.upsert(
				{ _id: dealId },
				{ $set: { merchantId, memberId, point, dealDate, open: true } }
			);
		},
		async "deal.cancelled"(deal) {
			// Also when the cancellation overtakes the use: the row then never bills anything.
			if (deal.type !== "use") return;
			await this.store.upsert(
				{ _id: deal.dealId },
				{
					$set: {
						merchantId: deal.merchantId,
						dealDate: deal.dealDate,
						cancelled: true,
						open: true
					}
				}
			);
		},
		async "deal.returned"(deal) {
			if (deal.type !== "use") return;
			// The event carries the deal's total after the return, so `$max` keeps the latest whatever the
			// order returns arrive in, and a redelivery changes nothing.
			await this.store.upsert(
				{ _id: deal.dealId },
				{
					$set: { merchantId: deal.merchantId, dealDate: deal.dealDate, open: true },
					$max: { returnedPoints: deal.returnedPoints }
				}
			);
		}
	}),

	methods: {
		now: () => new Date(),

		async closedThrough(this: This) {
			return (await this.state.findById(STATE_ID))?.month;
		},

		assertStarted(this: This, month: string) {
			if (monthBounds(month)[0] > this.now().toISOString())
				throw clientError(422, "BILLING_MONTH_NOT_STARTED", `${month} has not started yet`, {
					billingMonth: month
				});
		},

		async settlementOf(this: This, merchantId: string, month: string) {
			this.assertStarted(month);
			let closedThrough = await this.closedThrough();
			// This request closing the month made the merchant's final settlement: 201, as when it makes an empty one.
			let madeNow = false;
			if ((!closedThrough || month > closedThrough) && (await this.canClose(month))) {
				const closed = await this.closeMonths(month);
				madeNow = closed.some(
					c => c.billingMonth === month && c.settlements.some(s => s.merchantId === merchantId)
				);
				closedThrough = await this.closedThrough();
			}
			if (closedThrough && month <= closedThrough) {
				const result = await this.lock.run("close", () => this.finalize(merchantId, month, false));
				return madeNow ? { ...result, created: true } : result;
			}
			return {
				settlement: await this.compute(merchantId, month, closedThrough, "provisional"),
				created: false
			};
		},

		/** Past its end and grace, with every deal event published until then handled. */
		async canClose(this: This, month: string) {
			const closesAt = new Date(
				new Date(monthBounds(month)[1]).getTime() + this.settings.monthEnd.graceMs
			);
			if (this.now() < closesAt) return false;
			const channels = (this.broker as unknown as { channelAdapter: ChannelLag }).channelAdapter;
			return channels.caughtUp(
				VIEW_CHANNELS.map(name => channels.addPrefixTopic(name)),
				"billing",
				closesAt
			);
		},

		/** The lines of `month` for the merchant: its own uses, and — in the first open month — the adjustments. */
		async compute(
			this: This,
			merchantId: string,
			month: string,
			closedThrough: string | undefined,
			status: Settlement["status"]
		) {
			const firstOpen = closedThrough && month === addMonths(closedThrough, 1);
			const rows = await this.store.find({
				query: { merchantId, open: true, dealDate: { $lt: monthBounds(month)[1] } },
				sort: ["dealDate"]
			});
			const lines: SettlementLine[] = [];
			for (const row of rows) {
				const points = due(row) - (row.billed ?? 0);
				const rowMonth = monthOf(row.dealDate as string);
				if (points === 0 || (rowMonth !== month && !firstOpen)) continue;
				if (rowMonth === month)
					lines.push({ kind: "use", dealId: row._id, dealDate: row.dealDate as string, points });
				else {
					const reason = !row.billed
						? "LATE_USE"
						: row.cancelled
							? "CANCELLED_AFTER_SETTLEMENT"
							: due(row) < row.billed
								? "RETURNED_AFTER_SETTLEMENT"
								: "CORRECTION";
					lines.push({
						kind: "adjustment",
						dealId: row._id,
						dealDate: row.dealDate as string,
						points,
						month: rowMonth,
						reason
					});
				}
			}
			const uses = lines.filter(line => line.kind === "use");
			const usedPoints = uses.reduce((sum, line) => sum + line.points, 0);
			const adjustmentPoints = lines.reduce((sum, line) => sum + line.points, 0) - usedPoints;
			const { fee, billingAmount } = settlementAmounts(
				usedPoints + adjustmentPoints,
				this.settings.settlementFeeBp
			);
			const at = this.now().toISOString();
			return {
				_id: `${merchantId}:${month}`,
				merchantId,
				billingMonth: month,
				status,
				usedPoints,
				dealCount: uses.length,
				adjustmentPoints,
				feeRate: rateOf(this.settings.settlementFeeBp),
				fee,
				billingAmount,
				lines,
				...(status === "final" ? { settledAt: at } : { computedAt: at })
			};
		},

		/** Closes, in order, every month from the first open one up to `upTo` that can close. */
		closeMonths(this: This, upTo: string) {
			return this.lock.run("close", async () => {
				const closed: ClosedMonth[] = [];
				const closedThrough = await this.closedThrough();
				const [earliest] = await this.store.find({
					query: { open: true, dealDate: { $exists: true } },
					sort: ["dealDate"],
					limit: 1
				});
				// Nothing ever closed: start at the oldest month with activity.
				let month = closedThrough
					? addMonths(closedThrough, 1)
					: earliest?.dealDate && monthOf(earliest.dealDate);
				while (month && month <= upTo && (await this.canClose(month))) {
					closed.push(await this.closeMonth(month));
					month = addMonths(month, 1);
				}
				return closed;
			});
		},

		/** Makes final the settlement of every merchant with something to bill in `month`, then records it closed. */
		async closeMonth(this: This, month: string) {
			const rows = await this.store.find({
				query: { open: true, dealDate: { $lt: monthBounds(month)[1] } }
			});
			// Merchants active in the month (a cancelled use included), or with a change to carry.
			const merchants = new Set<string>();
			for (const row of rows)
				if (
					row.merchantId &&
					(monthOf(row.dealDate as string) === month || due(row) !== (row.billed ?? 0))
				)
					merchants.add(row.merchantId);
			const settlements: SettlementView[] = [];
			let created = 0;
			for (const merchantId of [...merchants].sort()) {
				const result = await this.finalize(merchantId, month, true);
				if (result.created) created++;
				settlements.push(this.toView(result.settlement));
			}
			const previous = await this.closedThrough();
			if (previous)
				await this.state.update({ _id: STATE_ID, month: previous }, { $set: { month } });
			else if (!(await this.state.insertUnique({ _id: STATE_ID, month })))
				await this.state.update({ _id: STATE_ID, month: { $lt: month } }, { $set: { month } });
			if (created) this.logger.info(`Month-end ${month}: ${created} settlement(s) made final.`);
			return { billingMonth: month, settlements, created };
		},

		/**
		 * The merchant's final settlement of a month: made once, when the month closes, and applied to the
		 * view. Asked for after the month closed without one, it is empty: what arrives late for a
		 * closed month is carried into the first open one.
		 */
		async finalize(this: This, merchantId: string, month: string, closing: boolean) {
			const id = `${merchantId}:${month}`;
			let settlement = await this.settlements.findById(id);
			let created = false;
			if (!settlement) {
				const made = await this.compute(
					merchantId,
					month,
					previousMonth(new Date(monthBounds(month)[0])),
					"final"
				);
				if (!closing)
					Object.assign(made, {
						usedPoints: 0,
						dealCount: 0,
						adjustmentPoints: 0,
						fee: 0,
						billingAmount: 0,
						lines: []
					});
				// Two nodes closing at once: the unique id lets one win, and both apply its lines.
				created = await this.settlements.insertUnique(made);
				settlement = created ? made : ((await this.settlements.findById(id)) as Settlement);
			}
			await this.apply(settlement);
			return { settlement, created };
		},

		/** Records each line's points on its row once (a rerun after a crash applies only the rest). */
		async apply(this: This, settlement: Settlement) {
			const [, end] = monthBounds(settlement.billingMonth);
			for (const line of settlement.lines)
				await this.store.update(
					{ _id: line.dealId, [`billedBy.${settlement._id}`]: { $exists: false } },
					{ $inc: { billed: line.points }, $set: { [`billedBy.${settlement._id}`]: true } }
				);
			// Rows that now agree are no longer open; a change meanwhile (point, cancellation, return) keeps one open.
			for (const row of await this.store.find({
				query: { merchantId: settlement.merchantId, open: true, dealDate: { $lt: end } }
			}))
				if (due(row) === (row.billed ?? 0))
					await this.store.update(
						{
							_id: row._id,
							open: true,
							point: row.point ?? { $exists: false },
							cancelled: row.cancelled ?? { $exists: false },
							returnedPoints: row.returnedPoints ?? { $exists: false },
							billed: row.billed ?? { $exists: false }
						},
						{ $unset: { open: true } }
					);
		},

		async monthEndCheck(this: This) {
			await this.closeMonths(previousMonth(this.now()));
		},

		toView(settlement: Settlement) {
			const { _id, ...rest } = settlement;
			return { id: _id, ...rest };
		}
	},

	created(this: This) {
		this.settlements = openCollection<Settlement>(this, "settlements", [
			{ fields: { merchantId: 1 } }
		]);
		this.state = openCollection(this, "billing-state");
		this.lock = new KeyedLock();
	},

	async started(this: This) {
		this.monthEndStopped = false;
		await Promise.all([this.settlements, this.state].map(c => c.connect(this.logger)));
		// The first check comes a few seconds after start, once the outboxes have sent what waited
		// in them while this node was down (a month closes only when its events are handled, but an
		// event still in another service's outbox is not yet anywhere to be waited for).
		const check = (delayMs: number) => {
			if (this.monthEndStopped) return;
			this.monthEndTimer = setTimeout(() => {
				this.monthEndCheck()
					.catch(err => this.logger.error("Month-end job failed; retrying at the next check:", err))
					.finally(() => check(this.settings.monthEnd.checkEveryMs));
			}, delayMs);
		};
		check(this.settings.monthEnd.firstCheckMs);
	},

	async stopped(this: This) {
		// A check in flight schedules the next when it ends: tell it not to.
		this.monthEndStopped = true;
		clearTimeout(this.monthEndTimer);
		await Promise.all([this.settlements, this.state].map(c => c.disconnect()));
	}
};

export default BillingService;
