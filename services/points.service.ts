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
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import {
	consume,
	outboxEvent,
	type DealEvent,
	type DealReturnedEvent
} from "../contracts/channels";
import { clientError, conflict, notFound } from "../lib/errors";
import { expiredThrough, expiringSoon, oldestOf, sumOf, type Expiring } from "../lib/expiry";
import { addMonths, monthOf } from "../lib/months";
import type { CallerMeta } from "../lib/gateway/access";
import { sortableId } from "../lib/ids";
import { requestIdOf, type RequestMeta } from "../lib/request-id";
import { created, type AnswerMeta } from "../lib/gateway/answers";
import { KeyedLock } from "../lib/keyed-lock";
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
	orderSource,
	partialReturn,
	postedOf,
	reversal,
	totalOf,
	withdrawal,
	type AccountState,
	type Draft,
	type LedgerEntry,
	type Refusal,
	type Source
} from "../lib/posting";
import { LOST, retryOnRace } from "../lib/retry-on-race";
import {
	DbMixin,
	openCollection,
	type Collection,
	type DbThis,
	type Page
} from "../mixins/db.mixin";
import { OutboxMixin, OUTBOX_INDEX, type OutboxMethods } from "../mixins/outbox.mixin";

export type { LedgerEntry, Refusal, Source };

