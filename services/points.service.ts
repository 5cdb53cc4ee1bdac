/**
 * Points: each member's account and its immutable ledger.
 *
 * Invariants (see docs/architecture.md): an account's balance equals the sum of its ledger entries and is never
 * below 0; every entry names its cause (`deal:<id>`, `deal-cancel:<id>`, `deal-return:<id>:<n>`, `order:<id>`, …), which is
 * the entry's id, so each cause is applied at most once.
 *
 * What a posting writes — the causes, the entries each change drafts, the balance and lots after
 * them — is lib/posting.ts, pure rules. This service keeps the effects: when to post, the lock, the
 * conditional write, the outbox and the ledger.
 *
 * How a change is posted (`post`): under a per-account lock, the entries are first written into the
 * account document together with the new balance — one atomic, conditional single-document write —
 * then copied into the ledger and cleared from the account. Until then they are the account's
 * unfinished posting (stored as `account.pending`): a crash in between leaves it there, and start-up
 * (or another instance's sweep) finishes the copy. The balance is therefore always the sum of the
 * ledger plus the unfinished posting, which is left over only by a crash. The same write records a
 * `points.posted` event (outbox), from which read models follow the ledger.
 *
 * Points that expire (POINTS_VALID_MONTHS, lib/expiry.ts): the same write keeps the account's
 * earning `lots`, what remains of each month's earnings, so they are exact under concurrency. Earns,
 * restored uses and positive adjustments are earnings of the month they are posted in (a restored
 * use gets a fresh validity: its original lots may have expired meanwhile); uses, revocations and
 * negative adjustments take from the oldest lots first. The expiry job (`expireDue`) runs at start and
 * then daily on every instance: one `expire:<memberId>:<YYYYMM>` entry per member and month due,
 * planned from the account's lots like any posting, so a rerun or a second instance finds nothing left.
 * After it, `announceExpiring` tells of each member's points that expire at the end of the month
 * (`points.expiring`), once a month: the account records the month told of in the same write as the
 * event (its outbox).
 *
 * Staff adjustments (`adjust`): one entry per adjustment (`adjustment:<id>`), with its reason and who
 * made it; a negative one never takes the balance below 0.
 *
 * Held points (a merchant's `holdDays`, recorded on the deal): a save's points are held until its
 * `dealDate + holdDays`, in the account's `held` and not in its balance, so a return inside the
 * window takes them back without a shortfall. The release job (`releaseDue`) runs at start and then
 * every `releaseCheckMs` on every instance, finding the accounts due by `nextRelease`; each release
 * is one `release:<dealId>` entry, planned from the account like any posting, so it happens once. A
 * use releases what is due first, so a late job never keeps spendable points from a member.
 *
 * Tiers (TIERS, lib/tiers.ts): the same write keeps the member's earnings of the last 12 months by
 * month and re-evaluates their tier from them; a change is a zero `tier:<memberId>:<version>` entry.
 * A save earns its base (`deal:<id>`) and, at the tier the member is in, a bonus of its own
 * (`deal-bonus:<id>`), which its cancellation and returns revoke in proportion; each posting that
 * changes a bonus sends what is left of it (`deal.bonus`) for the merchant's statement. The daily
 * tier review (`reviewTiers`) posts the falls that earnings leaving the window bring.
 *
 * Opening balances (`open`, from a bulk import: services/imports.service.ts): one `import:<memberId>`
 * entry per member, its points a lot of the month the programme they come from says they were earned
 * in, posted like any posting; a second import finds it and skips. The ledger export
 * (`exportLedger`) reads the whole ledger in posting order a page at a time (docs/imports-exports.md).
 *
 * Transfers (`transfer`, docs/points.md): the sender's `transfer-out:<id>` is posted with a
 * `transfer.sent` event in the same write; then the receiver's `transfer-in:<id>`, or, if the
 * receiver's account has closed, the sender's `transfer-refund:<id>`. The action completes it at once
 * and the event again after a crash; both are idempotent by cause.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { decodeTime, encodeTime } from "ulid";
import { ConfiguredSettings } from "../config/settings";
import {
	consume,
	outboxEvent,
	type DealEvent,
	type DealReturnedEvent,
	type OutboxEvent,
	type PostedEntry,
	type TransferSent
} from "../contracts/channels";
import { clientError, conflict, notFound } from "../lib/errors";
import { expiredThrough, expiringSoon, oldestOf, sumOf, type Expiring } from "../lib/expiry";
import { addMonths, monthOf } from "../lib/months";
import { actorOf, type CallerMeta } from "../lib/gateway/access";
import { sortableId } from "../lib/ids";
import { requestIdOf, type RequestMeta } from "../lib/request-id";
import {
	created,
	CSV,
	csvAnswer,
	NDJSON,
	ndjsonAnswer,
	type AnswerMeta
} from "../lib/gateway/answers";
import { KeyedLock } from "../lib/keyed-lock";
import { countPosted } from "../lib/ops/metrics";
import { assertActiveMember } from "../lib/active-member";
import * as P from "../lib/params";
import {
	adjustment,
	applyDrafts,
	releases,
	Cause,
	dealSource,
	debiting,
	earning,
	expiries,
	lotsOf,
	opening,
	orderSource,
	partialReturn,
	postedOf,
	reversal,
	revocation,
	standingAfter,
	totalOf,
	transferIn,
	transferOf,
	transferOut,
	transferRefund,
	withdrawal,
	type AccountState,
	type Draft,
	type LedgerEntry,
	type Refusal,
	type Source
} from "../lib/posting";
import { LOST, retryOnRace } from "../lib/retry-on-race";
import {
	bonusLeft,
	bonusReturn,
	saveBonus,
	takingBack,
	tierAt,
	tierStanding,
	tierView,
	type Tier,
	type TierState,
	type TierView
} from "../lib/tiers";
import {
	DbMixin,
	openCollection,
	type Collection,
	type DbThis,
	type Page,
	type Query
} from "../mixins/db.mixin";
import { OutboxMixin, OUTBOX_INDEX, type OutboxMethods } from "../mixins/outbox.mixin";

export type { LedgerEntry, Refusal, Source };

/** A member's account as stored: its state (lib/posting.ts), its unfinished posting, and what writes are conditioned on. */
export interface Account extends AccountState, TierState {
	openedAt: string;
	closedAt?: string;
	/** Incremented by every posting: what a write is conditioned on. Absent on accounts opened before it existed. */
	version?: number;
	/** The entries of the unfinished posting: written with the balance, cleared once copied into the ledger. */
	pending?: LedgerEntry[];
	/** When the unfinished posting was written: set and cleared with it, and indexed (sparse) so that sweeps find only those accounts. */
	pendingSince?: string;
	/** The oldest month in `lots`: what the expiry job looks accounts up by (and those without `lots` with points). */
	oldestLot?: string;
	/** The soonest `releaseAt` of the holds: what the release job looks accounts up by. */
	nextRelease?: string;
	/** The latest month whose expiring points `points.expiring` told of (`YYYYMM`). */
	expiringAnnounced?: string;
}

export interface PostResult {
	applied: boolean;
	balance: number;
	reason?: Refusal;
	/** When the entries were posted. */
	at?: string;
}

