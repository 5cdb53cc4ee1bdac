import { isTransient } from "../errors";
import { sortableId } from "../ids";

/**
 * What both channel adapters share about failed messages: which failures count toward dead-lettering
 * and how long to wait before the next try, and the headers a dead letter carries so that an
 * operator can see it and replay it.
 */

export interface RetryOptions {
	/**
	 * Failures of the handler's own (not a dependency unavailable) after the first, before a message
	 * is dead-lettered.
	 */
	maxRetries: number;
	/** The wait before the first retry; doubled for each further one. */
	retryDelayMs: number;
	/** The longest wait between two tries. */
	maxRetryDelayMs: number;
}

/** The wait before retry number `retry` (1, 2, …): 1 s, 2 s, 4 s … up to the cap. */
export function retryDelay(
	retry: number,
	opts: Pick<RetryOptions, "retryDelayMs" | "maxRetryDelayMs">
): number {
	return Math.min(opts.retryDelayMs * 2 ** Math.max(0, retry - 1), opts.maxRetryDelayMs);
}

/** Headers of a dead letter (beside the original message's own). */
export const DEAD_LETTER = {
	/** A unique id, so that a dead letter delivered twice is stored once. */
	id: "x-dead-letter-id",
	channel: "x-original-channel",
	group: "x-original-group",
	error: "x-error-message",
	tries: "x-tries"
} as const;

/** When a message was published, by the publishing node's clock (ISO). */
export const PUBLISHED_AT = "x-published-at";

/** A replayed message goes to this consumer group only; the channel's other groups skip it. */
export const REPLAY_GROUP = "x-replay-group";

/**
 * The headers a message is dead-lettered with: its own, less a replay's target (a replayed message
 * that fails again is a new dead letter, for the dead-letter channel's own groups), and why it failed.
 */
export function deadLetterHeaders(
	own: Record<string, string>,
	chan: { name: string; group: string },
	error: Error,
	tries: number
): Record<string, string> {
	const { [REPLAY_GROUP]: _replayedTo, ...headers } = own;
	return {
		...headers,
		[DEAD_LETTER.id]: sortableId(),
		[DEAD_LETTER.channel]: chan.name,
		[DEAD_LETTER.group]: chan.group,
		[DEAD_LETTER.error]: error.message,
		[DEAD_LETTER.tries]: String(tries)
	};
}

/**
 * The outbox event a message carries (its id, a ULID): the NATS adapter publishes it as `Nats-Msg-Id`,
 * so a publish retried after a lost acknowledgement is stored once within the stream's duplicate window.
 */
export const EVENT_ID = "x-event-id";

/** What a consumer does after its handler failed a message. */
export interface Verdict {
	/** Dead-letter it (or drop it, without dead letters): it failed more than `maxRetries` times. */
	giveUp: boolean;
	/** Otherwise, try it again after this long. */
	delayMs: number;
	/** How many times the handler has failed it for itself (not for a dependency unavailable). */
	tries: number;
	transient: boolean;
}

/**
 * A consumer's count of its handler's failures per message (by its id in the channel: a stream
 * sequence, a stored message's id). Only the handler's own failures count toward `maxRetries`: a
 * dependency that is unavailable ({@link isTransient}) is waited out with the same growing delays,
 * however long it takes, and a message that merely waited (a slow or paused consumer, whose
 * messages JetStream redelivers at each `ack_wait`) has not failed at all.
 */
export class FailureCounts {
	private readonly byMessage = new Map<
		string,
		{ tries: number; attempts: number; notBefore: number }
	>();
	private prunedAt = 0;

	constructor(private readonly opts: Pick<RetryOptions, "retryDelayMs" | "maxRetryDelayMs">) {}

	/** Records a failure of message `id` at `now`, and says what to do with the message. */
	failed(id: string, err: unknown, maxRetries: number, now = Date.now()): Verdict {
		this.forgetStale(now);
		const counted = this.byMessage.get(id) ?? { tries: 0, attempts: 0, notBefore: now };
		const transient = isTransient(err);
		const tries = counted.tries + (transient ? 0 : 1);
		const attempts = counted.attempts + 1;
		const delayMs = retryDelay(attempts, this.opts);
		const giveUp = tries > maxRetries;
		if (giveUp) this.byMessage.delete(id);
		else this.byMessage.set(id, { tries, attempts, notBefore: now + delayMs });
		return { giveUp, delayMs, tries, transient };
	}

	/** Before when message `id` waits for its next try (none: it may be tried now). */
	notBefore(id: string): number | undefined {
		return this.byMessage.get(id)?.notBefore;
	}

	/** The message is done with (handled, dead-lettered or dropped). */
	forget(id: string): void {
		this.byMessage.delete(id);
	}

	/**
	 * A message retried on another node of the group (JetStream redelivers to any) is never done
	 * with here: its count is dropped once it is long past its retry.
	 */
	private forgetStale(now: number): void {
		if (now - this.prunedAt < this.opts.maxRetryDelayMs) return;
		this.prunedAt = now;
		const staleBefore = now - 10 * this.opts.maxRetryDelayMs;
		for (const [id, { notBefore }] of this.byMessage)
			if (notBefore < staleBefore) this.byMessage.delete(id);
	}
}
