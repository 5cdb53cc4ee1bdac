/**
 * NeDB datastores as this project opens them, with two of NeDB's costs taken out
 * (docs/performance.md); what a write guarantees is unchanged. The internals replaced are fenced in
 * lib/patches.ts.
 *
 * Writes: NeDB appends every write to its file through the thread pool and answers once the line is
 * written. Here the line is written synchronously to a file descriptor kept open per collection: the
 * same guarantee — a write is with the operating system before it is answered, so a killed process
 * loses nothing it acknowledged — without a thread-pool round trip, nor an open and a close, per
 * write. NeDB rewrites the file (a new file renamed over the old) when it loads or compacts it; the
 * descriptor is reopened after each rewrite.
 *
 * Index upkeep: NeDB replaces an updated document by a new object, so every index removes the old
 * one and inserts the new one, and an index keeps the documents of one key in an array that a
 * removal copies: O(documents with that key) per write, which grows with the data (every settled
 * deal shares `status`). Here the stored object is updated in place, so only the indexes whose key
 * changed are touched.
 *
 * Loading: NeDB parses every line with a reviver (for its `$$date` form, which these documents do
 * not use) and then rewrites the whole file, however little of it is superseded: at 1M ledger
 * entries the rewrite alone took a third of the start-up and doubled the memory it peaked at. Here
 * a line without `$$date` is parsed plainly, and the file is rewritten only when that pays: when at
 * least two thirds of its lines are superseded (updated, removed), or it ends in a torn line, which
 * the next append must not continue. (A deal is written, then updated once as its event leaves the
 * outbox: half of such a file is superseded for good, and rewriting it at every start gains nothing.)
 * A running process rewrites a file by the same rule once it is long enough to matter.
 */
import fs from "node:fs";
import type { Readable } from "node:stream";
import Datastore from "@seald-io/nedb";
import { compareThings, deserialize, getDotValue, serialize } from "@seald-io/nedb/lib/model";
import { assertPatchable, PATCHES } from "../patches";

/** The parts of NeDB's internals this replaces or uses (not in its typings). */
interface Persistence {
	corruptAlertThreshold: number;
	persistNewStateAsync(docs: object[]): Promise<void>;
	persistCachedDatabaseAsync(): Promise<void>;
	treatRawStreamAsync(stream: Readable): Promise<Loaded>;
}
/** What a file holds: its documents and the indexes it declares. */
interface Loaded {
	data: object[];
	indexes: Record<string, object>;
}
interface Line {
	_id?: string;
	$$deleted?: boolean;
	$$indexCreated?: { fieldName?: string };
	$$indexRemoved?: string;
}
interface Index {
	fieldName: string;
	insert(doc: object): void;
	remove(doc: object): void;
}
interface Internals {
	indexes: Record<string, Index>;
	_updateIndexes(pairs: Modification[]): void;
}
interface Modification {
	oldDoc: Record<string, unknown>;
	newDoc: Record<string, unknown>;
}

/** A file is rewritten at load when it has this many lines per document (or index) it keeps. */
const REWRITE_AT_LINES_PER_DOCUMENT = 3;
/** While running, a file shorter than this is not rewritten: small files cost little to read. */
const MIN_LINES_TO_REWRITE_RUNNING = 10_000;

/**
 * Whether a running process should rewrite a file of `lines` lines that keeps `kept` documents: the
 * load's rule, for files long enough to matter. Without it the files of a busy node grow with every
 * write until the next start (an account is written twice per posting), and so does that start.
 */
export function worthRewriting(lines: number, kept: number): boolean {
	return lines >= rewriteAt(kept);
}

/** The lines at which a running process rewrites a file that keeps `kept` documents. */
function rewriteAt(kept: number): number {
	return Math.max(MIN_LINES_TO_REWRITE_RUNNING, REWRITE_AT_LINES_PER_DOCUMENT * kept);
}

interface DataFile {
	fd?: number;
	/** Lines in the file. */
	lines: number;
	/** How many lines it may reach before it is worth counting its documents again. */
	checkAt: number;
}

const descriptors = new WeakMap<Datastore<object>, DataFile>();

export function openDatastore<T extends object>(filename: string): Datastore<T> {
	// No serialization hooks to test: NeDB's check of them draws 290 random strings per store opened.
	const db = new Datastore<T>({ filename, testSerializationHooks: false });
	assertPatchable(PATCHES.nedbDatastore, db);
	assertPatchable(PATCHES.nedbPersistence, db.persistence);
	const file: DataFile = { lines: 0, checkAt: Infinity };
	descriptors.set(db as Datastore<object>, file);
	// Counting the documents takes a pass over them: done again only once the file has grown past
	// what the last count allows, so the checks grow apart as the collection grows.
	const plan = (kept: number) => (file.checkAt = rewriteAt(kept));
	const persistence = db.persistence as unknown as Persistence;
	persistence.persistNewStateAsync = async docs => {
		if (!docs.length) return;
		file.fd ??= fs.openSync(filename, "a");
		const bytes = Buffer.from(docs.map(doc => `${serialize(doc)}\n`).join(""), "utf8");
		for (let written = 0; written < bytes.length;) written += fs.writeSync(file.fd, bytes, written);
		file.lines += docs.length;
		if (file.lines < file.checkAt) return;
		const kept = db.getAllData().length;
		if (!worthRewriting(file.lines, kept)) return void plan(kept);
		// Queued behind this write (NeDB's executor runs one operation at a time); a failed rewrite
		// leaves the file as it was and is tried again after more writes.
		file.checkAt = Infinity;
		db.compactDatafileAsync().catch(() => plan(kept));
	};
	// NeDB's load reads the file, then rewrites it: the rewrite is skipped when the read found it compact enough.
	let compactEnough = false;
	persistence.treatRawStreamAsync = async stream => {
		const { loaded, lines, torn } = await readLines(stream, persistence.corruptAlertThreshold);
		const kept = loaded.data.length + Object.keys(loaded.indexes).length;
		compactEnough = !torn && lines < REWRITE_AT_LINES_PER_DOCUMENT * kept;
		file.lines = lines;
		plan(kept);
		return loaded;
	};
	const rewrite = persistence.persistCachedDatabaseAsync.bind(persistence);
	persistence.persistCachedDatabaseAsync = async () => {
		if (compactEnough) {
			compactEnough = false;
			return;
		}
		await rewrite();
		closeFile(file);
		file.lines = db.getAllData().length;
		plan(file.lines);
	};
	const internals = db as unknown as Internals;
	internals._updateIndexes = pairs => updateInPlace(Object.values(internals.indexes), pairs);
	return db;
}

