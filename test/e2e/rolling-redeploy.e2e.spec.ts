/**
 * A rolling redeploy of every node under load, as Kubernetes does it (deploy/kubernetes): deals and orders
 * flow through two gateways behind a balancer that routes only to ready gateways and retries nothing,
 * while each node in turn is replaced. The nodes are the base's Deployments, with their services and the
 * ConfigMap's timing (read from the manifests). What its Deployment rolls (the gateways; on MongoDB also
 * deals and points) is surged: the new node starts, the balancer or the registry finds it ready, the old
 * one is stopped with SIGTERM. The rest are recreated: SIGTERM, then a new node on the same store (SQLite:
 * the same file, which one process owns), while calls to it wait for the new one (SERVICE_WAIT_MS).
 * No request fails, every accepted deal and order is there afterwards, and every balance equals its ledger.
 */
import { ServiceBroker } from "moleculer";
import { Balancer } from "../helpers/balancer";
import { eventually } from "../helpers/broker";
import {
	all,
	expectBalancesConverge,
	expectDealLedger,
	explained,
	startLoad,
	type Api
} from "../helpers/cluster";
import { kustomized, type Manifest } from "../helpers/manifests";
import { NatsServer } from "../helpers/nats";
import { freshDatabaseUri, onMongo } from "../helpers/store";
import { freePort, System } from "../helpers/system";

jest.setTimeout(180_000);

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms));

const base = kustomized("base");
const deployments = base.filter(m => m.kind === "Deployment");
const component = (name: string) => name.replace(/^onepoint-/, "").replace(/-\d+$/, "");
const deploymentOf = (name: string) =>
	deployments.find(d => component(d.metadata.name) === component(name)) as Manifest;

/**
 * The nodes: one per Deployment of the base, by its component, with the services it runs; two gateways
 * (the balancer needs a second while one is replaced). One of each other group: a second deals or points
 * node adds nothing the surge does not show, and the machine has 2 cores.
 */
const GROUPS: Record<string, string> = Object.fromEntries(
	deployments.flatMap(d => {
		const name = component(d.metadata.name);
		const services = (
			d.spec.template.spec.containers[0].env as { name: string; value: string }[]
		).find(e => e.name === "SERVICES")?.value as string;
		return (name === "gateway" ? ["gateway-1", "gateway-2"] : [name]).map(n => [n, services]);
	})
);

/** The ConfigMap's timing (`…_MS`: SERVICE_WAIT_MS, and a call timeout if it sets one), as the pods get it. */
const TIMING: Record<string, string> = Object.fromEntries(
	Object.entries(base.find(m => m.kind === "ConfigMap")?.data as Record<string, string>).filter(
		([name]) => name.endsWith("_MS")
	)
);

