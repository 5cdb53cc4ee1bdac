/**
 * The seeded simulation of the whole system (sim/, docs/simulation.md) on the project's store:
 * seeds 1 to 200, each its own system with its own workload and faults, checked at quiet moments
 * and at its end. A failing seed is reported with its trace and replays with
 * `npm run simulate -- --seed S` (on MongoDB with MONGO_URI set).
 */
import { report } from "../../sim/report";
import { runSeed } from "../../sim/simulation";
import type { Store } from "../../sim/system";

const SEEDS = 200;
const BATCH = 20;

const store: Store = process.env.MONGO_URI
	? { kind: "mongodb", mongoUri: process.env.MONGO_URI }
	: { kind: "sqlite" };

describe(`simulation on ${store.kind}`, () => {
	for (let from = 1; from <= SEEDS; from += BATCH)
		it(`seeds ${from}-${from + BATCH - 1} keep every invariant and the reference model`, async () => {
			for (let seed = from; seed < from + BATCH; seed++) {
				const result = await runSeed(seed, { store });
				if (!result.ok) throw new Error(report(result));
			}
		}, 300_000);
});
