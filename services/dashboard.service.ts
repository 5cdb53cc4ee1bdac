/**
 * Dashboard: the staff's read model of members, their points and transactions, and the overview.
 * Fed only by events — the ledger's postings (`points.posted`), deals, orders and member events —
 * into its own collections, never by queries against the write side, so it stays answerable while
 * deals are under load. Every handler is idempotent (keyed by ledger cause or transaction id) and
 * independent of the order events arrive in. Changes are announced for the gateway's live stream as
 * `dashboard.updated` (a plain Moleculer event), at most one every `ANNOUNCE_MS`, naming the members
 * whose rows changed: a page needs to know what to reload, not each of a thousand deals a second.
 *
 * No counter is kept apart from what it counts, so a crash between two writes cannot skew one for
 * good: a member's totals are summed from the copies of their ledger entries (keyed by cause) when
 * asked, and the overview's figures from the members and transactions. A member row keeps only what
 * the newest posting states — the balance and the earning lots, with the account version that wrote
 * them — so postings may arrive in any order or twice, and a replay finishes what a crash cut short.
 * Staff adjustments count in the member's `adjusted` total (signed) and list among the transactions;
 * a tier bonus counts as earned; a change of tier lists among the transactions, and the member row
 * keeps the tier the newest posting states.
 * So do a transfer's entries (sent, received, refunded), each naming the other member. An opening
 * balance a bulk import brought (kind `import`) counts in the member's `imported` total.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import {
	consume,
	type DealEvent,
	type DealReturnedEvent,
	type OrderEvent,
	type PostedEntry
} from "../contracts/channels";
import { notFound } from "../lib/errors";
import { expiringSoon, type Lots } from "../lib/expiry";
import * as P from "../lib/params";
import { monthOf } from "../lib/months";
import type { MonthSettlements } from "./billing.service";
import {
	DbMixin,
	openCollection,
	type Collection,
	type DbThis,
	type Query
} from "../mixins/db.mixin";

/** A copy of a ledger entry, keyed by its cause. */
export interface EntryRow extends Omit<PostedEntry, "cause"> {
	_id: string;
}

interface MemberRow {
	_id: string;
	name?: string;
	status: "active" | "withdrawn" | "erased";
	/** Set by the member's erasure: a late join or withdrawal changes neither name nor status. */
	erased?: boolean;
	joinedAt?: string;
	withdrawnAt?: string;
	/** The account's balance, held points and earning lots as of account version `version`. */
	balance: number;
	held?: number;
	lots?: Lots;
	tier?: { name: string; since: string };
	version?: number;
}

/**
 * A member's totals by kind of entry; `adjusted` is points added less points taken by staff,
 * `imported` the opening balance a bulk import brought.
 */
interface Totals {
	earned: number;
	used: number;
	cancelled: number;
	expired: number;
	adjusted: number;
	imported: number;
}

/** A deal, an order, a staff adjustment, a change of tier or a transfer's entry as the staff see it. */
interface TransactionRow {
	_id: string;
	kind: "deal" | "order" | "adjustment" | "tier" | "transfer";
	id: string;
	memberId: string;
	type: string;
	merchantId?: string;
	amount: number;
	point: number;
	status: string;
	/** A deal's partial returns so far: how much of its amount, and their points. */
	returnedAmount?: number;
	returnedPoints?: number;
	at: string;
	day: string;
	month: string;
	/** An adjustment's reason and who made it; a change of tier's `silver → gold`. */
	reason?: string;
	by?: string;
	/** A transfer's other member. */
	counterpartId?: string;
}

/** Which total of a member each kind of ledger entry adds to (its size; an adjustment's is signed). */
const TOTAL_OF: Record<string, keyof Totals> = {
	earn: "earned",
	bonus: "earned",
	use: "used",
	restore: "cancelled",
	revoke: "cancelled",
	expire: "expired",
	adjust: "adjusted",
	import: "imported"
};

const totalAmount = (kind: string, amount: number) =>
	kind === "adjust" ? amount : Math.abs(amount);

/** How often, at most, changes are announced to the live stream (ms). */
const ANNOUNCE_MS = 100;

/** How many members the overview lists with the most points expiring soon. */
const TOP_EXPIRING = 10;

