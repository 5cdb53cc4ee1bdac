/**
 * The embedded store's database: one SQLite file per data folder, through Node's built-in
 * `node:sqlite` (no native module to build), in WAL mode.
 *
 * Group commit: a write runs at once, inside the transaction that is open for the current turn of
 * the event loop (one is begun by the first write of a turn); the transaction commits when the turn
 * ends (`setImmediate`), and every write in it is answered only then. What was answered is on disk,
 * as with one transaction per write, but many writes share one commit, which is the cost
 * (docs/performance.md). A write that fails is rolled back to its savepoint alone; the others of
 * its turn go on. A read sees the writes made before it, committed or not: within one process the
 * order of operations is the order they were made in, and a transaction that fails to commit takes
 * with it everything that read its writes and wrote after them, as it is one transaction.
 *
 * Durability (`SQLITE_SYNCHRONOUS`): `NORMAL` (default) syncs the WAL at checkpoints, so a killed
 * process loses nothing it answered, and an operating-system crash or power loss may lose the last
 * commits; `FULL` syncs every commit, so neither does, at the cost of a sync per commit (still one
 * per group, not per write).
 */
import fs from "node:fs";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import type { Config } from "../../config";

export type Synchronous = "NORMAL" | "FULL";

interface Waiter {
	resolve(): void;
	reject(err: Error): void;
}

/**
 * Pages of the page cache (`cache_size`, 4 KiB each): memory stays bounded whatever the data, and the
 * OS's page cache serves the rest. Not larger: each commit walks the cache's hash table
 * (`pcache1TruncateUnsafe`), and at 16,384 pages that walk was 8% of an in-process deal's CPU (perf);
 * at 2,000 the same 60,000 deals took 8% less CPU and 64 MB less memory.
 */
const CACHE_PAGES = 2_000;

export class Database {
	readonly db: DatabaseSync;
	/** The writes of the open transaction, answered when it commits. */
	private waiters: Waiter[] = [];
	private open = false;
	private savepoints = 0;
	/** Users of this handle (collections and the channel store of one data folder). */
	private users = 0;

	private constructor(
		readonly file: string,
		synchronous: Synchronous
	) {
		fs.mkdirSync(path.dirname(file), { recursive: true });
		this.db = new DatabaseSync(file);
		this.db.exec(
			`PRAGMA journal_mode = WAL; PRAGMA synchronous = ${synchronous};` +
				` PRAGMA cache_size = -${(CACHE_PAGES * 4096) / 1024}; PRAGMA busy_timeout = 5000;` +
				" PRAGMA temp_store = MEMORY;"
		);
	}

	private static readonly handles = new Map<string, Database>();

	/** The database of `file`, shared by every user in the process; `release` it when done. */
	static acquire(file: string, synchronous: Synchronous = "NORMAL"): Database {
		const key = path.resolve(file);
		let handle = Database.handles.get(key);
		if (!handle) Database.handles.set(key, (handle = new Database(key, synchronous)));
		handle.users++;
		return handle;
	}

	/** Closes the file once its last user releases it, after the open transaction commits. */
	async release(): Promise<void> {
		if (--this.users > 0) return;
		Database.handles.delete(this.file);
		if (this.open) this.commit();
		this.db.close();
	}

	/**
	 * Runs `change` in the turn's transaction, atomically (a savepoint of its own), and answers once
	 * the transaction has committed; a `change` that throws is undone and rejects.
	 */
	write<T>(change: (db: DatabaseSync) => T): Promise<T> {
		let result: T;
		try {
			result = this.atomically(change);
		} catch (err) {
			return Promise.reject(err);
		}
		return new Promise<T>((resolve, reject) =>
			this.waiters.push({ resolve: () => resolve(result), reject })
		);
	}

	/** Runs `change` atomically in the turn's transaction, without waiting for the commit: for a
	 * write whose caller has nothing to answer (what is lost with a crash is done again). */
	atomically<T>(change: (db: DatabaseSync) => T): T {
		this.begin();
		const name = `w${this.savepoints++}`;
		this.db.exec(`SAVEPOINT ${name}`);
		try {
			const result = change(this.db);
			this.db.exec(`RELEASE ${name}`);
			return result;
		} catch (err) {
			this.db.exec(`ROLLBACK TO ${name}; RELEASE ${name}`);
			throw err;
		} finally {
			this.savepoints--;
		}
	}

	private begin(): void {
		if (this.open) return;
		this.db.exec("BEGIN IMMEDIATE");
		this.open = true;
		setImmediate(() => this.commit());
	}

	private commit(): void {
		if (!this.open) return;
		const waiters = this.waiters;
		this.waiters = [];
		this.open = false;
		try {
			this.db.exec("COMMIT");
		} catch (err) {
			if (this.db.isTransaction) this.db.exec("ROLLBACK");
			for (const waiter of waiters) waiter.reject(err as Error);
			return;
		}
		for (const waiter of waiters) waiter.resolve();
	}
}

/** The embedded store of a node: its collections and its channels share one file, and so their commits. */
export function databaseOf(config: Pick<Config, "dataDir" | "sqliteSynchronous">): Database {
	return Database.acquire(path.join(config.dataDir, "onepoint.sqlite"), config.sqliteSynchronous);
}
