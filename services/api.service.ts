/**
 * The HTTP gateway (moleculer-web). A route is declared once, on its action (`rest: "POST /deals"`);
 * the alias table and the OpenAPI document (`GET /api/openapi.json`, read at `/docs`) are both built
 * from the published services' schemas (`lib/gateway/openapi.ts`). Nothing else is reachable
 * (`mappingPolicy: "restrict"`); internal actions such as `points.debit` have no `rest`.
 * Every request but `GET /api/health` needs `Authorization: Bearer <token>`: one of API_KEYS, a
 * merchant's key issued through the API (services/merchants.service.ts), or a member token — a JWT
 * from the operator's identity provider or a session OnePoint issued (lib/member-tokens.ts); what a
 * role may do is the tables `MERCHANT_ACTIONS` and `MEMBER_ACTIONS` below, checked by
 * moleculer-web's `authorize` hook and written into the API contract by `accessOf`.
 * Every error leaves as one JSON shape, `{name, message, code, type, data?}`, without stack traces
 * (`lib/gateway/http-errors.ts`); keys that reach a prototype are refused before moleculer-web merges
 * the params (`lib/gateway/hostile-keys.ts`).
 * Every POST under /api accepts an `Idempotency-Key`: `callAction` below wraps moleculer-web's own
 * (`lib/gateway/idempotent-call.ts`, which names the moleculer-web version it was checked against).
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import fs from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import path from "node:path";
import type { CallingOptions, Context, Service, ServiceSchema } from "moleculer";
import ApiGateway, { Errors as WebErrors, type ApiSettingsSchema } from "moleculer-web";
import type { ApiKey, Role } from "../config";
import { ConfiguredSettings } from "../config/settings";
import { clientError } from "../lib/errors";
import { forbidden, tokenHash } from "../lib/gateway/access";
import { refuseHostileKeys } from "../lib/gateway/hostile-keys";
import { sendHttpError } from "../lib/gateway/http-errors";
import { stockAliasHandler, type AliasHandler } from "../lib/gateway/wait-for-service";
import {
	idempotentCall,
	stockCallAction,
	type CallAction,
	type CallActionArgs
} from "../lib/gateway/idempotent-call";
import {
	aliasesOf,
	openApiDocument,
	publishedRoutes,
	type Access,
	type JsonSchema
} from "../lib/gateway/openapi";
import {
	loadOwnKey,
	looksLikeJwt,
	memberTokenVerifier,
	TokenRefused,
	type IdentityProvider,
	type OwnKey,
	type OwnKeySource,
	type Verifier
} from "../lib/member-tokens";
import { timeHttpRequest } from "../lib/ops/metrics";
import { isReady } from "../lib/ops/reporter";
import { untilServed } from "../lib/service-wait";
import { newTraceId } from "../lib/ops/tracing";
import Billing from "./billing.service";
import Dashboard from "./dashboard.service";
import Deals from "./deals.service";
import Deliveries from "./deliveries.service";
import Members from "./members.service";
import Merchants from "./merchants.service";
import MyPoints from "./my-points.service";
import Orders from "./orders.service";
import Payments from "./payments.service";
import Points from "./points.service";
import Webhooks from "./webhooks.service";
import Imports, { type StreamMeta } from "./imports.service";
import { IDEMPOTENCY_KEY } from "./idempotency.service";

/**
 * What a `merchant:<id>` token may call: either the parameter that must name its own merchant
 * (checked here), or `true` when the action checks ownership itself against the stored deal or row
 * (`lib/gateway/access.ts`) — or has none: a merchant may read any member's balance.
 * Staff may call everything; anything not listed is staff-only.
 */
