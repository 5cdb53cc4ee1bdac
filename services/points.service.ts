/**
 * Points: each member's account and its immutable ledger.
 *
 * Invariants (see docs/DESIGN.md): an account's balance equals the sum of its ledger entries and is never
 * below 0; every entry names its cause (`deal:<id>`, `deal-cancel:<id>`, `deal-return:<id>:<n>`, `order:<id>`, …), which is
 * the entry's id, so each cause is applied at most once.
 *
 * How a change is posted (`post`): under a per-account lock, the entries are first written into the
 * account document together with the new balance — one atomic, conditional single-document write —
 * then copied into the ledger and cleared from the account. A crash in between leaves them in
 * `account.pending`, and start-up finishes the copy. The balance is therefore always the sum of the
 * ledger plus what is pending, and only pending during a crash. The same write records a
 * `points.posted` event (outbox), from which read models follow the ledger.
 *
 * Points that expire (POINTS_VALID_MONTHS, lib/expiry.ts): the same write keeps the account's
 * earning `lots`, what remains of each month's earnings, so they are exact under concurrency. Earns,
 * restored uses and positive adjustments are earnings of the month they are posted in (a restored
 * use gets a fresh validity: its original lots may have expired meanwhile); uses, revocations and
 * negative adjustments take from the oldest lots first. The expiry job (`expireDue`) runs at start and
 * then daily on every instance: one `expire:<memberId>:<YYYYMM>` entry per member and month due,
 * planned from the account's lots like any posting, so a rerun or a second instance finds nothing left.
 *
 * Staff adjustments (`adjust`): one entry per adjustment (`adjustment:<id>`), with its reason and who
 * made it; a negative one never takes the balance below 0.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { consume, outboxEvent, type DealEvent, type DealReturnedEvent, type OrderEvent, type PostedEntry } from "../contracts/channels";
import { clientError, conflict, notFound } from "../lib/errors";
import { applyToLots, expiredThrough, expiringSoon, oldestOf, sumOf, type Expiring, type Lots } from "../lib/expiry";
import { monthOf } from "../lib/months";
import type { CallerMeta } from "../lib/gateway/access";
import { sortableId } from "../lib/ids";
import { requestIdOf, type RequestMeta } from "../lib/request-id";
import { created, type AnswerMeta } from "../lib/gateway/answers";
import { KeyedLock } from "../lib/keyed-lock";
import * as P from "../lib/params";
import { DbMixin, openCollection, type Collection, type DbThis, type Page } from "../mixins/db.mixin";
import { OutboxMixin, OUTBOX_INDEX, type OutboxMethods } from "../mixins/outbox.mixin";
import type { MemberView } from "./members.service";

/** A ledger entry as stored: keyed by its cause, which is also the idempotency key. */
export interface LedgerEntry extends Omit<PostedEntry, "cause"> {
	_id: string;
	/** Orders entries of one account in time, also within one millisecond. */
	seq: string;
}

export interface Account {
	_id: string;
	balance: number;
	status: "active" | "closed";
	openedAt: string;
	updatedAt: string;
	closedAt?: string;
	/** Incremented by every posting: what a write is conditioned on. Absent on accounts opened before it existed. */
	version?: number;
	pending?: LedgerEntry[];
	/** When `pending` was written: set and cleared with it, and indexed (sparse) so that sweeps find only those accounts. */
	pendingSince?: string;
	/** What remains of each month's earnings; adds up to the balance. Absent on accounts from before it existed. */
	lots?: Lots;
	/** The oldest month in `lots`: what the expiry job looks accounts up by (and those without `lots` with points). */
	oldestLot?: string;
}

/** Who an event or request is about: the source of the entries it causes. */
export interface Source {
	memberId: string;
	sourceType: "deal" | "order";
	sourceId: string;
	merchantId?: string;
}

