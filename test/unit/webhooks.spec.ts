/**
 * Webhooks through the gateway over HTTP, delivered to a real HTTP receiver, on each store: every
 * delivery verified by the Standard Webhooks reference library (`standardwebhooks`) with the secret,
 * retries with one webhook-id, a failed delivery replayed, a slow endpoint beside a fast one, a secret
 * rotated, merchants' tokens kept to their own webhooks, every bad input refused with a code and
 * nothing changed; and in production, private addresses refused at creation and at delivery.
 */
import { generateKeyPairSync } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ServiceBroker } from "moleculer";
import { Webhook as Verifier } from "standardwebhooks";
import { parseDurations } from "../../config";
import { retryDelay } from "../../lib/webhooks/delivery";
import { checkUrl, isBlockedAddress, RefusedUrl } from "../../lib/webhooks/ssrf";
import ApiService from "../../services/api.service";
import BillingService from "../../services/billing.service";
import DealsService from "../../services/deals.service";
import IdempotencyService from "../../services/idempotency.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import PointsService from "../../services/points.service";
import WebhooksService, {
	type DeliveryView,
	type WebhookView
} from "../../services/webhooks.service";
import {
	createTestBroker,
	drained,
	eventually,
	withSettings,
	type AnyServiceSchema
} from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { Receiver, type Received } from "../helpers/receiver";
import { freshDatabaseUri, onMongo } from "../helpers/store";
import { freePort, TOKENS } from "../helpers/system";

interface Reply<T = any> {
	status: number;
	body: T;
	headers: Headers;
}

type Created = WebhookView & { secret: string };

/** A node with the gateway and the given services, and a client of it. */
async function startNode(services: AnyServiceSchema[], env: NodeJS.ProcessEnv = {}) {
	const port = await freePort();
	const broker = createTestBroker([ApiService, ...services], {
		PORT: String(port),
		HOST: "127.0.0.1",
		API_KEYS: `${TOKENS.staff}=staff,${TOKENS.merchant20}=merchant:20,${TOKENS.merchant21}=merchant:21`,
		...env
	});
	await broker.start();
	const call = async <T = any>(
		method: string,
		urlPath: string,
		body?: unknown,
		token = TOKENS.staff
	): Promise<Reply<T>> => {
		const response = await fetch(`http://127.0.0.1:${port}/api${urlPath}`, {
			method,
			headers: {
				Authorization: `Bearer ${token}`,
				...(body === undefined ? {} : { "Content-Type": "application/json" })
			},
			body: body === undefined ? undefined : JSON.stringify(body)
		});
		const text = await response.text();
		return {
			status: response.status,
			body: text ? JSON.parse(text) : text,
			headers: response.headers
		};
	};
	return { broker, call };
}

/** What a receiver got, as the reference library reads it with `secret` (it throws on a bad signature). */
const verified = (secret: string, request: Received) =>
	new Verifier(secret).verify(request.body, request.headers) as {
		type: string;
		timestamp: string;
		data: Record<string, unknown>;
	};

/** Fast enough for a test: the dispatcher looks for due deliveries every 20 ms. */
const webhooks = withSettings(WebhooksService, { pollMs: 20 });

