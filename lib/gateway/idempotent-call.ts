/** Why a module: a retried POST is safe only by wrapping moleculer-web's internal `callAction`, so the wrap and its fence live here. */
import { createHash } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Context, Logger } from "moleculer";
import { clientError, isDependencyUnavailable } from "../errors";
import { assertPatchable, PATCHES } from "../patches";
import type { RequestMeta } from "../request-id";
import {
	IDEMPOTENCY_KEY,
	type Begun,
	type KeyParams,
	type StoredResponse
} from "../../services/idempotency.service";

/*
 * The wrap relies on moleculer-web (checked version in lib/patches.ts): `callAction`'s signature,
 * that routing calls it as `this.callAction(...)` (so a service method of that name replaces it), and
 * that it throws a failure (for `onError`) and sends an answer with one `res.end(body)`.
 * test/unit/gateway-patch.spec.ts checks all of it against the installed version.
 */

/** A request as moleculer-web hands it to `callAction`: parsed body, the call's context, and our note of a failure. */
export type GatewayRequest = IncomingMessage & {
	originalUrl?: string;
	body?: unknown;
	$ctx: Context<unknown, RequestMeta>;
	$failure?: unknown;
};

/** moleculer-web's `callAction(route, actionName, req, res, params, isStream)`. */
export type CallActionArgs = [
	route: unknown,
	actionName: string,
	req: GatewayRequest,
	res: ServerResponse,
	params: unknown,
	isStream: boolean
];
/** Called with the gateway service as `this`. */
export type CallAction = (...args: CallActionArgs) => Promise<unknown>;

/** How many parameters the checked `callAction` declares. */
export const CALL_ACTION_ARITY = 6;

/**
 * moleculer-web's own `callAction`, from its service schema (`ApiGateway`); throws at start-up when an
 * upgrade removed it or changed its parameters, instead of every idempotent POST failing later.
 */
export function stockCallAction(gateway: { methods?: object }): CallAction {
	const methods = (gateway.methods ?? {}) as Record<string, (...args: unknown[]) => unknown>;
	assertPatchable(PATCHES.moleculerWeb, methods);
	const method = methods.callAction;
	if (method.length !== CALL_ACTION_ARITY)
		throw new Error(
			`moleculer-web's callAction now takes ${method.length} parameters, not ${CALL_ACTION_ARITY} ` +
				`(route, actionName, req, res, params, isStream): the patch in ${PATCHES.moleculerWeb.where} was checked against ` +
				`${PATCHES.moleculerWeb.checked}; re-check it before upgrading`
		);
	return method as CallAction;
}

const sha256 = (text: string) => createHash("sha256").update(text).digest("base64url");

/** JSON with every object's keys in order: bodies that differ only in key order are the same request. */
function canonicalJson(value: unknown): string {
	return JSON.stringify(value, (_key, v: unknown) =>
		v !== null && typeof v === "object" && !Array.isArray(v)
			? Object.fromEntries(
					Object.keys(v)
						.sort()
						.map(k => [k, (v as Record<string, unknown>)[k]])
				)
			: v
	);
}

/** What a retry under the same key must repeat: method, path with its query, and the body. */
export function fingerprintOf(req: GatewayRequest): string {
	return sha256(`${req.method} ${req.originalUrl ?? req.url}\n${canonicalJson(req.body ?? null)}`);
}

/** The headers that belong to an answer and are replayed with it. */
const REPLAYED_HEADERS = ["Content-Type", "Location"];

/**
 * `stock` (moleculer-web's call of the action behind an alias), made safe to retry: a POST with an
 * `Idempotency-Key` (1–255 printable ASCII characters) takes the key for its token (`scopeOf`, via
 * `idempotency.begin`, shared by every gateway node) and either runs under the key's request id
 * (`ctx.meta.requestId`) and records its answer, or answers what was recorded, byte for byte, with
 * `Idempotent-Replayed: true`. Runs after authentication and authorization: a refused request takes
 * no key. Without the header, or on another method, nothing changes.
 */
export async function idempotentCall(
	gateway: { logger: Logger },
	stock: CallAction,
	scopeOf: (req: IncomingMessage) => string,
	...args: CallActionArgs
): Promise<unknown> {
	const [, , req, res, , isStream] = args;
	const key = req.headers["idempotency-key"];
	if (req.method !== "POST" || key === undefined) return stock.apply(gateway, args);
	// A streamed body is not kept, so a retry could not be told from another request: such a
	// route is idempotent by what it does (an import, by its rows), and refuses the header.
	if (isStream)
		throw clientError(
			400,
			"IDEMPOTENCY_KEY_UNSUPPORTED",
			"This route streams its body and takes no Idempotency-Key: sending it again is safe by itself"
		);
	if (typeof key !== "string" || !IDEMPOTENCY_KEY.test(key))
		throw clientError(
			400,
			"INVALID_IDEMPOTENCY_KEY",
			"Idempotency-Key must be 1 to 255 printable ASCII characters",
			{
				length: String(key).length
			}
		);
	const scope = scopeOf(req);
	const begun = await req.$ctx.call<Begun, KeyParams & { fingerprint: string }>(
		"idempotency.begin",
		{
			scope,
			key,
			fingerprint: fingerprintOf(req)
		}
	);
	if (begun.outcome === "replay") {
		const { status, headers, body } = begun.response;
		res.writeHead(status, { ...headers, "Idempotent-Replayed": "true" });
		res.end(Buffer.from(body, "base64"));
		return true;
	}
	req.$ctx.meta.requestId = begun.requestId;
	recordAnswer(gateway.logger, req, res, { scope, key, requestId: begun.requestId });
	try {
		return await stock.apply(gateway, args);
	} catch (err) {
		// Sent by `onError`; what failed decides whether the next retry is the same request.
		req.$failure = err;
		throw err;
	}
}

/**
 * Records the answer before it is sent, so that a client who got it and retries gets it again.
 * A 2xx or 4xx is kept and replayed (a refusal stands: the same request would be refused again),
 * except an answer marked `Cache-Control: no-store` (it holds a secret, such as a new key's token):
 * its key is released, and a retry runs again under the same request id.
 * A 5xx is not kept: the key is released and the retry runs again — as a new request when a
 * service answered that it undid its work (its own 503), under the same request id otherwise
 * (a timeout: what ran may still take effect, and the action answers it on the re-run).
 */
function recordAnswer(
	logger: Logger,
	req: GatewayRequest,
	res: ServerResponse,
	running: KeyParams & { requestId: string }
): void {
	const end = res.end.bind(res) as (chunk?: unknown) => ServerResponse;
	res.end = ((chunk?: string | Buffer) => {
		const ctx = req.$ctx;
		const recording =
			res.statusCode < 500 && res.getHeader("Cache-Control") !== "no-store"
				? ctx.call("idempotency.complete", {
						...running,
						response: {
							status: res.statusCode,
							headers: Object.fromEntries(
								REPLAYED_HEADERS.flatMap(name =>
									res.hasHeader(name) ? [[name, String(res.getHeader(name))]] : []
								)
							),
							body: Buffer.from(chunk ?? "").toString("base64")
						} satisfies StoredResponse
					})
				: ctx.call("idempotency.release", {
						...running,
						renew: isDependencyUnavailable(req.$failure)
					});
		// Unrecorded, the key's lease runs out and a retry re-runs under the same request id.
		void recording
			.catch(err => logger.warn("Idempotency-Key answer not recorded:", (err as Error).message))
			.then(() => end(chunk));
		return res;
	}) as typeof res.end;
}
