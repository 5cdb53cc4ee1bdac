import type { Service } from "moleculer";
import { loadConfig, parseApiKeys } from "../../config";
import ApiService from "../../services/api.service";
import BillingService from "../../services/billing.service";
import DashboardService from "../../services/dashboard.service";
import DealsService from "../../services/deals.service";
import MerchantsService from "../../services/merchants.service";
import PaymentsService from "../../services/payments.service";
import PointsService from "../../services/points.service";
import WebhooksService from "../../services/webhooks.service";
import { createTestBroker, withSettings, type AnyServiceSchema } from "../helpers/broker";

describe("configuration", () => {
	it("has defaults that run on an empty machine", () => {
		const config = loadConfig({});
		expect(config).toMatchObject({
			port: 3000,
			earnRateBp: 100,
			settlementFeeBp: 200,
			pointPriceBp: 10_000,
			merchants: "open",
			rateLimit: 6000,
			apiKeys: []
		});
		expect(config.mongoUri).toBeUndefined();
	});

	it("reads API_KEYS as tokens and roles, a staff token with or without a name", () => {
		expect(
			parseApiKeys(
				"aaaaaaaaaaaaaaaa=staff, bbbbbbbbbbbbbbbb=merchant:20,cccccccccccccccc=staff:alice.kim"
			)
		).toEqual([
			{ token: "aaaaaaaaaaaaaaaa", role: { kind: "staff" } },
			{ token: "bbbbbbbbbbbbbbbb", role: { kind: "merchant", merchantId: "20" } },
			{ token: "cccccccccccccccc", role: { kind: "staff", name: "alice.kim" } }
		]);
	});

	it.each([
		"short=staff",
		"aaaaaaaaaaaaaaaa=admin",
		"aaaaaaaaaaaaaaaa=merchant:",
		"aaaaaaaaaaaaaaaa",
		"aaaaaaaaaaaaaaaa=merchant:a b",
		"aaaaaaaaaaaaaaaa=staff:",
		"aaaaaaaaaaaaaaaa=staff:a b",
		`aaaaaaaaaaaaaaaa=staff:${"n".repeat(65)}`
	])("refuses API_KEYS entry %p", entry => {
		expect(() => parseApiKeys(entry)).toThrow(/API_KEYS entries must be/);
	});

	it("traces to Zipkin only with TRACING=zipkin, every request outside production and a tenth in it", () => {
		expect(loadConfig({}).tracing).toBeUndefined();
		expect(
			loadConfig({ TRACING: "off", ZIPKIN_URL: "http://zipkin:9411" }).tracing
		).toBeUndefined();
		expect(loadConfig({ TRACING: "zipkin" }).tracing).toEqual({
			zipkinUrl: "http://127.0.0.1:9411",
			sample: 1
		});
		expect(
			loadConfig({ TRACING: "zipkin", NODE_ENV: "production", ZIPKIN_URL: "http://zipkin:9411/" })
				.tracing
		).toEqual({ zipkinUrl: "http://zipkin:9411", sample: 0.1 });
		expect(loadConfig({ TRACING: "zipkin", TRACING_SAMPLE: "0.25" }).tracing?.sample).toBe(0.25);
		expect(() => loadConfig({ TRACING: "jaeger" })).toThrow(/TRACING must be one of off, zipkin/);
		expect(() => loadConfig({ TRACING: "zipkin", ZIPKIN_URL: "zipkin:9411" })).toThrow(
			/ZIPKIN_URL must be/
		);
		for (const raw of ["-0.1", "1.5", "all"])
			expect(() => loadConfig({ TRACING: "zipkin", TRACING_SAMPLE: raw })).toThrow(
				/TRACING_SAMPLE must/
			);
	});

	it("writes text logs by default, JSON lines with LOG_FORMAT=json", () => {
		expect(loadConfig({}).logFormat).toBe("text");
		expect(loadConfig({ LOG_FORMAT: "json" }).logFormat).toBe("json");
		expect(() => loadConfig({ LOG_FORMAT: "xml" })).toThrow(/LOG_FORMAT must be one of text, json/);
	});

	it("reads POINTS_VALID_MONTHS: 0 (never expire) by default, and refuses what is not a whole number of months", () => {
		expect(loadConfig({}).pointsValidMonths).toBe(0);
		expect(loadConfig({ POINTS_VALID_MONTHS: "12" }).pointsValidMonths).toBe(12);
		for (const raw of ["-1", "1.5", "twelve", "1e2", "1201"])
			expect(() => loadConfig({ POINTS_VALID_MONTHS: raw })).toThrow(
				/POINTS_VALID_MONTHS must be a whole number of months from 0 \(never expire\) to 1200, got/
			);
	});

	it("reads TIERS as names, thresholds and multipliers in basis points: one tier without it", () => {
		expect(loadConfig({}).tiers).toEqual([{ name: "basic", threshold: 0, multiplierBp: 10_000 }]);
		expect(loadConfig({ TIERS: " basic:0:1, silver:5000:1.25,gold:20000:1.5 " }).tiers).toEqual([
			{ name: "basic", threshold: 0, multiplierBp: 10_000 },
			{ name: "silver", threshold: 5000, multiplierBp: 12_500 },
			{ name: "gold", threshold: 20_000, multiplierBp: 15_000 }
		]);
		expect(loadConfig({ TIERS: "only:0:2.0001" }).tiers).toEqual([
			{ name: "only", threshold: 0, multiplierBp: 20_001 }
		]);
		for (const [raw, message] of [
			["basic:0", /TIERS entries must be 'name:threshold:multiplier'/],
			["basic:0:1,", /TIERS entries must be/],
			["Basic:0:1", /TIERS entries must be/],
			[`${"n".repeat(33)}:0:1`, /TIERS entries must be/],
			["basic:0:1,silver:-5:1.2", /TIERS entries must be/],
			["basic:0:1,silver:5.5:1.2", /TIERS entries must be/],
			["basic:0:1:2", /TIERS entries must be/],
			["basic:0:1,silver:500:x", /TIERS multiplier of 'silver' must be a decimal/],
			["basic:0:1,silver:500:1.00001", /TIERS multiplier of 'silver' must be a decimal/],
			["basic:0:1,silver:500:10.5", /TIERS multiplier of 'silver' must be between 0 and 10/],
			["basic:0:0.9", /TIERS multiplier of 'basic' must be from 1 to 10, got '0.9'/],
			["silver:100:1", /TIERS must begin with a tier of threshold 0, got '100'/],
			["basic:0:1,silver:500:1.2,gold:500:1.5", /TIERS thresholds must be strictly ascending/],
			["basic:0:1,silver:500:1.2,silver:900:1.5", /TIERS names must be unique, got 'silver'/]
		] as const)
			expect(() => loadConfig({ TIERS: raw })).toThrow(message);
	});

	it("reads TRANSFER_DAILY_LIMIT: 100000 points by default, and refuses what is not a whole number of points from 1", () => {
		expect(loadConfig({}).transferDailyLimit).toBe(100_000);
		expect(loadConfig({ TRANSFER_DAILY_LIMIT: " 500 " }).transferDailyLimit).toBe(500);
		for (const raw of ["0", "-1", "1.5", "lots", "1e3", "1000000001"])
			expect(() => loadConfig({ TRANSFER_DAILY_LIMIT: raw })).toThrow(
				/TRANSFER_DAILY_LIMIT must be a whole number of points from 1 to 1000000000, got/
			);
	});

	it("reads IMPORT_MAX_BYTES: 256 MiB by default, at least 1024", () => {
		expect(loadConfig({}).importMaxBytes).toBe(268_435_456);
		expect(loadConfig({ IMPORT_MAX_BYTES: "2048" }).importMaxBytes).toBe(2048);
		expect(() => loadConfig({ IMPORT_MAX_BYTES: "10" })).toThrow(
			/IMPORT_MAX_BYTES must be at least 1024, got 10/
		);
	});

	it("reads POINT_PRICE as a price of 0 to 100 in basis points, and MERCHANTS as open or registered", () => {
		expect(loadConfig({ POINT_PRICE: "2.5", MERCHANTS: "registered" })).toMatchObject({
			pointPriceBp: 25_000,
			merchants: "registered"
		});
		expect(() => loadConfig({ POINT_PRICE: "100.5" })).toThrow(
			/POINT_PRICE must be between 0 and 100, got '100.5'/
		);
		expect(() => loadConfig({ POINT_PRICE: "0.00001" })).toThrow(/at most 4 places/);
		expect(() => loadConfig({ MERCHANTS: "closed" })).toThrow(
			/MERCHANTS must be one of open, registered, got 'closed'/
		);
	});

	it("reads member tokens' settings: the identity provider, the audience and claim, OnePoint's own key and limits", () => {
		expect(loadConfig({})).toMatchObject({
			memberJwtAudience: "onepoint",
			memberIdClaim: "sub",
			memberTokenTtlS: 900,
			memberRateLimit: 60
		});
		expect(loadConfig({}).memberJwksUrl).toBeUndefined();
		const provider = loadConfig({
			MEMBER_JWKS_URL: "https://idp.example.com/realms/shop/protocol/openid-connect/certs",
			MEMBER_JWT_ISSUER: "https://idp.example.com/realms/shop",
			MEMBER_JWT_AUDIENCE: "loyalty",
			MEMBER_ID_CLAIM: "member_id",
			MEMBER_TOKEN_TTL_S: "600",
			MEMBER_RATE_LIMIT: "30",
			MEMBER_TOKEN_KEY: "-----BEGIN PRIVATE KEY-----\\nABC\\n-----END PRIVATE KEY-----"
		});
		expect(provider).toMatchObject({
			memberJwksUrl: "https://idp.example.com/realms/shop/protocol/openid-connect/certs",
			memberJwtIssuer: "https://idp.example.com/realms/shop",
			memberJwtAudience: "loyalty",
			memberIdClaim: "member_id",
			memberTokenTtlS: 600,
			memberRateLimit: 30,
			memberTokenKey: "-----BEGIN PRIVATE KEY-----\nABC\n-----END PRIVATE KEY-----"
		});
		// http only to a loopback address, and not in production.
		const local = { MEMBER_JWKS_URL: "http://127.0.0.1:8080/jwks", MEMBER_JWT_ISSUER: "local" };
		expect(loadConfig(local).memberJwksUrl).toBe("http://127.0.0.1:8080/jwks");
		expect(() => loadConfig({ ...local, NODE_ENV: "production" })).toThrow(
			/MEMBER_JWKS_URL must be https/
		);
		expect(() =>
			loadConfig({ MEMBER_JWKS_URL: "http://idp.example.com/jwks", MEMBER_JWT_ISSUER: "x" })
		).toThrow(/MEMBER_JWKS_URL must be https/);
		expect(() => loadConfig({ MEMBER_JWKS_URL: "not a url", MEMBER_JWT_ISSUER: "x" })).toThrow(
			/MEMBER_JWKS_URL must be a URL/
		);
		expect(() => loadConfig({ MEMBER_JWKS_URL: "https://idp.example.com/jwks" })).toThrow(
			/MEMBER_JWT_ISSUER must be set/
		);
		expect(() =>
			loadConfig({ MEMBER_JWKS_URL: "https://idp.example.com/jwks", MEMBER_JWT_ISSUER: "onepoint" })
		).toThrow(/MEMBER_JWT_ISSUER must not be 'onepoint'/);
		expect(() => loadConfig({ MEMBER_RATE_LIMIT: "0" })).toThrow(
			/MEMBER_RATE_LIMIT must be at least 1/
		);
		expect(() => loadConfig({ MEMBER_TOKEN_TTL_S: "10" })).toThrow(
			/MEMBER_TOKEN_TTL_S must be at least 60/
		);
	});

	it("refuses a number that is not one", () => {
		expect(() => loadConfig({ PORT: "eighty" })).toThrow(/PORT must be a number/);
	});

	it("reads a production cluster's settings: stream replicas, the write concern, how long a call waits for a service", () => {
		expect(loadConfig({})).toMatchObject({ natsStreamReplicas: 1, serviceWaitMs: 0 });
		expect(loadConfig({}).mongoWriteConcern).toBeUndefined();
		expect(
			loadConfig({
				NATS_STREAM_REPLICAS: "3",
				MONGO_WRITE_CONCERN: "majority",
				SERVICE_WAIT_MS: "5000"
			})
		).toMatchObject({ natsStreamReplicas: 3, mongoWriteConcern: "majority", serviceWaitMs: 5000 });
		expect(loadConfig({ MONGO_WRITE_CONCERN: "2" }).mongoWriteConcern).toBe(2);
		for (const replicas of ["0", "6", "three"])
			expect(() => loadConfig({ NATS_STREAM_REPLICAS: replicas })).toThrow(
				`NATS_STREAM_REPLICAS must be a whole number from 1 to 5, got '${replicas}'`
			);
		for (const concern of ["all", "-1", "51"])
			expect(() => loadConfig({ MONGO_WRITE_CONCERN: concern })).toThrow(
				`MONGO_WRITE_CONCERN must be 'majority' or a number of members from 0 to 50, got '${concern}'`
			);
		expect(() => loadConfig({ SERVICE_WAIT_MS: "-1" })).toThrow(
			/SERVICE_WAIT_MS must be at least 0, got -1/
		);
	});

	it("keeps idempotency keys at least 24 hours", () => {
		expect(loadConfig({})).toMatchObject({
			idempotencyRetentionHours: 24,
			idempotencyLeaseMs: 30_000
		});
		expect(loadConfig({ IDEMPOTENCY_RETENTION_HOURS: "48" }).idempotencyRetentionHours).toBe(48);
		expect(() => loadConfig({ IDEMPOTENCY_RETENTION_HOURS: "1" })).toThrow(
			/IDEMPOTENCY_RETENTION_HOURS must be at least 24, got 1/
		);
	});

	it("reads the webhooks' timeout, retry schedule (durations in ms, s, m, h or d) and private addresses, and refuses what is not one", () => {
		expect(loadConfig({})).toMatchObject({
			webhookTimeoutMs: 5000,
			webhookRetryScheduleMs: [5000, 300_000, 1_800_000, 7_200_000, 28_800_000, 86_400_000],
			webhookAllowPrivate: false
		});
		expect(
			loadConfig({
				WEBHOOK_TIMEOUT_MS: "250",
				WEBHOOK_RETRY_SCHEDULE: "100ms, 2s,1d",
				WEBHOOK_ALLOW_PRIVATE: "true"
			})
		).toMatchObject({
			webhookTimeoutMs: 250,
			webhookRetryScheduleMs: [100, 2000, 86_400_000],
			webhookAllowPrivate: true
		});
		for (const raw of ["5", "5x", "0s", "1.5s", "-1s", "5s,,5m", "5 s", "31d"])
			expect(() => loadConfig({ WEBHOOK_RETRY_SCHEDULE: raw })).toThrow(
				/WEBHOOK_RETRY_SCHEDULE must be a comma-separated list of durations/
			);
		expect(() => loadConfig({ WEBHOOK_RETRY_SCHEDULE: Array(21).fill("1s").join(",") })).toThrow(
			/WEBHOOK_RETRY_SCHEDULE takes at most 20 durations, got 21/
		);
		expect(() => loadConfig({ WEBHOOK_TIMEOUT_MS: "50" })).toThrow(
			/WEBHOOK_TIMEOUT_MS must be at least 100, got 50/
		);
		expect(() => loadConfig({ WEBHOOK_ALLOW_PRIVATE: "yes" })).toThrow(
			/WEBHOOK_ALLOW_PRIVATE must be one of false, true, got 'yes'/
		);
	});
});

