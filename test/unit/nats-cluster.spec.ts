/**
 * Production's NATS (docker-compose.prod.yml, deploy/kubernetes/nats): three real nats-servers in a
 * cluster, and a node with NATS_STREAM_REPLICAS=3. Its streams and durable consumers are created with 3
 * replicas (the stock adapter would take the server's default, one), so a message published and one
 * waiting are still delivered after a server is lost.
 */
import type { ServiceBroker } from "moleculer";
import { connect, type NatsConnection } from "nats";
import { createTestBroker, eventually } from "../helpers/broker";
import { NatsCluster } from "../helpers/nats";

jest.setTimeout(120_000);

describe("streams on a three-server NATS cluster", () => {
	let cluster: NatsCluster;
	let broker: ServiceBroker;
	let nc: NatsConnection;
	let send: (channel: string, payload: object) => Promise<void>;
	const kept: string[] = [];

	beforeAll(async () => {
		cluster = await NatsCluster.start();
		nc = await connect({ servers: cluster.servers.map(s => `127.0.0.1:${s.port}`) });
		// JetStream answers once the servers have elected its meta leader.
		await eventually(() => nc.jetstreamManager(), 60_000, 500);
		broker = createTestBroker(
			[
				{
					name: "keeper",
					channels: {
						"thing.kept": {
							group: "keeper",
							handler: async (p: { id: string }) => void kept.push(p.id)
						}
					}
				}
			],
			{ TRANSPORTER: cluster.url, NATS_STREAM_REPLICAS: "3", NODE_ID: `replicas-${process.pid}` }
		);
		await broker.start();
		send = (broker as unknown as { sendToChannel: typeof send }).sendToChannel.bind(broker);
	});

	afterAll(async () => {
		await broker?.stop();
		await nc?.close();
		await cluster?.stop();
	});

	it("creates every stream and durable consumer with 3 replicas, and keeps delivering when a server is lost", async () => {
		await send("thing.kept", { id: "before" });
		await eventually(() => expect(kept).toEqual(["before"]), 20_000, 100);

		const jsm = await nc.jetstreamManager();
		const streams = await jsm.streams.list().next();
		const stream = streams.find(s =>
			s.config.subjects?.some(subject => subject.endsWith("thing.kept"))
		);
		expect(stream?.config.num_replicas).toBe(3);
		const consumers = await jsm.consumers.list(stream?.config.name ?? "").next();
		expect(consumers.map(c => c.config.num_replicas)).toEqual([3]);

		await cluster.servers[2].stop();
		await eventually(() => send("thing.kept", { id: "after" }), 30_000, 500);
		await eventually(() => expect(kept).toEqual(["before", "after"]), 30_000, 100);
	});
});