const MERCHANT_ACTIONS: Record<string, string | true> = {
	"deals.create": "merchantId",
	"deals.list": "merchantId",
	"deals.get": true,
	"deals.cancel": true,
	"billing.view": true,
	"billing.settle": "merchantId",
	"billing.get": "merchantId",
	"billing.statement": "merchantId",
	"merchants.get": "merchantId",
	"points.get": true,
	"webhooks.create": "merchantId",
	"webhooks.list": "merchantId",
	"webhooks.get": true,
	"webhooks.delete": true,
	"webhooks.rotateSecret": true,
	"webhooks.deliveries": true,
	"webhooks.replay": true,
	"api.me": true
};

/**
 * What a `member:<id>` token may call, for its own member only: the parameter that must be its
 * memberId, or `true` when the action checks the stored row's member itself (`assertOwnMember`).
 */
const MEMBER_ACTIONS: Record<string, string | true> = {
	"api.me": true,
	"members.get": "memberId",
	"members.update": "memberId",
	"members.withdraw": "memberId",
	"members.data": "memberId",
	"points.get": "memberId",
	"points.history": "memberId",
	"points.historyCsv": "memberId",
	"points.transfer": "memberId",
	"points.transfers": "memberId",
	"my-points.get": "memberId",
	"deals.list": "memberId",
	"deals.get": true,
	"orders.create": "memberId",
	"orders.list": "memberId",
	"orders.get": true,
	"orders.cancel": true
};

/**
 * Actions whose merchant or member, left out by a merchant's or member's token, is its own: its
 * listings, a merchant's new webhook.
 */
const OWN_BY_DEFAULT = new Set(["deals.list", "orders.list", "webhooks.list", "webhooks.create"]);

const PUBLIC_ACTIONS = new Set(["api.health", "api.openapi", "api.jwks"]);

/** Who may call an action, in words, for the API contract; the same tables `authorize` applies. */
function accessOf(action: string): Access {
	if (PUBLIC_ACTIONS.has(action))
		return { public: true, who: "Anyone, without a token", roles: [] };
	const merchant = MERCHANT_ACTIONS[action];
	const member = MEMBER_ACTIONS[action];
	const who = ["Staff"];
	if (merchant === true)
		who.push(
			"a merchant (only its own merchant's deals and rows, where the resource has a merchant)"
		);
	else if (merchant) who.push(`a merchant for its own \`${merchant}\``);
	if (member === true) who.push("a member token (only its own member's rows)");
	else if (member) who.push(`a member token for its own \`${member}\``);
	return {
		public: false,
		who: who.length === 1 ? "Staff only" : `${who.slice(0, -1).join(", ")} or ${who.at(-1)}`,
		roles: [
			"staff",
			...(merchant === undefined ? [] : ["merchant" as const]),
			...(member === undefined ? [] : ["member" as const])
		]
	};
}

const sha256 = (text: string) => createHash("sha256").update(text).digest();

/**
 * `compute`, once per distinct input: the token hashes below run on every request for a handful of
 * tokens, and a hash costs more than the rest of a trivial request's own work. Bounded: a flood of
 * made-up tokens only empties it. (Authentication still compares every key in constant time.)
 */
function memoized<T>(compute: (input: string) => T): (input: string) => T {
	const cache = new Map<string, T>();
	return input => {
		let value = cache.get(input);
		if (value === undefined) {
			if (cache.size >= 10_000) cache.clear();
			value = compute(input);
			cache.set(input, value);
		}
		return value;
	};
}

const tokenDigest = memoized(sha256);
const hashedToken = memoized(tokenHash);

/** Whose keys these are: the SHA-256 of the (authenticated) bearer token, never the token. */
function scopeOf(req: IncomingMessage): string {
	return hashedToken(/^Bearer ([^\s]+)$/.exec(req.headers.authorization ?? "")?.[1] ?? "");
}

/** The rate limiter counts per token (hashed: it keeps its keys in memory), or per address without one. */
function rateLimitKey(req: IncomingMessage): string {
	const header = req.headers.authorization;
	if (header) return `token:${hashedToken(header)}`;
	return `ip:${req.socket.remoteAddress ?? "unknown"}`;
}