/** A member's account as stored: its state (lib/posting.ts), its unfinished posting, and what writes are conditioned on. */
export interface Account extends AccountState {
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

interface Methods {
	post(
		memberId: string,
		plan: (account: Account) => Promise<Draft[] | Refusal>,
		close?: boolean
	): Promise<PostResult>;
	credit(source: Source, amount: number, releaseAt?: string): Promise<PostResult>;
	debit(source: Source, amount: number): Promise<PostResult>;
	reverse(source: Source): Promise<PostResult>;
	returnPart(deal: DealReturnedEvent): Promise<PostResult>;
	withdraw(memberId: string): Promise<PostResult>;
	expireLots(memberId: string, through: string): Promise<number>;
	expireDue(through?: string): Promise<ExpiryRun>;
	announceExpiring(): Promise<void>;
	scheduleExpiry(delayMs: number): void;
	releaseDue(): Promise<ReleaseRun>;
	scheduleRelease(delayMs: number): void;
	releaseAtOf(deal: DealEvent): string | undefined;
	now(): Date;
	adjusted(ctx: Context<unknown, AnswerMeta>, view: AdjustmentView): AdjustmentView;
	openAccount(memberId: string, at: string): Promise<void>;
	finishPosting(account: Account): Promise<void>;
	copyToLedger(entries: LedgerEntry[]): Promise<void>;
	finishUnfinished(olderThanMs?: number): Promise<void>;
	toView(account: Account): AccountView;
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
}

interface Settings extends ServiceSettingSchema {
	/** How often every instance looks for postings interrupted elsewhere, and how old they must be (ms). */
	sweepIntervalMs: number;
	/** Months earned points stay valid after the month they were earned in; 0: never expire. */
	pointsValidMonths: number;
	/** How often the expiry job looks whether a new day has begun (ms): it runs at start and once a day, at most this late. */
	expiryCheckMs: number;
	/** How many accounts due the expiry and release jobs read at a time. */
	expiryBatch: number;
	/** How often the release job looks for held points due (ms): a point is released at most this late. */
	releaseCheckMs: number;
	/** How long a call to the members service may take (ms). */
	callTimeoutMs: number;
}

type This = Service<Settings> &
	DbThis<Account> &
	OutboxMethods &
	Methods & {
		ledger: Collection<LedgerEntry>;
		lock: KeyedLock;
		sweepTimer?: NodeJS.Timeout;
		expiryTimer?: NodeJS.Timeout;
		releaseTimer?: NodeJS.Timeout;
		expiryStopped: boolean;
		expiredOn?: string;
	};

/** How often a lost race for an account is re-planned before the posting gives up. */
const MAX_ATTEMPTS = 20;

/** The condition that the account is still as it was read. */
const versionOf = (account: Account) => ({
	_id: account._id,
	version: account.version ?? { $exists: false }
});
/** Ends the unfinished posting once its entries are in the ledger. */
const CLEAR_UNFINISHED = { $unset: { pending: true, pendingSince: true } };

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
			callTimeoutMs: config.callTimeoutMs
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
				const user = ctx.meta.user;
				// The gateway lets only staff here; a call without a user comes from inside (the REPL).
				const by = user?.kind === "staff" ? (user.name ?? "staff") : "operator";
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
			await this.credit(dealSource(deal), deal.point, this.releaseAtOf(deal));
		},
		async "deal.cancelled"(deal) {
			await this.reverse(dealSource(deal));
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
		}
	}),

	methods: {
		/** An adjustment's answer: 201, located in the member's history, where its entry is. */
		adjusted(this: This, ctx: Context<unknown, AnswerMeta>, view: AdjustmentView): AdjustmentView {
			return created(ctx, `/api/points/${view.memberId}/history`, view);
		},

		/**
		 * Posts the entries `plan` drafts for the account, atomically and at most once per cause.
		 * `plan` runs under the account's lock and may answer a reason instead, to post nothing.
		 */
		post(
			this: This,
			memberId: string,
			plan: (account: Account) => Promise<Draft[] | Refusal>,
			close = false
		) {
			// The lock serialises one process. Another points instance sharing the store (MongoDB) is
			// kept out by conditioning the write on the account's version, which every change
			// increments: a lost race re-plans on what the winner wrote. (A balance condition would
			// miss a posting that leaves the balance as it was, or one that changes it and back.)
			const attempt = async (): Promise<PostResult | typeof LOST> => {
				const now = this.now().toISOString();
				let account = await this.store.findById(memberId);
				if (!account) {
					await this.openAccount(memberId, now);
					account = (await this.store.findById(memberId)) as Account;
				}
				if (account.pending?.length) {
					// An unfinished posting (a crash, a store error): finish it, then plan again on what it wrote.
					await this.finishPosting(account);
					return LOST;
				}
				const drafts = await plan(account);
				if (typeof drafts === "string")
					return { applied: false, balance: account.balance, reason: drafts };

				const { entries, balance, lots, held, holds } = applyDrafts(
					account,
					drafts,
					now,
					sortableId
				);
				const version = (account.version ?? 0) + 1;
				const posted = outboxEvent("points.posted", {
					memberId,
					closed: close,
					entries: entries.map(postedOf),
					lots,
					held,
					version
				});
				const oldestLot = oldestOf(lots);
				const nextRelease = Object.values(holds)
					.map(hold => hold.releaseAt)
					.sort()[0];
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
						...(close ? { status: "closed", closedAt: now } : {})
					},
					...(oldestLot && nextRelease
						? {}
						: {
								$unset: {
									...(oldestLot ? {} : { oldestLot: true }),
									...(nextRelease ? {} : { nextRelease: true })
								}
							})
				};
				// The entries go to the ledger before the event is sent; the clearing is written with its removal from the outbox.
				const finish = {
					run: () => this.copyToLedger(entries),
					filter: versionOf({ ...account, version }),
					update: CLEAR_UNFINISHED
				};
				if (
					!(await this.changeWithEvents({ filter: versionOf(account), update }, [posted], finish))
				)
					return LOST;
				return { applied: true, balance, at: now };
			};
			return this.lock.run(memberId, () =>
				retryOnRace(attempt, { attempts: MAX_ATTEMPTS, what: `Account '${memberId}'` })
			);
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
		 * source is refused when it arrives.
		 */
		reverse(this: This, source: Source) {
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(Cause.cancel(source))) return "DUPLICATE";
				return reversal(account, source, await this.ledger.findById(Cause.of(source)));
			});
		},

		/**
		 * One partial return of a deal (cause `deal-return:<id>:<n>`), once: the points the deals service
		 * reckoned for it are given back for a use, or revoked for a save as `reverse` revokes. A return
		 * may overtake its save's `deal.saved`: the earning is then posted with it (the event carries the
		 * deal), and `deal.saved` finds it done.
		 */
		returnPart(this: This, deal: DealReturnedEvent) {
			const source = dealSource(deal);
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(Cause.dealReturn(deal.dealId, deal.return.n)))
					return "DUPLICATE";
				return partialReturn(
					account,
					deal,
					await this.ledger.findById(Cause.of(source)),
					this.releaseAtOf(deal)
				);
			});
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

		/** The clock postings and the expiry job go by (a test may set it). */
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

		toView(this: This, account: Account): AccountView {
			const { _id, balance, status, openedAt, updatedAt, closedAt } = account;
			const releasing = Object.entries(account.holds ?? {})
				.map(([dealId, hold]) => ({ dealId, points: hold.points, releaseAt: hold.releaseAt }))
				.sort((a, b) => a.releaseAt.localeCompare(b.releaseAt));
			const expiring = expiringSoon(lotsOf(account), this.settings.pointsValidMonths, this.now());
			return {
				memberId: _id,
				balance,
				status,
				openedAt,
				updatedAt,
				...(closedAt ? { closedAt } : {}),
				held: account.held ?? 0,
				releasing,
				expiring
			};
		}
	},

	created(this: This) {
		this.lock = new KeyedLock();
		this.ledger = openCollection<LedgerEntry>(this, "ledger", [
			{ fields: { memberId: 1, seq: -1 } }
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
	},

	async stopped(this: This) {
		clearInterval(this.sweepTimer);
		// A run in flight schedules the next when it ends: tell it not to.
		this.expiryStopped = true;
		clearTimeout(this.expiryTimer);
		clearTimeout(this.releaseTimer);
		await this.ledger.disconnect();
	}
};

export default PointsService;
