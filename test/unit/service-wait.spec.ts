/**
 * SERVICE_WAIT_MS: while the one node of a service is replaced, a request to it waits for the new one
 * instead of failing: at the gateway (a wrap of moleculer-web's `aliasHandler`, which answers 503 at
 * once when no node serves an alias's action) and between services (the broker's `WaitForService`
 * middleware, lib/service-wait.ts). Without it, both fail at once, as before; with it, a service whose
 * nodes are there but unavailable still does. The service arrives a moment after the request, as a
 * redeployed node does.
 */
import ApiGateway from "moleculer-web";
import type { Context, ServiceBroker } from "moleculer";
import { stockAliasHandler } from "../../lib/gateway/wait-for-service";
import ApiService from "../../services/api.service";
import { createTestBroker } from "../helpers/broker";
import { freePort, TOKENS } from "../helpers/system";

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms));

/** The stand-in for the members service that a redeploy brings back. */
const Members = {
	name: "members",
	actions: {
		get(ctx: Context<{ memberId: string }, { servedBy?: string }>) {
			ctx.meta.servedBy = "the new node";
			return { memberId: ctx.params.memberId, status: "active" };
		}
	}
};

describe("waiting for a service being redeployed (SERVICE_WAIT_MS)", () => {
	const brokers: ServiceBroker[] = [];
	async function start(waitMs: number, port = 0): Promise<ServiceBroker> {
		const broker = createTestBroker([], {
			SERVICE_WAIT_MS: String(waitMs),
			API_KEYS: `${TOKENS.staff}=staff`,
			PORT: String(port),
			HOST: "127.0.0.1",
			METRICS_PORT: "off",
			// The gateway logs the 503 it answers without the wait.
			LOG_LEVEL: "fatal"
		});
		brokers.push(broker);
		await broker.start();
		return broker;
	}
	afterEach(async () => {
		await Promise.all(brokers.splice(0).map(broker => broker.stop()));
	});

	const getMember = (port: number) =>
		fetch(`http://127.0.0.1:${port}/api/members/0001`, {
			headers: { authorization: `Bearer ${TOKENS.staff}` }
		});

	it("makes the gateway wait for a node that serves the route's action, then call it", async () => {
		const port = await freePort();
		const broker = await start(10_000, port);
		broker.createService(ApiService);
		await broker.waitForServices("api");
		const answer = getMember(port);
		await sleep(300);
		broker.createService(Members);
		const res = await answer;
		expect(res.status).toBe(200);
		expect(await res.json()).toEqual({ memberId: "0001", status: "active" });
	});

	it("answers 503 at once without it, as moleculer-web does", async () => {
		const port = await freePort();
		const broker = await start(0, port);
		broker.createService(ApiService);
		await broker.waitForServices("api");
		const res = await getMember(port);
		expect(res.status).toBe(503);
		expect(await res.json()).toMatchObject({ type: "SERVICE_UNAVAILABLE" });
	});

	it("makes a call between services wait, keeping what the callee put in the context's meta", async () => {
		const broker = await start(10_000);
		broker.createService({
			name: "deals",
			actions: {
				async check(ctx: Context<unknown, { servedBy?: string }>) {
					const member = await ctx.call("members.get", { memberId: "0001" });
					return { member, servedBy: ctx.meta.servedBy };
				}
			}
		});
		await broker.waitForServices("deals");
		const answer = broker.call("deals.check");
		await sleep(300);
		broker.createService(Members);
		expect(await answer).toEqual({
			member: { memberId: "0001", status: "active" },
			servedBy: "the new node"
		});
	});

	it("fails a call between services at once without it", async () => {
		const broker = await start(0);
		await expect(broker.call("members.get", { memberId: "0001" })).rejects.toMatchObject({
			type: "SERVICE_NOT_FOUND"
		});
	});

	it("waits only for a service no node serves: one whose every node is unavailable (breaker open) fails at once", async () => {
		// Far longer than the test may run: a call that waited would time the test out.
		const port = await freePort();
		const broker = await start(600_000, port);
		broker.createService(ApiService);
		broker.createService(Members);
		await broker.waitForServices(["api", "members"]);
		// What the circuit breaker does to an endpoint it opens.
		for (const endpoint of broker.registry.getActionEndpoints("members.get").endpoints)
			(endpoint as { state: boolean }).state = false;
		await expect(broker.call("members.get", { memberId: "0001" })).rejects.toMatchObject({
			type: "SERVICE_NOT_AVAILABLE"
		});
		expect((await getMember(port)).status).toBe(503);
	});

	it("wraps moleculer-web's aliasHandler, and refuses to start when an upgrade moved it", () => {
		const stock = (ApiGateway.methods as Record<string, unknown>).aliasHandler;
		expect(stockAliasHandler(ApiGateway)).toBe(stock);
		expect(String(stock)).toMatch(/^async aliasHandler\(req, res, alias\)/);
		expect(() => stockAliasHandler({ methods: {} })).toThrow(
			"lib/gateway/wait-for-service.ts patches moleculer-web internals checked against 0.11.0; the installed version lacks aliasHandler"
		);
		expect(() =>
			stockAliasHandler({ methods: { aliasHandler: async (_req: unknown) => true } })
		).toThrow("moleculer-web's aliasHandler now takes 1 parameters, not 3");
	});
});
