/**
 * The one place OnePoint reads its environment. Every value has a default that lets
 * `npm start` run on an empty machine; nothing else in the code reads `process.env`.
 */
import path from "node:path";
import { MAX_POINTS } from "../lib/params";
import { BASIS, parseRate } from "../lib/rates";
import type { Tier } from "../lib/tiers";

export interface Config {
	nodeEnv: string;
	nodeID?: string;
	namespace: string;
	logLevel: string;
	logColors: boolean;
	/** `text`: Moleculer's short coloured lines; `json`: one JSON object per line (pino), for a log collector. */
	logFormat: "text" | "json";
	/** Spans sent to a Zipkin collector (`TRACING=zipkin`); none by default. */
	tracing?: TracingConfig;
	port: number;
	host: string;
	dataDir: string;
	/**
	 * When the embedded store syncs to disk (`SQLITE_SYNCHRONOUS`): `NORMAL` at checkpoints (a killed
	 * process loses nothing it answered; an OS crash may lose the last commits), `FULL` at every commit.
	 */
	sqliteSynchronous: "NORMAL" | "FULL";
	mongoUri?: string;
	/**
	 * The write concern of every MongoDB write (`MONGO_WRITE_CONCERN`): `majority` on a replica set, so
	 * that an acknowledged change survives the loss of the primary; unset, the server's default.
	 */
	mongoWriteConcern?: "majority" | number;
	/**
	 * How long a MongoDB call may wait for a server, and then for its answer, before it fails with
	 * 503 `STORE_UNAVAILABLE` (ms): a hung or unreachable store fails calls instead of holding them.
	 */
	mongoTimeoutMs: number;
	transporter?: string;
	/** Replicas of every JetStream stream OnePoint creates (`NATS_STREAM_REPLICAS`): 3 on a three-server cluster. */
	natsStreamReplicas: number;
	/**
	 * How long a call to a service that no node serves right now (its node being replaced) waits for
	 * one before it fails (ms, `SERVICE_WAIT_MS`); 0: it fails at once.
	 */
	serviceWaitMs: number;
	/** The node's Prometheus `/metrics` and `/live`, `/ready` probes (`0`: any free port; `off`: none). */
	metricsPort?: number;
	/** Points earned per unit of a `save` deal's amount, in basis points (`EARN_RATE=0.01` is 100). */
	earnRateBp: number;
	/** Share of used points a merchant pays as a fee at settlement, in basis points (`0.02` is 200). */
	settlementFeeBp: number;
	/** What a merchant pays per point its deals issue, in basis points (`POINT_PRICE=1` is 10000). */
	pointPriceBp: number;
	/**
	 * `open`: a merchant nobody registered deals on the terms above (the seed's `merchantId=20`);
	 * `registered`: only registered merchants may deal.
	 */
	merchants: "open" | "registered";
	/** How long a synchronous call to another service may take before it counts as failed (ms). */
	callTimeoutMs: number;
	/** What a 503 asks the client to wait before retrying (s). */
	retryAfterSeconds: number;
	/** Gateway tokens and the role each grants (`API_KEYS`); empty means "generate one for a demo". */
	apiKeys: ApiKey[];
	/** Requests a minute allowed per token, or per address without one. */
	rateLimit: number;
	/** How long after a month's end its settlements are made, so late events arrive first (ms). */
	monthEndGraceMs: number;
	/** The simulated payment provider declines a payment above this total. */
	paymentLimit: number;
	/** How long the simulated payment provider takes to answer (ms), to show overload. */
	paymentDelayMs: number;
	/**
	 * How long a request under an `Idempotency-Key` holds its key (ms): a retry meanwhile is 409
	 * REQUEST_IN_PROGRESS; after it (the gateway died) a retry runs the request again, under the same
	 * request id. Longer than any request may run (the broker's request timeout is 10 s).
	 */
	idempotencyLeaseMs: number;
	/** How long an `Idempotency-Key` and its answer are kept (hours; at least 24). */
	idempotencyRetentionHours: number;
	/** Months earned points stay valid after the month they were earned in (`POINTS_VALID_MONTHS`); 0: they never expire. */
	pointsValidMonths: number;
	/** Days a save's points are held before they can be spent (`POINTS_HOLD_DAYS`, a merchant's default); 0: at once. */
	pointsHoldDays: number;
	/** The tiers a member's earnings of the last 12 months reach (`TIERS`), lowest first; one without it. */
	tiers: Tier[];
	/** The most points a member may send by transfer in one UTC day (`TRANSFER_DAILY_LIMIT`), at least 1. */
	transferDailyLimit: number;
	/** How long a webhook's endpoint may take to answer a delivery before the attempt counts as failed (ms). */
	webhookTimeoutMs: number;
	/** The waits before each retry of a failed webhook delivery (ms, before jitter); after the last, it has failed. */
	webhookRetryScheduleMs: number[];
	/** In production, webhooks may reach loopback, private, link-local and metadata addresses all the same. */
	webhookAllowPrivate: boolean;
	/** The operator's identity provider whose JWTs act as members (`MEMBER_JWKS_URL`); none: only OnePoint's own. */
	memberJwksUrl?: string;
	/** The `iss` its tokens must carry (`MEMBER_JWT_ISSUER`, required with the URL). */
	memberJwtIssuer?: string;
	/** The `aud` member tokens must carry, the provider's and OnePoint's own (`MEMBER_JWT_AUDIENCE`). */
	memberJwtAudience: string;
	/** The provider's claim that holds the memberId (`MEMBER_ID_CLAIM`). */
	memberIdClaim: string;
	/** How long a session OnePoint issues is valid (s, `MEMBER_TOKEN_TTL_S`). */
	memberTokenTtlS: number;
	/** OnePoint's session signing key, a PEM private key every gateway shares (`MEMBER_TOKEN_KEY`). */
	memberTokenKey?: string;
	/** Requests a minute allowed per member token's member (`MEMBER_RATE_LIMIT`). */
	memberRateLimit: number;
	/** The largest CSV `POST /api/imports` takes (bytes, `IMPORT_MAX_BYTES`); a larger one is 413. */
	importMaxBytes: number;
}

