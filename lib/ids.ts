import { monotonicFactory } from "ulid";

/**
 * A ULID: 48 bits of milliseconds and 80 random bits, so ids minted by different nodes cannot
 * collide in practice and sort by creation time (monotonic within this process, also within one
 * millisecond). Ledger entries are ordered by it; deals, orders and payments are named by it.
 */
export const sortableId: () => string = monotonicFactory();
