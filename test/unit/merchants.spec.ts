/**
 * Merchants as partners, through the gateway over HTTP, on each store: the registry, terms that
 * change without rewriting the past, suspension, unregistered merchants (MERCHANTS), keys issued,
 * used and revoked, and every bad input refused with a code and nothing changed.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ServiceBroker } from "moleculer";
import ApiService from "../../services/api.service";
import BillingService from "../../services/billing.service";
import DealsService, { type DealView } from "../../services/deals.service";
import IdempotencyService from "../../services/idempotency.service";
import MembersService from "../../services/members.service";
import MerchantsService, {
	type MerchantKey,
	type MerchantView
} from "../../services/merchants.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained, eventually, withSettings } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freshDatabaseUri, onMongo } from "../helpers/store";
import { freePort, TOKENS } from "../helpers/system";

interface Reply<T = any> {
	status: number;
	body: T;
	headers: Headers;
}

/** A node with the gateway and what deals need, and a client of it. */
async function startNode(env: NodeJS.ProcessEnv = {}, merchants = MerchantsService) {
	const port = await freePort();
	const broker = createTestBroker(
		[
			ApiService,
			IdempotencyService,
			MembersService,
			merchants,
			PointsService,
			DealsService,
			BillingService
		],
		{
			PORT: String(port),
			HOST: "127.0.0.1",
			API_KEYS: `${TOKENS.staff}=staff,${TOKENS.merchant20}=merchant:20`,
			...env
		}
	);
	await broker.start();
	const call = async <T = any>(
		method: string,
		path: string,
		body?: unknown,
		token = TOKENS.staff,
		headers: Record<string, string> = {}
	): Promise<Reply<T>> => {
		const response = await fetch(`http://127.0.0.1:${port}/api${path}`, {
			method,
			headers: {
				...(token ? { Authorization: `Bearer ${token}` } : {}),
				...(body === undefined ? {} : { "Content-Type": "application/json" }),
				...headers
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
	return { broker, call };
}

describe("merchants as partners", () => {
	// The test's clock: terms scheduled "from" a moment are reached by moving it.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let call: Awaited<ReturnType<typeof startNode>>["call"];
	const balance = async (memberId: string) =>
		(await call<{ balance: number }>("GET", `/points/${memberId}`)).body.balance;
	const deal = (body: object, token?: string) => call<DealView>("POST", "/deals", body, token);

	beforeAll(async () => {
		({ broker, call } = await startNode());
		for (const memberId of ["m001", "m002", "m003"])
			expect((await call("POST", "/members", { memberId, name: memberId })).status).toBe(201);
	});
	afterAll(() => broker.stop());

	it("registers a merchant on its own terms, or the node's defaults for those not given", async () => {
		const registered = await call<MerchantView>("POST", "/merchants", {
			merchantId: "m-coffee",
			name: "Coffee Roasters",
			earnRate: 0.05,
			redemptionFee: "0.035"
		});
		expect(registered.status).toBe(201);
		expect(registered.headers.get("location")).toBe("/api/merchants/m-coffee");
		const { createdAt } = registered.body;
		expect(createdAt).toMatch(/^2026-05-14T10:00/);
		expect(registered.body).toEqual({
			merchantId: "m-coffee",
			name: "Coffee Roasters",
			status: "active",
			terms: { earnRate: 0.05, redemptionFee: 0.035, pointPrice: 1, holdDays: 0, from: createdAt },
			termsHistory: [
				{ earnRate: 0.05, redemptionFee: 0.035, pointPrice: 1, holdDays: 0, from: createdAt }
			],
			createdAt
		});
		const again = await call("POST", "/merchants", { merchantId: "m-coffee", name: "Other" });
		expect(again).toMatchObject({ status: 409, body: { type: "MERCHANT_EXISTS" } });
		expect((await call("GET", "/merchants/m-coffee")).body.name).toBe("Coffee Roasters");

		expect(
			(await call("POST", "/merchants", { merchantId: "m-books", name: "Books", pointPrice: 1.5 }))
				.body.terms
		).toMatchObject({ earnRate: 0.01, redemptionFee: 0.02, pointPrice: 1.5 });
		const page = await call("GET", "/merchants?pageSize=1&page=2");
		expect(page.body).toMatchObject({ total: 2, page: 2, pageSize: 1 });
		expect(page.body.rows.map((m: MerchantView) => m.merchantId)).toEqual(["m-coffee"]);
		expect((await call("GET", "/merchants/nobody")).body.type).toBe("MERCHANT_NOT_FOUND");
	});

	it("makes each deal under the terms in force at its date, and returns it by what it recorded", async () => {
		const { createdAt } = (
			await call("POST", "/merchants", { merchantId: "m-terms", name: "Terms", earnRate: 0.01 })
		).body;
		const first = await deal({
			memberId: "m001",
			merchantId: "m-terms",
			dealAmount: 10_000,
			type: "save"
		});
		expect(first.body).toMatchObject({
			point: 100,
			terms: { earnRate: 0.01, redemptionFee: 0.02, pointPrice: 1 }
		});

		// From an hour on: the deal before then keeps 0.01, the one after earns 0.05.
		const changed = await call<MerchantView>("POST", "/merchants/m-terms/terms", {
			earnRate: 0.05,
			from: "2026-05-14T11:00:00Z"
		});
		expect(changed.status).toBe(201);
		expect(changed.body.terms.earnRate).toBe(0.01);
		expect(changed.body.termsHistory.map(t => [t.earnRate, t.redemptionFee, t.from])).toEqual([
			[0.01, 0.02, createdAt],
			[0.05, 0.02, "2026-05-14T11:00:00.000Z"]
		]);
		const before = await deal({
			memberId: "m001",
			merchantId: "m-terms",
			dealAmount: 10_000,
			type: "save"
		});
		expect(before.body.point).toBe(100);
		jest.setSystemTime(new Date("2026-05-14T11:00:00.000Z"));
		const after = await deal({
			memberId: "m001",
			merchantId: "m-terms",
			dealAmount: 10_000,
			type: "save"
		});
		expect(after.body).toMatchObject({ point: 500, terms: { earnRate: 0.05 } });
		expect((await call("GET", "/merchants/m-terms")).body.terms.earnRate).toBe(0.05);

		// A later change does not reach what was made before it: each return takes its own deal's points.
		await call("POST", "/merchants/m-terms/terms", { earnRate: 0.2 });
		await drained(broker);
		expect(await balance("m001")).toBe(700);
		expect(
			(await call("POST", `/deals/${first.body.id}/cancel`, { amount: 5000 })).body
		).toMatchObject({ returnedPoints: 50, terms: { earnRate: 0.01 } });
		expect((await call("POST", `/deals/${after.body.id}/cancel`, {})).body).toMatchObject({
			status: "cancelled",
			returnedPoints: 500,
			terms: { earnRate: 0.05 }
		});
		await drained(broker);
		expect(await balance("m001")).toBe(150);
		expect((await call<DealView>("GET", `/deals/${before.body.id}`)).body.terms?.earnRate).toBe(
			0.01
		);
	});

	it("deals with two merchants on their own terms", async () => {
		await call("POST", "/merchants", { merchantId: "m-high", name: "High", earnRate: 0.1 });
		await call("POST", "/merchants", { merchantId: "m-low", name: "Low", earnRate: "0.0025" });
		const high = await deal({
			memberId: "m002",
			merchantId: "m-high",
			dealAmount: 999,
			type: "save"
		});
		const low = await deal({
			memberId: "m002",
			merchantId: "m-low",
			dealAmount: 999,
			type: "save"
		});
		// floor(999 × 0.1) and floor(999 × 0.0025), exact in basis points.
		expect([high.body.point, low.body.point]).toEqual([99, 2]);
		await drained(broker);
		expect(await balance("m002")).toBe(101);
	});

	it("refuses a suspended merchant's new deals, writing nothing, while its returns go on", async () => {
		await call("POST", "/merchants", { merchantId: "m-susp", name: "Suspended" });
		const saved = await deal({
			memberId: "m003",
			merchantId: "m-susp",
			dealAmount: 10_000,
			type: "save"
		});
		await drained(broker);
		const suspended = await call<MerchantView>("POST", "/merchants/m-susp/suspend");
		expect(suspended.body).toMatchObject({ status: "suspended", suspendedAt: expect.any(String) });
		expect((await call("POST", "/merchants/m-susp/suspend")).body.type).toBe("MERCHANT_SUSPENDED");

		const deals = async () => (await call("GET", "/deals?merchantId=m-susp")).body.total;
		for (const body of [
			{ memberId: "m003", merchantId: "m-susp", dealAmount: 10_000, type: "save" },
			{ memberId: "m003", merchantId: "m-susp", dealAmount: 10_000, type: "use", point: 10 }
		])
			expect(await deal(body)).toMatchObject({
				status: 409,
				body: { type: "MERCHANT_SUSPENDED", data: { merchantId: "m-susp" } }
			});
		expect(await deals()).toBe(1);
		expect((await call("POST", `/deals/${saved.body.id}/cancel`, {})).body.status).toBe(
			"cancelled"
		);

		const resumed = await call<MerchantView>("POST", "/merchants/m-susp/resume");
		expect(resumed.body.status).toBe("active");
		expect(resumed.body.suspendedAt).toBeUndefined();
		expect((await call("POST", "/merchants/m-susp/resume")).body.type).toBe("MERCHANT_ACTIVE");
		expect(
			(await deal({ memberId: "m003", merchantId: "m-susp", dealAmount: 100, type: "save" })).status
		).toBe(201);
		await drained(broker);
		expect(await balance("m003")).toBe(1);
	});

	it("treats an unregistered merchant as one on the default terms (MERCHANTS=open)", async () => {
		const saved = await deal({
			memberId: "m003",
			merchantId: "20",
			dealAmount: 10_000,
			type: "save"
		});
		expect(saved.body).toMatchObject({
			point: 100,
			terms: { earnRate: 0.01, redemptionFee: 0.02, pointPrice: 1 }
		});
	});

	it("issues keys that act as the merchant, lists them without tokens and revokes them at once", async () => {
		await call("POST", "/merchants", { merchantId: "m-keys", name: "Keys" });
		const issued = await call("POST", "/merchants/m-keys/keys", { name: "till 1" });
		expect(issued.status).toBe(201);
		expect(issued.headers.get("cache-control")).toBe("no-store");
		expect(issued.body).toEqual({
			keyId: expect.any(String),
			name: "till 1",
			token: expect.stringMatching(/^opk_[A-Za-z0-9_-]{43}$/),
			createdAt: expect.any(String)
		});
		const { keyId, token } = issued.body as { keyId: string; token: string };

		expect((await call("GET", "/me", undefined, token)).body).toEqual({
			role: "merchant",
			merchantId: "m-keys"
		});
		expect((await call("GET", "/merchants/m-keys", undefined, token)).status).toBe(200);
		expect((await call("GET", "/merchants/m-coffee", undefined, token)).status).toBe(403);
		expect((await call("GET", "/merchants", undefined, token)).status).toBe(403);
		expect((await call("POST", "/merchants/m-keys/keys", {}, token)).status).toBe(403);
		const made = await deal(
			{ memberId: "m003", merchantId: "m-keys", dealAmount: 1000, type: "save" },
			token
		);
		expect(made.status).toBe(201);

		// Stored as a hash only: the token is nowhere in the listing or the store.
		const listed = await call("GET", "/merchants/m-keys/keys");
		expect(listed.body.rows).toEqual([
			{
				keyId,
				merchantId: "m-keys",
				name: "till 1",
				status: "active",
				createdAt: issued.body.createdAt
			}
		]);
		const stored = await (
			broker.getLocalService("merchants") as unknown as {
				keys: { find(p: object): Promise<MerchantKey[]> };
			}
		).keys.find({ query: {} });
		expect(JSON.stringify(stored)).not.toContain(token);

		const revoked = await call("DELETE", `/merchants/m-keys/keys/${keyId}`);
		expect(revoked.body).toMatchObject({ keyId, status: "revoked", revokedAt: expect.any(String) });
		expect(await call("GET", "/me", undefined, token)).toMatchObject({
			status: 401,
			body: { type: "INVALID_TOKEN" }
		});
		expect((await call("DELETE", `/merchants/m-keys/keys/${keyId}`)).body).toEqual(revoked.body);
		expect((await call("DELETE", "/merchants/m-books/keys/" + keyId)).body.type).toBe(
			"KEY_NOT_FOUND"
		);
		expect((await call("POST", "/merchants/nobody/keys", {})).body.type).toBe("MERCHANT_NOT_FOUND");
		// API_KEYS keep working beside the issued keys.
		expect((await call("GET", "/me", undefined, TOKENS.merchant20)).body.merchantId).toBe("20");
	});

	it("reissues a key when its request is retried under the same Idempotency-Key, revoking the first", async () => {
		const headers = { "Idempotency-Key": "issue-key-1" };
		const first = await call(
			"POST",
			"/merchants/m-keys/keys",
			{ name: "till 2" },
			undefined,
			headers
		);
		const retry = await call(
			"POST",
			"/merchants/m-keys/keys",
			{ name: "till 2" },
			undefined,
			headers
		);
		expect([first.status, retry.status]).toEqual([201, 201]);
		expect(retry.body.token).not.toBe(first.body.token);
		expect((await call("GET", "/me", undefined, first.body.token)).status).toBe(401);
		expect((await call("GET", "/me", undefined, retry.body.token)).status).toBe(200);
		const keys = (await call("GET", "/merchants/m-keys/keys")).body.rows as {
			name: string;
			status: string;
		}[];
		expect(keys.filter(k => k.name === "till 2").map(k => k.status)).toEqual(["active", "revoked"]);
	});

	it("refuses a key revoked without a word to this gateway once it has kept the key for keyCacheMs", async () => {
		const { token, keyId } = (await call("POST", "/merchants/m-keys/keys", {})).body;
		expect((await call("GET", "/me", undefined, token)).status).toBe(200);
		// As if the revocation's broadcast never reached this gateway: the store alone says so.
		const merchants = broker.getLocalService("merchants") as unknown as {
			keys: { update(q: object, u: object): Promise<number> };
		};
		await merchants.keys.update({ _id: keyId }, { $set: { revokedAt: new Date().toISOString() } });
		await eventually(
			async () => expect((await call("GET", "/me", undefined, token)).status).toBe(401),
			5_000
		);
	});

	describe("refuses bad input with a code, changing nothing", () => {
		const cases: [string, string, object, number, string][] = [
			[
				"POST",
				"/merchants",
				{ merchantId: "bad", name: "B", earnRate: 1.5 },
				422,
				"VALIDATION_ERROR"
			],
			[
				"POST",
				"/merchants",
				{ merchantId: "bad", name: "B", earnRate: -0.1 },
				422,
				"VALIDATION_ERROR"
			],
			[
				"POST",
				"/merchants",
				{ merchantId: "bad", name: "B", earnRate: 0.00001 },
				422,
				"VALIDATION_ERROR"
			],
			[
				"POST",
				"/merchants",
				{ merchantId: "bad", name: "B", redemptionFee: "ten" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"POST",
				"/merchants",
				{ merchantId: "bad", name: "B", redemptionFee: true },
				422,
				"VALIDATION_ERROR"
			],
			[
				"POST",
				"/merchants",
				{ merchantId: "bad", name: "B", pointPrice: 100.5 },
				422,
				"VALIDATION_ERROR"
			],
			[
				"POST",
				"/merchants",
				{ merchantId: "bad", name: "B", pointPrice: "1.23456" },
				422,
				"VALIDATION_ERROR"
			],
			["POST", "/merchants", { merchantId: "bad", name: "" }, 422, "VALIDATION_ERROR"],
			["POST", "/merchants", { merchantId: "bad", name: "n".repeat(101) }, 422, "VALIDATION_ERROR"],
			["POST", "/merchants", { merchantId: "a b", name: "B" }, 422, "VALIDATION_ERROR"],
			["POST", "/merchants", { merchantId: "bad", name: "B", owner: "x" }, 422, "VALIDATION_ERROR"],
			["POST", "/merchants/m-books/terms", {}, 422, "TERMS_UNCHANGED"],
			["POST", "/merchants/m-books/terms", { earnRate: 2 }, 422, "VALIDATION_ERROR"],
			[
				"POST",
				"/merchants/m-books/terms",
				{ earnRate: 0.1, from: "2026-05-01T00:00:00Z" },
				422,
				"TERMS_FROM_IN_PAST"
			],
			[
				"POST",
				"/merchants/m-books/terms",
				{ earnRate: 0.1, from: "next week" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"POST",
				"/merchants/m-books/terms",
				{ earnRate: 0.1, from: "2026-13-45T00:00:00Z" },
				422,
				"INVALID_FROM"
			],
			["POST", "/merchants/nobody/terms", { earnRate: 0.1 }, 404, "MERCHANT_NOT_FOUND"],
			["POST", "/merchants/nobody/suspend", undefined as never, 404, "MERCHANT_NOT_FOUND"],
			["POST", "/merchants/m-books/keys", { name: "" }, 422, "VALIDATION_ERROR"],
			["GET", "/merchants?pageSize=1000", undefined as never, 422, "VALIDATION_ERROR"],
			["GET", "/merchants?status=closed", undefined as never, 422, "VALIDATION_ERROR"]
		];
		it.each(cases)("%s %s %j → %d %s", async (method, path, body, status, code) => {
			const before = (await call("GET", "/merchants?pageSize=100")).body;
			const reply = await call(method, path, body);
			expect(reply).toMatchObject({ status, body: { type: code, message: expect.any(String) } });
			expect((await call("GET", "/merchants?pageSize=100")).body).toEqual(before);
		});

		it("says which field is wrong and why", async () => {
			const reply = await call("POST", "/merchants", {
				merchantId: "bad",
				name: "B",
				earnRate: 0.12345
			});
			expect(reply.body.data).toEqual([
				expect.objectContaining({
					field: "earnRate",
					type: "decimalPlaces",
					message: "The 'earnRate' field must have at most 4 decimal places (a basis point)."
				})
			]);
		});
	});
});

describe("MERCHANTS=registered", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let call: Awaited<ReturnType<typeof startNode>>["call"];

	beforeAll(async () => {
		// A store of its own: the deals of the suite above are not this node's.
		const store = onMongo()
			? { MONGO_URI: freshDatabaseUri() }
			: { DATA_DIR: fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-registered-")) };
		({ broker, call } = await startNode(
			store,
			withSettings(MerchantsService, { merchants: "registered" }) as typeof MerchantsService
		));
		await call("POST", "/members", { memberId: "r001", name: "r001" });
	});
	afterAll(() => broker.stop());

	it("refuses an unregistered merchant's deals with 404 MERCHANT_NOT_FOUND, writing nothing", async () => {
		const reply = await call("POST", "/deals", {
			memberId: "r001",
			merchantId: "20",
			dealAmount: 10_000,
			type: "save"
		});
		expect(reply).toMatchObject({ status: 404, body: { type: "MERCHANT_NOT_FOUND" } });
		expect((await call("GET", "/deals")).body.total).toBe(0);
		await call("POST", "/merchants", { merchantId: "20", name: "Seed merchant" });
		expect(
			(
				await call("POST", "/deals", {
					memberId: "r001",
					merchantId: "20",
					dealAmount: 10_000,
					type: "save"
				})
			).status
		).toBe(201);
	});
});