export interface TracingConfig {
	/** The collector's base URL (`ZIPKIN_URL`): spans go to `<url>/api/v2/spans`. */
	zipkinUrl: string;
	/** The share of requests traced, 0 to 1 (`TRACING_SAMPLE`; 1 by default, 0.1 in production). */
	sample: number;
}

/** A staff token may carry a name (`token=staff:alice`), recorded on what it does. */
export type Role =
	| { kind: "staff"; name?: string }
	| { kind: "merchant"; merchantId: string }
	| { kind: "member"; memberId: string };

export interface ApiKey {
	token: string;
	role: Role;
}

/** `API_KEYS=token=staff,token2=staff:alice,token3=merchant:20`: a token of 16+ safe characters and its role. */
export function parseApiKeys(raw: string | undefined): ApiKey[] {
	if (!raw?.trim()) return [];
	return raw.split(",").map(entry => {
		const match =
			/^\s*([A-Za-z0-9._~+/-]{16,256})=(staff(?::([A-Za-z0-9._-]{1,64}))?|merchant:([A-Za-z0-9_-]{1,64}))\s*$/.exec(
				entry
			);
		if (!match)
			throw new Error(
				"API_KEYS entries must be 'token=staff', 'token=staff:<name>' or 'token=merchant:<merchantId>', with tokens of at least 16 characters [A-Za-z0-9._~+/-] and names of [A-Za-z0-9._-]"
			);
		const role: Role = match[4]
			? { kind: "merchant", merchantId: match[4] }
			: match[3]
				? { kind: "staff", name: match[3] }
				: { kind: "staff" };
		return { token: match[1], role };
	});
}

/** One tier, no threshold and no multiplier: tiers change nothing. */
const ONE_TIER: Tier[] = [{ name: "basic", threshold: 0, multiplierBp: BASIS }];

/**
 * `TIERS=basic:0:1,silver:5000:1.25,gold:20000:1.5`: each tier's name (`[a-z0-9_-]`, 1–32, unique),
 * the points earned in 12 months that reach it (whole, strictly ascending, the first 0) and its
 * earn multiplier (a decimal from 1 to 10 with at most 4 places).
 */
