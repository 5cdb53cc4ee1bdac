/**
 * A collection of the embedded store: a table of the node's SQLite database (lib/store/sqlite.ts),
 * a row a document (`_id`, and the document as JSON in `doc`), with the declared indexes as
 * expression indexes on the JSON fields.
 *
 * Queries and updates mean what they mean on MongoDB because MongoDB's own semantics decide them:
 * lib/store/documents.ts for the common cases, mingo for the rest. SQL only narrows: the part of a
 * query it can say of `_id` and of indexed fields (equality, ranges, `$in`) becomes a WHERE that
 * matches at least every document the query does, so an index is used, and each row read is then
 * tested against the whole query (unless the WHERE says exactly what the query does). Indexed fields
 * are taken to hold scalars (an array would make the narrowing drop documents MongoDB would match).
 * Rows come in the requested order and are read only until a page is full, so a page of a large
 * collection never reads the rest; SQL orders missing, null, numbers and strings as MongoDB does,
 * and a sort key of any other type makes that query sort in memory instead.
 *
 * Each write is one savepoint of the turn's transaction and is answered after its commit.
 */
import fs from "node:fs";
import path from "node:path";
import type { SQLInputValue, StatementSync } from "node:sqlite";
import type { Logger } from "moleculer";
import { Query as Matcher, update as applyUpdate } from "mingo";
import type { Config } from "../../config";
import type { Backend, FindParams, IndexSpec, Query } from "../../mixins/db.mixin";
import { applyModifier, matches } from "./documents";
import { importNedbFile, type Imported } from "./nedb-import";
import { databaseOf, type Database } from "./sqlite";

type Doc = Record<string, unknown>;
type Modifier = Parameters<typeof applyUpdate<Doc>>[1];

/** SQLite's extended result codes of a UNIQUE and a PRIMARY KEY constraint. */
const UNIQUE_CONSTRAINT = 2067;
const PRIMARY_KEY_CONSTRAINT = 1555;

export function isUniqueConstraint(err: unknown): boolean {
	const errcode = (err as { errcode?: number } | undefined)?.errcode;
	return errcode === UNIQUE_CONSTRAINT || errcode === PRIMARY_KEY_CONSTRAINT;
}

const quoted = (name: string) => `"${name.replace(/"/g, '""')}"`;

/** The table of collection `name`: a row a document, keyed by `_id`. */
export const createTableSql = (name: string) =>
	`CREATE TABLE IF NOT EXISTS ${quoted(name)} (_id TEXT PRIMARY KEY, doc TEXT NOT NULL)`;

