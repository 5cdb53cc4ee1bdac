/**
 * @moleculer/channels' NATS JetStream adapter, with the settings durability needs here:
 * - a new consumer group receives what was published before it first subscribed (`deliver_policy:
 *   "all"`): the member events published before the points node's first start are not lost;
 * - an unacknowledged message (its node was killed) is redelivered after 10 s, not 30;
 * - the connection retries forever, so a restarted nats-server is found again;
 * - a publish while the adapter is stopping fails instead of returning as if sent (the stock
 *   adapter drops it silently), so the outbox keeps the event and sends it after the restart;
 * - a publish to a channel nobody has subscribed to yet creates its stream (the stock adapter
 *   creates streams only when subscribing), so the event waits there for its first consumer;
 * - a failed message is redelivered after a growing delay (the stock adapter negatively acknowledges
 *   it without one, so all its retries happen at once and a few seconds of trouble dead-letter it);
 * - a message is dead-lettered after the handler's own failures (FailureCounts), not JetStream's
 *   `redeliveryCount`, which also grows at every `ack_wait` that a slow or paused consumer let pass;
 *   a dependency unavailable is waited out, however long;
 * - a message waiting for its retry holds no handler slot: the server may keep `maxWaiting` messages
 *   unacknowledged beside the `maxInFlight` being handled (the stock adapter sets `max_ack_pending`
 *   to `maxInFlight`, so that many failing messages stall their whole group), and the node runs at
 *   most `maxInFlight` handlers at once, keeping the messages it holds back alive meanwhile;
 * - an event is published with its outbox id as `Nats-Msg-Id` (a dead letter with its own id), so a
 *   publish retried after a lost acknowledgement is stored once;
 * - a dead letter carries its error and a unique id, and is acknowledged only once it is stored in
 *   DEAD_LETTERS (the stock adapter acknowledges it even when moving it failed);
 * - a replayed message (header `x-replay-group`) is handled by that group only;
 * - a message carries the publishing node's clock (header `x-published-at`): billing's month close
 *   asks what was published before a moment of that clock, which the server's own timestamp is not
 *   (another machine's clock, or a node run on another date under libfaketime);
 * - nodes of one group starting at once all subscribe (the stock adapter fails all but the first,
 *   with an ERROR in the log);
 * - every stream and durable consumer it creates has `streamReplicas` replicas (the stock adapter
 *   takes the server's default, one: a stream lost with its server's disk).
 * It overrides and calls the stock adapter's internals: lib/patches.ts fences them.
 */
import { Adapters } from "@moleculer/channels";
import type { Channel } from "@moleculer/channels/types/src";
import type { ConsumerConfig, JetStreamClient, JetStreamManager, JsMsg, NatsError } from "nats";
import type { Waiting } from "../ops/metrics";
import { assertPatchable, PATCHES } from "../patches";
import {
	DEAD_LETTER,
	deadLetterHeaders,
	EVENT_ID,
	FailureCounts,
	PUBLISHED_AT,
	REPLAY_GROUP,
	type RetryOptions
} from "./redelivery";

const NatsAdapter = Adapters.NATS;

/** How long the server waits for a message's acknowledgement before redelivering it. */
const ACK_WAIT_MS = 10_000;

/** A message held back until a handler is free, and how to hand it one. */
interface HeldMessage {
	message: JsMsg;
	start(): void;
}

type Chan = Channel & {
	unsubscribing?: boolean;
	deadLettering: { enabled: boolean; queueName: string };
};

export interface DurableNatsOptions extends RetryOptions {
	/** Handlers one node runs at once, per consumer group. */
	maxInFlight: number;
	/** Replicas of each stream and consumer: 3 on a three-server cluster, 1 on a single server. */
	streamReplicas: number;
	/**
	 * Messages a consumer group may hold unacknowledged beside the `maxInFlight` being handled:
	 * waiting for their retry, or on a node for a free handler.
	 */
	maxWaiting: number;
	deadLettering: { enabled: boolean; queueName: string };
}

export class DurableNatsAdapter extends NatsAdapter {
	declare stopping: boolean;
	declare manager: JetStreamManager;
	declare client: JetStreamClient;
	declare opts: InstanceType<typeof NatsAdapter>["opts"] & DurableNatsOptions;

	constructor(url: string, opts: DurableNatsOptions) {
		assertPatchable(PATCHES.natsChannels, NatsAdapter.prototype);
		super({
			...opts,
			nats: {
				url,
				connectionOptions: { maxReconnectAttempts: -1, reconnectTimeWait: 500 },
				streamConfig: { num_replicas: opts.streamReplicas },
				consumerOptions: {
					config: {
						deliver_policy: "all",
						ack_wait: ACK_WAIT_MS * 1e6,
						num_replicas: opts.streamReplicas
					}
				}
			}
		} as never);
		this.failures = new FailureCounts(this.opts);
	}