type Draft = Omit<LedgerEntry, "memberId" | "balanceAfter" | "at" | "seq" | "sourceType" | "sourceId" | "merchantId"> &
	Partial<Pick<LedgerEntry, "sourceType" | "sourceId" | "merchantId">>;

export type Refusal = "DUPLICATE" | "INSUFFICIENT_POINTS" | "CANCELLED" | "ACCOUNT_CLOSED";

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

/** What one run of the expiry job did: the months of earnings it expired through, and for whom. */
export interface ExpiryRun {
	through: string;
	members: number;
	points: number;
}

interface Methods {
	post(memberId: string, plan: (account: Account) => Promise<Draft[] | Refusal>, close?: boolean): Promise<PostResult>;
	credit(source: Source, amount: number): Promise<PostResult>;
	debit(source: Source, amount: number): Promise<PostResult>;
	reverse(source: Source): Promise<PostResult>;
	returnPart(deal: DealReturnedEvent): Promise<PostResult>;
	withdraw(memberId: string): Promise<PostResult>;
	expireLots(memberId: string, through: string): Promise<number>;
	expireDue(through?: string): Promise<ExpiryRun>;
	scheduleExpiry(delayMs: number): void;
	now(): Date;
	adjusted(ctx: Context<unknown, AnswerMeta>, view: AdjustmentView): AdjustmentView;
	openAccount(memberId: string, at: string): Promise<void>;
	finishPosting(account: Account): Promise<void>;
	copyToLedger(entries: LedgerEntry[]): Promise<void>;
	finishPending(olderThanMs?: number): Promise<void>;
	toView(account: Account): AccountView;
}

export interface AccountView {
	memberId: string;
	balance: number;
	status: Account["status"];
	openedAt: string;
	updatedAt: string;
	closedAt?: string;
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
	/** How many accounts due the expiry job reads at a time. */
	expiryBatch: number;
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
		expiryStopped: boolean;
		expiredOn?: string;
	};

/** How often a lost race for an account is re-planned before the posting gives up. */
const MAX_ATTEMPTS = 20;

/** The condition that the account is still as it was read. */
const versionOf = (account: Account) => ({ _id: account._id, version: account.version ?? { $exists: false } });
/** Ends a posting once its entries are in the ledger. */
const CLEAR_PENDING = { $unset: { pending: true, pendingSince: true } };

/**
 * The account's lots. An account from before lots existed has none: its balance counts as earned in
 * the month of its last change, the latest month any of it can have been earned in.
 */
function lotsOf(account: Account): Lots {
	const lots = account.lots ?? {};
	const untracked = account.balance - sumOf(lots);
	return untracked === 0 ? lots : applyToLots(lots, untracked, monthOf(account.updatedAt));
}

/** The expiry of what is left of the account's earnings of every month through `through`, a lot an entry. */
function expiries(account: Account, through: string): Draft[] {
	return Object.entries(lotsOf(account))
		.filter(([month]) => month <= through)
		.map(([month, points]) => ({
			_id: `expire:${account._id}:${month}`,
			kind: "expire",
			amount: -points,
			sourceType: "member",
			sourceId: account._id,
			lotMonth: month
		}));
}

const dealSource = (deal: DealEvent): Source => ({
	memberId: deal.memberId,
	sourceType: "deal",
	sourceId: deal.dealId,
	merchantId: deal.merchantId
});
const orderSource = (order: OrderEvent): Source => ({ memberId: order.memberId, sourceType: "order", sourceId: order.orderId });

const causeOf = (source: Source) => `${source.sourceType}:${source.sourceId}`;
const cancelCauseOf = (source: Source) => `${source.sourceType}-cancel:${source.sourceId}`;

/** What earning `amount` for a source posts: a withdrawn member's points expire on arrival, recorded rather than dropped. */
function earning(account: Account, source: Source, amount: number): Draft[] {
	const cause = causeOf(source);
	const earn: Draft = { _id: cause, kind: "earn", amount, ...source };
	if (account.status === "closed") return [earn, { _id: `expiry:${source.memberId}:${cause}`, kind: "expire", amount: -amount, ...source }];
	return [earn];
}

