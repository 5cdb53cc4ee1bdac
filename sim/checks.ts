/**
 * What must hold once the system is quiet (every message handled, every crashed service back),
 * checked against the stores and against the simulator's own record of what clients were answered:
 * the ledger's invariants (docs/architecture.md) and a reference model of
 * what each deal, order, transfer, adjustment and settlement must have done to it.
 */
import type { Service } from "moleculer";
import type { Account } from "../services/points.service";
import type { Deal } from "../services/deals.service";
import type { Order } from "../services/orders.service";
import type { Settlement } from "../services/billing.service";
import type { LedgerEntry } from "../lib/posting";
import type { Collection } from "../mixins/db.mixin";
import type { DealTerms } from "../contracts/channels";
import { addMonths, monthOf } from "../lib/months";
import type { SimSystem } from "./system";

const BASIS = 10_000;
const DAY = 86_400_000;
const TERMS = ["earnRateBp", "redemptionFeeBp", "pointPriceBp", "holdDays"] as const;

/** `amount` at `rateBp` basis points, rounded toward zero: the simulator's own arithmetic, not lib/rates.ts. */
const atRate = (amount: number, rateBp: number) => Math.trunc((amount * rateBp) / BASIS);

/** What the simulator knows from the answers its clients got. */
export interface Model {
	/** Deals, orders, adjustments and transfers answered 201, by id. */
	deals: Map<string, { status: string }>;
	orders: Set<string>;
	adjustments: Map<string, number>;
	transfers: Set<string>;
	/** Returns answered, by deal: the most points answered as given back, and whether one completed it. */
	returns: Map<string, { points: number; cancelled: boolean }>;
	/** Orders whose cancellation was answered 200. */
	cancelledOrders: Set<string>;
	/** Client operations that may each have made one effect (answered 201, or 5xx: unknown). */
	attempts: { deals: number; orders: number; adjustments: number };
	/** Final settlements as first read: they never change. */
	finals: Map<string, string>;
	/** Each merchant's terms, as the simulator registered them (or the node's defaults): they never change in a seed. */
	terms: Record<string, DealTerms>;
	/** When the release job last ran without failing (ISO): every hold due by then is released. */
	releasedAt?: string;
	startMonth: string;
}

export class Violation extends Error {}

function fail(message: string): never {
	throw new Violation(message);
}

type Stores = {
	points: { store: Collection<Account>; ledger: Collection<LedgerEntry> };
	deals: { store: Collection<Deal> };
	orders: { store: Collection<Order> };
};

const storesOf = (system: SimSystem): Stores => ({
	points: system.service("points") as Service & Stores["points"],
	deals: system.service("deals") as Service & Stores["deals"],
	orders: system.service("orders") as Service & Stores["orders"]
});

/** Σ (amount − shortfall) of `entries`: what they did, had every revocation found the points. */
const net = (entries: LedgerEntry[]) =>
	entries.reduce((sum, e) => sum + e.amount - (e.shortfall ?? 0), 0);

