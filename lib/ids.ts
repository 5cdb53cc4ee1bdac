import { randomBytes } from "node:crypto";

let last = 0;
let counter = 0;

/**
 * A unique id that sorts by creation time: 9 base-36 digits of milliseconds, a per-millisecond
 * counter and 4 random characters (so two nodes minting in the same millisecond differ).
 * Cheap enough for every deal and message, unlike NeDB's own random ids.
 */
export function sortableId(): string {
	const now = Date.now();
	if (now === last) counter++;
	else {
		last = now;
		counter = 0;
	}
	return (
		now.toString(36).padStart(9, "0") +
		counter.toString(36).padStart(3, "0") +
		randomBytes(3).toString("base64url").slice(0, 4)
	);
}
