/**
 * Storage owned by one service (moleculer-db): a table of the node's SQLite file in DATA_DIR by default
 * (lib/store/sqlite-collection.ts), MongoDB through
 * mongoose (moleculer-db-adapter-mongoose) when MONGO_URI is set. `DbMixin(name)` gives the service
 * its main collection as `this.store`; `openCollection` adds further ones (points keeps accounts and
 * the ledger).
 *
 * moleculer-db connects the adapter (retrying until the store answers) and its generic CRUD actions
 * are switched off: each service publishes its own domain actions, so nothing writes a collection
 * around its owner's rules. The reads and writes themselves go through `Collection`, which gives
 * them one meaning on both stores: plain objects out, every filter field honoured, conditional
 * updates answering how many documents matched.
 */
import type { Logger, Service, ServiceBroker, ServiceSchema } from "moleculer";
import DbService from "moleculer-db";
import MongooseAdapter from "moleculer-db-adapter-mongoose";
import mongoose from "mongoose";
import type { Config } from "../config";
import { configOf } from "../config/settings";
import { isStoreUnreachable, unavailable } from "../lib/errors";
import { isUniqueConstraint, SqliteBackend } from "../lib/store/sqlite-collection";

export interface IndexSpec {
	fields: Record<string, 1 | -1>;
	unique?: boolean;
	/** Leaves out the documents without the field: an index of the few that have it. */
	sparse?: boolean;
}

export interface Page<T> {
	rows: T[];
	total: number;
	page: number;
	pageSize: number;
}

export type Query = Record<string, unknown>;

export interface FindParams {
	query: Query;
	/** Field names, `-` first for descending (moleculer-db's form). */
	sort?: string[];
	limit?: number;
	offset?: number;
}

/** What a collection needs of its store; one implementation per store. */
export interface Backend<T> {
	connect(): Promise<void>;
	disconnect(): Promise<void>;
	insert(doc: T): Promise<void>;
	findById(id: string): Promise<T | null>;
	find(params: FindParams): Promise<T[]>;
	count(query: Query): Promise<number>;
	/** Applies `update` to every matching document (each atomically); how many matched. */
	update(query: Query, update: object): Promise<number>;
	upsert(query: Query, update: object): Promise<void>;
	/** Deletes every matching document; how many. */
	remove(query: Query): Promise<number>;
	ensureIndexes(indexes: IndexSpec[]): Promise<void>;
}

const sortOf = (sort: string[] = []) =>
	Object.fromEntries(
		sort.map(f => (f.startsWith("-") ? [f.slice(1), -1 as const] : [f, 1 as const]))
	);

function isUniqueViolation(err: unknown): boolean {
	return (err as { code?: number } | undefined)?.code === 11000 || isUniqueConstraint(err);
}

/**
 * moleculer-db-adapter-mongoose on the one mongoose connection of the process. The stock adapter
 * connects (and adds its logging listeners) once per collection, and closes that shared connection
 * when any one service stops; this one connects once for all and closes with the last.
 */
class SharedMongooseAdapter extends MongooseAdapter<mongoose.Document> {
	private static open = 0;
	private static connecting?: Promise<void>;
	private connected = false;

	override async connect() {
		if (this.connected) return;
		SharedMongooseAdapter.connecting ??= super.connect().catch(err => {
			SharedMongooseAdapter.connecting = undefined;
			throw err;
		});
		await SharedMongooseAdapter.connecting;
		SharedMongooseAdapter.open++;
		this.connected = true;
	}

	override async disconnect() {
		if (!this.connected) return;
		this.connected = false;
		if (--SharedMongooseAdapter.open > 0) return;
		SharedMongooseAdapter.connecting = undefined;
		await mongoose.connection.close();
	}
}

/**
 * MongoDB through the adapter's mongoose model, as lean queries: plain objects, no hydration. The
 * schema declares `_id` only and opts out of `strictQuery`, which the adapter switches on globally
 * and which would silently drop every filter field the schema does not declare.
 */
class MongoBackend<T extends { _id: string }> implements Backend<T> {
	readonly adapter: SharedMongooseAdapter;