export interface AdjustmentView {
	adjustmentId: string;
	memberId: string;
	amount: number;
	reason: string;
	by: string;
	at: string;
	balance: number;
}

/** A transfer as its request is answered: `failed` when the receiver had withdrawn and the sender got the points back. */
export interface TransferView {
	transferId: string;
	fromMemberId: string;
	toMemberId: string;
	points: number;
	status: "completed" | "failed";
	reason?: "MEMBER_WITHDRAWN";
	/** When the points left the sender. */
	at: string;
}

/** One of a member's transfers as the listing shows it: `pending` until the receiver's side is posted. */
export interface TransferRow extends Omit<TransferView, "status"> {
	direction: "sent" | "received";
	status: TransferView["status"] | "pending";
}

/** What an opening balance came to: posted now, there already, or refused on a closed account. */
export interface OpeningResult {
	memberId: string;
	outcome: "created" | "skipped" | "withdrawn";
}

/** What one run of the release job did: how many members' held points it released, and how many points. */
export interface ReleaseRun {
	members: number;
	points: number;
}

/** What one run of the expiry job did: the months of earnings it expired through, and for whom. */
export interface ExpiryRun {
	through: string;
	members: number;
	points: number;
}

/** What the daily tier review did: the month it reviewed, and how many members' tiers fell. */
export interface TierReview {
	month: string;
	members: number;
}

/** What a plan posts: its drafts, and any events the same write sends besides `points.posted`. */
type Planned = Draft[] | { drafts: Draft[]; events: OutboxEvent[] };

/** `drafts` with the `deal.bonus` that tells billing what is left of the deal's bonus after them. */
function withBonus(deal: DealEvent, drafts: Draft[], bonusPoints: number): Planned {
	const { dealId, merchantId, memberId, dealDate } = deal;
	return {
		drafts,
		events: [outboxEvent("deal.bonus", { dealId, merchantId, memberId, dealDate, bonusPoints })]
	};
}

interface Methods {
	post(
		memberId: string,
		plan: (account: Account, at: string) => Promise<Planned | Refusal>,
		close?: boolean
	): Promise<PostResult>;
	credit(source: Source, amount: number, releaseAt?: string): Promise<PostResult>;
	saveDeal(deal: DealEvent): Promise<PostResult>;
	debit(source: Source, amount: number): Promise<PostResult>;
	reverse(source: Source, deal?: DealEvent): Promise<PostResult>;
	returnPart(deal: DealReturnedEvent): Promise<PostResult>;
	withdraw(memberId: string): Promise<PostResult>;
	expireLots(memberId: string, through: string): Promise<number>;
	expireDue(through?: string): Promise<ExpiryRun>;
	announceExpiring(): Promise<void>;
	scheduleExpiry(delayMs: number): void;
	releaseDue(): Promise<ReleaseRun>;
	scheduleRelease(delayMs: number): void;
	releaseAtOf(deal: DealEvent): string | undefined;
	reviewTiers(): Promise<TierReview>;
	scheduleTierReview(delayMs: number): void;
	now(): Date;
	adjusted(ctx: Context<unknown, AnswerMeta>, view: AdjustmentView): AdjustmentView;
	completeTransfer(transfer: TransferSent): Promise<TransferView>;
	sentOn(memberId: string, at: string): Promise<number>;
	transferred(ctx: Context<unknown, AnswerMeta>, view: TransferView): TransferView;
	openAccount(memberId: string, at: string): Promise<void>;
	finishPosting(account: Account): Promise<void>;
	copyToLedger(entries: LedgerEntry[]): Promise<void>;
	finishUnfinished(olderThanMs?: number): Promise<void>;
	toView(account: Account): AccountView;
	ledgerPages(afterSeq: string, filter: Query): AsyncGenerator<PostedEntry[]>;
}

export interface AccountView {
	memberId: string;
	balance: number;
	status: Account["status"];
	openedAt: string;
	updatedAt: string;
	closedAt?: string;
	/** Points earned but held in their deal's return window, not in `balance`. */
	held: number;
	/** The held points by deal, soonest released first. */
	releasing: { dealId: string; points: number; releaseAt: string }[];
	/** What expires at the end of this month and of the next two; empty when points never expire. */
	expiring: Expiring[];
	tier: TierView;
}

interface Settings extends ServiceSettingSchema {
	/** How often every instance looks for postings interrupted elsewhere, and how old they must be (ms). */
	sweepIntervalMs: number;
	/** Months earned points stay valid after the month they were earned in; 0: never expire. */
	pointsValidMonths: number;
	/** How often the daily jobs (expiry, tier review) look whether a new day has begun (ms): each runs at start and once a day, at most this late. */
	expiryCheckMs: number;
	/** How many accounts due the daily jobs and the release job read at a time. */
	expiryBatch: number;
	/** How often the release job looks for held points due (ms): a point is released at most this late. */
	releaseCheckMs: number;
	/** The tiers (TIERS), lowest first. */
	tiers: Tier[];
	/** How long a call to the members service may take (ms). */
	callTimeoutMs: number;
	/** The most points a member may send by transfer in one UTC day. */
	transferDailyLimit: number;
}

type This = Service<Settings> &
	DbThis<Account> &
	OutboxMethods &
	Methods & {
		ledger: Collection<LedgerEntry>;
		lock: KeyedLock;
		/**
		 * Per account, the version of this process's last posting whose entries are in the ledger while
		 * its events are sent (after the lock): its `pending` is not left unfinished.
		 */
		ledgered: Map<string, number>;
		sweepTimer?: NodeJS.Timeout;
		expiryTimer?: NodeJS.Timeout;
		releaseTimer?: NodeJS.Timeout;
		expiryStopped: boolean;
		expiredOn?: string;
		tierReviewTimer?: NodeJS.Timeout;
		tierReviewedOn?: string;
	};

/** The history export's columns: every field a ledger entry may have. */
const HISTORY_COLUMNS = [
	"at",
	"cause",
	"kind",
	"amount",
	"balanceAfter",
	"held",
	"shortfall",
	"sourceType",
	"sourceId",
	"merchantId",
	"counterpartId",
	"lotMonth",
	"earnedIn",
	"releaseAt",
	"reason",
	"by"
];
const HISTORY_PAGE = 1000;
/** How many ledger entries the ledger export reads at a time. */
const EXPORT_PAGE = 1000;
/** The ledger export's first window of posting time (ms); it adapts to about a page a step. */
const EXPORT_WINDOW_MS = 60_000;

/** How often a lost race for an account is re-planned before the posting gives up. */
const MAX_ATTEMPTS = 20;

/** The condition that the account is still as it was read. */
const versionOf = (account: Account) => ({
	_id: account._id,
	version: account.version ?? { $exists: false }
});
/** Ends the unfinished posting once its entries are in the ledger. */
const CLEAR_UNFINISHED = { $unset: { pending: true, pendingSince: true } };

