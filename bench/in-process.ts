/**
 * 2. In process: `deals.create` through `broker.call` beside a trivial action on the same broker,
 * both with the production broker options (validator, breaker, timeout, channels). The store is
 * the `DATA_DIR` of this process (`run.ts` makes a fresh one).
 */
import { ServiceBroker } from "moleculer";
import { createBrokerOptions } from "../config/broker";
import { loadConfig } from "../config";
import DealsService from "../services/deals.service";
import MembersService from "../services/members.service";
import MerchantsService from "../services/merchants.service";
import PointsService from "../services/points.service";
import TrivialService from "./trivial.service";
import { callLoad, dealBody, settledAudit, type Options, type Row } from "./lib";

export async function inProcessBench(
	options: Options
): Promise<{ row: Row; audit: { accounts: number; mismatches: number } }> {
	const broker = new ServiceBroker({
		...createBrokerOptions(loadConfig({ ...process.env, LOG_LEVEL: "warn", METRICS_PORT: "off" })),
		nodeID: "bench-in-process"
	});
	// A deal asks merchants for its terms: without it every deal fails, and the load measures failures.
	for (const schema of [MembersService, MerchantsService, PointsService, DealsService])
		broker.createService(schema);
	broker.createService(TrivialService);
	await broker.start();
	try {
		for (let i = 0; i < options.members; i++)
			await broker.call("members.join", { memberId: `b${i}`, name: `bench ${i}` });
		const trivial = await callLoad(options, () => broker.call("trivial.echo", { n: 1 }));
		const deals = await callLoad(options, () =>
			broker.call("deals.create", dealBody(options.members))
		);
		const audit = await settledAudit(async () => {
			const { accounts, mismatches } = await broker.call<{
				accounts: number;
				mismatches: unknown[];
			}>("points.audit");
			return { accounts, mismatches: mismatches.length };
		});
		return {
			row: {
				what: 'broker.call("deals.create")',
				figures: deals,
				baseline: "trivial action",
				baselineFigures: trivial
			},
			audit
		};
	} finally {
		await broker.stop();
	}
}
