/**
 * The durable channels between OnePoint's services (@moleculer/channels): each channel's name and
 * the payload its producer sends. Producers build their events with `outboxEvent(channel, payload)`
 * and consumers declare their handlers with `consume(group, handlers)`, both typed from `Channels`:
 * a payload that changes breaks the build where it is produced and wherever it is consumed.
 */
import type { ServiceSchema } from "moleculer";
import { sortableId } from "../lib/ids";

/**
 * The merchant's contract terms a deal was made under, recorded on the deal: in basis points
 * (1/10000), what a save earns per unit of its amount, the share of redeemed points the coalition
 * keeps as its fee, and what the merchant pays per point it issues; and how many days a save's
 * points are held before they can be spent (its return window; absent on deals from before it).
 */
export interface DealTerms {
	earnRateBp: number;
	redemptionFeeBp: number;
	pointPriceBp: number;
	holdDays?: number;
}

/** A deal as its events carry it (`deal.*`). */
export interface DealEvent {
	dealId: string;
	memberId: string;
	merchantId: string;
	dealAmount: number;
	type: "save" | "use";
	point: number;
	dealDate: string;
	cancelledAt?: string;
	/** Absent on deals made before terms were recorded: those were made on the node's defaults. */
	terms?: DealTerms;
	/** Why a use failed (`deal.failed`, `deal.voided`). */
	reason?: string;
}

/** One return of (part of) a deal: how much of its amount, and the points it gives back or takes back. */
export interface DealReturn {
	/** 1, 2, …: the deal's returns in order; with the deal's id, the ledger cause `deal-return:<dealId>:<n>`. */
	n: number;
	amount: number;
	points: number;
	at: string;
}

/** A partial return (`deal.returned`): the deal, this return, and the deal's totals after it. */
export interface DealReturnedEvent extends DealEvent {
	return: DealReturn;
	returnedAmount: number;
	returnedPoints: number;
	/** `cancelled` when this return completes the deal. */
	status: "partially_cancelled" | "cancelled";
}

/**
 * The tier bonus a save keeps after its returns so far (`deal.bonus`): funded by the coalition, shown
 * on the merchant's statement, never billed to it. Only shrinks, as returns take their shares.
 */
export interface DealBonusEvent {
	dealId: string;
	merchantId: string;
	memberId: string;
	dealDate: string;
	bonusPoints: number;
}

/** An order as its events carry it (`order.*`). */
export interface OrderEvent {
	orderId: string;
	memberId: string;
	productId: string;
	qty: number;
	unitPrice: number;
	totalPrice: number;
	/** The share of the total earned as points. */
	rate: number;
	/** What the order earns: 0 unless it was paid. */
	points: number;
	paidAt?: string;
	cancelledAt?: string;
}

export type EntryKind =
	| "earn"
	| "use"
	| "restore"
	| "revoke"
	| "expire"
	| "adjust"
	| "void"
	| "release"
	| "bonus"
	| "tier"
	| "transfer"
	| "import";

/** One ledger entry as `points.posted` carries it, named by its cause. */
export interface PostedEntry {
	/** `deal:<id>`, `deal-cancel:<id>`, `deal-return:<id>:<n>`, `order:<id>`, `expiry:<memberId>`, `expire:<memberId>:<YYYYMM>`, `adjustment:<id>`, `transfer-out:<id>`, …: also the idempotency key. */
	cause: string;
	memberId: string;
	kind: EntryKind;
	amount: number;
	balanceAfter: number;
	/** `deal` / `order` / `member` / `adjustment` / `transfer`, and its id: what the entry is about. */
	sourceType: string;
	sourceId: string;
	merchantId?: string;
	/** Points a revocation could not take back because they had been spent already. */
	shortfall?: number;
	/** An expiry's month of earning (`YYYYMM`): the lot it took; an opening balance's: the lot it gave to. */
	lotMonth?: string;
	/**
	 * The part of `amount` that went to (positive) or left (negative) the points held for the deal
	 * (`sourceId`): the balance changed by `amount − held`. A release moves its deal's held points
	 * into the balance (`amount` 0, `held` negative).
	 */
	held?: number;
	/** When a held earning's points become spendable. */
	releaseAt?: string;
	/** A revocation's month of the earning it takes back (`YYYYMM`): what the member's tier stops counting. */
	earnedIn?: string;
	/** An adjustment's reason, and who made it (a staff name, `staff`, or `operator` from the REPL); a tier change's `silver → gold`. */
	reason?: string;
	by?: string;
	/** A transfer's other member: the receiver on the sender's entries, the sender on the receiver's. */
	counterpartId?: string;
	at: string;
}

/** A transfer of points between two members, as the sender's posting recorded it (`at`). */
export interface TransferSent {
	transferId: string;
	fromMemberId: string;
	toMemberId: string;
	points: number;
	at: string;
}