export function parseTiers(raw: string | undefined): Tier[] {
	if (!raw) return ONE_TIER;
	const tiers = raw.split(",").map(entry => {
		const match = /^\s*([a-z0-9_-]{1,32}):(\d{1,15}):([^:\s]+)\s*$/.exec(entry);
		if (!match)
			throw new Error(
				`TIERS entries must be 'name:threshold:multiplier' (a name of 1-32 [a-z0-9_-], a whole number of points, a decimal), got '${entry}'`
			);
		const [, name, threshold, multiplier] = match;
		const multiplierBp = parseRate(`TIERS multiplier of '${name}'`, multiplier, 10);
		if (multiplierBp < BASIS)
			throw new Error(`TIERS multiplier of '${name}' must be from 1 to 10, got '${multiplier}'`);
		return { name, threshold: Number(threshold), multiplierBp };
	});
	if (tiers[0].threshold !== 0)
		throw new Error(`TIERS must begin with a tier of threshold 0, got '${tiers[0].threshold}'`);
	tiers.forEach((tier, i) => {
		if (i > 0 && tier.threshold <= tiers[i - 1].threshold)
			throw new Error(
				`TIERS thresholds must be strictly ascending, got ${tier.threshold} for '${tier.name}' after ${tiers[i - 1].threshold}`
			);
		if (tiers.findIndex(t => t.name === tier.name) !== i)
			throw new Error(`TIERS names must be unique, got '${tier.name}' twice`);
	});
	return tiers;
}

function number(env: NodeJS.ProcessEnv, name: string, fallback: number): number {
	const raw = env[name];
	if (raw == null || raw.trim() === "") return fallback;
	const value = Number(raw);
	if (!Number.isFinite(value)) throw new Error(`${name} must be a number, got '${raw}'`);
	return value;
}

/** A whole number of months, 0 to 1200 (a century). */
function months(env: NodeJS.ProcessEnv, name: string): number {
	const raw = text(env, name) ?? "0";
	if (!/^\d{1,4}$/.test(raw) || Number(raw) > 1200)
		throw new Error(
			`${name} must be a whole number of months from 0 (never expire) to 1200, got '${raw}'`
		);
	return Number(raw);
}

/** A whole number of days, 0 to 365 (a return window). */
function days(env: NodeJS.ProcessEnv, name: string): number {
	const raw = text(env, name) ?? "0";
	if (!/^\d{1,3}$/.test(raw) || Number(raw) > 365)
		throw new Error(`${name} must be a whole number of days from 0 to 365, got '${raw}'`);
	return Number(raw);
}

/** A whole number of points, 1 to MAX_POINTS. */
function wholePoints(env: NodeJS.ProcessEnv, name: string, fallback: number): number {
	const raw = text(env, name) ?? String(fallback);
	if (!/^\d{1,10}$/.test(raw) || Number(raw) < 1 || Number(raw) > MAX_POINTS)
		throw new Error(
			`${name} must be a whole number of points from 1 to ${MAX_POINTS}, got '${raw}'`
		);
	return Number(raw);
}

const DURATION_UNITS_MS: Record<string, number> = {
	ms: 1,
	s: 1000,
	m: 60_000,
	h: 3_600_000,
	d: 86_400_000
};

const MAX_DURATION_MS = 30 * DURATION_UNITS_MS.d;

/** `5s,5m,30m,2h,8h,24h`: 1 to 20 durations in milliseconds, each a whole number and a unit (ms, s, m, h, d), at most 30 days. */
export function parseDurations(name: string, raw: string): number[] {
	const durations = raw.split(",").map(entry => {
		const match = /^\s*(\d{1,9})(ms|s|m|h|d)\s*$/.exec(entry);
		const ms = match ? Number(match[1]) * DURATION_UNITS_MS[match[2]] : 0;
		if (ms <= 0 || ms > MAX_DURATION_MS)
			throw new Error(
				`${name} must be a comma-separated list of durations such as 5s,5m,30m,2h (units ms, s, m, h, d; each above 0 and at most 30d), got '${raw}'`
			);
		return ms;
	});
	if (durations.length > 20)
		throw new Error(`${name} takes at most 20 durations, got ${durations.length}`);
	return durations;
}

/**
 * The provider's JWKS address: https, or http to a loopback address (a provider on the same machine,
 * or a test's) outside production.
 */
