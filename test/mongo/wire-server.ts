/**
 * A MongoDB stand-in for the tests, reached over the wire by the real driver and mongoose.
 *
 * No mongod can be installed on the test machines, so this speaks the wire protocol (OP_QUERY for the
 * legacy handshake, OP_MSG for everything else) as a standalone 6.0 server and takes MongoDB's query,
 * update and aggregation semantics from mingo. Every message waits one event-loop turn before it is
 * handled, so concurrent connections interleave; every command then runs to its end in that turn,
 * which makes each write atomic as on a server. Stored documents are never modified in place: a write
 * stores a new version, so a reply or an open cursor never sees a later change. Data lives in memory
 * for the life of the process.
 */
import net from "node:net";
import {
	calculateObjectSize,
	deserialize,
	EJSON,
	Long,
	ObjectId,
	serialize,
	UUID,
	type Document
} from "bson";
import { Aggregator, Query, updateOne } from "mingo";

type Doc = Document;
type QueryOptions = ConstructorParameters<typeof Query>[1];
type Modifier = Parameters<typeof updateOne>[2];

const OP_REPLY = 1;
const OP_QUERY = 2004;
const OP_MSG = 2013;
const CHECKSUM_PRESENT = 1;
const MORE_TO_COME = 2;
const VERSION = "6.0.0-standin";
const MAX_WIRE_VERSION = 17;
const MAX_BSON_SIZE = 16 * 1024 * 1024;
const MAX_MESSAGE_SIZE = 48_000_000;
const MAX_WRITE_BATCH_SIZE = 100_000;
/** Room left in a reply for what surrounds a batch of documents. */
const MAX_BATCH_BYTES = MAX_BSON_SIZE - 64 * 1024;
const DEFAULT_BATCH_SIZE = 101;
const CURSOR_TIMEOUT_MS = 10 * 60_000;
const HELLO = new Set(["hello", "isMaster", "ismaster"]);
const UPDATE_OPERATORS = new Set([
	"$addToSet",
	"$bit",
	"$currentDate",
	"$inc",
	"$max",
	"$min",
	"$mul",
	"$pop",
	"$pull",
	"$pullAll",
	"$push",
	"$rename",
	"$set",
	"$setOnInsert",
	"$unset"
]);
/** Values as the driver itself reads them: numbers for int32/int64/double (a Long only beyond 2^53), Dates, ObjectIds. */
const DESERIALIZE = {
	promoteValues: true,
	promoteLongs: true,
	promoteBuffers: false,
	bsonRegExp: false
};

class CommandError extends Error {
	constructor(
		readonly code: number,
		readonly codeName: string,
		message: string,
		readonly details: Doc = {}
	) {
		super(message);
	}

	reply(): Doc {
		return {
			ok: 0,
			errmsg: this.message,
			code: this.code,
			codeName: this.codeName,
			...this.details
		};
	}
}

/** mingo reports a bad query or update with a plain Error; MongoDB would call it a BadValue. */
const asCommandError = (err: unknown): CommandError =>
	err instanceof CommandError
		? err
		: new CommandError(2, "BadValue", err instanceof Error ? err.message : String(err));

// --- Values -------------------------------------------------------------------------------------

const isPlain = (v: unknown): v is Doc => {
	if (v === null || typeof v !== "object") return false;
	const proto = Object.getPrototypeOf(v);
	return proto === Object.prototype || proto === null;
};

const isOperatorObject = (v: unknown): v is Doc =>
	isPlain(v) && Object.keys(v).some(k => k.startsWith("$"));

/** A deep copy of plain objects, arrays and Dates; BSON values (ObjectId, Long, Binary...) are immutable and shared. */
function copy<T>(v: T): T {
	if (Array.isArray(v)) return v.map(copy) as T;
	if (v instanceof Date) return new Date(v.getTime()) as T;
	if (isPlain(v)) {
		const out: Doc = {};
		for (const k of Object.keys(v)) out[k] = copy(v[k]);
		return out as T;
	}
	return v;
}

/**
 * A string equal for values MongoDB holds equal in an index (numbers of any BSON type by value, a
 * missing field as null, embedded documents field by field in order): keys of `_id` and unique indexes.
 */
function keyOf(v: unknown): string {
	if (v === undefined || v === null) return "null";
	switch (typeof v) {
		case "number":
		case "bigint":
			return `n${v}`;
		case "string":
			return JSON.stringify(v);
		case "boolean":
			return String(v);
	}
	if (Array.isArray(v)) return `[${v.map(keyOf).join(",")}]`;
	if (v instanceof Date) return `d${v.getTime()}`;
	if (v instanceof ObjectId) return `o${v.toHexString()}`;
	if (v instanceof Long) return `n${v.toString()}`;
	if (v instanceof RegExp) return `/${v.source}/${v.flags}`;
	if (isPlain(v))
		return `{${Object.keys(v)
			.map(k => `${JSON.stringify(k)}:${keyOf(v[k])}`)
			.join(",")}}`;
	return `${(v as { _bsontype?: string })._bsontype}${EJSON.stringify(v as Doc, { relaxed: false })}`;
}

/** A value as mongod prints it in a duplicate-key message. */
function show(v: unknown): string {
	if (v === undefined || v === null) return "null";
	if (typeof v === "string") return JSON.stringify(v);
	if (typeof v === "number" || typeof v === "boolean") return String(v);
	if (v instanceof ObjectId) return `ObjectId('${v.toHexString()}')`;
	return EJSON.stringify(v as Doc);
}

/** The values a dotted path reaches, descending into arrays as a multikey index does; a missing field is undefined. */
function valuesAt(v: unknown, parts: string[]): unknown[] {
	if (!parts.length) return Array.isArray(v) && v.length ? v : [v];
	const [head, ...rest] = parts;
	if (Array.isArray(v))
		return /^\d+$/.test(head)
			? valuesAt(v[Number(head)], rest)
			: v.flatMap(e => valuesAt(e, parts));
	return isPlain(v) ? valuesAt(v[head], rest) : [undefined];
}

function setPath(doc: Doc, path: string, value: unknown): void {
	const parts = path.split(".");
	const last = parts.pop() as string;
	let at = doc;
	for (const part of parts) {
		if (!isPlain(at[part])) at[part] = {};
		at = at[part];
	}
	at[last] = value;
}

