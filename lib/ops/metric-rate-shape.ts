/**
 * Works around a deoptimisation loop in Moleculer's metrics (moleculer 0.15 on Node 22's V8).
 *
 * A metric registered with `rate: true` (requests and events counted per label set) keeps a
 * `MetricRate` whose `rate` field starts as the small integer 0. Its first tick, 5 s after the first
 * request, stores a fraction: V8 widens the field from small integer to double, which deprecates the
 * object's hidden class. From then on V8 aborts every optimisation of the metric types' `increment`,
 * `decrement`, `set` and `observe` ("Maps became deprecated during optimization", over 100 a second under load)
 * and the optimising compiler takes about half the process's CPU. Widening the field once, before
 * any rate exists, gives every `MetricRate` its final hidden class from the start. See
 * docs/performance.md for the evidence and how to reproduce it; lib/patches.ts fences the patch.
 */
import { MetricTypes, type MetricRegistry } from "moleculer";
import { assertPatchable, PATCHES } from "../patches";

/** The part of Moleculer's (unexported) MetricRate this touches. */
interface MetricRate {
	rate: number;
	timer: NodeJS.Timeout;
}

/** Kept for the life of the process: V8 forgets a hidden class no live object has, and would start over from the integer field. */
let probe: MetricRate | undefined;

export function settleMetricRateShape(): void {
	if (probe) return;
	// A throwaway gauge outside any registry: its only effect is one MetricRate, whose timer is stopped.
	const registry = { opts: {}, changed() {} } as unknown as MetricRegistry;
	const gauge = new MetricTypes.Gauge(
		{ name: "onepoint.shape-probe", type: "gauge", rate: true },
		registry
	);
	gauge.set(0);
	const [item] = gauge.values.values();
	assertPatchable(PATCHES.metricRate, item.rate as object);
	probe = item.rate as MetricRate;
	clearInterval(probe.timer);
	probe.rate = 0.5;
}
