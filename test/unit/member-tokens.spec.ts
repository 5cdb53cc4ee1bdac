/**
 * Member tokens through the gateway over HTTP, on each store: JWTs from an identity provider (a real
 * JWKS endpoint this test serves, with keys it generates, one rotated in while the node runs) and
 * sessions OnePoint issues; every refusal; a member reaching each route it may, and only its own
 * rows; withdrawal and erasure ending access; the per-member rate limit; the contract.
 */
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import type { AddressInfo } from "node:net";
import {
	createLocalJWKSet,
	exportJWK,
	generateKeyPair,
	generateSecret,
	jwtVerify,
	SignJWT,
	type CryptoKey,
	type JWK
} from "jose";
import type { ServiceBroker } from "moleculer";
import ApiService from "../../services/api.service";
import DealsService from "../../services/deals.service";
import DeliveriesService from "../../services/deliveries.service";
import IdempotencyService from "../../services/idempotency.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import MyPointsService from "../../services/my-points.service";
import OrdersService from "../../services/orders.service";
import PaymentsService from "../../services/payments.service";
import PointsService from "../../services/points.service";
import DashboardService from "../../services/dashboard.service";
import BillingService from "../../services/billing.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freePort, TOKENS } from "../helpers/system";

interface Reply<T = any> {
	status: number;
	body: T;
	headers: Headers;
}

const ISSUER = "https://idp.example.test/realms/onepoint";
const RATE_LIMIT = 100;

/** The identity provider's JWKS, as the test changes it, and how often it was fetched. */
class Provider {
	keys: JWK[] = [];
	fetches = 0;
	private server = http.createServer((_req, res) => {
		this.fetches++;
		res
			.writeHead(200, { "Content-Type": "application/json" })
			.end(JSON.stringify({ keys: this.keys }));
	});
	url = "";