function jwksUrl(env: NodeJS.ProcessEnv, production: boolean): string | undefined {
	const raw = text(env, "MEMBER_JWKS_URL");
	if (!raw) return undefined;
	let url: URL;
	try {
		url = new URL(raw);
	} catch {
		throw new Error(`MEMBER_JWKS_URL must be a URL, got '${raw}'`);
	}
	const loopback = ["localhost", "127.0.0.1", "[::1]"].includes(url.hostname);
	if (url.protocol !== "https:" && !(url.protocol === "http:" && loopback && !production))
		throw new Error(
			`MEMBER_JWKS_URL must be https (or http to a loopback address outside production), got '${raw}'`
		);
	return url.href;
}

/** `majority` or a number of members, 0 to 50; unset: the server's default. */
function writeConcern(env: NodeJS.ProcessEnv): "majority" | number | undefined {
	const raw = text(env, "MONGO_WRITE_CONCERN");
	if (raw === undefined || raw === "majority") return raw;
	if (!/^\d{1,2}$/.test(raw) || Number(raw) > 50)
		throw new Error(
			`MONGO_WRITE_CONCERN must be 'majority' or a number of members from 0 to 50, got '${raw}'`
		);
	return Number(raw);
}

/** `TRACING=zipkin` with its collector and sampling, or nothing (`TRACING` unset or `off`). */
function tracing(env: NodeJS.ProcessEnv, production: boolean): TracingConfig | undefined {
	if (oneOf(env, "TRACING", ["off", "zipkin"]) === "off") return undefined;
	const raw = text(env, "ZIPKIN_URL") ?? "http://127.0.0.1:9411";
	let url: URL;
	try {
		url = new URL(raw);
	} catch {
		throw new Error(`ZIPKIN_URL must be a URL such as http://zipkin:9411, got '${raw}'`);
	}
	if (url.protocol !== "http:" && url.protocol !== "https:")
		throw new Error(`ZIPKIN_URL must be an http or https URL, got '${raw}'`);
	const sample = number(env, "TRACING_SAMPLE", production ? 0.1 : 1);
	if (sample < 0 || sample > 1)
		throw new Error(`TRACING_SAMPLE must be from 0 to 1, got ${sample}`);
	return { zipkinUrl: url.href.replace(/\/$/, ""), sample };
}

function text(env: NodeJS.ProcessEnv, name: string): string | undefined {
	const raw = env[name]?.trim();
	return raw ? raw : undefined;
}

/** One of `values`, the first by default. */
function oneOf<T extends string>(env: NodeJS.ProcessEnv, name: string, values: readonly T[]): T {
	const raw = text(env, name) ?? values[0];
	if (!values.includes(raw as T))
		throw new Error(`${name} must be one of ${values.join(", ")}, got '${raw}'`);
	return raw as T;
}

/** JetStream takes 1 to 5 replicas of a stream. */
function streamReplicas(env: NodeJS.ProcessEnv): number {
	const raw = text(env, "NATS_STREAM_REPLICAS") ?? "1";
	if (!/^[1-5]$/.test(raw))
		throw new Error(`NATS_STREAM_REPLICAS must be a whole number from 1 to 5, got '${raw}'`);
	return Number(raw);
}