/** MongoDB stores `_id` first and gives a document without one an ObjectId. */
function idFirst(doc: Doc): Doc {
	const { _id = new ObjectId(), ...rest } = doc;
	if (Array.isArray(_id))
		throw new CommandError(53, "InvalidIdField", "The '_id' value cannot be of type array");
	return { _id, ...rest };
}

/** mingo's options for a command, or one statement of it: its collation and `let` variables. */
function queryOptions(cmd: Doc, statement: Doc = {}): QueryOptions {
	const collation = statement.collation ?? cmd.collation;
	return { ...(collation ? { collation } : {}), ...(cmd.let ? { variables: cmd.let } : {}) };
}

function project(doc: Doc, fields: Doc | undefined, options: QueryOptions): Doc {
	return fields && Object.keys(fields).length
		? (new Query({}, options).find<Doc>([doc], fields).all()[0] as Doc)
		: doc;
}

// --- Updates ------------------------------------------------------------------------------------

const isReplacement = (u: Doc | Doc[]): boolean =>
	!Array.isArray(u) && !Object.keys(u).some(k => k.startsWith("$"));

/** Rejects an update document before it touches anything, with the codes mongod uses. */
function validateUpdate(u: unknown, multi: boolean): asserts u is Doc | Doc[] {
	if (Array.isArray(u)) return;
	if (!isPlain(u))
		throw new CommandError(
			9,
			"FailedToParse",
			"Update argument must be either an object or an array"
		);
	if (isReplacement(u)) {
		if (multi)
			throw new CommandError(
				9,
				"FailedToParse",
				"multi update is not supported for replacement-style update"
			);
		return;
	}
	const unknown = Object.keys(u).find(op => !UPDATE_OPERATORS.has(op));
	if (unknown)
		throw new CommandError(
			9,
			"FailedToParse",
			`Unknown modifier: ${unknown}. Expected a valid update modifier or pipeline-style update specified as an array`
		);
	const paths: string[] = [];
	for (const [op, args] of Object.entries(u)) {
		if (!isPlain(args))
			throw new CommandError(
				9,
				"FailedToParse",
				`Modifiers operate on fields but we found another type instead: ${op}`
			);
		paths.push(...Object.keys(args), ...(op === "$rename" ? Object.values(args).map(String) : []));
	}
	for (const [i, a] of paths.entries()) {
		const clash = paths
			.slice(i + 1)
			.find(b => a === b || a.startsWith(`${b}.`) || b.startsWith(`${a}.`));
		if (clash !== undefined)
			throw new CommandError(
				40,
				"ConflictingUpdateOperators",
				`Updating the path '${clash}' would create a conflict at '${a}'`
			);
	}
}

const immutableId = () =>
	new CommandError(
		66,
		"ImmutableField",
		"Performing an update on the path '_id' would modify the immutable field '_id'"
	);
const isIdPath = (path: string) => path === "_id" || path.startsWith("_id.");

/**
 * mingo refuses every update operator on `_id`. MongoDB lets `$set` give it the value it has (mongoose
 * sends that) or, on an upsert, its first value, and refuses the rest: such a `$set` is done here, on `doc`.
 */
function settleId(doc: Doc, modifier: Doc): Doc {
	const rest: Doc = {};
	for (const [op, args] of Object.entries(modifier)) {
		const kept: Doc = {};
		for (const [path, value] of Object.entries(args as Doc)) {
			if (!isIdPath(path) && !(op === "$rename" && isIdPath(String(value)))) kept[path] = value;
			else if (
				op === "$set" &&
				path === "_id" &&
				(doc._id === undefined || keyOf(doc._id) === keyOf(value))
			)
				doc._id = copy(value);
			else throw immutableId();
		}
		rest[op] = kept;
	}
	return rest;
}

/** Whether an update names a path through the positional `$`, which mingo resolves from the filter. */
const positional = (modifier: Doc): boolean =>
	Object.values(modifier).some(
		args => isPlain(args) && Object.keys(args).some(path => path.split(".").includes("$"))
	);

/**
 * Applies an update of `$set`, `$unset` and numeric `$inc` on top-level fields (most of what the
 * services send) to `doc` itself, without mingo's set-up for each update (a copy of its operator
 * tables, the stand-in's largest cost on writes); false, leaving `doc` as it is, for any other update.
 */
function updatedAtTopLevel(doc: Doc, modifier: Doc): boolean {
	for (const [op, args] of Object.entries(modifier)) {
		if (op !== "$set" && op !== "$unset" && op !== "$inc") return false;
		for (const [field, value] of Object.entries(args as Doc)) {
			if (field.includes(".") || field.startsWith("$")) return false;
			// MongoDB refuses to increment a field that holds something other than a number, null included.
			const current = doc[field];
			const numeric = typeof current === "number" || !(field in doc);
			if (op === "$inc" && (typeof value !== "number" || !numeric)) return false;
		}
	}
	for (const [field, value] of Object.entries(modifier.$set ?? {})) doc[field] = copy(value);
	for (const field of Object.keys(modifier.$unset ?? {})) delete doc[field];
	for (const [field, by] of Object.entries(modifier.$inc ?? {}))
		doc[field] = ((doc[field] as number | undefined) ?? 0) + (by as number);
	return true;
}

/** The document `u` turns `doc` into, as a new object; `doc` itself is left as it is. */
function nextVersion(
	doc: Doc,
	u: Doc | Doc[],
	condition: Doc,
	arrayFilters: Doc[] | undefined,
	options: QueryOptions,
	inserting = false
): Doc {
	let next: Doc;
	if (isReplacement(u)) next = copy(u as Doc);
	else {
		let modifier: Doc | Doc[] = u;
		if (!Array.isArray(u)) {
			// mingo has no $setOnInsert: it is a $set when the upsert inserts, and nothing otherwise.
			const { $setOnInsert, ...operators } = u;
			modifier =
				inserting && $setOnInsert
					? { ...operators, $set: { ...operators.$set, ...$setOnInsert } }
					: operators;
		}
		// A shallow copy is enough where only top-level fields change: no version is modified in place.
		next = { ...doc };
		if (!Array.isArray(modifier)) modifier = settleId(next, modifier);
		if (Array.isArray(modifier) || !updatedAtTopLevel(next, modifier)) {
			const box = [copy(next)];
			// The filter lets mingo resolve a positional `$`; without one it would only be compiled again
			// to match the document it selected.
			updateOne(
				box,
				Array.isArray(modifier) || inserting || !positional(modifier) ? {} : condition,
				modifier as Modifier,
				{ arrayFilters, cloneMode: "deep" },
				options
			);
			next = box[0];
		}
	}
	if (doc._id !== undefined) {
		if (next._id === undefined && isReplacement(u)) next = { _id: doc._id, ...next };
		else if (keyOf(next._id) !== keyOf(doc._id)) throw immutableId();
	}
	return idFirst(next);
}

