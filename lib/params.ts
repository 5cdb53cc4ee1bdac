/**
 * fastest-validator rules shared by the services' action params. Ids are bounded strings of a safe
 * alphabet, so a query operator (`{"$gt": ""}`) or a `$where` can never reach a store as an id;
 * amounts are positive safe integers, and strings of digits with stray spaces are accepted.
 */
export const id = { type: "string", pattern: /^[A-Za-z0-9_-]{1,64}$/, convert: true } as const;
export const optionalId = { ...id, optional: true } as const;

export const amount = (max: number) => ({ type: "number", integer: true, positive: true, max, convert: true }) as const;

/** `page` / `pageSize` of a paged listing; query strings arrive as text. */
export const paging = {
	page: { type: "number", integer: true, min: 1, max: 1_000_000, default: 1, convert: true },
	pageSize: { type: "number", integer: true, min: 1, max: 100, default: 20, convert: true }
} as const;

/** The largest amount a single deal or order may carry: 10 billion won. */
export const MAX_AMOUNT = 10_000_000_000;
/** The most points a single deal may use. */
export const MAX_POINTS = 1_000_000_000;
