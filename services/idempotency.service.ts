/**
 * Idempotency keys: what the gateway needs to answer a retried POST (`Idempotency-Key`) with the
 * first request's answer instead of running it again. One record per (token, key), in a store every
 * gateway node reaches through this service, so a retry is recognised on whichever gateway it lands
 * and after restarts; kept `retentionHours` (≥ 24 h), then swept.
 *
 * A record is first a lease: `begin` takes it for `leaseMs` and names the request id the request
 * runs under. A retry meanwhile is refused (409 REQUEST_IN_PROGRESS). `complete` stores the answer,
 * which every later retry gets (replay). `release` (an answer not worth keeping: a 5xx) lets the next
 * retry run again at once. A lease that runs out (its gateway died) is taken over by the next retry
 * under the same request id: the actions that create things answer what that id created before
 * (`lib/request-id.ts`), so running twice never makes two effects.
 * Every write is conditional on what was read, so two gateways racing for one key cannot both win.
 * The actions are internal (`public`, not `published`): no route reaches them.
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { clientError, conflict } from "../lib/errors";
import { sortableId } from "../lib/ids";
import { DbMixin, type DbThis } from "../mixins/db.mixin";

/** What the gateway sent for a completed request, byte for byte. */
export interface StoredResponse {
	status: number;
	/** The headers that belong to the answer itself (Content-Type, Location). */
	headers: Record<string, string>;
	/** The body's bytes, base64. */
	body: string;
}

export interface IdempotencyRecord {
	/** `<scope>:<key>`: one record per token and key. */
	_id: string;
	/** The SHA-256 of the token (base64url), never the token. */
	scope: string;
	key: string;
	/** SHA-256 of method, path and canonical body: a retry must send the same request. */
	fingerprint: string;
	/** What the request runs under (`ctx.meta.requestId`), kept across re-runs. */
	requestId: string;
	/** Until when (ms since epoch) the running request holds the key; 0 once released or answered. */
	leaseUntil: number;
	response?: StoredResponse;
	createdAt: string;
	/** When the record may be swept (ms since epoch). */
	expiresAt: number;
}

export interface KeyParams {
	scope: string;
	key: string;
}

/** `run`: run the request under `requestId`; `replay`: answer `response`, run nothing. */
export type Begun =
	{ outcome: "run"; requestId: string } | { outcome: "replay"; response: StoredResponse };

/** 1–255 printable ASCII characters (the IETF draft and Stripe's limit). */
export const IDEMPOTENCY_KEY = /^[\x20-\x7E]{1,255}$/;

const scope = { type: "string", pattern: /^[A-Za-z0-9_-]{43}$/ } as const;
const key = { type: "string", pattern: IDEMPOTENCY_KEY } as const;
const requestId = { type: "string", pattern: /^[0-9A-Z]{26}$/ } as const;

interface Settings {
	/** How long a running request holds its key (ms). */
	leaseMs: number;
	/** How long a key is kept (hours). */
	retentionHours: number;
	/** How often expired keys are swept (ms). */
	sweepMs: number;
}

interface Methods {
	sweep(): Promise<number>;
}

type This = Service<Settings> &
	DbThis<IdempotencyRecord> &
	Methods & { sweepTimer?: NodeJS.Timeout };

/** Attempts at a conditional write before giving up: each failed one means another gateway just wrote the record. */
const ATTEMPTS = 5;

