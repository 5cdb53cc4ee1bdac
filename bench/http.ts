/**
 * 1. HTTP: `POST /api/deals` against the system as `npm start` runs it, beside the same gateway
 * answering a trivial authenticated action (`GET /api/me`): the floor HTTP and moleculer-web set.
 */
import { System } from "../test/helpers/system";
import { AUTH, auditOverHttp, dealBody, httpLoad, joinMembers, settledAudit, type Options, type Row } from "./lib";

export async function httpBench(options: Options): Promise<{ row: Row; audit: { accounts: number; mismatches: number } }> {
	// The rate limiter would refuse a benchmark's load: lift it for this run.
	const system = await System.start({ RATE_LIMIT: "1000000000" });
	try {
		await joinMembers(system, options.members);
		const trivial = await httpLoad(`${system.url}/api/me`, options, { method: "GET", headers: AUTH });
		const deals = await httpLoad(`${system.url}/api/deals`, options, {
			method: "POST",
			headers: AUTH,
			setupRequest: req => ({ ...req, body: JSON.stringify(dealBody(options.members)) })
		});
		return {
			row: { what: "POST /api/deals (HTTP, one process)", figures: deals, baseline: "GET /api/me", baselineFigures: trivial },
			audit: await settledAudit(() => auditOverHttp(system, options.members))
		};
	} finally {
		await system.stop();
	}
}