	async start() {
		await new Promise<void>(resolve => this.server.listen(0, "127.0.0.1", resolve));
		this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/jwks`;
	}

	stop() {
		return new Promise(resolve => this.server.close(resolve));
	}

	/** A key pair of `alg`, published under `kid` (or kept private, to forge with). */
	async key(alg: string, kid: string, publish = true): Promise<CryptoKey> {
		const { publicKey, privateKey } = await generateKeyPair(alg, { extractable: true });
		if (publish) this.keys.push({ ...(await exportJWK(publicKey)), kid, alg, use: "sig" });
		return privateKey;
	}
}

/** A token as the provider signs it; `claims` and `header` override the defaults. */
async function jwt(
	key: CryptoKey | Uint8Array,
	header: { alg: string; kid?: string },
	claims: Record<string, unknown>
): Promise<string> {
	const now = Math.floor(Date.now() / 1000);
	return new SignJWT({
		iss: ISSUER,
		aud: "onepoint",
		iat: now,
		nbf: now,
		exp: now + 300,
		...claims
	})
		.setProtectedHeader(header)
		.sign(key);
}

const b64 = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");

describe("member tokens", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	const provider = new Provider();
	let broker: ServiceBroker;
	let port: number;
	let es256: CryptoKey;
	let rs256: CryptoKey;
	let eddsa: CryptoKey;
	/** A provider token for a member. */
	const tokenOf = (memberId: string, claims: Record<string, unknown> = {}) =>
		jwt(es256, { alg: "ES256", kid: "es" }, { sub: memberId, ...claims });

	const call = async <T = any>(
		method: string,
		route: string,
		body?: unknown,
		token: string | null = TOKENS.staff
	): Promise<Reply<T>> => {
		const response = await fetch(`http://127.0.0.1:${port}/api${route}`, {
			method,
			headers: {
				...(token ? { Authorization: `Bearer ${token}` } : {}),
				...(body === undefined ? {} : { "Content-Type": "application/json" })
			},
			body: body === undefined ? undefined : JSON.stringify(body)
		});
		const text = await response.text();
		return {
			status: response.status,
			body:
				text && response.headers.get("content-type")?.includes("json") ? JSON.parse(text) : text,
			headers: response.headers
		};
	};

	beforeAll(async () => {
		await provider.start();
		es256 = await provider.key("ES256", "es");
		rs256 = await provider.key("RS256", "rs");
		eddsa = await provider.key("EdDSA", "ed");
		port = await freePort();
		broker = createTestBroker(
			[
				ApiService,
				IdempotencyService,
				MembersService,
				MerchantsService,
				PointsService,
				DealsService,
				BillingService,
				OrdersService,
				PaymentsService,
				DeliveriesService,
				MyPointsService,
				DashboardService
			],
			{
				PORT: String(port),
				HOST: "127.0.0.1",
				API_KEYS: `${TOKENS.staff}=staff,${TOKENS.merchant20}=merchant:20`,
				MEMBER_JWKS_URL: provider.url,
				MEMBER_JWT_ISSUER: ISSUER,
				MEMBER_RATE_LIMIT: String(RATE_LIMIT)
			}
		);
		await broker.start();
		for (const memberId of ["m1", "m2", "m3", "m4", "m5", "burst"])
			expect((await call("POST", "/members", { memberId, name: `Name ${memberId}` })).status).toBe(
				201
			);
		await drained(broker);
	});
	afterAll(async () => {
		await broker.stop();
		await provider.stop();
	});

	it("accepts the provider's ES256, RS256 and EdDSA tokens for an existing member", async () => {
		for (const token of [
			await tokenOf("m1"),
			await jwt(rs256, { alg: "RS256", kid: "rs" }, { sub: "m1" }),
			await jwt(eddsa, { alg: "EdDSA", kid: "ed" }, { sub: "m1" }),
			// Within the 30 s of clock skew on either side.
			await tokenOf("m1", { exp: Math.floor(Date.now() / 1000) - 20 }),
			await tokenOf("m1", { nbf: Math.floor(Date.now() / 1000) + 20 })
		])
			expect(await call("GET", "/me", undefined, token)).toMatchObject({
				status: 200,
				body: { role: "member", memberId: "m1" }
			});
	});

	it("refuses every other token with 401 INVALID_TOKEN", async () => {
		const now = Math.floor(Date.now() / 1000);
		const valid = await tokenOf("m1");
		const [header, , signature] = valid.split(".");
		const forged = await provider.key("ES256", "es", false);
		const secret = await generateSecret("HS256");
		const refused = {
			"alg none": `${b64({ alg: "none" })}.${b64({ iss: ISSUER, aud: "onepoint", sub: "m1", exp: now + 300 })}.`,
			HMAC: await jwt(secret, { alg: "HS256", kid: "es" }, { sub: "m1" }),
			"wrong issuer": await tokenOf("m1", { iss: "https://other.example.test" }),
			"wrong audience": await tokenOf("m1", { aud: "someone-else" }),
			expired: await tokenOf("m1", { exp: now - 31 }),
			"not yet valid": await tokenOf("m1", { nbf: now + 60 }),
			"no expiry": await tokenOf("m1", { exp: undefined }),
			"bad signature": await jwt(forged, { alg: "ES256", kid: "es" }, { sub: "m1" }),
			"changed claims": `${header}.${b64({ iss: ISSUER, aud: "onepoint", sub: "m2", exp: now + 300 })}.${signature}`,
			"over 8 KB": await tokenOf("m1", { padding: "x".repeat(8200) }),
			"not a JWT": "not.a.jwt",
			"unknown member": await tokenOf("nobody"),
			"no member claim": await tokenOf("m1", { sub: undefined }),
			"a made-up token": "made-up-token-0123456789"
		};
		for (const [why, token] of Object.entries(refused)) {
			const reply = await call("GET", "/me", undefined, token);
			expect({ why, status: reply.status, type: reply.body.type }).toEqual({
				why,
				status: 401,
				type: "INVALID_TOKEN"
			});
		}
	});

	it("fetches a key rotated into the provider's JWKS, at most once every 30 s", async () => {
		const rotated = await provider.key("ES256", "rotated");
		const before = provider.fetches;
		const token = await jwt(rotated, { alg: "ES256", kid: "rotated" }, { sub: "m1" });
		// The keys were fetched moments ago (the first test): an unknown kid waits out the cooldown.
		const early = await call("GET", "/me", undefined, token);
		expect(early).toMatchObject({ status: 401, body: { type: "INVALID_TOKEN" } });
		for (let i = 0; i < 5; i++)
			await call(
				"GET",
				"/me",
				undefined,
				await jwt(rotated, { alg: "ES256", kid: `made-up-${i}` }, { sub: "m1" })
			);
		expect(provider.fetches).toBe(before);
		jest.setSystemTime(Date.now() + 31_000);
		const later = await jwt(rotated, { alg: "ES256", kid: "rotated" }, { sub: "m1" });
		expect(await call("GET", "/me", undefined, later)).toMatchObject({
			status: 200,
			body: { memberId: "m1" }
		});
		expect(provider.fetches).toBe(before + 1);
		// Known from now on: no fetch per request.
		await call("GET", "/me", undefined, later);
		expect(provider.fetches).toBe(before + 1);
	});

	it("issues OnePoint's own sessions to staff, verifiable against its public JWKS", async () => {
		const session = await call("POST", "/members/m1/sessions", {});
		expect(session.status).toBe(201);
		// Never kept for an Idempotency-Key: the token exists in this answer only.
		expect(session.headers.get("cache-control")).toBe("no-store");
		const { token, expiresAt } = session.body;
		expect(Date.parse(expiresAt) - Date.now()).toBeGreaterThan(890_000);
		expect(Date.parse(expiresAt) - Date.now()).toBeLessThanOrEqual(900_000);
		expect(await call("GET", "/me", undefined, token)).toMatchObject({
			status: 200,
			body: { role: "member", memberId: "m1" }
		});

		const jwks = await call("GET", "/.well-known/jwks.json", undefined, null);
		expect(jwks.status).toBe(200);
		expect(jwks.body.keys).toHaveLength(1);
		expect(jwks.body.keys[0]).toMatchObject({ kty: "EC", crv: "P-256", alg: "ES256" });
		expect(jwks.body.keys[0].d).toBeUndefined();
		const { payload, protectedHeader } = await jwtVerify(token, createLocalJWKSet(jwks.body), {
			currentDate: new Date()
		});
		expect(payload).toMatchObject({ iss: "onepoint", aud: "onepoint", sub: "m1" });
		expect(protectedHeader).toMatchObject({ alg: "ES256", kid: jwks.body.keys[0].kid });

		// Generated once into the data folder, readable by its owner only.
		const keyFile = path.join(process.env.DATA_DIR!, "member-token-key.pem");
		expect(fs.statSync(keyFile).mode & 0o777).toBe(0o600);

		expect((await call("POST", "/members/nobody/sessions", {})).body.type).toBe("MEMBER_NOT_FOUND");
		expect((await call("POST", "/members/m1/sessions", { ttl: 5 })).status).toBe(422);
		// A member may not issue sessions, for itself or anyone.
		expect((await call("POST", "/members/m1/sessions", {}, token)).status).toBe(403);
	});

	it("lets a member reach each route it may, for itself, and refuses another member's", async () => {
		const m1 = await tokenOf("m1");
		await call("POST", "/deals", {
			memberId: "m1",
			merchantId: "20",
			dealAmount: 100_000,
			type: "save"
		});
		await call("POST", "/deals", {
			memberId: "m2",
			merchantId: "20",
			dealAmount: 100_000,
			type: "save"
		});
		await drained(broker);

		expect((await call("GET", "/members/m1", undefined, m1)).body).toMatchObject({
			memberId: "m1"
		});
		expect((await call("GET", "/points/m1", undefined, m1)).body).toMatchObject({ balance: 1000 });
		expect((await call("GET", "/points/m1/history", undefined, m1)).body.total).toBe(1);
		const exported = await call("GET", "/points/m1/history.csv", undefined, m1);
		expect([exported.status, exported.headers.get("content-type")]).toEqual([
			200,
			"text/csv; charset=utf-8"
		]);
		expect((await call("GET", "/my-points/m1", undefined, m1)).status).toBe(200);
		expect((await call("GET", "/points/m1/transfers", undefined, m1)).status).toBe(200);

		// Lists: its own rows only, whether or not it names itself.
		const deals = await call("GET", "/deals", undefined, m1);
		expect(deals.body.rows.map((d: { memberId: string }) => d.memberId)).toEqual(["m1"]);
		expect((await call("GET", "/deals?memberId=m1", undefined, m1)).body.total).toBe(1);
		const ownDeal = deals.body.rows[0].id;
		const otherDeal = (await call("GET", "/deals?memberId=m2")).body.rows[0].id;
		expect((await call("GET", `/deals/${ownDeal}`, undefined, m1)).status).toBe(200);

		const order = await call(
			"POST",
			"/orders",
			{ memberId: "m1", productId: "p1", qty: 1, unitPrice: 1000 },
			m1
		);
		expect(order.status).toBe(201);
		const otherOrder = (
			await call("POST", "/orders", { memberId: "m2", productId: "p1", qty: 1, unitPrice: 1000 })
		).body;
		const orders = await call("GET", "/orders", undefined, m1);
		expect(orders.body.rows.map((o: { memberId: string }) => o.memberId)).toEqual(["m1"]);
		expect((await call("GET", `/orders/${order.body.id}`, undefined, m1)).status).toBe(200);

		const transfer = await call(
			"POST",
			"/points/m1/transfers",
			{ toMemberId: "m2", points: 10 },
			m1
		);
		expect(transfer.status).toBe(201);
		await drained(broker);

		// Another member's data: 403 FORBIDDEN, nothing changed.
		const m2Balance = (await call("GET", "/points/m2")).body.balance;
		const others: [string, string, unknown?][] = [
			["GET", "/members/m2"],
			["PATCH", "/members/m2", { name: "Taken over" }],
			["DELETE", "/members/m2"],
			["GET", "/members/m2/data"],
			["GET", "/points/m2"],
			["GET", "/points/m2/history"],
			["GET", "/points/m2/history.csv"],
			["GET", "/points/m2/transfers"],
			["POST", "/points/m2/transfers", { toMemberId: "m1", points: 10 }],
			["GET", "/my-points/m2"],
			["GET", "/deals?memberId=m2"],
			["GET", `/deals/${otherDeal}`],
			["POST", "/orders", { memberId: "m2", productId: "p1", qty: 1, unitPrice: 1000 }],
			["GET", "/orders?memberId=m2"],
			["GET", `/orders/${otherOrder.id}`],
			["POST", `/orders/${otherOrder.id}/cancel`, {}]
		];
		for (const [method, route, body] of others) {
			const reply = await call(method, route, body, m1);
			expect({ route, method, status: reply.status, type: reply.body.type }).toEqual({
				route,
				method,
				status: 403,
				type: "FORBIDDEN"
			});
		}
		// Nothing else at all: staff's and merchants' routes, and joining members.
		const staffOnly: [string, string, unknown?][] = [
			["POST", "/points/m1/adjustments", { points: 100, reason: "gift" }],
			["POST", "/deals", { memberId: "m1", merchantId: "20", dealAmount: 100, type: "save" }],
			["POST", `/deals/${ownDeal}/cancel`, {}],
			["GET", "/billings"],
			["GET", "/merchants"],
			["POST", "/members", { name: "New" }],
			["POST", "/members/m1/erasure", {}],
			["GET", "/dashboard/overview"],
			["GET", "/dashboard/members/m1"],
			["GET", "/payments"]
		];
		for (const [method, route, body] of staffOnly)
			expect({ route, status: (await call(method, route, body, m1)).status }).toEqual({
				route,
				status: 403
			});
		expect((await call("GET", "/members/m2")).body.name).toBe("Name m2");
		expect((await call("GET", "/points/m2")).body.balance).toBe(m2Balance);
		expect((await call("GET", `/orders/${otherOrder.id}`)).body.status).toBe("paid");

		expect((await call("POST", `/orders/${order.body.id}/cancel`, {}, m1)).status).toBe(200);
	});

	it("changes a member's name and contact, validated as at joining, the read models following", async () => {
		const m5 = await tokenOf("m5");
		const changed = await call(
			"PATCH",
			"/members/m5",
			{ name: "Renamed", email: "m5@example.org" },
			m5
		);
		expect(changed).toMatchObject({
			status: 200,
			body: { memberId: "m5", name: "Renamed", email: "m5@example.org", phone: null }
		});
		expect((await call("PATCH", "/members/m5", { phone: "+81 3-1234-5678" })).body.phone).toBe(
			"+81 3-1234-5678"
		);
		for (const bad of [
			{ phone: "call me" },
			{ email: "not-an-email" },
			{ status: "erased" },
			{},
			{ name: "" }
		]) {
			const reply = await call("PATCH", "/members/m5", bad, m5);
			expect(reply.status).toBe(422);
			expect(reply.body.type).toBeTruthy();
		}
		expect((await call("GET", "/members/m5")).body).toMatchObject({
			name: "Renamed",
			phone: "+81 3-1234-5678",
			status: "active"
		});
		await eventually(async () =>
			expect((await call("GET", "/dashboard/members/m5")).body.member.name).toBe("Renamed")
		);
	});

	it("exports every record held about a member, to itself and to staff", async () => {
		const m1 = await tokenOf("m1");
		const own = await call("GET", "/members/m1/data", undefined, m1);
		expect(own.status).toBe(200);
		expect(own.body).toMatchObject({
			memberId: "m1",
			profile: { memberId: "m1", name: "Name m1" },
			account: { memberId: "m1" }
		});
		expect(own.body.ledger.length).toBeGreaterThanOrEqual(3);
		expect(own.body.deals).toHaveLength(1);
		expect(own.body.orders).toHaveLength(1);
		expect(own.body.payments.length).toBeGreaterThanOrEqual(1);
		expect(own.body.transfers).toHaveLength(1);
		expect(Array.isArray(own.body.deliveries)).toBe(true);
		expect(own.body.truncated).toBeUndefined();
		expect((await call("GET", "/members/m1/data")).body.memberId).toBe("m1");
	});

	it("ends a withdrawn or erased member's access: tokens 403 MEMBER_WITHDRAWN, no new sessions", async () => {
		const m3 = await tokenOf("m3");
		const session = (await call("POST", "/members/m3/sessions", {})).body.token;
		expect((await call("DELETE", "/members/m3", undefined, m3)).status).toBe(200);
		for (const token of [m3, session, await tokenOf("m3")])
			expect(await call("GET", "/me", undefined, token)).toMatchObject({
				status: 403,
				body: { type: "MEMBER_WITHDRAWN" }
			});
		expect(await call("POST", "/members/m3/sessions", {})).toMatchObject({
			status: 409,
			body: { type: "MEMBER_WITHDRAWN" }
		});

		const m4 = await tokenOf("m4");
		expect((await call("GET", "/points/m4", undefined, m4)).status).toBe(200);
		expect((await call("POST", "/members/m4/erasure", {})).status).toBe(200);
		expect((await call("GET", "/points/m4", undefined, m4)).body.type).toBe("MEMBER_WITHDRAWN");
	});

	it("limits each member to MEMBER_RATE_LIMIT requests a minute, without limiting others", async () => {
		const burst = await tokenOf("burst");
		const other = await tokenOf("m2");
		for (let i = 0; i < RATE_LIMIT; i++)
			expect((await call("GET", "/me", undefined, burst)).status).toBe(200);
		const limited = await call("GET", "/me", undefined, burst);
		expect(limited).toMatchObject({ status: 429, body: { type: "RATE_LIMIT_EXCEEDED" } });
		expect(Number(limited.headers.get("retry-after"))).toBeGreaterThan(0);
		// Another token of the same member counts with it; another member does not.
		expect((await call("GET", "/me", undefined, await tokenOf("burst", { jti: "2" }))).status).toBe(
			429
		);
		expect((await call("GET", "/me", undefined, other)).status).toBe(200);
	});

	it("describes the member bearer scheme and who may call each route in the contract", async () => {
		const contract = (await call("GET", "/openapi.json", undefined, null)).body;
		expect(contract.components.securitySchemes.memberToken).toMatchObject({
			type: "http",
			scheme: "bearer",
			bearerFormat: "JWT"
		});
		const op = (route: string, method: string) => contract.paths[route][method];
		expect(op("/api/points/{memberId}", "get")["x-roles"]).toEqual(["staff", "merchant", "member"]);
		expect(op("/api/points/{memberId}", "get").security).toEqual([
			{ bearer: [] },
			{ memberToken: [] }
		]);
		expect(op("/api/points/{memberId}/adjustments", "post")["x-roles"]).toEqual(["staff"]);
		expect(op("/api/members/{memberId}", "patch")["x-roles"]).toEqual(["staff", "member"]);
		expect(op("/api/.well-known/jwks.json", "get").security).toEqual([]);
	});
});