/**
 * NeDB's reading of a file, line by line: the last line for an id wins, a `$$deleted` line removes
 * it, index lines declare and remove indexes. A line that does not parse is skipped, and more than
 * `corruptAlertThreshold` of them refuse the file, as NeDB does; a last line cut short (a write the
 * process died in) is dropped. `torn`: the file does not end with a line break, or some line did
 * not parse.
 */
async function readLines(
	stream: Readable,
	corruptAlertThreshold: number
): Promise<{ loaded: Loaded; lines: number; torn: boolean }> {
	const byId = new Map<string, object>();
	const indexes: Record<string, object> = {};
	let lines = 0;
	let corrupt = 0;
	let rest = "";
	const take = (line: string, last = false) => {
		if (!line) return;
		let doc: Line;
		try {
			doc = (line.includes('"$$date"') ? deserialize(line) : JSON.parse(line)) as Line;
		} catch {
			// A last line cut short was never acknowledged: dropping it loses nothing.
			if (!last) {
				lines++;
				corrupt++;
			}
			return;
		}
		lines++;
		if (doc._id) {
			if (doc.$$deleted === true) byId.delete(doc._id);
			else byId.set(doc._id, doc);
		} else if (doc.$$indexCreated?.fieldName != null)
			indexes[doc.$$indexCreated.fieldName] = doc.$$indexCreated;
		else if (typeof doc.$$indexRemoved === "string") delete indexes[doc.$$indexRemoved];
	};
	for await (const chunk of stream as AsyncIterable<string>) {
		const text = rest + chunk;
		let start = 0;
		for (let end = text.indexOf("\n"); end >= 0; start = end + 1, end = text.indexOf("\n", start))
			take(text.slice(start, end));
		rest = text.slice(start);
	}
	take(rest, true);
	if (lines > 0 && corrupt / lines > corruptAlertThreshold)
		throw new Error(
			`${Math.floor((100 * corrupt) / lines)}% of the data file is corrupt, more than the ${Math.floor(100 * corruptAlertThreshold)}% allowed; refusing to load it.`
		);
	return { loaded: { data: [...byId.values()], indexes }, lines, torn: rest !== "" || corrupt > 0 };
}

/** Closes the collection's file; a later write opens it again. */
export function closeDatastore<T extends object>(db: Datastore<T>): void {
	const file = descriptors.get(db as Datastore<object>);
	if (file) closeFile(file);
}

function closeFile(file: DataFile): void {
	if (file.fd === undefined) return;
	fs.closeSync(file.fd);
	file.fd = undefined;
}

function replaceContent(target: Record<string, unknown>, source: Record<string, unknown>): void {
	for (const key of Object.keys(target)) if (!(key in source)) delete target[key];
	Object.assign(target, source);
}

/** Re-keys `doc` in `indexes` as its content becomes `content`; on a unique violation nothing has changed. */
function rekey(
	doc: Record<string, unknown>,
	content: Record<string, unknown>,
	indexes: Index[]
): void {
	for (const index of indexes) index.remove(doc);
	const before = { ...doc };
	replaceContent(doc, content);
	const inserted: Index[] = [];
	try {
		for (const index of indexes) {
			index.insert(doc);
			inserted.push(index);
		}
	} catch (err) {
		for (const index of inserted) index.remove(doc);
		replaceContent(doc, before);
		for (const index of indexes) index.insert(doc);
		throw err;
	}
}

/** NeDB's `_updateIndexes` for its update path: all the modifications or none. */
function updateInPlace(indexes: Index[], pairs: Modification[]): void {
	const done: {
		doc: Record<string, unknown>;
		before: Record<string, unknown>;
		changed: Index[];
	}[] = [];
	try {
		for (const { oldDoc, newDoc } of pairs) {
			const changed = indexes.filter(
				index =>
					compareThings(
						getDotValue(oldDoc, index.fieldName),
						getDotValue(newDoc, index.fieldName)
					) !== 0
			);
			const before = { ...oldDoc };
			rekey(oldDoc, newDoc, changed);
			done.push({ doc: oldDoc, before, changed });
		}
	} catch (err) {
		for (const { doc, before, changed } of done.reverse()) rekey(doc, before, changed);
		throw err;
	}
}