const IdempotencyService: ServiceSchema<Settings, Methods, object, This> = {
	name: "idempotency",
	mixins: [
		// The records are read by `_id` only; the sweep reads by expiry.
		DbMixin("idempotency-keys", [{ fields: { expiresAt: 1 } }]),
		ConfiguredSettings<Settings>(config => ({
			leaseMs: config.idempotencyLeaseMs,
			retentionHours: config.idempotencyRetentionHours,
			sweepMs: 3_600_000
		}))
	],

	actions: {
		/**
		 * Takes the key for a request with this fingerprint: `run` (new, released, or its lease ran out)
		 * or `replay` (answered before). 422 IDEMPOTENCY_KEY_REUSED for another request under the key,
		 * 409 REQUEST_IN_PROGRESS while the first one runs.
		 */
		begin: {
			visibility: "public",
			params: { $$strict: true, scope, key, fingerprint: scope },
			async handler(this: This, ctx: Context<KeyParams & { fingerprint: string }>): Promise<Begun> {
				const { scope, key, fingerprint } = ctx.params;
				const _id = `${scope}:${key}`;
				for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
					const now = Date.now();
					const lease = { leaseUntil: now + this.settings.leaseMs };
					const record = await this.store.findById(_id);
					if (!record || record.expiresAt <= now) {
						const { _id: _, ...fresh }: IdempotencyRecord = {
							_id,
							scope,
							key,
							fingerprint,
							requestId: sortableId(),
							...lease,
							createdAt: new Date(now).toISOString(),
							expiresAt: now + this.settings.retentionHours * 3_600_000
						};
						// An expired record not swept yet is replaced, as if it were gone.
						const taken = record
							? (await this.store.update(
									{ _id, requestId: record.requestId, expiresAt: record.expiresAt },
									{ $set: fresh, $unset: { response: true } }
								)) > 0
							: await this.store.insertUnique({ _id, ...fresh });
						if (taken) return { outcome: "run", requestId: fresh.requestId };
						continue;
					}
					if (record.fingerprint !== fingerprint)
						throw clientError(
							422,
							"IDEMPOTENCY_KEY_REUSED",
							"This Idempotency-Key was used for another request (method, path or body differ); use a new key",
							{ key }
						);
					if (record.response) return { outcome: "replay", response: record.response };
					if (record.leaseUntil > now)
						throw conflict(
							"REQUEST_IN_PROGRESS",
							"A request with this Idempotency-Key is still running; retry later",
							{
								key,
								retryAfter: Math.ceil((record.leaseUntil - now) / 1000)
							}
						);
					// Released, or its gateway died: run again under the same request id.
					if (
						(await this.store.update(
							{ _id, leaseUntil: record.leaseUntil, response: { $exists: false } },
							{ $set: lease }
						)) > 0
					)
						return { outcome: "run", requestId: record.requestId };
				}
				throw conflict(
					"REQUEST_IN_PROGRESS",
					"A request with this Idempotency-Key is being taken by another retry; retry later",
					{
						key,
						retryAfter: 1
					}
				);
			}
		},

		/** Stores the answer of the request run under `requestId`; the first answer stored stands. */
		complete: {
			visibility: "public",
			params: {
				$$strict: true,
				scope,
				key,
				requestId,
				response: {
					type: "object",
					strict: true,
					props: {
						status: { type: "number", integer: true, min: 100, max: 599 },
						headers: { type: "record", key: { type: "string" }, value: { type: "string" } },
						body: { type: "string", pattern: /^[A-Za-z0-9+/]*={0,2}$/ }
					}
				}
			},
			async handler(
				this: This,
				ctx: Context<KeyParams & { requestId: string; response: StoredResponse }>
			): Promise<boolean> {
				const { scope, key, requestId, response } = ctx.params;
				return (
					(await this.store.update(
						{ _id: `${scope}:${key}`, requestId, response: { $exists: false } },
						{ $set: { response, leaseUntil: 0 } }
					)) > 0
				);
			}
		},

		/**
		 * Gives the key back without an answer, so the next retry runs at once. `renew`: the request was
		 * undone (a service's own 503, e.g. a payment it could not confirm and voided), so the next run
		 * is a new request with a new request id; otherwise it keeps the id, as what ran may have
		 * taken effect (a timeout).
		 */
		release: {
			visibility: "public",
			params: { $$strict: true, scope, key, requestId, renew: "boolean" },
			async handler(
				this: This,
				ctx: Context<KeyParams & { requestId: string; renew: boolean }>
			): Promise<boolean> {
				const { scope, key, requestId, renew } = ctx.params;
				const update = { $set: { leaseUntil: 0, ...(renew ? { requestId: sortableId() } : {}) } };
				return (
					(await this.store.update(
						{ _id: `${scope}:${key}`, requestId, response: { $exists: false } },
						update
					)) > 0
				);
			}
		},

		/** Deletes the keys past their retention (also run every `sweepMs`); how many. */
		sweep: {
			visibility: "public",
			params: { $$strict: true },
			handler(this: This): Promise<number> {
				return this.sweep();
			}
		}
	},

	methods: {
		sweep(this: This) {
			return this.store.remove({ expiresAt: { $lte: Date.now() } });
		}
	},

	started(this: This) {
		this.sweepTimer = setInterval(
			() =>
				this.sweep().catch(err =>
					this.logger.warn("Sweeping idempotency keys failed:", (err as Error).message)
				),
			this.settings.sweepMs
		);
	},

	stopped(this: This) {
		clearInterval(this.sweepTimer);
	}
};

export default IdempotencyService;
