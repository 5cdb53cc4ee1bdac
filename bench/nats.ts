/**
 * 3. Over NATS: the deals node (with members and merchants) and the points node run as separate processes over a
 * local nats-server; this process joins them as a client node, as the gateway does, and compares
 * `deals.create` (client → deals → points for a use) with a trivial request/reply to the deals node.
 * Run compiled (`npm run bench`): the deals node loads the trivial service's built file.
 */
import path from "node:path";
import { ServiceBroker } from "moleculer";
import { createBrokerOptions } from "../config/broker";
import { loadConfig } from "../config";
import { NatsServer } from "../test/helpers/nats";
import { freePort, System } from "../test/helpers/system";
import { callLoad, dealBody, settledAudit, type Options, type Row } from "./lib";

export async function natsBench(
	options: Options
): Promise<{ row: Row; audit: { accounts: number; mismatches: number } }> {
	const nats = await NatsServer.start();
	const nodes: System[] = [];
	const client = new ServiceBroker({
		...createBrokerOptions(
			loadConfig({ ...process.env, TRANSPORTER: nats.url, LOG_LEVEL: "warn", METRICS_PORT: "off" })
		),
		nodeID: `bench-client-${process.pid}`
	});
	try {
		for (const [name, services] of [
			["points", "points"],
			// The baseline's trivial service runs on the deals node too: moleculer-runner loads it by path.
			["deals", `deals,members,merchants,${path.join(__dirname, "trivial.service.js")}`]
		]) {
			const node = new System(
				0,
				{ TRANSPORTER: nats.url, SERVICES: services, NODE_ID: `bench-${name}-${process.pid}` },
				await freePort()
			);
			nodes.push(node);
			await node.start();
		}
		await client.start();
		await client.waitForServices(["members", "deals", "points", "trivial"], 30_000);
		for (let i = 0; i < options.members; i += 50)
			await Promise.all(
				Array.from({ length: Math.min(50, options.members - i) }, (_, k) =>
					client.call("members.join", { memberId: `b${i + k}`, name: `bench ${i + k}` })
				)
			);

		const trivial = await callLoad(options, () => client.call("trivial.echo", { n: 1 }));
		const deals = await callLoad(options, () =>
			client.call("deals.create", dealBody(options.members))
		);
		const audit = await settledAudit(async () => {
			const { accounts, mismatches } = await client.call<{
				accounts: number;
				mismatches: unknown[];
			}>("points.audit");
			return { accounts, mismatches: mismatches.length };
		});
		return {
			row: {
				what: "deals.create over NATS (3 nodes)",
				figures: deals,
				baseline: "trivial action on the deals node",
				baselineFigures: trivial
			},
			audit
		};
	} finally {
		await client.stop();
		for (const node of nodes) await node.stop();
		await nats.stop();
	}
}
