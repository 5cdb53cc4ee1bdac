/**
 * Who may do what through the gateway, and hostile input: every request below is answered with its
 * status and code, and leaves members, deals, balances and the ledger as they were.
 */
import { eventually } from "../helpers/broker";
import { faketime } from "../helpers/clock";
import { System, TOKENS } from "../helpers/system";

jest.setTimeout(60_000);

// The node's clock (libfaketime) is in May 2026: "this month" is 202605.
const month = "202605";
const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
const asMerchant20 = bearer(TOKENS.merchant20);

describe("gateway security", () => {
	let system: System;
	const ids: Record<string, string> = {};

	beforeAll(async () => {
		system = await System.start(faketime("2026-05-14 10:00:00"));
		const api = (method: string, path: string, body?: unknown) =>
			system.call(method, `/api${path}`, body);
		await api("POST", "/members", { memberId: "0001", name: "Kim" });
		await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "20",
			dealAmount: 100000,
			type: "save"
		});
		await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "21",
			dealAmount: 100000,
			type: "save"
		});
		await eventually(async () =>
			expect((await api("GET", "/points/0001")).body.balance).toBe(2000)
		);
		ids.use21 = (
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "21",
				dealAmount: 1000,
				type: "use",
				point: 10
			})
		).body.id;
		ids.use20 = (
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: 1000,
				type: "use",
				point: 10
			})
		).body.id;
		await eventually(async () =>
			expect((await api("GET", `/billing-amount-views/${ids.use21}`)).status).toBe(200)
		);
	});
	afterAll(() => system.stop());

	/** What the hostile requests must not change. */
	async function snapshot() {
		const get = async (path: string) => (await system.call("GET", `/api${path}`)).body;
		return Promise.all([
			get("/points/0001"),
			get("/points/0001/history?pageSize=100"),
			get("/deals?pageSize=100"),
			get("/members/0001"),
			get("/members/0666")
		]);
	}

	type Case = [
		name: string,
		method: string,
		path: string,
		body: unknown,
		headers: Record<string, string | null>,
		status: number,
		type: string
	];
	const big = JSON.stringify({
		memberId: "0001",
		merchantId: "20",
		dealAmount: 1,
		type: "save",
		pad: "x".repeat(1_100_000)
	});
	const cases: Case[] = [
		// Tokens
		["no token", "GET", "/points/0001", undefined, { authorization: null }, 401, "NO_TOKEN"],
		[
			"no token on a write",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "save" },
			{ authorization: null },
			401,
			"NO_TOKEN"
		],
		[
			"no token to join",
			"POST",
			"/members",
			{ memberId: "0666", name: "X" },
			{ authorization: null },
			401,
			"NO_TOKEN"
		],
		[
			"empty bearer",
			"GET",
			"/points/0001",
			undefined,
			{ authorization: "Bearer " },
			401,
			"NO_TOKEN"
		],
		[
			"basic scheme",
			"GET",
			"/points/0001",
			undefined,
			{ authorization: `Basic ${TOKENS.staff}` },
			401,
			"NO_TOKEN"
		],
		[
			"unknown token",
			"GET",
			"/points/0001",
			undefined,
			bearer("not-a-real-token-at-all"),
			401,
			"INVALID_TOKEN"
		],
		[
			"token in another case",
			"GET",
			"/points/0001",
			undefined,
			bearer(TOKENS.staff.toUpperCase()),
			401,
			"INVALID_TOKEN"
		],
		[
			"truncated token",
			"GET",
			"/points/0001",
			undefined,
			bearer(TOKENS.staff.slice(0, -1)),
			401,
			"INVALID_TOKEN"
		],
		[
			"token with a suffix",
			"DELETE",
			"/members/0001",
			undefined,
			bearer(`${TOKENS.staff}x`),
			401,
			"INVALID_TOKEN"
		],
		// A merchant token beyond its rights
		[
			"merchant joins a member",
			"POST",
			"/members",
			{ memberId: "0666", name: "X" },
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant withdraws a member",
			"DELETE",
			"/members/0001",
			undefined,
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		["merchant reads a member", "GET", "/members/0001", undefined, asMerchant20, 403, "FORBIDDEN"],
		[
			"merchant reads a member's ledger",
			"GET",
			"/points/0001/history",
			undefined,
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant deals for another merchant",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "21", dealAmount: 100, type: "save" },
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant lists another merchant's deals",
			"GET",
			"/deals?merchantId=21",
			undefined,
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant reads another merchant's deal",
			"GET",
			"/deals/{use21}",
			undefined,
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant cancels another merchant's deal",
			"POST",
			"/deals/{use21}/cancel",
			undefined,
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant reads another merchant's view row",
			"GET",
			"/billing-amount-views/{use21}",
			undefined,
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant settles another merchant",
			"POST",
			"/billings",
			{ merchantId: "21", billingMonth: month },
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		[
			"merchant reads another merchant's settlement",
			"GET",
			`/billings/21/${month}`,
			undefined,
			asMerchant20,
			403,
			"FORBIDDEN"
		],
		// Bodies and routes
		["a body over 1 MB", "POST", "/deals", big, {}, 413, "PAYLOAD_TOO_LARGE"],
		["malformed JSON", "POST", "/deals", '{"memberId": "0001", ', {}, 400, "INVALID_JSON"],
		["a JSON array", "POST", "/deals", "[1, 2]", {}, 422, "VALIDATION_ERROR"],
		[
			"form data instead of JSON",
			"POST",
			"/deals",
			"memberId=0001&merchantId=20",
			{ "content-type": "application/x-www-form-urlencoded" },
			422,
			"VALIDATION_ERROR"
		],
		// Keys that reach a prototype (sent as text: an object literal would not keep them as keys)
		[
			"__proto__ in a joining",
			"POST",
			"/members",
			'{"memberId":"0666","name":"p","__proto__":{"email":"x@example.com"}}',
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"__proto__ in a deal",
			"POST",
			"/deals",
			'{"memberId":"0001","merchantId":"20","dealAmount":100,"type":"save","__proto__":{"point":999}}',
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"constructor.prototype in a body",
			"POST",
			"/members",
			'{"memberId":"0666","name":"p","constructor":{"prototype":{"x":1}}}',
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"__proto__ deep in an array",
			"POST",
			"/members",
			'{"memberId":"0666","name":"p","__proto__":[{"a":{"__proto__":{}}}]}',
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"__proto__ in a query",
			"GET",
			"/deals?__proto__[merchantId]=21",
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"constructor nested in a query",
			"GET",
			"/deals?memberId[constructor][prototype]=1",
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"an encoded __proto__ in a query",
			"GET",
			"/deals?%5F%5Fproto%5F%5F.x=1",
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		],
		["unknown route", "GET", "/admin", undefined, {}, 404, "NOT_FOUND"],
		[
			"an internal action by its path",
			"POST",
			"/points/debit",
			{ memberId: "0001", sourceType: "deal", sourceId: "x", amount: 1 },
			{},
			404,
			"NOT_FOUND"
		],
		[
			"an internal action by its name",
			"POST",
			"/points.debit",
			{ memberId: "0001", sourceType: "deal", sourceId: "x", amount: 1 },
			{},
			404,
			"NOT_FOUND"
		],
		["the node's internal service", "GET", "/~node/services", undefined, {}, 404, "NOT_FOUND"],
		["the audit action by its name", "GET", "/points.audit", undefined, {}, 404, "NOT_FOUND"],
		// Operators and odd ids
		[
			"operator as a member id",
			"POST",
			"/deals",
			{ memberId: { $gt: "" }, merchantId: "20", dealAmount: 100, type: "save" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"operator in a path id",
			"GET",
			`/deals/${encodeURIComponent('{"$gt":""}')}`,
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"$where in a filter",
			"GET",
			"/deals?memberId[$where]=1",
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		],
		["$ne in a filter", "GET", "/deals?merchantId[$ne]=x", undefined, {}, 422, "VALIDATION_ERROR"],
		[
			"path traversal in an id",
			"GET",
			"/points/..%2F..%2Fetc",
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"an id of 65 characters",
			"GET",
			`/points/${"a".repeat(65)}`,
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		],
		// Numbers
		[
			"an overflowing amount",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 1e300, type: "save" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"an amount past the safe integers",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: "9007199254740993", type: "save" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"a zero amount",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 0, type: "save" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"a non-numeric amount",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: "12abc", type: "save" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"a boolean amount",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: true, type: "save" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"an amount in an array",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: [100000], type: "save" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"an empty amount",
			"POST",
			"/orders",
			{ memberId: "0001", productId: "p1", qty: "", unitPrice: 1000 },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"negative points",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "use", point: -100 },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"fractional points",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "use", point: 0.5 },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"too many points",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "use", point: 1e12 },
			{},
			422,
			"VALIDATION_ERROR"
		],
		// Fields and enums
		[
			"an unknown field",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "save", status: "success" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"an unknown deal type",
			"POST",
			"/deals",
			{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "gift" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"an unknown field on joining",
			"POST",
			"/members",
			{ memberId: "0666", name: "X", role: "admin" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"a name of 101 characters",
			"POST",
			"/members",
			{ memberId: "0666", name: "n".repeat(101) },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"a bad email",
			"POST",
			"/members",
			{ memberId: "0666", name: "X", email: "x@" },
			{},
			422,
			"VALIDATION_ERROR"
		],
		[
			"a month 13",
			"POST",
			"/billings",
			{ merchantId: "20", billingMonth: `${month.slice(0, 4)}13` },
			{},
			422,
			"VALIDATION_ERROR"
		],
		["a page 0", "GET", "/deals?page=0", undefined, {}, 422, "VALIDATION_ERROR"],
		[
			"a page of 1000 rows",
			"GET",
			"/points/0001/history?pageSize=1000",
			undefined,
			{},
			422,
			"VALIDATION_ERROR"
		]
	];

	it("has at least 40 hostile requests", () => expect(cases.length).toBeGreaterThanOrEqual(40));

	it.each(cases)(
		"%s (%s %s) is refused and changes nothing",
		async (_name, method, path, body, headers, status, type) => {
			const before = await snapshot();
			const res = await system.call(
				method,
				`/api${path.replace(/\{(\w+)\}/g, (_m, key: string) => ids[key])}`,
				body,
				headers
			);
			expect({ status: res.status, type: res.body?.type }).toEqual({ status, type });
			expect(Object.keys(res.body).sort()).toEqual(
				expect.arrayContaining(["code", "message", "name", "type"])
			);
			expect(JSON.stringify(res.body)).not.toMatch(/\.(js|ts):\d+/);
			expect(await snapshot()).toEqual(before);
		}
	);

	it("lets a merchant token do what is its own", async () => {
		const call = (method: string, path: string, body?: unknown) =>
			system.call(method, `/api${path}`, body, asMerchant20);
		expect((await call("GET", "/points/0001")).body.balance).toBe(1980);
		const listed = await call("GET", "/deals");
		expect(listed.status).toBe(200);
		expect(listed.body.rows.every((d: { merchantId: string }) => d.merchantId === "20")).toBe(true);
		expect((await call("GET", `/deals/${ids.use20}`)).status).toBe(200);
		expect(
			(
				await call("POST", "/deals", {
					memberId: "0001",
					merchantId: "20",
					dealAmount: 1000,
					type: "use",
					point: 5
				})
			).status
		).toBe(201);
		expect((await call("POST", `/deals/${ids.use20}/cancel`)).status).toBe(200);
		expect(
			(await call("POST", "/billings", { merchantId: "20", billingMonth: month })).body
		).toMatchObject({
			merchantId: "20",
			status: "provisional"
		});
		expect((await call("GET", `/billings/20/${month}`)).status).toBe(200);
	});

	it("answers health without a token", async () => {
		const res = await system.call("GET", "/api/health", undefined, { authorization: null });
		expect(res.status).toBe(200);
		expect(res.body).toMatchObject({ status: "ok", nodeID: expect.any(String) });
	});
});