interface Methods {
	callAction(...args: CallActionArgs): Promise<unknown>;
	aliasHandler(...args: Parameters<AliasHandler>): Promise<unknown>;
	authenticate(
		ctx: Context,
		route: unknown,
		req: IncomingMessage & { $action?: { name: string } }
	): Promise<Role | null>;
	merchantOfKey(ctx: Context, tokenHash: string): Promise<string | null>;
	memberOfToken(ctx: Context, token: string): Promise<Role>;
	memberStatus(ctx: Context, memberId: string): Promise<string | null>;
	countMemberRequest(memberId: string): void;
	now(): Date;
	authorize(
		ctx: Context<unknown, { user?: Role | null }>,
		route: unknown,
		req: IncomingMessage & { $action?: { name: string }; $params: Record<string, unknown> }
	): void;
}

interface Settings extends ApiSettingsSchema {
	/** Gateway tokens and their roles (API_KEYS; secure: never shared with other nodes). */
	apiKeys: ApiKey[];
	/** No demo token is made up in production: API_KEYS must be set. */
	production: boolean;
	/** What a 503 asks the client to wait (s). */
	retryAfterSeconds: number;
	/** How long a call to another service may take (ms). */
	callTimeoutMs: number;
	/** How long a request waits for a service no node serves right now (ms, SERVICE_WAIT_MS). */
	serviceWaitMs: number;
	/**
	 * How long the gateway keeps what a merchant key's token is (ms): a revoked key is refused on
	 * every gateway within this, should the revocation's broadcast not reach one.
	 */
	keyCacheMs: number;
	/** OnePoint's own session key (MEMBER_TOKEN_KEY, secure) or where to keep a generated one. */
	ownKey: OwnKeySource;
	/** The operator's identity provider, if any. */
	identityProvider?: IdentityProvider;
	/** The `aud` every member token must carry. */
	memberAudience: string;
	/** Requests a minute per member token's member. */
	memberRateLimit: number;
}

type This = Service<Settings> &
	Methods & {
		keys: { digest: Buffer; role: Role }[];
		/** Merchant keys issued through the API, by their token's hash: whose, and until when it is known. */
		issuedKeys: Map<string, { merchantId: Promise<string | null>; until: number }>;
		/** OnePoint's own key and the member tokens' verifier, from creation (the server may listen before `started`). */
		memberKeys: Promise<{ own: OwnKey; verifier: Verifier }>;
		/** A member's status (null: no such member), by memberId, and until when it is known. */
		memberStatuses: Map<string, { status: Promise<string | null>; until: number }>;
		/** Each member token's member's requests in its current minute. */
		memberRequests: Map<string, { count: number; resetAt: number }>;
		streams: Set<ServerResponse>;
		heartbeat?: NodeJS.Timeout;
		/** moleculer-web's own `callAction`, checked at creation. */
		gatewayCallAction: CallAction;
		/** moleculer-web's own `aliasHandler`, checked at creation. */
		gatewayAliasHandler: AliasHandler;
	};

/** The dashboard's and the API reference's static pages, and the libraries they use, served from the
 * package (no CDN). The root is one level up from this file in the sources and two in `dist/`. */
const ROOT = path.resolve(
	__dirname,
	fs.existsSync(path.resolve(__dirname, "../package.json")) ? ".." : "../.."
);
const PUBLIC_DIR = path.join(ROOT, "public");
const SWAGGER_UI_DIR = path.dirname(require.resolve("swagger-ui-dist"));
/** `/vendor/<file>`: the only files served from dependencies. */
const VENDOR_FILES: Record<string, { file: string; type: string }> = {
	// chart.js exports only its module entry points: find the browser bundle beside the main one.
	"chart.umd.min.js": {
		file: path.join(path.dirname(require.resolve("chart.js")), "chart.umd.min.js"),
		type: "text/javascript"
	},
	"swagger-ui-bundle.js": {
		file: path.join(SWAGGER_UI_DIR, "swagger-ui-bundle.js"),
		type: "text/javascript"
	},
	"swagger-ui.css": { file: path.join(SWAGGER_UI_DIR, "swagger-ui.css"), type: "text/css" }
};

