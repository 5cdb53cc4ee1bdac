/**
 * Dashboard: the staff's read model of members, their points and transactions, and the overview.
 * Fed only by events — the ledger's postings (`points.posted`), deals, orders and member events —
 * into its own collections, never by queries against the write side, so it stays answerable while
 * deals are under load. Every handler is idempotent (keyed by ledger cause or transaction id) and
 * independent of the order events arrive in. Each change is also announced as `dashboard.updated`
 * (a plain Moleculer event) for the gateway's live stream.
 */
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { consume, type DealEvent, type OrderEvent, type PostedEntry } from "../contracts/channels";
import { notFound } from "../lib/errors";
import * as P from "../lib/params";
import { DbMixin, openCollection, type Collection, type DbThis } from "../mixins/db.mixin";

/** A copy of a ledger entry, keyed by its cause. */
export interface EntryRow extends Omit<PostedEntry, "cause"> {
	_id: string;
}

interface MemberRow {
	_id: string;
	name?: string;
	status: "active" | "withdrawn";
	joinedAt?: string;
	withdrawnAt?: string;
	balance: number;
	earned: number;
	used: number;
	cancelled: number;
	expired: number;
}

/** A deal or an order as the staff see it. */
interface TransactionRow {
	_id: string;
	kind: "deal" | "order";
	id: string;
	memberId: string;
	type: string;
	merchantId?: string;
	amount: number;
	point: number;
	status: string;
	at: string;
	day: string;
	month: string;
}

/** Counters: `day:YYYY-MM-DD`, `merchant:<id>:YYYYMM` and `totals`. */
interface StatRow {
	_id: string;
	kind: "day" | "merchant" | "totals";
	day?: string;
	merchantId?: string;
	month?: string;
	deals?: number;
	usedPoints?: number;
	earnedPoints?: number;
	members?: number;
	active?: number;
	outstanding?: number;
}

/** Which total of a member each kind of ledger entry adds to. */
const TOTAL_OF: Record<string, keyof Pick<MemberRow, "earned" | "used" | "cancelled" | "expired">> = {
	earn: "earned",
	use: "used",
	restore: "cancelled",
	revoke: "cancelled",
	expire: "expired"
};

const month = (iso: string) => iso.slice(0, 7).replace("-", "");

interface Methods {
	record(row: TransactionRow): Promise<boolean>;
	cancel(id: string, base: TransactionRow): Promise<boolean>;
	count(id: string, inc: Partial<StatRow>, fields: Partial<StatRow>): Promise<void>;
	announce(memberId: string, what: string): void;
}

interface Settings extends ServiceSettingSchema {
	/** The fee the settlement preview deducts (SETTLEMENT_FEE). */
	settlementFee: number;
}

type This = Service<Settings> & DbThis<EntryRow> & Methods & { members: Collection<MemberRow>; transactions: Collection<TransactionRow>; stats: Collection<StatRow> };

