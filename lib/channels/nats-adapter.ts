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
import type { JetStreamClient, JetStreamManager, JsMsg, NatsError } from "nats";
import type { Waiting } from "../ops/metrics";
import { assertPatchable, PATCHES } from "../patches";
import {
	deadLetterHeaders,
	PUBLISHED_AT,
	REPLAY_GROUP,
	retryDelay,
	type RetryOptions
} from "./redelivery";

const NatsAdapter = Adapters.NATS;

type Chan = Channel & {
	unsubscribing?: boolean;
	deadLettering: { enabled: boolean; queueName: string };
};

export interface DurableNatsOptions extends RetryOptions {
	maxInFlight: number;
	/** Replicas of each stream and consumer: 3 on a three-server cluster, 1 on a single server. */
	streamReplicas: number;
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
						ack_wait: 10_000_000_000,
						num_replicas: opts.streamReplicas
					}
				}
			}
		} as never);
	}

	// The stock adapter takes headers as a plain object (its typings say otherwise).
	override async publish(
		channelName: string,
		payload: unknown,
		opts?: object | null
	): Promise<void> {
		if (this.stopping)
			throw new Error(`Not published to '${channelName}': the channel adapter is stopping`);
		// A dead letter keeps the time its message was first published.
		const headers = {
			[PUBLISHED_AT]: new Date().toISOString(),
			...(opts as { headers?: Record<string, string> } | null)?.headers
		};
		try {
			await super.publish(channelName, payload, { ...opts, headers } as never);
		} catch (err) {
			// JetStream answers 503 ("no responders") when no stream takes the subject.
			if ((err as { code?: string }).code !== "503") throw err;
			await this.createStream(channelName.split(".").join("_"), [channelName], {} as never);
			await super.publish(channelName, payload, { ...opts, headers } as never);
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
			try {
				return await subscribe(subject, opts);
			} catch (err) {
				if ((err as NatsError).api_error?.err_code !== 10013) throw err;
				this.logger.info(`'${subject}': another node created the consumer first; joining it`);
				return subscribe(subject, opts);
			}
		};
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
			this.addChannelActiveMessages(chan.id, [message.seq]);
			try {
				message.working();
				await chan.handler(this.serializer.deserialize(Buffer.from(message.data)), message);
				message.ack();
			} catch (error) {
				await this.failed(chan, message, error as Error);
			} finally {
				this.removeChannelActiveMessages(chan.id, [message.seq]);
			}
		};
	}

	/** Redelivered later, or after the last retry moved to the dead letters (and only then acknowledged). */
	private async failed(chan: Chan, message: JsMsg, error: Error): Promise<void> {
		this.metricsIncrement("moleculer.channels.messages.errors.total", chan);
		// The first delivery counts 1: `tries` is how many times the handler has failed it.
		const tries = message.info.redeliveryCount;
		if (tries <= (chan.maxRetries ?? 0)) {
			this.logger.warn(
				`'${chan.name}' (${chan.group}) failed, retry ${tries} in ${retryDelay(tries, this.opts) / 1000} s:`,
				error.message
			);
			this.metricsIncrement("moleculer.channels.messages.retries.total", chan);
			return message.nak(retryDelay(tries, this.opts));
		}
		if (!chan.deadLettering.enabled) {
			this.logger.error(
				`'${chan.name}' (${chan.group}) gave up after ${tries} tries; dropped:`,
				error.message
			);
			return message.ack();
		}
		const headers: Record<string, string> = {};
		for (const [key, values] of message.headers ?? []) headers[key] = values[0];
		try {
			await this.publish(chan.deadLettering.queueName, message.data, {
				raw: true,
				headers: deadLetterHeaders(headers, chan, error, tries)
			});
		} catch (moveError) {
			this.logger.error(
				`'${chan.name}' (${chan.group}) could not be dead-lettered; retrying later:`,
				(moveError as Error).message
			);
			return message.nak(this.opts.maxRetryDelayMs);
		}
		this.logger.error(
			`'${chan.name}' (${chan.group}) gave up after ${tries} tries; dead-lettered:`,
			error.message
		);
		this.metricsIncrement("moleculer.channels.messages.deadLettering.total", chan);
		message.ack();
	}
}
