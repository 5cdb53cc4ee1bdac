/**
 * The HTTP gateway (moleculer-web). Only the aliases below are reachable from outside
 * (`mappingPolicy: "restrict"`); internal actions such as `points.debit` have none.
 * Every request but `GET /api/health` needs `Authorization: Bearer <token>` (API_KEYS); what a role
 * may do is the table `MERCHANT_ACTIONS` below, checked by moleculer-web's `authorize` hook.
 * Every error leaves as one JSON shape, `{name, message, code, type, data?}`, without stack traces.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import fs from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import path from "node:path";
import { Errors, type Context, type Service, type ServiceSchema } from "moleculer";
import ApiGateway, { Errors as WebErrors, type ApiSettingsSchema } from "moleculer-web";
import type { ApiKey, Role } from "../config";
import { ConfiguredSettings } from "../config/settings";
import { forbidden } from "../lib/access";
import { isReady } from "../lib/ops-reporter";

interface HttpError {
	name: string;
	message: string;
	code: number;
	type: string;
	data?: unknown;
}

/** Types of errors that mean "a service behind the gateway cannot answer now". */
const UNAVAILABLE = new Set(["SERVICE_NOT_FOUND", "SERVICE_NOT_AVAILABLE", "REQUEST_TIMEOUT", "CIRCUIT_BREAKER_OPEN"]);

/** Turns whatever was thrown into the one public error shape. */
export function toHttpError(err: unknown, retryAfter: number): HttpError {
	const e = err as { name?: string; message?: string; code?: unknown; status?: number; type?: string; data?: unknown };
	if (e?.type === "entity.parse.failed") return { name: "BadRequestError", message: "Malformed JSON body", code: 400, type: "INVALID_JSON" };
	if (e?.type === "entity.too.large") return { name: "PayloadTooLarge", message: "Request body too large", code: 413, type: "PAYLOAD_TOO_LARGE" };
	if (e?.type && UNAVAILABLE.has(e.type))
		return { name: "ServiceUnavailableError", message: "Service temporarily unavailable; try again later", code: 503, type: "SERVICE_UNAVAILABLE", data: { retryAfter } };
	const code = typeof e?.code === "number" && e.code >= 400 && e.code <= 599 ? e.code : e?.status && e.status >= 400 ? e.status : 500;
	if (code === 503)
		return { name: "ServiceUnavailableError", message: e?.message ?? "Service unavailable", code, type: e?.type ?? "SERVICE_UNAVAILABLE", data: { retryAfter, ...(e?.data as object) } };
	if (code >= 500) return { name: "InternalError", message: "Internal server error", code, type: "INTERNAL_ERROR" };
	if (code === 429) return { name: "RateLimitExceeded", message: "Too many requests; try again later", code, type: "RATE_LIMIT_EXCEEDED" };
	return {
		name: e?.name ?? "Error",
		message: e?.message ?? "Error",
		code,
		type: e?.type ?? "ERROR",
		...(e?.data !== undefined ? { data: e.data } : {})
	};
}

/**
 * What a `merchant:<id>` token may call: either the parameter that must name its own merchant
 * (checked here), or `true` when the action checks ownership itself against the stored deal or row
 * (`lib/access.ts`) — or has none: a merchant may read any member's balance.
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
	"points.get": true,
	"api.me": true
};

const PUBLIC_ACTIONS = new Set(["api.health"]);

/**
 * Keys that reach an object's prototype. moleculer-web merges body and query into the params with
 * `Object.assign`, which turns a `__proto__` key into the params' prototype: strict validation never
 * sees it, and optional fields could be read through it.
 */
const HOSTILE_KEYS = new Set(["__proto__", "constructor", "prototype"]);

/** The path of the first hostile key in a parsed JSON body, at any depth (iteratively: no stack to exhaust). */
export function hostileKeyIn(value: unknown, root = "body"): string | undefined {
	const stack: [unknown, string][] = [[value, root]];
	while (stack.length) {
		const [node, at] = stack.pop() as [unknown, string];
		if (node === null || typeof node !== "object") continue;
		for (const key of Object.keys(node)) {
			if (HOSTILE_KEYS.has(key)) return `${at}.${key}`;
			stack.push([(node as Record<string, unknown>)[key], `${at}.${key}`]);
		}
	}
	return undefined;
}

/** The first hostile key in a raw query string (`a[__proto__][b]=1`, `constructor=x`), before qs drops or merges it. */
export function hostileKeyInQuery(url: string): string | undefined {
	const query = url.split("?", 2)[1];
	if (!query) return undefined;
	for (const pair of query.split("&")) {
		let name = pair.split("=", 1)[0].replace(/\+/g, " ");
		try {
			name = decodeURIComponent(name);
		} catch {
			// Undecodable: qs keeps it as it is, and so do we.
		}
		if (name.split(/[[\].]/).some(segment => HOSTILE_KEYS.has(segment))) return `query.${name}`;
	}
	return undefined;
}