	constructor(
		private readonly model: mongoose.Model<T>,
		uri: string,
		timeoutMs: number,
		writeConcern: Config["mongoWriteConcern"]
	) {
		// A hung or unreachable server fails a call after `timeoutMs` instead of holding it: waiting
		// for a server (selection), for a new connection's handshake, and for an answer on an open
		// connection (the socket's idle time). The write concern covers every write of the
		// connection: the ledger's, the deals', the settlements' alike.
		this.adapter = new SharedMongooseAdapter(uri, {
			serverSelectionTimeoutMS: timeoutMs,
			connectTimeoutMS: timeoutMs,
			socketTimeoutMS: timeoutMs,
			...(writeConcern === undefined ? {} : { writeConcern: { w: writeConcern } })
		});
	}

	connect() {
		return this.adapter.connect();
	}
	disconnect() {
		return this.adapter.disconnect();
	}
	async insert(doc: T) {
		await this.model.insertMany([doc], { lean: true });
	}
	findById(id: string) {
		return this.model.findById(id).lean<T>().exec();
	}
	find({ query, sort, limit, offset }: FindParams) {
		const cursor = this.model.find(query).sort(sortOf(sort));
		if (offset) cursor.skip(offset);
		if (limit) cursor.limit(limit);
		return cursor.lean<T[]>().exec();
	}
	count(query: Query) {
		return this.model.countDocuments(query).exec();
	}
	async update(query: Query, update: object) {
		return (await this.model.updateMany(query, update).exec()).matchedCount;
	}
	async upsert(query: Query, update: object) {
		await this.model.updateOne(query, update, { upsert: true }).exec();
	}
	async remove(query: Query) {
		return (await this.model.deleteMany(query).exec()).deletedCount;
	}
	/** Built here, awaited and reported, rather than left to mongoose's background `autoIndex`. */
	async ensureIndexes() {
		await this.model.createIndexes();
	}
}

function mongoModel<T>(name: string, indexes: IndexSpec[], timeoutMs: number): mongoose.Model<T> {
	const existing = mongoose.models[name] as mongoose.Model<T> | undefined;
	if (existing) return existing;
	const schema = new mongoose.Schema(
		{ _id: String },
		{
			strict: false,
			strictQuery: false,
			versionKey: false,
			autoIndex: false,
			autoCreate: false,
			// How long a call waits for a lost connection to come back (mongoose's command buffer).
			bufferTimeoutMS: timeoutMs
		}
	);
	for (const { fields, unique, sparse } of indexes)
		schema.index(fields, { unique: !!unique, sparse: !!sparse });
	return mongoose.model<T>(name, schema as unknown as mongoose.Schema<T>, name);
}

/** One collection, with the same meaning on SQLite and on MongoDB. */
export class Collection<T extends { _id: string }> {
	private readonly backend: Backend<T> & { adapter: unknown };
	private readonly model?: mongoose.Model<T>;

	/** On MongoDB when the node's configuration names one (MONGO_URI), otherwise a table of the SQLite file in its DATA_DIR. */
	constructor(
		readonly name: string,
		private readonly indexes: IndexSpec[],
		private readonly config: Pick<
			Config,
			| "mongoUri"
			| "mongoWriteConcern"
			| "dataDir"
			| "sqliteSynchronous"
			| "mongoTimeoutMs"
			| "retryAfterSeconds"
		>
	) {
		if (config.mongoUri) {
			this.model = mongoModel<T>(name, indexes, config.mongoTimeoutMs);
			this.backend = new MongoBackend(
				this.model,
				config.mongoUri,
				config.mongoTimeoutMs,
				config.mongoWriteConcern
			);
		} else this.backend = new SqliteBackend<T>(name, indexes, config);
	}

	/** The moleculer-db adapter behind the collection, for the service whose main store it is. */
	get adapter(): {
		init(broker: ServiceBroker, service: unknown): void;
		connect(): Promise<unknown>;
		disconnect(): Promise<unknown>;
	} {
		return this.backend.adapter as never;
	}

	init(broker: ServiceBroker, logger: Logger): void {
		this.adapter.init(broker, { schema: { model: this.model }, logger });
	}

	/** Connects, retrying until the store answers (as moleculer-db does for a service's main adapter), and builds the indexes. */
	async connect(logger: Logger): Promise<void> {
		for (;;) {
			try {
				await this.backend.connect();
				break;
			} catch (err) {
				logger.warn(
					`Collection '${this.name}' cannot connect yet, retrying:`,
					(err as Error).message
				);
				await new Promise(resolve => setTimeout(resolve, 1000));
			}
		}
		await this.ensureIndexes();
	}

