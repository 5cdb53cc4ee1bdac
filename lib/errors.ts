import { Errors } from "moleculer";

const { MoleculerClientError, MoleculerRetryableError } = Errors;

/** A request the caller can fix: 4xx with a stable upper-case code. */
export function clientError(status: number, code: string, message: string, data?: unknown): Errors.MoleculerClientError {
	return new MoleculerClientError(message, status, code, data);
}

export const notFound = (code: string, message: string, data?: unknown) => clientError(404, code, message, data);
export const conflict = (code: string, message: string, data?: unknown) => clientError(409, code, message, data);

/** A dependency that cannot answer now: 503, and how long the client should wait before retrying. */
export function unavailable(code: string, message: string, retryAfterSeconds: number): Errors.MoleculerRetryableError {
	return new MoleculerRetryableError(message, 503, code, { retryAfter: retryAfterSeconds });
}
