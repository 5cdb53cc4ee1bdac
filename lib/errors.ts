import { Errors } from "moleculer";

const { MoleculerClientError, MoleculerRetryableError } = Errors;

/** A request the caller can fix: 4xx with a stable upper-case code. */
export function clientError(
	status: number,
	code: string,
	message: string,
	data?: unknown
): Errors.MoleculerClientError {
	return new MoleculerClientError(message, status, code, data);
}

export const notFound = (code: string, message: string, data?: unknown) =>
	clientError(404, code, message, data);
export const conflict = (code: string, message: string, data?: unknown) =>
	clientError(409, code, message, data);

/** A dependency that cannot answer now: 503, and how long the client should wait before retrying. */
export function unavailable(
	code: string,
	message: string,
	retryAfterSeconds: number,
	cause?: unknown
): Errors.MoleculerRetryableError {
	return new MoleculerRetryableError(message, 503, code, {
		retryAfter: retryAfterSeconds,
		...(cause ? { reason: unavailableReason(cause) } : {})
	});
}

/**
 * Is this the fast 503 a healthy service gives when a dependency of its is unavailable? Such an
 * answer is not the service's own failure: the circuit breaker must not count it against it.
 */
export function isDependencyUnavailable(err: unknown): boolean {
	const e = err as { code?: number; data?: { retryAfter?: unknown } };
	return e?.code === 503 && typeof e.data?.retryAfter === "number";
}

/**
 * Why a synchronous call found its dependency unavailable, for clients and operators: it did not
 * answer in time; none of its endpoints is available (their circuit breaker is open, or their
 * nodes are shutting down), so the call was not even made; or no node serves it at all.
 */
export function unavailableReason(
	err: unknown
): "TIMEOUT" | "UNAVAILABLE" | "NOT_RUNNING" | "FAILED" {
	switch ((err as { type?: string })?.type) {
		case "REQUEST_TIMEOUT":
			return "TIMEOUT";
		case "SERVICE_NOT_AVAILABLE":
			return "UNAVAILABLE";
		case "SERVICE_NOT_FOUND":
			return "NOT_RUNNING";
		default:
			return "FAILED";
	}
}
