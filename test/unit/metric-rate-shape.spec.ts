/**
 * The metrics workaround (lib/ops/metric-rate-shape.ts): once a metric's rate has ticked to a
 * fraction, a rate created before the tick and one ticked must share a hidden class. Without the
 * workaround they do not: the tick deprecated the class, which is what kept V8 from optimising
 * Moleculer's metric functions (the control case below shows it still happens in stock Moleculer).
 * Each case loads Moleculer afresh, so each starts from V8's first hidden class for MetricRate.
 */
import v8 from "node:v8";

interface MetricRate {
	value: number | null;
	lastTickTime: number;
	timer: NodeJS.Timeout;
	update(value: number): void;
	tick(): void;
}

v8.setFlagsFromString("--allow-natives-syntax");
// Compiled after the flag is set; a V8 intrinsic, not JavaScript, hence built from a string.
const haveSameShape = new Function("a", "b", "return %HaveSameMap(a, b)") as (
	a: object,
	b: object
) => boolean;

/** Two rates of one metric; the first ticks after a fractional rate (1 request in 7 s, ×60 / 2). */
async function tickOneOfTwo(settle: boolean): Promise<boolean> {
	let same = false;
	await jest.isolateModulesAsync(async () => {
		const { MetricTypes } = await import("moleculer");
		const { settleMetricRateShape } = await import("../../lib/ops/metric-rate-shape");
		if (settle) settleMetricRateShape();
		const registry = { opts: {}, changed() {} } as never;
		const gauge = new MetricTypes.Gauge(
			{ name: "test.requests", type: "gauge", labelNames: ["path"], rate: true },
			registry
		);
		gauge.set(0, { path: "a" });
		gauge.set(0, { path: "b" });
		const [ticked, waiting] = [...gauge.values.values()].map(item => item.rate as MetricRate);
		for (const rate of [ticked, waiting]) clearInterval(rate.timer);
		ticked.update(1);
		ticked.lastTickTime -= 7_000;
		ticked.tick();
		same = haveSameShape(ticked, waiting);
	});
	return same;
}

describe("Moleculer's metric rates keep one hidden class", () => {
	it("stock: a rate's first fractional tick deprecates the class its siblings still have", async () => {
		expect(await tickOneOfTwo(false)).toBe(false);
	});

	it("with the workaround: every rate has the final class from the start", async () => {
		expect(await tickOneOfTwo(true)).toBe(true);
	});
});
