/**
 * A durable, single-process adapter for @moleculer/channels, persisted with NeDB under DATA_DIR.
 *
 * @moleculer/channels ships adapters for brokers (NATS JetStream, Redis, AMQP, Kafka) and a Fake one
 * built on Moleculer events, which drops what nobody is listening to. The embedded default needs the
 * guarantees of the real ones without a server: a message waits until every consumer group that
 * subscribed to its channel has handled it (at-least-once), failed handlers are retried with backoff,
 * and after `maxRetries` the message goes to the dead-letter channel instead of vanishing.
 *
 * Publishing waits until `connect` has loaded the store and the consumer groups: the broker connects
 * the adapter only after its services have started, and a service may publish from `started`
 * (the outbox sends what a crash left). A message published before any of its channel's groups was
 * known (an orphan) is handed to the groups known at the next connect, or to the first to subscribe.
 */
import path from "node:path";
import fs from "node:fs";
import type Datastore from "@seald-io/nedb";
import { openDatastore } from "../store/nedb";
import { Adapters } from "@moleculer/channels";
import type { Channel } from "@moleculer/channels/types/src";
import type { Logger, ServiceBroker } from "moleculer";
import { deadLetterHeaders, REPLAY_GROUP, retryDelay, type RetryOptions } from "./redelivery";

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

interface Consumer {
	chan: Channel;
	inFlight: Map<string, Promise<void>>;
	failures: Map<string, { tries: number; notBefore: number }>;
	pumping: boolean;
	again: boolean;
	stopped: boolean;
	timer?: NodeJS.Timeout;
}

export interface EmbeddedAdapterOptions extends RetryOptions {
	dataDir: string;
	maxInFlight?: number;
	deadLettering?: { enabled: boolean; queueName?: string };
}

let sequence = 0;
function messageId(): string {
	sequence = (sequence + 1) % 1679616;
	return Date.now().toString(36).padStart(9, "0") + sequence.toString(36).padStart(4, "0");
}