export async function checkQuiet(system: SimSystem, model: Model, now: string): Promise<void> {
	const audit = await system.broker.call<{ mismatches: unknown[] }>("points.audit");
	if (audit.mismatches.length)
		fail(`points.audit: balance and ledger disagree: ${JSON.stringify(audit.mismatches)}`);

	const { points, deals, orders } = storesOf(system);
	const accounts = await points.store.find({ query: {} });
	for (const a of accounts)
		if (a.balance < 0 || (a.held ?? 0) < 0)
			fail(`account ${a._id} below 0: ${a.balance}, held ${a.held}`);
	const ledger = await points.ledger.find({ query: {} });
	const byCause = new Map<string, LedgerEntry>();
	for (const e of ledger) {
		if (byCause.has(e._id)) fail(`cause ${e._id} twice in the ledger`);
		byCause.set(e._id, e);
	}
	const causesOf = (prefixes: string[]) =>
		ledger.filter(e => prefixes.some(p => e._id.startsWith(p)));

	const storedDeals = await deals.store.find({ query: {} });
	const dealById = new Map(storedDeals.map(d => [d._id, d]));
	for (const d of storedDeals) {
		// The terms of its merchant on its day, and a save's points from its amount at their earn rate.
		const terms =
			model.terms[d.merchantId] ?? fail(`deal ${d._id} of unknown merchant ${d.merchantId}`);
		const recorded = d.terms;
		if (!recorded || TERMS.some(term => (recorded[term] ?? 0) !== (terms[term] ?? 0)))
			fail(
				`deal ${d._id} records its merchant's terms as ${JSON.stringify(d.terms)}; they are ${JSON.stringify(terms)}`
			);
		if (d.type === "save" && d.point !== atRate(d.dealAmount, terms.earnRateBp))
			fail(
				`save ${d._id} of ${d.dealAmount} at merchant ${d.merchantId} earned ${d.point} points; ` +
					`${terms.earnRateBp / 100}% of it is ${atRate(d.dealAmount, terms.earnRateBp)}`
			);
		const entries = causesOf([`deal:${d._id}`, `deal-cancel:${d._id}`, `deal-return:${d._id}:`]);
		const kept = d.status === "cancelled" ? 0 : d.point - (d.returnedPoints ?? 0);
		const expected =
			d.status === "pending"
				? fail(`deal ${d._id} still pending after the sweep`)
				: d.status === "fail"
					? 0
					: d.type === "save"
						? kept
						: -kept;
		if (net(entries) !== expected)
			fail(
				`deal ${d._id} (${d.type}, ${d.status}, point ${d.point}, returned ${d.returnedPoints ?? 0}) ` +
					`should net ${expected} in the ledger, nets ${net(entries)}: ${entries.map(e => `${e._id} ${e.amount}`).join(", ")}`
			);
		if (d.type === "use" && d.status !== "fail" && !byCause.has(`deal:${d._id}`))
			fail(`use deal ${d._id} is ${d.status} without its debit deal:${d._id}`);
		const returned = model.returns.get(d._id);
		if (
			returned &&
			(returned.cancelled ? d.status !== "cancelled" : (d.returnedPoints ?? 0) < returned.points)
		)
			fail(
				`deal ${d._id} was answered ${JSON.stringify(returned)} returned; it is stored ${d.status}, ${d.returnedPoints ?? 0} returned`
			);
		const answered = model.deals.get(d._id);
		if (answered?.status === "success" && d.status === "fail")
			fail(`deal ${d._id} was answered success and is now fail`);
	}
	for (const id of model.deals.keys())
		if (!dealById.has(id)) fail(`deal ${id} was answered 201 and is not stored`);
	if (storedDeals.length > model.attempts.deals)
		fail(
			`${storedDeals.length} deals stored for ${model.attempts.deals} requests that could make one`
		);

	const storedOrders = await orders.store.find({ query: {} });
	const orderById = new Map(storedOrders.map(o => [o._id, o]));
	for (const o of storedOrders) {
		const entries = causesOf([`order:${o._id}`, `order-cancel:${o._id}`]);
		const expected = o.status === "paid" ? o.points : 0;
		if (o.status === "pending") fail(`order ${o._id} still pending after the sweep`);
		if (net(entries) !== expected)
			fail(
				`order ${o._id} (${o.status}, points ${o.points}) should net ${expected}, nets ${net(entries)}: ` +
					entries.map(e => `${e._id} ${e.amount}`).join(", ")
			);
		if (o.status === "paid" && !byCause.has(`order:${o._id}`))
			fail(`paid order ${o._id} has no accrual`);
	}
	for (const id of model.cancelledOrders)
		if (orderById.get(id)?.status !== "cancelled")
			fail(`order ${id} was answered cancelled; it is ${orderById.get(id)?.status}`);
	for (const id of model.orders)
		if (!orderById.has(id)) fail(`order ${id} was answered 201 and is not stored`);
	if (storedOrders.length > model.attempts.orders)
		fail(
			`${storedOrders.length} orders stored for ${model.attempts.orders} requests that could make one`
		);

	// Transfers conserve: each one out is in, or refunded, once.
	let transferTotal = 0;
	for (const e of ledger.filter(e => e._id.startsWith("transfer-"))) transferTotal += e.amount;
	if (transferTotal !== 0)
		fail(`transfers do not conserve points: they add up to ${transferTotal}`);
	for (const out of ledger.filter(e => e._id.startsWith("transfer-out:"))) {
		const id = out._id.slice("transfer-out:".length);
		const sides = [byCause.has(`transfer-in:${id}`), byCause.has(`transfer-refund:${id}`)].filter(
			Boolean
		);
		if (sides.length !== 1)
			fail(`transfer ${id}: ${sides.length} of its receiving side and refund`);
	}
	for (const id of model.transfers)
		if (!byCause.has(`transfer-out:${id}`))
			fail(`transfer ${id} was answered 201 and is not in the ledger`);

	const adjustments = ledger.filter(e => e._id.startsWith("adjustment:"));
	for (const [id, amount] of model.adjustments)
		if (byCause.get(`adjustment:${id}`)?.amount !== amount)
			fail(
				`adjustment ${id} of ${amount} was answered 201; the ledger has ${byCause.get(`adjustment:${id}`)?.amount}`
			);
	if (adjustments.length > model.attempts.adjustments)
		fail(
			`${adjustments.length} adjustments in the ledger for ${model.attempts.adjustments} requests`
		);

	// A tier bonus: a save's, with its earning; its revocations never take back more than it gave.
	for (const bonus of ledger.filter(e => e._id.startsWith("deal-bonus:"))) {
		const id = bonus._id.slice("deal-bonus:".length);
		if (dealById.get(id)?.type !== "save" || !byCause.has(`deal:${id}`))
			fail(`tier bonus ${bonus._id} (${bonus.amount}) without a save's earning deal:${id}`);
		const all = causesOf([bonus._id, `deal-bonus-cancel:${id}`, `deal-bonus-return:${id}:`]);
		if (bonus.amount <= 0 || net(all) < 0)
			fail(`tier bonus ${bonus._id} of ${bonus.amount} nets ${net(all)} with its revocations`);
	}
	for (const e of ledger.filter(e => e._id.startsWith("tier:")))
		if (e.amount !== 0) fail(`tier change ${e._id} moves ${e.amount} points`);
	for (const e of ledger.filter(e => /^deal-bonus-(cancel|return):/.test(e._id)))
		if (!byCause.has(`deal-bonus:${e._id.split(":")[1]}`))
			fail(`${e._id} revokes a tier bonus that was never given`);

	// Every entry is explained by something that exists.
	for (const e of ledger) {
		const [kind, id] = e._id.split(":");
		const known =
			kind.startsWith("deal") || kind === "release"
				? dealById.has(id)
				: kind.startsWith("order")
					? orderById.has(id)
					: kind.startsWith("transfer")
						? byCause.has(`transfer-out:${id}`)
						: ["adjustment", "expiry", "expire", "tier"].includes(kind);
		if (!known) fail(`ledger entry ${e._id} (${e.amount}) has no source`);
	}

	// Held points: each release at most once (a cause), never more than the hold.
	for (const a of accounts) {
		const holds = Object.values(a.holds ?? {}).reduce((sum, h) => sum + h.points, 0);
		if (holds !== (a.held ?? 0))
			fail(`account ${a._id} holds ${holds} but says ${a.held ?? 0} held`);
	}
	checkHolds(model, storedDeals, ledger, accounts);

	await checkSettlements(system, model, storedDeals, now);
}

