/**
 * Webhooks: partners' (and staff's) HTTP endpoints told of OnePoint's events, as the Standard
 * Webhooks specification has it (lib/webhooks/delivery.ts): deals made and returned, settlements
 * made final, members joining, points about to expire. Staff may subscribe to every event, a
 * merchant's webhook gets only its own merchant's (`WEBHOOK_EVENTS`).
 *
 * Events come from the durable channels (consumer group `webhooks`). Each event becomes one delivery
 * per matching webhook, in this service's own store: a durable queue, keyed by the event and the
 * webhook (`eventKey`), so a channel message handled twice queues nothing twice. The delivery's id
 * is its `webhook-id`, the same on every attempt.
 *
 * Every instance runs a dispatcher: it claims the deliveries that are due with one conditional write
 * each (a claim token and a lease: of two instances one wins; a dead instance's claims come due
 * again when their lease ends) and sends them without waiting for one another, at most a few at a
 * time per webhook, so a slow or dead endpoint holds up only its own deliveries. A 2xx delivers; a
 * timeout, a network error, a refused address or another status is retried after the waits of
 * WEBHOOK_RETRY_SCHEDULE (with jitter), then the delivery has failed. Nothing here is on a request's
 * path: a deal never waits for a partner.
 *
 * Secrets are stored (they sign every delivery) and shown once, when made; never logged. A rotation
 * keeps signing with the previous secret too, for 24 hours.
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { consume, type DealEvent } from "../contracts/channels";
import { clientError, conflict, notFound, unavailable } from "../lib/errors";
import { created, type AnswerMeta } from "../lib/gateway/answers";
import { assertOwnMerchant, type CallerMeta } from "../lib/gateway/access";
import { sortableId } from "../lib/ids";
import * as P from "../lib/params";
import { createdBefore, REQUEST_ID_INDEX, requestIdOf, type RequestMeta } from "../lib/request-id";
import { onScrape, SERIES } from "../lib/ops/metrics";
import { LOST, retryOnRace } from "../lib/retry-on-race";
import { termsView } from "../lib/terms";
import { delivered, newSecret, retryDelay, send, type Outcome } from "../lib/webhooks/delivery";
import { checkUrl, RefusedUrl, type AddressPolicy } from "../lib/webhooks/ssrf";
import { DbMixin, openCollection, type Collection, type DbThis } from "../mixins/db.mixin";

/** The events a webhook may subscribe to, and whose they are: a merchant's, or staff's only. */
export const WEBHOOK_EVENTS = {
	"deal.created": "merchant",
	"deal.returned": "merchant",
	"settlement.final": "merchant",
	"member.joined": "staff",
	"points.expiring": "staff"
} as const;

export type WebhookEvent = keyof typeof WEBHOOK_EVENTS;

const KNOWN_EVENTS = Object.keys(WEBHOOK_EVENTS) as WebhookEvent[];
const MERCHANT_EVENTS = KNOWN_EVENTS.filter(event => WEBHOOK_EVENTS[event] === "merchant");

/** A merchant's webhooks, and staff's webhooks for every merchant, at most. */
export const MAX_WEBHOOKS = 16;

/** How long a rotated secret still signs (ms). */
const PREVIOUS_SECRET_MS = 24 * 3_600_000;

export interface Webhook {
	/** The webhookId. */
	_id: string;
	url: string;
	events: WebhookEvent[];
	/** Whose events it gets: a merchant's, or every merchant's (null, staff only). */
	merchantId: string | null;
	secret: string;
	/** The secret before the latest rotation, signing too until `previousUntil`. */
	previousSecret?: string;
	previousUntil?: string;
	createdAt: string;
	rotatedAt?: string;
	/** The request (Idempotency-Key) that created it, and the one of its latest rotation. */
	requestId?: string;
	rotationRequestId?: string;
}

