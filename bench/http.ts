/**
 * 1. HTTP: `POST /api/deals` against the system as `npm start` runs it, beside the same gateway
 * answering a trivial authenticated action (`GET /api/me`): the floor HTTP and moleculer-web set.
 * Meanwhile a member of staff reads the dashboard: its member query at rest and under the deal load.
 * Then the same deals, each under a new `Idempotency-Key`, beside the deals without one: what taking
 * and recording a key costs.
 */
import { System } from "../test/helpers/system";
import { AUTH, auditOverHttp, dealBody, httpLoad, joinMembers, readLatencies, settledAudit, type Options, type Row } from "./lib";

export interface DashboardReads {
	atRest: { p50: number; p99: number };
	underLoad: { p50: number; p99: number };
}

export async function httpBench(options: Options): Promise<{ row: Row; keyed: Row; dashboard: DashboardReads; audit: { accounts: number; mismatches: number } }> {
	// The rate limiter would refuse a benchmark's load: lift it for this run.
	const system = await System.start({ RATE_LIMIT: "1000000000" });
	try {
		await joinMembers(system, options.members);
		const dashboardUrl = () => `/api/dashboard/members/b${Math.floor(Math.random() * options.members)}`;
		const atRest = await readLatencies(system, dashboardUrl, n => n < 100);
		const trivial = await httpLoad(`${system.url}/api/me`, options, { method: "GET", headers: AUTH });
		let loading = true;
		const [deals, underLoad] = await Promise.all([
			httpLoad(`${system.url}/api/deals`, options, {
				method: "POST",
				headers: AUTH,
				setupRequest: req => ({ ...req, body: JSON.stringify(dealBody(options.members)) })
			}).finally(() => (loading = false)),
			readLatencies(system, dashboardUrl, () => loading)
		]);
		let key = 0;
		const keyed = await httpLoad(`${system.url}/api/deals`, options, {
			method: "POST",
			setupRequest: req => ({ ...req, headers: { ...AUTH, "idempotency-key": `bench-${process.pid}-${++key}` }, body: JSON.stringify(dealBody(options.members)) })
		});
		return {
			row: { what: "POST /api/deals (HTTP, one process)", figures: deals, baseline: "GET /api/me", baselineFigures: trivial },
			keyed: { what: "POST /api/deals with Idempotency-Key", figures: keyed, baseline: "POST /api/deals", baselineFigures: deals },
			dashboard: { atRest, underLoad },
			audit: await settledAudit(() => auditOverHttp(system, options.members))
		};
	} finally {
		await system.stop();
	}
}
