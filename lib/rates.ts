/**
 * Rates (the earn rate, the redemption fee) and the point price held as integer basis points, never
 * as floats: 0.29 as a float makes 100 × 0.29 = 28.999…, floored to 28. Parsed from their decimal
 * text and applied in integer arithmetic, every floor is exact.
 */

/** One basis point is 1/10000. */
export const BASIS = 10_000;

/** "0.29" → 2900. A rate is a decimal from 0 to `max` (1 unless said) with at most 4 places. */
export function parseRate(name: string, text: string, max = 1): number {
	const match = /^\s*(\d+)(?:\.(\d+))?\s*$/.exec(text);
	const places = (match?.[2] ?? "").replace(/0+$/, "");
	if (!match || places.length > 4)
		throw new Error(
			`${name} must be a decimal between 0 and ${max} with at most 4 places (a basis point), got '${text}'`
		);
	const bp = Number(match[1]) * BASIS + Number(places.padEnd(4, "0"));
	if (bp > max * BASIS) throw new Error(`${name} must be between 0 and ${max}, got '${text}'`);
	return bp;
}

/** amount × rate, rounded toward zero (a negative amount gives the mirror of its positive). */
export function applyRate(amount: number, rateBp: number): number {
	if (!Number.isSafeInteger(amount)) throw new RangeError(`Not a safe integer amount: ${amount}`);
	return Number((BigInt(amount) * BigInt(rateBp)) / BigInt(BASIS));
}

/** The points a `save` of `dealAmount` earns: floor(amount × rate). */
export const earnedPoints = (dealAmount: number, earnRateBp: number): number =>
	applyRate(dealAmount, earnRateBp);

/** What the merchant is paid for `points` (a settlement's total, negative for a net claw-back), and the fee kept. */
export function settlementAmounts(
	points: number,
	feeBp: number
): { fee: number; billingAmount: number } {
	const billingAmount = applyRate(points, BASIS - feeBp);
	return { fee: points - billingAmount, billingAmount };
}

/** 2900 → 0.29, for display. */
export const rateOf = (bp: number): number => bp / BASIS;