interface Methods {
	record(row: TransactionRow): Promise<boolean>;
	cancel(id: string, base: TransactionRow): Promise<boolean>;
	recordReturn(deal: DealReturnedEvent): Promise<void>;
	changeMember(filter: Query & { _id: string }, update: object): Promise<void>;
	announce(memberId: string): void;
	now(): Date;
}

const newMember = (memberId: string): MemberRow => ({
	_id: memberId,
	status: "active",
	balance: 0
});
const noTotals = (): Totals => ({
	earned: 0,
	used: 0,
	cancelled: 0,
	expired: 0,
	adjusted: 0,
	imported: 0
});

interface Settings extends ServiceSettingSchema {
	/** How long the overview waits for the dead-letter count and billing's month (ms). */
	callTimeoutMs: number;
	/** Months earned points stay valid (POINTS_VALID_MONTHS); 0: never expire. */
	pointsValidMonths: number;
}

type This = Service<Settings> &
	DbThis<EntryRow> &
	Methods & {
		members: Collection<MemberRow>;
		transactions: Collection<TransactionRow>;
		/** Members changed since the last announcement, and the timer that announces them. */
		changed: Set<string>;
		announcing?: NodeJS.Timeout;
	};

const DashboardService: ServiceSchema<Settings, Methods, object, This> = {
	name: "dashboard",
	mixins: [
		DbMixin("dashboard-entries", [{ fields: { memberId: 1 } }]),
		ConfiguredSettings<Settings>(config => ({
			callTimeoutMs: config.callTimeoutMs,
			pointsValidMonths: config.pointsValidMonths
		}))
	],

	actions: {
		/** Everything about one member at a glance. */
		member: {
			rest: "GET /dashboard/members/:memberId",
			summary: "The dashboard's view of one customer",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				const { memberId } = ctx.params;
				const [member, entries, latest] = await Promise.all([
					this.members.findById(memberId),
					this.store.find({ query: { memberId }, sort: ["at"] }),
					this.transactions.page({ memberId }, ["-at"], 1, 10)
				]);
				if (!member)
					throw notFound("MEMBER_NOT_FOUND", `No member '${memberId}' on the dashboard`, {
						memberId
					});
				const totals = noTotals();
				const months = new Map<string, { month: string } & Totals>();
				const merchants = new Map<string, { merchantId: string; earned: number; used: number }>();
				for (const entry of entries) {
					const total = TOTAL_OF[entry.kind];
					if (total) {
						const month = monthOf(entry.at);
						const m = months.get(month) ?? { month, ...noTotals() };
						m[total] += totalAmount(entry.kind, entry.amount);
						totals[total] += totalAmount(entry.kind, entry.amount);
						months.set(month, m);
					}
					if (entry.merchantId && (entry.kind === "earn" || entry.kind === "use")) {
						const byMerchant = merchants.get(entry.merchantId) ?? {
							merchantId: entry.merchantId,
							earned: 0,
							used: 0
						};
						byMerchant[entry.kind === "earn" ? "earned" : "used"] += Math.abs(entry.amount);
						merchants.set(entry.merchantId, byMerchant);
					}
				}
				const { name, status, joinedAt, withdrawnAt, balance, held = 0, lots, tier } = member;
				return {
					member: { memberId, name, status, joinedAt, withdrawnAt, balance, held, ...totals },
					tier: tier ?? null,
					expiring: expiringSoon(lots ?? {}, this.settings.pointsValidMonths, this.now()),
					series: entries.map(e => ({ at: e.at, balance: e.balanceAfter })),
					monthly: [...months.values()].sort((a, b) => a.month.localeCompare(b.month)),
					byMerchant: [...merchants.values()].sort(
						(a, b) => b.earned + b.used - (a.earned + a.used)
					),
					latest: latest.rows.map(({ _id: _key, day: _day, month: _month, ...row }) => row),
					transactions: latest.total
				};
			}
		},

		/** A member's deals and orders, newest first, paged. */
		transactions: {
			rest: "GET /dashboard/members/:memberId/transactions",
			summary: "One customer's transactions, newest first, paged",
			params: { $$strict: true, memberId: P.id, ...P.paging },
			async handler(
				this: This,
				ctx: Context<{ memberId: string; page: number; pageSize: number }>
			) {
				const { memberId, page, pageSize } = ctx.params;
				const result = await this.transactions.page({ memberId }, ["-at"], page, pageSize);
				return {
					...result,
					rows: result.rows.map(({ _id, day: _day, month: _month, ...row }) => row)
				};
			}
		},

		/** The membership at a glance: counts, points outstanding and expiring soon, activity, this month's settlements, dead letters. */
		overview: {
			rest: "GET /dashboard/overview",
			summary: "The staff dashboard's overview: totals and every customer at a glance",
			params: {
				$$strict: true,
				days: { type: "number", integer: true, min: 1, max: 92, default: 14, convert: true }
			},
			async handler(this: This, ctx: Context<{ days: number }>) {
				const now = this.now();
				const since = new Date(now.getTime() - (ctx.params.days - 1) * 86_400_000)
					.toISOString()
					.slice(0, 10);
				const current = monthOf(now.toISOString());
				const monthStart = `${now.toISOString().slice(0, 7)}-01`;
				const answerOrNull = <T, R>(action: string, params: object, pick: (answer: T) => R) =>
					ctx
						.call<T, object>(action, params, { timeout: this.settings.callTimeoutMs })
						.then(pick, () => null);
				const [members, deals, deadLetters, settlements] = await Promise.all([
					this.members.find({ query: {} }),
					this.transactions.find({
						query: { kind: "deal", day: { $gte: since < monthStart ? since : monthStart } }
					}),
					// Owned by other services: without their answer the overview still shows the rest.
					answerOrNull("dead-letters.count", {}, (r: { waiting: number }) => r.waiting),
					// Billing's own figures, both sides, with what it carries in from closed months.
					answerOrNull(
						"billing.list",
						{ billingMonth: current },
						(month: MonthSettlements) => month.settlements
					)
				]);
				const perDay = new Map<string, number>();
				const perMerchant = new Map<
					string,
					{ merchantId: string; deals: number; earnedPoints: number; usedPoints: number }
				>();
				for (const deal of deals) {
					if (deal.day >= since) perDay.set(deal.day, (perDay.get(deal.day) ?? 0) + 1);
					if (deal.month !== current || !deal.merchantId) continue;
					const m = perMerchant.get(deal.merchantId) ?? {
						merchantId: deal.merchantId,
						deals: 0,
						earnedPoints: 0,
						usedPoints: 0
					};
					m.deals++;
					// Points count only for a deal that went through and stands, less what was returned of it.
					if (deal.status === "success" || deal.status === "partially_cancelled")
						m[deal.type === "use" ? "usedPoints" : "earnedPoints"] +=
							deal.point - (deal.returnedPoints ?? 0);
					perMerchant.set(deal.merchantId, m);
				}
				const joined = members.filter(m => m.joinedAt);
				const merchants = [...perMerchant.values()];
				// What expires at the end of this month and the next two, overall and for whom most.
				const expiring = members.map(m => ({
					member: m,
					soon: expiringSoon(m.lots ?? {}, this.settings.pointsValidMonths, now)
				}));
				const expiringMonths =
					expiring[0]?.soon.map((e, i) => ({
						...e,
						points: expiring.reduce((sum, x) => sum + x.soon[i].points, 0)
					})) ?? expiringSoon({}, this.settings.pointsValidMonths, now);
				const expiringMembers = expiring
					.map(({ member, soon }) => ({
						memberId: member._id,
						name: member.name,
						points: soon.reduce((sum, e) => sum + e.points, 0),
						firstMonth: soon.find(e => e.points > 0)?.month
					}))
					.filter(m => m.points > 0)
					.sort((a, b) => b.points - a.points || a.memberId.localeCompare(b.memberId))
					.slice(0, TOP_EXPIRING);
				return {
					members: joined.length,
					activeAccounts: joined.filter(m => m.status === "active").length,
					pointsOutstanding: members.reduce((sum, m) => sum + m.balance, 0),
					expiringSoon: { months: expiringMonths, members: expiringMembers },
					deadLetters,
					dealsPerDay: [...perDay]
						.sort(([a], [b]) => a.localeCompare(b))
						.map(([day, count]) => ({ day, deals: count })),
					topMerchants: [...merchants]
						.sort((a, b) => b.deals - a.deals || b.usedPoints - a.usedPoints)
						.slice(0, 5),
					// Each merchant's month: points issued (it pays), redeemed (it is paid), the net.
					settlementPreview:
						settlements
							?.map(
								({
									merchantId,
									billingMonth,
									usedPoints,
									adjustmentPoints,
									billingAmount,
									redeemed,
									issued,
									net
								}) => ({
									merchantId,
									billingMonth,
									usedPoints,
									adjustmentPoints,
									billingAmount,
									redeemed,
									issued,
									net
								})
							)
							.sort(
								(a, b) =>
									b.billingAmount - a.billingAmount || a.merchantId.localeCompare(b.merchantId)
							) ?? null
				};
			}
		}
	},

	channels: consume<This>("dashboard", {
		async "member.joined"(event) {
			await this.changeMember({ _id: event.memberId }, { $set: { joinedAt: event.joinedAt } });
			// A join redelivered after the erasure must not bring the name back.
			await this.members.update(
				{ _id: event.memberId, erased: { $exists: false } },
				{ $set: { name: event.name } }
			);
			this.announce(event.memberId);
		},
		async "member.updated"(event) {
			if (event.name === undefined) return;
			// An erasure wins over a change that arrives after it.
			await this.members.update(
				{ _id: event.memberId, erased: { $exists: false } },
				{ $set: { name: event.name } }
			);
			this.announce(event.memberId);
		},
		async "member.erased"(event) {
			await this.changeMember(
				{ _id: event.memberId },
				{ $set: { erased: true, status: "erased" }, $unset: { name: true } }
			);
			this.announce(event.memberId);
		},
		async "member.withdrawn"(event) {
			// An erased member stays erased, whichever event comes last.
			await this.changeMember(
				{ _id: event.memberId },
				{ $set: { withdrawnAt: event.withdrawnAt } }
			);
			await this.members.update(
				{ _id: event.memberId, erased: { $exists: false } },
				{ $set: { status: "withdrawn" } }
			);
			this.announce(event.memberId);
		},
		/** The ledger itself: the member's history, charts and totals follow it entry by entry, their balance and lots posting by posting. */
		async "points.posted"(posting) {
			for (const { cause, ...entry } of posting.entries) {
				// Again on a replay: each entry is kept once, and a crash before the member's row changed is repaired below.
				await this.store.insertUnique({ _id: cause, ...entry });
				// Staff adjustments and changes of tier list among the member's transactions.
				const listed =
					entry.kind === "adjust" ? "adjustment" : entry.kind === "tier" ? "tier" : null;
				if (listed)
					await this.record({
						_id: cause,
						kind: listed,
						id: listed === "tier" ? cause : entry.sourceId,
						memberId: entry.memberId,
						type: listed,
						amount: entry.amount,
						point: entry.amount,
						status: "success",
						at: entry.at,
						day: entry.at.slice(0, 10),
						month: monthOf(entry.at),
						reason: entry.reason,
						by: entry.by
					});
				// A transfer's entries (its refund is a restoration), not the expiry of a refund to a withdrawn sender.
				if (entry.sourceType === "transfer" && entry.kind !== "expire")
					await this.record(transferRow(cause, entry));
			}
			// Only a newer account version replaces what the row states: postings may arrive in any order.
			const last = posting.entries.at(-1);
			const newer = {
				_id: posting.memberId,
				$or: [{ version: { $exists: false } }, { version: { $lt: posting.version } }]
			};
			const state = {
				$set: {
					lots: posting.lots,
					held: posting.held,
					version: posting.version,
					...(posting.tier ? { tier: posting.tier } : {}),
					...(last ? { balance: last.balanceAfter } : {})
				}
			};
			await this.changeMember(newer, state);
			this.announce(posting.memberId);
		},
		async "deal.saved"(deal) {
			await this.record(dealRow(deal, "success"));
		},
		async "deal.used"(deal) {
			await this.record(dealRow(deal, "success"));
		},
		async "deal.cancelled"(deal) {
			await this.cancel(`deal:${deal.dealId}`, dealRow(deal, "cancelled"));
		},
		async "deal.returned"(deal) {
			await this.recordReturn(deal);
		},
		async "deal.failed"(deal) {
			await this.record(dealRow(deal, "fail"));
		},
		async "order.paid"(order) {
			await this.record(orderRow(order, "paid"));
		},
		async "order.cancelled"(order) {
			await this.cancel(`order:${order.orderId}`, orderRow(order, "cancelled"));
		}
	}),

	methods: {
		/** Records a transaction once. False when already known. */
		async record(this: This, row: TransactionRow) {
			if (!(await this.transactions.insertUnique(row))) return false;
			this.announce(row.memberId);
			return true;
		},

		/** Marks a transaction cancelled once, whether or not its success was seen first. */
		async cancel(this: This, id: string, base: TransactionRow) {
			// Cancellation first: record it as cancelled; its success will find it and count nothing.
			// Trying the insert first (not a lookup) also settles a success arriving at the same moment.
			if (await this.record(base)) return true;
			const changed = await this.transactions.update(
				{ _id: id, status: { $ne: "cancelled" } },
				{ $set: { status: "cancelled" } }
			);
			this.announce(base.memberId);
			return changed > 0;
		},

		/**
		 * A deal's partial return: the totals only grow (`$max`), and `cancelled` stays once reached, so
		 * returns arriving late, twice or out of order leave the latest state.
		 */
		async recordReturn(this: This, deal: DealReturnedEvent) {
			const { returnedAmount, returnedPoints, status } = deal;
			const row = { ...dealRow(deal, status), returnedAmount, returnedPoints };
			if (await this.record(row)) return;
			await this.transactions.update(
				{ _id: row._id },
				{ $max: { returnedAmount, returnedPoints } }
			);
			await this.transactions.update(
				{ _id: row._id, status: { $in: ["success", "partially_cancelled"] } },
				{ $set: { status } }
			);
			this.announce(deal.memberId);
		},

		/**
		 * Updates a member's row, making it first if no event has yet (events arrive in any order). When
		 * nothing matched, the row was missing, made meanwhile by another event, or (a condition) newer:
		 * the update is tried again once the row exists, whoever made it.
		 */
		async changeMember(this: This, filter: Query & { _id: string }, update: object) {
			if (await this.members.update(filter, update)) return;
			await this.members.insertUnique(newMember(filter._id));
			await this.members.update(filter, update);
		},

		announce(this: This, memberId: string) {
			this.changed.add(memberId);
			this.announcing ??= setTimeout(() => {
				const memberIds = [...this.changed];
				this.changed.clear();
				this.announcing = undefined;
				void this.broker.broadcast("dashboard.updated", { memberIds });
			}, ANNOUNCE_MS);
		},

		/** The clock "expiring soon" is reckoned by (a test may set it). */
		now: () => new Date()
	},

	created(this: This) {
		this.changed = new Set();
		this.members = openCollection<MemberRow>(this, "dashboard-members", [
			{ fields: { status: 1 } }
		]);
		this.transactions = openCollection<TransactionRow>(this, "dashboard-transactions", [
			{ fields: { memberId: 1 } }
		]);
	},

	async started(this: This) {
		await Promise.all([this.members, this.transactions].map(c => c.connect(this.logger)));
	},

	async stopped(this: This) {
		clearTimeout(this.announcing);
		await Promise.all([this.members, this.transactions].map(c => c.disconnect()));
	}
};

