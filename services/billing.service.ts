/**
 * Billing: each merchant's monthly settlement, both sides of it. The points redeemed at the
 * merchant (its `use` deals) the coalition pays for, less its fee; the points the merchant's `save`
 * deals issued the merchant pays for, at its point price. `net` is what is left: positive, the
 * coalition pays the merchant; negative, the merchant pays the coalition. Billing reads only its
 * own CQRS view — one row per deal, fed by `deal.saved`, `deal.used`, `deal.cancelled` and
 * `deal.returned`, never the deals store. Months are calendar months in UTC.
 *
 * Each row keeps the rate its deal was made under, from the terms the deal recorded (a use's
 * redemption fee, a save's point price; this node's defaults for a deal made before terms were
 * recorded), and every line is priced at its own row's rate, toward zero in basis points: a use's
 * points × (1 − fee), a save's points × price. Every figure of a settlement is a sum of its lines,
 * so a statement's lines and totals agree to the unit whatever the terms of each deal.
 *
 * A month that has not closed is settled `provisional`: its figures are recomputed on every read and
 * request. A month closes — its settlements become `final` and never change — once its end plus
 * `MONTH_END_GRACE_MINUTES` has passed and this service has handled every deal event published
 * before then. Months close in order. A change that reaches a closed month (a late deal, a
 * cancellation or return after the settlement) is carried into the merchant's next open settlement
 * as an adjustment line naming the deal and its month: never lost, and no final figure changes.
 *
 * How: every view row knows how many of its points final settlements have billed (`billed`, with the
 * settlements that did it, so applying one twice changes nothing). What a row should be billed is its
 * points less those given back by its returns, or 0 once cancelled; a difference is a line of the
 * month's settlement, or an adjustment in the first open month once the row's own month has closed.
 * Rows are `open` until they agree.
 *
 * A save's tier bonus (`deal.bonus`, from points) is the coalition's, not the merchant's: billed to
 * no one, each settlement shows the bonus its month's saves keep (`bonus`), outside `net`. It is
 * informational: what a return takes of it after the month closed changes no final settlement.
 *
 * The month-end job checks the clock soon after start and then once a minute, and closes every past
 * month that can close, so a node down through two month-ends, or a clock that jumped, still closes
 * each month. Closing is idempotent: a rerun, or two billing nodes closing the same month, changes
 * nothing.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import {
	consume,
	outboxEvent,
	type DealBonusEvent,
	type DealEvent,
	type OutboxEvent,
	type SettlementFinalizedEvent
} from "../contracts/channels";
import { assertOwnMerchant, type CallerMeta } from "../lib/gateway/access";
import { CSV, csvAnswer, type AnswerMeta } from "../lib/gateway/answers";
import { clientError, notFound } from "../lib/errors";
import { KeyedLock } from "../lib/keyed-lock";
import { onScrape, SERIES } from "../lib/ops/metrics";
import * as P from "../lib/params";
import { addMonths, monthBounds, monthOf, previousMonth } from "../lib/months";
import { applyRate, rateOf, settlementAmounts } from "../lib/rates";
import { DbMixin, openCollection, type Collection, type DbThis } from "../mixins/db.mixin";
import { OUTBOX_INDEX, outboxSample, sendEvent, traced } from "../mixins/outbox.mixin";

/** The side of a settlement a deal is on: points redeemed at the merchant, or issued by it. */
export type DealSide = "use" | "save";

export interface BillingAmountView {
	/** The deal's id: the view row follows the deal. */
	_id: string;
	/** The deal's type; a row without one is a use (rows made before saves were billed). */
	type?: DealSide;
	/** The rate its lines are priced at (bp): a use's redemption fee, a save's point price. */
	rateBp?: number;
	merchantId?: string;
	memberId?: string;
	point?: number;
	dealDate?: string;
	cancelled?: boolean;
	/** Points given back by the deal's partial returns, in total (the latest total known: totals only grow). */
	returnedPoints?: number;
	/** A save's tier bonus after its returns, funded by the coalition (the least known: it only shrinks). */
	bonusPoints?: number;
	/** Points billed by final settlements, and which settlements (`<merchantId>:<YYYYMM>`) billed them. */
	billed?: number;
	billedBy?: Record<string, true>;
	/** Set by every change; cleared once what is billed matches what should be. */
	open?: boolean;
}