/** Route middleware, after the body parser and before moleculer-web merges the params. */
function refuseHostileKeys(req: IncomingMessage & { body?: unknown }, _res: ServerResponse, next: (err?: Error) => void): void {
	const key = hostileKeyIn(req.body) ?? hostileKeyInQuery(req.url ?? "");
	if (!key) return next();
	next(
		new Errors.ValidationError(`The key '${key}' is not allowed`, "VALIDATION_ERROR", [
			{ type: "forbiddenKey", field: key, message: `The key '${key}' is not allowed.` }
		])
	);
}

const sha256 = (text: string) => createHash("sha256").update(text).digest();

/** The rate limiter counts per token (hashed: it keeps its keys in memory), or per address without one. */
function rateLimitKey(req: IncomingMessage): string {
	const header = req.headers.authorization;
	if (header) return `token:${sha256(header).toString("base64url")}`;
	return `ip:${req.socket.remoteAddress ?? "unknown"}`;
}

interface Methods {
	authenticate(ctx: Context, route: unknown, req: IncomingMessage & { $action?: { name: string } }): Role | null;
	authorize(ctx: Context<unknown, { user?: Role | null }>, route: unknown, req: IncomingMessage & { $action?: { name: string }; $params: Record<string, unknown> }): void;
}

interface Settings extends ApiSettingsSchema {
	/** Gateway tokens and their roles (API_KEYS; secure: never shared with other nodes). */
	apiKeys: ApiKey[];
	/** No demo token is made up in production: API_KEYS must be set. */
	production: boolean;
	/** What a 503 asks the client to wait (s). */
	retryAfterSeconds: number;
}

type This = Service<Settings> & Methods & { keys: { digest: Buffer; role: Role }[]; streams: Set<ServerResponse>; heartbeat?: NodeJS.Timeout };

/** The dashboard's static page, and the chart library it uses, served from the package (no CDN).
 * The root is one level up from this file in the sources and two in `dist/`. */
const ROOT = path.resolve(__dirname, fs.existsSync(path.resolve(__dirname, "../package.json")) ? ".." : "../..");
const PUBLIC_DIR = path.join(ROOT, "public");
// chart.js exports only its module entry points: find the browser bundle beside the main one.
const CHART_JS = path.join(path.dirname(require.resolve("chart.js")), "chart.umd.min.js");

/** moleculer-web without the address it defaults to (PORT, IP): the node's configuration gives it. */
const { port: _port, ip: _ip, ...gatewayDefaults } = ApiGateway.settings as ApiSettingsSchema;

