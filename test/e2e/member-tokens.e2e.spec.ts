/**
 * Member tokens over a cluster (NATS), on each store: a data node with every service and its own
 * gateway, and a second gateway node, sharing OnePoint's signing key (MEMBER_TOKEN_KEY). A session
 * issued on one gateway works on both, for its own member only; withdrawn, it is refused on both
 * within 5 s, and so is a session issued before it.
 */
import { generateKeyPairSync } from "node:crypto";
import { eventually } from "../helpers/broker";
import { faketime } from "../helpers/clock";
import { NatsServer } from "../helpers/nats";
import { freePort, System } from "../helpers/system";

jest.setTimeout(120_000);

describe("member tokens over a cluster", () => {
	let nats: NatsServer;
	let data: System;
	let edge: System;

	beforeAll(async () => {
		nats = await NatsServer.start();
		const key = generateKeyPairSync("ec", { namedCurve: "P-256" })
			.privateKey.export({ type: "pkcs8", format: "pem" })
			.toString();
		const env = (name: string) => ({
			TRANSPORTER: nats.url,
			NODE_ID: `${name}-${process.pid}`,
			RATE_LIMIT: "1000000",
			MEMBER_TOKEN_KEY: key,
			...faketime("2026-05-20 10:00:00")
		});
		data = new System(await freePort(), env("data"), await freePort());
		edge = new System(await freePort(), { ...env("edge"), SERVICES: "api" }, await freePort());
		await Promise.all([data.start(), edge.start()]);
		await eventually(async () =>
			expect((await edge.call("GET", "/api/members/nobody")).status).toBe(404)
		);
		for (const memberId of ["w001", "w002"])
			await data.call("POST", "/api/members", { memberId, name: memberId });
	});

	afterAll(async () => {
		await Promise.all([data, edge].map(node => node?.stop()));
		await nats?.stop();
	});

	it("honours a session on every gateway, and refuses it on every gateway within 5 s of the withdrawal", async () => {
		const issued = await edge.call("POST", "/api/members/w001/sessions", {});
		expect(issued.status).toBe(201);
		const auth = { authorization: `Bearer ${issued.body.token}` };
		const jwks = await Promise.all(
			[data, edge].map(async node => (await node.call("GET", "/api/.well-known/jwks.json")).body)
		);
		expect(jwks[0]).toEqual(jwks[1]);
		for (const gateway of [data, edge]) {
			expect((await gateway.call("GET", "/api/me", undefined, auth)).body).toEqual({
				role: "member",
				memberId: "w001"
			});
			expect((await gateway.call("GET", "/api/members/w002", undefined, auth)).status).toBe(403);
		}

		expect((await data.call("DELETE", "/api/members/w001", undefined, auth)).status).toBe(200);
		for (const gateway of [data, edge])
			await eventually(
				async () =>
					expect(await gateway.call("GET", "/api/me", undefined, auth)).toMatchObject({
						status: 403,
						body: { type: "MEMBER_WITHDRAWN" }
					}),
				5_000
			);
		expect(await edge.call("POST", "/api/members/w001/sessions", {})).toMatchObject({
			status: 409,
			body: { type: "MEMBER_WITHDRAWN" }
		});
	});
});
