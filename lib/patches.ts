/**
 * Where OnePoint replaces or relies on a library's internals, the version it was checked against and
 * the members it uses. Each patch checks its members when it is installed, so that an upgrade that
 * moved one fails at start with a message naming it, rather than misbehaving quietly; the
 * dependency is pinned to the checked version in package.json, and test/unit/patches.spec.ts fails
 * when the installed version or the members differ.
 */

export interface Patch {
	/** The npm package patched. */
	library: string;
	/** The version the patch was read and tested against (package.json pins it). */
	checked: string;
	/** The file that holds the patch. */
	where: string;
	/** The members of the patched object (or class prototype) that must be functions. */
	members: string[];
}

export const PATCHES = {
	/** The durable NATS adapter, a subclass that overrides and calls the stock adapter's internals. */
	natsChannels: {
		library: "@moleculer/channels",
		checked: "0.1.8",
		where: "lib/channels/nats-adapter.ts",
		members: [
			"connect",
			"disconnect",
			"publish",
			"createStream",
			"createConsumerHandler",
			"addChannelActiveMessages",
			"removeChannelActiveMessages",
			"metricsIncrement"
		]
	},
	/** The gateway's Idempotency-Key wrap of moleculer-web's `callAction` (a method of its service schema). */
	moleculerWeb: {
		library: "moleculer-web",
		checked: "0.11.0",
		where: "lib/gateway/idempotent-call.ts",
		members: ["callAction"]
	},
	/** The gateway's wait for a service being redeployed, a wrap of moleculer-web's `aliasHandler`. */
	moleculerWebAliases: {
		library: "moleculer-web",
		checked: "0.11.0",
		where: "lib/gateway/wait-for-service.ts",
		members: ["aliasHandler"]
	},
	/** The node's ops server: Moleculer's Prometheus reporter, answering the probes and writing OnePoint's series too. */
	prometheusReporter: {
		library: "moleculer",
		checked: "0.15.2",
		where: "lib/ops/reporter.ts",
		members: ["init", "handler", "generatePrometheusResponse"]
	},
	/** Moleculer's per-action metrics middleware, whose `localAction` the gateway's own actions skip. */
	moleculerMetrics: {
		library: "moleculer",
		checked: "0.15.2",
		where: "lib/ops/metrics.ts",
		members: ["localAction", "remoteAction", "created"]
	},
	/** The metrics workaround: one MetricRate of a throwaway gauge, widened before any rate exists. */
	metricRate: {
		library: "moleculer",
		checked: "0.15.2",
		where: "lib/ops/metric-rate-shape.ts",
		members: ["update", "tick"]
	}
} satisfies Record<string, Patch>;

/** The members of `patch` that `target` lacks (or holds as something other than a function). */
export function missingMembers(patch: Patch, target: object): string[] {
	return patch.members.filter(
		member => typeof (target as Record<string, unknown>)[member] !== "function"
	);
}

/** Throws, naming what is missing, unless `target` has every member `patch` relies on. */
export function assertPatchable(patch: Patch, target: object): void {
	const missing = missingMembers(patch, target);
	if (missing.length)
		throw new Error(
			`${patch.where} patches ${patch.library} internals checked against ${patch.checked}; the installed version lacks ` +
				`${missing.join(", ")}: re-check the patch before upgrading`
		);
}
