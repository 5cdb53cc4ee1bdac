/**
 * The posting rules: what a change of a member's points writes, as pure functions (no broker, no
 * store, no clock or ids of their own). services/points.service.ts decides when to post and keeps the
 * effects: the per-account lock, the version-conditioned write, the outbox and the copy into the
 * ledger. Here is only what a posting writes:
 *
 * - Causes (`Cause`): every ledger entry is named by its cause, which is also its idempotency key,
 *   so that each cause is applied at most once. Their grammar is written here once.
 * - Drafts: the entries a posting is to write, from the account as read — an earning, a use (which
 *   expires the lots due first), the restoration of a use, the revocation of an earning, a partial
 *   return, a lot's expiry, a withdrawal, a staff adjustment. A rule may answer a `Refusal` instead.
 * - Applying drafts to an account (`applyDrafts`): the balance after each entry, the earning lots
 *   after all of them (lib/expiry.ts), and the entries as the ledger stores them.
 *
 * Held points (a merchant's `holdDays`): a save's points may be held until its return window ends,
 * counted in the account's `held`, not in its balance. A return inside the window takes them back
 * from the hold; a release (`release:<dealId>`) moves them into the balance, as an earning of the
 * month it is released in (their validity runs from then).
 *
 * Invariants: the balance plus the held points is the sum of the entries; the balance is never
 * below 0 (a revocation takes no more than the hold and the balance, the rest is its `shortfall`);
 * the lots add up to the balance, the holds to the held points.
 */
import type {
	DealEvent,
	DealReturnedEvent,
	OrderEvent,
	PostedEntry,
	TransferSent
} from "../contracts/channels";
import { applyToLots, sumOf, type Lots } from "./expiry";
import { monthOf } from "./months";

/** Points held for a save until they can be spent. */
export interface Hold {
	points: number;
	releaseAt: string;
	merchantId?: string;
}

/** The held points of an account, by the id of the deal that earned them. */
export type Holds = Record<string, Hold>;

/** What the rules read of a member's account (the points service stores more: its unfinished posting, its version). */
export interface AccountState {
	/** The member's id. */
	_id: string;
	/** Spendable points. */
	balance: number;
	/** Points earned but held (absent: none), and for which deals. */
	held?: number;
	holds?: Holds;
	status: "active" | "closed";
	updatedAt: string;
	/** What remains of each month's earnings; adds up to the balance. Absent on accounts from before it existed. */
	lots?: Lots;
}

/** A ledger entry as stored: keyed by its cause, which is also the idempotency key. */
export interface LedgerEntry extends Omit<PostedEntry, "cause"> {
	_id: string;
	/** Orders entries of one account in time, also within one millisecond. */
	seq: string;
}

/** An entry a posting is to write: what `applyDrafts` completes into a `LedgerEntry` (about the member unless it says otherwise). */
export type Draft = Omit<
	LedgerEntry,
	"memberId" | "balanceAfter" | "at" | "seq" | "sourceType" | "sourceId" | "merchantId"
> &
	Partial<Pick<LedgerEntry, "sourceType" | "sourceId" | "merchantId">>;

/** Why a posting writes nothing. */
export type Refusal =
	"DUPLICATE" | "INSUFFICIENT_POINTS" | "CANCELLED" | "ACCOUNT_CLOSED" | "TRANSFER_LIMIT_EXCEEDED";

/** Who an event or request is about: the source of the entries it causes. */
export interface Source {
	memberId: string;
	sourceType: "deal" | "order";
	sourceId: string;
	merchantId?: string;
}

export const dealSource = (deal: DealEvent): Source => ({
	memberId: deal.memberId,
	sourceType: "deal",
	sourceId: deal.dealId,
	merchantId: deal.merchantId
});

export const orderSource = (order: OrderEvent): Source => ({
	memberId: order.memberId,
	sourceType: "order",
	sourceId: order.orderId
});

