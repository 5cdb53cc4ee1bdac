/**
 * A durable, single-process adapter for @moleculer/channels, persisted in the node's SQLite file
 * (lib/store/sqlite.ts) under DATA_DIR.
 *
 * @moleculer/channels ships adapters for brokers (NATS JetStream, Redis, AMQP, Kafka) and a Fake one
 * built on Moleculer events, which drops what nobody is listening to. The embedded default needs the
 * guarantees of the real ones without a server: a message waits until every consumer group that
 * subscribed to its channel has handled it (at-least-once), failed handlers are retried with backoff,
 * and after `maxRetries` failures of its own (FailureCounts: an unavailable dependency does not count)
 * the message goes to the dead-letter channel instead of vanishing.
 *
 * Publishing waits until `connect` has loaded the store and the consumer groups: the broker connects
 * the adapter only after its services have started, and a service may publish from `started`
 * (the outbox sends what a crash left). A message published before any of its channel's groups was
 * known (an orphan) is handed to the groups known at the next connect, or to the first to subscribe.
 *
 * The messages waiting live in memory, in one queue per channel and group in publishing order,
 * rebuilt at connect from the table `channel_messages`: a row per message, inserted when it is
 * published, its pending groups updated as each group handles it, deleted once all have. Orphans
 * stay on disk only, read back when their channel's first groups appear: a channel no group has ever
 * consumed on this data folder (a node running some of the services) keeps its messages without its
 * memory growing with them. A group, once known, is waited for until it subscribes again. A publish
 * is answered once its row is committed; the writes of one turn of the event loop share a commit
 * (group commit), and so a posting's writes and the events it publishes share one, as do the
 * acknowledgements of the messages handled in one turn. A group consuming a channel is a row of
 * `channel_groups`. An earlier version's NeDB-format files are imported once (./legacy-files.ts).
 */
import type { DatabaseSync, StatementSync } from "node:sqlite";
import { Adapters } from "@moleculer/channels";
import type { Channel } from "@moleculer/channels/types/src";
import type { Logger, ServiceBroker } from "moleculer";
import type { Waiting } from "../ops/metrics";
import { databaseOf, type Database, type Synchronous } from "../store/sqlite";
import { readLegacyStore } from "./legacy-files";
import { deadLetterHeaders, FailureCounts, REPLAY_GROUP, type RetryOptions } from "./redelivery";

const BaseAdapter = Adapters.Base;

export interface StoredMessage {
	id: string;
	channel: string;
	/** As JSON: each delivery parses its own copy, as from a broker. */
	payload: string;
	headers?: Record<string, string>;
	/** Consumer groups that have not handled the message yet. */
	pending: string[];
	/** Published before any group subscribed: handed to the first group that does. */
	orphan?: boolean;
}

/** A message's row: its payload, headers and pending groups as JSON. */
interface MessageRow {
	id: string;
	channel: string;
	payload: string;
	headers: string | null;
	pending: string;
	orphan: number;
}

const SCHEMA = `
	CREATE TABLE IF NOT EXISTS channel_messages (
		id TEXT PRIMARY KEY,
		channel TEXT NOT NULL,
		payload TEXT NOT NULL,
		headers TEXT,
		pending TEXT NOT NULL,
		orphan INTEGER NOT NULL DEFAULT 0
	);
	CREATE INDEX IF NOT EXISTS channel_messages_orphans ON channel_messages (channel, id) WHERE orphan = 1;
	CREATE INDEX IF NOT EXISTS channel_messages_waiting ON channel_messages (id) WHERE orphan = 0;
	CREATE TABLE IF NOT EXISTS channel_groups (
		channel TEXT NOT NULL,
		group_name TEXT NOT NULL,
		PRIMARY KEY (channel, group_name)
	) WITHOUT ROWID;`;

const INSERT_MESSAGE =
	"INTO channel_messages (id, channel, payload, headers, pending, orphan) VALUES (?, ?, ?, ?, ?, ?)";

const ADD_GROUP = "INSERT OR IGNORE INTO channel_groups (channel, group_name) VALUES (?, ?)";

