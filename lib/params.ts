import type { CompilationRule } from "fastest-validator";
import { BASIS } from "./rates";

/**
 * fastest-validator rules shared by the services' action params. Ids are bounded strings of a safe
 * alphabet, so a query operator (`{"$gt": ""}`) or a `$where` can never reach a store as an id;
 * amounts are safe integers within bounds (positive, or non-zero when signed), also sent as strings of digits.
 */
export const id = { type: "string", pattern: /^[A-Za-z0-9_-]{1,64}$/, convert: true } as const;
export const optionalId = { ...id, optional: true } as const;

/** A positive whole number up to `max`: an amount of money or points, or a count. */
export const amount = (max: number) => ({ type: "amount", max }) as const;
/** A whole number from 0 to `max`: a count that may be none (days). */
export const count = (max: number) => ({ type: "amount", max, zero: true }) as const;
/** A non-zero whole number from `-max` to `max`: points given or taken. */
export const signedAmount = (max: number) => ({ type: "amount", max, signed: true }) as const;

/**
 * The `amount` rule (registered with the broker's validator): a positive safe integer up to
 * `schema.max` (with `signed`, a non-zero one from `-max`; with `zero`, 0 too), sent as a number or as a string of digits
 * with stray spaces — and as nothing else. (fastest-validator's `number` with `convert` would also
 * read `true` as 1, `[100]` as 100 and `""` as 0.)
 */
export function amountRule(
	this: { makeError(error: object): string },
	{ schema, messages }: CompilationRule
): { sanitized: boolean; source: string } {
	const {
		max = Number.MAX_SAFE_INTEGER,
		signed = false,
		zero = false
	} = schema as {
		max?: number;
		signed?: boolean;
		zero?: boolean;
	};
	const error = (type: string, expected?: number) =>
		this.makeError({ type, actual: "origValue", expected, messages });
	const digits = signed ? "/^\\s*-?\\d+\\s*$/" : "/^\\s*\\d+\\s*$/";
	return {
		sanitized: true,
		source: `
			var origValue = value;
			if (typeof value === "string" && ${digits}.test(value)) value = Number(value);
			if (typeof value !== "number" || !Number.isSafeInteger(value)) { ${error("numberInteger")} return value; }
			${signed ? `if (value === 0) { ${error("numberNotEqual", 0)} return value; }` : zero ? `if (value < 0) { ${error("numberMin", 0)} return value; }` : `if (value <= 0) { ${error("numberPositive")} return value; }`}
			if (value > ${Number(max)}) { ${error("numberMax", Number(max))} }
			${signed ? `if (value < ${-Number(max)}) { ${error("numberMin", -Number(max))} }` : ""}
			return value;
		`
	};
}

/** A decimal from 0 to `max` with at most 4 places (a basis point): a rate (`max` 1) or a price. */
export const decimal = (max: number) => ({ type: "decimal", max }) as const;

/**
 * The `decimal` rule (registered with the broker's validator): a finite number from 0 to
 * `schema.max` with at most 4 decimal places, sent as a number or as decimal text (HTTPie's
 * `earnRate=0.05` sends text). The handler turns it into basis points with `toBasisPoints`.
 */
export function decimalRule(
	this: { makeError(error: object): string },
	{ schema, messages }: CompilationRule
): { sanitized: boolean; source: string } {
	const { max = 1 } = schema as { max?: number };
	const error = (type: string, expected?: number) =>
		this.makeError({ type, actual: "origValue", expected, messages });
	return {
		sanitized: true,
		source: `
			var origValue = value;
			if (typeof value === "string" && /^\\s*\\d+(\\.\\d+)?\\s*$/.test(value)) value = Number(value);
			if (typeof value !== "number" || !Number.isFinite(value)) { ${error("number")} return value; }
			if (value < 0) { ${error("numberMin", 0)} return value; }
			if (value > ${Number(max)}) { ${error("numberMax", Number(max))} return value; }
			if (Math.abs(value * ${BASIS} - Math.round(value * ${BASIS})) > 1e-6) { ${error("decimalPlaces", 4)} }
			return value;
		`
	};
}

/** What the `decimal` rule's message says of a number with too many places. */
export const DECIMAL_MESSAGES = {
	decimalPlaces: "The '{field}' field must have at most {expected} decimal places (a basis point)."
};

/** A value the `decimal` rule passed, in basis points (0.05 → 500). */
export const toBasisPoints = (value: number): number => Math.round(value * BASIS);

/** A month, YYYYMM, of a year from 2000 to 2099: `000101` is no month (JavaScript's dates would make it 1901). */
export const month = {
	type: "string",
	pattern: /^20\d\d(0[1-9]|1[0-2])$/,
	messages: { stringPattern: "The '{field}' field must be YYYYMM, of a year from 2000 to 2099" }
} as const;

/** `page` / `pageSize` of a paged listing; query strings arrive as text. */
export const paging = {
	page: { type: "number", integer: true, min: 1, max: 1_000_000, default: 1, convert: true },
	pageSize: { type: "number", integer: true, min: 1, max: 100, default: 20, convert: true }
} as const;

/** The largest amount a single deal or order may carry: 10 billion won. */
export const MAX_AMOUNT = 10_000_000_000;
/** The most points a single deal may use. */
export const MAX_POINTS = 1_000_000_000;
