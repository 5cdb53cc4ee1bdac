/**
 * Transactional outbox for a service's durable events, on top of @moleculer/channels.
 *
 * A document and the events its change causes are written together: the events go into the
 * document's own `outbox` field in the same single-document write, so no crash can keep the one
 * without the other. They are then sent to their channels and pulled from the field (only those
 * sent: a later change may have pushed more meanwhile). Whatever a crash
 * or a broker outage left behind is sent again at start-up and by a retry timer; consumers apply each
 * event once by its key, so sending twice is harmless.
 */
import type { Service, ServiceSchema } from "moleculer";
import type { OutboxEvent } from "../contracts/channels";
import type { Collection } from "./db.mixin";

/** The update that records further events on a document that may still hold unsent ones. */
export function pushEvents(...events: OutboxEvent[]): object {
	return { $push: { outbox: { $each: events } } };
}

export interface WithOutbox {
	_id: string;
	outbox?: OutboxEvent[];
}

export interface OutboxMethods {
	/** Sends the events a just-written document carries; failures are left for the retry timer. */
	flushOutbox(doc: WithOutbox): Promise<void>;
}

type OutboxThis = Service & OutboxMethods & {
	store: Collection<WithOutbox>;
	outboxTimer?: NodeJS.Timeout;
	outboxStopped: boolean;
	sendOutbox(doc: WithOutbox): Promise<void>;
	retryOutbox(): Promise<void>;
	scheduleOutboxRetry(delayMs: number): void;
};

const RETRY_MS = 1000;

const schema: ServiceSchema<object, object, object, OutboxThis> = {
	name: "outbox",
	methods: {
		async flushOutbox(this: OutboxThis, doc: WithOutbox) {
			try {
				await this.sendOutbox(doc);
			} catch (err) {
				this.logger.warn(`Events of ${doc._id} not sent yet, retrying:`, (err as Error).message);
				this.scheduleOutboxRetry(RETRY_MS);
			}
		},

		async sendOutbox(this: OutboxThis, doc: WithOutbox) {
			if (!doc.outbox?.length) return;
			const broker = this.broker as unknown as { sendToChannel(channel: string, payload: unknown): Promise<void> };
			for (const event of doc.outbox) await broker.sendToChannel(event.channel, event.payload);
			await this.store.update({ _id: doc._id }, { $pull: { outbox: { id: { $in: doc.outbox.map(e => e.id) } } } });
		},

		async retryOutbox(this: OutboxThis) {
			if (this.outboxStopped) return;
			try {
				const waiting = await this.store.find({ query: { "outbox.0": { $exists: true } }, sort: ["_id"] });
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
		// The channel adapter connects after the services have started: send leftovers right after.
		this.scheduleOutboxRetry(0);
	},

	stopped(this: OutboxThis) {
		this.outboxStopped = true;
		clearTimeout(this.outboxTimer);
	}
};

// Mixins are typed against the service that includes them; Moleculer's `mixins` field is not.
export const OutboxMixin = schema as unknown as Partial<ServiceSchema>;