	private readonly failures: FailureCounts;
	/** Per subscription (`chan.id`), the handlers running and the messages held back for a free one. */
	private readonly slots = new Map<string, { running: number; waiting: HeldMessage[] }>();
	private keepAlive?: NodeJS.Timeout;

	// The stock adapter takes headers as a plain object (its typings say otherwise).
	override async publish(
		channelName: string,
		payload: unknown,
		opts?: object | null
	): Promise<void> {
		if (this.stopping)
			throw new Error(`Not published to '${channelName}': the channel adapter is stopping`);
		// A dead letter keeps the time its message was first published.
		const headers: Record<string, string> = {
			[PUBLISHED_AT]: new Date().toISOString(),
			...(opts as { headers?: Record<string, string> } | null)?.headers
		};
		// A replay carries its event's id too, but must not be taken for a repeat of the original.
		const msgID =
			headers[DEAD_LETTER.id] ?? (headers[REPLAY_GROUP] ? undefined : headers[EVENT_ID]);
		// The stock adapter turns the headers object into NATS headers in place: one object per call.
		const publishOpts = () =>
			({ ...opts, headers: { ...headers }, ...(msgID ? { msgID } : {}) }) as never;
		try {
			await super.publish(channelName, payload, publishOpts());
		} catch (err) {
			// JetStream answers 503 ("no responders") when no stream takes the subject.
			if ((err as { code?: string }).code !== "503") throw err;
			await this.createStream(channelName.split(".").join("_"), [channelName], {} as never);
			await super.publish(channelName, payload, publishOpts());
		}
	}

	/**
	 * Nodes of one group starting at once all find its durable consumer missing and create it; the
	 * server refuses all creations but the first (10013, "consumer name already in use"), and the
	 * stock adapter logs that as an ERROR and fails the subscription. The consumer exists by then, so
	 * the subscription is made again, joining it, before the stock adapter sees the refusal.
	 */
	override async connect(): Promise<void> {
		await super.connect();
		const client = this.client;
		const subscribe = client.subscribe.bind(client);
		client.subscribe = async (subject, opts) => {
			const config = (opts as { config: ConsumerConfig }).config;
			config.max_ack_pending = (config.max_ack_pending ?? 0) + this.opts.maxWaiting;
			let subscription;
			try {
				subscription = await subscribe(subject, opts);
			} catch (err) {
				if ((err as NatsError).api_error?.err_code !== 10013) throw err;
				this.logger.info(`'${subject}': another node created the consumer first; joining it`);
				subscription = await subscribe(subject, opts);
			}
			// Not awaited: a start (with many channels, or racing a restarting server) waits for no more
			// requests than the stock adapter's; a consumer left as it was works, only with less room.
			this.keepAckPending(subject, config).catch(err =>
				this.logger.warn(`'${subject}': max_ack_pending not updated yet:`, (err as Error).message)
			);
			return subscription;
		};
		this.keepAlive = setInterval(() => this.keepWaitingAlive(), ACK_WAIT_MS / 2);
		this.keepAlive.unref();
	}

	override async disconnect(): Promise<void> {
		clearInterval(this.keepAlive);
		await super.disconnect();
	}

	/** A consumer created before `maxWaiting` (or with another value) is updated to it (at the next start, if this fails). */
	private async keepAckPending(subject: string, wanted: ConsumerConfig): Promise<void> {
		const stream = subject.split(".").join("_");
		const { config } = await this.manager.consumers.info(stream, wanted.durable_name as string);
		if (config.max_ack_pending === wanted.max_ack_pending) return;
		await this.manager.consumers.update(stream, wanted.durable_name as string, {
			max_ack_pending: wanted.max_ack_pending
		});
	}

	/** The messages held back for a free handler are still being worked on: not to be redelivered. */
	private keepWaitingAlive(): void {
		for (const { waiting } of this.slots.values())
			for (const { message } of waiting) message.working();
	}

	/** Has `group` acknowledged every message of `channels` published before `before`? */
	async caughtUp(channels: string[], group: string, before: Date): Promise<boolean> {
		for (const channel of channels) {
			const { oldestAt } = await this.waiting(channel, group);
			if (oldestAt !== undefined && oldestAt < before.getTime()) return false;
		}
		return true;
	}

