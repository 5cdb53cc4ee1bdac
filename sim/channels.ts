/**
 * The channel layer the simulator controls: a @moleculer/channels adapter that only queues. A
 * message waits for each consumer group of its channel (at-least-once, like the real adapters)
 * until the simulator hands it to the group's handler; the simulator picks which waiting message
 * goes next (any channel, any age: delays and reorders), may hand the same one over twice at once
 * (a duplicate) and may lose the acknowledgement after the handler ran (a redelivery). It may also
 * make a group's dependency unavailable for a while: its handler then fails with the errors
 * production code meets (a store or a service that does not answer) before it runs.
 *
 * What follows a failure is decided by the production code (lib/channels/redelivery.ts), as in the
 * real adapters: the message waits out the retry delay on the simulated clock, an unavailable
 * dependency is retried for as long as it lasts, and a message the handler itself failed more than
 * `maxRetries` times is dead-lettered. Each consumer (a service instance) keeps its own counts, which
 * a restarted instance starts afresh, as a restarted node does.
 *
 * The adapter stands for a durable broker (JetStream) that outlives the services' restarts: it never
 * loses a message, but a publish may fail as with the broker down (nothing stored) or be stored and
 * answered with an error (its acknowledgement lost), as many publishes as the simulator asks.
 */
import { Adapters } from "@moleculer/channels";
import type { Channel } from "@moleculer/channels/types/src";
import { Errors, type ServiceBroker } from "moleculer";
import mongoose from "mongoose";
import { CHANNEL_OPTIONS } from "../config/broker";
import { unavailable } from "../lib/errors";
import { deadLetterHeaders, FailureCounts, REPLAY_GROUP } from "../lib/channels/redelivery";

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

/** How a handler's dependency is unavailable: the error its handler fails with. */
export const UNAVAILABLE = {
	/** As mixins/db.mixin.ts answers a store that did not answer in time. */
	store: () =>
		unavailable(
			"STORE_UNAVAILABLE",
			"The store did not answer in time (simulated); try again later",
			5
		),
	/** Mongoose waiting for a lost connection (a store call outside `Collection`). */
	mongoose: () => new mongoose.Error("Operation `sim.find()` buffering timed out after 5000ms"),
	/** A call that was not answered in time. */
	timeout: () => new Errors.RequestTimeoutError({ action: "sim.call", nodeID: "sim" }),
	/** A call whose every endpoint's breaker is open. */
	breaker: () => new Errors.ServiceNotAvailableError({ action: "sim.call", nodeID: "sim" })
} as const;

/** A group's dependency unavailable from the delivery that meets it, for `forMs` of the simulated clock (0: that delivery only). */
export interface Outage {
	kind: keyof typeof UNAVAILABLE;
	forMs: number;
}

/** How the next publishes fail: nothing stored (the broker down), or stored and answered with an error. */
export type PublishFault = "down" | "unacknowledged";

interface Consumer {
	chan: Channel;
	/** The production rule of what follows a failure (per instance, as per node). */
	failures: FailureCounts;
}

export class SimChannels extends BaseAdapter {
	declare broker: ServiceBroker;
	private seq = 0;
	private readonly messages = new Map<number, SimMessage>();
	private readonly groups = new Map<string, Set<string>>();
	private readonly consumers = new Map<string, Consumer>();
	private readonly inFlight = new Set<string>();
	/** How many times each message failed for each group, and the last error: for the trace. */
	readonly failures = new Map<string, { count: number; error: string }>();
	/** Messages given up on (dead-lettered): in the simulation, always a finding. */
	readonly deadLettered: string[] = [];
	private readonly outages = new Map<string, { until: number; kind: Outage["kind"] }>();
	private publishFault?: { kind: PublishFault; left: number };

	constructor(
		private readonly clock: { now: number },
		private readonly onFault: (what: string) => void = () => undefined
	) {
		super(CHANNEL_OPTIONS);
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
		this.consumers.set(`${chan.name}|${chan.group}`, {
			chan,
			failures: new FailureCounts(CHANNEL_OPTIONS)
		});
	}

	override async unsubscribe(chan: Channel): Promise<void> {
		const key = `${chan.name}|${chan.group}`;
		if (this.consumers.get(key)?.chan === chan) this.consumers.delete(key);
	}

	/** The next `count` publishes fail as `kind` says (0: none). */
	failPublishes(count: number, kind: PublishFault = "down"): void {
		this.publishFault = count > 0 ? { kind, left: count } : undefined;
	}

	override async publish(
		channelName: string,
		payload: unknown,
		opts: { headers?: Record<string, string> } = {}
	): Promise<void> {
		const fault = this.publishFault;
		if (fault && fault.left-- > 0) {
			if (!fault.left) this.publishFault = undefined;
			if (fault.kind === "unacknowledged") this.store(channelName, payload, opts.headers);
			this.onFault(
				`publish to ${channelName} ${fault.kind === "down" ? "failed (broker down)" : "stored, then failed"}`
			);
			throw new Error(`simulated broker failure: publish to ${channelName}`);
		}
		this.store(channelName, payload, opts.headers);
	}