/** A field's JSON path, as a quoted SQL literal's inside: `$.a.b`. */
const jsonPath = (field: string) =>
	`$${field
		.split(".")
		.map(key =>
			/^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? `.${key}` : `."${key.replace(/"/g, '""')}"`
		)
		.join("")}`.replace(/'/g, "''");

/** The SQL of a field: the `_id` column, or the field's value in the JSON document. */
const fieldSql = (field: string) =>
	field === "_id" ? "_id" : `json_extract(doc, '${jsonPath(field)}')`;

/** A WHERE that holds for at least every document a query matches; `exact` when for no other. */
interface Narrowing {
	terms: string[];
	params: SQLInputValue[];
	exact: boolean;
}

/** The array `a` of a sparse index on `a.b`, which may be a field of an array's sub-documents. */
const arrayOfSparse = ({ fields, sparse }: IndexSpec) => {
	const [leading] = Object.keys(fields);
	return sparse && leading.includes(".") ? [leading.slice(0, leading.lastIndexOf("."))] : [];
};

const RANGES: Record<string, string> = { $gt: ">", $gte: ">=", $lt: "<", $lte: "<=" };

function isOperatorObject(value: unknown): value is Doc {
	return (
		typeof value === "object" &&
		value !== null &&
		!Array.isArray(value) &&
		Object.keys(value).length > 0 &&
		Object.keys(value).every(key => key.startsWith("$"))
	);
}

/** A scalar SQL compares as MongoDB does within its type (booleans are 1 and 0 in SQLite's JSON). */
const sqlScalar = (value: unknown): SQLInputValue | undefined =>
	typeof value === "string" || typeof value === "number"
		? value
		: typeof value === "boolean"
			? Number(value)
			: undefined;

/** What SQL may narrow a query by: `_id` and the indexed fields, and the arrays that have an index of their own (`<array>.0`). */
interface Narrowable {
	fields: ReadonlySet<string>;
	arrays: ReadonlySet<string>;
}

/** The SQL of "the array at `field` (`<array>.0`) has an element": the condition of an array's partial index. */
const hasElementSql = (field: string) =>
	`json_type(doc, '${jsonPath(field.slice(0, -".0".length))}[0]') IS NOT NULL`;

function narrow(query: Query, narrowable: Narrowable): Narrowing {
	const out: Narrowing = { terms: [], params: [], exact: true };
	for (const [key, condition] of Object.entries(query)) {
		if (key === "$and" && Array.isArray(condition)) {
			for (const part of condition) merge(out, narrow(part as Query, narrowable));
			continue;
		}
		if (key === "$or" && Array.isArray(condition) && condition.length > 0) {
			const branches = condition.map(part => narrow(part as Query, narrowable));
			if (branches.some(b => b.terms.length === 0)) out.exact = false;
			else {
				out.terms.push(`(${branches.map(b => b.terms.join(" AND ")).join(" OR ")})`);
				out.params.push(...branches.flatMap(b => b.params));
				out.exact &&= branches.every(b => b.exact);
			}
			continue;
		}
		if (
			narrowable.arrays.has(key) &&
			isOperatorObject(condition) &&
			Object.keys(condition).join() === "$exists" &&
			condition.$exists === true
		) {
			// Also true of an object with a key "0": an indexed array is taken to be an array.
			out.terms.push(hasElementSql(key));
			out.exact = false;
			continue;
		}
		if (key.startsWith("$") || !narrowable.fields.has(key)) {
			out.exact = false;
			continue;
		}
		merge(out, narrowField(key, condition));
	}
	return out;
}

function merge(into: Narrowing, part: Narrowing): void {
	into.terms.push(...part.terms);
	into.params.push(...part.params);
	into.exact &&= part.exact;
}

/** `_id` is always a string; an indexed field is taken to be a scalar of any type. */
function narrowField(field: string, condition: unknown): Narrowing {
	const out: Narrowing = { terms: [], params: [], exact: true };
	const sql = fieldSql(field);
	const isId = field === "_id";
	const operators = isOperatorObject(condition) ? condition : { $eq: condition };
	for (const [op, operand] of Object.entries(operators)) {
		const value = sqlScalar(operand);
		if (op === "$eq" && operand === null) {
			// Null or missing; an `_id` is never either.
			out.terms.push(`${sql} IS NULL`);
		} else if (op === "$eq" && value !== undefined) {
			out.terms.push(`${sql} = ?`);
			out.params.push(value);
			// 1 in SQL is also `true`: only a string's equality is exact.
			out.exact &&= typeof operand === "string";
		} else if (op in RANGES && value !== undefined && typeof operand !== "boolean") {
			out.terms.push(`${sql} ${RANGES[op]} ?`);
			out.params.push(value);
			// Numbers sort before strings in SQL: above a string only strings remain, as in MongoDB.
			out.exact &&= typeof operand === "string" && (isId || op === "$gt" || op === "$gte");
		} else if (
			op === "$in" &&
			Array.isArray(operand) &&
			operand.every(v => sqlScalar(v) !== undefined)
		) {
			out.terms.push(`${sql} IN (SELECT value FROM json_each(?))`);
			out.params.push(JSON.stringify(operand));
			out.exact &&= operand.every(v => typeof v === "string");
		} else out.exact = false;
	}
	return out;
}

/** The value at a dotted path, `undefined` when missing or under an array (which SQL does not order as MongoDB). */
function sortValue(doc: Doc, field: string): unknown {
	let value: unknown = doc;
	for (const key of field.split(".")) {
		if (value === null || typeof value !== "object" || Array.isArray(value)) return undefined;
		value = (value as Doc)[key];
	}
	return value;
}

/** Whether SQL orders this value among others as MongoDB does: missing and null, then numbers, then strings. */
const sqlOrdered = (value: unknown) =>
	value === undefined || value === null || typeof value === "number" || typeof value === "string";

const sortSpecOf = (sort: string[]) =>
	Object.fromEntries(sort.map(f => (f.startsWith("-") ? [f.slice(1), -1] : [f, 1]))) as Record<
		string,
		1 | -1
	>;

/** The equality conditions of a query, which an upsert copies into the document it inserts (MongoDB's rule). */
function equalities(query: Query, into: Doc = {}): Doc {
	for (const [field, condition] of Object.entries(query)) {
		if (field === "$and" && Array.isArray(condition))
			for (const part of condition) equalities(part as Query, into);
		else if (field.startsWith("$") || condition instanceof RegExp) continue;
		else if (!isOperatorObject(condition)) setPath(into, field, structuredClone(condition));
		else if ("$eq" in condition) setPath(into, field, structuredClone(condition.$eq));
	}
	return into;
}

function setPath(doc: Doc, field: string, value: unknown): void {
	const keys = field.split(".");
	let at = doc;
	for (const key of keys.slice(0, -1)) at = (at[key] ??= {}) as Doc;
	at[keys[keys.length - 1]] = value;
}

export class SqliteBackend<T extends { _id: string }> implements Backend<T> {
	/** What moleculer-db needs of a service's main adapter: its lifecycle. */
	readonly adapter = {
		init: (_broker: unknown, service: { logger: Logger }) => {
			this.logger = service.logger;
		},
		connect: () => this.connect(),
		disconnect: () => this.disconnect()
	};
	private logger?: Logger;
	private database?: Database;
	private readonly table: string;
	private readonly statements = new Map<string, StatementSync>();
	private readonly narrowable: Narrowable;

	constructor(
		private readonly name: string,
		indexes: IndexSpec[],
		private readonly config: Pick<Config, "dataDir" | "sqliteSynchronous">
	) {
		this.table = quoted(name);
		this.narrowable = {
			fields: new Set(["_id", ...indexes.flatMap(i => Object.keys(i.fields))]),
			arrays: new Set(indexes.flatMap(arrayOfSparse).map(array => `${array}.0`))
		};
	}

	private get db(): Database {
		if (!this.database) throw new Error(`Collection '${this.name}' is not connected`);
		return this.database;
	}

	private statement(sql: string): StatementSync {
		let statement = this.statements.get(sql);
		if (!statement) this.statements.set(sql, (statement = this.db.db.prepare(sql)));
		return statement;
	}

	/** Opens the database, creates the table, and imports the collection's NeDB file if one is left. */
	async connect(): Promise<void> {
		if (this.database) return;
		const database = databaseOf(this.config);
		const nedbFile = path.join(this.config.dataDir, `${this.name}.db`);
		const moving = fs.existsSync(nedbFile);
		let imported: Imported | undefined;
		try {
			imported = await database.write(db => {
				db.exec(createTableSql(this.name));
				return moving ? importNedbFile(db, this.table, nedbFile) : undefined;
			});
		} catch (err) {
			await database.release();
			throw err;
		}
		this.database = database;
		if (!imported) return;
		fs.renameSync(nedbFile, `${nedbFile}.migrated`);
		this.logger?.info(
			`Collection '${this.name}': imported ${imported.documents} documents from NeDB's file ` +
				`(${imported.lines} lines, ${imported.removed} removals` +
				`${imported.tornLine ? ", a torn last line dropped" : ""}); the file is now ${nedbFile}.migrated`
		);
	}

	async disconnect(): Promise<void> {
		const database = this.database;
		if (!database) return;
		this.database = undefined;
		this.statements.clear();
		await database.release();
	}

	/** Expression indexes on the fields; a sparse one leaves out the rows whose leading field is missing or null. */
	async ensureIndexes(indexes: IndexSpec[]): Promise<void> {
		await this.db.write(db => {
			for (const { fields, unique, sparse } of indexes) {
				const names = Object.keys(fields);
				const index = quoted(`${this.name}:${names.join(",")}`);
				const columns = names.map(f => `${fieldSql(f)}${fields[f] === -1 ? " DESC" : ""}`);
				const where = sparse ? ` WHERE ${fieldSql(names[0])} IS NOT NULL` : "";
				db.exec(
					`CREATE ${unique ? "UNIQUE " : ""}INDEX IF NOT EXISTS ${index} ON ${this.table} (${columns.join(", ")})${where}`
				);
			}
			// `a.b` is in SQL no path into an array of sub-documents `a` (the outbox): the documents
			// whose `a` has an element get a partial index of their own, for `{ "a.0": { $exists: true } }`.
			for (const array of indexes.flatMap(arrayOfSparse))
				db.exec(
					`CREATE INDEX IF NOT EXISTS ${quoted(`${this.name}:${array}[]`)} ON ${this.table} (_id) WHERE ${hasElementSql(`${array}.0`)}`
				);
		});
	}

	async insert(doc: T): Promise<void> {
		await this.db.write(() =>
			this.statement(`INSERT INTO ${this.table} (_id, doc) VALUES (?, ?)`).run(
				doc._id,
				JSON.stringify(doc)
			)
		);
	}

	findById(id: string): Promise<T | null> {
		const row = this.statement(`SELECT doc FROM ${this.table} WHERE _id = ?`).get(id) as
			{ doc: string } | undefined;
		return Promise.resolve(row ? (JSON.parse(row.doc) as T) : null);
	}

	find(params: FindParams): Promise<T[]> {
		return Promise.resolve(this.select(params) as T[]);
	}

	count(query: Query): Promise<number> {
		const { terms, params, exact } = narrow(query, this.narrowable);
		if (exact) {
			const row = this.statement(`SELECT count(*) AS n FROM ${this.table}${whereOf(terms)}`).get(
				...params
			) as { n: number };
			return Promise.resolve(row.n);
		}
		return Promise.resolve(this.select({ query }).length);
	}

	update(query: Query, update: object): Promise<number> {
		return this.db.write(() => {
			const docs = this.select({ query });
			for (const doc of docs) this.apply(doc, update as Modifier, query);
			return docs.length;
		});
	}

	/** MongoDB's `updateOne` with `upsert`: the first match is updated, or a document made of the query's equalities is. */
	async upsert(query: Query, update: object): Promise<void> {
		await this.db.write(() => {
			const [doc] = this.select({ query, limit: 1 });
			const { $setOnInsert, ...modifier } = update as Modifier & { $setOnInsert?: Doc };
			if (doc) return this.apply(doc, modifier, query);
			const inserted = equalities(query);
			const onInsert = $setOnInsert
				? { ...modifier, $set: { ...modifier.$set, ...$setOnInsert } }
				: modifier;
			if (applyModifier(inserted, onInsert) === undefined) applyUpdate(inserted, onInsert);
			if (typeof inserted._id !== "string")
				throw new Error(`An upsert into '${this.name}' names no _id in its query`);
			this.statement(`INSERT INTO ${this.table} (_id, doc) VALUES (?, ?)`).run(
				inserted._id,
				JSON.stringify(inserted)
			);
		});
	}

	remove(query: Query): Promise<number> {
		return this.db.write(() => {
			const { terms, params, exact } = narrow(query, this.narrowable);
			if (exact)
				return Number(
					this.statement(`DELETE FROM ${this.table}${whereOf(terms)}`).run(...params).changes
				);
			const ids = this.select({ query }).map(doc => doc._id as string);
			const remove = this.statement(`DELETE FROM ${this.table} WHERE _id = ?`);
			for (const id of ids) remove.run(id);
			return ids.length;
		});
	}

	/** Applies a modifier to a stored document and writes it back if it changed. */
	private apply(doc: Doc, modifier: Modifier, query: Query): void {
		const id = doc._id;
		const changed =
			applyModifier(doc, modifier) ?? applyUpdate(doc, modifier, undefined, query).length > 0;
		if (!changed) return;
		if (doc._id !== id) throw new Error(`An update of '${this.name}' may not change _id`);
		this.statement(`UPDATE ${this.table} SET doc = ? WHERE _id = ?`).run(
			JSON.stringify(doc),
			id as string
		);
	}

	/**
	 * The documents a query matches, in order, from `offset`, at most `limit`: rows are read in SQL's
	 * order and only until the page is full; when the narrowing is exact and the order is `_id`'s,
	 * SQL skips and limits too.
	 */
	private select({ query, sort = [], limit, offset = 0 }: FindParams): Doc[] {
		const { terms, params, exact } = narrow(query, this.narrowable);
		const keys = sort.map(f => (f.startsWith("-") ? f.slice(1) : f));
		const orderBy = sort.length
			? ` ORDER BY ${sort.map(f => (f.startsWith("-") ? `${fieldSql(f.slice(1))} DESC` : fieldSql(f))).join(", ")}`
			: "";
		let matcher: Matcher<Doc> | undefined;
		const matched = (doc: Doc) =>
			exact || (matches(doc, query) ?? (matcher ??= new Matcher(query, {})).test(doc));
		const byId = keys.every(k => k === "_id");
		if (exact && byId) {
			// Bound, not spelled in the SQL: one prepared statement serves every page.
			return (
				this.statement(
					`SELECT doc FROM ${this.table}${whereOf(terms)}${orderBy} LIMIT ? OFFSET ?`
				).all(...params, limit || -1, offset) as { doc: string }[]
			).map(row => JSON.parse(row.doc) as Doc);
		}
		const docs: Doc[] = [];
		let skipped = 0;
		let unordered = false;
		const rows = this.statement(`SELECT doc FROM ${this.table}${whereOf(terms)}${orderBy}`).iterate(
			...params
		) as Iterable<{ doc: string }>;
		for (const row of rows) {
			const doc = JSON.parse(row.doc) as Doc;
			if (!matched(doc)) continue;
			if (!byId && !keys.every(k => sqlOrdered(sortValue(doc, k)))) {
				unordered = true;
				break;
			}
			if (skipped < offset) {
				skipped++;
				continue;
			}
			docs.push(doc);
			if (limit && docs.length >= limit) break;
		}
		if (unordered) return this.sortedInMemory(query, sort, limit, offset);
		return docs;
	}

	/** A query sorted by values SQL does not order as MongoDB (booleans, objects, arrays): mingo sorts all matches. */
	private sortedInMemory(query: Query, sort: string[], limit?: number, offset = 0): Doc[] {
		let cursor = new Matcher(query, {}).find<Doc>(this.select({ query })).sort(sortSpecOf(sort));
		if (offset) cursor = cursor.skip(offset);
		if (limit) cursor = cursor.limit(limit);
		return cursor.all();
	}
}

const whereOf = (terms: string[]) => (terms.length ? ` WHERE ${terms.join(" AND ")}` : "");
