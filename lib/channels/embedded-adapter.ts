/**
 * A durable, single-process adapter for @moleculer/channels, persisted with NeDB under DATA_DIR.
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
 * rebuilt from the store at connect; the store is an append-only file of lines in NeDB's format (a
 * message as published, a short line naming the message and a group as each group handles it, a
 * tombstone once all have), written before a publish or an acknowledgement completes, and compacted
 * at connect and disconnect, and while running once most of it is superseded. Publishing and
 * acknowledging cost one appended line each, however long the backlog (docs/performance.md).
 */
import fs from "node:fs";
import path from "node:path";
import type Datastore from "@seald-io/nedb";
import { deserialize, serialize } from "@seald-io/nedb/lib/model";
import { openDatastore, worthRewriting } from "../store/nedb";
import { Adapters } from "@moleculer/channels";
import type { Channel } from "@moleculer/channels/types/src";
import type { Logger, ServiceBroker } from "moleculer";
import type { Waiting } from "../ops/metrics";
import { deadLetterHeaders, FailureCounts, REPLAY_GROUP, type RetryOptions } from "./redelivery";

const BaseAdapter = Adapters.Base;

interface StoredMessage {
	_id: string;
	channel: string;
	payload: unknown;
	headers?: Record<string, string>;
	/** Consumer groups that have not handled the message yet. */
	pending: string[];
	/** Published before any group subscribed: handed to the first group that does. */
	orphan?: boolean;
}

/** The lines of the file besides a message's: one group has handled it; every group has. */
type Acknowledgement = { _id: string; handledBy: string };
type Tombstone = { _id: string; $$deleted: true };

interface Consumer {
	chan: Channel;
	inFlight: Map<string, Promise<void>>;
	failures: FailureCounts;
	stopped: boolean;
	timer?: NodeJS.Timeout;
}