/** The equality conditions of a filter, which an upsert copies into the document it inserts. */
function equalities(filter: Doc, into: Doc = {}): Doc {
	for (const [path, condition] of Object.entries(filter)) {
		if (path === "$and" && Array.isArray(condition))
			for (const part of condition) equalities(part, into);
		else if (path.startsWith("$") || condition instanceof RegExp) continue;
		else if (!isOperatorObject(condition)) setPath(into, path, copy(condition));
		else if ("$eq" in condition) setPath(into, path, copy(condition.$eq));
		else if (Array.isArray(condition.$in) && condition.$in.length === 1)
			setPath(into, path, copy(condition.$in[0]));
	}
	return into;
}

/** What an upsert inserts: the filter's equalities (only its `_id` under a replacement) with the update applied. */
function upsertDocument(
	filter: Doc,
	u: Doc | Doc[],
	arrayFilters: Doc[] | undefined,
	options: QueryOptions
): Doc {
	const seed = equalities(filter);
	const base = isReplacement(u) ? (seed._id === undefined ? {} : { _id: seed._id }) : seed;
	return nextVersion(base, u, {}, arrayFilters, options, true);
}

// --- Collections and indexes --------------------------------------------------------------------

interface Index {
	/** As listIndexes reports it. */
	readonly spec: Doc;
	readonly fields: string[];
	readonly unique: boolean;
	readonly sparse: boolean;
	readonly partial?: Query;
	/** Unique indexes only: the `_id` key of the document holding each index key. */
	readonly owners: Map<string, string>;
}

function makeIndex(spec: Doc): Index {
	const partial = isPlain(spec.partialFilterExpression)
		? new Query(spec.partialFilterExpression)
		: undefined;
	return {
		spec,
		fields: Object.keys(spec.key),
		unique: Boolean(spec.unique),
		sparse: Boolean(spec.sparse),
		partial,
		owners: new Map()
	};
}

/** The keys `doc` has in `index` with the values they are made of; none when a sparse or partial index leaves it out. */
function indexEntries(index: Index, doc: Doc): { key: string; values: unknown[] }[] {
	const perField = index.fields.map(field => valuesAt(doc, field.split(".")));
	if (index.sparse && perField.every(values => values.every(v => v === undefined))) return [];
	if (index.partial && !index.partial.test(doc)) return [];
	let combinations: unknown[][] = [[]];
	for (const values of perField)
		combinations = combinations.flatMap(c => values.map(v => [...c, v]));
	const entries = new Map<string, unknown[]>();
	for (const values of combinations) entries.set(values.map(keyOf).join("|"), values);
	return [...entries].map(([key, values]) => ({ key, values }));
}

function duplicateKey(ns: string, index: Index, values: unknown[]): CommandError {
	const keyValue: Doc = {};
	index.fields.forEach((field, i) => (keyValue[field] = values[i] ?? null));
	const shown = index.fields.map((field, i) => `${field}: ${show(values[i])}`).join(", ");
	return new CommandError(
		11000,
		"DuplicateKey",
		`E11000 duplicate key error collection: ${ns} index: ${index.spec.name} dup key: { ${shown} }`,
		{
			keyPattern: index.spec.key,
			keyValue
		}
	);
}

interface Selection {
	sort?: Doc;
	skip?: number;
	limit?: number;
	projection?: Doc;
}

class Collection {
	/** By `_id` key, in insertion order, which is the natural order of a find. */
	readonly docs = new Map<string, Doc>();
	/** The first is the `_id` index, enforced by `docs` itself. */
	indexes: Index[] = [makeIndex({ v: 2, key: { _id: 1 }, name: "_id_" })];
	readonly uuid = new UUID();

	constructor(readonly ns: string) {}

	select(filter: Doc, { sort, skip, limit, projection }: Selection, options: QueryOptions): Doc[] {
		const reached = this.byId(filter, options);
		// A filter of `_id` alone is answered by the documents its values reach, without a query to
		// compile: mingo copies its operator tables for each, the stand-in's largest cost on reads.
		const plain =
			!(projection && Object.keys(projection).length) && !(sort && Object.keys(sort).length);
		if (reached?.whole && (plain || reached.docs.length === 0)) {
			const from = skip ?? 0;
			return reached.docs.slice(from, limit ? from + limit : undefined);
		}
		const candidates = reached?.docs ?? [...this.docs.values()];
		const cursor = new Query(filter, options).find<Doc>(candidates, projection);
		if (sort && Object.keys(sort).length) cursor.sort(sort);
		if (skip) cursor.skip(skip);
		if (limit) cursor.limit(limit);
		return cursor.all();
	}

	insert(doc: Doc): void {
		const id = keyOf(doc._id);
		if (this.docs.has(id)) throw duplicateKey(this.ns, this.indexes[0], [doc._id]);
		this.checkUnique(doc, id);
		this.docs.set(id, doc);
		this.link(doc, id);
	}

	/** Stores a new version of the document with the same `_id`. */
	replace(doc: Doc): void {
		const id = keyOf(doc._id);
		this.checkUnique(doc, id);
		const before = this.docs.get(id);
		if (before) this.unlink(before, id);
		this.docs.set(id, doc);
		this.link(doc, id);
	}

	remove(doc: Doc): void {
		const id = keyOf(doc._id);
		this.unlink(doc, id);
		this.docs.delete(id);
	}

	/** Builds a new index over the documents already stored; throws, adding nothing, if a unique one finds duplicates. */
	addIndex(spec: Doc): void {
		const index = makeIndex(spec);
		if (index.unique) {
			for (const [id, doc] of this.docs) {
				for (const { key, values } of indexEntries(index, doc)) {
					const owner = index.owners.get(key);
					if (owner !== undefined && owner !== id) throw duplicateKey(this.ns, index, values);
					index.owners.set(key, id);
				}
			}
		}
		this.indexes.push(index);
	}

