/**
 * A collection whose MongoDB is not there yet (a node starting before its database) keeps trying
 * and connects once the server answers, as moleculer-db does for a service's main collection.
 */
import { ServiceBroker } from "moleculer";
import { MongoStandIn } from "../mongo/wire-server";
import { freePort } from "../helpers/system";

describe("a collection's first connection", () => {
	let server: MongoStandIn | undefined;
	afterAll(() => server?.stop());

	it("is retried until the server answers", async () => {
		const port = await freePort();
		// Read when the store module loads; a short server selection makes each attempt fail fast.
		process.env.MONGO_URI = `mongodb://127.0.0.1:${port}/late?serverSelectionTimeoutMS=200`;
		const { openCollection } = await import("../../mixins/db.mixin");
		const broker = new ServiceBroker({ logger: false });
		const owner = { broker, logger: broker.getLogger("store-test") };
		const collection = openCollection<{ _id: string }>(owner, "late");
		let connected = false;
		const connecting = collection.connect(owner.logger).then(() => (connected = true));
		// Two attempts fail meanwhile.
		await new Promise(resolve => setTimeout(resolve, 1500));
		expect(connected).toBe(false);
		server = await MongoStandIn.start(port);
		await connecting;
		await collection.insertUnique({ _id: "l1" });
		expect(await collection.findById("l1")).toEqual({ _id: "l1" });
		await collection.disconnect();
	});
});