describe("webhooks", () => {
	// The test's clock, which the node signs by and the reference library verifies by.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let call: Awaited<ReturnType<typeof startNode>>["call"];
	let receiver: Receiver;

	const subscribe = async (body: object, token?: string) => {
		const res = await call<Created>("POST", "/webhooks", body, token);
		expect(res.status).toBe(201);
		return res.body;
	};
	const save = async (memberId: string, merchantId = "20", dealAmount = 10_000) => {
		const res = await call("POST", "/deals", { memberId, merchantId, dealAmount, type: "save" });
		expect(res.status).toBe(201);
		return res.body.id as string;
	};
	const deliveries = async (webhookId: string) =>
		(await call<{ rows: DeliveryView[] }>("GET", `/webhooks/${webhookId}/deliveries`)).body.rows;
	const webhookCount = async () => (await call("GET", "/webhooks")).body.total as number;

	beforeAll(async () => {
		receiver = await Receiver.start();
		({ broker, call } = await startNode(
			[
				IdempotencyService,
				MembersService,
				MerchantsService,
				withSettings(PointsService, { expiryCheckMs: 20 }),
				DealsService,
				BillingService,
				webhooks
			],
			{
				WEBHOOK_RETRY_SCHEDULE: "100ms,200ms,300ms",
				WEBHOOK_TIMEOUT_MS: "3000",
				POINTS_VALID_MONTHS: "1"
			}
		));
		for (const memberId of ["m001", "m002", "x001"])
			expect((await call("POST", "/members", { memberId, name: memberId })).status).toBe(201);
		// Their joins are handled before any webhook exists.
		await drained(broker);
	});
	afterAll(async () => {
		await broker.stop();
		await receiver.stop();
	});

	it("delivers each event signed, so that the reference library verifies it with the secret shown once", async () => {
		const hook = await subscribe({
			url: receiver.url("/all"),
			events: ["deal.created", "member.joined"]
		});
		expect(hook).toEqual({
			webhookId: expect.stringMatching(/^wh_/),
			url: receiver.url("/all"),
			events: ["deal.created", "member.joined"],
			merchantId: null,
			status: "enabled",
			secret: expect.stringMatching(/^whsec_[A-Za-z0-9+/]{43}=$/),
			createdAt: expect.stringMatching(/^2026-05-14T10:00/)
		});
		const shown = await call("GET", `/webhooks/${hook.webhookId}`);
		expect(shown.body).not.toHaveProperty("secret");
		expect(JSON.stringify((await call("GET", "/webhooks")).body)).not.toContain(hook.secret);

		expect((await call("POST", "/members", { memberId: "m003", name: "Kim" })).status).toBe(201);
		const dealId = await save("m001");
		await eventually(() => expect(receiver.at("/all")).toHaveLength(2));
		const bodies = receiver.at("/all").map(request => verified(hook.secret, request));
		expect(bodies).toEqual(
			expect.arrayContaining([
				{
					type: "member.joined",
					timestamp: expect.stringMatching(/^2026-05-14T10:/),
					data: { memberId: "m003", joinedAt: expect.any(String) }
				},
				{
					type: "deal.created",
					timestamp: expect.stringMatching(/^2026-05-14T10:/),
					data: expect.objectContaining({
						dealId,
						memberId: "m001",
						merchantId: "20",
						type: "save",
						dealAmount: 10_000,
						point: 100,
						status: "success",
						terms: { earnRate: 0.01, redemptionFee: 0.02, pointPrice: 1, holdDays: 0 }
					})
				}
			])
		);
		// The member's name stays home.
		expect(
			receiver
				.at("/all")
				.map(r => r.body)
				.join()
		).not.toContain("Kim");
		const [request] = receiver.at("/all");
		expect(request.headers["webhook-signature"]).toMatch(/^v1,[A-Za-z0-9+/]+=*$/);
		expect(() => verified("whsec_" + Buffer.alloc(32).toString("base64"), request)).toThrow(
			/No matching signature/
		);
		await eventually(async () =>
			expect(await deliveries(hook.webhookId)).toEqual([
				expect.objectContaining({ status: "delivered", attempts: 1, lastStatus: 200 }),
				expect.objectContaining({ status: "delivered", attempts: 1, lastStatus: 200 })
			])
		);
		expect((await call("DELETE", `/webhooks/${hook.webhookId}`)).body.status).toBe("deleted");
	});

	it("retries an endpoint that fails twice: three attempts with one webhook-id, then delivered", async () => {
		receiver.answer("/flaky", n => (n <= 2 ? 500 : 200));
		const hook = await subscribe({ url: receiver.url("/flaky"), events: ["deal.created"] });
		await save("m001");
		await eventually(() => expect(receiver.at("/flaky")).toHaveLength(3));
		const ids = receiver.at("/flaky").map(r => r.headers["webhook-id"]);
		expect(new Set(ids).size).toBe(1);
		expect(ids[0]).toMatch(/^msg_/);
		for (const request of receiver.at("/flaky")) verified(hook.secret, request);
		await eventually(async () =>
			expect(await deliveries(hook.webhookId)).toEqual([
				expect.objectContaining({
					deliveryId: ids[0],
					type: "deal.created",
					status: "delivered",
					attempts: 3,
					lastStatus: 200,
					lastAttemptAt: expect.any(String)
				})
			])
		);
		await call("DELETE", `/webhooks/${hook.webhookId}`);
	});

	it("fails a delivery after the last retry, and replays it on request with the same webhook-id", async () => {
		let up = false;
		receiver.answer("/down", () => (up ? 204 : 503));
		const hook = await subscribe({ url: receiver.url("/down"), events: ["deal.created"] });
		await save("m002");
		// The first attempt and a retry after each of the three waits.
		const [failed] = await eventually(async () => {
			const rows = await deliveries(hook.webhookId);
			expect(rows).toEqual([
				expect.objectContaining({ status: "failed", attempts: 4, lastStatus: 503 })
			]);
			return rows;
		});
		expect(failed).not.toHaveProperty("nextAttemptAt");
		expect(receiver.at("/down")).toHaveLength(4);

		up = true;
		const replayed = await call(
			"POST",
			`/webhooks/${hook.webhookId}/deliveries/${failed.deliveryId}/replay`
		);
		expect(replayed).toMatchObject({ status: 202, body: { status: "pending", attempts: 4 } });
		await eventually(async () =>
			expect(await deliveries(hook.webhookId)).toEqual([
				expect.objectContaining({ status: "delivered", attempts: 5, lastStatus: 204 })
			])
		);
		expect(receiver.at("/down").map(r => r.headers["webhook-id"])).toEqual(
			Array(5).fill(failed.deliveryId)
		);
		const again = await call(
			"POST",
			`/webhooks/${hook.webhookId}/deliveries/${failed.deliveryId}/replay`,
			{}
		);
		expect(again.status).toBe(202);
		await eventually(() => expect(receiver.at("/down")).toHaveLength(6));
		expect(
			(await call("POST", `/webhooks/${hook.webhookId}/deliveries/msg_nothing/replay`)).body.type
		).toBe("DELIVERY_NOT_FOUND");
		await call("DELETE", `/webhooks/${hook.webhookId}`);
	});

	it("keeps delivering to a fast endpoint while a slow one hangs, and times the slow one out", async () => {
		receiver.answer("/slow", () => "hang");
		const slow = await subscribe({ url: receiver.url("/slow"), events: ["deal.created"] });
		const fast = await subscribe({ url: receiver.url("/fast"), events: ["deal.created"] });
		for (let i = 0; i < 8; i++) await save("m002", "30");
		await eventually(() => expect(receiver.at("/fast")).toHaveLength(8));
		// All of the fast one's delivered while the slow one's first attempts still hang: only a few at
		// once (its limit per webhook), none of them answered yet.
		expect(receiver.at("/slow")).toHaveLength(4);
		const waiting = await deliveries(slow.webhookId);
		expect(waiting.filter(d => d.status === "sending")).toHaveLength(4);
		expect(waiting.filter(d => d.lastStatus !== undefined)).toEqual([]);
		expect((await deliveries(fast.webhookId)).every(d => d.status === "delivered")).toBe(true);
		await eventually(async () =>
			expect((await deliveries(slow.webhookId)).map(d => d.lastStatus)).toContain("TIMEOUT")
		);
		await call("DELETE", `/webhooks/${slow.webhookId}`);
		await call("DELETE", `/webhooks/${fast.webhookId}`);
	});

	it("tells a merchant's webhook of its own merchant's events only, and keeps a merchant's token to its own webhooks", async () => {
		const staffs = await subscribe({ url: receiver.url("/staff"), events: ["member.joined"] });
		const own = await subscribe(
			{ url: receiver.url("/m20"), events: ["deal.created", "deal.returned"] },
			TOKENS.merchant20
		);
		expect(own).toMatchObject({ merchantId: "20", events: ["deal.created", "deal.returned"] });
		const m20 = (urlPath: string, method = "GET", body?: object) =>
			call(method, urlPath, body, TOKENS.merchant20);

		expect((await m20("/webhooks")).body).toMatchObject({
			total: 1,
			rows: [{ webhookId: own.webhookId }]
		});
		expect((await m20("/webhooks?merchantId=21")).status).toBe(403);
		for (const [method, urlPath] of [
			["GET", `/webhooks/${staffs.webhookId}`],
			["DELETE", `/webhooks/${staffs.webhookId}`],
			["POST", `/webhooks/${staffs.webhookId}/rotate-secret`],
			["GET", `/webhooks/${staffs.webhookId}/deliveries`]
		])
			expect([method, urlPath, (await m20(urlPath, method)).status]).toEqual([
				method,
				urlPath,
				403
			]);
		expect(
			(await call("GET", `/webhooks/${own.webhookId}`, undefined, TOKENS.merchant21)).status
		).toBe(403);
		const refused = await m20("/webhooks", "POST", {
			url: receiver.url("/m20"),
			events: ["deal.created"],
			merchantId: "21"
		});
		expect(refused).toMatchObject({ status: 403, body: { type: "FORBIDDEN" } });
		const staffOnly = await m20("/webhooks", "POST", {
			url: receiver.url("/m20"),
			events: ["deal.created", "member.joined"]
		});
		expect(staffOnly).toMatchObject({
			status: 422,
			body: {
				type: "EVENT_NOT_FOR_MERCHANT",
				data: { allowed: ["deal.created", "deal.returned", "settlement.final"] }
			}
		});

		await save("m002", "21");
		const dealId = await save("m002", "20", 20_000);
		expect((await m20(`/deals/${dealId}/cancel`, "POST", { amount: 5000 })).status).toBe(200);
		await drained(broker);
		await eventually(() => expect(receiver.at("/m20")).toHaveLength(2));
		const [createdEvent, returnedEvent] = receiver.at("/m20").map(r => verified(own.secret, r));
		expect(createdEvent).toMatchObject({
			type: "deal.created",
			data: { dealId, merchantId: "20" }
		});
		expect(returnedEvent).toMatchObject({
			type: "deal.returned",
			data: {
				dealId,
				status: "partially_cancelled",
				return: { n: 1, amount: 5000, points: 50 },
				returnedAmount: 5000,
				returnedPoints: 50
			}
		});
		expect((await m20(`/webhooks/${own.webhookId}/deliveries`)).body.total).toBe(2);
		expect((await m20(`/webhooks/${own.webhookId}`, "DELETE")).status).toBe(200);
		expect((await m20(`/webhooks/${own.webhookId}`)).body.type).toBe("WEBHOOK_NOT_FOUND");
		await call("DELETE", `/webhooks/${staffs.webhookId}`);
	});

	it("refuses bad input with a code, changing nothing", async () => {
		const before = await webhookCount();
		const refusals: [object, number, string][] = [
			[{ url: "ftp://example.com/hook", events: ["deal.created"] }, 422, "WEBHOOK_URL_INVALID"],
			[{ url: "not a url", events: ["deal.created"] }, 422, "WEBHOOK_URL_INVALID"],
			[
				{ url: "https://user:pw@example.com/", events: ["deal.created"] },
				422,
				"WEBHOOK_URL_INVALID"
			],
			[{ url: "https://example.com/", events: ["deal.made"] }, 422, "UNKNOWN_EVENT"],
			[{ url: "https://example.com/", events: [] }, 422, "VALIDATION_ERROR"],
			[{ url: "https://example.com/", events: "deal.created" }, 422, "VALIDATION_ERROR"],
			[{ events: ["deal.created"] }, 422, "VALIDATION_ERROR"],
			[
				{ url: "https://example.com/", events: ["deal.created"], secret: "mine" },
				422,
				"VALIDATION_ERROR"
			],
			[
				{ url: "https://example.com/", events: ["deal.created"], merchantId: "a b" },
				422,
				"VALIDATION_ERROR"
			]
		];
		for (const [body, status, type] of refusals) {
			const res = await call("POST", "/webhooks", body);
			expect([body, res.status, res.body.type]).toEqual([body, status, type]);
		}
		expect(
			(await call("POST", "/webhooks", { url: "https://example.com/", events: ["deal.made"] })).body
				.data
		).toEqual({
			unknown: ["deal.made"],
			known: [
				"deal.created",
				"deal.returned",
				"settlement.final",
				"member.joined",
				"points.expiring"
			]
		});
		expect((await call("GET", "/webhooks/wh_nothing")).body.type).toBe("WEBHOOK_NOT_FOUND");
		expect((await call("DELETE", "/webhooks/wh_nothing")).status).toBe(404);
		expect((await call("POST", "/webhooks/wh_nothing/rotate-secret")).status).toBe(404);
		expect(await webhookCount()).toBe(before);

		// At most 16 per merchant: the 17th is refused, another merchant's are not.
		const made: string[] = [];
		for (let i = 0; i < 16; i++)
			made.push(
				(
					await subscribe({
						url: `https://example.com/${i}`,
						events: ["deal.created"],
						merchantId: "40"
					})
				).webhookId
			);
		const over = await call("POST", "/webhooks", {
			url: "https://example.com/17",
			events: ["deal.created"],
			merchantId: "40"
		});
		expect(over).toMatchObject({ status: 409, body: { type: "WEBHOOK_LIMIT_EXCEEDED" } });
		expect((await call("GET", "/webhooks?merchantId=40")).body.total).toBe(16);
		for (const webhookId of made) await call("DELETE", `/webhooks/${webhookId}`);
		expect(await webhookCount()).toBe(before);
	});

	it("signs with both secrets for 24 hours after a rotation, each verifiable, then with the new one only", async () => {
		const hook = await subscribe({ url: receiver.url("/rotated"), events: ["deal.created"] });
		const rotated = await call<Created>("POST", `/webhooks/${hook.webhookId}/rotate-secret`);
		expect(rotated.status).toBe(200);
		expect(rotated.headers.get("cache-control")).toBe("no-store");
		expect(rotated.body).toMatchObject({
			webhookId: hook.webhookId,
			secret: expect.stringMatching(/^whsec_/),
			previousSecretUntil: expect.stringMatching(/^2026-05-15T10:/)
		});
		expect(rotated.body.secret).not.toBe(hook.secret);
		expect((await call("GET", `/webhooks/${hook.webhookId}`)).body).not.toHaveProperty("secret");

		await save("m001");
		await eventually(() => expect(receiver.at("/rotated")).toHaveLength(1));
		const [during] = receiver.at("/rotated");
		expect(during.headers["webhook-signature"].split(" ")).toHaveLength(2);
		expect(verified(rotated.body.secret, during).type).toBe("deal.created");
		expect(verified(hook.secret, during).type).toBe("deal.created");

		jest.setSystemTime(new Date("2026-05-15T10:30:00.000Z"));
		await save("m001");
		await eventually(() => expect(receiver.at("/rotated")).toHaveLength(2));
		const after = receiver.at("/rotated")[1];
		expect(after.headers["webhook-signature"].split(" ")).toHaveLength(1);
		expect(verified(rotated.body.secret, after).type).toBe("deal.created");
		expect(() => verified(hook.secret, after)).toThrow(/No matching signature/);
		await call("DELETE", `/webhooks/${hook.webhookId}`);
	});

	it("when a month begins, tells staff of the points expiring at its end and a merchant of its settlement made final, each once", async () => {
		const expiring = await subscribe({
			url: receiver.url("/expiring"),
			events: ["points.expiring"]
		});
		const settlements = await subscribe({
			url: receiver.url("/settlements"),
			events: ["settlement.final"],
			merchantId: "20"
		});
		await save("x001", "20", 25_000);
		await eventually(async () =>
			expect((await call("GET", "/points/x001")).body.balance).toBe(250)
		);

		// Earned in May, valid one month more: they expire when June ends.
		jest.setSystemTime(new Date("2026-06-01T00:00:05.000Z"));
		const told = () => receiver.at("/expiring").map(r => verified(expiring.secret, r));
		await eventually(() => expect(told().map(event => event.data.memberId)).toContain("x001"));
		expect(told().find(event => event.data.memberId === "x001")).toEqual({
			type: "points.expiring",
			timestamp: expect.stringMatching(/^2026-06-01T00:00/),
			data: {
				memberId: "x001",
				month: "202606",
				expiresAt: "2026-07-01T00:00:00.000Z",
				points: 250
			}
		});

		// May closes once its grace has passed: by this request, or by the month-end job.
		jest.setSystemTime(new Date("2026-06-01T00:11:00.000Z"));
		const settled = await call("POST", "/billings", { merchantId: "20", billingMonth: "202605" });
		expect(settled).toMatchObject({ status: expect.any(Number), body: { status: "final" } });
		expect(settled.body).not.toHaveProperty("outbox");
		await eventually(() => expect(receiver.at("/settlements")).toHaveLength(1));
		expect(verified(settlements.secret, receiver.at("/settlements")[0])).toEqual({
			type: "settlement.final",
			timestamp: settled.body.settledAt,
			data: {
				settlementId: "20:202605",
				merchantId: "20",
				billingMonth: "202605",
				status: "final",
				redeemed: settled.body.redeemed,
				issued: settled.body.issued,
				net: settled.body.net,
				settledAt: settled.body.settledAt
			}
		});

		// The next day's expiry job, and the settlement asked for again, tell no one again.
		const count = receiver.received.length;
		jest.setSystemTime(new Date("2026-06-02T00:00:05.000Z"));
		expect(
			(await call("POST", "/billings", { merchantId: "20", billingMonth: "202605" })).status
		).toBe(200);
		await new Promise(resolve => setTimeout(resolve, 300));
		await drained(broker);
		expect(receiver.received).toHaveLength(count);
	});
});