	/**
	 * The documents an `_id` equality or `$in` of values reaches through the `_id` index, in natural
	 * order, instead of a scan; `whole` when the filter asks nothing else, so that they are its answer.
	 * Undefined when a scan is needed: no such condition, a regular expression, or a collation (which
	 * compares strings its own way).
	 */
	private byId(filter: Doc, options: QueryOptions): { docs: Doc[]; whole: boolean } | undefined {
		const id = filter._id;
		if (id === undefined || id instanceof RegExp || options?.collation) return undefined;
		const whole = Object.keys(filter).length === 1;
		if (!isOperatorObject(id)) {
			const doc = this.docs.get(keyOf(id));
			return { docs: doc ? [doc] : [], whole };
		}
		const values = id.$in;
		if (
			Object.keys(id).length !== 1 ||
			!Array.isArray(values) ||
			values.some(v => v instanceof RegExp || isOperatorObject(v))
		)
			return undefined;
		const keys = new Set(values.map(keyOf));
		const docs: Doc[] = [];
		if (keys.size > 1) {
			for (const [key, doc] of this.docs) if (keys.has(key)) docs.push(doc);
		} else {
			const doc = this.docs.get([...keys][0]);
			if (doc) docs.push(doc);
		}
		return { docs, whole };
	}

	private checkUnique(doc: Doc, id: string): void {
		for (const index of this.indexes) {
			if (!index.unique) continue;
			for (const { key, values } of indexEntries(index, doc)) {
				const owner = index.owners.get(key);
				if (owner !== undefined && owner !== id) throw duplicateKey(this.ns, index, values);
			}
		}
	}

	private link(doc: Doc, id: string): void {
		for (const index of this.indexes)
			if (index.unique) for (const { key } of indexEntries(index, doc)) index.owners.set(key, id);
	}

	private unlink(doc: Doc, id: string): void {
		for (const index of this.indexes) {
			if (!index.unique) continue;
			for (const { key } of indexEntries(index, doc))
				if (index.owners.get(key) === id) index.owners.delete(key);
		}
	}
}

// --- Commands -----------------------------------------------------------------------------------

interface Client {
	readonly id: number;
	appName?: string;
}

interface Target {
	readonly db: string;
	readonly coll: string;
	readonly ns: string;
}

interface OpenCursor {
	readonly ns: string;
	readonly docs: Doc[];
	position: number;
	lastUsed: number;
}

interface FailPoint {
	remaining: number;
	skip: number;
	readonly data: Doc;
}

function takeBatch(cursor: OpenCursor, size: number): Doc[] {
	const batch: Doc[] = [];
	let bytes = 0;
	while (cursor.position < cursor.docs.length && batch.length < size) {
		const doc = cursor.docs[cursor.position];
		bytes += calculateObjectSize(doc);
		if (batch.length && bytes > MAX_BATCH_BYTES) break;
		batch.push(doc);
		cursor.position++;
	}
	return batch;
}

function withWriteErrors(reply: Doc, writeErrors: Doc[]): Doc {
	return writeErrors.length ? { ...reply, writeErrors } : reply;
}

function writeError(index: number, err: unknown): Doc {
	const { code, message, details } = asCommandError(err);
	return { index, code, errmsg: message, ...details };
}

/** The databases of one server, the cursors open on them and the `failCommand` fail point. */
class Engine {
	private readonly databases = new Map<string, Map<string, Collection>>();
	private readonly cursors = new Map<number, OpenCursor>();
	private nextCursorId = 1;
	private failCommand?: FailPoint;
	private failPointEntered = 0;

	/** Answers one command; null asks for the connection to be closed without an answer (a fail point's `closeConnection`). */
	async run(db: string, cmd: Doc, client: Client): Promise<Doc | null> {
		const name = Object.keys(cmd)[0] ?? "";
		const fail = this.triggeredFailPoint(name, db, cmd[name], client);
		if (fail?.blockConnection)
			await new Promise(resolve => setTimeout(resolve, Number(fail.blockTimeMS ?? 0)));
		if (fail?.closeConnection) return null;
		if (fail?.errorCode !== undefined) {
			const errmsg = fail.errmsg ?? "Failing command via 'failCommand' failpoint";
			return {
				ok: 0,
				errmsg,
				code: fail.errorCode,
				...(fail.errorLabels ? { errorLabels: fail.errorLabels } : {})
			};
		}
		let reply: Doc;
		try {
			reply = this.execute(db, name, cmd, client);
		} catch (err) {
			reply = asCommandError(err).reply();
		}
		return fail?.writeConcernError
			? { ...reply, writeConcernError: fail.writeConcernError }
			: reply;
	}

	private execute(db: string, name: string, cmd: Doc, client: Client): Doc {
		// As on a real standalone: sessions are accepted, transactions and retryable writes are not.
		if (cmd.txnNumber !== undefined || cmd.startTransaction !== undefined) {
			throw new CommandError(
				20,
				"IllegalOperation",
				"Transaction numbers are only allowed on a replica set member or mongos"
			);
		}
		switch (name) {
			case "hello":
			case "isMaster":
			case "ismaster":
				return this.hello(cmd, client);
			case "ping":
			case "endSessions":
				return { ok: 1 };
			case "buildInfo":
			case "buildinfo":
				return {
					version: VERSION,
					versionArray: [6, 0, 0, 0],
					gitVersion: "standin",
					bits: 64,
					maxBsonObjectSize: MAX_BSON_SIZE,
					ok: 1
				};
			case "configureFailPoint":
				return this.configureFailPoint(db, cmd);
			case "listDatabases":
				return this.listDatabases(db, cmd);
			case "dropDatabase":
				this.databases.delete(db);
				return { ok: 1 };
			case "listCollections":
				return this.listCollections(db, cmd);
			case "getMore":
				return this.getMore(cmd);
			case "killCursors":
				return this.killCursors(cmd);
			case "find":
				return this.find(this.target(db, cmd.find), cmd);
			case "insert":
				return this.insert(this.target(db, cmd.insert), cmd);
			case "update":
				return this.update(this.target(db, cmd.update), cmd);
			case "delete":
				return this.delete(this.target(db, cmd.delete), cmd);
			case "findAndModify":
				return this.findAndModify(this.target(db, cmd.findAndModify), cmd);
			case "count":
				return this.count(this.target(db, cmd.count), cmd);
			case "distinct":
				return this.distinct(this.target(db, cmd.distinct), cmd);
			case "aggregate":
				return this.aggregate(this.target(db, cmd.aggregate), cmd);
			case "createIndexes":
				return this.createIndexes(this.target(db, cmd.createIndexes), cmd);
			case "listIndexes":
				return this.listIndexes(this.target(db, cmd.listIndexes), cmd);
			case "dropIndexes":
				return this.dropIndexes(this.target(db, cmd.dropIndexes), cmd);
			case "create":
				return this.create(this.target(db, cmd.create));
			case "drop":
				return this.drop(this.target(db, cmd.drop));
			default:
				throw new CommandError(59, "CommandNotFound", `no such command: '${name}'`);
		}
	}

