import { sortableId } from "../ids";

/**
 * What both channel adapters share about failed messages: how long to wait before the next try,
 * and the headers a dead letter carries so that an operator can see it and replay it.
 */

export interface RetryOptions {
	/** Tries after the first before a message is dead-lettered. */
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
