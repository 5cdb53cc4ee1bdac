/**
 * Merchants: the partners of the coalition, each under its own contract terms. Staff register a
 * merchant, change its terms (from now or a later moment: the past is never rewritten, as every
 * deal records the terms it was made under), suspend and resume it, and issue and revoke its API
 * keys. Deals ask `dealTerms` whether a merchant may deal and on which terms.
 *
 * A merchant nobody registered deals on the node's default terms while `MERCHANTS=open` (the
 * default: the seed's `merchantId=20`), and is refused with `MERCHANTS=registered`.
 *
 * A key's token is shown once, when it is issued, and stored only as its SHA-256; gateways resolve
 * a token they do not know through `authenticate` and keep the answer a short while
 * (`merchant.keyRevoked` tells them at once when a key is revoked).
 */
import { randomBytes } from "node:crypto";
import type { Context, Service, ServiceSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import type { DealTerms } from "../contracts/channels";
import { tokenHash } from "../lib/gateway/access";
import { created, type AnswerMeta } from "../lib/gateway/answers";
import { clientError, conflict, notFound, unavailable } from "../lib/errors";
import { sortableId } from "../lib/ids";
import * as P from "../lib/params";
import { createdBefore, REQUEST_ID_INDEX, requestIdOf, type RequestMeta } from "../lib/request-id";
import { LOST, retryOnRace, type Lost } from "../lib/retry-on-race";
import {
	dealTermsOf,
	scheduled,
	scheduledView,
	termsAt,
	type ScheduledTerms,
	type TermsView
} from "../lib/terms";
import { DbMixin, openCollection, type Collection, type DbThis } from "../mixins/db.mixin";

export interface Merchant {
	/** The merchantId. */
	_id: string;
	name: string;
	status: "active" | "suspended";
	/** Every terms the merchant has had or is to have, in the order they take effect. */
	termsHistory: ScheduledTerms[];
	createdAt: string;
	suspendedAt?: string;
	/** Grows with every change: a change is written only over the version it read. */
	version: number;
	/** The request (Idempotency-Key) that registered the merchant, if it had one. */
	requestId?: string;
}

export interface MerchantView {
	merchantId: string;
	name: string;
	status: Merchant["status"];
	/** The terms in force now. */
	terms: TermsView & { from: string };
	termsHistory: (TermsView & { from: string })[];
	createdAt: string;
	suspendedAt?: string;
}

export interface MerchantKey {
	/** The keyId. */
	_id: string;
	merchantId: string;
	name: string | null;
	/** SHA-256 of the token, base64url: the token itself is never stored. */
	tokenHash: string;
	createdAt: string;
	revokedAt?: string;
	requestId?: string;
}

export interface MerchantKeyView {
	keyId: string;
	merchantId: string;
	name: string | null;
	status: "active" | "revoked";
	createdAt: string;
	revokedAt?: string;
}

/** Terms as a request gives them, each optional: decimals the `decimal` rule passed, and days. */
interface TermsParams {
	earnRate?: number;
	redemptionFee?: number;
	pointPrice?: number;
	holdDays?: number;
}

interface Methods {
	toView(merchant: Merchant): MerchantView;
	keyView(key: MerchantKey): MerchantKeyView;
	findMerchant(merchantId: string): Promise<Merchant>;
	termsOf(params: TermsParams, base: DealTerms): DealTerms;
	changeTermsOnce(
		ctx: Context<TermsParams & { merchantId: string; from?: string }, RequestMeta>,
		from: string
	): Promise<Merchant | Lost>;
	setStatus(merchantId: string, status: Merchant["status"]): Promise<Merchant>;
	/** The clock; a test may run the service with another. */
	now(): Date;
}

interface Settings {
	/** The terms of a merchant registered without its own, and of an unregistered one (MERCHANTS=open). */
	defaultTerms: DealTerms;
	/** `open`: unregistered merchants deal on the default terms; `registered`: they may not deal. */
	merchants: "open" | "registered";
	/** What a 503 asks the client to wait (s). */
	retryAfterSeconds: number;
}

type This = Service<Settings> &
	DbThis<Merchant> &
	Methods & {
		keys: Collection<MerchantKey>;
	};

/** An ISO 8601 date-time with its offset, such as `2026-07-01T00:00:00Z` or `…T09:00:00+09:00`. */
const DATE_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})$/;