	private target(db: string, coll: unknown): Target {
		if (typeof coll !== "string" || !coll)
			throw new CommandError(
				73,
				"InvalidNamespace",
				`Invalid namespace specified '${db}.${String(coll)}'`
			);
		return { db, coll, ns: `${db}.${coll}` };
	}

	private collection(t: Target): Collection | undefined {
		return this.databases.get(t.db)?.get(t.coll);
	}

	/** Writes create their collection (and its database) implicitly, as on MongoDB. */
	private createCollection(t: Target): Collection {
		let db = this.databases.get(t.db);
		if (!db) this.databases.set(t.db, (db = new Map()));
		let coll = db.get(t.coll);
		if (!coll) db.set(t.coll, (coll = new Collection(t.ns)));
		return coll;
	}

	private hello(cmd: Doc, client: Client): Doc {
		client.appName ??= cmd.client?.application?.name;
		return {
			helloOk: true,
			ismaster: true,
			isWritablePrimary: true,
			maxBsonObjectSize: MAX_BSON_SIZE,
			maxMessageSizeBytes: MAX_MESSAGE_SIZE,
			maxWriteBatchSize: MAX_WRITE_BATCH_SIZE,
			localTime: new Date(),
			logicalSessionTimeoutMinutes: 30,
			connectionId: client.id,
			minWireVersion: 0,
			maxWireVersion: MAX_WIRE_VERSION,
			readOnly: false,
			ok: 1
		};
	}

	// Fail points ----------------------------------------------------------------------------------

	private configureFailPoint(db: string, cmd: Doc): Doc {
		if (db !== "admin")
			throw new CommandError(
				13,
				"Unauthorized",
				"configureFailPoint may only be run against the admin database."
			);
		if (cmd.configureFailPoint !== "failCommand")
			throw new CommandError(
				2,
				"BadValue",
				`The stand-in has no fail point '${cmd.configureFailPoint}', only 'failCommand'`
			);
		const { mode, data = {} } = cmd;
		const count = this.failPointEntered;
		this.failPointEntered = 0;
		if (mode === "off") this.failCommand = undefined;
		else {
			const remaining =
				mode === "alwaysOn"
					? Infinity
					: isPlain(mode) && (mode.times !== undefined || mode.skip !== undefined)
						? Number(mode.times ?? Infinity)
						: NaN;
			if (Number.isNaN(remaining))
				throw new CommandError(
					2,
					"BadValue",
					"mode must be 'off', 'alwaysOn', { times: n } or { skip: n }"
				);
			if (!Array.isArray(data.failCommands))
				throw new CommandError(
					2,
					"BadValue",
					"data.failCommands must be an array of command names"
				);
			this.failCommand =
				remaining > 0 ? { remaining, skip: Number(mode.skip ?? 0), data } : undefined;
		}
		return { count, ok: 1 };
	}

	private triggeredFailPoint(
		name: string,
		db: string,
		coll: unknown,
		client: Client
	): Doc | undefined {
		const point = this.failCommand;
		if (!point?.data.failCommands.includes(name)) return undefined;
		if (point.data.appName !== undefined && point.data.appName !== client.appName) return undefined;
		if (point.data.namespace !== undefined && point.data.namespace !== `${db}.${String(coll)}`)
			return undefined;
		if (point.skip > 0) {
			point.skip--;
			return undefined;
		}
		this.failPointEntered++;
		if (--point.remaining <= 0) this.failCommand = undefined;
		return point.data;
	}

	// Cursors --------------------------------------------------------------------------------------

	private openCursor(
		ns: string,
		docs: Doc[],
		batchSize: number | undefined,
		singleBatch = false
	): Doc {
		const now = Date.now();
		// Like mongod, forget cursors left idle for ten minutes; checked here rather than on a timer.
		for (const [id, open] of this.cursors)
			if (now - open.lastUsed > CURSOR_TIMEOUT_MS) this.cursors.delete(id);
		const cursor: OpenCursor = { ns, docs, position: 0, lastUsed: now };
		const firstBatch = takeBatch(cursor, batchSize ?? DEFAULT_BATCH_SIZE);
		let id = 0;
		if (!singleBatch && cursor.position < docs.length)
			this.cursors.set((id = this.nextCursorId++), cursor);
		return { cursor: { firstBatch, id: Long.fromNumber(id), ns }, ok: 1 };
	}

	private getMore(cmd: Doc): Doc {
		const id = Number(cmd.getMore);
		const cursor = this.cursors.get(id);
		if (!cursor) throw new CommandError(43, "CursorNotFound", `cursor id ${id} not found`);
		cursor.lastUsed = Date.now();
		const nextBatch = takeBatch(cursor, cmd.batchSize || Infinity);
		const exhausted = cursor.position >= cursor.docs.length;
		if (exhausted) this.cursors.delete(id);
		return { cursor: { nextBatch, id: Long.fromNumber(exhausted ? 0 : id), ns: cursor.ns }, ok: 1 };
	}

	private killCursors(cmd: Doc): Doc {
		const ids: number[] = (cmd.cursors ?? []).map(Number);
		const killed = ids.filter(id => this.cursors.delete(id));
		const notFound = ids.filter(id => !killed.includes(id));
		return {
			cursorsKilled: killed.map(id => Long.fromNumber(id)),
			cursorsNotFound: notFound.map(id => Long.fromNumber(id)),
			cursorsAlive: [],
			cursorsUnknown: [],
			ok: 1
		};
	}

	// Reads ----------------------------------------------------------------------------------------

