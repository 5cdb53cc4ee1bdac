/**
 * The HTTP gateway (moleculer-web). Only the aliases below are reachable from outside
 * (`mappingPolicy: "restrict"`); internal actions such as `points.debit` have none.
 * Every error leaves as one JSON shape, `{name, message, code, type, data?}`, without stack traces.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Context, Service, ServiceSchema } from "moleculer";
import ApiGateway, { type ApiSettingsSchema } from "moleculer-web";
import { config } from "../config";

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
	return {
		name: e?.name ?? "Error",
		message: e?.message ?? "Error",
		code,
		type: e?.type ?? "ERROR",
		...(e?.data !== undefined ? { data: e.data } : {})
	};
}

const ApiService: ServiceSchema<ApiSettingsSchema> = {
	name: "api",
	mixins: [ApiGateway],

	settings: {
		port: config.port,
		ip: config.host,
		// Per-request info logging halves the gateway's throughput; errors are still logged.
		logRequest: "debug",
		logResponse: "debug",
		log4XXResponses: false,
		routes: [
			{
				path: "/api",
				mappingPolicy: "restrict",
				autoAliases: false,
				bodyParsers: { json: { strict: true, limit: "1mb" }, urlencoded: false },
				aliases: {
					"GET /health": "api.health",
					"POST /members": "members.join",
					"GET /members/:memberId": "members.get",
					"DELETE /members/:memberId": "members.withdraw",
					"GET /points/:memberId": "points.get",
					"GET /points/:memberId/history": "points.history",
					"POST /deals": "deals.create",
					"GET /deals": "deals.list",
					"GET /deals/:id": "deals.get",
					"POST /deals/:id/cancel": "deals.cancel",
					"GET /billing-amount-views/:dealId": "billing.view",
					"POST /billings": "billing.settle",
					"GET /billings/:merchantId/:billingMonth": "billing.get"
				}
			}
		],

		onError(this: Service, req: IncomingMessage, res: ServerResponse, err: unknown) {
			const error = toHttpError(err, config.retryAfterSeconds);
			if (error.code >= 500 && error.code !== 503) this.logger.error("Request failed:", req.method, req.url, err);
			const retryAfter = (error.data as { retryAfter?: number } | undefined)?.retryAfter;
			if (retryAfter && (error.code === 503 || error.code === 429)) res.setHeader("Retry-After", String(retryAfter));
			res.setHeader("Content-Type", "application/json; charset=utf-8");
			res.writeHead(error.code);
			res.end(JSON.stringify(error));
		}
	},

	actions: {
		/** 200 once every service of this node has started (readiness), 503 before. */
		health: {
			params: { $$strict: true },
			handler(this: Service, ctx: Context<object, { $statusCode?: number }>) {
				if (!ctx.broker.started) ctx.meta.$statusCode = 503;
				return {
					status: ctx.broker.started ? "ok" : "starting",
					nodeID: ctx.broker.nodeID,
					services: ctx.broker.services.map(s => s.fullName).sort(),
					uptime: Math.round(process.uptime())
				};
			}
		}
	}
};

export default ApiService;