/** Writes a message's row with `into`, an `INSERT` (or `INSERT OR IGNORE`) of `INSERT_MESSAGE`. */
function insertMessage(into: StatementSync, msg: StoredMessage): void {
	into.run(
		msg.id,
		msg.channel,
		msg.payload,
		msg.headers ? JSON.stringify(msg.headers) : null,
		JSON.stringify(msg.pending),
		msg.orphan ? 1 : 0
	);
}

/**
 * Stores a message as the adapter does, into the node's database: for a test that leaves behind
 * what a crash would (a message delivered twice, an orphan), with the node stopped.
 */
export function storeMessage(db: DatabaseSync, msg: StoredMessage): void {
	db.exec(SCHEMA);
	insertMessage(db.prepare(`INSERT ${INSERT_MESSAGE}`), msg);
}

/** The message a row stores. */
function messageOf(row: MessageRow): StoredMessage {
	return {
		id: row.id,
		channel: row.channel,
		payload: row.payload,
		...(row.headers === null ? {} : { headers: JSON.parse(row.headers) }),
		pending: JSON.parse(row.pending),
		...(row.orphan ? { orphan: true } : {})
	};
}

interface Statements {
	insert: StatementSync;
	orphans: StatementSync;
	handled: StatementSync;
	remove: StatementSync;
	addGroup: StatementSync;
}

interface Consumer {
	chan: Channel;
	inFlight: Map<string, Promise<void>>;
	failures: FailureCounts;
	stopped: boolean;
	timer?: NodeJS.Timeout;
}

export interface EmbeddedAdapterOptions extends RetryOptions {
	dataDir: string;
	sqliteSynchronous: Synchronous;
	maxInFlight?: number;
	deadLettering?: { enabled: boolean; queueName?: string };
}

/** Ids in publishing order: 9 base-36 digits of milliseconds (never going back), then a sequence. */
let lastMs = 0;
let sequence = 0;
function messageId(): string {
	const now = Date.now();
	if (now > lastMs) [lastMs, sequence] = [now, 0];
	else if (++sequence === 1679616) [lastMs, sequence] = [lastMs + 1, 0];
	return lastMs.toString(36).padStart(9, "0") + sequence.toString(36).padStart(4, "0");
}

export class EmbeddedAdapter extends BaseAdapter {
	declare opts: InstanceType<typeof BaseAdapter>["opts"] & EmbeddedAdapterOptions;
	declare broker: ServiceBroker;
	declare logger: Logger;
	/** The node's database: acquired by `connect`, released by `disconnect`. */
	private database!: Database;
	private sql!: Statements;
	/** Every message some group has still to handle (orphans are on disk only). */
	private readonly stored = new Map<string, StoredMessage>();
	/** Per `channel|group`, the messages that group has still to handle, in publishing order. */
	private readonly queues = new Map<string, Map<string, StoredMessage>>();
	private readonly knownGroups = new Map<string, Set<string>>();
	private readonly consumers = new Map<string, Consumer>();
	/** Settles when `connect` has loaded the store and the groups; publishing waits for it. After a
	 * disconnect it is rejected, so that a late publish fails (the outbox keeps the event). */
	private opened!: Promise<void>;
	private open!: (err?: Error) => void;
	private stopped = false;

	constructor(opts: EmbeddedAdapterOptions) {
		super(opts);
		this.resetOpened();
	}

	private resetOpened(): void {
		this.opened = new Promise(
			(resolve, reject) => (this.open = err => (err ? reject(err) : resolve()))
		);
		// A publish that never came does not make the rejection unhandled.
		this.opened.catch(() => undefined);
	}

	override async connect(): Promise<void> {
		if (this.stopped) this.resetOpened();
		this.stopped = false;
		this.database = databaseOf(this.opts);
		try {
			await this.load();
			this.connected = true;
			this.open();
		} catch (err) {
			await this.database.release();
			this.open(err as Error);
			throw err;
		}
	}