	/** How many messages of `channel` `group` has not acknowledged, and when the oldest was published. */
	async waiting(channel: string, group: string): Promise<Waiting> {
		const stream = channel.split(".").join("_");
		const info = await this.manager.consumers.info(stream, group.split(".").join("_"));
		const count = info.num_pending + info.num_ack_pending;
		if (count === 0) return { count };
		// Everything up to the ack floor is acknowledged: the next message is the oldest waiting one.
		const oldest = await this.manager.streams.getMessage(stream, {
			seq: info.ack_floor.stream_seq + 1
		});
		const publishedAt = oldest.header?.get(PUBLISHED_AT);
		return { count, oldestAt: (publishedAt ? new Date(publishedAt) : oldest.time).getTime() };
	}

	override createConsumerHandler(
		chan: Chan
	): (err: NatsError | null, message: JsMsg | null) => Promise<void> {
		return async (err, message) => {
			if (chan.unsubscribing || !message) return;
			if (err) return void this.logger.error(err);
			const replayTo = message.headers?.get(REPLAY_GROUP);
			if (replayTo && replayTo !== chan.group) return message.ack();
			// Stopped while it waited: the handler it was given goes to the next one waiting.
			if (!(await this.handlerFree(chan, message))) return this.handlerDone(chan);
			this.addChannelActiveMessages(chan.id, [message.seq]);
			try {
				message.working();
				await chan.handler(this.serializer.deserialize(Buffer.from(message.data)), message);
				message.ack();
				this.failures.forget(`${chan.id}:${message.seq}`);
			} catch (error) {
				await this.failed(chan, message, error as Error);
			} finally {
				this.removeChannelActiveMessages(chan.id, [message.seq]);
				this.handlerDone(chan);
			}
		};
	}

	/**
	 * Waits for one of the subscription's `maxInFlight` handlers to be free; false when it stopped
	 * meanwhile (the message, unacknowledged, goes to another node after `ack_wait`).
	 */
	private async handlerFree(chan: Chan, message: JsMsg): Promise<boolean> {
		let slots = this.slots.get(chan.id);
		if (!slots) this.slots.set(chan.id, (slots = { running: 0, waiting: [] }));
		if (slots.running < (chan.maxInFlight ?? 1)) {
			slots.running++;
			return true;
		}
		await new Promise<void>(start => slots.waiting.push({ message, start }));
		return !chan.unsubscribing;
	}

	/** Hands the freed handler to the message held back longest (it keeps the slot). */
	private handlerDone(chan: Chan): void {
		const slots = this.slots.get(chan.id);
		if (!slots) return;
		const next = slots.waiting.shift();
		if (next) return next.start();
		if (--slots.running === 0 && chan.unsubscribing) this.slots.delete(chan.id);
	}

	/**
	 * Redelivered later, or, once the handler has failed it more than `maxRetries` times for itself,
	 * moved to the dead letters (and only then acknowledged).
	 */
	private async failed(chan: Chan, message: JsMsg, error: Error): Promise<void> {
		this.metricsIncrement("moleculer.channels.messages.errors.total", chan);
		const verdict = this.failures.failed(`${chan.id}:${message.seq}`, error, chan.maxRetries ?? 0);
		if (!verdict.giveUp) {
			this.logger.warn(
				`'${chan.name}' (${chan.group}) failed${verdict.transient ? " (unavailable)" : ` (${verdict.tries} of ${(chan.maxRetries ?? 0) + 1})`}, retrying in ${verdict.delayMs / 1000} s:`,
				error.message
			);
			this.metricsIncrement("moleculer.channels.messages.retries.total", chan);
			return message.nak(verdict.delayMs);
		}
		if (!chan.deadLettering.enabled) {
			this.logger.error(
				`'${chan.name}' (${chan.group}) gave up after ${verdict.tries} tries; dropped:`,
				error.message
			);
			return message.ack();
		}
		const headers: Record<string, string> = {};
		for (const [key, values] of message.headers ?? []) headers[key] = values[0];
		try {
			await this.publish(chan.deadLettering.queueName, message.data, {
				raw: true,
				headers: deadLetterHeaders(headers, chan, error, verdict.tries)
			});
		} catch (moveError) {
			this.logger.error(
				`'${chan.name}' (${chan.group}) could not be dead-lettered; retrying later:`,
				(moveError as Error).message
			);
			return message.nak(this.opts.maxRetryDelayMs);
		}
		this.logger.error(
			`'${chan.name}' (${chan.group}) gave up after ${verdict.tries} tries; dead-lettered:`,
			error.message
		);
		this.metricsIncrement("moleculer.channels.messages.deadLettering.total", chan);
		message.ack();
	}
}
