/**
 * Deals at partner merchants, each under the terms its merchant had then (`merchants.dealTerms`,
 * recorded on the deal). A `save` earns its earn rate of the amount, credited by the points
 * service from a durable event. A `use` is confirmed synchronously: the deal is recorded as
 * `pending` first, `points.debit` is called under a timeout and the circuit breaker, and the deal
 * becomes `success` only with a confirmed debit. If the answer never comes, the deal fails and a
 * `deal.voided` event undoes the debit should it have happened after all. Every failed use is
 * announced as `deal.failed`, for the read models.
 *
 * A successful deal can be returned in part, several times, until all of its amount is returned
 * (`partially_cancelled`, then `cancelled`); see `cancel` for how the points of a return are reckoned.
 */
import { Errors, type Context, type Service, type ServiceSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import {
	outboxEvent,
	type DealEvent,
	type DealTerms,
	type DealReturn,
	type OutboxEvent
} from "../contracts/channels";
import { assertOwnMember, assertOwnMerchant, type CallerMeta } from "../lib/gateway/access";
import { created, type AnswerMeta } from "../lib/gateway/answers";
import { conflict, notFound, unavailable } from "../lib/errors";
import { sortableId } from "../lib/ids";
import { earnedPoints } from "../lib/rates";
import { termsView, type TermsView } from "../lib/terms";
import { assertActiveMember } from "../lib/active-member";
import { countDeal } from "../lib/ops/metrics";
import * as P from "../lib/params";
import type { Source } from "../lib/posting";
import { createdBefore, REQUEST_ID_INDEX, requestIdOf, type RequestMeta } from "../lib/request-id";
import { LOST, retryOnRace, type Lost } from "../lib/retry-on-race";
import { DbMixin, type DbThis } from "../mixins/db.mixin";
import {
	OutboxMixin,
	OUTBOX_INDEX,
	type OutboxMethods,
	type WithOutbox
} from "../mixins/outbox.mixin";
import {
	PendingMixin,
	type Outcome,
	type PendingMethods,
	type PendingSettings
} from "../mixins/pending.mixin";
import type { PostResult } from "./points.service";

export type DealType = DealEvent["type"];
export type DealStatus = "pending" | "success" | "fail" | "partially_cancelled" | "cancelled";

export interface Deal extends WithOutbox {
	memberId: string;
	merchantId: string;
	dealAmount: number;
	type: DealType;
	point: number;
	status: DealStatus;
	reason?: string;
	dealDate: string;
	/** The merchant's terms in force at `dealDate`: its points, returns and settlement lines follow them. */
	terms?: DealTerms;
	/** When the last of its amount was returned. */
	cancelledAt?: string;
	/** Its returns, oldest first, and their totals; absent until the first. */
	returns?: DealReturn[];
	returnedAmount?: number;
	returnedPoints?: number;
	/** The requests (Idempotency-Key) that created the deal and made its returns, if they had one. */
	requestId?: string;
	returnRequestIds?: string[];
}

export interface DealView extends Omit<
	Deal,
	"_id" | "outbox" | "requestId" | "returnRequestIds" | "terms"
> {
	id: string;
	terms?: TermsView;
}

interface CancelParams {
	id: string;
	/** How much of the deal's amount is returned; the whole remainder when absent. */
	amount?: number;
}

interface CreateParams {
	memberId: string;
	merchantId: string;
	dealAmount: number;
	type: DealType;
	point?: number;
}

interface Methods {
	toView(deal: Deal): DealView;
	findDeal(id: string): Promise<Deal>;
	eventOf(channel: DealChannel, deal: Deal): OutboxEvent;
	returnOnce(ctx: Context<CancelParams, CallerMeta>): Promise<Deal | Lost>;
	confirmUse(ctx: Context, deal: Deal): Promise<Deal>;
	failed(deal: Deal, reason: string): Outcome<Deal>;
	abandoned(deal: Deal): Outcome<Deal>;
	settled(deal: Deal): void;
}

/** The channels a deal's events go to (`deal.returned` has its own payload). */
type DealChannel = "deal.saved" | "deal.used" | "deal.failed" | "deal.voided" | "deal.cancelled";

/** How often a return that lost a race for its deal reads the deal again before giving up. */
const MAX_RETURN_ATTEMPTS = 20;

/** floor(points × amount / dealAmount), exact beyond 2^53 (points × amount may reach 10^19). */
const shareOf = (points: number, amount: number, dealAmount: number) =>
	Number((BigInt(points) * BigInt(amount)) / BigInt(dealAmount));

const dealEvent = (deal: Deal): DealEvent => {
	const {
		_id,
		memberId,
		merchantId,
		dealAmount,
		type,
		point,
		dealDate,
		terms,
		cancelledAt,
		reason
	} = deal;
	return {
		dealId: _id,
		memberId,
		merchantId,
		dealAmount,
		type,
		point,
		dealDate,
		...(terms ? { terms } : {}),
		...(cancelledAt ? { cancelledAt } : {}),
		...(reason ? { reason } : {})
	};
};

interface Settings extends PendingSettings {
	/** How long a call to members or merchants may take (ms). */
	callTimeoutMs: number;
}

type This = Service<Settings> & DbThis<Deal> & OutboxMethods & PendingMethods<Deal> & Methods;

const DealsService: ServiceSchema<Settings, Methods, object, This> = {
	name: "deals",
	// A use waits `pendingTimeoutMs` for its debit; a use pending twice as long was abandoned.
	mixins: [
		DbMixin("deals", [
			{ fields: { memberId: 1 } },
			{ fields: { merchantId: 1 } },
			{ fields: { status: 1 } },
			OUTBOX_INDEX,
			REQUEST_ID_INDEX
		]),
		OutboxMixin,
		PendingMixin<Deal>("dealDate"),
		ConfiguredSettings<Settings>(config => ({
			callTimeoutMs: config.callTimeoutMs
		}))
	],

	actions: {
		create: {
			rest: "POST /deals",
			summary:
				"A deal at a merchant: a save earns points, a use spends them (never beyond the balance)",
			params: {
				$$strict: true,
				memberId: P.id,
				merchantId: P.id,
				dealAmount: P.amount(P.MAX_AMOUNT),
				type: { type: "enum", values: ["save", "use"] },
				// Required for a use; a save earns what the rate gives, whatever is sent.
				point: { ...P.amount(P.MAX_POINTS), optional: true }
			},
			async handler(this: This, ctx: Context<CreateParams, RequestMeta & AnswerMeta>) {
				const { memberId, merchantId, dealAmount, type } = ctx.params;
				const answer = (deal: Deal) => created(ctx, `/api/deals/${deal._id}`, this.toView(deal));
				// A request run again (its gateway died before answering) answers the deal it made, as it stands.
				const before = await createdBefore(this.store, ctx);
				if (before) return answer(before);
				if (type === "use" && ctx.params.point == null)
					throw new Errors.ValidationError("A use deal needs 'point'", "VALIDATION_ERROR", [
						{
							type: "required",
							field: "point",
							message: "The 'point' field is required for a use deal."
						}
					]);

				const dealDate = new Date().toISOString();
				// The merchant may deal (registered, or MERCHANTS=open; not suspended), on the terms of now.
				const [, terms] = await Promise.all([
					assertActiveMember(ctx, memberId, this.settings.callTimeoutMs),
					ctx.call<DealTerms, { merchantId: string; at: string }>(
						"merchants.dealTerms",
						{ merchantId, at: dealDate },
						{ timeout: this.settings.callTimeoutMs }
					)
				]);
				const deal: Deal = {
					_id: sortableId(),
					memberId,
					merchantId,
					dealAmount,
					type,
					point:
						type === "save"
							? earnedPoints(dealAmount, terms.earnRateBp)
							: (ctx.params.point as number),
					status: type === "save" ? "success" : "pending",
					dealDate,
					terms,
					...requestIdOf(ctx)
				};
				if (
					!(await this.changeWithEvents(
						{ insert: deal },
						type === "save" ? [this.eventOf("deal.saved", deal)] : []
					))
				) {
					// Refused for its request id: the same request, running at the same time, stored its deal first.
					const racing = await createdBefore(this.store, ctx);
					if (racing) return answer(racing);
					// A ULID is never taken in practice; if it were, that must not pass for success.
					throw new Error(`Could not store a new deal: id '${deal._id}' is taken`);
				}
				if (type === "save") countDeal(this.broker, type, deal.status);
				return answer(type === "use" ? await this.confirmUse(ctx, deal) : deal);
			}
		},

		get: {
			rest: "GET /deals/:id",
			summary: "One deal",
			params: { $$strict: true, id: P.id },
			async handler(this: This, ctx: Context<{ id: string }, CallerMeta>) {
				const deal = await this.findDeal(ctx.params.id);
				assertOwnMerchant(ctx, deal.merchantId);
				assertOwnMember(ctx, deal.memberId);
				return this.toView(deal);
			}
		},

		list: {
			rest: "GET /deals",
			summary: "Deals, newest first, paged; a merchant token sees its own",
			params: { $$strict: true, memberId: P.optionalId, merchantId: P.optionalId, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ memberId?: string; merchantId?: string; page: number; pageSize: number }>
			) {
				const { page, pageSize, ...filters } = ctx.params;
				return this.store.newestFirst(filters, page, pageSize, row => this.toView(row));
			}
		},

		/**
		 * Returns `amount` of the deal (the whole remainder when absent), at once; the points follow by
		 * a durable event, so a pile of returns is accepted immediately and the point changes catch up,
		 * never lost and never twice. A return gives back — for a save, takes back — its share of the
		 * deal's points, floor(point × amount / dealAmount), except the return that completes the deal,
		 * which gives back all that remains of them: returns adding up to the deal return exactly its
		 * points. A deal returned whole at once is cancelled as before (`deal.cancelled`); a partial
		 * return, and the return of the rest after one, is `deal.returned`, each its own ledger cause.
		 */
		cancel: {
			rest: "POST /deals/:id/cancel",
			summary:
				"Return a deal, whole or in part (`amount`): a save's points are revoked, a use's restored, in proportion",
			params: { $$strict: true, id: P.id, amount: { ...P.amount(P.MAX_AMOUNT), optional: true } },
			async handler(this: This, ctx: Context<CancelParams, CallerMeta & RequestMeta>) {
				// Each attempt is conditional on the deal as read: of two racing returns one wins, and the
				// other is decided again on what the winner wrote (it may no longer fit the remainder).
				const returned = await retryOnRace(() => this.returnOnce(ctx), {
					attempts: MAX_RETURN_ATTEMPTS,
					what: `Deal '${ctx.params.id}'`,
					// Nothing was written: a 503 asks for a retry (and is not kept as an Idempotency-Key's answer).
					giveUp: message =>
						unavailable("DEAL_BUSY", `${message}; try again`, this.settings.retryAfterSeconds)
				});
				return this.toView(returned);
			}
		}
	},

	methods: {
		async confirmUse(this: This, ctx: Context, deal: Deal): Promise<Deal> {
			// Unconfirmed, the debit may still happen: `failed` undoes it.
			const result = await this.confirm(
				deal,
				timeout =>
					ctx.call<PostResult, Source & { amount: number }>(
						"points.debit",
						{
							memberId: deal.memberId,
							sourceType: "deal",
							sourceId: deal._id,
							merchantId: deal.merchantId,
							amount: deal.point
						},
						{ timeout }
					),
				"POINTS_UNAVAILABLE",
				"Points cannot be confirmed right now; try again later"
			);
			if (result.applied)
				return this.settle(deal, {
					changes: { status: "success" },
					events: [this.eventOf("deal.used", deal)]
				});
			return this.settle(deal, {
				changes: { status: "fail", reason: result.reason },
				events: [this.eventOf("deal.failed", { ...deal, reason: result.reason })]
			});
		},

		/** A use whose debit is unconfirmed fails, and `deal.voided` undoes the debit should it have happened. */
		failed(this: This, deal: Deal, reason: string): Outcome<Deal> {
			const failed = { ...deal, status: "fail" as const, reason };
			return {
				changes: { status: "fail", reason },
				events: [this.eventOf("deal.voided", failed), this.eventOf("deal.failed", failed)]
			};
		},

		/** A use reached its outcome: counted by type and status. */
		settled(this: This, deal: Deal) {
			countDeal(this.broker, deal.type, deal.status);
		},

		/** A use left pending by an instance that died waiting for its debit. */
		abandoned(this: This, deal: Deal): Outcome<Deal> {
			return this.failed(deal, "INTERRUPTED");
		},

		eventOf(channel: DealChannel, deal: Deal): OutboxEvent {
			return outboxEvent<DealChannel>(channel, dealEvent(deal));
		},

		/** One attempt at a return: the deal after it, or LOST when the deal changed meanwhile. */
		async returnOnce(
			this: This,
			ctx: Context<CancelParams, CallerMeta & RequestMeta>
		): Promise<Deal | Lost> {
			const deal = await this.findDeal(ctx.params.id);
			assertOwnMerchant(ctx, deal.merchantId);
			const { requestId } = requestIdOf(ctx);
			// A request run again (its gateway died before answering) answers the deal its return left.
			if (requestId && deal.returnRequestIds?.includes(requestId)) return deal;
			if (deal.status === "cancelled")
				throw conflict("DEAL_ALREADY_CANCELLED", `Deal '${deal._id}' is already cancelled`, {
					id: deal._id
				});
			if (deal.status !== "success" && deal.status !== "partially_cancelled")
				throw conflict(
					"DEAL_NOT_CANCELLABLE",
					`Deal '${deal._id}' is '${deal.status}' and cannot be cancelled`,
					{
						id: deal._id,
						status: deal.status
					}
				);
			const returns = deal.returns ?? [];
			const returnedAmount = deal.returnedAmount ?? 0;
			const returnedPoints = deal.returnedPoints ?? 0;
			const remainder = deal.dealAmount - returnedAmount;
			const amount = ctx.params.amount ?? remainder;
			if (amount > remainder)
				throw conflict(
					"RETURN_EXCEEDS_REMAINDER",
					`Deal '${deal._id}' has ${remainder} left to return, not ${amount}`,
					{
						id: deal._id,
						amount,
						remainder
					}
				);

			const completes = amount === remainder;
			const at = new Date().toISOString();
			const ret: DealReturn = {
				n: returns.length + 1,
				amount,
				points: completes
					? deal.point - returnedPoints
					: shareOf(deal.point, amount, deal.dealAmount),
				at
			};
			const returnedDeal: Deal = {
				...deal,
				status: completes ? "cancelled" : "partially_cancelled",
				...(completes ? { cancelledAt: at } : {}),
				returns: [...returns, ret],
				returnedAmount: returnedAmount + amount,
				returnedPoints: returnedPoints + ret.points
			};
			const { status, cancelledAt } = returnedDeal;
			const event =
				returns.length === 0 && completes
					? this.eventOf("deal.cancelled", returnedDeal)
					: outboxEvent("deal.returned", {
							...dealEvent(returnedDeal),
							return: ret,
							returnedAmount: returnedAmount + amount,
							returnedPoints: returnedPoints + ret.points,
							status: completes ? "cancelled" : "partially_cancelled"
						});
			// The returned amount only grows: conditioned on it, the write fails if another return came first.
			const change = {
				filter: {
					_id: deal._id,
					status: deal.status,
					returnedAmount: deal.returnedAmount ?? { $exists: false }
				},
				update: {
					$set: {
						status,
						returns: returnedDeal.returns,
						returnedAmount: returnedDeal.returnedAmount,
						returnedPoints: returnedDeal.returnedPoints,
						...(cancelledAt ? { cancelledAt } : {}),
						...(requestId
							? { returnRequestIds: [...(deal.returnRequestIds ?? []), requestId] }
							: {})
					}
				}
			};
			return (await this.changeWithEvents(change, [event])) ? returnedDeal : LOST;
		},

		async findDeal(this: This, id: string): Promise<Deal> {
			const deal = await this.store.findById(id);
			if (!deal) throw notFound("DEAL_NOT_FOUND", `Deal '${id}' not found`, { id });
			return deal;
		},

		toView(deal: Deal): DealView {
			const {
				_id,
				outbox: _outbox,
				requestId: _request,
				returnRequestIds: _returnRequests,
				terms,
				...rest
			} = deal;
			return { id: _id, ...rest, ...(terms ? { terms: termsView(terms) } : {}) };
		}
	}
};

export default DealsService;