describe("webhooks in production", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let call: Awaited<ReturnType<typeof startNode>>["call"];
	let receiver: Receiver;

	beforeAll(async () => {
		receiver = await Receiver.start();
		// A node of its own: its own folder, or its own database.
		({ broker, call } = await startNode([MembersService, webhooks], {
			NODE_ENV: "production",
			// Production asks for the member sessions' signing key too.
			MEMBER_TOKEN_KEY: generateKeyPairSync("ec", { namedCurve: "P-256" })
				.privateKey.export({ type: "pkcs8", format: "pem" })
				.toString(),
			WEBHOOK_RETRY_SCHEDULE: "100ms,10s",
			DATA_DIR: fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-test-")),
			MONGO_URI: onMongo() ? freshDatabaseUri() : ""
		}));
	});
	afterAll(async () => {
		await broker.stop();
		await receiver.stop();
	});

	it("refuses at creation a URL that is not https, or names a loopback, private, link-local or metadata address", async () => {
		const refusals: [string, string][] = [
			[`http://127.0.0.1:${receiver.port}/`, "WEBHOOK_URL_NOT_HTTPS"],
			["http://example.com/", "WEBHOOK_URL_NOT_HTTPS"],
			["https://10.0.0.1/", "WEBHOOK_URL_PRIVATE"],
			["https://169.254.169.254/latest/meta-data/", "WEBHOOK_URL_PRIVATE"],
			["https://[::1]/", "WEBHOOK_URL_PRIVATE"],
			["https://[::ffff:127.0.0.1]/", "WEBHOOK_URL_PRIVATE"],
			["https://0x7f.1/", "WEBHOOK_URL_PRIVATE"],
			["https://[fd00:ec2::254]/", "WEBHOOK_URL_PRIVATE"]
		];
		for (const [url, type] of refusals) {
			const res = await call("POST", "/webhooks", { url, events: ["member.joined"] });
			expect([url, res.status, res.body.type]).toEqual([url, 422, type]);
		}
		expect((await call("GET", "/webhooks")).body.total).toBe(0);
	});

	it("refuses at delivery a name that resolves to a blocked address", async () => {
		const created = await call("POST", "/webhooks", {
			url: `https://localhost:${receiver.port}/hook`,
			events: ["member.joined"]
		});
		expect(created.status).toBe(201);
		expect((await call("POST", "/members", { memberId: "p001", name: "p" })).status).toBe(201);
		await eventually(async () =>
			expect(
				(await call("GET", `/webhooks/${created.body.webhookId}/deliveries`)).body.rows
			).toEqual([
				expect.objectContaining({
					status: "pending",
					attempts: 2,
					lastStatus: "BLOCKED_ADDRESS",
					nextAttemptAt: expect.any(String)
				})
			])
		);
		expect(receiver.received).toEqual([]);
	});
});

