/**
 * A merchant's contract terms: what its saves earn, the fee on the points redeemed there and the
 * price of the points it issues. Held in basis points (lib/rates.ts); shown as decimals.
 */
import type { DealTerms } from "../contracts/channels";
import { rateOf } from "./rates";

/** Terms as clients see them: `{earnRate: 0.01, redemptionFee: 0.02, pointPrice: 1, holdDays: 0}`. */
export interface TermsView {
	earnRate: number;
	redemptionFee: number;
	pointPrice: number;
	holdDays: number;
}

/** Terms and the moment they take effect. */
export interface ScheduledTerms extends DealTerms {
	from: string;
	/** The request (Idempotency-Key) that set them, if it had one. */
	requestId?: string;
}

export const termsView = ({
	earnRateBp,
	redemptionFeeBp,
	pointPriceBp,
	holdDays
}: DealTerms): TermsView => ({
	earnRate: rateOf(earnRateBp),
	redemptionFee: rateOf(redemptionFeeBp),
	pointPrice: rateOf(pointPriceBp),
	holdDays: holdDays ?? 0
});

export const scheduledView = (terms: ScheduledTerms): TermsView & { from: string } => ({
	...termsView(terms),
	from: terms.from
});

/** Just the terms, without when or by which request they were set: what a deal records. */
export const dealTermsOf = ({
	earnRateBp,
	redemptionFeeBp,
	pointPriceBp,
	holdDays
}: DealTerms): DealTerms => ({
	earnRateBp,
	redemptionFeeBp,
	pointPriceBp,
	holdDays: holdDays ?? 0
});

/**
 * The terms in force at `at`: the last of the history (kept in the order the terms take effect,
 * a later change after an earlier one of the same moment) that took effect by then; the first
 * ones for a moment before any (a deal stamped by a node whose clock is a little behind).
 */
export function termsAt(history: readonly ScheduledTerms[], at: string): ScheduledTerms {
	let found = history[0];
	for (const terms of history) if (terms.from <= at) found = terms;
	return found;
}

/** `history` with `terms` put in its place: after every entry taking effect at or before it. */
export function scheduled(
	history: readonly ScheduledTerms[],
	terms: ScheduledTerms
): ScheduledTerms[] {
	const at = history.findIndex(entry => entry.from > terms.from);
	return at < 0 ? [...history, terms] : [...history.slice(0, at), terms, ...history.slice(at)];
}
