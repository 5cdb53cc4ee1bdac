/**
 * The fences around our patches of libraries' internals (lib/patches.ts): each patched library is
 * installed and pinned at the version the patch was checked against, the members it relies on are
 * there, and a patch refuses to install, naming what is missing, when one is not.
 */
import fs from "node:fs";
import path from "node:path";
import { Adapters } from "@moleculer/channels";
import Moleculer, { MetricReporters, MetricTypes, type MetricRegistry } from "moleculer";
import ApiGateway from "moleculer-web";
import { assertPatchable, missingMembers, PATCHES, type Patch } from "../../lib/patches";

const ROOT = path.resolve(__dirname, "../..");
const readJson = (file: string) => JSON.parse(fs.readFileSync(file, "utf8")) as Record<string, any>;

/** The objects each patch applies to, built from the installed libraries. */
function targets(): Record<keyof typeof PATCHES, object> {
	const registry = { opts: {}, changed() {} } as unknown as MetricRegistry;
	const gauge = new MetricTypes.Gauge(
		{ name: "test.patches", type: "gauge", rate: true },
		registry
	);
	gauge.set(0);
	const [item] = gauge.values.values();
	clearInterval((item.rate as { timer: NodeJS.Timeout }).timer);
	return {
		natsChannels: Adapters.NATS.prototype,
		moleculerWeb: ApiGateway.methods as object,
		moleculerWebAliases: ApiGateway.methods as object,
		prometheusReporter: MetricReporters.Prometheus.prototype,
		moleculerMetrics: (
			Moleculer as unknown as { Middlewares: { Metrics(broker: object): object } }
		).Middlewares.Metrics({ metrics: {} }),
		metricRate: item.rate as object
	};
}

describe("patches of libraries' internals", () => {
	const patches = Object.entries(PATCHES) as [keyof typeof PATCHES, Patch][];

	it.each(patches)(
		"%s: the library is installed and pinned at the version the patch was checked against",
		(_name, patch) => {
			expect(readJson(path.join(ROOT, "node_modules", patch.library, "package.json")).version).toBe(
				patch.checked
			);
			expect(readJson(path.join(ROOT, "package.json")).dependencies[patch.library]).toBe(
				patch.checked
			);
		}
	);

	it.each(patches)("%s: every member the patch relies on is there", (name, patch) => {
		expect(missingMembers(patch, targets()[name])).toEqual([]);
		expect(fs.existsSync(path.join(ROOT, patch.where))).toBe(true);
	});

	it("refuses to install on a library that lost a member, naming it and the checked version", () => {
		const withoutIt = { localAction() {}, created() {} };
		expect(() => assertPatchable(PATCHES.moleculerMetrics, withoutIt)).toThrow(
			"lib/ops/metrics.ts patches moleculer internals checked against 0.15.2; the installed version lacks remoteAction: " +
				"re-check the patch before upgrading"
		);
	});
});