	private async load(): Promise<void> {
		const { database } = this;
		const legacy = readLegacyStore(this.opts.dataDir);
		await database.write(db => {
			db.exec(SCHEMA);
			if (!legacy) return;
			const importMessage = db.prepare(`INSERT OR IGNORE ${INSERT_MESSAGE}`);
			for (const { _id, payload, ...msg } of legacy.messages)
				insertMessage(importMessage, { ...msg, id: _id, payload: JSON.stringify(payload) });
			const importGroup = db.prepare(ADD_GROUP);
			for (const { channel, group } of legacy.groups) importGroup.run(channel, group);
		});
		if (legacy) {
			// Imported again, harmlessly, if the process dies before the files are renamed.
			legacy.retire();
			this.logger.info(
				`Imported ${legacy.messages.length} waiting message(s) and ${legacy.groups.length} consumer group(s) from the channel files of an earlier version`
			);
		}
		this.sql = {
			insert: database.db.prepare(`INSERT ${INSERT_MESSAGE}`),
			orphans: database.db.prepare(
				"SELECT * FROM channel_messages WHERE orphan = 1 AND channel = ? ORDER BY id"
			),
			handled: database.db.prepare(
				"UPDATE channel_messages SET pending = ?, orphan = 0 WHERE id = ?"
			),
			remove: database.db.prepare("DELETE FROM channel_messages WHERE id = ?"),
			addGroup: database.db.prepare(ADD_GROUP)
		};
		this.stored.clear();
		this.queues.clear();
		this.knownGroups.clear();
		const rows = database.db
			.prepare("SELECT * FROM channel_messages WHERE orphan = 0 ORDER BY id")
			.all() as unknown as MessageRow[];
		for (const msg of rows.map(messageOf)) this.hold(msg);
		const groups = database.db
			.prepare("SELECT channel, group_name AS grp FROM channel_groups")
			.all() as unknown as { channel: string; grp: string }[];
		for (const { channel, grp } of groups) this.groupsOf(channel).add(grp);
		// Every local service's groups are known before anything is published, even on a fresh data
		// folder: a message published before a consumer's first subscription still waits for it.
		for (const service of this.broker.services)
			for (const [name, def] of Object.entries(service.schema.channels ?? {}))
				this.registerGroup(this.addPrefixTopic(name), def.group ?? service.fullName, false);
		// Orphans (published by an earlier run before any group of their channel was known) go to
		// every group now known of their channel, not only to the first one registered.
		for (const [channel, known] of this.knownGroups) this.adoptOrphans(channel, [...known]);
	}

	override async disconnect(): Promise<void> {
		this.open(new Error("The channel adapter stopped before it connected"));
		// Handlers still in flight may dead-letter: the store stays open for them until they are done.
		await Promise.all([...this.consumers.values()].map(c => this.stopConsumer(c)));
		this.consumers.clear();
		if (this.connected) await this.database.release();
		this.connected = false;
		this.stopped = true;
		this.resetOpened();
		this.open(new Error("The channel adapter has stopped"));
	}

	override async subscribe(chan: Channel): Promise<void> {
		chan.maxInFlight ??= this.opts.maxInFlight;
		chan.maxRetries ??= this.opts.maxRetries;
		chan.deadLettering = { ...this.opts.deadLettering, ...chan.deadLettering };
		this.registerGroup(chan.name, chan.group);
		const consumer: Consumer = {
			chan,
			inFlight: new Map(),
			failures: new FailureCounts(this.opts),
			stopped: false
		};
		this.consumers.set(chan.id, consumer);
		this.initChannelActiveMessages(chan.id, false);
		this.pump(consumer);
	}

	override async unsubscribe(chan: Channel): Promise<void> {
		const consumer = this.consumers.get(chan.id);
		if (!consumer) return;
		this.consumers.delete(chan.id);
		await this.stopConsumer(consumer);
	}

	/**
	 * Answers once the message's row is committed. It is handed to its consumers at once: a handler
	 * that writes to the same database commits with it or after it. (Should the commit fail, the
	 * publisher is told so and publishes again; a consumer that had the message meanwhile applies it
	 * once by its key, as it does any message delivered twice.)
	 */
	override async publish(
		channelName: string,
		payload: unknown,
		opts: { headers?: Record<string, string> } = {}
	): Promise<void> {
		await this.opened;
		const replayTo = opts.headers?.[REPLAY_GROUP];
		const groups = replayTo ? [replayTo] : [...this.groupsOf(channelName)];
		const msg: StoredMessage = {
			id: messageId(),
			channel: channelName,
			payload: JSON.stringify(payload),
			headers: opts.headers,
			pending: groups,
			...(groups.length === 0 ? { orphan: true } : {})
		};
		const committed = this.database.write(() => {
			insertMessage(this.sql.insert, msg);
			if (!msg.orphan) this.hold(msg);
		});
		for (const consumer of this.consumers.values())
			if (consumer.chan.name === channelName) this.pump(consumer);
		await committed;
	}