describe("rate limit", () => {
	let system: System;
	beforeAll(async () => {
		system = await System.start({ RATE_LIMIT: "20" });
	});
	afterAll(() => system.stop());

	it("answers a burst above RATE_LIMIT a minute with 429 and Retry-After, per token", async () => {
		// A token the start-up health checks have not counted against.
		const replies = await Promise.all(
			Array.from({ length: 30 }, () =>
				system.call("GET", "/api/points/0001", undefined, bearer(TOKENS.merchant21))
			)
		);
		const limited = replies.filter(r => r.status === 429);
		expect(limited).toHaveLength(10);
		expect(limited[0].body).toMatchObject({ code: 429, type: "RATE_LIMIT_EXCEEDED" });
		expect(Number(limited[0].headers.get("retry-after"))).toBeGreaterThan(0);
		// Another token has its own allowance.
		expect((await system.call("GET", "/api/points/0001", undefined, asMerchant20)).status).not.toBe(
			429
		);
	});
});

describe("API_KEYS", () => {
	it("stops a production start without API_KEYS, with a clear message", async () => {
		await expect(System.start({ API_KEYS: "", NODE_ENV: "production" })).rejects.toThrow(
			/API_KEYS must be set in production/
		);
	});

	it("generates and prints a staff token for a demo start without API_KEYS", async () => {
		const system = await System.start({ API_KEYS: "" });
		try {
			const token = /staff token is (\S+)/.exec(system.log)?.[1] as string;
			expect(token).toBeTruthy();
			expect((await system.call("GET", "/api/members/0001", undefined, bearer(token))).status).toBe(
				404
			);
			expect((await system.call("GET", "/api/members/0001")).status).toBe(401);
		} finally {
			await system.stop();
		}
	});
});