function dealRow(deal: DealEvent, status: string): TransactionRow {
	return {
		_id: `deal:${deal.dealId}`,
		kind: "deal",
		id: deal.dealId,
		memberId: deal.memberId,
		type: deal.type,
		merchantId: deal.merchantId,
		amount: deal.dealAmount,
		point: deal.point,
		status,
		at: deal.dealDate,
		day: deal.dealDate.slice(0, 10),
		month: monthOf(deal.dealDate)
	};
}

/** A transfer's entry: `out` (sent) and `in` (received), or `refund` (the receiver had withdrawn). */
function transferRow(cause: string, entry: Omit<PostedEntry, "cause">): TransactionRow {
	const type = entry.kind === "restore" ? "refund" : entry.amount < 0 ? "out" : "in";
	const status = { out: "sent", in: "received", refund: "refunded" }[type];
	return {
		_id: cause,
		kind: "transfer",
		id: entry.sourceId,
		memberId: entry.memberId,
		type,
		amount: Math.abs(entry.amount),
		point: entry.amount,
		status,
		at: entry.at,
		day: entry.at.slice(0, 10),
		month: monthOf(entry.at),
		counterpartId: entry.counterpartId
	};
}

function orderRow(order: OrderEvent, status: string): TransactionRow {
	const at = order.paidAt ?? new Date().toISOString();
	return {
		_id: `order:${order.orderId}`,
		kind: "order",
		id: order.orderId,
		memberId: order.memberId,
		type: "order",
		amount: order.totalPrice ?? 0,
		point: order.points,
		status,
		at,
		day: at.slice(0, 10),
		month: monthOf(at)
	};
}

export default DashboardService;