/** The grammar of causes: every ledger entry's id, and so the key that applies it at most once. */
export const Cause = {
	/** `deal:<id>`, `order:<id>`: what a deal or an order did to the points (an earning or a use). */
	of: (source: Pick<Source, "sourceType" | "sourceId">) =>
		`${source.sourceType}:${source.sourceId}`,
	/** `deal-cancel:<id>`, `order-cancel:<id>`: its undoing; before it arrived, the record that refuses it. */
	cancel: (source: Pick<Source, "sourceType" | "sourceId">) =>
		`${source.sourceType}-cancel:${source.sourceId}`,
	/** `deal-return:<id>:<n>`: a deal's n-th partial return (n from 1). */
	dealReturn: (dealId: string, n: number) => `deal-return:${dealId}:${n}`,
	/** `deal-bonus:<id>`: a save's tier bonus; its revocation by the deal's cancellation or n-th return. */
	bonus: (dealId: string) => `deal-bonus:${dealId}`,
	bonusCancel: (dealId: string) => `deal-bonus-cancel:${dealId}`,
	bonusReturn: (dealId: string, n: number) => `deal-bonus-return:${dealId}:${n}`,
	/** `tier:<memberId>:<version>`: a change of tier, by the account's posting that made it. */
	tier: (memberId: string, version: number) => `tier:${memberId}:${version}`,
	/** `expiry:<memberId>`: the withdrawal, with which all that is left expires. */
	withdrawal: (memberId: string) => `expiry:${memberId}`,
	/** `expiry:<memberId>:<cause>`: points `cause` brings after the withdrawal, expiring on arrival. */
	afterWithdrawal: (memberId: string, cause: string) => `expiry:${memberId}:${cause}`,
	/** `expiry:<memberId>:held:<dealId>`: a deal's held points, forfeited by the withdrawal. */
	heldAtWithdrawal: (memberId: string, dealId: string) => `expiry:${memberId}:held:${dealId}`,
	/** `release:<dealId>`: a save's held points becoming spendable. */
	release: (dealId: string) => `release:${dealId}`,
	/** `expire:<memberId>:<YYYYMM>`: what was left of a month's earnings (a lot), expired. */
	lotExpiry: (memberId: string, month: string) => `expire:${memberId}:${month}`,
	/** `adjustment:<id>`: a staff adjustment. */
	adjustment: (adjustmentId: string) => `adjustment:${adjustmentId}`,
	/** The adjustment an `adjustment:<id>` cause names. */
	adjustmentIdOf: (cause: string) => cause.slice("adjustment:".length),
	/** `transfer-out:<id>`: the points a transfer took from its sender. */
	transferOut: (transferId: string) => `transfer-out:${transferId}`,
	/** `transfer-in:<id>`: the same points given to its receiver. */
	transferIn: (transferId: string) => `transfer-in:${transferId}`,
	/** `transfer-refund:<id>`: given back to the sender instead, the receiver having withdrawn. */
	transferRefund: (transferId: string) => `transfer-refund:${transferId}`,
	/** `import:<memberId>`: the opening balance a bulk import brought, one per member. */
	opening: (memberId: string) => `import:${memberId}`
};

/** What drafts add up to (negative when they take). */
export const totalOf = (drafts: Draft[]): number => drafts.reduce((sum, d) => sum + d.amount, 0);

/**
 * The account's lots. An account from before lots existed has none: its balance counts as earned in
 * the month of its last change, the latest month any of it can have been earned in.
 */
export function lotsOf(account: AccountState): Lots {
	const lots = account.lots ?? {};
	const untracked = account.balance - sumOf(lots);
	return untracked === 0 ? lots : applyToLots(lots, untracked, monthOf(account.updatedAt));
}

/** The expiry of what is left of the account's earnings of every month through `through`, an entry a lot. */
export function expiries(account: AccountState, through: string): Draft[] {
	return Object.entries(lotsOf(account))
		.filter(([month]) => month <= through)
		.map(([month, points]) => ({
			_id: Cause.lotExpiry(account._id, month),
			kind: "expire",
			amount: -points,
			sourceType: "member",
			sourceId: account._id,
			lotMonth: month
		}));
}

/** Points that arrive on the account (`draft`): a withdrawn member's expire on arrival, recorded rather than dropped. */
function arriving(
	account: AccountState,
	source: Pick<LedgerEntry, "memberId" | "sourceType" | "sourceId" | "merchantId">,
	draft: Draft
): Draft[] {
	if (account.status !== "closed") return [draft];
	return [
		draft,
		{
			_id: Cause.afterWithdrawal(source.memberId, draft._id),
			kind: "expire",
			amount: -draft.amount,
			...source,
			...(draft.held ? { held: -draft.held } : {})
		}
	];
}

/** The points held for the deal a source is, if any. */
export const holdOf = (account: AccountState, source: Source): Hold | undefined =>
	source.sourceType === "deal" ? account.holds?.[source.sourceId] : undefined;

