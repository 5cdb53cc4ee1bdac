/** Months as `YYYYMM`, in UTC: billing's months, the ledger's by-month views, the months points expire in. */

/** The month an ISO instant falls in. */
export const monthOf = (iso: string): string => iso.slice(0, 7).replace("-", "");

/** [first instant of the month, first instant of the next), as ISO strings. */
export function monthBounds(month: string): [string, string] {
	const start = new Date(0);
	// setUTCFullYear, not Date.UTC: Date.UTC reads a year below 100 as 19xx.
	start.setUTCFullYear(Number(month.slice(0, 4)), Number(month.slice(4, 6)) - 1, 1);
	const end = new Date(start);
	end.setUTCMonth(end.getUTCMonth() + 1);
	return [start.toISOString(), end.toISOString()];
}

/** `month` moved by `delta` months. */
export function addMonths(month: string, delta: number): string {
	const at = new Date(monthBounds(month)[0]);
	at.setUTCMonth(at.getUTCMonth() + delta);
	return monthOf(at.toISOString());
}

/** The month before the one `date` falls in. */
export const previousMonth = (date: Date): string => addMonths(monthOf(date.toISOString()), -1);