export interface WebhookView {
	webhookId: string;
	url: string;
	events: WebhookEvent[];
	merchantId: string | null;
	status: "enabled" | "deleted";
	createdAt: string;
	rotatedAt?: string;
	/** Until when deliveries are also signed with the secret before the latest rotation. */
	previousSecretUntil?: string;
}

export interface Delivery {
	/** `msg_<ULID>`: the `webhook-id` of every attempt. */
	_id: string;
	webhookId: string;
	/** `<webhookId>:<type>:<the event's own key>`: unique, so an event handled twice is queued once. */
	eventKey: string;
	type: WebhookEvent;
	/** When the event happened: the body's `timestamp`. */
	timestamp: string;
	data: object;
	status: "pending" | "sending" | "delivered" | "failed";
	attempts: number;
	/** The attempts before its latest replay: the retry schedule counts from there. */
	replayedAfter?: number;
	/** When it is due: its next attempt, or the end of the lease of the attempt under way. Absent once delivered or failed. */
	nextAttemptAt?: string;
	/** The latest claim (a ULID): an attempt records its outcome only over its own claim. */
	claim?: string;
	lastStatus?: Outcome;
	lastAttemptAt?: string;
	createdAt: string;
	deliveredAt?: string;
}

export interface DeliveryView {
	deliveryId: string;
	webhookId: string;
	type: WebhookEvent;
	timestamp: string;
	status: Delivery["status"];
	attempts: number;
	lastStatus?: Outcome;
	lastAttemptAt?: string;
	nextAttemptAt?: string;
	createdAt: string;
	deliveredAt?: string;
}

interface Settings {
	/** How long an endpoint may take to answer (WEBHOOK_TIMEOUT_MS). */
	timeoutMs: number;
	/** The waits before each retry (WEBHOOK_RETRY_SCHEDULE, ms). */
	retryScheduleMs: number[];
	/** What a URL may be and reach (production; WEBHOOK_ALLOW_PRIVATE). */
	addresses: AddressPolicy;
	/** How often the dispatcher looks for deliveries that came due (ms). */
	pollMs: number;
	/** Deliveries this instance sends at once, in all and to one webhook. */
	maxInFlight: number;
	maxInFlightPerWebhook: number;
	/** What a 503 asks the client to wait (s). */
	retryAfterSeconds: number;
}

/** An event as the webhooks that subscribe to it are told of it. */
interface WebhookEventOf {
	type: WebhookEvent;
	/** What makes it this event and no other: with the type and the webhook, the delivery's `eventKey`. */
	key: string;
	timestamp: string;
	data: object;
	/** The merchant it belongs to: its webhooks and staff's get it. None: staff's only. */
	merchantId?: string;
}

interface Methods {
	fanOut(event: WebhookEventOf): Promise<void>;
	findWebhook(ctx: Context<unknown, CallerMeta>, webhookId: string): Promise<Webhook>;
	checkEvents(events: string[], merchantId: string | null): WebhookEvent[];
	reissue(
		ctx: Context<unknown, AnswerMeta>,
		webhook: Webhook
	): Promise<WebhookView & { secret: string }>;
	dispatch(): Promise<void>;
	claimDue(): Promise<number>;
	attempt(delivery: Delivery): Promise<void>;
	secretsOf(webhook: Webhook, at: Date): string[];
	now(): Date;
	toView(webhook: Webhook): WebhookView;
	deliveryView(delivery: Delivery): DeliveryView;
}

type This = Service<Settings> &
	DbThis<Webhook> &
	Methods & {
		deliveries: Collection<Delivery>;
		/** Takes back the gauge when the service stops. */
		scrape?: () => void;
		/** Attempts under way here, in all and by webhook. */
		sending: Set<Promise<void>>;
		sendingTo: Map<string, number>;
		/** The dispatcher's run under way, and whether another was asked for meanwhile. */
		dispatching?: Promise<void>;
		dispatchAgain: boolean;
		stopping: boolean;
		pollTimer?: NodeJS.Timeout;
	};