export interface SettlementLine {
	/** The deal's own month (named after its type), or a change carried from a closed month. */
	kind: DealSide | "adjustment";
	/** The deal's type: the side of the settlement the line is on. */
	type: DealSide;
	dealId: string;
	dealDate: string;
	/** Points this line bills (negative: taken back). */
	points: number;
	/**
	 * The points at the deal's own rate, toward zero: for a use, what the coalition pays the merchant
	 * (the points less the fee); for a save, what the merchant pays.
	 */
	amount: number;
	/** An adjustment's month: the final month the change reached. */
	month?: string;
	reason?:
		| "LATE_USE"
		| "LATE_SAVE"
		| "CANCELLED_AFTER_SETTLEMENT"
		| "RETURNED_AFTER_SETTLEMENT"
		| "CORRECTION";
}

/**
 * One side's figures: the points of its lines and what they come to; `fee` is what the coalition
 * keeps of the points redeemed.
 */
export interface Redeemed {
	points: number;
	fee: number;
	amount: number;
}
export interface Issued {
	points: number;
	amount: number;
}

export interface Settlement {
	_id: string;
	merchantId: string;
	billingMonth: string;
	status: "provisional" | "final";
	/** Points of the month's own uses, and how many. */
	usedPoints: number;
	dealCount: number;
	/** Points of uses carried from closed months. */
	adjustmentPoints: number;
	/**
	 * The redemption fee every use-side line was priced at; null when there are none, or when they
	 * were made under different terms.
	 */
	feeRate: number | null;
	/** `redeemed.fee` and `redeemed.amount`, named as before settlements had two sides. */
	fee: number;
	billingAmount: number;
	redeemed: Redeemed;
	issued: Issued;
	/** redeemed − issued amounts: positive, the coalition pays the merchant; negative, it is paid. */
	net: number;
	/** The tier bonus the month's saves keep: funded by the coalition, not in `net`. */
	bonus: { points: number };
	lines: SettlementLine[];
	/** When a final settlement was made; when a provisional one was computed. */
	settledAt?: string;
	computedAt?: string;
	/** A final settlement's `settlement.finalized`, written with it and pulled once sent. */
	outbox?: OutboxEvent[];
}

export type SettlementView = Omit<Settlement, "_id" | "outbox"> & { id: string };

/** What `settlement.finalized` tells of a final settlement. */
const finalizedOf = (settlement: Settlement): SettlementFinalizedEvent => ({
	settlementId: settlement._id,
	merchantId: settlement.merchantId,
	billingMonth: settlement.billingMonth,
	redeemed: settlement.redeemed,
	issued: settlement.issued,
	net: settlement.net,
	settledAt: settlement.settledAt as string
});