/** A member's transfer entry as the listing shows it, given which of the sent ones' outcomes exist. */
function transferRow(entry: LedgerEntry, outcomes: Set<string>): TransferRow {
	const transferId = entry.sourceId;
	const counterpartId = entry.counterpartId as string;
	const points = Math.abs(entry.amount);
	if (entry.amount > 0)
		return {
			transferId,
			direction: "received",
			fromMemberId: counterpartId,
			toMemberId: entry.memberId,
			points,
			status: "completed",
			at: entry.at
		};
	const completed = outcomes.has(Cause.transferIn(transferId));
	const failed = outcomes.has(Cause.transferRefund(transferId));
	return {
		transferId,
		direction: "sent",
		fromMemberId: entry.memberId,
		toMemberId: counterpartId,
		points,
		status: completed ? "completed" : failed ? "failed" : "pending",
		...(failed ? { reason: "MEMBER_WITHDRAWN" as const } : {}),
		at: entry.at
	};
}

const PointsService: ServiceSchema<Settings, Methods, object, This> = {
	name: "points",
	// No index on `oldestLot`: its values are few months, which NeDB indexes turn into O(N) writes;
	// the daily job's query reads only the accounts due.
	mixins: [
		DbMixin("accounts", [
			{ fields: { pendingSince: 1 }, sparse: true },
			{ fields: { nextRelease: 1 }, sparse: true },
			OUTBOX_INDEX
		]),
		OutboxMixin,
		ConfiguredSettings<Settings>(config => ({
			sweepIntervalMs: 5000,
			// A lot is gone at most a minute after its month ends.
			expiryCheckMs: 60_000,
			expiryBatch: 500,
			// A held point is spendable at most half a minute after its window ends (a use does not wait).
			releaseCheckMs: 30_000,
			pointsValidMonths: config.pointsValidMonths,
			callTimeoutMs: config.callTimeoutMs,
			tiers: config.tiers,
			transferDailyLimit: config.transferDailyLimit
		}))
	],

	actions: {
		get: {
			rest: "GET /points/:memberId",
			summary: "A member's points balance",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				const account = await this.store.findById(ctx.params.memberId);
				if (!account)
					throw notFound(
						"ACCOUNT_NOT_FOUND",
						`No points account for member '${ctx.params.memberId}'`,
						ctx.params
					);
				return this.toView(account);
			}
		},

		history: {
			rest: "GET /points/:memberId/history",
			summary: "A member's ledger entries, newest first, paged",
			params: { $$strict: true, memberId: P.id, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ memberId: string; page: number; pageSize: number }>
			): Promise<Page<unknown>> {
				const { memberId, page, pageSize } = ctx.params;
				const result = await this.ledger.page({ memberId }, ["-seq"], page, pageSize);
				return { ...result, rows: result.rows.map(postedOf) };
			}
		},

		/** The member's whole ledger as CSV, oldest first: what a member or an accountant downloads. */
		historyCsv: {
			rest: "GET /points/:memberId/history.csv",
			summary: "A member's ledger entries as CSV, oldest first",
			responseType: CSV,
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }, AnswerMeta>) {
				const { memberId } = ctx.params;
				const rows: PostedEntry[] = [];
				// Page by page, so a long ledger is read in bounded steps.
				for (let page = 1; ; page++) {
					const entries = await this.ledger.find({
						query: { memberId },
						sort: ["seq"],
						limit: HISTORY_PAGE,
						offset: (page - 1) * HISTORY_PAGE
					});
					rows.push(...entries.map(postedOf));
					if (entries.length < HISTORY_PAGE) break;
				}
				return csvAnswer(
					ctx,
					{ filename: `${memberId}-history.csv`, columns: HISTORY_COLUMNS },
					rows
				);
			}
		},

		/**
		 * Every ledger entry in posting order (`seq`) as NDJSON, read a page at a time as the client
		 * takes them, so memory stays flat however long the ledger. `after` (an entry's `cause`, the
		 * last line read) resumes an export; `from` and `to` keep the entries posted in between.
		 */
		exportLedger: {
			rest: "GET /exports/ledger",
			summary:
				"Every ledger entry in posting order as NDJSON (a JSON entry a line), streamed; `after` (the last line's `cause`) resumes",
			responseType: NDJSON,
			params: {
				$$strict: true,
				from: { type: "date", convert: true, optional: true },
				to: { type: "date", convert: true, optional: true },
				after: { type: "string", min: 1, max: 300, optional: true }
			},
			async handler(
				this: This,
				ctx: Context<{ from?: Date; to?: Date; after?: string }, AnswerMeta>
			) {
				const { from, to, after } = ctx.params;
				let afterSeq = "";
				if (after !== undefined) {
					const entry = await this.ledger.findById(after);
					if (!entry)
						throw clientError(
							422,
							"ENTRY_NOT_FOUND",
							`'after' must be a ledger entry's cause (the last line read); '${after}' is none`,
							{ after }
						);
					afterSeq = entry.seq;
				}
				const at = {
					...(from ? { $gte: from.toISOString() } : {}),
					...(to ? { $lte: to.toISOString() } : {})
				};
				const filter = Object.keys(at).length ? { at } : {};
				return ndjsonAnswer(ctx, "ledger.ndjson", this.ledgerPages(afterSeq, filter));
			}
		},

		/**
		 * Opening balances brought by a bulk import (`imports`), one `import:<memberId>` entry per
		 * member, each in its lot of `month`: `created` when posted now, `skipped` when it was there
		 * already, `withdrawn` when the member's account has closed. Internal.
		 */
		open: {
			visibility: "public",
			params: {
				$$strict: true,
				openings: {
					type: "array",
					max: 1000,
					items: {
						type: "object",
						strict: true,
						props: { memberId: P.id, points: P.amount(P.MAX_POINTS), month: P.month }
					}
				}
			},
			async handler(
				this: This,
				ctx: Context<{ openings: { memberId: string; points: number; month: string }[] }>
			): Promise<OpeningResult[]> {
				const { openings } = ctx.params;
				// Those posted already, in one read rather than one a row (each posting checks again).
				const posted = new Set(
					(
						await this.ledger.find({
							query: { _id: { $in: openings.map(o => Cause.opening(o.memberId)) } }
						})
					).map(entry => entry._id)
				);
				// Each on its own account, so they run side by side: the lock and version keep each apart.
				return Promise.all(
					openings.map(async ({ memberId, points, month }) => {
						const cause = Cause.opening(memberId);
						if (posted.has(cause)) return { memberId, outcome: "skipped" as const };
						const result = await this.post(memberId, async account =>
							(await this.ledger.findById(cause)) ? "DUPLICATE" : opening(account, points, month)
						);
						const outcome =
							result.reason === "ACCOUNT_CLOSED"
								? ("withdrawn" as const)
								: result.applied
									? ("created" as const)
									: ("skipped" as const);
						return { memberId, outcome };
					})
				);
			}
		},

		/**
		 * A staff correction of a member's balance: a ledger entry with its reason and who made it.
		 * Each request is its own adjustment; a negative one is refused rather than taking the
		 * balance below 0.
		 */
		adjust: {
			rest: "POST /points/:memberId/adjustments",
			summary:
				"A staff adjustment: points given (positive) or taken (negative, never below 0), with its reason and who made it",
			params: {
				$$strict: true,
				memberId: P.id,
				amount: P.signedAmount(P.MAX_POINTS),
				reason: { type: "string", trim: true, min: 1, max: 500 }
			},
			async handler(
				this: This,
				ctx: Context<
					{ memberId: string; amount: number; reason: string },
					CallerMeta & RequestMeta & AnswerMeta
				>
			): Promise<AdjustmentView> {
				const { memberId, amount, reason } = ctx.params;
				// The gateway lets only staff here.
				const by = actorOf(ctx);
				// Under an Idempotency-Key the request id names the adjustment, so a run of the same request
				// again (its gateway died before answering) answers the adjustment it made, and never makes two.
				const { requestId } = requestIdOf(ctx);
				const adjustmentId = requestId ?? sortableId();
				const cause = Cause.adjustment(adjustmentId);
				const made = async () => {
					const entry = await this.ledger.findById(cause);
					return (
						entry &&
						this.adjusted(ctx, {
							adjustmentId,
							memberId,
							amount: entry.amount,
							reason: entry.reason ?? reason,
							by: entry.by ?? by,
							at: entry.at,
							balance: entry.balanceAfter
						})
					);
				};
				const before = requestId ? await made() : undefined;
				if (before) return before;
				await assertActiveMember(ctx, memberId, this.settings.callTimeoutMs);
				const result = await this.post(memberId, async account => {
					if (await this.ledger.findById(cause)) return "DUPLICATE";
					return adjustment(account, adjustmentId, amount, reason, by);
				});
				if (result.reason === "DUPLICATE") return (await made()) as AdjustmentView;
				if (result.reason === "ACCOUNT_CLOSED")
					throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has withdrawn`, { memberId });
				if (result.reason === "INSUFFICIENT_POINTS")
					throw conflict(
						"INSUFFICIENT_POINTS",
						`Member '${memberId}' has ${result.balance} points: ${-amount} cannot be taken`,
						{
							memberId,
							balance: result.balance,
							amount
						}
					);
				return this.adjusted(ctx, {
					adjustmentId,
					memberId,
					amount,
					reason,
					by,
					at: result.at as string,
					balance: result.balance
				});
			}
		},

		/**
		 * A staff transfer of points between two active members, within the sender's balance and daily
		 * limit. Answered once the receiver is credited (`completed`), or, if the receiver's account has
		 * closed meanwhile, once the sender is refunded (`failed`): 201 either way, the transfer exists.
		 */
		transfer: {
			rest: "POST /points/:memberId/transfers",
			summary:
				"A staff transfer of points to another member: completed, or failed with the sender refunded if the receiver withdrew meanwhile",
			params: {
				$$strict: true,
				memberId: P.id,
				toMemberId: P.id,
				points: P.amount(P.MAX_POINTS)
			},
			async handler(
				this: This,
				ctx: Context<
					{ memberId: string; toMemberId: string; points: number },
					RequestMeta & AnswerMeta
				>
			): Promise<TransferView> {
				const { memberId, toMemberId, points } = ctx.params;
				if (memberId === toMemberId)
					throw clientError(
						422,
						"TRANSFER_TO_SELF",
						`Member '${memberId}' cannot transfer points to themselves`,
						{ memberId }
					);
				// As for adjustments: under an Idempotency-Key the request id names the transfer, so a run
				// of the same request again answers (and finishes, if need be) the transfer it made.
				const { requestId } = requestIdOf(ctx);
				const transferId = requestId ?? sortableId();
				const made = async () => {
					const out = await this.ledger.findById(Cause.transferOut(transferId));
					return out && this.transferred(ctx, await this.completeTransfer(transferOf(out)));
				};
				const before = requestId ? await made() : undefined;
				if (before) return before;
				// Both asked at once; the sender's refusal is reported first.
				const checks = await Promise.allSettled(
					[memberId, toMemberId].map(id => assertActiveMember(ctx, id, this.settings.callTimeoutMs))
				);
				const refused = checks.find((c): c is PromiseRejectedResult => c.status === "rejected");
				if (refused) throw refused.reason;

				const { pointsValidMonths, transferDailyLimit } = this.settings;
				const transfer = { transferId, fromMemberId: memberId, toMemberId, points };
				let sentToday = 0;
				const result = await this.post(memberId, async (account, at) => {
					if (await this.ledger.findById(Cause.transferOut(transferId))) return "DUPLICATE";
					// Counted under the lock and the version condition: racing transfers cannot pass the limit.
					sentToday = await this.sentOn(memberId, at);
					const drafts = transferOut(
						account,
						transfer,
						sentToday,
						transferDailyLimit,
						pointsValidMonths > 0 ? expiredThrough(new Date(at), pointsValidMonths) : undefined
					);
					// The receiver's side follows from this event, sent with the sender's write.
					return typeof drafts === "string"
						? drafts
						: { drafts, events: [outboxEvent("transfer.sent", { ...transfer, at })] };
				});
				if (result.reason === "DUPLICATE") return (await made()) as TransferView;
				if (result.reason === "ACCOUNT_CLOSED")
					throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has withdrawn`, { memberId });
				if (result.reason === "TRANSFER_LIMIT_EXCEEDED")
					throw conflict(
						"TRANSFER_LIMIT_EXCEEDED",
						`Member '${memberId}' has sent ${sentToday} points today: ${points} more would pass the daily limit of ${transferDailyLimit}`,
						{ limit: transferDailyLimit, sentToday, points }
					);
				if (result.reason === "INSUFFICIENT_POINTS")
					throw conflict(
						"INSUFFICIENT_POINTS",
						`Member '${memberId}' has ${result.balance} points: ${points} cannot be sent`,
						{ memberId, balance: result.balance, points }
					);
				return this.transferred(
					ctx,
					await this.completeTransfer({ ...transfer, at: result.at as string })
				);
			}
		},

		/** A member's transfers as sender and as receiver, each with its outcome as the ledger has it. */
		transfers: {
			rest: "GET /points/:memberId/transfers",
			summary: "A member's transfers, sent and received, newest first, paged, with their status",
			params: { $$strict: true, memberId: P.id, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ memberId: string; page: number; pageSize: number }>
			): Promise<Page<TransferRow>> {
				const { memberId, page, pageSize } = ctx.params;
				// The sender's and the receiver's entries are of kind `transfer`; a refund is a restoration.
				const result = await this.ledger.page(
					{ memberId, kind: "transfer" },
					["-seq"],
					page,
					pageSize
				);
				const sent = result.rows.filter(e => e.amount < 0).map(e => e.sourceId);
				const outcomes = await this.ledger.find({
					query: {
						_id: { $in: sent.flatMap(id => [Cause.transferIn(id), Cause.transferRefund(id)]) }
					}
				});
				const found = new Set(outcomes.map(e => e._id));
				return { ...result, rows: result.rows.map(entry => transferRow(entry, found)) };
			}
		},

		/**
		 * The expiry job, run now: expires the earnings of every month through `through` (default: every
		 * month due) that are still left. A month not yet due is refused. Internal (REPL `expire`).
		 */
		expire: {
			visibility: "public",
			params: { $$strict: true, through: { ...P.month, optional: true } },
			handler(this: This, ctx: Context<{ through?: string }>): Promise<ExpiryRun> {
				return this.expireDue(ctx.params.through);
			}
		},

		/** The release job, run now: releases every hold due. Internal (REPL `release`). */
		release: {
			visibility: "public",
			params: { $$strict: true },
			handler(this: This): Promise<ReleaseRun> {
				return this.releaseDue();
			}
		},

		/**
		 * The daily tier review, run now: every account whose tier falls this month as its earnings
		 * leave the window. Internal.
		 */
		reviewTiers: {
			visibility: "public",
			params: { $$strict: true },
			handler(this: This): Promise<TierReview> {
				return this.reviewTiers();
			}
		},

		/** Takes points for a `use` deal: succeeds only with a confirmed ledger entry. Internal. */
		debit: {
			visibility: "public",
			params: {
				$$strict: true,
				memberId: P.id,
				sourceType: { type: "enum", values: ["deal", "order"] },
				sourceId: P.id,
				merchantId: P.optionalId,
				amount: P.amount(P.MAX_POINTS)
			},
			handler(this: This, ctx: Context<Source & { amount: number }>): Promise<PostResult> {
				const { amount, ...source } = ctx.params;
				return this.debit(source, amount);
			}
		},

		/**
		 * Every account against the sum of its ledger (and its earning lots, where it keeps them): the
		 * invariant an operator can check at any time. Also the totals of adjustments and expiries.
		 */
		audit: {
			visibility: "public",
			params: { $$strict: true },
			async handler(this: This) {
				const accounts = await this.store.find({ query: {} });
				const sums = new Map<string, number>();
				const adjustments = { count: 0, added: 0, taken: 0 };
				let expired = 0;
				for (const entry of await this.ledger.find({ query: {} })) {
					sums.set(entry.memberId, (sums.get(entry.memberId) ?? 0) + entry.amount);
					if (entry.kind === "expire") expired -= entry.amount;
					if (entry.kind === "adjust") {
						adjustments.count++;
						adjustments[entry.amount > 0 ? "added" : "taken"] += Math.abs(entry.amount);
					}
				}
				const mismatches = accounts
					.map(a => ({
						memberId: a._id,
						balance: a.balance,
						held: a.held ?? 0,
						ledgerSum: sums.get(a._id) ?? 0,
						lots: a.lots ? sumOf(a.lots) : a.balance,
						holds: Object.values(a.holds ?? {}).reduce((sum, hold) => sum + hold.points, 0),
						// The entries of an unfinished posting: there only while a posting runs, or after a crash.
						pending: a.pending?.length ?? 0
					}))
					.filter(
						a =>
							a.balance + a.held !== a.ledgerSum ||
							a.balance !== a.lots ||
							a.held !== a.holds ||
							a.balance < 0 ||
							a.pending > 0
					);
				return {
					accounts: accounts.length,
					entries: await this.ledger.count({}),
					adjustments,
					expired,
					mismatches
				};
			}
		}
	},

	channels: consume<This>("points", {
		async "member.joined"(member) {
			await this.openAccount(member.memberId, member.joinedAt);
		},
		async "member.withdrawn"(member) {
			await this.withdraw(member.memberId);
		},
		async "deal.saved"(deal) {
			await this.saveDeal(deal);
		},
		async "deal.cancelled"(deal) {
			await this.reverse(dealSource(deal), deal);
		},
		async "deal.returned"(deal) {
			await this.returnPart(deal);
		},
		async "order.paid"(order) {
			await this.credit(orderSource(order), order.points);
		},
		async "order.cancelled"(order) {
			await this.reverse(orderSource(order));
		},
		/** A `use` whose debit could not be confirmed: undo it if it happened, and refuse it if it comes late. */
		async "deal.voided"(deal) {
			await this.reverse(dealSource(deal));
		},
		/** The sender has been debited: finishes the transfer, should its request have died before it did. */
		async "transfer.sent"(transfer) {
			await this.completeTransfer(transfer);
		}
	}),

	methods: {
		/** An adjustment's answer: 201, located in the member's history, where its entry is. */
		adjusted(this: This, ctx: Context<unknown, AnswerMeta>, view: AdjustmentView): AdjustmentView {
			return created(ctx, `/api/points/${view.memberId}/history`, view);
		},

		/** A transfer's answer: 201, located in the sender's transfers. */
		transferred(this: This, ctx: Context<unknown, AnswerMeta>, view: TransferView): TransferView {
			return created(ctx, `/api/points/${view.fromMemberId}/transfers`, view);
		},

		/**
		 * Posts the entries `plan` drafts for the account, atomically and at most once per cause.
		 * `plan` runs under the account's lock, given the posting's time, and may answer a reason
		 * instead, to post nothing. `events` are written with the entries, after `points.posted`.
		 */
		async post(
			this: This,
			memberId: string,
			plan: (account: Account, at: string) => Promise<Planned | Refusal>,
			close = false
		) {
			// The lock serialises one process. Another points instance sharing the store (MongoDB) is
			// kept out by conditioning the write on the account's version, which every change
			// increments: a lost race re-plans on what the winner wrote. (A balance condition would
			// miss a posting that leaves the balance as it was, or one that changes it and back.)
			const attempt = async (): Promise<
				(PostResult & { send?: () => Promise<void> }) | typeof LOST
			> => {
				const now = this.now().toISOString();
				let account = await this.store.findById(memberId);
				if (!account) {
					await this.openAccount(memberId, now);
					account = (await this.store.findById(memberId)) as Account;
				}
				// A posting of this process whose entries are in the ledger, its events still being sent,
				// is not unfinished: this write replaces its `pending`, and its clearing then matches nothing.
				if (account.pending?.length && this.ledgered.get(memberId) !== account.version) {
					// An unfinished posting (a crash, a store error): finish it, then plan again on what it wrote.
					await this.finishPosting(account);
					return LOST;
				}
				const planned = await plan(account, now);
				if (typeof planned === "string")
					return { applied: false, balance: account.balance, reason: planned };
				const { drafts, events = [] } = Array.isArray(planned) ? { drafts: planned } : planned;

				const version = (account.version ?? 0) + 1;
				// The tier follows the earnings the drafts leave in the window, in the same write.
				const standing = tierStanding(this.settings.tiers, account, drafts, now, version, close);
				const { entries, balance, lots, held, holds } = applyDrafts(
					account,
					[...drafts, ...standing.drafts],
					now,
					sortableId
				);
				const posted = outboxEvent("points.posted", {
					memberId,
					closed: close,
					entries: entries.map(postedOf),
					lots,
					held,
					version,
					tier: standing.tier
				});
				const oldestLot = oldestOf(lots);
				const nextRelease = Object.values(holds)
					.map(hold => hold.releaseAt)
					.sort()[0];
				const { earned, tier, tierReview } = standing;
				const unset = {
					...(oldestLot ? {} : { oldestLot: true }),
					...(nextRelease ? {} : { nextRelease: true }),
					...(tierReview ? {} : { tierReview: true })
				};
				const update = {
					$inc: { balance: balance - account.balance, version: 1 },
					$set: {
						pending: entries,
						pendingSince: now,
						updatedAt: now,
						lots,
						held,
						holds,
						...(oldestLot ? { oldestLot } : {}),
						...(nextRelease ? { nextRelease } : {}),
						earned,
						tier,
						...(tierReview ? { tierReview } : {}),
						...(close ? { status: "closed", closedAt: now } : {})
					},
					...(Object.keys(unset).length ? { $unset: unset } : {})
				};
				// The entries go to the ledger before the event is sent; the clearing is written with its removal from the outbox.
				const finish = {
					run: async () => {
						await this.copyToLedger(entries);
						this.ledgered.set(memberId, version);
					},
					filter: versionOf({ ...account, version }),
					update: CLEAR_UNFINISHED
				};
				const record = await this.recordWithEvents(
					{ filter: versionOf(account), update },
					[posted, ...events],
					finish
				);
				if (!record) return LOST;
				countPosted(this.broker, entries);
				const send = async () => {
					// A later posting of the account wrote over this one's `pending`: nothing to clear.
					const superseded = this.ledgered.get(memberId) !== version;
					try {
						await record(superseded);
					} finally {
						if (!superseded && this.ledgered.get(memberId) === version)
							this.ledgered.delete(memberId);
					}
				};
				return { applied: true, balance, at: now, send };
			};
			// The events are sent after the lock is released: a channel that hangs (NATS down) then holds
			// up this posting only, not every later one of the account. They are in the account's outbox
			// already, and its entries in the ledger: a posting that comes meanwhile goes ahead (`ledgered`).
			const { send, ...result } = await this.lock.run(
				memberId,
				(): Promise<PostResult & { send?: () => Promise<void> }> =>
					retryOnRace(attempt, { attempts: MAX_ATTEMPTS, what: `Account '${memberId}'` })
			);
			await send?.();
			return result;
		},

		/**
		 * Finishes the account's unfinished posting: copies its entries into the ledger and clears them
		 * from the account. Safe to run twice at once (two instances finishing a dead one's posting):
		 * entries are keyed by cause, and the clearing is conditional on the version that wrote them.
		 */
		async finishPosting(this: This, account: Account) {
			await this.copyToLedger(account.pending ?? []);
			await this.store.update(versionOf(account), CLEAR_UNFINISHED);
		},

		async copyToLedger(this: This, entries: LedgerEntry[]) {
			for (const entry of entries) await this.ledger.insertUnique(entry);
		},

		credit(this: This, source: Source, amount: number, releaseAt?: string) {
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(Cause.of(source))) return "DUPLICATE";
				// Cancelled before its accrual arrived: nothing to earn.
				if (await this.ledger.findById(Cause.cancel(source))) return "CANCELLED";
				return earning(account, source, amount, releaseAt);
			});
		},

		/** When a save's points become spendable: the end of its return window, if that is still to come. */
		releaseAtOf(this: This, deal: DealEvent) {
			const days = deal.type === "save" ? (deal.terms?.holdDays ?? 0) : 0;
			if (days <= 0) return undefined;
			const releaseAt = new Date(new Date(deal.dealDate).getTime() + days * 86_400_000);
			return releaseAt > this.now() ? releaseAt.toISOString() : undefined;
		},

		/**
		 * A save's earning, and its bonus at the tier the member is in before it counts, both held
		 * until the end of its return window if its merchant holds points. A return that overtook the
		 * save posted both already; a cancellation that did, neither.
		 */
		saveDeal(this: This, deal: DealEvent) {
			const source = dealSource(deal);
			const releaseAt = this.releaseAtOf(deal);
			return this.post(source.memberId, async (account, at) => {
				if (await this.ledger.findById(Cause.of(source))) return "DUPLICATE";
				if (await this.ledger.findById(Cause.cancel(source))) return "CANCELLED";
				const earned = earning(account, source, deal.point, releaseAt);
				const tier = tierAt(this.settings.tiers, account, at);
				const bonus = saveBonus(account, deal, tier, releaseAt);
				return bonus.length ? withBonus(deal, [...earned, ...bonus], totalOf(bonus)) : earned;
			});
		},

		debit(this: This, source: Source, amount: number) {
			const { pointsValidMonths } = this.settings;
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(Cause.of(source))) return "DUPLICATE";
				if (await this.ledger.findById(Cause.cancel(source))) return "CANCELLED";
				// Held points past their window are spent, points past their validity never: the use
				// releases the holds and expires the lots due first.
				const now = this.now();
				return debiting(
					account,
					source,
					amount,
					pointsValidMonths > 0 ? expiredThrough(now, pointsValidMonths) : undefined,
					now.toISOString()
				);
			}).then(result =>
				result.reason === "DUPLICATE" ? { ...result, applied: true, reason: undefined } : result
			);
		},

		/**
		 * Undoes what a source did to the account, once. A use is restored in full (and expires at once
		 * if the member has withdrawn). An earning is revoked only as far as the balance allows: points
		 * already spent cannot be taken back, so the rest is recorded as `shortfall` for staff to see.
		 * If the source has not been applied yet, a zero entry records the cancellation, and the
		 * source is refused when it arrives. A cancelled save's bonus is revoked after its base
		 * (`deal-bonus-cancel:<id>`), the same way.
		 */
		reverse(this: This, source: Source, deal?: DealEvent) {
			return this.post(source.memberId, async (account, at) => {
				if (await this.ledger.findById(Cause.cancel(source))) return "DUPLICATE";
				const original = await this.ledger.findById(Cause.of(source));
				const drafts = takingBack(reversal(account, source, original), monthOf(original?.at ?? at));
				const bonus = deal && (await this.ledger.findById(Cause.bonus(deal.dealId)));
				if (!deal || !bonus) return drafts;
				const left = standingAfter(account, source, drafts);
				const revoked = revocation(
					Cause.bonusCancel(deal.dealId),
					source,
					bonus.amount,
					left.balance,
					left.held
				);
				return withBonus(deal, [...drafts, revoked], 0);
			});
		},

		/**
		 * One partial return of a deal (cause `deal-return:<id>:<n>`), once: the points the deals service
		 * reckoned for it are given back for a use, or revoked for a save as `reverse` revokes. A return
		 * may overtake its save's `deal.saved`: the earning is then posted with it (the event carries the
		 * deal), and `deal.saved` finds it done. A save's return also revokes its share of the bonus
		 * (`deal-bonus-return:<id>:<n>`).
		 */
		returnPart(this: This, deal: DealReturnedEvent) {
			const source = dealSource(deal);
			return this.post(source.memberId, async (account, at) => {
				if (await this.ledger.findById(Cause.dealReturn(deal.dealId, deal.return.n)))
					return "DUPLICATE";
				const original = await this.ledger.findById(Cause.of(source));
				const releaseAt = this.releaseAtOf(deal);
				const drafts = takingBack(
					partialReturn(account, deal, original, releaseAt),
					monthOf(original?.at ?? at)
				);
				if (deal.type === "use") return drafts;
				// Overtaken, the save's bonus is posted with its earning, at the tier the member is in now.
				const bonus = original
					? []
					: saveBonus(account, deal, tierAt(this.settings.tiers, account, at), releaseAt);
				const bonusPoints = original
					? ((await this.ledger.findById(Cause.bonus(deal.dealId)))?.amount ?? 0)
					: totalOf(bonus);
				if (!bonusPoints) return drafts;
				const before = [...drafts, ...bonus];
				const left = standingAfter(account, source, before);
				const share = bonusReturn(deal, bonusPoints, left.balance, left.held);
				return withBonus(
					deal,
					[...before, share],
					bonusLeft(bonusPoints, deal.point, deal.returnedPoints)
				);
			});
		},

		/**
		 * Finishes a transfer whose sender has been debited: credits the receiver, or, if the receiver's
		 * account has closed, refunds the sender. Decided under the receiver's posting: a closed account
		 * stays closed, and a credit already there wins, so the receiver and a refund never both get the
		 * points. Idempotent by cause: the request and the `transfer.sent` event may both run it.
		 */
		async completeTransfer(this: This, transfer: TransferSent): Promise<TransferView> {
			const { transferId, fromMemberId, toMemberId, points, at } = transfer;
			const view = { transferId, fromMemberId, toMemberId, points };
			const credited = await this.post(toMemberId, async account => {
				if (await this.ledger.findById(Cause.transferIn(transferId))) return "DUPLICATE";
				return transferIn(account, transfer);
			});
			if (credited.reason !== "ACCOUNT_CLOSED") return { ...view, status: "completed", at };
			await this.post(fromMemberId, async account => {
				if (await this.ledger.findById(Cause.transferRefund(transferId))) return "DUPLICATE";
				return transferRefund(account, transfer);
			});
			return { ...view, status: "failed", reason: "MEMBER_WITHDRAWN", at };
		},

		/**
		 * The points the member sent by transfer on `at`'s UTC day, refunded ones included. Read from the
		 * ledger rather than kept as a counter on the account: a posting plans on an account whose
		 * entries are all in the ledger (an unfinished posting is finished first), so under the lock and
		 * the version condition the sum is exact, and nothing more is written (index: memberId, kind, at).
		 */
		async sentOn(this: This, memberId: string, at: string) {
			// Every instant of a day sorts at or after its date, `YYYY-MM-DD`.
			const day = at.slice(0, 10);
			const sent = await this.ledger.find({
				query: { memberId, kind: "transfer", amount: { $lt: 0 }, at: { $gte: day } }
			});
			return -totalOf(sent);
		},

		/** A withdrawal: the remaining points expire as one entry and the account closes. */
		withdraw(this: This, memberId: string) {
			return this.post(
				memberId,
				async account => {
					if (
						account.status === "closed" ||
						(await this.ledger.findById(Cause.withdrawal(memberId)))
					)
						return "DUPLICATE";
					return withdrawal(account);
				},
				true
			);
		},

		/** Expires what is left of the member's earnings of every month through `through`: how many points. */
		async expireLots(this: This, memberId: string, through: string) {
			let points = 0;
			const result = await this.post(memberId, async account => {
				// Planned again after a lost race: only what the winner left counts.
				const due = expiries(account, through);
				points = -totalOf(due);
				if (account.status === "closed" || !due.length) return "DUPLICATE";
				return due;
			});
			return result.applied ? points : 0;
		},

		/**
		 * The expiry job: every account with earnings due through `through` (default: every month due
		 * now). Safe to rerun, and to run on several instances at once: each account's expiry is planned
		 * from its lots under the version condition, so whoever comes second finds nothing left.
		 */
		async expireDue(this: This, through?: string) {
			const due = expiredThrough(this.now(), this.settings.pointsValidMonths);
			if (this.settings.pointsValidMonths <= 0)
				throw conflict("EXPIRY_OFF", "Points never expire here (POINTS_VALID_MONTHS is 0)");
			if (through && through > due)
				throw clientError(
					409,
					"EXPIRY_NOT_DUE",
					`Earnings of ${through} are still valid: earnings expire through ${due} now`,
					{
						through,
						due
					}
				);
			const run: ExpiryRun = { through: through ?? due, members: 0, points: 0 };
			// In batches by id, so that a month's end with many members due never reads them all at once.
			for (let after = ""; ;) {
				const query = {
					_id: { $gt: after },
					$or: [
						{ oldestLot: { $lte: run.through } },
						{ lots: { $exists: false }, balance: { $gt: 0 } }
					]
				};
				const batch = await this.store.find({
					query,
					sort: ["_id"],
					limit: this.settings.expiryBatch
				});
				for (const account of batch) {
					const points = await this.expireLots(account._id, run.through);
					if (points > 0) {
						run.members++;
						run.points += points;
					}
				}
				if (batch.length < this.settings.expiryBatch) break;
				after = batch[batch.length - 1]._id;
			}
			if (run.points)
				this.logger.info(
					`Expired ${run.points} points of ${run.members} member(s), earned through ${run.through}.`
				);
			return run;
		},

		/**
		 * Tells of each active member's points that expire at the end of this month (`points.expiring`),
		 * once a month: the event is written into the account's outbox with the month it tells of, on
		 * the condition that no run told of that month yet, so a rerun, a restart or a second instance
		 * tells no one twice.
		 */
		async announceExpiring(this: This) {
			const now = this.now();
			const { pointsValidMonths: validMonths, expiryBatch } = this.settings;
			const month = monthOf(now.toISOString());
			const earnedIn = addMonths(month, -validMonths);
			let told = 0;
			for (let after = ""; ;) {
				const batch = await this.store.find({
					query: {
						_id: { $gt: after },
						status: "active",
						expiringAnnounced: { $ne: month },
						$or: [
							{ oldestLot: { $lte: earnedIn } },
							{ lots: { $exists: false }, balance: { $gt: 0 } }
						]
					},
					sort: ["_id"],
					limit: expiryBatch
				});
				for (const account of batch) {
					const [{ expiresAt, points }] = expiringSoon(lotsOf(account), validMonths, now, 1);
					if (points <= 0) continue;
					const event = outboxEvent("points.expiring", {
						memberId: account._id,
						month,
						expiresAt,
						points,
						at: now.toISOString()
					});
					const filter = {
						_id: account._id,
						expiringAnnounced: account.expiringAnnounced ?? { $exists: false }
					};
					if (
						await this.changeWithEvents(
							{ filter, update: { $set: { expiringAnnounced: month } } },
							[event]
						)
					)
						told++;
				}
				if (batch.length < expiryBatch) break;
				after = batch[batch.length - 1]._id;
			}
			if (told)
				this.logger.info(
					`Told of the points of ${told} member(s) expiring at the end of ${month}.`
				);
		},

		/**
		 * Runs the expiry job once a day, then tells of the points that expire this month: at the first
		 * check of each day (UTC), the first one soon after start.
		 */
		scheduleExpiry(this: This, delayMs: number) {
			if (this.expiryStopped || this.settings.pointsValidMonths <= 0) return;
			this.expiryTimer = setTimeout(() => {
				const today = this.now().toISOString().slice(0, 10);
				if (today === this.expiredOn) return this.scheduleExpiry(this.settings.expiryCheckMs);
				this.expireDue()
					.then(() => this.announceExpiring())
					.then(() => (this.expiredOn = today))
					.catch(err =>
						this.logger.error("The expiry job failed; retrying at the next check:", err)
					)
					.finally(() => this.scheduleExpiry(this.settings.expiryCheckMs));
			}, delayMs);
		},

		/**
		 * The release job: every account with held points due now. Safe to rerun, and to run on several
		 * instances at once: each release is planned from the account under its version condition.
		 */
		async releaseDue(this: This) {
			const run: ReleaseRun = { members: 0, points: 0 };
			const now = this.now().toISOString();
			for (let after = ""; ;) {
				const batch = await this.store.find({
					query: { _id: { $gt: after }, nextRelease: { $lte: now } },
					sort: ["_id"],
					limit: this.settings.expiryBatch
				});
				for (const account of batch) {
					let points = 0;
					const result = await this.post(account._id, async current => {
						const due = releases(current, now);
						points = due.reduce((sum, d) => sum - (d.held ?? 0), 0);
						return due.length ? due : "DUPLICATE";
					});
					if (result.applied) {
						run.members++;
						run.points += points;
					}
				}
				if (batch.length < this.settings.expiryBatch) break;
				after = batch[batch.length - 1]._id;
			}
			return run;
		},

		/**
		 * The daily tier review: every account whose tier falls this month (`tierReview`, which each
		 * posting sets from the earnings it leaves in the window) posts the fall. Safe to rerun, and to
		 * run on several instances at once: each account's review is a posting under its version, and
		 * the second finds the account no longer due. No index on `tierReview`: its values are few
		 * months (an O(N) write on NeDB), and the daily query reads only the accounts due.
		 */
		async reviewTiers(this: This) {
			const run: TierReview = { month: monthOf(this.now().toISOString()), members: 0 };
			for (let after = ""; ;) {
				const batch = await this.store.find({
					query: { _id: { $gt: after }, tierReview: { $lte: run.month } },
					sort: ["_id"],
					limit: this.settings.expiryBatch
				});
				for (const { _id } of batch) {
					const result = await this.post(_id, async (account, at) =>
						// Planned again after a lost race: only while the account is still due.
						account.tierReview && account.tierReview <= monthOf(at) ? [] : "DUPLICATE"
					);
					if (result.applied) run.members++;
				}
				if (batch.length < this.settings.expiryBatch) break;
				after = batch[batch.length - 1]._id;
			}
			if (run.members)
				this.logger.info(`Tier review ${run.month}: ${run.members} member(s) fell a tier.`);
			return run;
		},

		/** Runs the tier review once a day, as the expiry job runs; not at all with one tier. */
		scheduleTierReview(this: This, delayMs: number) {
			if (this.expiryStopped || this.settings.tiers.length < 2) return;
			this.tierReviewTimer = setTimeout(() => {
				const today = this.now().toISOString().slice(0, 10);
				if (today === this.tierReviewedOn)
					return this.scheduleTierReview(this.settings.expiryCheckMs);
				this.reviewTiers()
					.then(() => (this.tierReviewedOn = today))
					.catch(err =>
						this.logger.error("The tier review failed; retrying at the next check:", err)
					)
					.finally(() => this.scheduleTierReview(this.settings.expiryCheckMs));
			}, delayMs);
		},

		scheduleRelease(this: This, delayMs: number) {
			if (this.expiryStopped) return;
			this.releaseTimer = setTimeout(() => {
				this.releaseDue()
					.catch(err =>
						this.logger.error("The release job failed; retrying at the next check:", err)
					)
					.finally(() => this.scheduleRelease(this.settings.releaseCheckMs));
			}, delayMs);
		},

		/** The clock postings and the daily jobs go by (a test may set it). */
		now: () => new Date(),

		async openAccount(this: This, memberId: string, at: string) {
			await this.store.insertUnique({
				_id: memberId,
				balance: 0,
				version: 0,
				status: "active",
				openedAt: at,
				updatedAt: at
			});
		},

		/** Finishes the postings left unfinished (by a crash or a store error) since before `olderThanMs` ago. */
		async finishUnfinished(this: This, olderThanMs = 0) {
			const since = { $lte: new Date(Date.now() - olderThanMs).toISOString() };
			for (const account of await this.store.find({ query: { pendingSince: since } })) {
				await this.finishPosting(account);
				this.logger.warn(`Finished an interrupted posting on account '${account._id}'.`);
			}
		},

		/**
		 * The ledger after the entry of posting order `afterSeq` ("" for all), a page at a time, in
		 * windows of posting time (`seq` begins with its millisecond): NeDB sorts all that a query
		 * matches before it limits, so each query keeps to about a page's worth of the ledger. The
		 * windows run to the time the export began; what was posted after that follows, a page at a
		 * time.
		 */
		async *ledgerPages(this: This, afterSeq: string, filter: Query) {
			const began = Date.now();
			let cursor = afterSeq;
			let from = cursor ? decodeTime(cursor) : 0;
			let width = EXPORT_WINDOW_MS;
			for (;;) {
				const open = from > began;
				const seq = open ? { $gt: cursor } : { $gt: cursor, $lt: encodeTime(from + width, 10) };
				const entries = await this.ledger.find({
					query: { ...filter, seq },
					sort: ["seq"],
					limit: EXPORT_PAGE
				});
				if (entries.length) {
					cursor = entries[entries.length - 1].seq;
					yield entries.map(postedOf);
				}
				if (entries.length === EXPORT_PAGE) {
					// A full page: the window goes on from the last entry read, narrower.
					from = decodeTime(cursor);
					width = Math.max(1, Math.floor(width / 2));
				} else if (open) return;
				else {
					from += width;
					if (entries.length < EXPORT_PAGE / 2) width *= 2;
				}
			}
		},

		toView(this: This, account: Account): AccountView {
			const { _id, balance, status, openedAt, updatedAt, closedAt } = account;
			const now = this.now();
			const releasing = Object.entries(account.holds ?? {})
				.map(([dealId, hold]) => ({ dealId, points: hold.points, releaseAt: hold.releaseAt }))
				.sort((a, b) => a.releaseAt.localeCompare(b.releaseAt));
			const expiring = expiringSoon(lotsOf(account), this.settings.pointsValidMonths, now);
			return {
				memberId: _id,
				balance,
				status,
				openedAt,
				updatedAt,
				...(closedAt ? { closedAt } : {}),
				held: account.held ?? 0,
				releasing,
				expiring,
				tier: tierView(this.settings.tiers, account, now.toISOString())
			};
		}
	},

	created(this: This) {
		this.lock = new KeyedLock();
		this.ledgered = new Map();
		this.ledger = openCollection<LedgerEntry>(this, "ledger", [
			{ fields: { memberId: 1, seq: -1 } },
			// A member's transfers, and what they sent today (on NeDB, an index on `memberId` alone).
			{ fields: { memberId: 1, kind: 1, at: 1 } },
			// The ledger export's posting order.
			{ fields: { seq: 1 } }
		]);
	},

	async started(this: This) {
		await this.ledger.connect(this.logger);
		await this.finishUnfinished();
		// A posting interrupted on another instance (which may be gone) is finished here too, once it
		// has had time to finish on its own.
		this.sweepTimer = setInterval(() => {
			this.finishUnfinished(this.settings.sweepIntervalMs).catch(err =>
				this.logger.warn("Finishing interrupted postings failed:", (err as Error).message)
			);
		}, this.settings.sweepIntervalMs);
		// A node that was down at midnight catches up as soon as it is back.
		this.expiryStopped = false;
		this.scheduleExpiry(0);
		this.scheduleRelease(0);
		this.scheduleTierReview(0);
	},

	async stopped(this: This) {
		clearInterval(this.sweepTimer);
		// A run in flight schedules the next when it ends: tell it not to.
		this.expiryStopped = true;
		clearTimeout(this.expiryTimer);
		clearTimeout(this.releaseTimer);
		clearTimeout(this.tierReviewTimer);
		await this.ledger.disconnect();
	}
};

export default PointsService;