/**
 * What earning `amount` for a source posts (cause `deal:<id>`, `order:<id>`): held until
 * `releaseAt` when given (a save inside its return window).
 */
export const earning = (
	account: AccountState,
	source: Source,
	amount: number,
	releaseAt?: string
): Draft[] =>
	arriving(account, source, {
		_id: Cause.of(source),
		kind: "earn",
		amount,
		...source,
		...(releaseAt && amount > 0 ? { held: amount, releaseAt } : {})
	});

/**
 * What the account's balance and the source's hold come to after `drafts` (about that source): what
 * a further revocation in the same posting can take.
 */
export function standingAfter(
	account: AccountState,
	source: Source,
	drafts: Draft[]
): { balance: number; held: number } {
	const toHold = drafts.reduce((sum, d) => sum + (d.held ?? 0), 0);
	return {
		balance: account.balance + totalOf(drafts) - toHold,
		held: (holdOf(account, source)?.points ?? 0) + toHold
	};
}

/** The releases of every hold due by `now` (ISO): each moves its deal's held points into the balance. */
export function releases(account: AccountState, now: string): Draft[] {
	return Object.entries(account.holds ?? {})
		.filter(([, hold]) => hold.releaseAt <= now)
		.sort(([, a], [, b]) => a.releaseAt.localeCompare(b.releaseAt))
		.map(([dealId, hold]) => ({
			_id: Cause.release(dealId),
			kind: "release",
			amount: 0,
			held: -hold.points,
			sourceType: "deal",
			sourceId: dealId,
			...(hold.merchantId ? { merchantId: hold.merchantId } : {})
		}));
}

/** The points drafts move into the balance from holds (what releases make spendable). */
const releasedBy = (drafts: Draft[]): number =>
	drafts.reduce((sum, d) => sum + (d.kind === "release" ? -(d.held ?? 0) : 0), 0);

/** What giving back `points` of a use posts, as `cause`: a fresh earning of this month, since the use's lots may be gone. */
export const restoration = (
	account: AccountState,
	cause: string,
	source: Source,
	points: number
): Draft[] => arriving(account, source, { _id: cause, kind: "restore", amount: points, ...source });

/**
 * What revoking `points` of an earning takes: first from the points still held for it (`held`),
 * then from `balance`, never below 0; the rest, already spent, is the shortfall.
 */
export function revocation(
	cause: string,
	source: Source,
	points: number,
	balance: number,
	held = 0
): Draft {
	const fromHold = Math.min(points, held);
	const revoked = fromHold + Math.min(points - fromHold, balance);
	const shortfall = points - revoked;
	return {
		_id: cause,
		kind: "revoke",
		amount: revoked ? -revoked : 0,
		...source,
		...(fromHold ? { held: -fromHold } : {}),
		...(shortfall ? { shortfall } : {})
	};
}

/** A zero entry under `cause`: it records that the source was undone before it was applied, so that it is refused when it comes. */
export const voiding = (cause: string, source: Source): Draft => ({
	_id: cause,
	kind: "void",
	amount: 0,
	...source
});

/**
 * What a use of `amount` posts (cause `deal:<id>`): never beyond the balance, nor on a closed account;
 * held points are not spent. However late the jobs run, points past their hold are spendable and
 * points past their validity are not: with `now`, the use first releases the holds due, and with
 * `dueThrough` (the latest month whose earnings have expired) it expires the lots due, each with
 * the job's own entries (one cause each).
 */
export function debiting(
	account: AccountState,
	source: Source,
	amount: number,
	dueThrough?: string,
	now?: string
): Draft[] | Refusal {
	if (account.status === "closed") return "ACCOUNT_CLOSED";
	const released = now ? releases(account, now) : [];
	const due = dueThrough ? expiries(account, dueThrough) : [];
	if (account.balance + releasedBy(released) + totalOf(due) < amount) return "INSUFFICIENT_POINTS";
	return [...released, ...due, { _id: Cause.of(source), kind: "use", amount: -amount, ...source }];
}

/**
 * What undoing a source posts (cause `deal-cancel:<id>`, `order-cancel:<id>`), given the entry it
 * posted if any: a use is restored in full; an earning is revoked as far as the balance allows; a
 * source not applied yet is voided.
 */