	/** Messages some subscribed group has still to handle: zero means every consumer has caught up. */
	async backlog(): Promise<number> {
		let waiting = 0;
		for (const msg of this.stored.values()) if (msg.pending.length > 0) waiting++;
		return waiting;
	}

	/** How many messages of `channel` `group` has still to handle (those in flight too), and since when. */
	async waiting(channel: string, group: string): Promise<Waiting> {
		const queue = this.queues.get(`${channel}|${group}`);
		const [oldest] = queue?.keys() ?? [];
		// Message ids begin with their publishing time: 9 base-36 digits of milliseconds.
		return oldest === undefined
			? { count: 0 }
			: { count: queue?.size ?? 0, oldestAt: parseInt(oldest.slice(0, 9), 36) };
	}

	/** Has `group` handled every message of `channels` published before `before`? */
	async caughtUp(channels: string[], group: string, before: Date): Promise<boolean> {
		await this.opened;
		// Message ids begin with their publishing time: 9 base-36 digits of milliseconds.
		const cutoff = before.getTime().toString(36).padStart(9, "0");
		return channels.every(channel =>
			[...(this.queues.get(`${channel}|${group}`)?.keys() ?? [])].every(id => id >= cutoff)
		);
	}

	/** Keeps `msg` in memory, in the queue of each group it waits for. */
	private hold(msg: StoredMessage): void {
		this.stored.set(msg.id, msg);
		for (const group of msg.pending) this.queueOf(msg.channel, group).set(msg.id, msg);
	}

	private queueOf(channel: string, group: string): Map<string, StoredMessage> {
		const key = `${channel}|${group}`;
		let queue = this.queues.get(key);
		if (!queue) this.queues.set(key, (queue = new Map()));
		return queue;
	}

	/**
	 * Remembers (durably) that `group` consumes `channel`; the first group also takes the orphans,
	 * unless `adopt` is false (`load` hands them to all the groups it registers at once).
	 * Not waited for: a message published for the group commits with it or after it.
	 */
	private registerGroup(channel: string, group: string, adopt = true): void {
		if (this.groupsOf(channel).has(group)) return;
		this.database.atomically(() => this.sql.addGroup.run(channel, group));
		this.groupsOf(channel).add(group);
		if (adopt) this.adoptOrphans(channel, [group]);
	}

	private adoptOrphans(channel: string, groups: string[]): void {
		const pending = JSON.stringify(groups);
		const adopted = this.database.atomically(() => {
			const rows = this.sql.orphans.all(channel) as unknown as MessageRow[];
			// One held already was adopted in a turn whose commit failed: its row is written again as
			// it is held, and it is not held twice.
			for (const row of rows) {
				const held = this.stored.get(row.id);
				this.sql.handled.run(held ? JSON.stringify(held.pending) : pending, row.id);
			}
			return rows.filter(row => !this.stored.has(row.id));
		});
		for (const row of adopted)
			this.hold({ ...messageOf({ ...row, orphan: 0 }), pending: [...groups] });
	}

	private groupsOf(channel: string): Set<string> {
		let groups = this.knownGroups.get(channel);
		if (!groups) this.knownGroups.set(channel, (groups = new Set()));
		return groups;
	}

	private async stopConsumer(consumer: Consumer): Promise<void> {
		consumer.stopped = true;
		clearTimeout(consumer.timer);
		await Promise.allSettled([...consumer.inFlight.values()]);
		this.activeMessages.delete(consumer.chan.id);
	}