/**
 * A save of a merchant that holds points for `holdDays` is held until its deal's date plus those
 * days, unless its points arrived later; once that moment has passed, it is released once, in full
 * (what is still held of the earning and its bonus after returns), never before, and at the latest
 * by the release job's next run. A merchant that holds nothing never holds a point.
 */
function checkHolds(model: Model, deals: Deal[], ledger: LedgerEntry[], accounts: Account[]) {
	const about = new Map<string, LedgerEntry[]>();
	for (const e of ledger) {
		if (e.sourceType !== "deal") continue;
		const entries = about.get(e.sourceId);
		if (entries) entries.push(e);
		else about.set(e.sourceId, [e]);
	}
	for (const d of deals.filter(d => d.type === "save")) {
		const { holdDays = 0 } = model.terms[d.merchantId];
		const entries = about.get(d._id) ?? [];
		if (!holdDays) {
			const held = entries.find(e => e.held);
			if (held)
				fail(`${held._id} moves ${held.held} held points; merchant ${d.merchantId} holds none`);
			continue;
		}
		const releaseAt = new Date(Date.parse(d.dealDate) + holdDays * DAY).toISOString();
		const earning = entries.find(e => e._id === `deal:${d._id}`);
		if (earning) {
			const due = earning.at < releaseAt && earning.amount > 0 ? earning.amount : 0;
			if ((earning.held ?? 0) !== due || (due && earning.releaseAt !== releaseAt))
				fail(
					`save ${d._id} earned ${earning.amount} at ${earning.at} and held ${earning.held ?? 0} until ${earning.releaseAt}; ` +
						`its merchant holds ${holdDays} days from ${d.dealDate}: ${due} until ${releaseAt}`
				);
		}
		const release = entries.find(e => e._id === `release:${d._id}`);
		const held = entries.filter(e => e !== release).reduce((sum, e) => sum + (e.held ?? 0), 0);
		const hold = accounts.find(a => a._id === d.memberId)?.holds?.[d._id];
		if (release) {
			if (release.at < releaseAt)
				fail(`${release._id} at ${release.at}, before its hold ends at ${releaseAt}`);
			if (release.held !== -held || hold)
				fail(
					`${release._id} released ${-(release.held ?? 0)} points; the deal's entries held ${held}, and the account still holds ${JSON.stringify(hold)}`
				);
		} else if (held !== (hold?.points ?? 0) || (held && hold?.releaseAt !== releaseAt))
			fail(
				`save ${d._id}'s entries hold ${held} points until ${releaseAt}; the account holds ${JSON.stringify(hold)}`
			);
		else if (held && model.releasedAt && releaseAt <= model.releasedAt)
			fail(
				`save ${d._id}'s ${held} points, held until ${releaseAt}, were not released by the release job run at ${model.releasedAt}`
			);
	}
}