const DashboardService: ServiceSchema<Settings, Methods, object, This> = {
	name: "dashboard",
	mixins: [DbMixin("dashboard-entries", [{ fields: { memberId: 1 } }]), ConfiguredSettings<Settings>(config => ({ settlementFee: config.settlementFee }))],

	actions: {
		/** Everything about one member at a glance. */
		member: {
			rest: "GET /dashboard/members/:memberId",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				const { memberId } = ctx.params;
				const [member, entries, latest] = await Promise.all([
					this.members.findById(memberId),
					this.store.find({ query: { memberId }, sort: ["at"] }),
					this.transactions.page({ memberId }, ["-at"], 1, 10)
				]);
				if (!member) throw notFound("MEMBER_NOT_FOUND", `No member '${memberId}' on the dashboard`, { memberId });
				const months = new Map<string, { month: string; earned: number; used: number; cancelled: number; expired: number }>();
				const merchants = new Map<string, { merchantId: string; earned: number; used: number }>();
				for (const entry of entries) {
					const total = TOTAL_OF[entry.kind];
					if (total) {
						const m = months.get(month(entry.at)) ?? { month: month(entry.at), earned: 0, used: 0, cancelled: 0, expired: 0 };
						m[total] += Math.abs(entry.amount);
						months.set(m.month, m);
					}
					if (entry.merchantId && (entry.kind === "earn" || entry.kind === "use")) {
						const byMerchant = merchants.get(entry.merchantId) ?? { merchantId: entry.merchantId, earned: 0, used: 0 };
						byMerchant[entry.kind === "earn" ? "earned" : "used"] += Math.abs(entry.amount);
						merchants.set(entry.merchantId, byMerchant);
					}
				}
				const { _id, ...rest } = member;
				return {
					member: { memberId: _id, ...rest },
					series: entries.map(e => ({ at: e.at, balance: e.balanceAfter })),
					monthly: [...months.values()].sort((a, b) => a.month.localeCompare(b.month)),
					byMerchant: [...merchants.values()].sort((a, b) => b.earned + b.used - (a.earned + a.used)),
					latest: latest.rows.map(({ _id: _key, day: _day, month: _month, ...row }) => row),
					transactions: latest.total
				};
			}
		},

		/** A member's deals and orders, newest first, paged. */
		transactions: {
			rest: "GET /dashboard/members/:memberId/transactions",
			params: { $$strict: true, memberId: P.id, ...P.paging },
			async handler(this: This, ctx: Context<{ memberId: string; page: number; pageSize: number }>) {
				const { memberId, page, pageSize } = ctx.params;
				const result = await this.transactions.page({ memberId }, ["-at"], page, pageSize);
				return { ...result, rows: result.rows.map(({ _id, day: _day, month: _month, ...row }) => row) };
			}
		},

		/** The membership at a glance: counts, points outstanding, activity and this month's settlements. */
		overview: {
			rest: "GET /dashboard/overview",
			params: { $$strict: true, days: { type: "number", integer: true, min: 1, max: 92, default: 14, convert: true } },
			async handler(this: This, ctx: Context<{ days: number }>) {
				const now = new Date();
				const since = new Date(now.getTime() - (ctx.params.days - 1) * 86_400_000).toISOString().slice(0, 10);
				const current = month(now.toISOString());
				const [totals, days, merchants] = await Promise.all([
					this.stats.findById("totals"),
					this.stats.find({ query: { kind: "day", day: { $gte: since } }, sort: ["day"] }),
					this.stats.find({ query: { kind: "merchant", month: current } })
				]);
				return {
					members: totals?.members ?? 0,
					activeAccounts: totals?.active ?? 0,
					pointsOutstanding: totals?.outstanding ?? 0,
					dealsPerDay: days.map(d => ({ day: d.day, deals: d.deals ?? 0 })),
					topMerchants: merchants
						.map(m => ({ merchantId: m.merchantId, deals: m.deals ?? 0, earnedPoints: m.earnedPoints ?? 0, usedPoints: m.usedPoints ?? 0 }))
						.sort((a, b) => b.deals - a.deals || b.usedPoints - a.usedPoints)
						.slice(0, 5),
					settlementPreview: merchants
						.filter(m => (m.usedPoints ?? 0) > 0)
						.map(m => ({ merchantId: m.merchantId, billingMonth: current, usedPoints: m.usedPoints ?? 0, billingAmount: Math.floor((m.usedPoints ?? 0) * (1 - this.settings.settlementFee)) }))
						.sort((a, b) => b.usedPoints - a.usedPoints)
				};
			}
		}
	},

	channels: consume<This>("dashboard", {
		async "member.joined"(event) {
			await this.members.insertUnique({ _id: event.memberId, status: "active", balance: 0, earned: 0, used: 0, cancelled: 0, expired: 0 });
			// Once, whichever of the member's events came first and made the row.
			if (await this.members.update({ _id: event.memberId, joinedAt: { $exists: false } }, { $set: { name: event.name, joinedAt: event.joinedAt } })) {
				const row = await this.members.findById(event.memberId);
				await this.count("totals", { members: 1, active: row?.status === "active" ? 1 : 0 }, { kind: "totals" });
			}
			this.announce(event.memberId, "member");
		},
		async "member.withdrawn"(event) {
			await this.members.insertUnique({ _id: event.memberId, status: "active", balance: 0, earned: 0, used: 0, cancelled: 0, expired: 0 });
			const withdrawn = { $set: { status: "withdrawn", withdrawnAt: event.withdrawnAt } };
			// Counted as active only once its joining was seen.
			if (await this.members.update({ _id: event.memberId, status: "active", joinedAt: { $exists: true } }, withdrawn)) await this.count("totals", { active: -1 }, { kind: "totals" });
			else await this.members.update({ _id: event.memberId }, withdrawn);
			this.announce(event.memberId, "member");
		},
		/** The ledger itself: balances, totals, history and charts follow it entry by entry. */
		async "points.posted"(posting) {
			await this.members.insertUnique({ _id: posting.memberId, status: "active", balance: 0, earned: 0, used: 0, cancelled: 0, expired: 0 });
			for (const { cause, ...entry } of posting.entries) {
				if (!(await this.store.insertUnique({ _id: cause, ...entry }))) continue;
				const total = TOTAL_OF[entry.kind];
				await this.members.update({ _id: entry.memberId }, { $inc: { balance: entry.amount, ...(total ? { [total]: Math.abs(entry.amount) } : {}) } });
				await this.count("totals", { outstanding: entry.amount }, { kind: "totals" });
			}
			this.announce(posting.memberId, "points");
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
		/** Records a transaction once; counts it into its day and merchant. False when already known. */
		async record(this: This, row: TransactionRow) {
			if (!(await this.transactions.insertUnique(row))) return false;
			if (row.kind === "deal") {
				await this.count(`day:${row.day}`, { deals: 1 }, { kind: "day", day: row.day });
				// Points count only for a deal that went through; a cancellation seen first never adds them.
				const points = row.status === "success" ? (row.type === "use" ? { usedPoints: row.point } : { earnedPoints: row.point }) : {};
				if (row.merchantId) await this.count(`merchant:${row.merchantId}:${row.month}`, { deals: 1, ...points }, { kind: "merchant", merchantId: row.merchantId, month: row.month });
			}
			this.announce(row.memberId, row.kind);
			return true;
		},

		/** Marks a transaction cancelled once, whether or not its success was seen first. */
		async cancel(this: This, id: string, base: TransactionRow) {
			// Cancellation first: record it as cancelled; its success will find it and count nothing.
			// Trying the insert first (not a lookup) also settles a success arriving at the same moment.
			if (await this.record(base)) return true;
			const changed = await this.transactions.update({ _id: id, status: { $ne: "cancelled" } }, { $set: { status: "cancelled" } });
			if (changed && base.kind === "deal" && base.merchantId)
				// Counters only add up ($inc), so this may come before or after the success's own count.
				await this.count(`merchant:${base.merchantId}:${base.month}`, base.type === "use" ? { usedPoints: -base.point } : { earnedPoints: -base.point }, { kind: "merchant", merchantId: base.merchantId, month: base.month });
			this.announce(base.memberId, base.kind);
			return changed > 0;
		},

		async count(this: This, id: string, inc: Partial<StatRow>, fields: Partial<StatRow>) {
			await this.stats.upsert({ _id: id }, { $inc: inc, $set: fields });
		},

		announce(this: This, memberId: string, what: string) {
			void this.broker.broadcast("dashboard.updated", { memberId, what });
		}
	},

	created(this: This) {
		this.members = openCollection<MemberRow>(this, "dashboard-members", [{ fields: { status: 1 } }]);
		this.transactions = openCollection<TransactionRow>(this, "dashboard-transactions", [{ fields: { memberId: 1 } }]);
		this.stats = openCollection<StatRow>(this, "dashboard-stats", [{ fields: { kind: 1 } }]);
	},

	async started(this: This) {
		await Promise.all([this.members, this.transactions, this.stats].map(c => c.connect(this.logger)));
	},

	async stopped(this: This) {
		await Promise.all([this.members, this.transactions, this.stats].map(c => c.disconnect()));
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
		month: month(deal.dealDate)
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
		month: month(at)
	};
}

export default DashboardService;