	/**
	 * Hands waiting messages to the consumer's handler, up to its `maxInFlight`, oldest first. A
	 * message waiting for its retry holds no slot: the messages behind it keep flowing. The queue's
	 * head holds at most the messages in flight and those waiting to be retried.
	 */
	private pump(consumer: Consumer): void {
		let free = (consumer.chan.maxInFlight ?? 1) - consumer.inFlight.size;
		if (consumer.stopped || free <= 0) return;
		const now = Date.now();
		let nextRetry = Infinity;
		for (const msg of this.queueOf(consumer.chan.name, consumer.chan.group).values()) {
			if (free <= 0) break;
			if (consumer.inFlight.has(msg.id)) continue;
			const notBefore = consumer.failures.notBefore(msg.id) ?? now;
			if (notBefore > now) {
				nextRetry = Math.min(nextRetry, notBefore);
				continue;
			}
			free--;
			this.deliver(consumer, msg);
		}
		if (nextRetry !== Infinity) {
			clearTimeout(consumer.timer);
			consumer.timer = setTimeout(() => this.pump(consumer), nextRetry - now);
		}
	}

	private deliver(consumer: Consumer, msg: StoredMessage): void {
		const { chan } = consumer;
		this.addChannelActiveMessages(chan.id, [msg.id]);
		// Each delivery gets its own copy, as from a broker: a handler cannot change what another group receives.
		const payload: unknown = JSON.parse(msg.payload);
		const work = (async () => {
			try {
				await chan.handler(payload, { id: msg.id, payload, headers: msg.headers });
				consumer.failures.forget(msg.id);
				this.done(msg, chan.group);
			} catch (err) {
				await this.failed(consumer, msg, err as Error);
			} finally {
				this.removeChannelActiveMessages(chan.id, [msg.id]);
				consumer.inFlight.delete(msg.id);
				if (!consumer.stopped) this.pump(consumer);
			}
		})();
		consumer.inFlight.set(msg.id, work);
	}

	/**
	 * Records that `group` has handled the message, in the turn's transaction without waiting for its
	 * commit: the acknowledgements of one turn share it. One lost with a crash only has the message
	 * delivered again, which every consumer applies once by its key.
	 */
	private done(msg: StoredMessage, group: string): void {
		if (!msg.pending.includes(group)) return;
		const pending = msg.pending.filter(g => g !== group);
		this.database.atomically(() =>
			pending.length
				? this.sql.handled.run(JSON.stringify(pending), msg.id)
				: this.sql.remove.run(msg.id)
		);
		msg.pending = pending;
		this.queues.get(`${msg.channel}|${group}`)?.delete(msg.id);
		if (!pending.length) this.stored.delete(msg.id);
	}

	/** Tried again later, or, once the handler has failed it more than `maxRetries` times, dead-lettered. */
	private async failed(consumer: Consumer, msg: StoredMessage, err: Error): Promise<void> {
		const { chan } = consumer;
		const verdict = consumer.failures.failed(msg.id, err, chan.maxRetries ?? 0);
		this.metricsIncrement("moleculer.channels.messages.errors.total", chan);
		if (!verdict.giveUp) {
			this.logger.warn(
				`'${chan.name}' (${chan.group}) failed${verdict.transient ? " (unavailable)" : ` (${verdict.tries} of ${(chan.maxRetries ?? 0) + 1})`}, retrying in ${verdict.delayMs / 1000} s:`,
				err.message
			);
			this.metricsIncrement("moleculer.channels.messages.retries.total", chan);
			return;
		}
		if (chan.deadLettering?.enabled) {
			this.logger.error(
				`'${chan.name}' (${chan.group}) gave up after ${verdict.tries} tries; dead-lettered:`,
				err.message
			);
			this.metricsIncrement("moleculer.channels.messages.deadLettering.total", chan);
			await this.publish(
				this.addPrefixTopic(chan.deadLettering.queueName),
				JSON.parse(msg.payload),
				{
					headers: deadLetterHeaders(msg.headers ?? {}, chan, err, verdict.tries)
				}
			);
		} else {
			this.logger.error(
				`'${chan.name}' (${chan.group}) gave up after ${verdict.tries} tries; dropped:`,
				err.message
			);
		}
		this.done(msg, chan.group);
	}
}