/** Every merchant's settlement of a month (`GET /billings`), and the coalition's totals of them. */
export interface MonthSettlements {
	billingMonth: string;
	status: Settlement["status"];
	settlements: SettlementView[];
	totals: Pick<Settlement, "redeemed" | "issued" | "net" | "bonus">;
}

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
	/** A final settlement as it was made, or an open month's provisional one as of now. */
	current(merchantId: string, month: string): Promise<Settlement>;
	provisional(merchantId: string, month: string, closedThrough?: string): Promise<Settlement>;
	compute(
		month: string,
		carry: boolean,
		status: Settlement["status"],
		merchantId?: string
	): Promise<Map<string, Settlement>>;
	firstOpenMonth(): Promise<string | undefined>;
	closeMonths(upTo: string): Promise<ClosedMonth[]>;
	closeMonth(month: string): Promise<ClosedMonth>;
	finalize(made: Settlement): Promise<{ settlement: Settlement; created: boolean }>;
	announceFinal(settlements?: Settlement[]): Promise<void>;
	apply(settlement: Settlement): Promise<void>;
	note(deal: DealEvent, change: Partial<BillingAmountView>, returnedPoints?: number): Promise<void>;
	noteBonus(bonus: DealBonusEvent): Promise<void>;
	canClose(month: string): Promise<boolean>;
	closedThrough(): Promise<string | undefined>;
	/** The months past their end and grace whose settlements are not final yet (none when all is well). */
	overdueMonths(): Promise<string[]>;
	monthEndCheck(): Promise<void>;
	assertStarted(month: string): void;
	/** The clock; a test may run the service with another. */
	now(): Date;
	toView(settlement: Settlement): SettlementView;
}

/** The rates of deals that recorded no terms, in basis points. */
interface DefaultRates {
	/** The share of used points a merchant pays as a fee (SETTLEMENT_FEE). */
	settlementFeeBp: number;
	/** What a merchant pays per point it issues (POINT_PRICE). */
	pointPriceBp: number;
}

interface Settings extends ServiceSettingSchema, DefaultRates {
	/** How long after a month's end it is closed (MONTH_END_GRACE_MINUTES), when the clock is first checked after start, and how often after (ms). */
	monthEnd: { graceMs: number; firstCheckMs: number; checkEveryMs: number };
}

type This = Service<Settings> &
	DbThis<BillingAmountView> &
	Methods & {
		settlements: Collection<Settlement>;
		state: Collection<{ _id: string; month: string }>;
		lock: KeyedLock;
		monthEndTimer?: NodeJS.Timeout;
		monthEndStopped?: boolean;
		/** Takes back the gauges when the service stops. */
		scrape?: () => void;
	};

/** The channels whose events make the view, for the "caught up" check. */
const VIEW_CHANNELS = ["deal.saved", "deal.used", "deal.cancelled", "deal.returned", "deal.bonus"];

/** The statement's columns: a line's fields, and the total rows' (`kind` total, `type` the figure). */
const STATEMENT_COLUMNS = [
	"kind",
	"type",
	"dealId",
	"dealDate",
	"points",
	"amount",
	"reason",
	"month"
] as const;

const STATE_ID = "closed-through";

/**
 * What a row should have billed: its points less those returned, or nothing once cancelled (or
 * before its deal is known).
 */
const due = (row: BillingAmountView): number =>
	row.cancelled || row.point == null ? 0 : Math.max(0, row.point - (row.returnedPoints ?? 0));

const sideOf = (row: BillingAmountView): DealSide => row.type ?? "use";

const defaultRate = (side: DealSide, rates: DefaultRates) =>
	side === "save" ? rates.pointPriceBp : rates.settlementFeeBp;

/** What `points` of a side come to at `rateBp`: a use's less the fee, a save's at the price. */
const amountOf = (side: DealSide, points: number, rateBp: number) =>
	side === "use" ? settlementAmounts(points, rateBp).billingAmount : applyRate(points, rateBp);

/** Why a row of a closed month has a difference to carry. */
function reasonOf(row: BillingAmountView): SettlementLine["reason"] {
	if (!row.billed) return sideOf(row) === "save" ? "LATE_SAVE" : "LATE_USE";
	if (row.cancelled) return "CANCELLED_AFTER_SETTLEMENT";
	return due(row) < row.billed ? "RETURNED_AFTER_SETTLEMENT" : "CORRECTION";
}

const sum = <T>(items: readonly T[], of: (item: T) => number) =>
	items.reduce((total, item) => total + of(item), 0);