	private find(t: Target, cmd: Doc): Doc {
		if (cmd.tailable)
			throw new CommandError(
				2,
				"BadValue",
				"error processing query: tailable cursor requested on non capped collection"
			);
		const selection = {
			sort: cmd.sort,
			skip: cmd.skip,
			limit: Math.abs(cmd.limit ?? 0),
			projection: cmd.projection
		};
		const docs = this.collection(t)?.select(cmd.filter ?? {}, selection, queryOptions(cmd)) ?? [];
		return this.openCursor(t.ns, docs, cmd.batchSize, Boolean(cmd.singleBatch) || cmd.limit < 0);
	}

	private count(t: Target, cmd: Doc): Doc {
		const selection = { skip: cmd.skip, limit: Math.abs(cmd.limit ?? 0) };
		return {
			n: this.collection(t)?.select(cmd.query ?? {}, selection, queryOptions(cmd)).length ?? 0,
			ok: 1
		};
	}

	private distinct(t: Target, cmd: Doc): Doc {
		if (typeof cmd.key !== "string")
			throw new CommandError(14, "TypeMismatch", "'key' must be a string");
		const values = new Map<string, unknown>();
		for (const doc of this.collection(t)?.select(cmd.query ?? {}, {}, queryOptions(cmd)) ?? []) {
			for (const value of valuesAt(doc, cmd.key.split(".")))
				if (value !== undefined) values.set(keyOf(value), value);
		}
		return { values: [...values.values()], ok: 1 };
	}

	private aggregate(t: Target, cmd: Doc): Doc {
		const pipeline = cmd.pipeline;
		if (!Array.isArray(pipeline))
			throw new CommandError(14, "TypeMismatch", "'pipeline' option must be specified as an array");
		if (!isPlain(cmd.cursor))
			throw new CommandError(9, "FailedToParse", "The 'cursor' option is required");
		if (pipeline.some(stage => "$out" in stage || "$merge" in stage))
			throw new CommandError(2, "BadValue", "The stand-in does not emulate $out or $merge");
		const options = queryOptions(cmd);
		// A leading $match goes through the collection's own selection (and its `_id` lookup); mingo may
		// modify what it aggregates, so it gets copies.
		const [first, ...rest] = pipeline;
		const leadingMatch = isPlain(first?.$match);
		const source =
			this.collection(t)
				?.select(leadingMatch ? first.$match : {}, {}, options)
				.map(copy) ?? [];
		const collectionResolver = (name: string) =>
			[...(this.collection({ ...t, coll: name })?.docs.values() ?? [])].map(copy);
		const docs = new Aggregator(leadingMatch ? rest : pipeline, {
			...options,
			collectionResolver
		}).run<Doc>(source);
		return this.openCursor(t.ns, docs, cmd.cursor.batchSize);
	}

	// Writes ---------------------------------------------------------------------------------------

	private insert(t: Target, cmd: Doc): Doc {
		const coll = this.createCollection(t);
		const writeErrors: Doc[] = [];
		let n = 0;
		for (const [index, doc] of (cmd.documents ?? []).entries()) {
			try {
				coll.insert(idFirst(doc));
				n++;
			} catch (err) {
				writeErrors.push(writeError(index, err));
				if (cmd.ordered !== false) break;
			}
		}
		return withWriteErrors({ n, ok: 1 }, writeErrors);
	}

	private update(t: Target, cmd: Doc): Doc {
		const counts = { n: 0, nModified: 0 };
		const upserted: Doc[] = [];
		const writeErrors: Doc[] = [];
		for (const [index, statement] of (cmd.updates ?? []).entries()) {
			try {
				const inserted = this.updateStatement(t, statement, queryOptions(cmd, statement), counts);
				if (inserted) upserted.push({ index, _id: inserted._id });
			} catch (err) {
				writeErrors.push(writeError(index, err));
				if (cmd.ordered !== false) break;
			}
		}
		return withWriteErrors(
			{ ...counts, ...(upserted.length ? { upserted } : {}), ok: 1 },
			writeErrors
		);
	}

	/** One statement of an update command, counted as it goes (a failure midway keeps the earlier counts); returns the document an upsert inserted. */
	private updateStatement(
		t: Target,
		statement: Doc,
		options: QueryOptions,
		counts: { n: number; nModified: number }
	): Doc | undefined {
		const { q = {}, u, multi = false, upsert = false, arrayFilters } = statement;
		validateUpdate(u, multi);
		const coll = this.collection(t);
		const matched = coll?.select(q, { limit: multi ? 0 : 1 }, options) ?? [];
		for (const before of matched) {
			const after = nextVersion(before, u, q, arrayFilters, options);
			counts.n++;
			if (coll && keyOf(after) !== keyOf(before)) {
				coll.replace(after);
				counts.nModified++;
			}
		}
		if (matched.length || !upsert) return undefined;
		const doc = upsertDocument(q, u, arrayFilters, options);
		this.createCollection(t).insert(doc);
		counts.n++;
		return doc;
	}

	private delete(t: Target, cmd: Doc): Doc {
		const coll = this.collection(t);
		const writeErrors: Doc[] = [];
		let n = 0;
		for (const [index, statement] of (cmd.deletes ?? []).entries()) {
			try {
				const matched =
					coll?.select(
						statement.q ?? {},
						{ limit: statement.limit === 1 ? 1 : 0 },
						queryOptions(cmd, statement)
					) ?? [];
				for (const doc of matched) coll?.remove(doc);
				n += matched.length;
			} catch (err) {
				writeErrors.push(writeError(index, err));
				if (cmd.ordered !== false) break;
			}
		}
		return withWriteErrors({ n, ok: 1 }, writeErrors);
	}

	private findAndModify(t: Target, cmd: Doc): Doc {
		const { query = {}, sort, update, remove, new: returnNew, upsert, fields, arrayFilters } = cmd;
		const options = queryOptions(cmd);
		if (remove && (update !== undefined || upsert))
			throw new CommandError(9, "FailedToParse", "Cannot specify both an update and remove=true");
		if (!remove && update === undefined)
			throw new CommandError(
				9,
				"FailedToParse",
				"Either an update or remove=true must be specified"
			);
		const coll = this.collection(t);
		const [before] = coll?.select(query, { sort, limit: 1 }, options) ?? [];
		if (remove) {
			if (before) coll?.remove(before);
			return {
				lastErrorObject: { n: before ? 1 : 0 },
				value: before ? project(before, fields, options) : null,
				ok: 1
			};
		}
		validateUpdate(update, false);
		if (!before) {
			if (!upsert) return { lastErrorObject: { n: 0, updatedExisting: false }, value: null, ok: 1 };
			const doc = upsertDocument(query, update, arrayFilters, options);
			this.createCollection(t).insert(doc);
			return {
				lastErrorObject: { n: 1, updatedExisting: false, upserted: doc._id },
				value: returnNew ? project(doc, fields, options) : null,
				ok: 1
			};
		}
		const after = nextVersion(before, update, query, arrayFilters, options);
		if (coll && keyOf(after) !== keyOf(before)) coll.replace(after);
		return {
			lastErrorObject: { n: 1, updatedExisting: true },
			value: project(returnNew ? after : before, fields, options),
			ok: 1
		};
	}