/** An answer holding a secret: not kept for an Idempotency-Key (a retry runs again). */
type SecretMeta = AnswerMeta &
	RequestMeta &
	CallerMeta & { $responseHeaders?: Record<string, string> };

const NO_STORE = { "Cache-Control": "no-store" };

/** How much longer than its timeout an attempt holds its claim: then another may take it. */
const LEASE_MARGIN_MS = 5000;

/** What a deal's webhook events carry of it. */
const dealData = (deal: DealEvent) => ({
	dealId: deal.dealId,
	memberId: deal.memberId,
	merchantId: deal.merchantId,
	type: deal.type,
	dealAmount: deal.dealAmount,
	point: deal.point,
	dealDate: deal.dealDate,
	...(deal.terms ? { terms: termsView(deal.terms) } : {})
});

const dealCreated = (deal: DealEvent): WebhookEventOf => ({
	type: "deal.created",
	key: deal.dealId,
	timestamp: deal.dealDate,
	data: { ...dealData(deal), status: "success" },
	merchantId: deal.merchantId
});

const WebhooksService: ServiceSchema<Settings, Methods, object, This> = {
	name: "webhooks",
	mixins: [
		// Few documents, read whole: no index but the request's.
		DbMixin("webhooks", [REQUEST_ID_INDEX]),
		ConfiguredSettings<Settings>(config => ({
			timeoutMs: config.webhookTimeoutMs,
			retryScheduleMs: config.webhookRetryScheduleMs,
			addresses: {
				requireHttps: config.nodeEnv === "production",
				blockPrivate: config.nodeEnv === "production" && !config.webhookAllowPrivate
			},
			pollMs: 1000,
			maxInFlight: 64,
			maxInFlightPerWebhook: 4,
			retryAfterSeconds: config.retryAfterSeconds
		}))
	],

	actions: {
		/**
		 * A new webhook; its secret is in this answer only (`Cache-Control: no-store`, so not kept for
		 * an Idempotency-Key). A retry under the same key answers the webhook the first run made, with a
		 * new secret replacing the one that answer may never have delivered.
		 */
		create: {
			rest: "POST /webhooks",
			summary: `Subscribe an endpoint (https in production) to events (${KNOWN_EVENTS.join(", ")}); its signing secret is shown once, in this answer`,
			params: {
				$$strict: true,
				url: { type: "string", trim: true, min: 1, max: 2048 },
				events: {
					type: "array",
					items: { type: "string", min: 1, max: 64 },
					min: 1,
					max: KNOWN_EVENTS.length
				},
				merchantId: P.optionalId
			},
			async handler(
				this: This,
				ctx: Context<{ url: string; events: string[]; merchantId?: string }, SecretMeta>
			) {
				const before = await createdBefore(this.store, ctx);
				if (before) return this.reissue(ctx, before);
				const merchantId = ctx.params.merchantId ?? null;
				let url: URL;
				try {
					url = checkUrl(ctx.params.url, this.settings.addresses);
				} catch (err) {
					if (!(err instanceof RefusedUrl)) throw err;
					throw clientError(422, err.code, err.message, { url: ctx.params.url });
				}
				const events = this.checkEvents(ctx.params.events, merchantId);
				const limitExceeded = () =>
					conflict(
						"WEBHOOK_LIMIT_EXCEEDED",
						`At most ${MAX_WEBHOOKS} webhooks ${merchantId === null ? "for every merchant" : "per merchant"}: delete one first`,
						{ merchantId, max: MAX_WEBHOOKS }
					);
				if ((await this.store.count({ merchantId })) >= MAX_WEBHOOKS) throw limitExceeded();
				const webhook: Webhook = {
					_id: `wh_${sortableId()}`,
					url: url.href,
					events,
					merchantId,
					secret: newSecret(),
					createdAt: this.now().toISOString(),
					...requestIdOf(ctx)
				};
				if (!(await this.store.insertUnique(webhook))) {
					const racing = await createdBefore(this.store, ctx);
					if (racing) return this.reissue(ctx, racing);
					// Its id was taken (a ULID: as good as never). Nothing was written.
					throw unavailable("WEBHOOK_BUSY", "Try again", this.settings.retryAfterSeconds);
				}
				// Two creations at once may both have counted 15: the later one (ids sort by time) is taken back.
				const first = await this.store.find({
					query: { merchantId },
					sort: ["_id"],
					limit: MAX_WEBHOOKS
				});
				if (!first.some(w => w._id === webhook._id)) {
					await this.store.remove({ _id: webhook._id });
					throw limitExceeded();
				}
				ctx.meta.$responseHeaders = NO_STORE;
				return created(ctx, `/api/webhooks/${webhook._id}`, {
					...this.toView(webhook),
					secret: webhook.secret
				});
			}
		},

		list: {
			rest: "GET /webhooks",
			summary: "The webhooks, newest first (a merchant's token: its own), without their secrets",
			params: { $$strict: true, merchantId: P.optionalId, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ merchantId?: string; page: number; pageSize: number }>
			) {
				const { merchantId, page, pageSize } = ctx.params;
				return this.store.newestFirst({ merchantId }, page, pageSize, w => this.toView(w));
			}
		},

		get: {
			rest: "GET /webhooks/:webhookId",
			summary: "A webhook: its URL, events and merchant, without its secret",
			params: { $$strict: true, webhookId: P.id },
			async handler(this: This, ctx: Context<{ webhookId: string }, CallerMeta>) {
				return this.toView(await this.findWebhook(ctx, ctx.params.webhookId));
			}
		},

		/** Deletes the webhook and its deliveries: nothing more is sent to it, not even what was due. */
		delete: {
			rest: "DELETE /webhooks/:webhookId",
			summary: "Delete a webhook: nothing more is sent to it, and its deliveries are gone",
			params: { $$strict: true, webhookId: P.id },
			async handler(this: This, ctx: Context<{ webhookId: string }, CallerMeta>) {
				const webhook = await this.findWebhook(ctx, ctx.params.webhookId);
				await this.store.remove({ _id: webhook._id });
				// Left by a crash in between, they are dropped by the dispatcher when they come due.
				await this.deliveries.remove({ webhookId: webhook._id });
				return { ...this.toView(webhook), status: "deleted" };
			}
		},

		/**
		 * A new secret, shown once (`Cache-Control: no-store`); deliveries are signed by the previous
		 * one too for 24 hours, so the receiver can switch without losing any. A retry under the same
		 * Idempotency-Key replaces the secret the first run made, and keeps the one before it.
		 */
		rotateSecret: {
			rest: "POST /webhooks/:webhookId/rotate-secret",
			summary:
				"A new signing secret, shown once; for 24 hours deliveries are signed by the previous one too",
			params: { $$strict: true, webhookId: P.id },
			async handler(this: This, ctx: Context<{ webhookId: string }, SecretMeta>) {
				const { requestId } = requestIdOf(ctx);
				const rotated = await retryOnRace(
					async () => {
						const webhook = await this.findWebhook(ctx, ctx.params.webhookId);
						const now = this.now();
						const secret = newSecret();
						const rerun = requestId !== undefined && webhook.rotationRequestId === requestId;
						const change: Partial<Webhook> = rerun
							? { secret }
							: {
									secret,
									previousSecret: webhook.secret,
									previousUntil: new Date(now.getTime() + PREVIOUS_SECRET_MS).toISOString(),
									rotatedAt: now.toISOString(),
									...(requestId ? { rotationRequestId: requestId } : {})
								};
						const written = await this.store.update(
							{ _id: webhook._id, secret: webhook.secret },
							{ $set: change }
						);
						return written ? { ...webhook, ...change } : LOST;
					},
					{
						attempts: 5,
						what: `Webhook '${ctx.params.webhookId}'`,
						giveUp: message =>
							unavailable("WEBHOOK_BUSY", `${message}; try again`, this.settings.retryAfterSeconds)
					}
				);
				ctx.meta.$responseHeaders = NO_STORE;
				return { ...this.toView(rotated), secret: rotated.secret };
			}
		},

		deliveries: {
			rest: "GET /webhooks/:webhookId/deliveries",
			summary:
				"A webhook's deliveries, newest first: status, attempts, the last answer (HTTP status, TIMEOUT, NETWORK or BLOCKED_ADDRESS) and when",
			params: {
				$$strict: true,
				webhookId: P.id,
				status: {
					type: "enum",
					values: ["pending", "sending", "delivered", "failed"],
					optional: true
				},
				...P.paging
			},
			async handler(
				this: This,
				ctx: Context<
					{ webhookId: string; status?: Delivery["status"]; page: number; pageSize: number },
					CallerMeta
				>
			) {
				const { webhookId, status, page, pageSize } = ctx.params;
				await this.findWebhook(ctx, webhookId);
				return this.deliveries.newestFirst({ webhookId, status }, page, pageSize, d =>
					this.deliveryView(d)
				);
			}
		},

		/** Sends a delivered or failed delivery again, with the same `webhook-id`, on a fresh schedule. */
		replay: {
			rest: "POST /webhooks/:webhookId/deliveries/:deliveryId/replay",
			summary:
				"Send a delivered or failed delivery again, with the same webhook-id, retried on a fresh schedule",
			params: { $$strict: true, webhookId: P.id, deliveryId: P.id },
			async handler(
				this: This,
				ctx: Context<{ webhookId: string; deliveryId: string }, CallerMeta & AnswerMeta>
			) {
				const { webhookId, deliveryId } = ctx.params;
				await this.findWebhook(ctx, webhookId);
				const delivery = await this.deliveries.findById(deliveryId);
				if (!delivery || delivery.webhookId !== webhookId)
					throw notFound(
						"DELIVERY_NOT_FOUND",
						`Webhook '${webhookId}' has no delivery '${deliveryId}'`,
						{ webhookId, deliveryId }
					);
				const nextAttemptAt = this.now().toISOString();
				const replayed =
					(delivery.status === "delivered" || delivery.status === "failed") &&
					(await this.deliveries.update(
						{ _id: deliveryId, status: delivery.status, attempts: delivery.attempts },
						{
							$set: { status: "pending", nextAttemptAt, replayedAfter: delivery.attempts },
							$unset: { deliveredAt: true }
						}
					));
				if (!replayed)
					throw conflict(
						"DELIVERY_PENDING",
						`Delivery '${deliveryId}' is still being sent: replay it once delivered or failed`,
						{ deliveryId, status: delivery.status }
					);
				void this.dispatch();
				ctx.meta.$statusCode = 202;
				const { deliveredAt: _deliveredAt, ...rest } = delivery;
				return this.deliveryView({ ...rest, status: "pending", nextAttemptAt });
			}
		}
	},

	channels: consume<This>("webhooks", {
		async "deal.saved"(deal) {
			await this.fanOut(dealCreated(deal));
		},
		async "deal.used"(deal) {
			await this.fanOut(dealCreated(deal));
		},
		/** Returned whole at once: as a return of all of it. */
		async "deal.cancelled"(deal) {
			await this.fanOut({
				type: "deal.returned",
				key: `${deal.dealId}:whole`,
				timestamp: deal.cancelledAt ?? deal.dealDate,
				data: {
					...dealData(deal),
					status: "cancelled",
					returnedAmount: deal.dealAmount,
					returnedPoints: deal.point,
					...(deal.cancelledAt ? { cancelledAt: deal.cancelledAt } : {})
				},
				merchantId: deal.merchantId
			});
		},
		async "deal.returned"(deal) {
			await this.fanOut({
				type: "deal.returned",
				key: `${deal.dealId}:${deal.return.n}`,
				timestamp: deal.return.at,
				data: {
					...dealData(deal),
					status: deal.status,
					return: deal.return,
					returnedAmount: deal.returnedAmount,
					returnedPoints: deal.returnedPoints
				},
				merchantId: deal.merchantId
			});
		},
		async "settlement.finalized"(settlement) {
			await this.fanOut({
				type: "settlement.final",
				key: settlement.settlementId,
				timestamp: settlement.settledAt,
				data: { ...settlement, status: "final" },
				merchantId: settlement.merchantId
			});
		},
		/** Without the member's name: a webhook's receiver learns only what it needs. */
		async "member.joined"(member) {
			await this.fanOut({
				type: "member.joined",
				key: member.memberId,
				timestamp: member.joinedAt,
				data: { memberId: member.memberId, joinedAt: member.joinedAt }
			});
		},
		async "points.expiring"(expiring) {
			const { at, ...data } = expiring;
			await this.fanOut({
				type: "points.expiring",
				key: `${expiring.memberId}:${expiring.month}`,
				timestamp: at,
				data
			});
		}
	}),

	methods: {
		now: () => new Date(),

		/** Queues the event for every webhook that subscribes to it, once per webhook whatever redelivers it. */
		async fanOut(this: This, event: WebhookEventOf) {
			const { type, key, timestamp, data, merchantId } = event;
			const webhooks = await this.store.find({
				query: { events: type, merchantId: merchantId ? { $in: [null, merchantId] } : null }
			});
			const createdAt = this.now().toISOString();
			for (const webhook of webhooks)
				await this.deliveries.insertUnique({
					_id: `msg_${sortableId()}`,
					webhookId: webhook._id,
					eventKey: `${webhook._id}:${type}:${key}`,
					type,
					timestamp,
					data,
					status: "pending",
					attempts: 0,
					nextAttemptAt: createdAt,
					createdAt
				});
			if (webhooks.length) void this.dispatch();
		},

		/** Sends what is due, until nothing more can be claimed; one run at a time, another after it if asked meanwhile. */
		dispatch(this: This) {
			if (this.dispatching) {
				this.dispatchAgain = true;
				return this.dispatching;
			}
			const run = async () => {
				do {
					this.dispatchAgain = false;
					while ((await this.claimDue()) > 0);
				} while (this.dispatchAgain && !this.stopping);
			};
			this.dispatching = run()
				.catch(err =>
					this.logger.warn(
						"Webhook dispatch failed; again at the next poll:",
						(err as Error).message
					)
				)
				.finally(() => (this.dispatching = undefined));
			return this.dispatching;
		},

		/**
		 * Claims due deliveries of the webhooks that have room (a webhook already at its limit is not even
		 * read, so its backlog never hides another's) and starts their attempts; how many it claimed.
		 */
		async claimDue(this: This) {
			const { maxInFlight, maxInFlightPerWebhook, timeoutMs } = this.settings;
			if (this.stopping || this.sending.size >= maxInFlight) return 0;
			const full = [...this.sendingTo]
				.filter(([, n]) => n >= maxInFlightPerWebhook)
				.map(([id]) => id);
			const now = this.now();
			const due = await this.deliveries.find({
				query: {
					nextAttemptAt: { $lte: now.toISOString() },
					...(full.length ? { webhookId: { $nin: full } } : {})
				},
				sort: ["nextAttemptAt"],
				limit: maxInFlight - this.sending.size
			});
			let claimed = 0;
			for (const delivery of due) {
				const { webhookId } = delivery;
				if (this.stopping || this.sending.size >= maxInFlight) break;
				if ((this.sendingTo.get(webhookId) ?? 0) >= maxInFlightPerWebhook) continue;
				const claim = sortableId();
				const leaseEnd = new Date(now.getTime() + timeoutMs + LEASE_MARGIN_MS).toISOString();
				const taken = await this.deliveries.update(
					{
						_id: delivery._id,
						nextAttemptAt: delivery.nextAttemptAt,
						claim: delivery.claim ?? { $exists: false }
					},
					{ $set: { status: "sending", nextAttemptAt: leaseEnd, claim }, $inc: { attempts: 1 } }
				);
				if (!taken) continue;
				claimed++;
				this.sendingTo.set(webhookId, (this.sendingTo.get(webhookId) ?? 0) + 1);
				const attempt = this.attempt({ ...delivery, claim, attempts: delivery.attempts + 1 })
					.catch(err =>
						// Its lease runs out, and it is sent again.
						this.logger.warn(`Delivery ${delivery._id} not recorded:`, (err as Error).message)
					)
					.finally(() => {
						this.sending.delete(attempt);
						const left = (this.sendingTo.get(webhookId) ?? 1) - 1;
						if (left > 0) this.sendingTo.set(webhookId, left);
						else this.sendingTo.delete(webhookId);
						void this.dispatch();
					});
				this.sending.add(attempt);
			}
			return claimed;
		},

		/** One attempt of a claimed delivery, and its outcome recorded over the claim. */
		async attempt(this: This, delivery: Delivery) {
			const webhook = await this.store.findById(delivery.webhookId);
			// Its webhook was deleted meanwhile.
			if (!webhook) {
				await this.deliveries.remove({ _id: delivery._id, claim: delivery.claim });
				return;
			}
			const at = this.now();
			const body = JSON.stringify({
				type: delivery.type,
				timestamp: delivery.timestamp,
				data: delivery.data
			});
			const outcome = await send(
				new URL(webhook.url),
				{ id: delivery._id, at, body, secrets: this.secretsOf(webhook, at) },
				this.settings.addresses,
				this.settings.timeoutMs
			);
			const now = this.now();
			const attempted = { lastStatus: outcome, lastAttemptAt: at.toISOString() };
			const retry = retryDelay(
				this.settings.retryScheduleMs,
				delivery.attempts - (delivery.replayedAfter ?? 0)
			);
			const update = delivered(outcome)
				? {
						$set: { ...attempted, status: "delivered", deliveredAt: now.toISOString() },
						$unset: { nextAttemptAt: true }
					}
				: retry === undefined
					? { $set: { ...attempted, status: "failed" }, $unset: { nextAttemptAt: true } }
					: {
							$set: {
								...attempted,
								status: "pending",
								nextAttemptAt: new Date(now.getTime() + retry).toISOString()
							}
						};
			await this.deliveries.update({ _id: delivery._id, claim: delivery.claim }, update);
			if (!delivered(outcome))
				this.logger.debug(`Delivery ${delivery._id} to webhook ${webhook._id}: ${outcome}`);
		},

		/** The current secret, and the previous one while it still signs. */
		secretsOf(webhook: Webhook, at: Date) {
			const { secret, previousSecret, previousUntil } = webhook;
			return previousSecret && previousUntil && previousUntil > at.toISOString()
				? [secret, previousSecret]
				: [secret];
		},

		/** The events as given, once each, if the webhook may have them: 422 UNKNOWN_EVENT, EVENT_NOT_FOR_MERCHANT. */
		checkEvents(events: string[], merchantId: string | null): WebhookEvent[] {
			const unknown = events.filter(event => !(event in WEBHOOK_EVENTS));
			if (unknown.length)
				throw clientError(422, "UNKNOWN_EVENT", `Unknown event(s): ${unknown.join(", ")}`, {
					unknown,
					known: KNOWN_EVENTS
				});
			const known = [...new Set(events)] as WebhookEvent[];
			const staffOnly = known.filter(event => WEBHOOK_EVENTS[event] === "staff");
			if (merchantId !== null && staffOnly.length)
				throw clientError(
					422,
					"EVENT_NOT_FOR_MERCHANT",
					`A merchant's webhook cannot have ${staffOnly.join(", ")}: they belong to no merchant`,
					{ events: staffOnly, allowed: MERCHANT_EVENTS }
				);
			return known;
		},

		/** A webhook created by a request that ran before: answered again, with a new secret. */
		async reissue(this: This, ctx: Context<unknown, SecretMeta>, webhook: Webhook) {
			const secret = newSecret();
			await this.store.update({ _id: webhook._id }, { $set: { secret } });
			ctx.meta.$responseHeaders = NO_STORE;
			return created(ctx, `/api/webhooks/${webhook._id}`, { ...this.toView(webhook), secret });
		},

		/** The webhook, if it exists and is the caller's to see: 404 WEBHOOK_NOT_FOUND, 403 for another merchant's. */
		async findWebhook(this: This, ctx: Context<unknown, CallerMeta>, webhookId: string) {
			const webhook = await this.store.findById(webhookId);
			if (!webhook) throw notFound("WEBHOOK_NOT_FOUND", `No webhook '${webhookId}'`, { webhookId });
			assertOwnMerchant(ctx, webhook.merchantId ?? undefined);
			return webhook;
		},

		toView(this: This, webhook: Webhook): WebhookView {
			const { _id, url, events, merchantId, createdAt, rotatedAt, previousUntil } = webhook;
			return {
				webhookId: _id,
				url,
				events,
				merchantId,
				status: "enabled",
				createdAt,
				...(rotatedAt ? { rotatedAt } : {}),
				...(previousUntil && previousUntil > this.now().toISOString()
					? { previousSecretUntil: previousUntil }
					: {})
			};
		},

		deliveryView(delivery: Delivery): DeliveryView {
			const { _id, webhookId, type, timestamp, status, attempts, createdAt } = delivery;
			const { lastStatus, lastAttemptAt, nextAttemptAt, deliveredAt } = delivery;
			return {
				deliveryId: _id,
				webhookId,
				type,
				timestamp,
				status,
				attempts,
				...(lastStatus === undefined ? {} : { lastStatus }),
				...(lastAttemptAt ? { lastAttemptAt } : {}),
				...(status === "pending" && nextAttemptAt ? { nextAttemptAt } : {}),
				createdAt,
				...(deliveredAt ? { deliveredAt } : {})
			};
		}
	},

	created(this: This) {
		this.deliveries = openCollection<Delivery>(this, "webhook-deliveries", [
			{ fields: { eventKey: 1 }, unique: true },
			// Only the deliveries still to send have it: the dispatcher's query reads those alone.
			{ fields: { nextAttemptAt: 1 }, sparse: true },
			{ fields: { webhookId: 1, _id: -1 } }
		]);
		this.sending = new Set();
		this.sendingTo = new Map();
		this.dispatchAgain = false;
	},

	async started(this: This) {
		this.stopping = false;
		await this.deliveries.connect(this.logger);
		this.pollTimer = setInterval(() => void this.dispatch(), this.settings.pollMs);
		void this.dispatch();
		// Pending: still to be sent (an attempt under way too); failed: given up after the last retry.
		this.scrape = onScrape(this.broker, async () => {
			const [pending, failed] = await Promise.all([
				this.deliveries.count({ status: { $in: ["pending", "sending"] } }),
				this.deliveries.count({ status: "failed" })
			]);
			return [
				{ name: SERIES.webhookDeliveries, labels: { status: "pending" }, value: pending },
				{ name: SERIES.webhookDeliveries, labels: { status: "failed" }, value: failed }
			];
		});
	},

	async stopped(this: This) {
		this.stopping = true;
		clearInterval(this.pollTimer);
		this.scrape?.();
		// Attempts under way end within their timeout; their outcomes are recorded before the store closes.
		await this.dispatching;
		await Promise.all(this.sending);
		await this.deliveries.disconnect();
	}
};

export default WebhooksService;
