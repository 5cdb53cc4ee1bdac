/**
 * Tiers (TIERS): the rules, pure like lib/posting.ts. A member's tier comes from the points they
 * earned in a rolling window of 12 UTC months (the current month and the 11 before it), never from
 * their balance: a save's base earning and an order's accrual count in the month they are posted in;
 * a revocation of one of them (a cancellation, a return) takes back what it revoked, shortfall
 * included, from the month of the earning it revokes (`earnedIn`). Bonuses, restorations,
 * adjustments and expiries do not count. Earnings leave the window month by month, so a tier falls
 * at the start of a month.
 *
 * A save earns its base at the merchant's rate, and the tier's multiplier's extra as a bonus of its
 * own (`deal-bonus:<id>`), funded by the coalition: floor(base × multiplier) − base, in basis points.
 */
import type { DealEvent, DealReturnedEvent } from "../contracts/channels";
import { addMonths, monthOf } from "./months";
import { Cause, dealSource, revocation, type AccountState, type Draft } from "./posting";
import { applyRate } from "./rates";

/** A tier as TIERS names it: the points earned in the window that reach it, and its earn multiplier (bp). */
export interface Tier {
	name: string;
	threshold: number;
	multiplierBp: number;
}

/** Points earned by month (`YYYYMM`, UTC), within the window: none empty. */
export type Earned = Record<string, number>;

/** What the tier rules read of an account, besides its state. */
export interface TierState {
	openedAt: string;
	/** The counted earnings of the window's months, as of the last posting. */
	earned?: Earned;
	/** The tier of record and since when; absent until a posting since tiers: the lowest, since the account opened. */
	tier?: { name: string; since: string };
	/**
	 * Above the lowest tier only: the month in which, as earnings leave the window, the tier falls
	 * unless the member earns more. What the daily review finds accounts by.
	 */
	tierReview?: string;
}

/** How many months the window holds: the current one and the 11 before it. */
export const WINDOW_MONTHS = 12;

/** The first month of the window at `at` (ISO). */
export const windowStart = (at: string): string => addMonths(monthOf(at), 1 - WINDOW_MONTHS);

/** The points earned in the window whose last month is `month`. */
const earnedThrough = (earned: Earned, month: string): number => {
	const from = addMonths(month, 1 - WINDOW_MONTHS);
	return Object.entries(earned).reduce(
		(sum, [earnedIn, points]) => (earnedIn >= from ? sum + points : sum),
		0
	);
};

/** The points earned in the window at `at`. */
export const earnedWithin = (earned: Earned, at: string): number =>
	earnedThrough(earned, monthOf(at));

/**
 * The first month after `at`'s in which the earnings left in the window fall below `tier`'s
 * threshold: within 12 months, when the last of them has left.
 */
function fallsIn(earned: Earned, tier: Tier, at: string): string {
	let month = addMonths(monthOf(at), 1);
	while (earnedThrough(earned, month) >= tier.threshold) month = addMonths(month, 1);
	return month;
}

/** The highest tier `points` reach (the first tier's threshold is 0). */
export const tierFor = (tiers: readonly Tier[], points: number): Tier =>
	tiers.reduce((reached, tier) => (points >= tier.threshold ? tier : reached));

/** The tier a member is in at `at`, by their earnings in the window: what a save's bonus is reckoned at. */
export const tierAt = (tiers: readonly Tier[], account: TierState, at: string): Tier =>
	tierFor(tiers, earnedWithin(account.earned ?? {}, at));

/** What a draft changes of the counted earnings, and in which month. */
function earnedChange(draft: Draft, at: string): { month: string; points: number } | undefined {
	if (draft.kind === "earn") return { month: monthOf(at), points: draft.amount };
	if (draft.earnedIn)
		return { month: draft.earnedIn, points: draft.amount - (draft.shortfall ?? 0) };
	return undefined;
}

/** The counted earnings after drafts posted `at`: months that left the window are dropped. */
export function earnedAfter(earned: Earned, drafts: readonly Draft[], at: string): Earned {
	const from = windowStart(at);
	const next: Earned = Object.fromEntries(
		Object.entries(earned).filter(([month]) => month >= from)
	);
	for (const draft of drafts) {
		const change = earnedChange(draft, at);
		if (!change || change.month < from) continue;
		const points = (next[change.month] ?? 0) + change.points;
		// Below 0 only for an earning from before earnings were counted.
		if (points > 0) next[change.month] = points;
		else delete next[change.month];
	}
	return next;
}

