/**
 * Transactional outbox for a service's durable events, on top of @moleculer/channels.
 *
 * `changeWithEvents` is the one way a service changes a document together with the events the
 * change causes (contracts/channels.ts): the events go into the document's own `outbox` field in the
 * same single-document write, so no crash can keep the one without the other. They are then sent to
 * their channels and pulled from the field (only those sent: a later change may have pushed more
 * meanwhile). Whatever a crash
 * or a broker outage left behind is sent again at start-up and by a retry timer, and every few
 * seconds each instance sends what has waited longer than that — also what an instance that died
 * sharing the store (MongoDB) left. Consumers apply each event once by its key, so sending twice is
 * harmless.
 */
import type { Service, ServiceBroker, ServiceSchema } from "moleculer";
import type { OutboxEvent } from "../contracts/channels";
import { encodeTime } from "ulid";
import { EVENT_ID } from "../lib/channels/redelivery";
import { onScrape, SERIES, type Sample } from "../lib/ops/metrics";
import { traceHeaders } from "../lib/ops/tracing";
import type { Collection, IndexSpec, Query } from "./db.mixin";

/**
 * The index a collection with an outbox declares: event ids are ULIDs, so the sweep finds the
 * documents whose events are older than a moment without reading the others.
 */
export const OUTBOX_INDEX: IndexSpec = { fields: { "outbox.id": 1 }, sparse: true };

export interface WithOutbox {
	_id: string;
	outbox?: OutboxEvent[];
}

/**
 * A change of one document: a new document (refused when its id or a unique field is taken), or an
 * update of the document `filter` names (refused when the filter, with its conditions, matches none).
 */
export type Change<T extends WithOutbox> =
	{ insert: T } | { filter: Query & { _id: string }; update: object };

/**
 * What a writer does after its change and before the events are sent (`run`), and a further update
 * of the document written together with the sent events' removal from the outbox: one write, not two.
 */
export interface Finish {
	run(): Promise<void>;
	filter: Query & { _id: string };
	update: object;
}

export interface OutboxMethods {
	/**
	 * Writes `change` and records `events` in the same single-document write, then runs `finish` and
	 * sends them (failures are left for the retry timer), then writes `finish`'s update. False, with
	 * nothing written or sent, when the change was refused.
	 */
	changeWithEvents<T extends WithOutbox>(
		change: Change<T>,
		events: OutboxEvent[],
		finish?: Finish
	): Promise<boolean>;
	/**
	 * `changeWithEvents` without the sending: the write and `finish.run`, answering how to send (and
	 * then write `finish`'s update), for a writer that holds a lock to send after releasing it — a
	 * channel that hangs then holds up no other writer. False when the change was refused.
	 */
	recordWithEvents<T extends WithOutbox>(
		change: Change<T>,
		events: OutboxEvent[],
		finish?: Finish
	): Promise<Send | false>;
}

/**
 * Sends the events a change recorded, then writes `finish`'s update with their removal from the
 * outbox; `finished`: a later change already did `finish`'s part, so only the removal is written.
 */
export type Send = (finished?: boolean) => Promise<void>;

type OutboxThis = Service &
	OutboxMethods & {
		store: Collection<WithOutbox>;
		flushOutbox(doc: WithOutbox, finish?: Finish): Promise<void>;
		outboxTimer?: NodeJS.Timeout;
		outboxSweep?: NodeJS.Timeout;
		outboxStopped: boolean;
		/** Takes back the outbox's gauge when the service stops. */
		outboxScrape?: () => void;
		sendOutbox(doc: WithOutbox, finish?: Finish): Promise<void>;
		retryOutbox(query?: Query): Promise<void>;
		scheduleOutboxRetry(delayMs: number): void;
	};

const RETRY_MS = 1000;

/**
 * `events` with the trace context of the handler running (lib/ops/tracing.ts), as they are recorded:
 * each then carries the trace of what recorded it, whenever it is sent.
 */
export function traced<E extends OutboxEvent>(events: E[]): E[] {
	const headers = traceHeaders();
	return headers ? events.map(event => ({ ...event, headers })) : events;
}

/**
 * Sends one recorded event to its channel, with its trace headers and its id: the channel stores a
 * repeat once (NATS' Nats-Msg-Id), and a consumer applies it once by that id.
 */
export function sendEvent(broker: ServiceBroker, event: OutboxEvent): Promise<void> {
	// @moleculer/channels adds `sendToChannel` to the broker; Moleculer's types do not know it.
	const channels = broker as unknown as {
		sendToChannel(
			channel: string,
			payload: unknown,
			opts: { headers: Record<string, string> }
		): Promise<void>;
	};
	return channels.sendToChannel(event.channel, event.payload, {
		headers: { ...event.headers, [EVENT_ID]: event.id }
	});
}

