/**
 * Webhooks over a cluster (a real nats-server, one process per node), on each store: deliveries
 * queued for a receiver that is down outlive the webhooks node's SIGKILL, events made while it is
 * down wait in their channels, and once it is back and the receiver up, every event is delivered (at
 * least once: counted by distinct webhook-id), each with one webhook-id on all its attempts and signed
 * as the reference library (`standardwebhooks`) verifies with the secret.
 */
import { Webhook as Verifier } from "standardwebhooks";
import { eventually } from "../helpers/broker";
import { clockFrom, faketime } from "../helpers/clock";
import { explained } from "../helpers/cluster";
import { NatsServer } from "../helpers/nats";
import { Receiver } from "../helpers/receiver";
import { freePort, System } from "../helpers/system";

jest.setTimeout(120_000);

interface DeliveryRow {
	deliveryId: string;
	type: string;
	status: string;
	attempts: number;
	lastStatus?: number | string;
}

/** The nodes' clock, and the test's: the reference library checks a signature's time against it. */
const START = "2026-05-20 10:00:00";

describe("webhooks over a cluster", () => {
	clockFrom(`${START.replace(" ", "T")}.000Z`);
	let nats: NatsServer;
	let receiver: Receiver;
	const nodes: Record<string, System> = {};
	const gateway = () => nodes.gateway;
	const api = (method: string, urlPath: string, body?: unknown) =>
		gateway().call(method, `/api${urlPath}`, body);

	beforeAll(async () => {
		nats = await NatsServer.start();
		// Not listening until the test says: its port refuses connections meanwhile.
		receiver = new Receiver(await freePort());
		const start = async (name: string, services: string, env: NodeJS.ProcessEnv = {}) => {
			const node = new System(
				name === "gateway" ? await freePort() : 0,
				{
					TRANSPORTER: nats.url,
					SERVICES: services,
					NODE_ID: `${name}-${process.pid}`,
					RATE_LIMIT: "1000000",
					...faketime(START),
					...env
				},
				await freePort()
			);
			nodes[name] = node;
			await node.start();
		};
		await Promise.all([
			start("members", "members,merchants"),
			start("deals", "deals"),
			// Retries soon and often: the receiver stays down for a while.
			start("webhooks", "webhooks", {
				WEBHOOK_TIMEOUT_MS: "1000",
				WEBHOOK_RETRY_SCHEDULE: `200ms,500ms,${Array(18).fill("2s").join(",")}`
			})
		]);
		await start("gateway", "api");
		await eventually(async () => expect((await api("GET", "/webhooks")).status).toBe(200));
	});

	afterAll(async () => {
		await Promise.all(Object.values(nodes).map(node => node.stop()));
		await nats?.stop();
		await receiver?.stop();
	});

	it("delivers every event once the receiver is up, through a SIGKILL of the webhooks node", () =>
		explained(nodes, async () => {
			const created = await api("POST", "/webhooks", {
				url: receiver.url("/hook"),
				events: ["member.joined", "deal.created"]
			});
			expect(created.status).toBe(201);
			const { webhookId } = created.body;
			const deliveries = async () =>
				(await api("GET", `/webhooks/${webhookId}/deliveries?pageSize=100`)).body as {
					total: number;
					rows: DeliveryRow[];
				};

			const members = ["w001", "w002", "w003", "w004", "w005"];
			for (const memberId of members)
				expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);
			const deals: string[] = [];
			const save = async (memberId: string) => {
				const res = await api("POST", "/deals", {
					memberId,
					merchantId: "20",
					dealAmount: 10_000,
					type: "save"
				});
				expect(res.status).toBe(201);
				deals.push(res.body.id);
			};
			for (const memberId of [...members, ...members]) await save(memberId);

			// Queued, and tried against the closed port.
			await eventually(
				async () => {
					const { total, rows } = await deliveries();
					expect(total).toBe(15);
					for (const row of rows) expect(row).toMatchObject({ lastStatus: "NETWORK" });
				},
				30_000,
				200
			);

			await nodes.webhooks.stop("SIGKILL");
			// Made while the webhooks node is dead: they wait in their channels.
			for (const memberId of members) await save(memberId);
			// Back a minute later by its clock: the retries and leases it left are due.
			Object.assign(nodes.webhooks.env, faketime("2026-05-20 10:01:00"));
			await nodes.webhooks.start();
			await receiver.start();

			const expected = new Set([
				...members.map(memberId => `member.joined:${memberId}`),
				...deals.map(dealId => `deal.created:${dealId}`)
			]);
			expect(expected.size).toBe(20);
			const verifier = new Verifier(created.body.secret);
			const told = () => {
				const byId = new Map<string, string>();
				for (const request of receiver.at("/hook")) {
					const { type, data } = verifier.verify(request.body, request.headers) as {
						type: string;
						data: { dealId?: string; memberId: string };
					};
					byId.set(request.headers["webhook-id"], `${type}:${data.dealId ?? data.memberId}`);
				}
				return byId;
			};
			await eventually(() => expect(new Set(told().values())).toEqual(expected), 60_000, 200);
			// One webhook-id per event, whatever number of attempts reached the receiver.
			expect(told().size).toBe(20);
			await eventually(
				async () => {
					const { total, rows } = await deliveries();
					expect(total).toBe(20);
					expect(rows.filter(row => row.status !== "delivered")).toEqual([]);
				},
				30_000,
				200
			);
		}));
});