	// Namespaces and indexes -------------------------------------------------------------------------

	private create(t: Target): Doc {
		if (this.collection(t))
			throw new CommandError(48, "NamespaceExists", `Collection ${t.ns} already exists.`);
		this.createCollection(t);
		return { ok: 1 };
	}

	/** As on 6.0, dropping a collection that does not exist is an error (7.0 made it a no-op). */
	private drop(t: Target): Doc {
		const db = this.databases.get(t.db);
		const coll = db?.get(t.coll);
		if (!db || !coll) throw new CommandError(26, "NamespaceNotFound", "ns not found");
		db.delete(t.coll);
		if (!db.size) this.databases.delete(t.db);
		return { nIndexesWas: coll.indexes.length, ns: t.ns, ok: 1 };
	}

	private listCollections(db: string, cmd: Doc): Doc {
		const entries = [...(this.databases.get(db) ?? [])].map(([name, coll]) =>
			cmd.nameOnly
				? { name, type: "collection" }
				: {
						name,
						type: "collection",
						options: {},
						info: { readOnly: false, uuid: coll.uuid },
						idIndex: coll.indexes[0].spec
					}
		);
		const docs = new Query(cmd.filter ?? {}).find<Doc>(entries).all();
		return this.openCursor(`${db}.$cmd.listCollections`, docs, cmd.cursor?.batchSize);
	}

	private listDatabases(db: string, cmd: Doc): Doc {
		if (db !== "admin")
			throw new CommandError(
				13,
				"Unauthorized",
				"listDatabases may only be run against the admin database."
			);
		const entries = [...this.databases.keys()].map(name =>
			cmd.nameOnly ? { name } : { name, sizeOnDisk: 0, empty: false }
		);
		const databases = new Query(cmd.filter ?? {}).find<Doc>(entries).all();
		return cmd.nameOnly ? { databases, ok: 1 } : { databases, totalSize: 0, totalSizeMb: 0, ok: 1 };
	}

	private createIndexes(t: Target, cmd: Doc): Doc {
		const specs = cmd.indexes;
		if (!Array.isArray(specs) || !specs.length)
			throw new CommandError(2, "BadValue", "Must specify at least one index to create");
		const createdCollectionAutomatically = !this.collection(t);
		const coll = this.createCollection(t);
		const numIndexesBefore = coll.indexes.length;
		// Two specs are the same index when all but their name, version and the ignored `background` agree, in any order.
		const optionsOf = ({ name: _name, v: _v, background: _background, ...options }: Doc) =>
			Object.keys(options)
				.sort()
				.map(option => `${option}=${keyOf(options[option])}`)
				.join();
		for (const spec of specs) {
			if (!isPlain(spec.key) || !Object.keys(spec.key).length || typeof spec.name !== "string") {
				throw new CommandError(
					67,
					"CannotCreateIndex",
					"An index specification needs a non-empty 'key' document and a 'name'"
				);
			}
			const sameName = coll.indexes.find(index => index.spec.name === spec.name);
			const sameKey = coll.indexes.find(index => keyOf(index.spec.key) === keyOf(spec.key));
			if (sameName && optionsOf(sameName.spec) === optionsOf(spec)) continue;
			if (sameName)
				throw new CommandError(
					86,
					"IndexKeySpecsConflict",
					`An existing index has the same name as the requested index: ${EJSON.stringify(sameName.spec)}`
				);
			if (sameKey)
				throw new CommandError(
					85,
					"IndexOptionsConflict",
					`Index already exists with a different name: ${sameKey.spec.name}`
				);
			const { key, name, ...options } = spec;
			coll.addIndex({ v: 2, key, name, ...options });
		}
		return {
			numIndexesBefore,
			numIndexesAfter: coll.indexes.length,
			createdCollectionAutomatically,
			ok: 1
		};
	}

	private listIndexes(t: Target, cmd: Doc): Doc {
		const coll = this.collection(t);
		if (!coll) throw new CommandError(26, "NamespaceNotFound", `ns does not exist: ${t.ns}`);
		return this.openCursor(
			t.ns,
			coll.indexes.map(index => index.spec),
			cmd.cursor?.batchSize
		);
	}

	private dropIndexes(t: Target, cmd: Doc): Doc {
		const coll = this.collection(t);
		if (!coll) throw new CommandError(26, "NamespaceNotFound", `ns not found ${t.ns}`);
		const nIndexesWas = coll.indexes.length;
		const wanted: unknown[] = Array.isArray(cmd.index) ? cmd.index : [cmd.index];
		const doomed =
			cmd.index === "*"
				? coll.indexes.slice(1)
				: wanted.map(which => {
						const found = coll.indexes.find(index =>
							typeof which === "string"
								? index.spec.name === which
								: keyOf(index.spec.key) === keyOf(which)
						);
						if (!found)
							throw new CommandError(
								27,
								"IndexNotFound",
								`index not found with name [${typeof which === "string" ? which : EJSON.stringify(which as Doc)}]`
							);
						return found;
					});
		if (doomed.includes(coll.indexes[0]))
			throw new CommandError(72, "InvalidOptions", "cannot drop _id index");
		coll.indexes = coll.indexes.filter(index => !doomed.includes(index));
		return { nIndexesWas, ok: 1 };
	}
}

// --- Wire protocol ------------------------------------------------------------------------------

interface Request {
	readonly requestId: number;
	readonly opCode: number;
	readonly db: string;
	readonly command: Doc;
	/** OP_MSG's moreToCome: the client (a w:0 write) wants no answer. */
	readonly moreToCome: boolean;
}

