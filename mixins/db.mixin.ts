/**
 * Storage owned by one service (moleculer-db): NeDB files under DATA_DIR by default, MongoDB through
 * mongoose when MONGO_URI is set. `DbMixin(name)` gives the service its main collection as
 * `this.store`; `openCollection` adds further ones (the points service keeps accounts and ledger).
 *
 * moleculer-db's generic CRUD actions are switched off: each service publishes its own domain
 * actions, so nothing writes a collection around its owner's rules.
 */
import fs from "node:fs";
import path from "node:path";
import type { Service, ServiceBroker, ServiceSchema } from "moleculer";
import DbService from "moleculer-db";
import MongooseAdapter from "moleculer-db-adapter-mongoose";
import mongoose from "mongoose";
import { config } from "../config";
import { openDatastore } from "../lib/nedb";

export interface IndexSpec {
	fields: Record<string, 1 | -1>;
	unique?: boolean;
}

export interface Page<T> {
	rows: T[];
	total: number;
	page: number;
	pageSize: number;
}

export type Query = Record<string, unknown>;

interface FindParams {
	query: Query;
	sort?: string[];
	limit?: number;
	offset?: number;
}

/** The part of a moleculer-db adapter this code relies on (both adapters provide it). */
interface Adapter {
	init(broker: ServiceBroker, service: unknown): void;
	connect(): Promise<unknown>;
	disconnect(): Promise<unknown>;
	insert(doc: object): Promise<unknown>;
	findById(id: string): Promise<unknown>;
	find(params: FindParams): Promise<unknown[]>;
	count(params: FindParams): Promise<number>;
	updateMany(query: Query, update: object): Promise<number>;
	entityToObject(doc: unknown): object;
	db: { count(query: Query): Promise<number>; update(q: Query, u: object, o: object): Promise<unknown>; ensureIndex(o: object): Promise<void> };
	model: { updateOne(q: Query, u: object, o: object): Promise<unknown> };
}

function isUniqueViolation(err: unknown): boolean {
	const e = err as { errorType?: string; code?: number };
	return e?.errorType === "uniqueViolated" || e?.code === 11000;
}

/** One collection, with the same meaning on NeDB and on MongoDB. */
export class Collection<T extends { _id: string }> {
	constructor(
		readonly adapter: Adapter,
		private readonly indexes: IndexSpec[]
	) {}

	/** Inserts `doc`; `false` when its `_id` or a unique field is taken. */
	async insertUnique(doc: T): Promise<boolean> {
		try {
			await this.adapter.insert(doc);
			return true;
		} catch (err) {
			if (isUniqueViolation(err)) return false;
			throw err;
		}
	}

	async findById(id: string): Promise<T | null> {
		const doc = await this.adapter.findById(id);
		return doc ? (this.adapter.entityToObject(doc) as T) : null;
	}

	async find(params: FindParams): Promise<T[]> {
		const docs = await this.adapter.find(params);
		return docs.map(doc => this.adapter.entityToObject(doc) as T);
	}

	count(query: Query): Promise<number> {
		// moleculer-db's NeDB `count` loads every matching document; NeDB's own count does not.
		return config.mongoUri ? this.adapter.count({ query }) : this.adapter.db.count(query);
	}

	/** Applies `update` to the documents matching `query` in one atomic step per document; how many changed. */
	update(query: Query, update: object): Promise<number> {
		return this.adapter.updateMany(query, update);
	}

	async upsert(query: Query, update: object): Promise<void> {
		if (config.mongoUri) await this.adapter.model.updateOne(query, update, { upsert: true });
		else await this.adapter.db.update(query, update, { upsert: true });
	}

	async page(query: Query, sort: string[], page: number, pageSize: number): Promise<Page<T>> {
		const [rows, total] = await Promise.all([
			this.find({ query, sort, limit: pageSize, offset: (page - 1) * pageSize }),
			this.count(query)
		]);
		return { rows, total, page, pageSize };
	}

	/**
	 * NeDB keeps indexes in memory and rebuilds them at every load; MongoDB builds them from the model.
	 * NeDB indexes one field: a compound index becomes an index on its leading field.
	 */
	async ensureIndexes(): Promise<void> {
		if (config.mongoUri) return;
		for (const { fields, unique } of this.indexes) {
			const names = Object.keys(fields);
			await this.adapter.db.ensureIndex({ fieldName: names[0], unique: !!unique && names.length === 1 });
		}
	}
}

function createAdapter(name: string, indexes: IndexSpec[]): { adapter: Adapter; model?: mongoose.Model<unknown> } {
	if (config.mongoUri) {
		const schema = new mongoose.Schema({ _id: String }, { strict: false, versionKey: false });
		for (const { fields, unique } of indexes) schema.index(fields, { unique: !!unique });
		const model = (mongoose.models[name] as mongoose.Model<unknown>) ?? mongoose.model(name, schema, name);
		return { adapter: new MongooseAdapter(config.mongoUri) as unknown as Adapter, model };
	}
	fs.mkdirSync(config.dataDir, { recursive: true });
	return { adapter: new DbService.MemoryAdapter(openDatastore(path.join(config.dataDir, `${name}.db`))) as unknown as Adapter };
}

/** Opens a further collection for `service`; connect it in `started` and close it in `stopped`. */
export function openCollection<T extends { _id: string }>(service: Pick<Service, "broker" | "logger">, name: string, indexes: IndexSpec[] = []): Collection<T> {
	const { adapter, model } = createAdapter(name, indexes);
	adapter.init(service.broker, { schema: { model }, logger: service.logger });
	return new Collection<T>(adapter, indexes);
}

export async function connectCollection<T extends { _id: string }>(collection: Collection<T>): Promise<void> {
	await collection.adapter.connect();
	await collection.ensureIndexes();
}

export interface DbThis<T extends { _id: string }> {
	store: Collection<T>;
}

export function DbMixin(name: string, indexes: IndexSpec[] = []): Partial<ServiceSchema> {
	return {
		mixins: [DbService],
		actions: Object.fromEntries(["find", "count", "list", "create", "insert", "get", "update", "remove"].map(a => [a, false])),
		// Runs after moleculer-db's own `created`: the adapter is made per service instance, so two
		// brokers in one process (tests) never share a store.
		created(this: Service & { adapter: Adapter; store: Collection<{ _id: string }> }) {
			this.store = openCollection(this, name, indexes);
			this.adapter = this.store.adapter;
		},
		async afterConnected(this: { store: Collection<{ _id: string }> }) {
			await this.store.ensureIndexes();
		}
	} as unknown as Partial<ServiceSchema>;
}
