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

/** Replays the NeDB file `file` into `table` (a quoted name); run it in a transaction. */
export function importNedbFile(db: DatabaseSync, table: string, file: string): Imported {
	const upsert = db.prepare(`INSERT OR REPLACE INTO ${table} (_id, doc) VALUES (?, ?)`);
	const remove = db.prepare(`DELETE FROM ${table} WHERE _id = ?`);
	const result: Imported = { lines: 0, removed: 0, documents: 0, tornLine: false };
	const replay = (line: string, last: boolean) => {
		if (!line.trim()) return;
		result.lines++;
		let doc: Record<string, unknown>;
		try {
			doc = JSON.parse(line, line.includes('"$$date"') ? revive : undefined) as typeof doc;
		} catch (err) {
			if (last) return void (result.tornLine = true);
			throw new Error(
				`${file}, line ${result.lines}: not a JSON document (${(err as Error).message})`
			);
		}
		if ("$$indexCreated" in doc || "$$indexRemoved" in doc) return;
		if (typeof doc._id !== "string")
			throw new Error(`${file}, line ${result.lines}: a document without a string _id`);
		if (doc.$$deleted === true) {
			remove.run(doc._id);
			result.removed++;
		} else upsert.run(doc._id, JSON.stringify(doc));
	};

	const fd = fs.openSync(file, "r");
	try {
		const chunk = Buffer.alloc(CHUNK_BYTES);
		let rest = Buffer.alloc(0);
		for (let read; (read = fs.readSync(fd, chunk, 0, CHUNK_BYTES, null)) > 0;) {
			const data = Buffer.concat([rest, chunk.subarray(0, read)]);
			let start = 0;
			for (let end; (end = data.indexOf(10, start)) !== -1; start = end + 1)
				replay(data.toString("utf8", start, end), false);
			rest = data.subarray(start);
		}
		replay(rest.toString("utf8"), true);
	} finally {
		fs.closeSync(fd);
	}
	result.documents = (db.prepare(`SELECT count(*) AS n FROM ${table}`).get() as { n: number }).n;
	return result;
}