/** Revocations among `drafts` marked as taking back earnings of `month` (`original`'s month, or the posting's). */
export const takingBack = (drafts: Draft[], month: string): Draft[] =>
	drafts.map(draft => (draft.kind === "revoke" ? { ...draft, earnedIn: month } : draft));

/** An account's tier standing after a posting: the tier change's entry if any, and what the write sets. */
export interface TierStanding {
	drafts: Draft[];
	earned: Earned;
	tier: { name: string; since: string };
	tierReview?: string;
}

/**
 * The tier after `drafts` are posted `at` by the account's posting `version`: from the earnings in the
 * window after them. A change is a zero entry (`tier:<memberId>:<version>`, `silver → gold`). A closed
 * account keeps the tier it had.
 */
export function tierStanding(
	tiers: readonly Tier[],
	account: AccountState & TierState,
	drafts: readonly Draft[],
	at: string,
	version: number,
	closing: boolean
): TierStanding {
	const earned = earnedAfter(account.earned ?? {}, drafts, at);
	const before = account.tier ?? { name: tiers[0].name, since: account.openedAt };
	const reached = tierFor(tiers, earnedWithin(earned, at));
	const closed = account.status === "closed" || closing;
	const changes = reached.name !== before.name && !closed;
	const tier = changes ? { name: reached.name, since: at } : before;
	return {
		drafts: changes
			? [
					{
						_id: Cause.tier(account._id, version),
						kind: "tier",
						amount: 0,
						sourceType: "member",
						sourceId: account._id,
						reason: `${before.name} → ${reached.name}`
					}
				]
			: [],
		earned,
		tier,
		// An open account is at the tier it reached: when it falls is reckoned from that one.
		...(reached === tiers[0] || closed ? {} : { tierReview: fallsIn(earned, reached, at) })
	};
}

/** `GET /points/:memberId`'s tier: the tier of record, the earnings in the window, and how far the next tier is. */
export interface TierView {
	name: string;
	since: string;
	earned12m: number;
	next: { name: string; needed: number } | null;
}

export function tierView(tiers: readonly Tier[], account: TierState, at: string): TierView {
	const earned12m = earnedWithin(account.earned ?? {}, at);
	// A tier TIERS no longer names is reckoned afresh until the account's next posting records it.
	const current = tiers.find(t => t.name === account.tier?.name) ?? tierFor(tiers, earned12m);
	const next = tiers[tiers.indexOf(current) + 1];
	return {
		name: current.name,
		since: account.tier?.name === current.name ? account.tier.since : account.openedAt,
		earned12m,
		next: next ? { name: next.name, needed: Math.max(0, next.threshold - earned12m) } : null
	};
}

/** A save's bonus at a tier: what its multiplier adds to the base, floor(base × multiplier) − base. */
export const bonusOf = (base: number, tier: Tier): number =>
	applyRate(base, tier.multiplierBp) - base;

/** A save's bonus entry (`deal-bonus:<id>`), when its tier adds one; none on a closed account. */
export function saveBonus(
	account: AccountState,
	deal: DealEvent,
	tier: Tier,
	releaseAt?: string
): Draft[] {
	const points = bonusOf(deal.point, tier);
	if (points <= 0 || account.status === "closed") return [];
	return [
		{
			_id: Cause.bonus(deal.dealId),
			kind: "bonus",
			amount: points,
			...dealSource(deal),
			// Held with its base until the save's return window ends.
			...(releaseAt ? { held: points, releaseAt } : {})
		}
	];
}

/**
 * What of a save's bonus its returns of `returnedPoints` in all leave: the bonus less its share of
 * them, rounded down, reckoned on the total so that returns applied in any order take the same
 * shares, and the return that completes the deal takes all that is left.
 */
export const bonusLeft = (bonusPoints: number, point: number, returnedPoints: number): number =>
	bonusPoints - Number((BigInt(bonusPoints) * BigInt(returnedPoints)) / BigInt(point));

/**
 * A return's share of its save's bonus (`deal-bonus-return:<id>:<n>`), revoked from what is still
 * held for the deal (`held`), then as far as `balance` allows.
 */
export function bonusReturn(
	deal: DealReturnedEvent,
	bonusPoints: number,
	balance: number,
	held = 0
): Draft {
	const before = deal.returnedPoints - deal.return.points;
	const share =
		bonusLeft(bonusPoints, deal.point, before) -
		bonusLeft(bonusPoints, deal.point, deal.returnedPoints);
	return revocation(
		Cause.bonusReturn(deal.dealId, deal.return.n),
		dealSource(deal),
		share,
		balance,
		held
	);
}
