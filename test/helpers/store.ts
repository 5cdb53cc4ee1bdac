/**
 * Which store a suite runs on, and what a test needs of it from outside the services. The MongoDB
 * project of jest.config.js sets TEST_MONGO_URI (the stand-in, or a real server); each test file and
 * each spawned system then gets a database of its own, as each gets a data folder of its own on SQLite.
 */
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { randomBytes } from "node:crypto";
import { MongoClient } from "mongodb";

/** Databases the suites create start with this, so a real server can be cleaned after a run. */
export const TEST_DB_PREFIX = "onepoint-test-";

export const onMongo = (): boolean => !!process.env.MONGO_URI;

/** The URI of a new, empty database on the test server. */
export function freshDatabaseUri(): string {
	const base = process.env.TEST_MONGO_URI;
	if (!base)
		throw new Error("TEST_MONGO_URI is not set: MongoDB suites run in jest's mongodb project");
	const match = /^(mongodb(?:\+srv)?:\/\/[^/?]+)(?:\/[^?]*)?(\?.*)?$/.exec(base);
	if (!match) throw new Error(`Not a MongoDB URI: '${base}'`);
	return `${match[1]}/${TEST_DB_PREFIX}${randomBytes(6).toString("hex")}${match[2] ?? ""}`;
}

/**
 * Overwrites fields of one stored document behind its owner's back, as a faulty write or an operator
 * would: for tests of what the system notices. On SQLite the node must be stopped meanwhile (its
 * file is opened here by a connection of its own).
 */
export async function tamper(
	where: { dataDir: string; mongoUri?: string },
	collection: string,
	id: string,
	fields: Record<string, unknown>
): Promise<void> {
	if (where.mongoUri) {
		const client = await MongoClient.connect(where.mongoUri);
		try {
			await client
				.db()
				.collection<{ _id: string }>(collection)
				.updateOne({ _id: id }, { $set: fields });
		} finally {
			await client.close();
		}
		return;
	}
	const db = new DatabaseSync(path.join(where.dataDir, "onepoint.sqlite"));
	try {
		const table = `"${collection.replace(/"/g, '""')}"`;
		const row = db.prepare(`SELECT doc FROM ${table} WHERE _id = ?`).get(id) as { doc: string };
		db.prepare(`UPDATE ${table} SET doc = ? WHERE _id = ?`).run(
			JSON.stringify({ ...JSON.parse(row.doc), ...fields }),
			id
		);
	} finally {
		db.close();
	}
}
