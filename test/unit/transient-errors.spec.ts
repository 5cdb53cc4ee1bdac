/**
 * Which failures a channel waits out rather than dead-letters (`isTransient`, lib/errors.ts, as
 * redelivery's FailureCounts applies it): the errors production code really raises when a store or a
 * service is unavailable, taken from where they arise, and not a request that is wrong in itself.
 * Nothing here needs a store: the MongoDB collection is never connected, so mongoose's wait for a
 * connection runs out (MONGO_TIMEOUT_MS) as it does while a server is down.
 */
import { Errors, ServiceBroker } from "moleculer";
import { loadConfig } from "../../config";
import { FailureCounts } from "../../lib/channels/redelivery";
import { isTransient } from "../../lib/errors";
import { Collection } from "../../mixins/db.mixin";

const MAX_RETRIES = 8;

/** Whether a consumer ever gives up on a message that keeps failing with `err` (30 tries). */
function givesUp(err: unknown): boolean {
	const counts = new FailureCounts({ retryDelayMs: 1000, maxRetryDelayMs: 60_000 });
	for (let attempt = 0, now = 0; attempt < 30; attempt++, now += 60_000)
		if (counts.failed("m1", err, MAX_RETRIES, now).giveUp) return true;
	return false;
}

describe("transient errors (what a channel retries for as long as it takes)", () => {
	let broker: ServiceBroker;

	beforeAll(async () => {
		broker = new ServiceBroker({ logger: false });
		broker.createService({
			name: "probe",
			actions: {
				slow: () => new Promise(resolve => setTimeout(resolve, 200)),
				count: { params: { n: "number" }, handler: () => true }
			}
		});
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("a store that does not answer: db.mixin's STORE_UNAVAILABLE, and mongoose's buffering timeout behind it", async () => {
		const config = loadConfig({
			MONGO_URI: "mongodb://127.0.0.1:9/probe",
			MONGO_TIMEOUT_MS: "100"
		});
		const collection = new Collection<{ _id: string }>("transient_probe", [], config);
		const err = await collection.find({ query: {} }).catch((e: unknown) => e);
		expect(err).toMatchObject({ code: 503, type: "STORE_UNAVAILABLE" });
		const cause = (err as { cause?: Error }).cause;
		expect(cause).toMatchObject({ name: "MongooseError" });
		expect(cause?.message).toContain("buffering timed out");
		expect(isTransient(err)).toBe(true);
		expect(isTransient(cause)).toBe(true);
		expect(givesUp(err)).toBe(false);
		expect(givesUp(cause)).toBe(false);
	});

	it("a service that does not answer in time, or whose every endpoint is unavailable", async () => {
		const timeout = await broker.call("probe.slow", {}, { timeout: 20 }).catch((e: unknown) => e);
		expect(timeout).toBeInstanceOf(Errors.RequestTimeoutError);
		const notAvailable = new Errors.ServiceNotAvailableError({
			action: "points.debit",
			nodeID: "n1"
		});
		for (const err of [timeout, notAvailable]) {
			expect(isTransient(err)).toBe(true);
			expect(givesUp(err)).toBe(false);
		}
	});

	it("a request that is wrong in itself is the handler's own failure: it counts, and is given up", async () => {
		const invalid = await broker.call("probe.count", { n: "x" }).catch((e: unknown) => e);
		expect(invalid).toBeInstanceOf(Errors.ValidationError);
		expect(isTransient(invalid)).toBe(false);
		expect(givesUp(invalid)).toBe(true);
	});
});
