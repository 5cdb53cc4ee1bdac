/**
 * Moving a collection off NeDB: its file is read once into the collection's table. NeDB's format is
 * plain NDJSON, appended to: a document per line, a later line for the same `_id` superseding the
 * earlier ones, `{"$$deleted":true,"_id":…}` removing it, `{"$$indexCreated":…}` and
 * `{"$$indexRemoved":…}` declaring indexes (the collection declares its own), and a date as
 * `{"$$date":ms}` (stored now as its ISO string, as the services write dates). The file is read in
 * chunks and replayed in order into the table, so memory does not grow with it.
 */
import fs from "node:fs";
import type { DatabaseSync } from "node:sqlite";

export interface Imported {
	lines: number;
	removed: number;
	/** Documents in the table after the import. */
	documents: number;
	/** The file ended in a line cut short: a write the process died in, never acknowledged. */
	tornLine: boolean;
}

const CHUNK_BYTES = 1 << 20;

const revive = (_key: string, value: unknown) =>
	value !== null &&
	typeof value === "object" &&
	typeof (value as { $$date?: unknown }).$$date === "number" &&
	Object.keys(value).length === 1
		? new Date((value as { $$date: number }).$$date).toISOString()
		: value;

/**
 * The records of `file`, a file in NeDB's format, in order, read a chunk at a time. A torn last line
 * (a process killed while writing it, so never acknowledged) is skipped and reported to `torn`; any
 * other unreadable line stops the reading.
 */
export function* nedbRecords(
	file: string,
	torn: () => void = () => undefined
): Generator<Record<string, unknown>> {
	let lines = 0;
	const parse = (line: string, last: boolean) => {
		try {
			return JSON.parse(line, line.includes('"$$date"') ? revive : undefined) as Record<
				string,
				unknown
			>;
		} catch (err) {
			if (last) return void torn();
			throw new Error(`${file}, line ${lines}: not a JSON document (${(err as Error).message})`);
		}
	};
	const fd = fs.openSync(file, "r");
	try {
		const chunk = Buffer.alloc(CHUNK_BYTES);
		let rest = Buffer.alloc(0);
		for (let read; (read = fs.readSync(fd, chunk, 0, CHUNK_BYTES, null)) > 0;) {
			const data = Buffer.concat([rest, chunk.subarray(0, read)]);
			let start = 0;
			for (let end; (end = data.indexOf(10, start)) !== -1; start = end + 1) {
				const line = data.toString("utf8", start, end);
				lines++;
				const record = line.trim() ? parse(line, false) : undefined;
				if (record) yield record;
			}
			rest = data.subarray(start);
		}
		const line = rest.toString("utf8");
		lines++;
		const record = line.trim() ? parse(line, true) : undefined;
		if (record) yield record;
	} finally {
		fs.closeSync(fd);
	}
}

/** Replays the NeDB file `file` into `table` (a quoted name); run it in a transaction. */
export function importNedbFile(db: DatabaseSync, table: string, file: string): Imported {
	const upsert = db.prepare(`INSERT OR REPLACE INTO ${table} (_id, doc) VALUES (?, ?)`);
	const remove = db.prepare(`DELETE FROM ${table} WHERE _id = ?`);
	const result: Imported = { lines: 0, removed: 0, documents: 0, tornLine: false };
	for (const doc of nedbRecords(file, () => (result.tornLine = true))) {
		result.lines++;
		if ("$$indexCreated" in doc || "$$indexRemoved" in doc) continue;
		if (typeof doc._id !== "string")
			throw new Error(`${file}, line ${result.lines}: a document without a string _id`);
		if (doc.$$deleted === true) {
			remove.run(doc._id);
			result.removed++;
		} else upsert.run(doc._id, JSON.stringify(doc));
	}
	result.documents = (db.prepare(`SELECT count(*) AS n FROM ${table}`).get() as { n: number }).n;
	return result;
}