	private store(channelName: string, payload: unknown, headers?: Record<string, string>): void {
		const replayTo = headers?.[REPLAY_GROUP];
		const groups = replayTo ? [replayTo] : [...this.groupsOf(channelName)];
		const msg: SimMessage = {
			seq: ++this.seq,
			channel: channelName,
			payload: structuredClone(payload),
			headers,
			publishedAt: this.clock.now,
			pending: new Set(groups)
		};
		if (groups.length) this.messages.set(msg.seq, msg);
	}

	/**
	 * What could be delivered now: waiting for a subscribed group, not in that group's hands already,
	 * not waiting out a retry delay.
	 */
	deliverable(): Delivery[] {
		const out: Delivery[] = [];
		for (const msg of this.messages.values())
			for (const group of msg.pending) {
				const consumer = this.consumers.get(`${msg.channel}|${group}`);
				if (
					consumer &&
					!this.inFlight.has(`${msg.seq}|${group}`) &&
					(consumer.failures.notBefore(String(msg.seq)) ?? 0) <= this.clock.now
				)
					out.push({ msg, group });
			}
		return out;
	}

	/** When the soonest message waiting out a retry delay may be tried again (none: undefined). */
	nextRetry(): number | undefined {
		let soonest: number | undefined;
		for (const msg of this.messages.values())
			for (const group of msg.pending) {
				const at = this.consumers
					.get(`${msg.channel}|${group}`)
					?.failures.notBefore(String(msg.seq));
				if (at !== undefined && at > this.clock.now && (soonest === undefined || at < soonest))
					soonest = at;
			}
		return soonest;
	}

	/** Messages some group has still to acknowledge. */
	backlog(): number {
		return this.messages.size;
	}

	/**
	 * Hands `delivery` to its group's handler as `mode` says, its dependency unavailable from now for
	 * as long as `outage` says; resolves when the handlers are done and the failure, if any, decided,
	 * with what was decided.
	 */
	async deliver(
		{ msg, group }: Delivery,
		mode: DeliveryMode,
		outage?: Outage
	): Promise<string | undefined> {
		const key = `${msg.seq}|${group}`;
		const consumer = this.consumers.get(`${msg.channel}|${group}`);
		if (!consumer) return undefined;
		if (outage)
			this.outages.set(group, { until: this.clock.now + outage.forMs, kind: outage.kind });
		const down = this.outages.get(group);
		const unavailableAs = down && (outage || this.clock.now < down.until) ? down.kind : undefined;
		this.inFlight.add(key);
		try {
			const runs =
				mode === "duplicate"
					? [this.run(consumer, msg, unavailableAs), this.run(consumer, msg, unavailableAs)]
					: [this.run(consumer, msg, unavailableAs)];
			const errors = await Promise.all(runs);
			if (errors.some(err => err === undefined)) {
				this.failures.delete(key);
				consumer.failures.forget(String(msg.seq));
				if (mode !== "ack-lost") this.ack(msg, group);
				return undefined;
			}
			// Two handlers at once fail as one delivery: the message is decided once.
			return this.failed(consumer, msg, errors[0] as Error);
		} finally {
			this.inFlight.delete(key);
		}
	}

	/** Runs the handler (it fails first if its dependency is unavailable); its error, if it failed. */
	private async run(
		{ chan }: Consumer,
		msg: SimMessage,
		unavailableAs?: Outage["kind"]
	): Promise<Error | undefined> {
		const payload = structuredClone(msg.payload);
		try {
			if (unavailableAs) throw UNAVAILABLE[unavailableAs]();
			await chan.handler(payload, { id: String(msg.seq), payload, headers: msg.headers });
			return undefined;
		} catch (err) {
			return err as Error;
		}
	}

	/**
	 * What the production rule says after a failure: wait before trying again, or give up and
	 * dead-letter it, as both real adapters do.
	 */
	private failed({ chan, failures }: Consumer, msg: SimMessage, err: Error): string {
		const key = `${msg.seq}|${chan.group}`;
		this.failures.set(key, {
			count: (this.failures.get(key)?.count ?? 0) + 1,
			error: err.message
		});
		const verdict = failures.failed(
			String(msg.seq),
			err,
			chan.maxRetries ?? CHANNEL_OPTIONS.maxRetries,
			this.clock.now
		);
		const what = `failed${verdict.transient ? " (unavailable)" : ` (${verdict.tries})`}: ${err.message}`;
		if (!verdict.giveUp) return `${what}; retry in ${verdict.delayMs / 1000} s`;
		this.deadLettered.push(
			`${msg.channel}#${msg.seq} → ${chan.group} after ${verdict.tries} tries: ${err.message}`
		);
		this.store(
			this.addPrefixTopic(CHANNEL_OPTIONS.deadLettering.queueName),
			msg.payload,
			deadLetterHeaders(msg.headers ?? {}, chan, err, verdict.tries)
		);
		this.failures.delete(key);
		this.ack(msg, chan.group);
		return `${what}; dead-lettered`;
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
