// NeDB's own line format (dates as `{$$date}`), used by lib/store/nedb.ts; not in NeDB's typings.
declare module "@seald-io/nedb/lib/model" {
	export function serialize(doc: unknown): string;
}
