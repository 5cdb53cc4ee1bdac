/** Why a module: what a client sees of any failure (one JSON shape, a status code, never a stack trace) is decided here, once. */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Logger } from "moleculer";

/** The one public error shape. */
export interface HttpError {
	name: string;
	message: string;
	code: number;
	type: string;
	data?: unknown;
}

/** Types of errors that mean "a service behind the gateway cannot answer now". */
const UNAVAILABLE = new Set([
	"SERVICE_NOT_FOUND",
	"SERVICE_NOT_AVAILABLE",
	"REQUEST_TIMEOUT",
	"CIRCUIT_BREAKER_OPEN"
]);

/** Turns whatever was thrown into the one public error shape. */
export function toHttpError(err: unknown, retryAfter: number): HttpError {
	const e = err as {
		name?: string;
		message?: string;
		code?: unknown;
		status?: number;
		type?: string;
		data?: unknown;
	};
	if (e?.type === "entity.parse.failed")
		return {
			name: "BadRequestError",
			message: "Malformed JSON body",
			code: 400,
			type: "INVALID_JSON"
		};
	if (e?.type === "entity.too.large")
		return {
			name: "PayloadTooLarge",
			message: "Request body too large",
			code: 413,
			type: "PAYLOAD_TOO_LARGE"
		};
	if (e?.type && UNAVAILABLE.has(e.type))
		return {
			name: "ServiceUnavailableError",
			message: "Service temporarily unavailable; try again later",
			code: 503,
			type: "SERVICE_UNAVAILABLE",
			data: { retryAfter }
		};
	const code =
		typeof e?.code === "number" && e.code >= 400 && e.code <= 599
			? e.code
			: e?.status && e.status >= 400
				? e.status
				: 500;
	if (code === 503)
		return {
			name: "ServiceUnavailableError",
			message: e?.message ?? "Service unavailable",
			code,
			type: e?.type ?? "SERVICE_UNAVAILABLE",
			data: { retryAfter, ...(e?.data as object) }
		};
	if (code >= 500)
		return {
			name: "InternalError",
			message: "Internal server error",
			code,
			type: "INTERNAL_ERROR"
		};
	if (code === 429)
		return {
			name: "RateLimitExceeded",
			message: "Too many requests; try again later",
			code,
			type: "RATE_LIMIT_EXCEEDED",
			// A member's own limit says when its window ends; the route's limiter uses its header.
			...(typeof (e?.data as { retryAfter?: unknown })?.retryAfter === "number"
				? { data: { retryAfter: (e?.data as { retryAfter: number }).retryAfter } }
				: {})
		};
	return {
		name: e?.name ?? "Error",
		message: e?.message ?? "Error",
		code,
		type: e?.type ?? "ERROR",
		...(e?.data !== undefined ? { data: e.data } : {})
	};
}

/**
 * moleculer-web's `onError`: sends `err` in the public shape, with `Retry-After` where the client
 * should come back later; logs what is the server's fault (a 5xx other than 503), with the request.
 */
export function sendHttpError(
	logger: Logger,
	req: IncomingMessage,
	res: ServerResponse,
	err: unknown,
	retryAfterSeconds: number
): void {
	const error = toHttpError(err, retryAfterSeconds);
	if (error.code >= 500 && error.code !== 503)
		logger.error("Request failed:", req.method, req.url, err);
	if (error.code === 429 && error.data)
		res.setHeader("Retry-After", String((error.data as { retryAfter: number }).retryAfter));
	else if (error.code === 429) {
		// The limiter's window resets at X-Rate-Limit-Reset (ms since epoch).
		const reset = Number(res.getHeader("X-Rate-Limit-Reset")) || Date.now() + 60_000;
		res.setHeader("Retry-After", String(Math.max(1, Math.ceil((reset - Date.now()) / 1000))));
	}
	const retryAfter = (error.data as { retryAfter?: number } | undefined)?.retryAfter;
	// A 503, or a retry that overtook its Idempotency-Key's first request: when to come back.
	if (retryAfter && (error.code === 503 || error.type === "REQUEST_IN_PROGRESS"))
		res.setHeader("Retry-After", String(retryAfter));
	res.setHeader("Content-Type", "application/json; charset=utf-8");
	res.writeHead(error.code);
	res.end(JSON.stringify(error));
}