const ApiService: ServiceSchema<ApiSettingsSchema, Methods, object, This> = {
	name: "api",
	mixins: [
		{ ...ApiGateway, settings: gatewayDefaults },
		ConfiguredSettings<Settings>(config => ({
			port: config.port,
			ip: config.host,
			// Every route's limit: requests a minute per token, or per address without one.
			rateLimit: { window: 60_000, limit: config.rateLimit, headers: true, key: rateLimitKey },
			retryAfterSeconds: config.retryAfterSeconds,
			apiKeys: config.apiKeys,
			production: config.nodeEnv === "production",
			$secureSettings: ["apiKeys"]
		}))
	],

	settings: {
		assets: { folder: PUBLIC_DIR, options: { index: "index.html" } },
		// Per-request info logging halves the gateway's throughput; errors are still logged.
		logRequest: "debug",
		logResponse: "debug",
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
					"GET /health": "api.health",
					"GET /me": "api.me",
					"POST /members": "members.join",
					"GET /members/:memberId": "members.get",
					"DELETE /members/:memberId": "members.withdraw",
					"GET /points/:memberId": "points.get",
					"GET /points/:memberId/history": "points.history",
					"POST /points/:memberId/adjustments": "points.adjust",
					"POST /deals": "deals.create",
					"GET /deals": "deals.list",
					"GET /deals/:id": "deals.get",
					"POST /deals/:id/cancel": "deals.cancel",
					"GET /billing-amount-views/:dealId": "billing.view",
					"POST /billings": "billing.settle",
					"GET /billings/:merchantId/:billingMonth": "billing.get",
					"POST /orders": "orders.create",
					"GET /orders": "orders.list",
					"GET /orders/:id": "orders.get",
					"POST /orders/:id/cancel": "orders.cancel",
					"GET /payments": "payments.list",
					"GET /payments/:id": "payments.get",
					"GET /deliveries/:orderId": "deliveries.get",
					"GET /my-points/:memberId": "my-points.get",
					"GET /dashboard/overview": "dashboard.overview",
					"GET /dashboard/members/:memberId": "dashboard.member",
					"GET /dashboard/members/:memberId/transactions": "dashboard.transactions",
					/** Server-sent events: one `update` per change of the dashboard's read model. */
					"GET /dashboard/stream"(this: This, req: IncomingMessage, res: ServerResponse) {
						res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache", Connection: "keep-alive" });
						res.write(": connected\n\n");
						this.streams.add(res);
						req.on("close", () => this.streams.delete(res));
					}
				}
			},
			{
				path: "/vendor",
				aliases: {
					"GET /chart.umd.min.js"(_req: IncomingMessage, res: ServerResponse) {
						res.writeHead(200, { "Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "public, max-age=86400" });
						fs.createReadStream(CHART_JS).pipe(res);
					}
				}
			}
		],

		onError(this: This, req: IncomingMessage, res: ServerResponse, err: unknown) {
			const error = toHttpError(err, this.settings.retryAfterSeconds);
			if (error.code >= 500 && error.code !== 503) this.logger.error("Request failed:", req.method, req.url, err);
			if (error.code === 429) {
				// The limiter's window resets at X-Rate-Limit-Reset (ms since epoch).
				const reset = Number(res.getHeader("X-Rate-Limit-Reset")) || Date.now() + 60_000;
				res.setHeader("Retry-After", String(Math.max(1, Math.ceil((reset - Date.now()) / 1000))));
			}
			const retryAfter = (error.data as { retryAfter?: number } | undefined)?.retryAfter;
			if (retryAfter && error.code === 503) res.setHeader("Retry-After", String(retryAfter));
			res.setHeader("Content-Type", "application/json; charset=utf-8");
			res.writeHead(error.code);
			res.end(JSON.stringify(error));
		}
	},

	methods: {
		/** Resolves the bearer token into a role; compares against every key in constant time. */
		authenticate(this: This, _ctx: Context, _route: unknown, req: IncomingMessage & { $action?: { name: string } }): Role | null {
			if (req.$action && PUBLIC_ACTIONS.has(req.$action.name)) return null;
			const header = req.headers.authorization ?? "";
			const token = /^Bearer ([^\s]+)$/.exec(header)?.[1];
			if (!token) throw new WebErrors.UnAuthorizedError(WebErrors.ERR_NO_TOKEN, null);
			const digest = sha256(token);
			let role: Role | null = null;
			for (const key of this.keys) if (timingSafeEqual(key.digest, digest)) role = key.role;
			if (!role) throw new WebErrors.UnAuthorizedError(WebErrors.ERR_INVALID_TOKEN, null);
			return role;
		},

		authorize(this: This, ctx: Context<unknown, { user?: Role | null }>, _route: unknown, req: IncomingMessage & { $action?: { name: string }; $params: Record<string, unknown> }) {
			const action = req.$action?.name ?? "";
			const user = ctx.meta.user;
			if (PUBLIC_ACTIONS.has(action) || user?.kind === "staff") return;
			const rule = user?.kind === "merchant" ? MERCHANT_ACTIONS[action] : undefined;
			if (!user || user.kind !== "merchant" || rule === undefined) throw forbidden();
			if (rule === true) return;
			// A merchant's listing is always its own: the filter is filled in, or must match.
			if (action === "deals.list" && req.$params.merchantId === undefined) req.$params.merchantId = user.merchantId;
			if (req.$params[rule] !== user.merchantId) throw forbidden("A merchant token reaches only its own merchant's data");
		},
	},

	created(this: This) {
		let keys: ApiKey[] = this.settings.apiKeys;
		if (keys.length === 0) {
			if (this.settings.production) throw new Error("API_KEYS must be set in production, e.g. API_KEYS='<token>=staff,<token>=merchant:20'");
			keys = [{ token: randomBytes(24).toString("base64url"), role: { kind: "staff" } }];
			// Printed once so that `npm start` stays a one-command demo; never logged otherwise.
			this.logger.warn(`API_KEYS is not set: this run's staff token is ${keys[0].token}`);
		}
		this.keys = keys.map(key => ({ digest: sha256(key.token), role: key.role }));
		this.streams = new Set();
	},

	started(this: This) {
		// A comment line now and then keeps idle proxies from closing the dashboard's stream.
		this.heartbeat = setInterval(() => this.streams.forEach(res => res.write(": ping\n\n")), 15_000);
	},

	stopped(this: This) {
		clearInterval(this.heartbeat);
		for (const res of this.streams) res.end();
		this.streams.clear();
	},

	events: {
		"dashboard.updated"(this: This, ctx: Context<{ memberId: string; what: string }>) {
			const message = `event: update\ndata: ${JSON.stringify(ctx.params)}\n\n`;
			for (const res of this.streams) res.write(message);
		}
	},

	actions: {
		/** 200 once the node is ready (see `isReady`), 503 before and while it stops. */
		health: {
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

		/** Who the token belongs to: `{role: "staff"}`, `{role: "staff", name}` or `{role: "merchant", merchantId}`. */
		me: {
			params: { $$strict: true },
			handler(ctx: Context<object, { user?: Role | null }>) {
				const user = ctx.meta.user as Role;
				if (user.kind === "merchant") return { role: "merchant", merchantId: user.merchantId };
				return user.name ? { role: "staff", name: user.name } : { role: "staff" };
			}
		}
	}
};

export default ApiService;