export function reversal(
	account: AccountState,
	source: Source,
	original?: Pick<LedgerEntry, "amount"> | null
): Draft[] {
	const cancel = Cause.cancel(source);
	if (!original) return [voiding(cancel, source)];
	if (original.amount < 0) return restoration(account, cancel, source, -original.amount);
	return [
		revocation(cancel, source, original.amount, account.balance, holdOf(account, source)?.points)
	];
}

/**
 * What one partial return of a deal posts (cause `deal-return:<id>:<n>`), given the deal's own entry
 * if any: the points the deals service reckoned for it are given back for a use (nothing to give
 * back, a void, when its debit is not there), or revoked for a save — from its hold while it is
 * held. A return that overtook its save's earning posts the earning with it (held until
 * `releaseAt`, if given).
 */
export function partialReturn(
	account: AccountState,
	deal: DealReturnedEvent,
	original?: Pick<LedgerEntry, "amount"> | null,
	releaseAt?: string
): Draft[] {
	const source = dealSource(deal);
	const cause = Cause.dealReturn(deal.dealId, deal.return.n);
	const { points } = deal.return;
	if (deal.type === "use")
		return original ? restoration(account, cause, source, points) : [voiding(cause, source)];
	if (original)
		return [revocation(cause, source, points, account.balance, holdOf(account, source)?.points)];
	const earned = earning(account, source, deal.point, releaseAt);
	const held = earned.reduce((sum, d) => sum + (d.held ?? 0), 0);
	return [
		...earned,
		revocation(cause, source, points, account.balance + totalOf(earned) - held, held)
	];
}

/**
 * A withdrawal (cause `expiry:<memberId>`): all that is left of the balance expires as one entry,
 * and the points held for each deal are forfeited, an entry each.
 */
export const withdrawal = (account: AccountState): Draft[] => [
	{
		_id: Cause.withdrawal(account._id),
		kind: "expire",
		amount: -account.balance,
		sourceType: "member",
		sourceId: account._id
	},
	...Object.entries(account.holds ?? {}).map(([dealId, hold]): Draft => ({
		_id: Cause.heldAtWithdrawal(account._id, dealId),
		kind: "expire",
		amount: -hold.points,
		held: -hold.points,
		sourceType: "deal",
		sourceId: dealId,
		...(hold.merchantId ? { merchantId: hold.merchantId } : {})
	}))
];

/** A staff adjustment (cause `adjustment:<id>`) with its reason and who made it: refused on a closed account, or below 0. */
export function adjustment(
	account: AccountState,
	adjustmentId: string,
	amount: number,
	reason: string,
	by: string
): Draft[] | Refusal {
	if (account.status === "closed") return "ACCOUNT_CLOSED";
	if (account.balance + amount < 0) return "INSUFFICIENT_POINTS";
	return [
		{
			_id: Cause.adjustment(adjustmentId),
			kind: "adjust",
			amount,
			sourceType: "adjustment",
			sourceId: adjustmentId,
			reason,
			by
		}
	];
}

/**
 * An opening balance brought by a bulk import (cause `import:<memberId>`): `points` earned in `month`
 * (`YYYYMM`), the lot they expire from. Refused on a closed account: a withdrawn member opens nothing.
 * Not an earning at OnePoint: it counts towards no tier.
 */
export function opening(account: AccountState, points: number, month: string): Draft[] | Refusal {
	if (account.status === "closed") return "ACCOUNT_CLOSED";
	return [
		{
			_id: Cause.opening(account._id),
			kind: "import",
			amount: points,
			sourceType: "member",
			sourceId: account._id,
			lotMonth: month
		}
	];
}

/** What a transfer's entries say of it: about the transfer, naming the other member. */
const aboutTransfer = (transferId: string, counterpartId: string) => ({
	sourceType: "transfer",
	sourceId: transferId,
	counterpartId
});

/**
 * What sending a transfer posts on the sender's account (cause `transfer-out:<id>`). Refused on a
 * closed account, when the points sent today (`sentToday`) and these would pass `dailyLimit`, and
 * when they would take the balance below 0. Like a use, it takes from the oldest lots and never sends
 * a point past its validity: with `dueThrough`, the lots due expire first.
 */
