/**
 * The system as many nodes over a real nats-server (JetStream), each node its own process. Under a
 * steady stream of joins, saves, uses, orders and cancellations, the points node is SIGKILLed and
 * restarted, nats-server itself is restarted, and the deals node is restarted gracefully (SIGTERM).
 * Afterwards every account equals the sum of its ledger and exactly what the deals and orders imply,
 * and no event was applied twice. Then the payments node goes away: new orders are refused at once
 * with 503, a cancellation is accepted and completes when payments is back.
 */
import { eventually } from "../helpers/broker";
import {
	all as allOf,
	expectBalancesConverge,
	expectDealLedger,
	explained,
	startLoad,
	type Entry,
	type Order
} from "../helpers/cluster";
import { NatsServer } from "../helpers/nats";
import { freePort, System } from "../helpers/system";

jest.setTimeout(180_000);

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms));

describe("a cluster over NATS", () => {
	let nats: NatsServer;
	const nodes: Record<string, System> = {};
	const members = Array.from({ length: 8 }, (_, i) => `c${String(i).padStart(3, "0")}`);

	const gateway = () => nodes.gateway;
	const api = (method: string, urlPath: string, body?: unknown) =>
		gateway().call(method, `/api${urlPath}`, body);

	let started = 0;
	async function startNode(name: string, services: string): Promise<void> {
		// Node ids are unique per process: a second node with the same id is a conflict Moleculer stops.
		const nodeID = `${name}-${process.pid}-${++started}`;
		// One staff token drives the whole load and the checks: the per-minute rate limit is not under test here.
		const env = {
			TRANSPORTER: nats.url,
			SERVICES: services,
			NODE_ID: nodeID,
			CALL_TIMEOUT_MS: "1000",
			RATE_LIMIT: "1000000"
		};
		const node = new System(name === "gateway" ? await freePort() : 0, env, await freePort());
		nodes[name] = node;
		await node.start();
	}

	beforeAll(async () => {
		nats = await NatsServer.start();
		// Consumers first would not be needed (JetStream keeps what they miss), but the gateway last
		// lets the test start its load at once.
		await Promise.all([
			startNode("points", "points"),
			startNode("members", "members,merchants"),
			startNode("deals", "deals"),
			startNode("billing", "billing,dead-letters"),
			startNode("orders", "orders,deliveries,my-points"),
			startNode("payments", "payments")
		]);
		await startNode("gateway", "api");
		await eventually(async () => expect((await api("GET", "/health")).status).toBe(200));
	});

	afterAll(async () => {
		await Promise.all(Object.values(nodes).map(node => node.stop()));
		await nats.stop();
	});

	const all = <T>(urlPath: string) => allOf<T>(api, urlPath);

	it("keeps every point exact through a killed points node, a restarted nats-server and a redeployed deals node", () =>
		explained(nodes, async () => {
			for (const memberId of members)
				expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);

			const load = startLoad(api, members, true);

			await sleep(3000);
			await nodes.points.stop("SIGKILL");
			await sleep(4000);
			await nodes.points.start();
			await sleep(3000);
			await nats.stop();
			await sleep(2000);
			await nats.start();
			await sleep(4000);
			// A graceful restart: SIGTERM lets the deals node finish the uses it has in flight.
			await nodes.deals.stop("SIGTERM");
			await nodes.deals.start();
			await sleep(2000);
			expect((await load.stop()).ok).toBeGreaterThan(100);

			// Every account converges on what its deals and orders imply.
			await expectBalancesConverge(api, members);

			// A cancelled order nets to nothing whether or not its events have landed: wait until a paid
			// order has its accrual, and a cancelled one its accrual or a void (its cancellation reached
			// points first, so the accrual, arriving later, is refused). A handler that failed while NATS
			// was down is redelivered after a backoff of seconds.
			await eventually(
				async () => {
					for (const memberId of members) {
						const causes = new Set(
							(await all<Entry>(`/points/${memberId}/history`)).map(e => e.cause)
						);
						for (const order of await all<Order>(`/orders?memberId=${memberId}`)) {
							const settled =
								causes.has(`order:${order.id}`) ||
								(order.status === "cancelled" && causes.has(`order-cancel:${order.id}`));
							if (order.status === "paid" || order.status === "cancelled")
								expect({ order: order.id, settled }).toEqual({ order: order.id, settled: true });
						}
					}
				},
				120_000,
				1000
			);

			let paidOrders = 0;
			for (const memberId of members) {
				const ledger = await expectDealLedger(api, memberId);
				// A paid order has exactly one accrual; a cancelled one an accrual and its revocation, or only
				// a void when the cancellation came first; no other order has points.
				for (const order of await all<Order>(`/orders?memberId=${memberId}`)) {
					const accrual = ledger.filter(e => e.cause === `order:${order.id}`);
					const revocation = ledger.filter(e => e.cause === `order-cancel:${order.id}`);
					if (order.status === "paid") paidOrders++;
					if (order.status === "cancelled" && revocation[0]?.kind === "void") {
						expect({ order: order.id, accrual, revocation: revocation.map(e => e.amount) }).toEqual(
							{
								order: order.id,
								accrual: [],
								revocation: [0]
							}
						);
						continue;
					}
					if (order.status === "paid" || order.status === "cancelled")
						expect(accrual.map(e => e.amount)).toEqual([order.points]);
					else expect(accrual).toEqual([]);
					if (order.status === "cancelled")
						expect(revocation.map(e => -e.amount + (e.shortfall ?? 0))).toEqual([order.points]);
					else expect(revocation).toEqual([]);
				}
			}
			expect(paidOrders).toBeGreaterThan(0);
		}));

	it("refuses orders at once while payments is down, accepts a cancellation and completes it when payments is back", async () => {
		const memberId = "p001";
		expect((await api("POST", "/members", { memberId, name: "breakfast" })).status).toBe(201);
		const paid = await eventually(async () => {
			const res = await api("POST", "/orders", {
				memberId,
				productId: "set",
				qty: 5,
				unitPrice: 2000
			});
			expect(res.body).toMatchObject({ status: "paid", points: 2000 });
			return res.body as Order;
		});
		await eventually(async () =>
			expect(
				(await api("GET", `/my-points/${memberId}`)).body.rows.some(
					(r: { orderId: string }) => r.orderId === paid.id
				)
			).toBe(true)
		);

		await nodes.payments.stop("SIGTERM");
		const refused = await api("POST", "/orders", {
			memberId,
			productId: "set",
			qty: 1,
			unitPrice: 1000
		});
		expect(refused.status).toBe(503);
		expect(refused.body.type).toBe("PAYMENTS_UNAVAILABLE");
		// Gone from the registry, or still known as stopping: either way the call was not made.
		expect(["NOT_RUNNING", "UNAVAILABLE"]).toContain(refused.body.data.reason);
		expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);

		const cancelled = await api("POST", `/orders/${paid.id}/cancel`);
		expect(cancelled.status).toBe(200);
		expect(cancelled.body).toMatchObject({
			status: "cancelled",
			payment: { status: "cancelling" }
		});
		// The points are revoked now; the payment waits for its service.
		await eventually(async () => {
			const ledger = await all<Entry>(`/points/${memberId}/history`);
			expect(ledger.filter(e => e.cause === `order-cancel:${paid.id}`)).toHaveLength(1);
		});
		expect((await api("GET", `/orders/${paid.id}`)).body.payment.status).toBe("cancelling");

		// Back on its own data (the embedded store is per node).
		await nodes.payments.start();
		await eventually(
			async () =>
				expect((await api("GET", `/orders/${paid.id}`)).body).toMatchObject({
					payment: { id: paid.payment.id, status: "cancelled" },
					delivery: { status: "cancelled" }
				}),
			30_000,
			200
		);
		// The gateway learns of the restarted node a moment after the orders node does.
		await eventually(async () =>
			expect((await api("GET", `/payments/${paid.payment.id}`)).body).toMatchObject({
				status: "cancelled"
			})
		);
		// The refused order is recorded as failed, and its payment, should it ever come, is voided.
		const [failed] = (await api("GET", `/orders?memberId=${memberId}&status=payment_failed`)).body
			.rows as Order[];
		expect(failed).toMatchObject({ reason: "PAYMENTS_UNAVAILABLE", points: 0 });
		await eventually(async () =>
			expect((await api("GET", `/payments?orderId=${failed.id}`)).body.rows).toMatchObject([
				{ status: "voided" }
			])
		);
	});

	it("redeploys a gateway without a failed request: start the new node, then SIGTERM the old one", async () => {
		// What a load balancer does: send each request to a gateway whose readiness probe said yes.
		const pool = new Map<System, boolean>([[gateway(), true]]);
		let probing = true;
		const probe = (async () => {
			while (probing) {
				for (const node of pool.keys()) pool.set(node, await node.ready());
				await sleep(50);
			}
		})();
		const pick = () => {
			const ready = [...pool].filter(([, ok]) => ok).map(([node]) => node);
			return ready[Math.floor(Math.random() * ready.length)];
		};

		let running = true;
		const failures: string[] = [];
		let answered = 0;
		const worker = async (seed: number) => {
			for (let i = 0; running; i++) {
				const memberId = members[(seed + i) % members.length];
				const body =
					i % 3
						? { memberId, merchantId: "20", dealAmount: 20000, type: "save" }
						: { memberId, merchantId: "20", dealAmount: 1000, type: "use", point: 1 };
				const res = await pick()
					.call("POST", "/api/deals", body)
					.catch((err: Error & { cause?: { code?: string } }) => ({
						status: 0,
						body: `${err.message} ${err.cause?.code}`
					}));
				if (res.status === 201) answered++;
				else failures.push(`${res.status} ${JSON.stringify(res.body)}`);
			}
		};
		const load = Promise.all([0, 1, 2, 3].map(worker));

		await sleep(1500);
		const old = gateway();
		await startNode("gateway", "api");
		pool.set(gateway(), await gateway().ready());
		await sleep(1000);
		await old.stop("SIGTERM");
		pool.delete(old);
		await sleep(1500);
		running = false;
		await load;
		probing = false;
		await probe;

		expect(failures).toEqual([]);
		expect(answered).toBeGreaterThan(100);
	});
});
