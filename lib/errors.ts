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

/** Node's codes for a network peer that is down, unreachable or did not answer. */
const NETWORK_CODES = new Set([
	"ECONNREFUSED",
	"ECONNRESET",
	"ETIMEDOUT",
	"EPIPE",
	"EHOSTUNREACH",
	"ENETUNREACH",
	"EAI_AGAIN"
]);
/** The MongoDB driver's errors for a server that cannot be reached or did not answer in time. */
const MONGO_UNREACHABLE =
	/^Mongo(Network|NetworkTimeout|ServerSelection|NotConnected|TopologyClosed|OperationTimeout)Error$/;
/** MongoDB's `MaxTimeMSExpired`: the operation ran out of its time bound. */
const MAX_TIME_EXPIRED = 50;

interface ErrorShape {
	retryable?: boolean;
	code?: unknown;
	name?: unknown;
	message?: unknown;
	cause?: ErrorShape;
}

/**
 * Did a store call fail because the store is unreachable or did not answer in time (rather than
 * refusing what was asked)? By the driver's error names and codes, and mongoose's wait for a lost
 * connection (`buffering timed out`, MONGO_TIMEOUT_MS).
 */
export function isStoreUnreachable(err: unknown): boolean {
	const e = err as ErrorShape | undefined;
	if (!e) return false;
	if (typeof e.code === "string" && NETWORK_CODES.has(e.code)) return true;
	const name = typeof e.name === "string" ? e.name : "";
	if (MONGO_UNREACHABLE.test(name.replace(/^Mongoose/, "Mongo"))) return true;
	if (name.startsWith("Mongo") && e.code === MAX_TIME_EXPIRED) return true;
	return (
		name === "MongooseError" &&
		typeof e.message === "string" &&
		e.message.includes("buffering timed out")
	);
}

/**
 * Is this failure an unavailable dependency, which passes if the work waits (a store or a service
 * down, busy or slow), rather than something wrong with the work itself (invalid, or a bug that
 * fails the same way each time)? Moleculer marks its own such errors `retryable` (a timeout, no
 * endpoint available or its breaker open, and `unavailable()` 503s such as `STORE_UNAVAILABLE`); an
 * unreachable store is recognised by its errors, also as an error's `cause`.
 */
export function isTransient(err: unknown): boolean {
	for (let e = err as ErrorShape | undefined, depth = 0; e && depth < 5; e = e.cause, depth++)
		if (e.retryable === true || isStoreUnreachable(e)) return true;
	return false;
}
