/**
 * @moleculer/channels' NATS JetStream adapter, with the settings durability needs here:
 * - a new consumer group receives what was published before it first subscribed (`deliver_policy:
 *   "all"`): the member events published before the points node's first start are not lost;
 * - an unacknowledged message (its node was killed) is redelivered after 10 s, not 30;
 * - the connection retries forever, so a restarted nats-server is found again;
 * - a publish while the adapter is stopping fails instead of returning as if sent (the stock
 *   adapter drops it silently), so the outbox keeps the event and sends it after the restart;
 * - a publish to a channel nobody has subscribed to yet creates its stream (the stock adapter
 *   creates streams only when subscribing), so the event waits there for its first consumer.
 */
import { Adapters } from "@moleculer/channels";

const NatsAdapter = Adapters.NATS;

export class DurableNatsAdapter extends NatsAdapter {
	declare stopping: boolean;

	constructor(url: string, opts: { maxInFlight: number; maxRetries: number; deadLettering: { enabled: boolean; queueName: string } }) {
		super({
			...opts,
			nats: {
				url,
				connectionOptions: { maxReconnectAttempts: -1, reconnectTimeWait: 500 },
				consumerOptions: { config: { deliver_policy: "all", ack_wait: 10_000_000_000 } }
			}
		} as never);
	}

	override async publish(channelName: string, payload: unknown, opts?: object): Promise<void> {
		if (this.stopping) throw new Error(`Not published to '${channelName}': the channel adapter is stopping`);
		try {
			await super.publish(channelName, payload, { ...opts } as never);
		} catch (err) {
			// JetStream answers 503 ("no responders") when no stream takes the subject.
			if ((err as { code?: string }).code !== "503") throw err;
			await this.createStream(channelName.split(".").join("_"), [channelName], {} as never);
			await super.publish(channelName, payload, { ...opts } as never);
		}
	}
}
