// NeDB internals used by lib/store/nedb.ts; not in NeDB's typings.
declare module "@seald-io/nedb/lib/model" {
	/** NeDB's own line format (dates as `{$$date}`). */
	export function serialize(doc: unknown): string;
	/** Reads a line of NeDB's format back. */
	export function deserialize(line: string): unknown;
	/** The value at a dotted path, as NeDB's indexes read it. */
	export function getDotValue(doc: unknown, field: string): unknown;
	/** NeDB's ordering of index keys: 0 when they are the same key. */
	export function compareThings(a: unknown, b: unknown): number;
}