	disconnect(): Promise<void> {
		return this.backend.disconnect();
	}

	ensureIndexes(): Promise<void> {
		return this.backend.ensureIndexes(this.indexes);
	}

	/**
	 * Runs a call on the store; one that could not reach it or was not answered in time
	 * (MONGO_TIMEOUT_MS) fails as 503 `STORE_UNAVAILABLE`, which asks a client to retry and a channel
	 * to wait it out rather than dead-letter the message.
	 */
	private async reach<R>(call: () => Promise<R>): Promise<R> {
		try {
			return await call();
		} catch (err) {
			if (!isStoreUnreachable(err)) throw err;
			// The driver's words stay out of the answer (a client sees the message); `cause` keeps them.
			const storeUnavailable = unavailable(
				"STORE_UNAVAILABLE",
				`The store did not answer in time (collection '${this.name}'); try again later`,
				this.config.retryAfterSeconds
			);
			Object.defineProperty(storeUnavailable, "cause", { value: err });
			throw storeUnavailable;
		}
	}

	/** Inserts `doc`; `false` when its `_id` or a unique field is taken. */
	async insertUnique(doc: T): Promise<boolean> {
		try {
			await this.reach(() => this.backend.insert(doc));
			return true;
		} catch (err) {
			if (isUniqueViolation(err)) return false;
			throw err;
		}
	}

	findById(id: string): Promise<T | null> {
		return this.reach(() => this.backend.findById(id));
	}

	find(params: FindParams): Promise<T[]> {
		return this.reach(() => this.backend.find(params));
	}

	count(query: Query): Promise<number> {
		return this.reach(() => this.backend.count(query));
	}

	/** Applies `update` to the documents matching `query`, one atomic step per document; how many matched. */
	update(query: Query, update: object): Promise<number> {
		return this.reach(() => this.backend.update(query, update));
	}

	upsert(query: Query, update: object): Promise<void> {
		return this.reach(() => this.backend.upsert(query, update));
	}

	/** Deletes the documents matching `query` (records past their retention); how many. */
	remove(query: Query): Promise<number> {
		return this.reach(() => this.backend.remove(query));
	}

	async page(query: Query, sort: string[], page: number, pageSize: number): Promise<Page<T>> {
		const [rows, total] = await Promise.all([
			this.find({ query, sort, limit: pageSize, offset: (page - 1) * pageSize }),
			this.count(query)
		]);
		return { rows, total, page, pageSize };
	}

	/** A listing's page, newest first (ids are ULIDs), of the documents matching the filters that are
	 * given (undefined ones are dropped), each row as `view` shows it. */
	async newestFirst<V>(
		filters: Record<string, unknown>,
		page: number,
		pageSize: number,
		view: (row: T) => V
	): Promise<Page<V>> {
		const query = Object.fromEntries(
			Object.entries(filters).filter(([, value]) => value !== undefined)
		);
		const result = await this.page(query, ["-_id"], page, pageSize);
		return { ...result, rows: result.rows.map(view) };
	}
}

/** Opens a further collection for `service`; connect it in `started` and close it in `stopped`. */
export function openCollection<T extends { _id: string }>(
	service: Pick<Service, "broker" | "logger">,
	name: string,
	indexes: IndexSpec[] = []
): Collection<T> {
	const collection = new Collection<T>(name, indexes, configOf(service.broker));
	collection.init(service.broker, service.logger);
	return collection;
}

export interface DbThis<T extends { _id: string }> {
	store: Collection<T>;
}

export function DbMixin(name: string, indexes: IndexSpec[] = []): Partial<ServiceSchema> {
	return {
		mixins: [DbService],
		actions: Object.fromEntries(
			["find", "count", "list", "create", "insert", "get", "update", "remove"].map(a => [a, false])
		),
		// Runs after moleculer-db's own `created`: the adapter is made per service instance, so two
		// brokers in one process (tests) never share a store.
		created(this: Service & { adapter: unknown; store: Collection<{ _id: string }> }) {
			this.store = openCollection(this, name, indexes);
			this.adapter = this.store.adapter;
		},
		async afterConnected(this: { store: Collection<{ _id: string }> }) {
			await this.store.ensureIndexes();
		}
	} as unknown as Partial<ServiceSchema>;
}