export class EmbeddedAdapter extends BaseAdapter {
	declare opts: InstanceType<typeof BaseAdapter>["opts"] & EmbeddedAdapterOptions;
	declare broker: ServiceBroker;
	declare logger: Logger;
	private messages!: Datastore<StoredMessage>;
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
		this.opened = new Promise((resolve, reject) => (this.open = err => (err ? reject(err) : resolve())));
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
		this.messages = openDatastore<StoredMessage>(path.join(dir, "messages.db"));
		this.groups = openDatastore(path.join(dir, "groups.db"));
		await Promise.all([this.messages.loadDatabaseAsync(), this.groups.loadDatabaseAsync()]);
		await this.messages.ensureIndexAsync({ fieldName: "channel" });
		for (const { channel, group } of await this.groups.findAsync({})) this.groupsOf(channel).add(group);
		// Orphans of channels whose groups are now known (published by an earlier run before its
		// groups were loaded) go to those groups.
		for (const [channel, groups] of this.knownGroups)
			await this.messages.updateAsync({ channel, orphan: true }, { $set: { pending: [...groups] }, $unset: { orphan: true } }, { multi: true });
		// Every local service's groups are known before anything is published, even on a fresh data
		// folder: a message published before a consumer's first subscription still waits for it.
		for (const service of this.broker.services)
			for (const [name, def] of Object.entries(service.schema.channels ?? {})) await this.registerGroup(this.addPrefixTopic(name), def.group ?? service.fullName);
	}

	override async disconnect(): Promise<void> {
		this.open(new Error("The channel adapter stopped before it connected"));
		// Handlers still in flight may dead-letter: the store stays open for them until they are done.
		await Promise.all([...this.consumers.values()].map(c => this.stopConsumer(c)));
		this.consumers.clear();
		if (this.messages) await this.messages.compactDatafileAsync();
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
		const consumer: Consumer = { chan, inFlight: new Map(), failures: new Map(), pumping: false, again: false, stopped: false };
		this.consumers.set(chan.id, consumer);
		this.initChannelActiveMessages(chan.id, false);
		void this.pump(consumer);
	}

	override async unsubscribe(chan: Channel): Promise<void> {
		const consumer = this.consumers.get(chan.id);
		if (!consumer) return;
		this.consumers.delete(chan.id);
		await this.stopConsumer(consumer);
	}

	override async publish(channelName: string, payload: unknown, opts: { headers?: Record<string, string> } = {}): Promise<void> {
		await this.opened;
		const replayTo = opts.headers?.[REPLAY_GROUP];
		const groups = replayTo ? [replayTo] : [...this.groupsOf(channelName)];
		await this.messages.insertAsync({
			_id: messageId(),
			channel: channelName,
			payload,
			headers: opts.headers,
			pending: groups,
			...(groups.length === 0 ? { orphan: true } : {})
		});
		for (const consumer of this.consumers.values()) if (consumer.chan.name === channelName) void this.pump(consumer);
	}

	/** Messages some subscribed group has still to handle: zero means every consumer has caught up. */
	async backlog(): Promise<number> {
		return this.messages.countAsync({ $not: { pending: { $size: 0 } } });
	}

	/** Has `group` handled every message of `channels` published before `before`? */
	async caughtUp(channels: string[], group: string, before: Date): Promise<boolean> {
		await this.opened;
		// Message ids begin with their publishing time: 9 base-36 digits of milliseconds.
		const waiting = await this.messages.countAsync({ channel: { $in: channels }, pending: group, _id: { $lt: before.getTime().toString(36).padStart(9, "0") } });
		return waiting === 0;
	}

	/** Remembers (durably) that `group` consumes `channel`; the first group also takes the orphans. */
	private async registerGroup(channel: string, group: string): Promise<void> {
		if (this.groupsOf(channel).has(group)) return;
		this.groupsOf(channel).add(group);
		await this.groups.updateAsync({ _id: `${channel}|${group}` }, { _id: `${channel}|${group}`, channel, group }, { upsert: true });
		await this.messages.updateAsync({ channel, orphan: true }, { $set: { pending: [group] }, $unset: { orphan: true } }, { multi: true });
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

	/** Hands waiting messages to the consumer's handler, up to its `maxInFlight`, oldest first. */
	private async pump(consumer: Consumer): Promise<void> {
		if (consumer.pumping) {
			consumer.again = true;
			return;
		}
		consumer.pumping = true;
		try {
			do {
				consumer.again = false;
				const free = (consumer.chan.maxInFlight ?? 1) - consumer.inFlight.size;
				if (consumer.stopped || free <= 0) break;
				const now = Date.now();
				const waiting = await this.messages
					.findAsync({ channel: consumer.chan.name, pending: consumer.chan.group })
					.sort({ _id: 1 });
				let nextRetry = Infinity;
				let started = 0;
				for (const msg of waiting) {
					if (started >= free) break;
					if (consumer.inFlight.has(msg._id)) continue;
					const failure = consumer.failures.get(msg._id);
					if (failure && failure.notBefore > now) {
						nextRetry = Math.min(nextRetry, failure.notBefore);
						continue;
					}
					started++;
					this.deliver(consumer, msg);
				}
				if (nextRetry !== Infinity && !consumer.stopped) {
					clearTimeout(consumer.timer);
					consumer.timer = setTimeout(() => void this.pump(consumer), nextRetry - now);
				}
			} while (consumer.again);
		} finally {
			consumer.pumping = false;
		}
	}

	private deliver(consumer: Consumer, msg: StoredMessage): void {
		const { chan } = consumer;
		this.addChannelActiveMessages(chan.id, [msg._id]);
		const work = (async () => {
			try {
				await chan.handler(msg.payload, { id: msg._id, payload: msg.payload, headers: msg.headers });
				consumer.failures.delete(msg._id);
				await this.done(msg._id, chan.group);
			} catch (err) {
				await this.failed(consumer, msg, err as Error);
			} finally {
				this.removeChannelActiveMessages(chan.id, [msg._id]);
				consumer.inFlight.delete(msg._id);
				if (!consumer.stopped) void this.pump(consumer);
			}
		})();
		consumer.inFlight.set(msg._id, work);
	}

	private async done(id: string, group: string): Promise<void> {
		await this.messages.updateAsync({ _id: id }, { $pull: { pending: group } });
		await this.messages.removeAsync({ _id: id, pending: { $size: 0 } }, {});
	}

	private async failed(consumer: Consumer, msg: StoredMessage, err: Error): Promise<void> {
		const { chan } = consumer;
		const tries = (consumer.failures.get(msg._id)?.tries ?? 0) + 1;
		this.metricsIncrement("moleculer.channels.messages.errors.total", chan);
		if (tries <= (chan.maxRetries ?? 0)) {
			this.logger.warn(`'${chan.name}' (${chan.group}) failed, retry ${tries}:`, err.message);
			this.metricsIncrement("moleculer.channels.messages.retries.total", chan);
			consumer.failures.set(msg._id, { tries, notBefore: Date.now() + retryDelay(tries, this.opts) });
			return;
		}
		consumer.failures.delete(msg._id);
		if (chan.deadLettering?.enabled) {
			this.logger.error(`'${chan.name}' (${chan.group}) gave up after ${tries} tries; dead-lettered:`, err.message);
			this.metricsIncrement("moleculer.channels.messages.deadLettering.total", chan);
			await this.publish(this.addPrefixTopic(chan.deadLettering.queueName), msg.payload, { headers: deadLetterHeaders(msg.headers ?? {}, chan, err, tries) });
		} else {
			this.logger.error(`'${chan.name}' (${chan.group}) gave up after ${tries} tries; dropped:`, err.message);
		}
		await this.done(msg._id, chan.group);
	}
}