describe("services' settings", () => {
	const settingsOf = async (services: AnyServiceSchema[], env: NodeJS.ProcessEnv) => {
		const broker = createTestBroker(services, env);
		try {
			return Object.fromEntries(broker.services.map(s => [s.name, s.settings]));
		} finally {
			await broker.stop();
		}
	};

	it("take their defaults from the configuration of the broker they run on", async () => {
		const settings = await settingsOf(
			[
				DealsService,
				MerchantsService,
				PaymentsService,
				BillingService,
				PointsService,
				DashboardService
			],
			{
				CALL_TIMEOUT_MS: "300",
				EARN_RATE: "0.05",
				POINT_PRICE: "1.5",
				MERCHANTS: "registered",
				PAYMENT_LIMIT: "5",
				MONTH_END_GRACE_MINUTES: "1",
				POINTS_VALID_MONTHS: "24",
				TIERS: "basic:0:1,gold:100:2",
				TRANSFER_DAILY_LIMIT: "2500"
			}
		);
		expect(settings.points).toMatchObject({
			pointsValidMonths: 24,
			tiers: [
				{ name: "basic", threshold: 0, multiplierBp: 10_000 },
				{ name: "gold", threshold: 100, multiplierBp: 20_000 }
			],
			transferDailyLimit: 2500,
			callTimeoutMs: 300,
			expiryCheckMs: 60_000,
			sweepIntervalMs: 5000
		});
		expect(settings.dashboard).toMatchObject({ pointsValidMonths: 24 });
		expect(settings.deals).toMatchObject({
			callTimeoutMs: 300,
			pendingTimeoutMs: 300,
			pendingSweepMs: 300
		});
		expect(settings.merchants).toMatchObject({
			defaultTerms: { earnRateBp: 500, redemptionFeeBp: 200, pointPriceBp: 15_000 },
			merchants: "registered"
		});
		expect(settings.payments).toMatchObject({ limit: 5, delayMs: 0 });
		expect(settings.billing).toMatchObject({
			monthEnd: { graceMs: 60_000, firstCheckMs: 10_000, checkEveryMs: 60_000 },
			settlementFeeBp: 200
		});
	});

	it("are overridden by a schema's own settings, also inside nested ones", async () => {
		const settings = await settingsOf(
			[
				withSettings(DealsService, { pendingTimeoutMs: 50 }),
				withSettings(BillingService, { monthEnd: { checkEveryMs: 20 } })
			],
			{
				CALL_TIMEOUT_MS: "300"
			}
		);
		expect(settings.deals).toMatchObject({
			callTimeoutMs: 300,
			pendingTimeoutMs: 50,
			pendingSweepMs: 300
		});
		expect(settings.billing).toMatchObject({
			monthEnd: { graceMs: 600_000, firstCheckMs: 10_000, checkEveryMs: 20 }
		});
	});

	it("give webhooks their timeout and schedule, and https and public addresses only in production (unless WEBHOOK_ALLOW_PRIVATE)", async () => {
		const settings = (env: NodeJS.ProcessEnv) =>
			settingsOf([WebhooksService], env).then(all => all.webhooks);
		expect(
			await settings({ WEBHOOK_TIMEOUT_MS: "700", WEBHOOK_RETRY_SCHEDULE: "1s,2m" })
		).toMatchObject({
			timeoutMs: 700,
			retryScheduleMs: [1000, 120_000],
			addresses: { requireHttps: false, blockPrivate: false }
		});
		expect(await settings({ NODE_ENV: "production" })).toMatchObject({
			addresses: { requireHttps: true, blockPrivate: true }
		});
		expect(await settings({ NODE_ENV: "production", WEBHOOK_ALLOW_PRIVATE: "true" })).toMatchObject(
			{ addresses: { requireHttps: true, blockPrivate: false } }
		);
	});

	it("keep the gateway's tokens to the node", async () => {
		const broker = createTestBroker([ApiService], {
			API_KEYS: "aaaaaaaaaaaaaaaa=staff",
			PORT: "0"
		});
		await broker.start();
		try {
			const api = broker.getLocalService("api") as unknown as Service<Record<string, unknown>>;
			expect(api.settings.apiKeys).toEqual([
				{ token: "aaaaaaaaaaaaaaaa", role: { kind: "staff" } }
			]);
			expect(api.settings.port).toBe(0);
			// What the node tells the others about its services.
			const list = broker.registry.getServiceList as (
				opts: object
			) => { name: string; settings?: object }[];
			const shared = list.call(broker.registry, { withSettings: true }).find(s => s.name === "api");
			expect(shared?.settings).toMatchObject({ retryAfterSeconds: 5 });
			expect(shared?.settings).not.toHaveProperty("apiKeys");
			expect(shared?.settings).not.toHaveProperty("ownKey");
		} finally {
			await broker.stop();
		}
	});
});
