/**
 * The embedded channel store seen from outside the node, through a connection of its own to the
 * node's SQLite file: it sees what was committed, and writes what a crash would leave behind.
 */
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { storeMessage, type StoredMessage } from "../../lib/channels/embedded-adapter";

/** A connection of its own to the node's database in `dataDir`: close it when done. */
export function openDatabase(dataDir: string): DatabaseSync {
	return new DatabaseSync(path.join(dataDir, "onepoint.sqlite"));
}

function using<T>(dataDir: string, use: (db: DatabaseSync) => T): T {
	const db = openDatabase(dataDir);
	try {
		return use(db);
	} finally {
		db.close();
	}
}

/** The payloads' `id`s of the messages stored for `channel` (its prefix included), in publishing order. */
export function storedIds(dataDir: string, channel: string): string[] {
	return using(dataDir, db =>
		(
			db
				.prepare("SELECT payload FROM channel_messages WHERE channel = ? ORDER BY id")
				.all(channel) as { payload: string }[]
		).map(row => (JSON.parse(row.payload) as { id: string }).id)
	);
}

/** Whether a message with this id is stored. */
export function isStored(dataDir: string, id: string): boolean {
	return using(
		dataDir,
		db => db.prepare("SELECT 1 FROM channel_messages WHERE id = ?").get(id) !== undefined
	);
}

/** Stores a message as the adapter would (the node stopped): a message delivered twice, an orphan. */
export function storeChannelMessage(dataDir: string, msg: StoredMessage): void {
	using(dataDir, db => storeMessage(db, msg));
}
