/**
 * What the cluster suites check after their load: every account equals what its deals and orders
 * imply, and its ledger sums to its balance with each cause once and each deal's entries as its
 * outcome says. Read over HTTP, as an operator would.
 */
import { eventually } from "./broker";
import type { Reply, System } from "./system";

/**
 * Runs a cluster test; when it fails, prints what each node logged (its warnings and errors, kept
 * across restarts), so that a rare failure on a CI machine explains itself.
 */
export async function explained(
	nodes: Record<string, System>,
	test: () => Promise<void>
): Promise<void> {
	try {
		await test();
	} catch (err) {
		for (const [name, node] of Object.entries(nodes))
			console.error(`--- node ${name}: the last 20 kB of its log ---\n${node.log.slice(-20_000)}`);
		throw err;
	}
}

export type Api = (method: string, urlPath: string, body?: unknown) => Promise<Reply>;

export interface Order {
	id: string;
	status: string;
	reason?: string;
	points: number;
	payment: { id?: string; status: string };
}

export interface Entry {
	cause: string;
	amount: number;
	kind: string;
	shortfall?: number;
}

export interface Deal {
	id: string;
	memberId: string;
	type: "save" | "use";
	point: number;
	status: string;
}

/** Every row of a paged listing. */
export async function all<T>(api: Api, urlPath: string): Promise<T[]> {
	const rows: T[] = [];
	for (let page = 1; ; page++) {
		const res = await api(
			"GET",
			`${urlPath}${urlPath.includes("?") ? "&" : "?"}page=${page}&pageSize=100`
		);
		if (res.status !== 200)
			throw new Error(`GET ${urlPath}: ${res.status} ${JSON.stringify(res.body)}`);
		rows.push(...res.body.rows);
		if (rows.length >= res.body.total) return rows;
	}
}

/**
 * The balance a member's deals and orders imply: saves earned, successful uses spent, cancelled uses
 * restored, failed and voided uses nothing; paid orders earned, and cancelled ones revoked — all but
 * what had been spent already (the revocation's shortfall). `withOrders: false` for a system without orders.
 */
async function impliedBalance(api: Api, memberId: string, withOrders = true): Promise<number> {
	const deals = await all<Deal>(api, `/deals?memberId=${memberId}`);
	const ledger = await all<Entry>(api, `/points/${memberId}/history`);
	// What no deal or order explains: staff adjustments, and earnings that expired (not a withdrawal's).
	const adjustedAndExpired = ledger
		.filter(e => e.kind === "adjust" || (e.kind === "expire" && e.cause.startsWith("expire:")))
		.reduce((sum, e) => sum + e.amount, 0);
	const fromDeals = deals.reduce(
		(sum, d) =>
			sum +
			(d.type === "save" && d.status === "success"
				? d.point
				: d.type === "use" && d.status === "success"
					? -d.point
					: 0),
		adjustedAndExpired
	);
	if (!withOrders) return fromDeals;
	const orders = await all<Order>(api, `/orders?memberId=${memberId}`);
	const shortfall = (orderId: string) =>
		ledger.find(e => e.cause === `order-cancel:${orderId}`)?.shortfall ?? 0;
	return orders.reduce(
		(sum, o) =>
			sum + (o.status === "paid" ? o.points : o.status === "cancelled" ? shortfall(o.id) : 0),
		fromDeals
	);
}

/**
 * Waits (up to a minute) until every member's balance equals what its deals and orders imply: the
 * events of the last requests, or those a dead node had taken, land a little later.
 */
export async function expectBalancesConverge(
	api: Api,
	members: string[],
	withOrders = true
): Promise<void> {
	await eventually(
		async () => {
			for (const memberId of members)
				expect({
					memberId,
					balance: (await api("GET", `/points/${memberId}`)).body.balance
				}).toEqual({ memberId, balance: await impliedBalance(api, memberId, withOrders) });
		},
		60_000,
		500
	);
}

/** The ledger invariants of one member with deals: its sum, one entry per cause, each deal's entries as its outcome says. */
export async function expectDealLedger(api: Api, memberId: string): Promise<Entry[]> {
	const ledger = await all<Entry>(api, `/points/${memberId}/history`);
	const balance = (await api("GET", `/points/${memberId}`)).body.balance;
	expect(ledger.reduce((sum, e) => sum + e.amount, 0)).toBe(balance);
	expect(new Set(ledger.map(e => e.cause)).size).toBe(ledger.length);
	const deals = await all<Deal>(api, `/deals?memberId=${memberId}`);
	for (const save of deals.filter(d => d.type === "save" && d.status === "success"))
		expect(ledger.filter(e => e.cause === `deal:${save.id}`)).toHaveLength(1);
	for (const cancelled of deals.filter(d => d.status === "cancelled"))
		expect(
			ledger.filter(e => e.cause === `deal-cancel:${cancelled.id}`).map(e => e.amount)
		).toEqual([cancelled.point]);
	// A failed use kept no points: no debit, or one undone by its void.
	for (const failed of deals.filter(d => d.type === "use" && d.status === "fail"))
		expect(
			ledger.filter(e => e.cause.endsWith(`:${failed.id}`)).reduce((sum, e) => sum + e.amount, 0)
		).toBe(0);
	return ledger;
}

/**
 * A steady load of 4 clients over HTTP until `stop()`: joins, saves, uses, cancellations of
 * successful uses, and with `orders` also orders and their cancellations. `stop()` answers how many
 * requests succeeded and failed.
 */
export function startLoad(
	api: Api,
	members: string[],
	orders: boolean
): { stop(): Promise<{ ok: number; failed: number }> } {
	let running = true;
	const answered = { ok: 0, failed: 0 };
	const cancellable: string[] = [];
	const cancellableOrders: string[] = [];
	const request = (seed: number, i: number) => {
		const memberId = members[(seed * 7 + i) % members.length];
		const roll = (seed * 31 + i * 17) % (orders ? 12 : 10);
		if (roll < 5)
			return api("POST", "/deals", {
				memberId,
				merchantId: "20",
				dealAmount: 10000 + ((i * 997) % 90000),
				type: "save"
			});
		if (roll < 8)
			return api("POST", "/deals", {
				memberId,
				merchantId: "20",
				dealAmount: 1000,
				type: "use",
				point: 1 + (i % 40)
			}).then(res => {
				if (res.body?.status === "success") cancellable.push(res.body.id);
				return res;
			});
		if (roll < 9 && cancellable.length) return api("POST", `/deals/${cancellable.shift()}/cancel`);
		if (orders && roll < 10)
			return api("POST", "/orders", {
				memberId,
				productId: "set",
				qty: 1 + (i % 6),
				unitPrice: 1000 + ((i * 131) % 4000)
			}).then(res => {
				if (res.body?.status === "paid" && i % 2) cancellableOrders.push(res.body.id);
				return res;
			});
		if (orders && roll < 11 && cancellableOrders.length)
			return api("POST", `/orders/${cancellableOrders.shift()}/cancel`);
		return api("POST", "/members", { name: `walk-in ${seed}-${i}` });
	};
	const worker = async (seed: number) => {
		for (let i = 0; running; i++) {
			try {
				if ((await request(seed, i)).status < 300) answered.ok++;
				else answered.failed++;
			} catch {
				answered.failed++;
			}
			await new Promise(resolve => setTimeout(resolve, 5));
		}
	};
	const load = Promise.all([0, 1, 2, 3].map(worker));
	return {
		async stop() {
			running = false;
			await load;
			return answered;
		}
	};
}
