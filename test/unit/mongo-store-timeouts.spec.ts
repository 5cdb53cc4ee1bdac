/**
 * A MongoDB that hangs (accepts connections, never answers) fails a call with 503
 * `STORE_UNAVAILABLE` within MONGO_TIMEOUT_MS, rather than holding it until the caller gives up; once
 * the store answers again, so do the calls. The store sits behind a TCP relay that the test can
 * stop answering; the broker's own request timeout (10 s) would fail the call otherwise, as a
 * `REQUEST_TIMEOUT`, long after MONGO_TIMEOUT_MS.
 */
import net from "node:net";
import type { ServiceBroker } from "moleculer";
import { toHttpError } from "../../lib/gateway/http-errors";
import PointsService from "../../services/points.service";
import { createTestBroker, eventually } from "../helpers/broker";

/** Relays connections to `upstream`; `hang()` makes it swallow what clients send and answer nothing. */
class HangingRelay {
	private hung = false;
	private readonly pairs = new Set<[net.Socket, net.Socket]>();
	private constructor(private readonly server: net.Server) {}

	static async start(upstream: { host: string; port: number }): Promise<HangingRelay> {
		const relay = new HangingRelay(
			net.createServer(client => {
				client.on("error", () => client.destroy());
				// A hung server still accepts: the client waits for an answer that never comes.
				if (relay.hung) return void client.on("data", () => undefined);
				const server = net.connect(upstream.port, upstream.host);
				server.on("error", () => client.destroy());
				client.on("close", () => server.destroy());
				server.on("close", () => client.destroy());
				client.pipe(server);
				server.pipe(client);
				const pair: [net.Socket, net.Socket] = [client, server];
				relay.pairs.add(pair);
				client.on("close", () => relay.pairs.delete(pair));
			})
		);
		await new Promise<void>(resolve => relay.server.listen(0, "127.0.0.1", resolve));
		return relay;
	}

	get port(): number {
		return (this.server.address() as net.AddressInfo).port;
	}

	/** Open connections stop answering, and new ones are accepted and never answered. */
	hang(): void {
		this.hung = true;
		for (const [client, server] of this.pairs) {
			client.unpipe(server);
			server.unpipe(client);
			client.on("data", () => undefined);
			server.on("data", () => undefined);
		}
	}

	answer(): void {
		this.hung = false;
	}

	async stop(): Promise<void> {
		for (const [client, server] of this.pairs) {
			client.destroy();
			server.destroy();
		}
		await new Promise(resolve => this.server.close(resolve));
	}
}

describe("a MongoDB that hangs", () => {
	let relay: HangingRelay;
	let broker: ServiceBroker;
	const balance = (memberId: string) =>
		broker.call<{ balance: number }, object>("points.get", { memberId });

	beforeAll(async () => {
		// Each test file has a database of its own on the test server (MONGO_URI, setup-mongo.ts).
		const store = new URL(process.env.MONGO_URI as string);
		relay = await HangingRelay.start({ host: store.hostname, port: Number(store.port) });
		store.host = `127.0.0.1:${relay.port}`;
		broker = createTestBroker([PointsService], {
			MONGO_URI: store.toString(),
			MONGO_TIMEOUT_MS: "500",
			LOG_LEVEL: "fatal"
		});
		await broker.start();
	});
	afterAll(async () => {
		relay.answer();
		await broker.stop();
		await relay.stop();
	});

	it("fails a call with 503 STORE_UNAVAILABLE within MONGO_TIMEOUT_MS, and answers again once the store does", async () => {
		await broker.call("points.debit", {
			memberId: "h1",
			sourceType: "deal",
			sourceId: "u1",
			amount: 1
		});
		expect(await balance("h1")).toMatchObject({ balance: 0 });

		relay.hang();
		const failure = await balance("h1").catch((err: unknown) => err);
		expect(failure).toMatchObject({
			code: 503,
			type: "STORE_UNAVAILABLE",
			message: "The store did not answer in time (collection 'accounts'); try again later",
			data: { retryAfter: 5 }
		});
		// What the gateway answers a client with it: 503 and `Retry-After`.
		expect(toHttpError(failure, 5)).toEqual({
			name: "ServiceUnavailableError",
			message: "The store did not answer in time (collection 'accounts'); try again later",
			code: 503,
			type: "STORE_UNAVAILABLE",
			data: { retryAfter: 5 }
		});
		// A second call while it still hangs fails the same way (a new connection, or none to be had).
		await expect(balance("h1")).rejects.toMatchObject({ code: 503, type: "STORE_UNAVAILABLE" });

		relay.answer();
		await eventually(async () => expect(await balance("h1")).toMatchObject({ balance: 0 }), 20_000);
	});
});
