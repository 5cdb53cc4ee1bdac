/**
 * A write conditioned on what was read (an account's version, a deal's returned amount) loses when
 * another writer — another request here, another instance on the same store — changed the document
 * first. The loser decides again on what the winner wrote: `retryOnRace` runs an attempt until it
 * stands, waiting a random moment that grows with each loss, and gives up after `attempts`.
 */

/** What an attempt answers when its write lost the race: it wrote nothing, and is to be decided again. */
export const LOST: unique symbol = Symbol("lost the race");
export type Lost = typeof LOST;

export interface RetryOptions {
	/** How many attempts at the most. */
	attempts: number;
	/** What keeps changing, for the error after the last attempt: "<what> keeps changing concurrently". */
	what: string;
	/** The error to throw then instead of a plain one (e.g. a 503 that asks for a retry), given that message. */
	giveUp?: (message: string) => Error;
}

/** Runs `attempt` (1, 2, …) until it answers anything but `LOST`, waiting up to `attempt × 5` ms after each loss. */
export async function retryOnRace<T>(
	attempt: (n: number) => Promise<T | Lost>,
	{ attempts, what, giveUp }: RetryOptions
): Promise<T> {
	for (let n = 1; ; n++) {
		const result = await attempt(n);
		if (result !== LOST) return result as T;
		if (n >= attempts) break;
		await new Promise(resolve => setTimeout(resolve, Math.random() * n * 5));
	}
	const message = `${what} keeps changing concurrently`;
	throw giveUp ? giveUp(message) : new Error(message);
}