/** The gateway's own actions. */
const OWN_ACTIONS = {
	/** 200 once the node is ready (see `isReady`), 503 before and while it stops. */
	health: {
		rest: "GET /health",
		summary: "Whether this gateway node is ready, and the services it runs",
		params: { $$strict: true },
		handler(this: This, ctx: Context<object, { $statusCode?: number }>) {
			const ready = isReady(ctx.broker);
			if (!ready) ctx.meta.$statusCode = 503;
			return {
				status: ready ? "ok" : "starting",
				nodeID: ctx.broker.nodeID,
				services: ctx.broker.services.map(s => s.fullName).sort(),
				uptime: Math.round(process.uptime())
			};
		}
	},

	/** Who the token belongs to: `{role: "staff"}`, `{role: "staff", name}`, `{role: "merchant", merchantId}` or `{role: "member", memberId}`. */
	me: {
		rest: "GET /me",
		summary:
			"Who the token belongs to: its role, and a merchant's merchantId or a member's memberId",
		params: { $$strict: true },
		handler(ctx: Context<object, { user?: Role | null }>) {
			const user = ctx.meta.user as Role;
			if (user.kind === "merchant") return { role: "merchant", merchantId: user.merchantId };
			if (user.kind === "member") return { role: "member", memberId: user.memberId };
			return user.name ? { role: "staff", name: user.name } : { role: "staff" };
		}
	},

	/** OnePoint's public keys for the member sessions it signs. */
	jwks: {
		rest: "GET /.well-known/jwks.json",
		summary: "The public keys of the member sessions OnePoint signs (a JWK Set)",
		params: { $$strict: true },
		async handler(this: This) {
			return { keys: [(await this.memberKeys).own.jwk] };
		}
	},

	openapi: {
		rest: "GET /openapi.json",
		summary: "This API's contract (OpenAPI 3.1); read it at /docs",
		params: { $$strict: true },
		handler: () => CONTRACT
	}
};

/** Every public route, from the published services' actions; the alias table and the contract are built from it. */
const ROUTES = publishedRoutes([
	Members,
	Merchants,
	Points,
	Deals,
	Billing,
	Orders,
	Payments,
	Deliveries,
	MyPoints,
	Dashboard,
	Webhooks,
	Imports,
	{ name: "api", actions: OWN_ACTIONS }
]);

/** The media type each route with a streamed body reads, by action (`imports.start`: text/csv). */
const STREAMED = new Map(ROUTES.flatMap(r => (r.requestType ? [[r.action, r.requestType]] : [])));

const DASHBOARD_STREAM: Record<string, JsonSchema> = {
	get: {
		operationId: "dashboard.stream",
		tags: ["dashboard"],
		summary:
			"Server-sent events: an `update` (`{memberIds}`, the members whose rows changed) at most every 100 ms while the dashboard's read model changes",
		description: `${accessOf("").who}. Served by the gateway itself.`,
		responses: {
			"200": {
				description: "An event stream, kept open; a comment line every 15 s",
				content: { "text/event-stream": { schema: { type: "string" } } }
			},
			"401": { $ref: "#/components/responses/Unauthorized" },
			"403": { $ref: "#/components/responses/Forbidden" }
		}
	}
};