describe("webhooks' rules", () => {
	it("blocks the addresses a webhook may not reach in production, and no other", () => {
		for (const address of [
			"127.0.0.1",
			"10.1.2.3",
			"172.31.255.255",
			"192.168.0.1",
			"169.254.169.254",
			"100.100.100.200",
			"0.0.0.0",
			"255.255.255.255",
			"224.0.0.1",
			"::",
			"::1",
			"::ffff:10.0.0.1",
			"::ffff:7f00:1",
			"64:ff9b::7f00:1",
			"2002:a00:1::",
			"fd00:ec2::254",
			"fe80::1",
			"ff02::1",
			"not an address"
		])
			expect([address, isBlockedAddress(address)]).toEqual([address, true]);
		for (const address of [
			"8.8.8.8",
			"1.1.1.1",
			"172.32.0.1",
			"2606:4700:4700::1111",
			"::ffff:8.8.8.8",
			"64:ff9b::808:808"
		])
			expect([address, isBlockedAddress(address)]).toEqual([address, false]);
	});

	it("lets WEBHOOK_ALLOW_PRIVATE reach private addresses, still over https in production", () => {
		const policy = { requireHttps: true, blockPrivate: false };
		expect(checkUrl("https://10.0.0.1/hook", policy).href).toBe("https://10.0.0.1/hook");
		expect(() => checkUrl("http://10.0.0.1/hook", policy)).toThrow(RefusedUrl);
		const development = { requireHttps: false, blockPrivate: false };
		expect(checkUrl("http://127.0.0.1:8080/", development).href).toBe("http://127.0.0.1:8080/");
	});

	it("waits each step of the schedule, ±20 %, and nothing after the last", () => {
		const schedule = parseDurations("WEBHOOK_RETRY_SCHEDULE", "5s,5m,30m,2h,8h,24h");
		expect(schedule).toEqual([5000, 300_000, 1_800_000, 7_200_000, 28_800_000, 86_400_000]);
		expect(retryDelay(schedule, 1, () => 0)).toBe(4000);
		expect(retryDelay(schedule, 1, () => 0.999_999)).toBe(6000);
		expect(retryDelay(schedule, 6, () => 0.5)).toBe(86_400_000);
		expect(retryDelay(schedule, 7)).toBeUndefined();
	});
});
