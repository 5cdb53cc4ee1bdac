/**
 * Points that expire (POINTS_VALID_MONTHS): an account keeps what remains of its earnings as lots,
 * one per month earned (`YYYYMM`, UTC). A lot earned in month M expires at the end of month
 * M + validMonths. Whatever takes points (a use, a revocation, a negative adjustment) takes them
 * from the oldest lots first, so the lots always add up to the balance.
 */

import { addMonths, monthBounds, monthOf } from "./months";

/** Remaining earned points by the month they were earned (`YYYYMM` → points), none empty. */
export type Lots = Record<string, number>;

/** The first instant of the month after `month`: when a lot expiring in `month` is gone. */
const endOf = (month: string): string => monthBounds(month)[1];

/** The latest month whose earnings have expired by `now` (their validity ended before this month began). */
export const expiredThrough = (now: Date, validMonths: number): string =>
	addMonths(monthOf(now.toISOString()), -(validMonths + 1));

/** The oldest month with points left, if any: what the expiry job looks accounts up by. */
export const oldestOf = (lots: Lots): string | undefined => Object.keys(lots).sort()[0];

export const sumOf = (lots: Lots): number =>
	Object.values(lots).reduce((sum, points) => sum + points, 0);

/**
 * The lots after a posting of `amount` in `month`: an earning adds to that month's lot; a taking
 * takes from the lot `from` names (an expiry) or else from the oldest lots first.
 */
export function applyToLots(lots: Lots, amount: number, month: string, from?: string): Lots {
	const next = { ...lots };
	if (amount > 0) next[month] = (next[month] ?? 0) + amount;
	let owed = -amount;
	for (const key of from ? [from] : Object.keys(next).sort()) {
		if (owed <= 0) break;
		const taken = Math.min(owed, next[key] ?? 0);
		next[key] = (next[key] ?? 0) - taken;
		owed -= taken;
	}
	for (const key of Object.keys(next)) if (next[key] <= 0) delete next[key];
	return next;
}

export interface Expiring {
	/** The month at whose end the points expire. */
	month: string;
	/** When they are gone: the first instant of the next month (UTC). */
	expiresAt: string;
	points: number;
}

/**
 * What expires at the end of this month and of the `count - 1` months after it. Lots already due
 * but not yet taken by the job count in this month's figure. Nothing when points never expire.
 */
export function expiringSoon(lots: Lots, validMonths: number, now: Date, count = 3): Expiring[] {
	if (validMonths <= 0) return [];
	const current = monthOf(now.toISOString());
	return Array.from({ length: count }, (_, i) => {
		const month = addMonths(current, i);
		const earnedIn = addMonths(month, -validMonths);
		const points = Object.entries(lots)
			.filter(([earned]) => (i === 0 ? earned <= earnedIn : earned === earnedIn))
			.reduce((sum, [, p]) => sum + p, 0);
		return { month, expiresAt: endOf(month), points };
	});
}
