/**
 * The channel layer the simulator controls: a @moleculer/channels adapter that only queues. A
 * message waits for each consumer group of its channel (at-least-once, like the real adapters)
 * until the simulator hands it to the group's handler; the simulator picks which waiting message
 * goes next (any channel, any age: delays and reorders), may hand the same one over twice at once
 * (a duplicate) and may lose the acknowledgement after the handler ran (a redelivery). A handler
 * that fails leaves its message waiting. The adapter itself never fails: it stands for a durable
 * broker (JetStream) that outlives the services' restarts.
 */
import { Adapters } from "@moleculer/channels";
import type { Channel } from "@moleculer/channels/types/src";
import type { ServiceBroker } from "moleculer";
import { REPLAY_GROUP } from "../lib/channels/redelivery";

const BaseAdapter = Adapters.Base;

export interface SimMessage {
	/** Publishing order. */
	seq: number;
	channel: string;
	payload: unknown;
	headers?: Record<string, string>;
	/** The simulated clock when it was published. */
	publishedAt: number;
	/** Groups that have not acknowledged it yet. */
	pending: Set<string>;
}

/** One message for one group: what the simulator delivers. */
export interface Delivery {
	msg: SimMessage;
	group: string;
}

/** How a delivery goes: normally; the handler runs but its acknowledgement is lost; two handlers at once. */
export type DeliveryMode = "normal" | "ack-lost" | "duplicate";

export class SimChannels extends BaseAdapter {
	declare broker: ServiceBroker;
	private seq = 0;
	private readonly messages = new Map<number, SimMessage>();
	private readonly groups = new Map<string, Set<string>>();
	private readonly consumers = new Map<string, Channel>();
	private readonly inFlight = new Set<string>();
	/** How many times each message failed for each group, for the trace and the stuck check. */
	readonly failures = new Map<string, { count: number; error: string }>();

	constructor(private readonly clock: { now: number }) {
		super({});
	}

	override async connect(): Promise<void> {
		// Every local service's groups are known before anything is published, as with the embedded adapter.
		for (const service of this.broker.services)
			for (const [name, def] of Object.entries(service.schema.channels ?? {}))
				this.groupsOf(this.addPrefixTopic(name)).add(
					(def as { group?: string }).group ?? service.fullName
				);
		this.connected = true;
	}

	override async disconnect(): Promise<void> {
		this.connected = false;
	}

	override async subscribe(chan: Channel): Promise<void> {
		this.groupsOf(chan.name).add(chan.group);
		this.consumers.set(`${chan.name}|${chan.group}`, chan);
	}

	override async unsubscribe(chan: Channel): Promise<void> {
		const key = `${chan.name}|${chan.group}`;
		if (this.consumers.get(key) === chan) this.consumers.delete(key);
	}

	override async publish(
		channelName: string,
		payload: unknown,
		opts: { headers?: Record<string, string> } = {}
	): Promise<void> {
		const replayTo = opts.headers?.[REPLAY_GROUP];
		const groups = replayTo ? [replayTo] : [...this.groupsOf(channelName)];
		const msg: SimMessage = {
			seq: ++this.seq,
			channel: channelName,
			payload: structuredClone(payload),
			headers: opts.headers,
			publishedAt: this.clock.now,
			pending: new Set(groups)
		};
		if (groups.length) this.messages.set(msg.seq, msg);
	}

	/** What could be delivered now: waiting for a subscribed group, not in that group's hands already. */
	deliverable(): Delivery[] {
		const out: Delivery[] = [];
		for (const msg of this.messages.values())
			for (const group of msg.pending)
				if (
					this.consumers.has(`${msg.channel}|${group}`) &&
					!this.inFlight.has(`${msg.seq}|${group}`)
				)
					out.push({ msg, group });
		return out;
	}

	/** Messages some group has still to acknowledge. */
	backlog(): number {
		return this.messages.size;
	}

	/** Hands `delivery` to its group's handler as `mode` says; resolves when the handlers are done. */
	async deliver({ msg, group }: Delivery, mode: DeliveryMode): Promise<void> {
		const key = `${msg.seq}|${group}`;
		this.inFlight.add(key);
		try {
			const runs =
				mode === "duplicate"
					? [this.run(msg, group), this.run(msg, group)]
					: [this.run(msg, group)];
			const outcomes = await Promise.all(runs);
			if (outcomes.some(ok => ok) && mode !== "ack-lost") this.ack(msg, group);
		} finally {
			this.inFlight.delete(key);
		}
	}

	private async run(msg: SimMessage, group: string): Promise<boolean> {
		const chan = this.consumers.get(`${msg.channel}|${group}`);
		if (!chan) return false;
		const payload = structuredClone(msg.payload);
		try {
			await chan.handler(payload, { id: String(msg.seq), payload, headers: msg.headers });
			this.failures.delete(`${msg.seq}|${group}`);
			return true;
		} catch (err) {
			const key = `${msg.seq}|${group}`;
			this.failures.set(key, {
				count: (this.failures.get(key)?.count ?? 0) + 1,
				error: (err as Error).message
			});
			return false;
		}
	}

	private ack(msg: SimMessage, group: string): void {
		msg.pending.delete(group);
		if (!msg.pending.size) this.messages.delete(msg.seq);
	}

	/** Billing closes a month only once its group has handled every deal event published before then. */
	async caughtUp(channels: string[], group: string, before: Date): Promise<boolean> {
		for (const msg of this.messages.values())
			if (
				channels.includes(msg.channel) &&
				msg.pending.has(group) &&
				msg.publishedAt < before.getTime()
			)
				return false;
		return true;
	}

	private groupsOf(channel: string): Set<string> {
		let groups = this.groups.get(channel);
		if (!groups) this.groups.set(channel, (groups = new Set()));
		return groups;
	}
}
