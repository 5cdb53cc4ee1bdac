/**
 * The channel store of earlier versions: `DATA_DIR/channels/messages.db`, an append-only file of
 * lines in NeDB's format (a message as published, `{_id, handledBy}` as each group handled it, a
 * tombstone `{_id, $$deleted: true}` once all had), and `groups.db`, a NeDB datastore of the consumer
 * groups (a later line of an `_id` supersedes the earlier ones, a tombstone removes it). The embedded
 * adapter imports what they still hold once, at its first connect on such a folder, then renames
 * them `*.migrated`.
 */
import fs from "node:fs";
import path from "node:path";
import { nedbRecords } from "../store/nedb-import";

export interface LegacyMessage {
	_id: string;
	channel: string;
	payload: unknown;
	headers?: Record<string, string>;
	pending: string[];
	orphan?: boolean;
}

interface Line {
	_id?: string;
	$$deleted?: boolean;
	handledBy?: string;
	channel?: string;
	group?: string;
}

export interface LegacyStore {
	/** The messages some group had still to handle, and the orphans. */
	messages: LegacyMessage[];
	groups: { channel: string; group: string }[];
	/** Renames the files `*.migrated`, once what they held is stored elsewhere. */
	retire(): void;
}

/** The lines of `file` (../store/nedb-import.ts reads NeDB's format, a torn last line skipped). */
const lines = (file: string) => nedbRecords(file) as Iterable<Line>;

/** What the earlier version's files in `dataDir` hold, or nothing when there are none. */
export function readLegacyStore(dataDir: string): LegacyStore | undefined {
	const dir = path.join(dataDir, "channels");
	const messagesFile = path.join(dir, "messages.db");
	const groupsFile = path.join(dir, "groups.db");
	const files = [messagesFile, groupsFile].filter(file => fs.existsSync(file));
	if (!files.length) return undefined;

	const messages = new Map<string, LegacyMessage>();
	for (const line of fs.existsSync(messagesFile) ? lines(messagesFile) : []) {
		const id = line._id as string;
		const msg = messages.get(id);
		if (line.$$deleted) messages.delete(id);
		else if (line.handledBy !== undefined) {
			if (msg) msg.pending = msg.pending.filter(group => group !== line.handledBy);
		} else messages.set(id, line as LegacyMessage);
	}

	const groups = new Map<string, { channel: string; group: string }>();
	for (const line of fs.existsSync(groupsFile) ? lines(groupsFile) : []) {
		// Lines without an `_id` declare NeDB's indexes.
		if (line._id === undefined) continue;
		if (line.$$deleted) groups.delete(line._id);
		else groups.set(line._id, { channel: line.channel as string, group: line.group as string });
	}

	return {
		messages: [...messages.values()].filter(msg => msg.orphan || msg.pending.length),
		groups: [...groups.values()],
		retire: () => files.forEach(file => fs.renameSync(file, `${file}.migrated`))
	};
}