/** What giving back `points` of a use posts: they expire at once if the member has withdrawn. */
function restoration(account: Account, cause: string, source: Source, points: number): Draft[] {
	const restore: Draft = { _id: cause, kind: "restore", amount: points, ...source };
	if (account.status === "closed")
		return [restore, { _id: `expiry:${source.memberId}:${cause}`, kind: "expire", amount: -points, ...source }];
	return [restore];
}

/** What revoking `points` of an earning takes from `balance`: never below 0; the rest, already spent, is the shortfall. */
function revocation(cause: string, source: Source, points: number, balance: number): Draft {
	const revoked = Math.min(points, balance);
	const shortfall = points - revoked;
	return { _id: cause, kind: "revoke", amount: revoked ? -revoked : 0, ...source, ...(shortfall ? { shortfall } : {}) };
}

const PointsService: ServiceSchema<Settings, Methods, object, This> = {
	name: "points",
	// No index on `oldestLot`: its values are few months, which NeDB indexes turn into O(N) writes;
	// the daily job's query reads only the accounts due.
	mixins: [
		DbMixin("accounts", [{ fields: { pendingSince: 1 }, sparse: true }, OUTBOX_INDEX]),
		OutboxMixin,
		ConfiguredSettings<Settings>(config => ({
			sweepIntervalMs: 5000,
			// A lot is gone at most a minute after its month ends.
			expiryCheckMs: 60_000,
			expiryBatch: 500,
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
				if (!account) throw notFound("ACCOUNT_NOT_FOUND", `No points account for member '${ctx.params.memberId}'`, ctx.params);
				return this.toView(account);
			}
		},

		history: {
			rest: "GET /points/:memberId/history",
			summary: "A member's ledger entries, newest first, paged",
			params: { $$strict: true, memberId: P.id, ...P.paging },
			async handler(this: This, ctx: Context<{ memberId: string; page: number; pageSize: number }>): Promise<Page<unknown>> {
				const { memberId, page, pageSize } = ctx.params;
				const result = await this.ledger.page({ memberId }, ["-seq"], page, pageSize);
				return { ...result, rows: result.rows.map(({ _id, seq: _seq, ...entry }) => ({ cause: _id, ...entry })) };
			}
		},

		/**
		 * A staff correction of a member's balance: a ledger entry with its reason and who made it.
		 * Each request is its own adjustment; a negative one is refused rather than taking the
		 * balance below 0.
		 */
		adjust: {
			rest: "POST /points/:memberId/adjustments",
			summary: "A staff adjustment: points given (positive) or taken (negative, never below 0), with its reason and who made it",
			params: {
				$$strict: true,
				memberId: P.id,
				amount: P.signedAmount(P.MAX_POINTS),
				reason: { type: "string", trim: true, min: 1, max: 500 }
			},
			async handler(
				this: This,
				ctx: Context<{ memberId: string; amount: number; reason: string }, CallerMeta & RequestMeta & AnswerMeta>
			): Promise<AdjustmentView> {
				const { memberId, amount, reason } = ctx.params;
				const user = ctx.meta.user;
				// The gateway lets only staff here; a call without a user comes from inside (the REPL).
				const by = user?.kind === "staff" ? (user.name ?? "staff") : "operator";
				// Under an Idempotency-Key the request id names the adjustment, so a run of the same request
				// again (its gateway died before answering) answers the adjustment it made, and never makes two.
				const { requestId } = requestIdOf(ctx);
				const adjustmentId = requestId ?? sortableId();
				const cause = `adjustment:${adjustmentId}`;
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
				const member = await ctx.call<MemberView, { memberId: string }>(
					"members.get",
					{ memberId },
					{ timeout: this.settings.callTimeoutMs }
				);
				if (member.status !== "active") throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has withdrawn`, { memberId });
				const result = await this.post(memberId, async account => {
					if (await this.ledger.findById(cause)) return "DUPLICATE";
					if (account.status === "closed") return "ACCOUNT_CLOSED";
					if (account.balance + amount < 0) return "INSUFFICIENT_POINTS";
					return [{ _id: cause, kind: "adjust", amount, sourceType: "adjustment", sourceId: adjustmentId, reason, by }];
				});
				if (result.reason === "DUPLICATE") return (await made()) as AdjustmentView;
				if (result.reason === "ACCOUNT_CLOSED") throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has withdrawn`, { memberId });
				if (result.reason === "INSUFFICIENT_POINTS")
					throw conflict("INSUFFICIENT_POINTS", `Member '${memberId}' has ${result.balance} points: ${-amount} cannot be taken`, {
						memberId,
						balance: result.balance,
						amount
					});
				return this.adjusted(ctx, { adjustmentId, memberId, amount, reason, by, at: result.at as string, balance: result.balance });
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
						ledgerSum: sums.get(a._id) ?? 0,
						lots: a.lots ? sumOf(a.lots) : a.balance,
						pending: a.pending?.length ?? 0
					}))
					.filter(a => a.balance !== a.ledgerSum || a.balance !== a.lots || a.balance < 0 || a.pending > 0);
				return { accounts: accounts.length, entries: await this.ledger.count({}), adjustments, expired, mismatches };
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
			await this.credit(dealSource(deal), deal.point);
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
		post(this: This, memberId: string, plan: (account: Account) => Promise<Draft[] | Refusal>, close = false) {
			return this.lock.run(memberId, async () => {
				// The lock serialises one process. Another points instance sharing the store (MongoDB) is
				// kept out by conditioning the write on the account's version, which every change
				// increments: a lost race re-plans on what the winner wrote. (A balance condition would
				// miss a posting that leaves the balance as it was, or one that changes it and back.)
				for (let attempt = 1; ; attempt++) {
					const now = this.now().toISOString();
					let account = await this.store.findById(memberId);
					if (!account) {
						await this.openAccount(memberId, now);
						account = (await this.store.findById(memberId)) as Account;
					}
					if (account.pending?.length) {
						// Interrupted (a crash, a store error): finish it before anything else is decided.
						await this.finishPosting(account);
						continue;
					}
					const drafts = await plan(account);
					if (typeof drafts === "string") return { applied: false, balance: account.balance, reason: drafts };

					let balance = account.balance;
					let lots = lotsOf(account);
					const entries: LedgerEntry[] = drafts.map(d => {
						balance += d.amount;
						lots = applyToLots(lots, d.amount, monthOf(now), d.lotMonth);
						return { memberId, sourceType: "member", sourceId: memberId, ...d, balanceAfter: balance, at: now, seq: sortableId() };
					});
					const version = (account.version ?? 0) + 1;
					const posted = outboxEvent("points.posted", {
						memberId,
						closed: close,
						entries: entries.map(({ _id, seq: _seq, ...entry }) => ({ cause: _id, ...entry })),
						lots,
						version
					});
					const oldestLot = oldestOf(lots);
					const update = {
						$inc: { balance: balance - account.balance, version: 1 },
						$set: {
							pending: entries,
							pendingSince: now,
							updatedAt: now,
							lots,
							...(oldestLot ? { oldestLot } : {}),
							...(close ? { status: "closed", closedAt: now } : {})
						},
						...(oldestLot ? {} : { $unset: { oldestLot: true } })
					};
					// The entries go to the ledger before the event is sent; the clearing is written with its removal from the outbox.
					const finish = {
						run: () => this.copyToLedger(entries),
						filter: versionOf({ ...account, version }),
						update: CLEAR_PENDING
					};
					if (!(await this.changeWithEvents({ filter: versionOf(account), update }, [posted], finish))) {
						if (attempt < MAX_ATTEMPTS) {
							await new Promise(resolve => setTimeout(resolve, Math.random() * attempt * 5));
							continue;
						}
						throw new Error(`Account '${memberId}' keeps changing concurrently`);
					}
					return { applied: true, balance, at: now };
				}
			});
		},

		/**
		 * Copies a posting's entries from the account into the ledger and clears them. Safe to run
		 * twice at once (two instances finishing a dead one's posting): entries are keyed by cause, and
		 * the clearing is conditional on the version that wrote them.
		 */
		async finishPosting(this: This, account: Account) {
			await this.copyToLedger(account.pending ?? []);
			await this.store.update(versionOf(account), CLEAR_PENDING);
		},

		async copyToLedger(this: This, entries: LedgerEntry[]) {
			for (const entry of entries) await this.ledger.insertUnique(entry);
		},

		credit(this: This, source: Source, amount: number) {
			const cause = causeOf(source);
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(cause)) return "DUPLICATE";
				// Cancelled before its accrual arrived: nothing to earn.
				if (await this.ledger.findById(cancelCauseOf(source))) return "CANCELLED";
				return earning(account, source, amount);
			});
		},

		debit(this: This, source: Source, amount: number) {
			const cause = causeOf(source);
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(cause)) return "DUPLICATE";
				if (await this.ledger.findById(cancelCauseOf(source))) return "CANCELLED";
				if (account.status === "closed") return "ACCOUNT_CLOSED";
				// Points past their validity are never spent, however late the expiry job runs: a use
				// expires them first, with the job's own entries (each lot's expiry is one cause).
				const due =
					this.settings.pointsValidMonths > 0 ? expiries(account, expiredThrough(this.now(), this.settings.pointsValidMonths)) : [];
				const spendable = due.reduce((sum, d) => sum + d.amount, account.balance);
				if (spendable < amount) return "INSUFFICIENT_POINTS";
				return [...due, { _id: cause, kind: "use", amount: -amount, ...source }];
			}).then(result => (result.reason === "DUPLICATE" ? { ...result, applied: true, reason: undefined } : result));
		},

		/**
		 * Undoes what a source did to the account, once. A use is restored in full (and expires at once
		 * if the member has withdrawn). An earning is revoked only as far as the balance allows: points
		 * already spent cannot be taken back, so the rest is recorded as `shortfall` for staff to see.
		 * If the source has not been applied yet, a zero entry records the cancellation, and the
		 * source is refused when it arrives.
		 */
		reverse(this: This, source: Source) {
			const cancel = cancelCauseOf(source);
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(cancel)) return "DUPLICATE";
				const original = await this.ledger.findById(causeOf(source));
				if (!original) return [{ _id: cancel, kind: "void", amount: 0, ...source }];
				if (original.amount < 0) return restoration(account, cancel, source, -original.amount);
				return [revocation(cancel, source, original.amount, account.balance)];
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
			const cause = `deal-return:${deal.dealId}:${deal.return.n}`;
			const { points } = deal.return;
			return this.post(source.memberId, async account => {
				if (await this.ledger.findById(cause)) return "DUPLICATE";
				const original = await this.ledger.findById(causeOf(source));
				if (deal.type === "use") {
					// A returned use had its debit confirmed; without it there is nothing to give back.
					if (!original) return [{ _id: cause, kind: "void", amount: 0, ...source }];
					return restoration(account, cause, source, points);
				}
				const earned = original ? [] : earning(account, source, deal.point);
				const balance = earned.reduce((sum, d) => sum + d.amount, account.balance);
				return [...earned, revocation(cause, source, points, balance)];
			});
		},

		/** A withdrawal: the remaining points expire as one entry and the account closes. */
		withdraw(this: This, memberId: string) {
			const cause = `expiry:${memberId}`;
			return this.post(
				memberId,
				async account => {
					if (account.status === "closed" || (await this.ledger.findById(cause))) return "DUPLICATE";
					return [{ _id: cause, kind: "expire", amount: -account.balance, sourceType: "member", sourceId: memberId }];
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
				points = -due.reduce((sum, d) => sum + d.amount, 0);
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
			if (this.settings.pointsValidMonths <= 0) throw conflict("EXPIRY_OFF", "Points never expire here (POINTS_VALID_MONTHS is 0)");
			if (through && through > due)
				throw clientError(409, "EXPIRY_NOT_DUE", `Earnings of ${through} are still valid: earnings expire through ${due} now`, {
					through,
					due
				});
			const run: ExpiryRun = { through: through ?? due, members: 0, points: 0 };
			// In batches by id, so that a month's end with many members due never reads them all at once.
			for (let after = ""; ;) {
				const query = {
					_id: { $gt: after },
					$or: [{ oldestLot: { $lte: run.through } }, { lots: { $exists: false }, balance: { $gt: 0 } }]
				};
				const batch = await this.store.find({ query, sort: ["_id"], limit: this.settings.expiryBatch });
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
			if (run.points) this.logger.info(`Expired ${run.points} points of ${run.members} member(s), earned through ${run.through}.`);
			return run;
		},

		/** Runs the expiry job once a day: at the first check of each day (UTC), the first one soon after start. */
		scheduleExpiry(this: This, delayMs: number) {
			if (this.expiryStopped || this.settings.pointsValidMonths <= 0) return;
			this.expiryTimer = setTimeout(() => {
				const today = this.now().toISOString().slice(0, 10);
				if (today === this.expiredOn) return this.scheduleExpiry(this.settings.expiryCheckMs);
				this.expireDue()
					.then(() => (this.expiredOn = today))
					.catch(err => this.logger.error("The expiry job failed; retrying at the next check:", err))
					.finally(() => this.scheduleExpiry(this.settings.expiryCheckMs));
			}, delayMs);
		},

		/** The clock postings and the expiry job go by (a test may set it). */
		now: () => new Date(),

		async openAccount(this: This, memberId: string, at: string) {
			await this.store.insertUnique({ _id: memberId, balance: 0, version: 0, status: "active", openedAt: at, updatedAt: at });
		},

		/** Finishes postings left interrupted (by a crash or a store error) since before `olderThanMs` ago. */
		async finishPending(this: This, olderThanMs = 0) {
			const since = { $lte: new Date(Date.now() - olderThanMs).toISOString() };
			for (const account of await this.store.find({ query: { pendingSince: since } })) {
				await this.finishPosting(account);
				this.logger.warn(`Finished an interrupted posting on account '${account._id}'.`);
			}
		},

		toView(this: This, account: Account): AccountView {
			const { _id, balance, status, openedAt, updatedAt, closedAt } = account;
			const expiring = expiringSoon(lotsOf(account), this.settings.pointsValidMonths, this.now());
			return { memberId: _id, balance, status, openedAt, updatedAt, ...(closedAt ? { closedAt } : {}), expiring };
		}
	},

	created(this: This) {
		this.lock = new KeyedLock();
		this.ledger = openCollection<LedgerEntry>(this, "ledger", [{ fields: { memberId: 1, seq: -1 } }]);
	},

	async started(this: This) {
		await this.ledger.connect(this.logger);
		await this.finishPending();
		// A posting interrupted on another instance (which may be gone) is finished here too, once it
		// has had time to finish on its own.
		this.sweepTimer = setInterval(() => {
			this.finishPending(this.settings.sweepIntervalMs).catch(err =>
				this.logger.warn("Finishing interrupted postings failed:", (err as Error).message)
			);
		}, this.settings.sweepIntervalMs);
		// A node that was down at midnight catches up as soon as it is back.
		this.expiryStopped = false;
		this.scheduleExpiry(0);
	},

	async stopped(this: This) {
		clearInterval(this.sweepTimer);
		// A run in flight schedules the next when it ends: tell it not to.
		this.expiryStopped = true;
		clearTimeout(this.expiryTimer);
		await this.ledger.disconnect();
	}
};

export default PointsService;