/** A merchant's settlement of a month made final (`settlement.finalized`): its figures, which never change again. */
export interface SettlementFinalizedEvent {
	/** `<merchantId>:<YYYYMM>`: one per merchant and month. */
	settlementId: string;
	merchantId: string;
	billingMonth: string;
	redeemed: { points: number; fee: number; amount: number };
	issued: { points: number; amount: number };
	net: number;
	settledAt: string;
}

/** Every channel and its payload. */
export interface Channels {
	"member.joined": { memberId: string; name: string; joinedAt: string };
	"member.withdrawn": { memberId: string; withdrawnAt: string };
	/** A member's personal data erased on request: read models drop it (the member stays, by id). */
	"member.erased": { memberId: string; erasedAt: string };
	/** A member's name or contact changed (only the fields given): read models that hold them follow. */
	"member.updated": {
		memberId: string;
		name?: string;
		phone?: string;
		email?: string;
		updatedAt: string;
	};
	/** A save deal: its points are earned. */
	"deal.saved": DealEvent;
	/** A use deal whose debit is confirmed. */
	"deal.used": DealEvent;
	/** A use deal refused (not enough points, account closed) or left unconfirmed. */
	"deal.failed": DealEvent;
	/** A use deal whose debit is unconfirmed: undo the debit should it have happened, refuse it if it comes late. */
	"deal.voided": DealEvent;
	/** A successful deal cancelled whole, at once: its points are restored or revoked. */
	"deal.cancelled": DealEvent;
	/** Part of a deal returned (or the rest, after a partial return): its share of the points restored or revoked. */
	"deal.returned": DealReturnedEvent;
	/** A save's tier bonus, posted or changed by a return: what of it the coalition funds. */
	"deal.bonus": DealBonusEvent;
	/** A paid order: its points accrue and its delivery starts. */
	"order.paid": OrderEvent;
	/** An order whose payment is unconfirmed: a payment made anyway is cancelled, a late one refused. */
	"order.voided": OrderEvent;
	/** A paid order cancelled: its payment, delivery and points are undone. */
	"order.cancelled": OrderEvent;
	/** A payment undone for an order (`cancelled`, or `voided` before it was made). */
	"payment.cancelled": { orderId: string; paymentId: string; status: "cancelled" | "voided" };
	"delivery.cancelled": { orderId: string };
	/** The entries one posting added to a member's ledger; `closed` when it closed the account. */
	"points.posted": {
		memberId: string;
		closed: boolean;
		entries: PostedEntry[];
		/** The account's earning lots after the posting (lib/expiry.ts), and the version that wrote them: the newest wins. */
		lots: Record<string, number>;
		/** The points held after the posting, not yet spendable (not in the balance nor the lots). */
		held: number;
		version: number;
		/** The member's tier after the posting, and since when (absent on postings from before tiers). */
		tier?: { name: string; since: string };
	};
	/** Points taken from the sender for a transfer: the receiver is to be credited, or the sender refunded. */
	"transfer.sent": TransferSent;
	/** The points of a member that expire at the end of `month`, told once a month, when the month begins. */
	"points.expiring": {
		memberId: string;
		month: string;
		/** When they are gone: the first instant of the next month (UTC). */
		expiresAt: string;
		points: number;
		at: string;
	};
	/** A merchant's settlement of a month made final: it never changes again. */
	"settlement.finalized": SettlementFinalizedEvent;
}

export type ChannelName = keyof Channels;

/** An event waiting in its document's outbox to be sent to its channel. */
export interface OutboxEvent<C extends ChannelName = ChannelName> {
	id: string;
	channel: C;
	payload: Channels[C];
	/** The trace context of what recorded it, sent as the message's headers (lib/ops/tracing.ts). */
	headers?: Record<string, string>;
}

/** The event `payload` on `channel`, named for the outbox. */
export function outboxEvent<C extends ChannelName>(
	channel: C,
	payload: Channels[C]
): OutboxEvent<C> {
	return { id: sortableId(), channel, payload };
}

/** A consumer's handlers, each typed by its channel's payload. */
export type Handlers<This> = {
	[C in ChannelName]?: (this: This, payload: Channels[C]) => Promise<void>;
};

/**
 * The `channels` of a service schema that consumes the given channels as consumer group `group`:
 * each message is handled by one instance of the group, once the handler resolves.
 */
export function consume<This>(
	group: string,
	handlers: Handlers<This>
): NonNullable<ServiceSchema["channels"]> {
	return Object.fromEntries(
		Object.entries(handlers).map(([channel, handler]) => [
			channel,
			{ group, handler: handler as (payload: unknown) => Promise<void> }
		])
	);
}