describe("a rolling redeploy of every node under load", () => {
	let nats: NatsServer;
	let balancer: Balancer;
	let client: ServiceBroker;
	const nodes: Record<string, System> = {};
	/** Every node started, stopped at the end even if the test failed before it took its place. */
	const spawned: System[] = [];
	const members = Array.from({ length: 8 }, (_, i) => `r${String(i).padStart(3, "0")}`);
	// On MongoDB every node shares one database, so two instances of a service share its store.
	const mongoUri = onMongo() ? freshDatabaseUri() : undefined;
	// The manifests run on MongoDB: on SQLite one process owns a store's file, so only the gateway, which
	// has none, can be surged.
	const surged = (name: string) =>
		deploymentOf(name).spec.strategy.type === "RollingUpdate" &&
		(onMongo() || name.startsWith("gateway"));

	let started = 0;
	/** A node of the group `name`, on the data folder of the one it replaces if any (SQLite: its file). */
	async function newNode(name: string, dataDir?: string): Promise<System> {
		const env = {
			TRANSPORTER: nats.url,
			SERVICES: GROUPS[name],
			// Unique per process: a second node with the id of a running one is a conflict Moleculer stops.
			NODE_ID: `${name}-${process.pid}-${++started}`,
			// A starting node takes the CPU from the others for a moment; on a shared 2-core CI machine
			// running eleven nodes the default 2 s of a `use` deal's debit can run out then. What is
			// tested is the redeploy, with the ConfigMap's timing (which wins where it sets one).
			CALL_TIMEOUT_MS: "5000",
			...TIMING,
			RATE_LIMIT: "1000000",
			...(mongoUri ? { MONGO_URI: mongoUri, MONGO_WRITE_CONCERN: "majority" } : {})
		};
		const node = new System(
			name.startsWith("gateway") ? await freePort() : 0,
			env,
			await freePort(),
			dataDir
		);
		// On a shared CI machine a node may take a while to start; the deadline is not what is tested.
		node.startTimeoutMs = 60_000;
		spawned.push(node);
		await node.start();
		return node;
	}

	/** Replaces one node, as its Deployment's strategy does (RollingUpdate or Recreate). */
	async function redeploy(name: string): Promise<void> {
		const old = nodes[name];
		// A new pod has a new name, so a new node id (the default one is host-pid).
		if (!surged(name)) {
			await old.stop("SIGTERM");
			nodes[name] = await newNode(name, old.dataDir);
			return;
		}
		const replacement = await newNode(name);
		nodes[name] = replacement;
		if (name.startsWith("gateway")) {
			balancer.add(replacement);
			await eventually(async () => expect(balancer.ready).toBe(3), 10_000, 50);
			// The pod leaves the Service's endpoints, then its preStop waits before SIGTERM: long enough
			// for the balancer to drain what it had sent there (a request cut by the exit fails).
			balancer.remove(old);
			await balancer.drained(old);
		} else {
			// The others route to it once its services are announced: as the registry sees it ready.
			const services = () =>
				(client.registry.getServiceList({ onlyAvailable: true }) as { nodeID: string }[]).filter(
					s => s.nodeID === replacement.env.NODE_ID
				);
			await eventually(async () => expect(services()).not.toEqual([]), 10_000, 50);
		}
		await old.stop("SIGTERM");
	}

	beforeAll(async () => {
		nats = await NatsServer.start();
		client = new ServiceBroker({
			namespace: "onepoint",
			nodeID: `test-client-${process.pid}`,
			transporter: { type: "NATS", options: { url: nats.url } },
			// The nodes' heartbeats (config/broker.ts): they would drop a client that beats less often.
			heartbeatInterval: 2,
			heartbeatTimeout: 6,
			logger: false
		});
		await client.start();
		const names = Object.keys(GROUPS);
		const first = await Promise.all(names.map(name => newNode(name)));
		names.forEach((name, i) => (nodes[name] = first[i]));
		balancer = await Balancer.start();
		balancer.add(nodes["gateway-1"]);
		balancer.add(nodes["gateway-2"]);
		await eventually(async () => expect(balancer.ready).toBe(2), 10_000, 50);
		await client.waitForServices(
			Object.values(GROUPS).flatMap(services => services.split(",")),
			30_000
		);
	});

	afterAll(async () => {
		await balancer?.stop();
		await Promise.all(spawned.map(node => node.stop()));
		await client?.stop();
		await nats?.stop();
	});

	it("fails no request, loses no deal and keeps every balance equal to its ledger", () =>
		explained(nodes, async () => {
			const failures: string[] = [];
			let phase = "before the redeploy";
			/** The ids of the deals and orders the system accepted, by their collection's path. */
			const accepted: Record<string, Set<string>> = { "/deals": new Set(), "/orders": new Set() };
			const api: Api = async (method, urlPath, body) => {
				const res = await balancer.call(method, `/api${urlPath}`, body);
				if (res.status >= 300)
					failures.push(
						`${phase}: ${method} ${urlPath}: ${res.status} ${JSON.stringify(res.body)}`
					);
				else if (method === "POST" && accepted[urlPath]) accepted[urlPath].add(res.body.id);
				return res;
			};
			for (const memberId of members)
				expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);

			expect(TIMING).toHaveProperty("SERVICE_WAIT_MS");
			const load = startLoad(api, members, true);
			await sleep(1500);
			for (const name of Object.keys(GROUPS)) {
				phase = `redeploying ${name}`;
				await redeploy(name);
				phase = `after redeploying ${name}`;
				await sleep(1000);
			}
			const answered = await load.stop();

			expect(failures).toEqual([]);
			expect(answered.failed).toBe(0);
			expect(answered.ok).toBeGreaterThan(100);

			expect(accepted["/orders"].size).toBeGreaterThan(0);
			for (const [collection, ids] of Object.entries(accepted)) {
				const stored = new Set<string>();
				for (const memberId of members)
					for (const row of await all<{ id: string }>(api, `${collection}?memberId=${memberId}`))
						stored.add(row.id);
				expect({ collection, lost: [...ids].filter(id => !stored.has(id)) }).toEqual({
					collection,
					lost: []
				});
			}

			// Every account converges on what its deals imply, and equals its ledger (points.audit).
			await expectBalancesConverge(api, members, true);
			for (const memberId of members) await expectDealLedger(api, memberId);
			const audit = await client.call<{ accounts: number; mismatches: unknown[] }>("points.audit");
			expect(audit.mismatches).toEqual([]);
			expect(audit.accounts).toBeGreaterThanOrEqual(members.length);
		}));
});