export interface EmbeddedAdapterOptions extends RetryOptions {
	dataDir: string;
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
	private file = "";
	private fd?: number;
	/** Lines in the file. */
	private lines = 0;
	/** Every message some group has still to handle, and the orphans. */
	private stored = new Map<string, StoredMessage>();
	/** Per `channel|group`, the messages that group has still to handle, in publishing order. */
	private readonly queues = new Map<string, Map<string, StoredMessage>>();
	private groups!: Datastore<{ _id: string; channel: string; group: string }>;
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
		try {
			await this.load();
			this.connected = true;
			this.open();
		} catch (err) {
			this.open(err as Error);
			throw err;
		}
	}

	private async load(): Promise<void> {
		const dir = path.join(this.opts.dataDir, "channels");
		fs.mkdirSync(dir, { recursive: true });
		this.file = path.join(dir, "messages.db");
		this.groups = openDatastore(path.join(dir, "groups.db"));
		await this.groups.loadDatabaseAsync();
		this.readFile();
		this.compact();
		this.queues.clear();
		for (const msg of this.stored.values())
			for (const group of msg.pending) this.queueOf(msg.channel, group).set(msg._id, msg);
		for (const { channel, group } of await this.groups.findAsync({}))
			this.groupsOf(channel).add(group);
		// Orphans of channels whose groups are now known (published by an earlier run before its
		// groups were loaded) go to those groups.
		for (const [channel, groups] of this.knownGroups) this.adoptOrphans(channel, [...groups]);
		// Every local service's groups are known before anything is published, even on a fresh data
		// folder: a message published before a consumer's first subscription still waits for it.
		for (const service of this.broker.services)
			for (const [name, def] of Object.entries(service.schema.channels ?? {}))
				await this.registerGroup(this.addPrefixTopic(name), def.group ?? service.fullName);
	}

	override async disconnect(): Promise<void> {
		this.open(new Error("The channel adapter stopped before it connected"));
		// Handlers still in flight may dead-letter: the store stays open for them until they are done.
		await Promise.all([...this.consumers.values()].map(c => this.stopConsumer(c)));
		this.consumers.clear();
		if (this.file) this.compact();
		this.connected = false;
		this.stopped = true;
		this.resetOpened();
		this.open(new Error("The channel adapter has stopped"));
	}

	override async subscribe(chan: Channel): Promise<void> {
		chan.maxInFlight ??= this.opts.maxInFlight;
		chan.maxRetries ??= this.opts.maxRetries;
		chan.deadLettering = { ...this.opts.deadLettering, ...chan.deadLettering };
		await this.registerGroup(chan.name, chan.group);
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

	override async publish(
		channelName: string,
		payload: unknown,
		opts: { headers?: Record<string, string> } = {}
	): Promise<void> {
		await this.opened;
		const replayTo = opts.headers?.[REPLAY_GROUP];
		const groups = replayTo ? [replayTo] : [...this.groupsOf(channelName)];
		const msg: StoredMessage = {
			_id: messageId(),
			channel: channelName,
			payload: structuredClone(payload),
			headers: opts.headers,
			pending: groups,
			...(groups.length === 0 ? { orphan: true } : {})
		};
		this.append(msg);
		this.stored.set(msg._id, msg);
		for (const group of groups) this.queueOf(channelName, group).set(msg._id, msg);
		this.compactIfWorthIt();
		for (const consumer of this.consumers.values())
			if (consumer.chan.name === channelName) this.pump(consumer);
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

	/**
	 * Rebuilds the messages from the file, in publishing order: a message's line sets it, an
	 * acknowledgement takes its group off, a tombstone removes it. A torn last line (a process killed
	 * while writing it) was never acknowledged to anyone and is skipped.
	 */
	private readFile(): void {
		this.stored.clear();
		const lines = fs.existsSync(this.file) ? fs.readFileSync(this.file, "utf8").split("\n") : [];
		lines.forEach((line, i) => {
			if (!line) return;
			let record: StoredMessage | Acknowledgement | Tombstone;
			try {
				record = deserialize(line) as typeof record;
			} catch (err) {
				if (i === lines.length - 1) return;
				throw new Error(`${this.file}, line ${i + 1}: ${(err as Error).message}`);
			}
			const msg = this.stored.get(record._id);
			if ("$$deleted" in record) this.stored.delete(record._id);
			else if ("handledBy" in record) {
				if (msg) msg.pending = msg.pending.filter(group => group !== record.handledBy);
			} else this.stored.set(record._id, record);
		});
		for (const [id, msg] of this.stored)
			if (!msg.orphan && !msg.pending.length) this.stored.delete(id);
		this.stored = new Map([...this.stored].sort(([a], [b]) => (a < b ? -1 : 1)));
	}

	/** Writes a line to the file before anything answers. */
	private append(record: StoredMessage | Acknowledgement | Tombstone): void {
		this.fd ??= fs.openSync(this.file, "a");
		const bytes = Buffer.from(`${serialize(record)}\n`, "utf8");
		for (let written = 0; written < bytes.length;) written += fs.writeSync(this.fd, bytes, written);
		this.lines++;
	}

	/** Rewrites the file once most of it is superseded, so that a busy node's file does not grow until its next start. */
	private compactIfWorthIt(): void {
		if (worthRewriting(this.lines, this.stored.size)) this.compact();
	}

	/** Rewrites the file with the messages still waiting, as NeDB does: a new file renamed over the old. */
	private compact(): void {
		if (this.fd !== undefined) fs.closeSync(this.fd);
		this.fd = undefined;
		const temporary = `${this.file}~`;
		fs.writeFileSync(
			temporary,
			[...this.stored.values()].map(msg => `${serialize(msg)}\n`).join(""),
			"utf8"
		);
		fs.renameSync(temporary, this.file);
		this.lines = this.stored.size;
	}

	private queueOf(channel: string, group: string): Map<string, StoredMessage> {
		const key = `${channel}|${group}`;
		let queue = this.queues.get(key);
		if (!queue) this.queues.set(key, (queue = new Map()));
		return queue;
	}

	/** Remembers (durably) that `group` consumes `channel`; the first group also takes the orphans. */
	private async registerGroup(channel: string, group: string): Promise<void> {
		if (this.groupsOf(channel).has(group)) return;
		this.groupsOf(channel).add(group);
		await this.groups.updateAsync(
			{ _id: `${channel}|${group}` },
			{ _id: `${channel}|${group}`, channel, group },
			{ upsert: true }
		);
		this.adoptOrphans(channel, [group]);
	}

	private adoptOrphans(channel: string, groups: string[]): void {
		for (const msg of this.stored.values()) {
			if (!msg.orphan || msg.channel !== channel) continue;
			msg.pending = [...groups];
			delete msg.orphan;
			this.append(msg);
			for (const group of groups) this.queueOf(channel, group).set(msg._id, msg);
		}
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
			if (consumer.inFlight.has(msg._id)) continue;
			const notBefore = consumer.failures.notBefore(msg._id) ?? now;
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
		this.addChannelActiveMessages(chan.id, [msg._id]);
		// Each delivery gets its own copy, as from a broker: a handler cannot change what another group receives.
		const payload = structuredClone(msg.payload);
		const work = (async () => {
			try {
				await chan.handler(payload, { id: msg._id, payload, headers: msg.headers });
				consumer.failures.forget(msg._id);
				this.done(msg, chan.group);
			} catch (err) {
				await this.failed(consumer, msg, err as Error);
			} finally {
				this.removeChannelActiveMessages(chan.id, [msg._id]);
				consumer.inFlight.delete(msg._id);
				if (!consumer.stopped) this.pump(consumer);
			}
		})();
		consumer.inFlight.set(msg._id, work);
	}

	private done(msg: StoredMessage, group: string): void {
		if (!msg.pending.includes(group)) return;
		msg.pending = msg.pending.filter(g => g !== group);
		this.append(
			msg.pending.length ? { _id: msg._id, handledBy: group } : { $$deleted: true, _id: msg._id }
		);
		this.queues.get(`${msg.channel}|${group}`)?.delete(msg._id);
		if (!msg.pending.length) this.stored.delete(msg._id);
		this.compactIfWorthIt();
	}

	/** Tried again later, or, once the handler has failed it more than `maxRetries` times, dead-lettered. */
	private async failed(consumer: Consumer, msg: StoredMessage, err: Error): Promise<void> {
		const { chan } = consumer;
		const verdict = consumer.failures.failed(msg._id, err, chan.maxRetries ?? 0);
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
			await this.publish(this.addPrefixTopic(chan.deadLettering.queueName), msg.payload, {
				headers: deadLetterHeaders(msg.headers ?? {}, chan, err, verdict.tries)
			});
		} else {
			this.logger.error(
				`'${chan.name}' (${chan.group}) gave up after ${verdict.tries} tries; dropped:`,
				err.message
			);
		}
		this.done(msg, chan.group);
	}
}