/** A merchant's lines of the month, the redemption fees (bp) of its use-side lines, and its saves' bonus. */
interface MerchantLines {
	lines: SettlementLine[];
	feesBp: Set<number>;
	bonusPoints: number;
}

/**
 * The lines of `month` from the view's rows (sorted by deal date), by merchant: each row's
 * difference in its own month and, when `carry` (the first open month), those of rows of closed
 * months as adjustments. A merchant with a row of the month is there even without a line (its
 * deal was cancelled): closing the month makes its settlement.
 */
export function linesByMerchant(
	rows: readonly BillingAmountView[],
	month: string,
	carry: boolean,
	rates: DefaultRates
): Map<string, MerchantLines> {
	const merchants = new Map<string, MerchantLines>();
	for (const row of rows) {
		if (!row.merchantId || !row.dealDate) continue;
		const rowMonth = monthOf(row.dealDate);
		const points = due(row) - (row.billed ?? 0);
		if (rowMonth !== month && (!carry || points === 0)) continue;
		const merchant = merchants.get(row.merchantId) ?? noLines();
		merchants.set(row.merchantId, merchant);
		if (rowMonth === month) merchant.bonusPoints += row.bonusPoints ?? 0;
		if (points === 0) continue;
		const type = sideOf(row);
		const rateBp = row.rateBp ?? defaultRate(type, rates);
		if (type === "use") merchant.feesBp.add(rateBp);
		const line = {
			type,
			dealId: row._id,
			dealDate: row.dealDate,
			points,
			amount: amountOf(type, points, rateBp)
		};
		merchant.lines.push(
			rowMonth === month
				? { kind: type, ...line }
				: { kind: "adjustment", ...line, month: rowMonth, reason: reasonOf(row) }
		);
	}
	return merchants;
}

/** A merchant's settlement of its lines: every figure a sum of them. */
export function settlementOfLines(
	merchantId: string,
	month: string,
	{ lines, feesBp, bonusPoints }: MerchantLines,
	status: Settlement["status"],
	at: string
): Settlement {
	const redeeming = lines.filter(line => line.type === "use");
	const issuing = lines.filter(line => line.type === "save");
	const uses = redeeming.filter(line => line.kind === "use");
	const usedPoints = sum(uses, line => line.points);
	const redeemedPoints = sum(redeeming, line => line.points);
	const redeemedAmount = sum(redeeming, line => line.amount);
	const redeemed = {
		points: redeemedPoints,
		fee: redeemedPoints - redeemedAmount,
		amount: redeemedAmount
	};
	const issued = {
		points: sum(issuing, line => line.points),
		amount: sum(issuing, line => line.amount)
	};
	return {
		_id: `${merchantId}:${month}`,
		merchantId,
		billingMonth: month,
		status,
		usedPoints,
		dealCount: uses.length,
		adjustmentPoints: redeemedPoints - usedPoints,
		feeRate: feesBp.size === 1 ? rateOf([...feesBp][0]) : null,
		fee: redeemed.fee,
		billingAmount: redeemed.amount,
		redeemed,
		issued,
		net: redeemed.amount - issued.amount,
		bonus: { points: bonusPoints },
		lines,
		...(status === "final" ? { settledAt: at } : { computedAt: at })
	};
}

const noLines = (): MerchantLines => ({ lines: [], feesBp: new Set(), bonusPoints: 0 });

/**
 * A stored final settlement as settlements now read. One made before they had two sides billed uses
 * only, and recorded no amount per line (its billing amount was reckoned on its total); one made
 * before tiers shows no bonus.
 */
function upgraded(settlement: Settlement): Settlement {
	const bonus = settlement.bonus ?? { points: 0 };
	if (settlement.issued) return { ...settlement, bonus };
	const { usedPoints, adjustmentPoints, fee, billingAmount } = settlement;
	return {
		...settlement,
		redeemed: { points: usedPoints + adjustmentPoints, fee, amount: billingAmount },
		issued: { points: 0, amount: 0 },
		net: billingAmount,
		bonus,
		lines: settlement.lines.map(line => ({ ...line, type: "use" }))
	};
}

