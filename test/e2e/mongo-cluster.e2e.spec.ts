/**
 * Scaled out on MongoDB: two points nodes and two deals nodes share one database, over a real
 * nats-server. Under a steady load of joins, saves, uses and cancellations, one points node and one
 * deals node are SIGKILLed mid-run and not brought back. The survivors take over their work — the
 * unacknowledged events (redelivered by JetStream), the uses left pending (swept) — and afterwards
 * every account equals what its deals imply and the sum of its ledger, with no cause applied twice.
 */
import { eventually } from "../helpers/broker";
import {
	all,
	expectBalancesConverge,
	expectDealLedger,
	explained,
	startLoad,
	type Deal
} from "../helpers/cluster";
import { NatsServer } from "../helpers/nats";
import { freshDatabaseUri } from "../helpers/store";
import { freePort, System } from "../helpers/system";

jest.setTimeout(180_000);

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms));

describe("points and deals scaled out on MongoDB", () => {
	let nats: NatsServer;
	const nodes: Record<string, System> = {};
	const members = Array.from({ length: 6 }, (_, i) => `s${String(i).padStart(3, "0")}`);
	const api = (method: string, urlPath: string, body?: unknown) =>
		nodes.gateway.call(method, `/api${urlPath}`, body);

	beforeAll(async () => {
		nats = await NatsServer.start();
		const mongoUri = freshDatabaseUri();
		const start = async (name: string, services: string) => {
			const env = {
				TRANSPORTER: nats.url,
				SERVICES: services,
				NODE_ID: `${name}-${process.pid}`,
				CALL_TIMEOUT_MS: "1000",
				MONGO_URI: mongoUri,
				RATE_LIMIT: "1000000"
			};
			nodes[name] = new System(name === "gateway" ? await freePort() : 0, env, await freePort());
			await nodes[name].start();
		};
		await Promise.all([
			start("members", "members,merchants"),
			start("points-1", "points"),
			start("points-2", "points"),
			start("deals-1", "deals"),
			start("deals-2", "deals")
		]);
		await start("gateway", "api");
		await eventually(async () => expect((await api("GET", "/health")).status).toBe(200));
	});

	afterAll(async () => {
		await Promise.all(Object.values(nodes).map(node => node.stop()));
		await nats.stop();
	});

	it("keeps every account exact when a points node and a deals node die mid-run", () =>
		explained(nodes, async () => {
			for (const memberId of members)
				expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);

			const load = startLoad(api, members, false);
			await sleep(4000);
			await Promise.all([nodes["points-1"].stop("SIGKILL"), nodes["deals-1"].stop("SIGKILL")]);
			// Calls already routed to the dead deals node wait for their timeout, and the others notice
			// the death after missed heartbeats: keep the load on well past both.
			await sleep(12_000);
			expect((await load.stop()).ok).toBeGreaterThan(100);

			// The dead deals node's pending uses are settled by the survivor, and nothing stays pending.
			await eventually(
				async () => {
					for (const memberId of members)
						expect(
							(await all<Deal>(api, `/deals?memberId=${memberId}`)).filter(
								d => d.status === "pending"
							)
						).toEqual([]);
				},
				30_000,
				500
			);
			// Events the dead points node had taken but not acknowledged come back to the survivor.
			await expectBalancesConverge(api, members, false);
			for (const memberId of members) await expectDealLedger(api, memberId);
		}));
});
