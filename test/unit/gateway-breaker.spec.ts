/**
 * The circuit breaker guards calls to a service, not the gateway: when one route's action keeps
 * failing, its breaker opens and that route is refused at once (503), while every other route goes on
 * answering. Moleculer wraps every action in the breaker, the gateway's own `api.rest` (the action each
 * request runs in) too; it must never be the one that opens, or one broken service would take the
 * whole API down for `halfOpenTime`.
 */
import { Errors, type ServiceBroker } from "moleculer";
import ApiService from "../../services/api.service";
import { createTestBroker } from "../helpers/broker";
import { freePort, TOKENS } from "../helpers/system";

/** A members service whose every read fails with a 500 of its own. */
const BrokenMembers = {
	name: "members",
	actions: {
		get() {
			throw new Errors.MoleculerError("Something broke in members.get", 500, "BROKEN");
		}
	}
};

describe("a failing route and the rest of the gateway", () => {
	let broker: ServiceBroker;
	let port: number;

	beforeAll(async () => {
		port = await freePort();
		broker = createTestBroker([ApiService, BrokenMembers], {
			API_KEYS: `${TOKENS.staff}=staff`,
			PORT: String(port),
			HOST: "127.0.0.1",
			METRICS_PORT: "off",
			LOG_LEVEL: "fatal"
		});
		await broker.start();
	});
	afterAll(() => broker.stop());

	const get = (route: string) =>
		fetch(`http://127.0.0.1:${port}/api${route}`, {
			headers: { authorization: `Bearer ${TOKENS.staff}` }
		});

	it("opens the failing action's breaker and keeps answering every other route", async () => {
		const statuses: number[] = [];
		for (let i = 0; i < 20; i++) statuses.push((await get("/members/0001")).status);
		// members.get failed until its breaker opened; then the route is refused at once.
		expect(statuses.slice(0, 10)).toEqual(Array(10).fill(500));
		expect(statuses.at(-1)).toBe(503);
		const me = await get("/me");
		expect(me.status).toBe(200);
		expect(await me.json()).toEqual({ role: "staff" });
		expect((await get("/health")).status).toBe(200);
	});
});