/** The coalition's totals of a month's settlements. */
function totalsOf(settlements: readonly Settlement[]): MonthSettlements["totals"] {
	const redeemed = {
		points: sum(settlements, s => s.redeemed.points),
		fee: sum(settlements, s => s.redeemed.fee),
		amount: sum(settlements, s => s.redeemed.amount)
	};
	const issued = {
		points: sum(settlements, s => s.issued.points),
		amount: sum(settlements, s => s.issued.amount)
	};
	const bonus = { points: sum(settlements, s => s.bonus.points) };
	return { redeemed, issued, net: redeemed.amount - issued.amount, bonus };
}

/** A settlement's statement rows: one per line, then its totals (`kind` total), the bonus last. */
export function statementRows(settlement: Settlement): object[] {
	const { redeemed, issued, net, bonus } = settlement;
	const total = (type: string, points: number | undefined, amount?: number) => ({
		kind: "total",
		type,
		points,
		amount
	});
	return [
		...settlement.lines,
		total("redeemed", redeemed.points, redeemed.amount),
		total("fee", undefined, redeemed.fee),
		total("issued", issued.points, issued.amount),
		total("net", undefined, net),
		total("bonus", bonus.points)
	];
}

/** Whether `month`'s settlements carry the changes of closed months: the first open one's do. */
const carries = (month: string, closedThrough: string | undefined) =>
	closedThrough !== undefined && month === addMonths(closedThrough, 1);