function atLeast(min: number, name: string, value: number): number {
	if (value < min) throw new Error(`${name} must be at least ${min}, got ${value}`);
	return value;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
	const nodeEnv = text(env, "NODE_ENV") ?? "development";
	const memberJwksUrl = jwksUrl(env, nodeEnv === "production");
	const memberJwtIssuer = text(env, "MEMBER_JWT_ISSUER");
	if (memberJwksUrl && !memberJwtIssuer)
		throw new Error("MEMBER_JWT_ISSUER must be set with MEMBER_JWKS_URL: the provider's 'iss'");
	// OnePoint's own sessions carry `iss: onepoint` (lib/member-tokens.ts): the provider's must differ.
	if (memberJwksUrl && memberJwtIssuer === "onepoint")
		throw new Error(
			"MEMBER_JWT_ISSUER must not be 'onepoint', the issuer of OnePoint's own sessions"
		);
	return {
		nodeEnv,
		nodeID: text(env, "NODE_ID"),
		namespace: text(env, "NAMESPACE") ?? "onepoint",
		logLevel: text(env, "LOG_LEVEL") ?? "info",
		logColors: !env.CI && !env.NO_COLOR,
		logFormat: oneOf(env, "LOG_FORMAT", ["text", "json"]),
		tracing: tracing(env, nodeEnv === "production"),
		port: number(env, "PORT", 3000),
		host: text(env, "HOST") ?? "0.0.0.0",
		dataDir: path.resolve(text(env, "DATA_DIR") ?? "data"),
		sqliteSynchronous: oneOf(env, "SQLITE_SYNCHRONOUS", ["NORMAL", "FULL"]),
		mongoUri: text(env, "MONGO_URI"),
		mongoWriteConcern: writeConcern(env),
		mongoTimeoutMs: atLeast(100, "MONGO_TIMEOUT_MS", number(env, "MONGO_TIMEOUT_MS", 5000)),
		transporter: text(env, "TRANSPORTER"),
		natsStreamReplicas: streamReplicas(env),
		serviceWaitMs: atLeast(0, "SERVICE_WAIT_MS", number(env, "SERVICE_WAIT_MS", 0)),
		metricsPort:
			text(env, "METRICS_PORT") === "off" ? undefined : number(env, "METRICS_PORT", 3030),
		earnRateBp: parseRate("EARN_RATE", text(env, "EARN_RATE") ?? "0.01"),
		settlementFeeBp: parseRate("SETTLEMENT_FEE", text(env, "SETTLEMENT_FEE") ?? "0.02"),
		pointPriceBp: parseRate("POINT_PRICE", text(env, "POINT_PRICE") ?? "1", 100),
		merchants: oneOf(env, "MERCHANTS", ["open", "registered"]),
		callTimeoutMs: number(env, "CALL_TIMEOUT_MS", 2000),
		retryAfterSeconds: number(env, "RETRY_AFTER_SECONDS", 5),
		apiKeys: parseApiKeys(text(env, "API_KEYS")),
		rateLimit: number(env, "RATE_LIMIT", 6000),
		monthEndGraceMs: number(env, "MONTH_END_GRACE_MINUTES", 10) * 60_000,
		paymentLimit: number(env, "PAYMENT_LIMIT", 1_000_000),
		paymentDelayMs: number(env, "PAYMENT_DELAY_MS", 0),
		idempotencyLeaseMs: atLeast(
			1000,
			"IDEMPOTENCY_LEASE_MS",
			number(env, "IDEMPOTENCY_LEASE_MS", 30_000)
		),
		idempotencyRetentionHours: atLeast(
			24,
			"IDEMPOTENCY_RETENTION_HOURS",
			number(env, "IDEMPOTENCY_RETENTION_HOURS", 24)
		),
		pointsValidMonths: months(env, "POINTS_VALID_MONTHS"),
		pointsHoldDays: days(env, "POINTS_HOLD_DAYS"),
		tiers: parseTiers(text(env, "TIERS")),
		transferDailyLimit: wholePoints(env, "TRANSFER_DAILY_LIMIT", 100_000),
		webhookTimeoutMs: atLeast(100, "WEBHOOK_TIMEOUT_MS", number(env, "WEBHOOK_TIMEOUT_MS", 5000)),
		webhookRetryScheduleMs: parseDurations(
			"WEBHOOK_RETRY_SCHEDULE",
			text(env, "WEBHOOK_RETRY_SCHEDULE") ?? "5s,5m,30m,2h,8h,24h"
		),
		webhookAllowPrivate: oneOf(env, "WEBHOOK_ALLOW_PRIVATE", ["false", "true"]) === "true",
		memberJwksUrl,
		memberJwtIssuer,
		memberJwtAudience: text(env, "MEMBER_JWT_AUDIENCE") ?? "onepoint",
		memberIdClaim: text(env, "MEMBER_ID_CLAIM") ?? "sub",
		memberTokenTtlS: atLeast(60, "MEMBER_TOKEN_TTL_S", number(env, "MEMBER_TOKEN_TTL_S", 900)),
		// A PEM in one line (`\n` escaped), as environment files often hold it.
		memberTokenKey: text(env, "MEMBER_TOKEN_KEY")?.replace(/\\n/g, "\n"),
		memberRateLimit: atLeast(1, "MEMBER_RATE_LIMIT", number(env, "MEMBER_RATE_LIMIT", 60)),
		// 256 MiB: a million rows of members with their contact and opening balance fit about four times.
		importMaxBytes: atLeast(
			1024,
			"IMPORT_MAX_BYTES",
			number(env, "IMPORT_MAX_BYTES", 256 * 1024 * 1024)
		)
	};
}

export const config: Config = loadConfig();