const CONTRACT = openApiDocument(ROUTES, {
	title: "OnePoint",
	version: (
		JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8")) as { version: string }
	).version,
	description:
		"Membership points: members, their points, deals at merchants, month-end billing, food orders and the staff dashboard. Every request but the health check and this document needs `Authorization: Bearer <token>`.",
	basePath: "/api",
	access: accessOf,
	postParameters: [
		{
			name: "Idempotency-Key",
			in: "header",
			required: false,
			description:
				"Makes a retry safe: the same key with the same request, by the same token, within 24 h answers what the first request answered (with `Idempotent-Replayed: true`) and changes nothing; a different request is 422 IDEMPOTENCY_KEY_REUSED, one while the first still runs 409 REQUEST_IN_PROGRESS.",
			schema: { type: "string", pattern: IDEMPOTENCY_KEY.source, minLength: 1, maxLength: 255 }
		}
	],
	extraPaths: { "/api/dashboard/stream": DASHBOARD_STREAM }
});

/** moleculer-web without the address it defaults to (PORT, IP) and its request lines: the node's configuration gives them. */
const {
	port: _port,
	ip: _ip,
	logRequest: _logRequest,
	logResponse: _logResponse,
	...gatewayDefaults
} = ApiGateway.settings as ApiSettingsSchema;

/**
 * A line per request and per answer at LOG_LEVEL=debug (or trace) only: moleculer-web formats them,
 * with colours, even when their level is off, about 2 µs of a trivial request.
 */
const requestLines = (logLevel: string) => (["debug", "trace"].includes(logLevel) ? "debug" : null);