const BillingService: ServiceSchema<Settings, Methods, object, This> = {
	name: "billing",
	mixins: [
		DbMixin("billing-amount-views", [
			{ fields: { merchantId: 1, dealDate: 1 } },
			{ fields: { dealDate: 1 } }
		]),
		ConfiguredSettings<Settings>(config => ({
			monthEnd: { graceMs: config.monthEndGraceMs, firstCheckMs: 10_000, checkEveryMs: 60_000 },
			settlementFeeBp: config.settlementFeeBp,
			pointPriceBp: config.pointPriceBp
		}))
	],

	actions: {
		view: {
			rest: "GET /billing-amount-views/:dealId",
			summary: "The billing view of one use deal: the points it settles at its merchant",
			params: { $$strict: true, dealId: P.id },
			async handler(this: This, ctx: Context<{ dealId: string }, CallerMeta>) {
				const row = await this.store.findById(ctx.params.dealId);
				// A use returned whole, at once or in parts, bills nothing: it has no billing amount. A
				// save is on the other side of the settlement: not a billing amount either.
				if (!row || sideOf(row) !== "use" || due(row) === 0)
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
			summary:
				"Settle a merchant's month: points redeemed there less the fee, and points it issued",
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
		 * Every merchant's settlement of a month, as `get` answers each, and the coalition's totals: a
		 * closed month's final ones; an open month's provisional ones of the merchants with lines in it
		 * (their deals, or changes carried into it).
		 */
		list: {
			rest: "GET /billings",
			summary: "Every merchant's settlement of a month, with the coalition's totals",
			params: { $$strict: true, billingMonth: P.month },
			async handler(this: This, ctx: Context<{ billingMonth: string }>): Promise<MonthSettlements> {
				const month = ctx.params.billingMonth;
				this.assertStarted(month);
				const closedThrough = await this.closedThrough();
				const closed = closedThrough !== undefined && month <= closedThrough;
				const settlements = closed
					? (
							await this.settlements.find({ query: { billingMonth: month }, sort: ["merchantId"] })
						).map(upgraded)
					: [...(await this.compute(month, carries(month, closedThrough), "provisional"))]
							.sort(([a], [b]) => a.localeCompare(b))
							.map(([, settlement]) => settlement)
							.filter(settlement => settlement.lines.length);
				return {
					billingMonth: month,
					status: closed ? "final" : "provisional",
					settlements: settlements.map(s => this.toView(s)),
					totals: totalsOf(settlements)
				};
			}
		},

		/** A final settlement as it was made, or an open month's provisional one as of now. */
		get: {
			rest: "GET /billings/:merchantId/:billingMonth",
			summary: "A merchant's settlement for a month (provisional until the month is closed)",
			params: { $$strict: true, merchantId: P.id, billingMonth: P.month },
			async handler(this: This, ctx: Context<{ merchantId: string; billingMonth: string }>) {
				return this.toView(await this.current(ctx.params.merchantId, ctx.params.billingMonth));
			}
		},

		/** The settlement `get` answers, as a file a partner's accounting loads. */
		statement: {
			rest: "GET /billings/:merchantId/:billingMonth/statement.csv",
			summary: "A merchant's settlement for a month as CSV: a row per line, then the totals",
			responseType: CSV,
			params: { $$strict: true, merchantId: P.id, billingMonth: P.month },
			async handler(
				this: This,
				ctx: Context<{ merchantId: string; billingMonth: string }, CallerMeta & AnswerMeta>
			) {
				const { merchantId, billingMonth } = ctx.params;
				return csvAnswer(
					ctx,
					{ filename: `${merchantId}-${billingMonth}.csv`, columns: STATEMENT_COLUMNS },
					statementRows(await this.current(merchantId, billingMonth))
				);
			}
		}
	},

	channels: consume<This>("billing", {
		async "deal.saved"(deal) {
			await this.note(deal, { memberId: deal.memberId, point: deal.point });
		},
		async "deal.used"(deal) {
			await this.note(deal, { memberId: deal.memberId, point: deal.point });
		},
		async "deal.cancelled"(deal) {
			// Also when the cancellation overtakes the deal: the row then never bills anything.
			await this.note(deal, { cancelled: true });
		},
		async "deal.returned"(deal) {
			await this.note(deal, {}, deal.returnedPoints);
		},
		async "deal.bonus"(bonus) {
			await this.noteBonus(bonus);
		}
	}),

	methods: {
		now: () => new Date(),

		/**
		 * Records a deal event on its row, with the deal's type and rate. A return carries the deal's
		 * total after it, so `$max` keeps the latest whatever the order returns arrive in, and a
		 * redelivery changes nothing.
		 */
		async note(
			this: This,
			deal: DealEvent,
			change: Partial<BillingAmountView>,
			returnedPoints?: number
		) {
			const { terms, type } = deal;
			const rateBp = terms && (type === "save" ? terms.pointPriceBp : terms.redemptionFeeBp);
			await this.store.upsert(
				{ _id: deal.dealId },
				{
					$set: {
						merchantId: deal.merchantId,
						dealDate: deal.dealDate,
						type,
						...(rateBp === undefined ? {} : { rateBp }),
						...change,
						open: true
					},
					...(returnedPoints === undefined ? {} : { $max: { returnedPoints } })
				}
			);
			// A deal made before terms were recorded: this node's default, kept from its first event on.
			if (rateBp === undefined)
				await this.store.update(
					{ _id: deal.dealId, rateBp: { $exists: false } },
					{ $set: { rateBp: defaultRate(type, this.settings) } }
				);
		},

		/**
		 * Records what a save keeps of its bonus. Points post it with the save, then each return takes
		 * a share, so it only shrinks: `$min` keeps the latest whatever the order the postings' events
		 * arrive in, and a redelivery changes nothing. It leaves the row's `open` as it is: the bonus
		 * is no line to bill.
		 */
		async noteBonus(this: This, { dealId, merchantId, memberId, dealDate, bonusPoints }) {
			await this.store.upsert(
				{ _id: dealId },
				{ $set: { merchantId, memberId, dealDate, type: "save" }, $min: { bonusPoints } }
			);
		},

		async closedThrough(this: This) {
			return (await this.state.findById(STATE_ID))?.month;
		},

		/**
		 * The month the next close starts at: the one after the last closed. Nothing ever closed: the
		 * oldest month with activity on either side, or of a final settlement: a first close stopped
		 * before it recorded its month has made some settlements final and their rows no longer open
		 * (found by the simulation).
		 */
		async firstOpenMonth(this: This): Promise<string | undefined> {
			const closedThrough = await this.closedThrough();
			if (closedThrough) return addMonths(closedThrough, 1);
			const [[earliest], [firstFinal]] = await Promise.all([
				this.store.find({
					query: { open: true, dealDate: { $exists: true } },
					sort: ["dealDate"],
					limit: 1
				}),
				this.settlements.find({ query: {}, sort: ["billingMonth"], limit: 1 })
			]);
			const starts = [earliest?.dealDate && monthOf(earliest.dealDate), firstFinal?.billingMonth];
			return starts.filter((start): start is string => !!start).sort()[0];
		},

		async overdueMonths(this: This) {
			const overdue: string[] = [];
			const graceEnded = (month: string) =>
				new Date(monthBounds(month)[1]).getTime() + this.settings.monthEnd.graceMs <=
				this.now().getTime();
			let month = await this.firstOpenMonth();
			// Bounded: a store restored from years ago shows its first year of months, enough to alert.
			while (month && overdue.length < 12 && graceEnded(month)) {
				overdue.push(month);
				month = addMonths(month, 1);
			}
			return overdue;
		},

		assertStarted(this: This, month: string) {
			if (monthBounds(month)[0] > this.now().toISOString())
				throw clientError(422, "BILLING_MONTH_NOT_STARTED", `${month} has not started yet`, {
					billingMonth: month
				});
		},

		async current(this: This, merchantId: string, month: string) {
			const closedThrough = await this.closedThrough();
			if (closedThrough && month <= closedThrough) {
				const settlement = await this.settlements.findById(`${merchantId}:${month}`);
				if (!settlement)
					throw notFound(
						"SETTLEMENT_NOT_FOUND",
						`Merchant '${merchantId}' has no settlement for ${month}`,
						{ merchantId, billingMonth: month }
					);
				return upgraded(settlement);
			}
			this.assertStarted(month);
			return this.provisional(merchantId, month, closedThrough);
		},

		async provisional(this: This, merchantId: string, month: string, closedThrough?: string) {
			const computed = await this.compute(
				month,
				carries(month, closedThrough),
				"provisional",
				merchantId
			);
			// Nothing in the month yet: an empty settlement, as of now.
			return (
				computed.get(merchantId) ??
				settlementOfLines(merchantId, month, noLines(), "provisional", this.now().toISOString())
			);
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
				// Asked for after the month closed without one, it is empty: what arrives late for a
				// closed month is carried into the first open one.
				const empty = settlementOfLines(
					merchantId,
					month,
					noLines(),
					"final",
					this.now().toISOString()
				);
				const result = await this.lock.run("close", () => this.finalize(empty));
				return {
					settlement: upgraded(result.settlement),
					created: madeNow || result.created
				};
			}
			return {
				settlement: await this.provisional(merchantId, month, closedThrough),
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

		/**
		 * The settlements of `month` of every merchant with a row in it or, when `carry`, a change to
		 * carry into it (only `merchantId`'s when given), from one read of the view.
		 */
		async compute(
			this: This,
			month: string,
			carry: boolean,
			status: Settlement["status"],
			merchantId?: string
		) {
			const [start, end] = monthBounds(month);
			const rows = await this.store.find({
				query: {
					...(merchantId === undefined ? {} : { merchantId }),
					open: true,
					dealDate: carry ? { $lt: end } : { $gte: start, $lt: end }
				},
				sort: ["dealDate", "_id"]
			});
			const at = this.now().toISOString();
			const settlements = new Map<string, Settlement>();
			for (const [id, lines] of linesByMerchant(rows, month, carry, this.settings))
				settlements.set(id, settlementOfLines(id, month, lines, status, at));
			return settlements;
		},

		/** Closes, in order, every month from the first open one up to `upTo` that can close. */
		closeMonths(this: This, upTo: string) {
			return this.lock.run("close", async () => {
				const closed: ClosedMonth[] = [];
				let month = await this.firstOpenMonth();
				while (month && month <= upTo && (await this.canClose(month))) {
					closed.push(await this.closeMonth(month));
					month = addMonths(month, 1);
				}
				return closed;
			});
		},

		/**
		 * Makes final the settlement of every merchant active in `month` on either side (a cancelled
		 * deal included), or with a change to carry into it, then records the month closed.
		 */
		async closeMonth(this: This, month: string) {
			const made = await this.compute(month, true, "final");
			const settlements: SettlementView[] = [];
			let created = 0;
			for (const merchantId of [...made.keys()].sort()) {
				const result = await this.finalize(made.get(merchantId) as Settlement);
				if (result.created) created++;
				settlements.push(this.toView(upgraded(result.settlement)));
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
		 * The merchant's final settlement of a month: `made` unless one was made before, applied to the
		 * view either way (a rerun after a crash applies what is left). A new one is stored with its
		 * `settlement.finalized` in its outbox, then announced.
		 */
		async finalize(this: This, made: Settlement) {
			let settlement = await this.settlements.findById(made._id);
			let created = false;
			if (!settlement) {
				// Two nodes closing at once: the unique id lets one win, and both apply its lines.
				const stored = {
					...made,
					outbox: traced([outboxEvent("settlement.finalized", finalizedOf(made))])
				};
				created = await this.settlements.insertUnique(stored);
				settlement = created ? stored : ((await this.settlements.findById(made._id)) as Settlement);
			}
			await this.apply(settlement);
			if (created)
				await this.announceFinal([settlement]).catch(err =>
					this.logger.warn(
						`Settlement ${made._id} not announced yet; at the next check:`,
						(err as Error).message
					)
				);
			return { settlement, created };
		},

		/**
		 * Sends the `settlement.finalized` events still in final settlements' outboxes (all of them by
		 * default: what a crash or a channel outage left), pulling each once sent. Consumers key them by
		 * settlement, so one sent twice (a crash between the send and the pull) is told once.
		 */
		async announceFinal(this: This, settlements?: Settlement[]) {
			const waiting =
				settlements ?? (await this.settlements.find({ query: { "outbox.0": { $exists: true } } }));
			for (const settlement of waiting)
				for (const event of settlement.outbox ?? []) {
					await sendEvent(this.broker, event);
					await this.settlements.update(
						{ _id: settlement._id },
						{ $pull: { outbox: { id: event.id } } }
					);
				}
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
			await this.announceFinal();
			await this.closeMonths(previousMonth(this.now()));
		},

		toView(settlement: Settlement) {
			const { _id, outbox: _outbox, ...rest } = settlement;
			return { id: _id, ...rest };
		}
	},

	created(this: This) {
		this.settlements = openCollection<Settlement>(this, "settlements", [
			{ fields: { merchantId: 1 } },
			OUTBOX_INDEX
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
		this.scrape = onScrape(this.broker, async () => [
			...(await this.overdueMonths()).map(month => ({
				name: SERIES.settlementsOpen,
				labels: { month },
				value: 1
			})),
			await outboxSample(this.settlements)
		]);
	},

	async stopped(this: This) {
		// A check in flight schedules the next when it ends: tell it not to.
		this.monthEndStopped = true;
		clearTimeout(this.monthEndTimer);
		this.scrape?.();
		await Promise.all([this.settlements, this.state].map(c => c.disconnect()));
	}
};

export default BillingService;
