/**
 * The simulation's only source of chance: a seeded generator (sfc32, seeded through splitmix32), so
 * that a seed draws the same workload and the same faults every time it runs.
 */
export class Prng {
	private a: number;
	private b: number;
	private c: number;
	private d: number;

	constructor(seed: number) {
		let s = seed >>> 0;
		const split = () => {
			s = (s + 0x9e3779b9) >>> 0;
			let z = s;
			z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
			z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
			return (z ^ (z >>> 16)) >>> 0;
		};
		[this.a, this.b, this.c, this.d] = [split(), split(), split(), split()];
	}

	/** A fraction in [0, 1). */
	next(): number {
		const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
		this.d = (this.d + 1) >>> 0;
		this.a = this.b ^ (this.b >>> 9);
		this.b = (this.c + (this.c << 3)) >>> 0;
		this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
		this.c = (this.c + t) >>> 0;
		return t / 4294967296;
	}

	/** A whole number from `min` to `max`, both included. */
	int(min: number, max: number): number {
		return min + Math.floor(this.next() * (max - min + 1));
	}

	/** True with probability `p`. */
	chance(p: number): boolean {
		return this.next() < p;
	}

	pick<T>(items: readonly T[]): T {
		if (!items.length) throw new Error("Nothing to pick from");
		return items[Math.floor(this.next() * items.length)];
	}

	/** One of `weights`' keys, each as likely as its weight. */
	weighted<K extends string>(weights: Record<K, number>): K {
		const entries = Object.entries(weights) as [K, number][];
		let roll = this.next() * entries.reduce((sum, [, w]) => sum + w, 0);
		for (const [key, weight] of entries) if ((roll -= weight) < 0) return key;
		return entries[entries.length - 1][0];
	}
}