const ApiService: ServiceSchema<ApiSettingsSchema, Methods, object, This> = {
	name: "api",
	mixins: [
		{ ...ApiGateway, settings: gatewayDefaults },
		ConfiguredSettings<Settings>(config => ({
			port: config.port,
			ip: config.host,
			logRequest: requestLines(config.logLevel),
			logResponse: requestLines(config.logLevel),
			// Every route's limit: requests a minute per token, or per address without one.
			rateLimit: { window: 60_000, limit: config.rateLimit, headers: true, key: rateLimitKey },
			retryAfterSeconds: config.retryAfterSeconds,
			callTimeoutMs: config.callTimeoutMs,
			serviceWaitMs: config.serviceWaitMs,
			keyCacheMs: 2_000,
			apiKeys: config.apiKeys,
			production: config.nodeEnv === "production",
			ownKey: {
				memberTokenKey: config.memberTokenKey,
				dataDir: config.dataDir,
				production: config.nodeEnv === "production"
			},
			...(config.memberJwksUrl && config.memberJwtIssuer
				? {
						identityProvider: {
							jwksUrl: config.memberJwksUrl,
							issuer: config.memberJwtIssuer,
							claim: config.memberIdClaim
						}
					}
				: {}),
			memberAudience: config.memberJwtAudience,
			memberRateLimit: config.memberRateLimit,
			$secureSettings: ["apiKeys", "ownKey"]
		}))
	],

	settings: {
		assets: { folder: PUBLIC_DIR, options: { index: "index.html" } },
		// Per-request info logging halves the gateway's throughput (see `requestLines`); errors are still logged.
		// A request's params hold members' names and contacts: never logged, at any level.
		logRequestParams: null,
		log4XXResponses: false,
		routes: [
			{
				path: "/api",
				mappingPolicy: "restrict",
				autoAliases: false,
				authentication: true,
				authorization: true,
				bodyParsers: { json: { strict: true, limit: "1mb" }, urlencoded: false },
				use: [refuseHostileKeys],
				aliases: {
					...aliasesOf(ROUTES),
					/** Server-sent events: one `update` per change of the dashboard's read model. */
					"GET /dashboard/stream"(this: This, req: IncomingMessage, res: ServerResponse) {
						res.writeHead(200, {
							"Content-Type": "text/event-stream",
							"Cache-Control": "no-cache",
							Connection: "keep-alive"
						});
						res.write(": connected\n\n");
						this.streams.add(res);
						req.on("close", () => this.streams.delete(res));
					}
				}
			},
			{
				path: "/vendor",
				aliases: {
					"GET /:file"(req: IncomingMessage & { $params: { file?: string } }, res: ServerResponse) {
						const vendored = VENDOR_FILES[req.$params.file ?? ""];
						if (!vendored) {
							res.writeHead(404, { "Content-Type": "text/plain; charset=utf-8" }).end("Not found");
							return;
						}
						res.writeHead(200, {
							"Content-Type": `${vendored.type}; charset=utf-8`,
							"Cache-Control": "public, max-age=86400"
						});
						fs.createReadStream(vendored.file).pipe(res);
					}
				}
			}
		],

		/**
		 * Every request is one trace, named by an id of ours (a client's `X-Request-Id` is not trusted
		 * to name it), answered in `X-Trace-Id` whether tracing is on or not: a log line and a trace
		 * both carry it. Its time and status are counted under the route's template. (moleculer-web
		 * takes a function here; its typings name only the options object.)
		 */
		rootCallOptions: function (
			this: This,
			options: { requestID?: string },
			req: IncomingMessage,
			res: ServerResponse
		) {
			options.requestID = newTraceId();
			res.setHeader("X-Trace-Id", options.requestID);
			if (this.broker.isMetricsEnabled()) timeHttpRequest(this.broker, req, res);
		} as unknown as CallingOptions,

		onError(this: This, req: IncomingMessage, res: ServerResponse, err: unknown) {
			sendHttpError(this.logger, req, res, err, this.settings.retryAfterSeconds);
		}
	},

	methods: {
		/** moleculer-web's handling of a route's alias, once a node serves its action (a redeploy's gap). */
		async aliasHandler(this: This, req, res, alias) {
			await untilServed(this.broker, alias.action, this.settings.serviceWaitMs);
			return this.gatewayAliasHandler.call(this, req, res, alias);
		},

		/**
		 * moleculer-web's call of the action behind an alias, made safe to retry with an
		 * `Idempotency-Key`. A streamed body (a `stream:` alias) must be of its route's media type,
		 * and its declared size goes to the action, which refuses a body over its limit before
		 * reading it.
		 */
		callAction(this: This, ...args: CallActionArgs) {
			const [, actionName, req, , , isStream] = args;
			if (isStream) {
				const expected = STREAMED.get(actionName);
				const type = (req.headers["content-type"] ?? "").split(";")[0].trim().toLowerCase();
				if (type !== expected)
					throw clientError(
						415,
						"UNSUPPORTED_MEDIA_TYPE",
						`Send the body as ${expected} (Content-Type), not '${type}'`,
						{ expected, contentType: type }
					);
				const length = Number(req.headers["content-length"]);
				if (Number.isFinite(length)) (req.$ctx.meta as StreamMeta).contentLength = length;
			}
			return idempotentCall(this, this.gatewayCallAction, scopeOf, ...args);
		},

		/**
		 * Resolves the bearer token into a role: one of API_KEYS (compared against every one in
		 * constant time), else a merchant key issued through the API (looked up by the token's hash).
		 */
		async authenticate(
			this: This,
			ctx: Context,
			_route: unknown,
			req: IncomingMessage & { $action?: { name: string } }
		): Promise<Role | null> {
			if (req.$action && PUBLIC_ACTIONS.has(req.$action.name)) return null;
			const header = req.headers.authorization ?? "";
			const token = /^Bearer ([^\s]+)$/.exec(header)?.[1];
			if (!token) throw new WebErrors.UnAuthorizedError(WebErrors.ERR_NO_TOKEN, null);
			const digest = tokenDigest(token);
			let role: Role | null = null;
			for (const key of this.keys) if (timingSafeEqual(key.digest, digest)) role = key.role;
			if (role) return role;
			if (looksLikeJwt(token)) return this.memberOfToken(ctx, token);
			const merchantId = await this.merchantOfKey(ctx, hashedToken(token));
			if (!merchantId) throw new WebErrors.UnAuthorizedError(WebErrors.ERR_INVALID_TOKEN, null);
			return { kind: "merchant", merchantId };
		},

		/** The merchant an issued key acts as (null: no such key, or revoked), asked of merchants once per `keyCacheMs`. */
		merchantOfKey(this: This, ctx: Context, tokenHash: string): Promise<string | null> {
			// Monotonic: a key's time in the cache does not follow the wall clock's jumps.
			const now = performance.now();
			const known = this.issuedKeys.get(tokenHash);
			if (known && known.until > now) return known.merchantId;
			// Bounded: a flood of made-up tokens only empties it.
			if (this.issuedKeys.size >= 10_000) this.issuedKeys.clear();
			const merchantId = ctx
				.call<{ merchantId: string } | null, { tokenHash: string }>(
					"merchants.authenticate",
					{ tokenHash },
					{ timeout: this.settings.callTimeoutMs }
				)
				.then(key => key?.merchantId ?? null);
			// Requests with the same token meanwhile wait for this one answer; a failure is not kept.
			this.issuedKeys.set(tokenHash, { merchantId, until: now + this.settings.keyCacheMs });
			merchantId.catch(() => this.issuedKeys.delete(tokenHash));
			return merchantId;
		},

		/** The member a JWT acts as, verified, of a member who exists and has not withdrawn. */
		async memberOfToken(this: This, ctx: Context, token: string): Promise<Role> {
			let memberId: string;
			try {
				memberId = await (await this.memberKeys).verifier.verify(token, this.now());
			} catch (err) {
				if (!(err instanceof TokenRefused)) throw err;
				// The reason and key id help the operator; the token itself is never logged.
				this.logger.info(`Member token refused: ${err.reason}`, {
					kid: err.kid?.slice(0, 100) ?? null
				});
				throw new WebErrors.UnAuthorizedError(WebErrors.ERR_INVALID_TOKEN, null);
			}
			const status = await this.memberStatus(ctx, memberId);
			if (status === null) {
				this.logger.info("Member token refused: no such member");
				throw new WebErrors.UnAuthorizedError(WebErrors.ERR_INVALID_TOKEN, null);
			}
			if (status !== "active")
				throw clientError(
					403,
					"MEMBER_WITHDRAWN",
					"This member has withdrawn: its tokens are refused"
				);
			this.countMemberRequest(memberId);
			return { kind: "member", memberId };
		},

		/** A member's status, asked of members once per `keyCacheMs` (withdrawal also ends it at once). */
		memberStatus(this: This, ctx: Context, memberId: string): Promise<string | null> {
			const now = performance.now();
			const known = this.memberStatuses.get(memberId);
			if (known && known.until > now) return known.status;
			if (this.memberStatuses.size >= 10_000) this.memberStatuses.clear();
			const status = ctx
				.call<{ status: string } | null, { memberId: string }>(
					"members.access",
					{ memberId },
					{ timeout: this.settings.callTimeoutMs }
				)
				.then(member => member?.status ?? null);
			this.memberStatuses.set(memberId, { status, until: now + this.settings.keyCacheMs });
			status.catch(() => this.memberStatuses.delete(memberId));
			return status;
		},

		/** MEMBER_RATE_LIMIT requests a minute per member, whichever token or gateway route it uses. */
		countMemberRequest(this: This, memberId: string) {
			const now = performance.now();
			let window = this.memberRequests.get(memberId);
			if (!window || window.resetAt <= now) {
				// Bounded: only windows still running are kept when it grows large.
				if (this.memberRequests.size >= 10_000)
					for (const [id, w] of this.memberRequests)
						if (w.resetAt <= now) this.memberRequests.delete(id);
				window = { count: 0, resetAt: now + 60_000 };
				this.memberRequests.set(memberId, window);
			}
			window.count++;
			if (window.count > this.settings.memberRateLimit)
				throw clientError(429, "RATE_LIMIT_EXCEEDED", "Too many requests; try again later", {
					retryAfter: Math.max(1, Math.ceil((window.resetAt - now) / 1000))
				});
		},

		now: () => new Date(),

		authorize(
			this: This,
			ctx: Context<unknown, { user?: Role | null }>,
			_route: unknown,
			req: IncomingMessage & { $action?: { name: string }; $params: Record<string, unknown> }
		) {
			const action = req.$action?.name ?? "";
			const user = ctx.meta.user;
			if (PUBLIC_ACTIONS.has(action) || user?.kind === "staff") return;
			if (!user) throw forbidden();
			const [rule, ownId, whose] =
				user.kind === "merchant"
					? [MERCHANT_ACTIONS[action], user.merchantId, "merchant"]
					: [MEMBER_ACTIONS[action], user.memberId, "member"];
			if (rule === undefined) throw forbidden();
			if (rule === true) return;
			// A listing (or a merchant's webhook) is always the token's own: the filter is filled in, or must match.
			if (OWN_BY_DEFAULT.has(action) && req.$params[rule] === undefined) req.$params[rule] = ownId;
			if (req.$params[rule] !== ownId)
				throw forbidden(`A ${whose} token reaches only its own ${whose}'s data`);
		}
	},

	created(this: This) {
		// The patches above replace moleculer-web's `callAction` and `aliasHandler`: refuse to start if an
		// upgrade moved them.
		this.gatewayCallAction = stockCallAction(ApiGateway);
		this.gatewayAliasHandler = stockAliasHandler(ApiGateway);
		let keys: ApiKey[] = this.settings.apiKeys;
		if (keys.length === 0) {
			if (this.settings.production)
				throw new Error(
					"API_KEYS must be set in production, e.g. API_KEYS='<token>=staff,<token>=merchant:20'"
				);
			keys = [{ token: randomBytes(24).toString("base64url"), role: { kind: "staff" } }];
			// Printed once so that `npm start` stays a one-command demo; never logged otherwise.
			this.logger.warn(`API_KEYS is not set: this run's staff token is ${keys[0].token}`);
		}
		this.keys = keys.map(key => ({ digest: sha256(key.token), role: key.role }));
		this.issuedKeys = new Map();
		this.memberStatuses = new Map();
		this.memberRequests = new Map();
		this.memberKeys = loadOwnKey(this.settings.ownKey).then(own => ({
			own,
			verifier: memberTokenVerifier(
				own,
				this.settings.memberAudience,
				this.settings.identityProvider,
				this.settings.callTimeoutMs
			)
		}));
		// Reported by `started`, which refuses to start without a key.
		this.memberKeys.catch(() => undefined);
		this.streams = new Set();
	},

	async started(this: This) {
		await this.memberKeys;
		// A comment line now and then keeps idle proxies from closing the dashboard's stream.
		this.heartbeat = setInterval(
			() => this.streams.forEach(res => res.write(": ping\n\n")),
			15_000
		);
	},

	stopped(this: This) {
		clearInterval(this.heartbeat);
		for (const res of this.streams) res.end();
		this.streams.clear();
	},

	events: {
		/** A key revoked: refused here from now on, not only once the cache forgets it. */
		"merchant.keyRevoked"(this: This, ctx: Context<{ tokenHash: string }>) {
			this.issuedKeys.delete(ctx.params.tokenHash);
		},

		/** A member withdrawn or erased: its tokens are refused here from now on (403 MEMBER_WITHDRAWN). */
		"member.accessEnded"(this: This, ctx: Context<{ memberId: string }>) {
			this.memberStatuses.set(ctx.params.memberId, {
				status: Promise.resolve("withdrawn"),
				until: performance.now() + this.settings.keyCacheMs
			});
		},

		"dashboard.updated"(this: This, ctx: Context<{ memberIds: string[] }>) {
			const message = `event: update\ndata: ${JSON.stringify(ctx.params)}\n\n`;
			for (const res of this.streams) res.write(message);
		}
	},

	actions: OWN_ACTIONS
};

export default ApiService;
