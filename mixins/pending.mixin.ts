/**
 * Work recorded as `pending` before a synchronous call and settled with the call's outcome (a `use`
 * deal and its debit, an order and its payment).
 *
 * `confirm` makes the call: when it fails (timed out, breaker open, the callee gone) its outcome is
 * unknown, so the record fails as the service's `failed` says (with the events that undo the call
 * should it have happened after all) and the client gets a 503 to retry.
 *
 * `settle` moves a record out of `pending` with the events its outcome causes, in one conditional
 * write: of two instances settling the same record, one wins and the other gets the outcome that
 * stands. A record whose instance died waiting has no one to settle it: every instance sweeps
 * records pending for longer than twice the call's timeout (the caller has given up by then) and
 * settles them as the service's `abandoned` says. Sweeps may run on several instances at once; the
 * conditional write makes that harmless.
 */
import type { Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import type { OutboxEvent } from "../contracts/channels";
import { unavailable } from "../lib/errors";
import type { DbThis } from "./db.mixin";
import type { OutboxMethods, WithOutbox } from "./outbox.mixin";

export interface Pending extends WithOutbox {
	status: string;
}

export interface Outcome<T> {
	changes: Partial<T>;
	events: OutboxEvent[];
}

export interface PendingSettings extends ServiceSettingSchema {
	/** How long the synchronous call behind a pending record may take (ms); default CALL_TIMEOUT_MS. */
	pendingTimeoutMs: number;
	/** How often this instance looks for abandoned pending records (ms); default CALL_TIMEOUT_MS. */
	pendingSweepMs: number;
	/** What a 503 asks the client to wait (s); default RETRY_AFTER_SECONDS. */
	retryAfterSeconds: number;
}

export interface PendingMethods<T extends Pending> {
	/**
	 * Makes the call behind a pending record, given the timeout to call with. When it fails, the
	 * record fails with reason `code` and a 503 `code` (with `message`) is thrown.
	 */
	confirm<R>(
		record: T,
		call: (timeout: number) => Promise<R>,
		code: string,
		message: string
	): Promise<R>;
	/** Moves a pending record to its outcome; if it was settled meanwhile, that outcome stands and is returned. */
	settle(record: T, outcome: Outcome<T>): Promise<T>;
	/** Settles every record pending for longer than twice the call's timeout. */
	sweepPending(): Promise<void>;
}

type PendingThis<T extends Pending> = Service<PendingSettings> &
	DbThis<T> &
	OutboxMethods &
	PendingMethods<T> & {
		/** The outcome of a record whose call failed with `reason`; defined by the service. */
		failed(record: T, reason: string): Outcome<T>;
		/** The outcome of a record whose call was never answered; defined by the service. */
		abandoned(record: T): Outcome<T>;
		/** Told of a record this instance settled (not of one another settled first); optional. */
		settled?(record: T): void;
		pendingTimer?: NodeJS.Timeout;
	};

/** `dateField`: when the record became pending (ISO string), to tell the abandoned ones. */
export function PendingMixin<T extends Pending>(
	dateField: keyof T & string
): Partial<ServiceSchema> {
	const schema: ServiceSchema<PendingSettings, PendingMethods<T>, object, PendingThis<T>> = {
		name: "pending",
		mixins: [
			ConfiguredSettings<PendingSettings>(config => ({
				pendingTimeoutMs: config.callTimeoutMs,
				pendingSweepMs: config.callTimeoutMs,
				retryAfterSeconds: config.retryAfterSeconds
			}))
		],
		methods: {
			async confirm<R>(
				this: PendingThis<T>,
				record: T,
				call: (timeout: number) => Promise<R>,
				code: string,
				message: string
			): Promise<R> {
				try {
					return await call(this.settings.pendingTimeoutMs);
				} catch (err) {
					this.logger.warn(
						`${code}: the call for '${record._id}' failed, so it fails:`,
						(err as Error).message
					);
					await this.settle(record, this.failed(record, code));
					throw unavailable(code, message, this.settings.retryAfterSeconds, err);
				}
			},

			async settle(this: PendingThis<T>, record: T, { changes, events }: Outcome<T>): Promise<T> {
				if (
					await this.changeWithEvents(
						{ filter: { _id: record._id, status: "pending" }, update: { $set: changes } },
						events
					)
				) {
					const settled = { ...record, ...changes };
					this.settled?.(settled);
					return settled;
				}
				return (await this.store.findById(record._id)) as T;
			},

			async sweepPending(this: PendingThis<T>) {
				const cutoff = new Date(Date.now() - 2 * this.settings.pendingTimeoutMs).toISOString();
				for (const record of await this.store.find({
					query: { status: "pending", [dateField]: { $lt: cutoff } }
				})) {
					await this.settle(record, this.abandoned(record));
					this.logger.warn(`Settled '${record._id}', abandoned while pending.`);
				}
			}
		},

		started(this: PendingThis<T>) {
			// Not awaited: the store may still be connecting (mixins start in turn), and it answers
			// once it is.
			const sweep = () =>
				this.sweepPending().catch(err =>
					this.logger.warn("Sweeping pending records failed:", (err as Error).message)
				);
			void sweep();
			this.pendingTimer = setInterval(sweep, this.settings.pendingSweepMs);
		},

		stopped(this: PendingThis<T>) {
			clearInterval(this.pendingTimer);
		}
	};
	// Mixins are typed against the service that includes them; Moleculer's `mixins` field is not.
	return schema as unknown as Partial<ServiceSchema>;
}
