/**
 * Runs tasks one at a time per key, in arrival order, and different keys in parallel.
 * The points service serialises the writes of one account with it: a check of the ledger and the
 * write that follows can then never interleave with another change of the same account.
 */
export class KeyedLock {
	private readonly tails = new Map<string, Promise<unknown>>();

	run<T>(key: string, task: () => Promise<T>): Promise<T> {
		const previous = this.tails.get(key) ?? Promise.resolve();
		const result = previous.then(task, task);
		const tail = result.catch(() => undefined);
		this.tails.set(key, tail);
		void tail.then(() => {
			if (this.tails.get(key) === tail) this.tails.delete(key);
		});
		return result;
	}
}