export function transferOut(
	account: AccountState,
	transfer: Omit<TransferSent, "at">,
	sentToday: number,
	dailyLimit: number,
	dueThrough?: string
): Draft[] | Refusal {
	if (account.status === "closed") return "ACCOUNT_CLOSED";
	if (sentToday + transfer.points > dailyLimit) return "TRANSFER_LIMIT_EXCEEDED";
	const due = dueThrough ? expiries(account, dueThrough) : [];
	if (account.balance + totalOf(due) < transfer.points) return "INSUFFICIENT_POINTS";
	return [
		...due,
		{
			_id: Cause.transferOut(transfer.transferId),
			kind: "transfer",
			amount: -transfer.points,
			...aboutTransfer(transfer.transferId, transfer.toMemberId)
		}
	];
}

/**
 * What receiving a transfer posts on the receiver's account (cause `transfer-in:<id>`): an earning
 * of the month it arrives in. A closed account refuses it, for good: the sender is refunded instead.
 */
export const transferIn = (account: AccountState, transfer: TransferSent): Draft[] | Refusal =>
	account.status === "closed"
		? "ACCOUNT_CLOSED"
		: [
				{
					_id: Cause.transferIn(transfer.transferId),
					kind: "transfer",
					amount: transfer.points,
					...aboutTransfer(transfer.transferId, transfer.fromMemberId)
				}
			];

/**
 * What refunding a transfer that its receiver refused posts on the sender's account (cause
 * `transfer-refund:<id>`): a restoration, of fresh validity (the lots it was taken from may be gone),
 * which expires on arrival if the sender has withdrawn meanwhile.
 */
export const transferRefund = (account: AccountState, transfer: TransferSent): Draft[] =>
	arriving(
		account,
		{ memberId: account._id, sourceType: "transfer", sourceId: transfer.transferId },
		{
			_id: Cause.transferRefund(transfer.transferId),
			kind: "restore",
			amount: transfer.points,
			...aboutTransfer(transfer.transferId, transfer.toMemberId)
		}
	);

/** The transfer a sender's `transfer-out:<id>` entry records. */
export function transferOf(out: LedgerEntry): TransferSent {
	if (!out.counterpartId) throw new Error(`Ledger entry '${out._id}' names no receiver`);
	return {
		transferId: out.sourceId,
		fromMemberId: out.memberId,
		toMemberId: out.counterpartId,
		points: -out.amount,
		at: out.at
	};
}

/** An account after a posting: its entries as the ledger stores them, its balance, lots and holds. */
export interface Applied {
	entries: LedgerEntry[];
	balance: number;
	lots: Lots;
	held: number;
	holds: Holds;
}

/**
 * Applies drafts to the account, posted `at` (ISO): each entry gets the balance after it and the next
 * `seq()`; what an entry moves to or from a hold (`held`) is its deal's hold, the rest the balance.
 * What the balance gains is an earning of `at`'s month's lot (a release too) unless the entry names
 * its lot (an opening balance), an expiry takes its own lot, and anything else that takes points takes them from the oldest lots first.
 */
export function applyDrafts(
	account: AccountState,
	drafts: Draft[],
	at: string,
	seq: () => string
): Applied {
	const memberId = account._id;
	let balance = account.balance;
	let held = account.held ?? 0;
	const holds: Holds = { ...account.holds };
	let lots = lotsOf(account);
	const entries: LedgerEntry[] = drafts.map(d => {
		const toHold = d.held ?? 0;
		if (toHold) {
			if (d.sourceType !== "deal" || !d.sourceId)
				throw new Error(`Entry '${d._id}' moves held points but names no deal`);
			const hold = holds[d.sourceId];
			const points = (hold?.points ?? 0) + toHold;
			if (points > 0)
				holds[d.sourceId] = {
					points,
					releaseAt: hold?.releaseAt ?? (d.releaseAt as string),
					...(d.merchantId ? { merchantId: d.merchantId } : {})
				};
			else delete holds[d.sourceId];
			held += toHold;
		}
		balance += d.amount - toHold;
		// An entry that names its lot gives to it (an opening balance) or takes from it (an expiry).
		lots = applyToLots(lots, d.amount - toHold, d.lotMonth ?? monthOf(at), d.lotMonth);
		return {
			memberId,
			sourceType: "member",
			sourceId: memberId,
			...d,
			balanceAfter: balance,
			at,
			seq: seq()
		};
	});
	return { entries, balance, lots, held, holds };
}

/** An entry as events and the history show it: named by its cause. */
export const postedOf = ({ _id, seq: _seq, ...entry }: LedgerEntry): PostedEntry => ({
	cause: _id,
	...entry
});