/** The events documents of `store` hold in their outboxes, unpublished: a gauge's sample. */
export async function outboxSample<T extends WithOutbox>(store: Collection<T>): Promise<Sample> {
	const waiting = await store.find({ query: { "outbox.0": { $exists: true } } });
	return {
		name: SERIES.outboxPending,
		value: waiting.reduce((sum, doc) => sum + (doc.outbox?.length ?? 0), 0)
	};
}

/** How often, and after how long, events still in an outbox are sent again. */
const SWEEP_MS = 5000;

const schema: ServiceSchema<object, object, object, OutboxThis> = {
	name: "outbox",
	methods: {
		async changeWithEvents<T extends WithOutbox>(
			this: OutboxThis,
			change: Change<T>,
			events: OutboxEvent[],
			finish?: Finish
		) {
			const send = await this.recordWithEvents(change, events, finish);
			if (!send) return false;
			await send();
			return true;
		},

		async recordWithEvents<T extends WithOutbox>(
			this: OutboxThis,
			change: Change<T>,
			events: OutboxEvent[],
			finish?: Finish
		) {
			const outbox = events.length ? traced(events) : undefined;
			const written =
				"insert" in change
					? await this.store.insertUnique({ ...change.insert, ...(outbox ? { outbox } : {}) })
					: (await this.store.update(
							change.filter,
							outbox ? { ...change.update, $push: { outbox: { $each: outbox } } } : change.update
						)) > 0;
			if (!written) return false;
			await finish?.run();
			const doc = { _id: "insert" in change ? change.insert._id : change.filter._id, outbox };
			return (finished = false) => this.flushOutbox(doc, finished ? undefined : finish);
		},

		/** Sends the events a just-written document carries; failures are left for the retry timer. */
		async flushOutbox(this: OutboxThis, doc: WithOutbox, finish?: Finish) {
			try {
				await this.sendOutbox(doc, finish);
			} catch (err) {
				this.logger.warn(`Events of ${doc._id} not sent yet, retrying:`, (err as Error).message);
				this.scheduleOutboxRetry(RETRY_MS);
				if (finish) await this.store.update(finish.filter, finish.update);
			}
		},

		/** Sends the document's events, then removes them from its outbox (with `finish`'s update, when given). */
		async sendOutbox(this: OutboxThis, doc: WithOutbox, finish?: Finish) {
			const sent = doc.outbox ?? [];
			for (const event of sent) await sendEvent(this.broker, event);
			const pull = sent.length
				? { $pull: { outbox: { id: { $in: sent.map(e => e.id) } } } }
				: undefined;
			if (!pull && !finish) return;
			const matched = await this.store.update(finish?.filter ?? { _id: doc._id }, {
				...finish?.update,
				...pull
			});
			// A later writer changed the document first (and did `finish`'s part): the events are still sent.
			if (!matched && finish && pull) await this.store.update({ _id: doc._id }, pull);
		},

		async retryOutbox(this: OutboxThis, query: Query = { "outbox.0": { $exists: true } }) {
			if (this.outboxStopped) return;
			try {
				const waiting = await this.store.find({ query, sort: ["_id"] });
				for (const doc of waiting) await this.sendOutbox(doc);
			} catch (err) {
				this.logger.warn("Outbox retry failed:", (err as Error).message);
				this.scheduleOutboxRetry(RETRY_MS);
			}
		},

		scheduleOutboxRetry(this: OutboxThis, delayMs: number) {
			if (this.outboxTimer || this.outboxStopped) return;
			this.outboxTimer = setTimeout(() => {
				this.outboxTimer = undefined;
				void this.retryOutbox();
			}, delayMs);
		}
	},

	started(this: OutboxThis) {
		this.outboxStopped = false;
		this.outboxScrape = onScrape(this.broker, async () => [await outboxSample(this.store)]);
		// The channel adapter connects after the services have started: send leftovers right after.
		this.scheduleOutboxRetry(0);
		// Ids below this prefix were minted more than SWEEP_MS ago (a ULID starts with its time).
		this.outboxSweep = setInterval(
			() => void this.retryOutbox({ "outbox.id": { $lt: encodeTime(Date.now() - SWEEP_MS, 10) } }),
			SWEEP_MS
		);
	},

	stopped(this: OutboxThis) {
		this.outboxStopped = true;
		this.outboxScrape?.();
		clearTimeout(this.outboxTimer);
		clearInterval(this.outboxSweep);
	}
};

// Mixins are typed against the service that includes them; Moleculer's `mixins` field is not.
export const OutboxMixin = schema as unknown as Partial<ServiceSchema>;
