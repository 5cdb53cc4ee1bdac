import { Readable } from "node:stream";
import { stringify } from "csv-stringify/sync";
import type { Context } from "moleculer";

/** What moleculer-web reads from an action's `ctx.meta` to shape its HTTP answer. */
export interface AnswerMeta {
	$statusCode?: number;
	$location?: string;
	$responseType?: string;
	$responseHeaders?: Record<string, string>;
}

/** Answers `201 Created` with the new resource's `Location`, and the resource. */
export function created<T>(ctx: Context<unknown, AnswerMeta>, location: string, view: T): T {
	ctx.meta.$statusCode = 201;
	ctx.meta.$location = location;
	return view;
}

/** The media type of every CSV answer. */
export const CSV = "text/csv; charset=utf-8";
/** The media type of an answer of JSON documents, one a line. */
export const NDJSON = "application/x-ndjson";

/** A CSV answer's file: its columns (the header row) and the name it is saved under. */
export interface CsvFile {
	filename: string;
	columns: readonly string[];
}

/** Sends the answer as a download of `file.filename`, of type `type`. */
function asFile(ctx: Context<unknown, AnswerMeta>, filename: string, type: string): void {
	ctx.meta.$responseType = type;
	ctx.meta.$responseHeaders = { "Content-Disposition": `attachment; filename="${filename}"` };
}

/**
 * A CSV answer (RFC 4180: a header row, CRLF line ends): from rows in memory, as one string; from
 * pages of rows read from a store, as a stream that reads the next page only as the client takes
 * the last, so a large export holds one page at a time.
 */
export function csvAnswer(
	ctx: Context<unknown, AnswerMeta>,
	file: CsvFile,
	rows: readonly object[]
): string;
export function csvAnswer(
	ctx: Context<unknown, AnswerMeta>,
	file: CsvFile,
	pages: AsyncIterable<readonly object[]>
): Readable;
export function csvAnswer(
	ctx: Context<unknown, AnswerMeta>,
	file: CsvFile,
	rows: readonly object[] | AsyncIterable<readonly object[]>
): string | Readable {
	asFile(ctx, file.filename, CSV);
	const options = { columns: [...file.columns], record_delimiter: "windows" as const };
	if (!(Symbol.asyncIterator in rows)) return stringify([...rows], { ...options, header: true });
	return Readable.from(
		(async function* () {
			yield stringify([], { ...options, header: true });
			for await (const page of rows) if (page.length) yield stringify([...page], options);
		})()
	);
}

/** An NDJSON answer (`application/x-ndjson`): one JSON document a line, from pages read as the client takes them. */
export function ndjsonAnswer(
	ctx: Context<unknown, AnswerMeta>,
	filename: string,
	rows: AsyncIterable<readonly object[]>
): Readable {
	asFile(ctx, filename, NDJSON);
	return Readable.from(
		(async function* () {
			for await (const page of rows)
				if (page.length) yield page.map(row => `${JSON.stringify(row)}\n`).join("");
		})()
	);
}