/** Cuts a TCP stream into messages: several may arrive in one chunk, one may span many. */
class MessageReader {
	private chunks: Buffer[] = [];
	private buffered = 0;

	push(chunk: Buffer): Buffer[] {
		this.chunks.push(chunk);
		this.buffered += chunk.length;
		const messages: Buffer[] = [];
		while (this.buffered >= 4) {
			if (this.chunks[0].length < 4) this.chunks = [Buffer.concat(this.chunks)];
			const length = this.chunks[0].readInt32LE(0);
			if (length < 16 || length > MAX_MESSAGE_SIZE)
				throw new Error(`Invalid message length ${length}`);
			if (this.buffered < length) break;
			// Joined once the whole message is there, not at every chunk.
			const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
			messages.push(all.subarray(0, length));
			const rest = all.subarray(length);
			this.chunks = rest.length ? [rest] : [];
			this.buffered = rest.length;
		}
		return messages;
	}
}

function readDocument(message: Buffer, at: number): Doc {
	return deserialize(message.subarray(at, at + message.readInt32LE(at)), DESERIALIZE);
}

function parseRequest(message: Buffer): Request {
	const requestId = message.readInt32LE(4);
	const opCode = message.readInt32LE(12);
	if (opCode === OP_QUERY) {
		// flags, fullCollectionName ("admin.$cmd"), numberToSkip, numberToReturn, query
		const nsEnd = message.indexOf(0, 20);
		const ns = message.toString("utf8", 20, nsEnd);
		const query = readDocument(message, nsEnd + 9);
		return {
			requestId,
			opCode,
			db: ns.slice(0, ns.indexOf(".")),
			command: isPlain(query.$query) ? query.$query : query,
			moreToCome: false
		};
	}
	if (opCode !== OP_MSG) throw new Error(`Unsupported opcode ${opCode}`);
	const flags = message.readUInt32LE(16);
	const end = message.length - (flags & CHECKSUM_PRESENT ? 4 : 0);
	let command: Doc | undefined;
	const sequences: [string, Doc[]][] = [];
	for (let at = 20; at < end;) {
		const kind = message[at];
		const size = message.readInt32LE(at + 1);
		if (kind === 0) command = readDocument(message, at + 1);
		else if (kind === 1) {
			// A document sequence: size, identifier (e.g. "documents"), then documents to the section's end.
			const idEnd = message.indexOf(0, at + 5);
			const docs: Doc[] = [];
			for (let d = idEnd + 1; d < at + 1 + size; d += message.readInt32LE(d))
				docs.push(readDocument(message, d));
			sequences.push([message.toString("utf8", at + 5, idEnd), docs]);
		} else throw new Error(`Unknown OP_MSG section kind ${kind}`);
		at += 1 + size;
	}
	if (!command) throw new Error("OP_MSG without a body section");
	for (const [field, docs] of sequences) command[field] = (command[field] ?? []).concat(docs);
	return {
		requestId,
		opCode,
		db: String(command.$db ?? "admin"),
		command,
		moreToCome: (flags & MORE_TO_COME) !== 0
	};
}

let lastResponseId = 0;

/** OP_REPLY to an OP_QUERY, OP_MSG to an OP_MSG. */
function encodeReply(request: Request, reply: Doc): Buffer {
	const body = serialize(reply);
	const legacy = request.opCode === OP_QUERY;
	// OP_REPLY: header, responseFlags, cursorID, startingFrom, numberReturned; OP_MSG: header, flagBits, section kind 0.
	const header = Buffer.alloc(legacy ? 36 : 21);
	header.writeInt32LE(header.length + body.length, 0);
	header.writeInt32LE(++lastResponseId, 4);
	header.writeInt32LE(request.requestId, 8);
	header.writeInt32LE(legacy ? OP_REPLY : OP_MSG, 12);
	if (legacy) header.writeInt32LE(1, 32);
	return Buffer.concat([header, body]);
}

export class MongoStandIn {
	private readonly engine = new Engine();
	private readonly sockets = new Set<net.Socket>();
	private lastConnectionId = 0;

	private constructor(private readonly server: net.Server) {
		server.on("connection", socket => this.accept(socket));
	}

	static async start(port = 0): Promise<MongoStandIn> {
		const standIn = new MongoStandIn(net.createServer());
		await new Promise<void>((resolve, reject) => {
			standIn.server.once("error", reject);
			standIn.server.listen(port, "127.0.0.1", () => {
				standIn.server.off("error", reject);
				resolve();
			});
		});
		return standIn;
	}

	get port(): number {
		return (this.server.address() as net.AddressInfo).port;
	}

	uri(db: string): string {
		return `mongodb://127.0.0.1:${this.port}/${db}`;
	}

	async stop(): Promise<void> {
		for (const socket of this.sockets) socket.destroy();
		await new Promise<void>((resolve, reject) =>
			this.server.close(err => (err ? reject(err) : resolve()))
		);
	}

	private accept(socket: net.Socket): void {
		this.sockets.add(socket);
		socket.setNoDelay(true);
		socket.on("close", () => this.sockets.delete(socket));
		// A client that goes away mid-answer is its own business.
		socket.on("error", () => socket.destroy());
		const client: Client = { id: ++this.lastConnectionId };
		const reader = new MessageReader();
		// One message at a time per connection, in order, as mongod does.
		let answered = Promise.resolve();
		socket.on("data", chunk => {
			try {
				for (const message of reader.push(chunk))
					answered = answered.then(() => this.answer(socket, client, message));
			} catch {
				socket.destroy();
			}
		});
	}

	private async answer(socket: net.Socket, client: Client, message: Buffer): Promise<void> {
		await new Promise(resolve => setImmediate(resolve));
		if (socket.destroyed) return;
		try {
			const request = parseRequest(message);
			const name = Object.keys(request.command)[0] ?? "";
			const reply =
				request.opCode === OP_QUERY && !HELLO.has(name)
					? new CommandError(
							352,
							"UnsupportedOpQueryCommand",
							`Unsupported OP_QUERY command: ${name}. The client driver may require an upgrade.`
						).reply()
					: await this.engine.run(request.db, request.command, client);
			if (reply === null) socket.destroy();
			else if (!request.moreToCome && !socket.destroyed) socket.write(encodeReply(request, reply));
		} catch {
			// Bytes that are not the protocol: a server closes such a connection.
			socket.destroy();
		}
	}
}
