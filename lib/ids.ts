import { randomFillSync } from "node:crypto";
import { monotonicFactory } from "ulid";

const pool = Buffer.alloc(4096);
let next = pool.length;

/**
 * Cryptographically random fractions in [0, 1), in steps of 1/256 (each of ULID's 32 characters
 * equally likely), drawn from the system a pool at a time: ulid's own generator asks the system
 * once per character, 16 times per id, which was 7% of a deal's CPU (docs/performance.md).
 */
function pooledRandom(): number {
	if (next === pool.length) {
		randomFillSync(pool);
		next = 0;
	}
	return pool[next++] / 256;
}

/**
 * A ULID: 48 bits of milliseconds and 80 random bits, so ids minted by different nodes cannot
 * collide in practice and sort by creation time (monotonic within this process, also within one
 * millisecond). Ledger entries are ordered by it; deals, orders and payments are named by it.
 */
export const sortableId: () => string = monotonicFactory(pooledRandom);