const TERMS_PARAMS = {
	earnRate: { ...P.decimal(1), optional: true },
	redemptionFee: { ...P.decimal(1), optional: true },
	pointPrice: { ...P.decimal(100), optional: true },
	holdDays: { ...P.count(365), optional: true }
} as const;

/** How often a change of terms that lost a race for its merchant reads it again. */
const MAX_CHANGE_ATTEMPTS = 20;

const MerchantsService: ServiceSchema<Settings, Methods, object, This> = {
	name: "merchants",
	mixins: [
		DbMixin("merchants", [{ fields: { status: 1 } }, REQUEST_ID_INDEX]),
		ConfiguredSettings<Settings>(config => ({
			defaultTerms: {
				earnRateBp: config.earnRateBp,
				redemptionFeeBp: config.settlementFeeBp,
				pointPriceBp: config.pointPriceBp,
				holdDays: config.pointsHoldDays
			},
			merchants: config.merchants,
			retryAfterSeconds: config.retryAfterSeconds
		}))
	],

	actions: {
		register: {
			rest: "POST /merchants",
			summary:
				"Register a partner merchant, on its own terms (those not given are the node's defaults)",
			params: {
				$$strict: true,
				merchantId: P.id,
				name: { type: "string", trim: true, min: 1, max: 100 },
				...TERMS_PARAMS
			},
			async handler(
				this: This,
				ctx: Context<TermsParams & { merchantId: string; name: string }, RequestMeta & AnswerMeta>
			) {
				const answer = (merchant: Merchant) =>
					created(ctx, `/api/merchants/${merchant._id}`, this.toView(merchant));
				const before = await createdBefore(this.store, ctx);
				if (before) return answer(before);
				const { merchantId, name } = ctx.params;
				const createdAt = this.now().toISOString();
				const merchant: Merchant = {
					_id: merchantId,
					name,
					status: "active",
					termsHistory: [
						{ ...this.termsOf(ctx.params, this.settings.defaultTerms), from: createdAt }
					],
					createdAt,
					version: 1,
					...requestIdOf(ctx)
				};
				if (await this.store.insertUnique(merchant)) return answer(merchant);
				const racing = await createdBefore(this.store, ctx);
				if (racing) return answer(racing);
				throw conflict("MERCHANT_EXISTS", `Merchant '${merchantId}' is already registered`, {
					merchantId
				});
			}
		},

		list: {
			rest: "GET /merchants",
			summary: "The registered merchants, by merchantId, paged",
			params: {
				$$strict: true,
				status: { type: "enum", values: ["active", "suspended"], optional: true },
				...P.paging
			},
			async handler(
				this: This,
				ctx: Context<{ status?: Merchant["status"]; page: number; pageSize: number }>
			) {
				const { status, page, pageSize } = ctx.params;
				const result = await this.store.page(status ? { status } : {}, ["_id"], page, pageSize);
				return { ...result, rows: result.rows.map(m => this.toView(m)) };
			}
		},

		get: {
			rest: "GET /merchants/:merchantId",
			summary: "A merchant: its status, the terms in force and every terms it has had or will have",
			params: { $$strict: true, merchantId: P.id },
			async handler(this: This, ctx: Context<{ merchantId: string }>) {
				return this.toView(await this.findMerchant(ctx.params.merchantId));
			}
		},

		changeTerms: {
			rest: "POST /merchants/:merchantId/terms",
			summary:
				"New terms from now, or from a later moment (`from`); those not given stay as they are then. Deals already made keep theirs",
			params: {
				$$strict: true,
				merchantId: P.id,
				...TERMS_PARAMS,
				from: {
					type: "string",
					pattern: DATE_TIME,
					optional: true,
					messages: {
						stringPattern:
							"The 'from' field must be an ISO 8601 date-time with its offset, e.g. 2026-07-01T00:00:00Z"
					}
				}
			},
			async handler(
				this: This,
				ctx: Context<TermsParams & { merchantId: string; from?: string }, RequestMeta & AnswerMeta>
			) {
				const { merchantId, earnRate, redemptionFee, pointPrice, holdDays } = ctx.params;
				if ([earnRate, redemptionFee, pointPrice, holdDays].every(term => term === undefined))
					throw clientError(
						422,
						"TERMS_UNCHANGED",
						"Give at least one of earnRate, redemptionFee, pointPrice and holdDays",
						{ merchantId }
					);
				const now = this.now();
				const from = ctx.params.from ? new Date(ctx.params.from) : now;
				if (Number.isNaN(from.getTime()))
					throw clientError(422, "INVALID_FROM", `'${ctx.params.from}' is not a date-time`, {
						from: ctx.params.from
					});
				if (from < now)
					throw clientError(
						422,
						"TERMS_FROM_IN_PAST",
						"Terms cannot change in the past: deals were made under the terms then; leave out 'from' for now",
						{ from: ctx.params.from, now: now.toISOString() }
					);
				const merchant = await retryOnRace(() => this.changeTermsOnce(ctx, from.toISOString()), {
					attempts: MAX_CHANGE_ATTEMPTS,
					what: `Merchant '${merchantId}'`,
					// Nothing was written: a 503 asks for a retry (and is not kept as an Idempotency-Key's answer).
					giveUp: message =>
						unavailable("MERCHANT_BUSY", `${message}; try again`, this.settings.retryAfterSeconds)
				});
				return created(ctx, `/api/merchants/${merchantId}`, this.toView(merchant));
			}
		},

		suspend: {
			rest: "POST /merchants/:merchantId/suspend",
			summary:
				"Suspend a merchant: its new deals are refused; returns of earlier ones and its settlements go on",
			params: { $$strict: true, merchantId: P.id },
			handler(this: This, ctx: Context<{ merchantId: string }>) {
				return this.setStatus(ctx.params.merchantId, "suspended").then(m => this.toView(m));
			}
		},

		resume: {
			rest: "POST /merchants/:merchantId/resume",
			summary: "Resume a suspended merchant: it may deal again",
			params: { $$strict: true, merchantId: P.id },
			handler(this: This, ctx: Context<{ merchantId: string }>) {
				return this.setStatus(ctx.params.merchantId, "active").then(m => this.toView(m));
			}
		},

		/**
		 * Whether the merchant may deal at `at`, and on which terms: what a new deal records. 404
		 * MERCHANT_NOT_FOUND for an unregistered one under MERCHANTS=registered, 409 MERCHANT_SUSPENDED.
		 */
		dealTerms: {
			visibility: "public",
			params: { $$strict: true, merchantId: P.id, at: { type: "string", pattern: DATE_TIME } },
			async handler(this: This, ctx: Context<{ merchantId: string; at: string }>) {
				const { merchantId, at } = ctx.params;
				const merchant = await this.store.findById(merchantId);
				if (!merchant) {
					if (this.settings.merchants === "open") return this.settings.defaultTerms;
					throw notFound("MERCHANT_NOT_FOUND", `Merchant '${merchantId}' is not registered`, {
						merchantId
					});
				}
				if (merchant.status === "suspended")
					throw conflict(
						"MERCHANT_SUSPENDED",
						`Merchant '${merchantId}' is suspended: it cannot make new deals`,
						{ merchantId }
					);
				return dealTermsOf(termsAt(merchant.termsHistory, at));
			}
		},

		/**
		 * A new key for the merchant; its token is in this answer only. The answer is marked
		 * `Cache-Control: no-store`, so the gateway does not keep it for an `Idempotency-Key`: a retry
		 * runs again under the same request id, and revokes the key the first run issued (whose token
		 * may never have reached the client) before issuing another.
		 */
		issueKey: {
			rest: "POST /merchants/:merchantId/keys",
			summary: "Issue an API key acting as the merchant; its token is shown once, in this answer",
			params: {
				$$strict: true,
				merchantId: P.id,
				name: { type: "string", trim: true, min: 1, max: 100, optional: true }
			},
			async handler(
				this: This,
				ctx: Context<
					{ merchantId: string; name?: string },
					RequestMeta & AnswerMeta & { $responseHeaders?: Record<string, string> }
				>
			) {
				const { merchantId } = ctx.params;
				await this.findMerchant(merchantId);
				const at = this.now().toISOString();
				const { requestId } = requestIdOf(ctx);
				if (requestId) {
					const [earlier] = await this.keys.find({ query: { requestId }, limit: 1 });
					if (earlier) {
						await this.keys.update(
							{ _id: earlier._id },
							{ $set: { revokedAt: earlier.revokedAt ?? at }, $unset: { requestId: true } }
						);
						ctx.broker.broadcast("merchant.keyRevoked", { tokenHash: earlier.tokenHash });
					}
				}
				const token = `opk_${randomBytes(32).toString("base64url")}`;
				const key: MerchantKey = {
					_id: sortableId(),
					merchantId,
					name: ctx.params.name ?? null,
					tokenHash: tokenHash(token),
					createdAt: at,
					...(requestId ? { requestId } : {})
				};
				await this.keys.insertUnique(key);
				ctx.meta.$responseHeaders = { "Cache-Control": "no-store" };
				return created(ctx, `/api/merchants/${merchantId}/keys/${key._id}`, {
					keyId: key._id,
					name: key.name,
					token,
					createdAt: at
				});
			}
		},

		keys: {
			rest: "GET /merchants/:merchantId/keys",
			summary: "The merchant's API keys, newest first, without their tokens",
			params: { $$strict: true, merchantId: P.id, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ merchantId: string; page: number; pageSize: number }>
			) {
				const { merchantId, page, pageSize } = ctx.params;
				await this.findMerchant(merchantId);
				return this.keys.newestFirst({ merchantId }, page, pageSize, key => this.keyView(key));
			}
		},

		/** Revokes a key at once on this node, and on every gateway within 5 s (see `authenticate`). */
		revokeKey: {
			rest: "DELETE /merchants/:merchantId/keys/:keyId",
			summary: "Revoke an API key: its token is refused (401) by every gateway within 5 seconds",
			params: { $$strict: true, merchantId: P.id, keyId: P.id },
			async handler(this: This, ctx: Context<{ merchantId: string; keyId: string }>) {
				const { merchantId, keyId } = ctx.params;
				const key = await this.keys.findById(keyId);
				if (!key || key.merchantId !== merchantId)
					throw notFound("KEY_NOT_FOUND", `Merchant '${merchantId}' has no key '${keyId}'`, {
						merchantId,
						keyId
					});
				const revokedAt = key.revokedAt ?? this.now().toISOString();
				if (!key.revokedAt)
					await this.keys.update(
						{ _id: keyId, revokedAt: { $exists: false } },
						{ $set: { revokedAt } }
					);
				ctx.broker.broadcast("merchant.keyRevoked", { tokenHash: key.tokenHash });
				return this.keyView({ ...key, revokedAt });
			}
		},

		/** The merchant a key's token (by its SHA-256) acts as, or null: not a key, or revoked. */
		authenticate: {
			visibility: "public",
			params: { $$strict: true, tokenHash: { type: "string", pattern: /^[A-Za-z0-9_-]{43}$/ } },
			async handler(this: This, ctx: Context<{ tokenHash: string }>) {
				const [key] = await this.keys.find({
					query: { tokenHash: ctx.params.tokenHash, revokedAt: { $exists: false } },
					limit: 1
				});
				return key ? { merchantId: key.merchantId } : null;
			}
		}
	},

	methods: {
		now: () => new Date(),

		/** `params`' terms in basis points, each one not given taken from `base`. */
		termsOf(params: TermsParams, base: DealTerms): DealTerms {
			const bp = (value: number | undefined, fallback: number) =>
				value === undefined ? fallback : P.toBasisPoints(value);
			return {
				earnRateBp: bp(params.earnRate, base.earnRateBp),
				redemptionFeeBp: bp(params.redemptionFee, base.redemptionFeeBp),
				pointPriceBp: bp(params.pointPrice, base.pointPriceBp),
				holdDays: params.holdDays ?? base.holdDays ?? 0
			};
		},

		/** One attempt at a change of terms, written over the version read (LOST if another came first). */
		async changeTermsOnce(this: This, ctx, from) {
			const merchant = await this.findMerchant(ctx.params.merchantId);
			const { requestId } = requestIdOf(ctx);
			// A request run again (its gateway died before answering) answers the merchant it left.
			if (requestId && merchant.termsHistory.some(t => t.requestId === requestId)) return merchant;
			const terms: ScheduledTerms = {
				...this.termsOf(ctx.params, termsAt(merchant.termsHistory, from)),
				from,
				...(requestId ? { requestId } : {})
			};
			const termsHistory = scheduled(merchant.termsHistory, terms);
			const version = merchant.version + 1;
			const changed = await this.store.update(
				{ _id: merchant._id, version: merchant.version },
				{ $set: { termsHistory, version } }
			);
			return changed ? { ...merchant, termsHistory, version } : LOST;
		},

		async setStatus(this: This, merchantId: string, status: Merchant["status"]) {
			const merchant = await this.findMerchant(merchantId);
			if (merchant.status === status)
				throw conflict(
					status === "suspended" ? "MERCHANT_SUSPENDED" : "MERCHANT_ACTIVE",
					`Merchant '${merchantId}' is already ${status}`,
					{ merchantId, status }
				);
			const suspendedAt = this.now().toISOString();
			const change =
				status === "suspended"
					? { $set: { status, suspendedAt }, $inc: { version: 1 } }
					: { $set: { status }, $unset: { suspendedAt: true }, $inc: { version: 1 } };
			// Two staff at once: one changes it, the other is told it already is.
			if (!(await this.store.update({ _id: merchantId, status: merchant.status }, change)))
				return this.setStatus(merchantId, status);
			return this.findMerchant(merchantId);
		},

		async findMerchant(this: This, merchantId: string) {
			const merchant = await this.store.findById(merchantId);
			if (!merchant)
				throw notFound("MERCHANT_NOT_FOUND", `Merchant '${merchantId}' is not registered`, {
					merchantId
				});
			return merchant;
		},

		toView(this: This, merchant: Merchant): MerchantView {
			const { _id, name, status, termsHistory, createdAt, suspendedAt } = merchant;
			return {
				merchantId: _id,
				name,
				status,
				terms: scheduledView(termsAt(termsHistory, this.now().toISOString())),
				termsHistory: termsHistory.map(scheduledView),
				createdAt,
				...(suspendedAt ? { suspendedAt } : {})
			};
		},

		keyView(key: MerchantKey): MerchantKeyView {
			const { _id, merchantId, name, createdAt, revokedAt } = key;
			return {
				keyId: _id,
				merchantId,
				name,
				status: revokedAt ? "revoked" : "active",
				createdAt,
				...(revokedAt ? { revokedAt } : {})
			};
		}
	},

	created(this: This) {
		this.keys = openCollection<MerchantKey>(this, "merchant-keys", [
			{ fields: { tokenHash: 1 }, unique: true },
			{ fields: { merchantId: 1 } },
			REQUEST_ID_INDEX
		]);
	},

	async started(this: This) {
		await this.keys.connect(this.logger);
	},

	async stopped(this: This) {
		await this.keys.disconnect();
	}
};

export default MerchantsService;