/** Every settlement is the sum of its lines; across months, they bill each deal's points once. */
async function checkSettlements(system: SimSystem, model: Model, deals: Deal[], now: string) {
	const months: string[] = [];
	for (let m = model.startMonth; m <= monthOf(now); m = addMonths(m, 1)) months.push(m);
	for (const [merchantId, terms] of Object.entries(model.terms)) {
		let redeemed = 0;
		let issued = 0;
		for (const month of months) {
			const reply = await system.http("GET", `/billings/${merchantId}/${month}`);
			if (reply.status === 404) continue;
			if (reply.status !== 200)
				fail(`GET /billings/${merchantId}/${month}: ${reply.status} ${reply.text}`);
			const s = reply.body as Settlement;
			const id = `${merchantId}:${month}`;
			const sum = (type: string, field: "points" | "amount") =>
				s.lines.filter(l => l.type === type).reduce((total, l) => total + l[field], 0);
			if (s.redeemed.points !== sum("use", "points") || s.redeemed.amount !== sum("use", "amount"))
				fail(
					`settlement ${id}: redeemed ${JSON.stringify(s.redeemed)} is not the sum of its lines`
				);
			if (s.issued.points !== sum("save", "points") || s.issued.amount !== sum("save", "amount"))
				fail(`settlement ${id}: issued ${JSON.stringify(s.issued)} is not the sum of its lines`);
			for (const line of s.lines) {
				if (deals.find(d => d._id === line.dealId)?.merchantId !== merchantId)
					fail(`settlement ${id} bills deal ${line.dealId}, which is not stored or not its`);
				const rate = line.type === "use" ? BASIS - terms.redemptionFeeBp : terms.pointPriceBp;
				if (line.amount !== atRate(line.points, rate))
					fail(
						`settlement ${id}: line of ${line.dealId} is ${line.amount}, its merchant's terms make ${atRate(line.points, rate)}`
					);
			}
			if (s.status === "final") {
				const text = JSON.stringify(s);
				const before = model.finals.get(id);
				if (before && before !== text) fail(`final settlement ${id} changed:\n${before}\n${text}`);
				model.finals.set(id, text);
			}
			redeemed += s.redeemed.points;
			issued += s.issued.points;
		}
		const due = (type: string) =>
			deals
				.filter(d => d.merchantId === merchantId && d.type === type)
				.filter(d => d.status === "success" || d.status === "partially_cancelled")
				.reduce((sum, d) => sum + d.point - (d.returnedPoints ?? 0), 0);
		if (redeemed !== due("use") || issued !== due("save"))
			fail(
				`merchant ${merchantId}'s settlements bill ${redeemed} redeemed and ${issued} issued points; ` +
					`its deals make ${due("use")} and ${due("save")}`
			);
	}
}
