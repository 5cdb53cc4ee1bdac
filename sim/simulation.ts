/**
 * One seed of the simulation: the whole system in this process (sim/system.ts), a workload and
 * faults drawn from the seed's generator, and the checks of sim/checks.ts at quiet moments between
 * and at the end. The same seed draws the same operations and faults in the same order
 * (docs/simulation.md says what else may differ between two runs).
 */
import { monthOf } from "../lib/months";
import { checkQuiet, Violation, type Model } from "./checks";
import { UNAVAILABLE, type DeliveryMode, type Outage, type PublishFault } from "./channels";
import { SimClock } from "./clock";
import { Prng } from "./prng";
import type { StoreFaultKind } from "./store";
import { CRASHABLE, SimSystem, TIMED_OUT_CALLS, type Reply, type Store } from "./system";
import { checkWebhooks, drainWebhooks, Receiver, type Subscription } from "./webhooks";

export interface SeedOptions {
	store: Store;
	/** Client operations in the seed (besides deliveries and clock moves). */
	operations?: number;
}

export interface SeedResult {
	seed: number;
	ok: boolean;
	failure?: string;
	/** The seed's operations and faults, in order. */
	trace: string[];
	ms: number;
}

const MEMBERS = ["m1", "m2", "m3", "m4", "m5"];
/** The node's default terms (open merchant 20), and a registered one that holds points two days. */
const MERCHANTS = ["20", "h1"];
/** Merchant h1's terms as the seed registers it, in basis points (its point price is the node's). */
const H1_TERMS = { earnRateBp: 500, redemptionFeeBp: 300, holdDays: 2 };
const DAY = 86_400_000;
/** A key's lease (IDEMPOTENCY_LEASE_MS default): a client that got 409 REQUEST_IN_PROGRESS waits it out. */
const LEASE_MS = 30_000;
/** Twice the call timeout (CALL_TIMEOUT_MS default): pending records older than it are swept. */
const SWEEP_AFTER_MS = 4_001;
/** WEBHOOK_RETRY_SCHEDULE in the simulation (sim/system.ts): minutes, so that clock moves bring retries due. */
const LONGEST_WEBHOOK_RETRY_MS = 10 * 60_000;

interface Intensity {
	/** Chance per step of arming a store fault, a call timeout, failing publishes; of a delivery going wrong. */
	storeFault: number;
	callTimeout: number;
	publishFault: number;
	delivery: number;
	/** Chance per delivery of its group's dependency becoming unavailable (the handler fails before it runs). */
	handlerFault: number;
	/** Chance a client loses an answer and retries. */
	retry: number;
}

type Body = Record<string, unknown>;

class Simulation {
	readonly rng: Prng;
	readonly clock = new SimClock();
	readonly trace: string[] = [];
	readonly system: SimSystem;
	private step = 0;
	private keys = 0;
	private readonly intensity: Intensity;
	/** Deals and orders the clients know of (from answers), for returns and cancellations. */
	private readonly dealIds: string[] = [];
	private readonly orderIds: string[] = [];
	readonly model: Model;
	private readonly receiver: Receiver;
	private readonly subscriptions: Subscription[] = [];

	constructor(
		readonly seed: number,
		readonly options: SeedOptions
	) {
		this.rng = new Prng(seed);
		// Late in a month, so that month ends come soon.
		this.clock.set(
			`2030-0${this.rng.int(1, 9)}-${this.rng.int(24, 28)}T${String(this.rng.int(0, 23)).padStart(2, "0")}:00:00.000Z`
		);
		const calm = this.rng.chance(0.15);
		this.intensity = {
			storeFault: calm ? 0 : this.rng.pick([0.03, 0.06, 0.1]),
			callTimeout: calm ? 0 : this.rng.pick([0.03, 0.08]),
			delivery: calm ? 0 : this.rng.pick([0.1, 0.25]),
			retry: this.rng.pick([0.1, 0.3]),
			publishFault: calm ? 0 : this.rng.pick([0.03, 0.08]),
			handlerFault: calm ? 0 : this.rng.pick([0.03, 0.1])
		};
		// The endpoint answers in the order requests reach it: a generator of its own.
		this.receiver = new Receiver(
			new Prng(this.rng.int(0, 0x7fffffff)),
			calm ? 0 : this.rng.pick([0, 0.1, 0.3])
		);
		this.system = new SimSystem(this.clock, options.store, seed, what =>
			this.note(`  fault: ${what}`)
		);
		const { config } = this.system;
		this.model = {
			deals: new Map(),
			orders: new Set(),
			adjustments: new Map(),
			transfers: new Set(),
			returns: new Map(),
			cancelledOrders: new Set(),
			attempts: { deals: 0, orders: 0, adjustments: 0 },
			finals: new Map(),
			terms: {
				"20": {
					earnRateBp: config.earnRateBp,
					redemptionFeeBp: config.settlementFeeBp,
					pointPriceBp: config.pointPriceBp,
					holdDays: config.pointsHoldDays
				},
				h1: { ...H1_TERMS, pointPriceBp: config.pointPriceBp }
			},
			startMonth: monthOf(this.clock.iso())
		};
	}

	note(line: string): void {
		this.trace.push(line);
	}

	async run(): Promise<void> {
		this.clock.install();
		try {
			await this.system.start();
			this.note(`start ${this.clock.iso()} ${JSON.stringify(this.intensity)}`);
			await this.subscribe();
			await this.post(
				"POST",
				"/merchants",
				{ merchantId: "h1", name: "Holds", earnRate: "0.05", redemptionFee: "0.03", holdDays: 2 },
				false
			);
			for (const memberId of MEMBERS.slice(0, 3))
				await this.post("POST", "/members", { memberId, name: `Member ${memberId}` }, false);
			const operations = this.options.operations ?? 40;
			for (this.step = 1; this.step <= operations; this.step++) {
				await this.oneStep();
				if (this.step % 15 === 0) await this.quiet();
			}
			await this.quiet();
		} finally {
			try {
				await this.system.stop();
			} finally {
				await this.receiver.stop();
				this.clock.uninstall();
			}
		}
	}

	/** A staff webhook for deals and joins, and sometimes merchant h1's for its deals, at the simulator's endpoint. */
	private async subscribe(): Promise<void> {
		const port = await this.receiver.start();
		const wanted: Omit<Subscription, "webhookId" | "secret">[] = [
			{ path: "/staff", events: ["deal.created", "member.joined"] }
		];
		if (this.rng.chance(0.5))
			wanted.push({ path: "/h1", events: ["deal.created"], merchantId: "h1" });
		for (const { path, events, merchantId } of wanted) {
			const reply = await this.post(
				"POST",
				"/webhooks",
				{ url: `http://127.0.0.1:${port}${path}`, events, ...(merchantId ? { merchantId } : {}) },
				false
			);
			const b = reply.body as { webhookId?: string; secret?: string };
			if (reply.status !== 201 || !b.webhookId || !b.secret)
				throw new Violation(`subscribing a webhook answered ${reply.status} ${reply.text}`);
			this.subscriptions.push({
				path,
				events,
				merchantId,
				webhookId: b.webhookId,
				secret: b.secret
			});
		}
	}

	private async oneStep(): Promise<void> {
		if (this.rng.chance(this.intensity.storeFault)) {
			const kind = this.rng.pick<StoreFaultKind>([
				"write-fails",
				"write-unacknowledged",
				"crash-after-write"
			]);
			const service = this.rng.pick(CRASHABLE);
			const nth = this.rng.int(1, 4);
			this.system.faults.arm({ kind, service, nth });
			this.note(`#${this.step} arm ${kind} at ${service}'s write +${nth}`);
		}
		if (this.rng.chance(this.intensity.callTimeout)) {
			const call = this.rng.pick(TIMED_OUT_CALLS);
			this.system.timeouts.add(call);
			this.note(`#${this.step} arm timeout of ${call}`);
		}
		if (this.rng.chance(this.intensity.publishFault)) {
			const kind = this.rng.pick<PublishFault>(["down", "unacknowledged"]);
			const count = this.rng.int(1, 3);
			this.system.channels.failPublishes(count, kind);
			this.note(`#${this.step} arm the next ${count} publishes: ${kind}`);
		}
		const op = this.rng.weighted({
			deliver: 30,
			join: 3,
			save: 14,
			use: 12,
			ret: 8,
			order: 6,
			cancelOrder: 3,
			transfer: 5,
			adjust: 4,
			withdraw: 1,
			settle: 3,
			clock: 8
		});
		// Deliveries beside a request draw from a generator of their own: the two interleave by timing,
		// and the request's own draws must not depend on it.
		const beside =
			op !== "deliver" && op !== "clock" && this.rng.chance(0.2)
				? { n: this.rng.int(1, 3), rng: new Prng(this.rng.int(0, 0x7fffffff)) }
				: undefined;
		const work = this.operation(op);
		await Promise.all(beside ? [work, this.deliverSome(beside.n, true, beside.rng)] : [work]);
		const restarted = await this.system.restartDead();
		if (restarted.length)
			this.note(`#${this.step} restarted ${restarted.join(", ")} from their stores`);
	}

	private operation(op: string): Promise<unknown> {
		const member = () => this.rng.pick(MEMBERS);
		switch (op) {
			case "deliver":
				return this.deliverSome(this.rng.int(1, 6));
			case "join":
				return this.post("POST", "/members", { memberId: member(), name: "Joiner" });
			case "save":
				this.model.attempts.deals++;
				return this.post("POST", "/deals", {
					memberId: member(),
					merchantId: this.rng.pick(MERCHANTS),
					dealAmount: this.rng.int(1, 400) * 50,
					type: "save"
				});
			case "use":
				this.model.attempts.deals++;
				return this.post("POST", "/deals", {
					memberId: member(),
					merchantId: this.rng.pick(MERCHANTS),
					dealAmount: this.rng.int(1, 100) * 100,
					type: "use",
					point: this.rng.int(1, 300)
				});
			case "ret": {
				if (!this.dealIds.length) return Promise.resolve();
				const id = this.rng.pick(this.dealIds);
				return this.post(
					"POST",
					`/deals/${id}/cancel`,
					this.rng.chance(0.5) ? { amount: this.rng.int(1, 60) * 50 } : {}
				);
			}
			case "order":
				this.model.attempts.orders++;
				return this.post("POST", "/orders", {
					memberId: member(),
					productId: "p1",
					qty: this.rng.int(1, 6),
					unitPrice: this.rng.int(1, 50) * 100
				});
			case "cancelOrder":
				if (!this.orderIds.length) return Promise.resolve();
				return this.post("POST", `/orders/${this.rng.pick(this.orderIds)}/cancel`, {});
			case "transfer": {
				const from = member();
				return this.post("POST", `/points/${from}/transfers`, {
					toMemberId: this.rng.pick(MEMBERS.filter(m => m !== from)),
					points: this.rng.int(1, 150)
				});
			}
			case "adjust":
				this.model.attempts.adjustments++;
				return this.post("POST", `/points/${member()}/adjustments`, {
					amount: this.rng.chance(0.7) ? this.rng.int(1, 200) : -this.rng.int(1, 200),
					reason: "simulated correction"
				});
			case "withdraw":
				return this.post("DELETE", `/members/${member()}`, undefined);
			case "settle": {
				const month = this.rng.chance(0.5)
					? monthOf(this.clock.iso())
					: monthOf(new Date(this.clock.now - 28 * DAY).toISOString());
				return this.post("POST", "/billings", {
					merchantId: this.rng.pick(MERCHANTS),
					billingMonth: month
				});
			}
			default:
				return this.moveClock();
		}
	}

	/**
	 * A client's request, and its retries: with an `Idempotency-Key` (most), a retry after a lost
	 * answer must get the first answer again, or run under the same request id and answer the same
	 * thing; without one, a retry is a new request.
	 */
	private async post(
		method: string,
		path: string,
		body: Body | undefined,
		retries = true
	): Promise<Reply> {
		const keyed = method === "POST" && this.rng.chance(0.8);
		const key = keyed ? `k${this.seed}-${++this.keys}` : undefined;
		let first: Reply | undefined;
		let reply = await this.send(method, path, body, key);
		for (let attempt = 0; retries && attempt < 3; attempt++) {
			const inProgress =
				reply.status === 409 && (reply.body as { type?: string })?.type === "REQUEST_IN_PROGRESS";
			if (reply.status < 500 && !inProgress) {
				// The answer came, but the client lost it: it retries (without a key, as a new request).
				if (!this.rng.chance(this.intensity.retry)) break;
				first ??= reply;
			}
			// REQUEST_IN_PROGRESS: the first run's answer was never recorded; its lease has to run out.
			if (inProgress) this.clock.advance(LEASE_MS + 1);
			// A retry after a 5xx may be a new attempt (a 503 after the service undid its work is one).
			if (!key || reply.status >= 500) this.countAttempt(path);
			reply = await this.send(method, path, body, key, "retry");
			if (key && first && reply.status < 500 && reply.status !== 409) {
				this.sameAnswer(path, first, reply);
				// It ran again (the first run's answer was never recorded): a replay repeats this one.
				if (!reply.replayed) first = reply;
			}
		}
		return reply;
	}

	private countAttempt(path: string): void {
		if (path === "/deals") this.model.attempts.deals++;
		else if (path === "/orders") this.model.attempts.orders++;
		else if (path.endsWith("/adjustments")) this.model.attempts.adjustments++;
	}

	/** A retry under a key answered after the first: the same answer, or (run again) the same thing made. */
	private sameAnswer(path: string, first: Reply, again: Reply): void {
		if (again.replayed) {
			if (again.status !== first.status || again.text !== first.text)
				throw new Violation(
					`the replay of ${path} answered ${again.status} ${again.text}, the first answer was ${first.status} ${first.text}`
				);
			return;
		}
		const idOf = (r: Reply) => {
			const b = r.body as Record<string, unknown>;
			return b?.id ?? b?.adjustmentId ?? b?.transferId ?? b?.memberId ?? b?._id;
		};
		if (first.status < 300 && again.status < 300 && idOf(first) !== idOf(again))
			throw new Violation(
				`a retry of ${path} under the same key made ${String(idOf(again))}, the first made ${String(idOf(first))}`
			);
	}

	private async send(
		method: string,
		path: string,
		body: Body | undefined,
		key?: string,
		what = ""
	): Promise<Reply> {
		const reply = await this.system.http(method, path, body, key);
		const b = reply.body as Record<string, unknown> | undefined;
		const summary =
			reply.status < 300
				? String(b?.id ?? b?.adjustmentId ?? b?.transferId ?? b?.status ?? "")
				: String(b?.type ?? "");
		this.note(
			`#${this.step} ${what ? `${what} ` : ""}${method} ${path} ${body ? JSON.stringify(body) : ""}${key ? ` key=${key}` : ""} → ${reply.status} ${summary}${reply.replayed ? " (replayed)" : ""}`
		);
		if (reply.status < 300 && b) this.learn(path, b);
		return reply;
	}

	private learn(path: string, b: Record<string, unknown>): void {
		if (/^\/deals\/[^/]+\/cancel$/.test(path)) {
			const id = String(b.id);
			const returned = Number(b.returnedPoints ?? (b.status === "cancelled" ? b.point : 0));
			this.model.returns.set(id, {
				points: Math.max(returned, this.model.returns.get(id)?.points ?? 0),
				cancelled: b.status === "cancelled" || !!this.model.returns.get(id)?.cancelled
			});
		} else if (/^\/orders\/[^/]+\/cancel$/.test(path)) this.model.cancelledOrders.add(String(b.id));
		else if (path === "/deals") {
			const id = String(b.id);
			if (!this.model.deals.has(id)) this.dealIds.push(id);
			this.model.deals.set(id, { status: String(b.status) });
		} else if (path === "/orders") {
			const id = String(b.id);
			if (!this.model.orders.has(id)) this.orderIds.push(id);
			this.model.orders.add(id);
		} else if (path.endsWith("/adjustments"))
			this.model.adjustments.set(String(b.adjustmentId), Number(b.amount));
		else if (path.endsWith("/transfers")) this.model.transfers.add(String(b.transferId));
	}

	/**
	 * Hands up to `n` waiting messages to their consumers, in an order and a manner drawn from the
	 * seed; with faults, a delivery may find its group's dependency unavailable, for that delivery or
	 * for a while.
	 */
	private async deliverSome(n: number, faults = true, rng = this.rng): Promise<void> {
		for (let i = 0; i < n; i++) {
			const ready = this.system.channels.deliverable();
			if (!ready.length) return;
			const delivery = rng.pick(ready);
			const mode: DeliveryMode =
				faults && rng.chance(this.intensity.delivery)
					? rng.pick(["ack-lost", "duplicate"] as const)
					: "normal";
			const outage: Outage | undefined =
				faults && rng.chance(this.intensity.handlerFault)
					? {
							kind: rng.pick(Object.keys(UNAVAILABLE) as Outage["kind"][]),
							forMs: rng.pick([0, 0, 30_000, 5 * 60_000, 15 * 60_000])
						}
					: undefined;
			const how = [
				...(mode === "normal" ? [] : [mode]),
				...(outage ? [`dependency unavailable (${outage.kind}) for ${outage.forMs / 1000} s`] : [])
			];
			this.note(
				`#${this.step} deliver ${delivery.msg.channel}#${delivery.msg.seq} → ${delivery.group}${how.length ? ` (${how.join(", ")})` : ""}`
			);
			const failed = await this.system.channels.deliver(delivery, mode, outage);
			if (failed) this.note(`#${this.step}   ${failed}`);
		}
	}

	/**
	 * Hands over every waiting message, without new faults; those that fail wait out their retry
	 * delays (the clock moves to the soonest), as long as a dependency stays unavailable.
	 */
	private async drainChannels(): Promise<void> {
		const started = this.clock.now;
		for (;;) {
			await this.deliverSome(Infinity, false);
			const next = this.system.channels.nextRetry();
			if (next === undefined) return;
			if (next - started > DAY)
				throw new Violation(`messages still failing after a day of retries: ${this.stuck()}`);
			this.clock.advance(next - this.clock.now);
		}
	}

	private stuck(): string {
		return [...this.system.channels.failures.entries()]
			.map(([k, f]) => `${k} ×${f.count}: ${f.error}`)
			.join("; ");
	}

	/** Time passes: minutes, days, or past a month's end (and its grace); the jobs that time starts run. */
	private async moveClock(): Promise<void> {
		const how = this.rng.weighted({ minutes: 3, days: 4, monthEnd: 3 });
		if (how === "minutes") this.clock.advance(this.rng.int(1, 120) * 60_000);
		else if (how === "days") this.clock.advance(this.rng.int(1, 10) * DAY);
		else {
			const now = new Date(this.clock.now);
			const next = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1);
			this.clock.advance(next - this.clock.now + this.rng.int(11, 120) * 60_000);
		}
		this.note(`#${this.step} clock → ${this.clock.iso()}`);
		await this.jobs();
	}

	/**
	 * The daily jobs (holds, expiry, tier review) and the month-end one, as their timers would run
	 * them (they wait real minutes). The model learns when the release job last ran through.
	 */
	private async jobs(): Promise<void> {
		for (const action of [
			"points.release",
			"points.expire",
			"points.reviewTiers",
			"billing.closeMonth"
		])
			try {
				await this.system.broker.call(action, {});
				if (action === "points.release") this.model.releasedAt = this.clock.iso();
			} catch (err) {
				this.note(`#${this.step} ${action} failed: ${(err as Error).message}`);
			}
	}

	/**
	 * A quiet moment: no new faults, crashed services back, every outbox sent, every pending record
	 * swept, every message handled (an unavailable dependency waited out); then the checks.
	 */
	async quiet(): Promise<void> {
		this.system.faults.disarm();
		this.system.timeouts.clear();
		this.system.channels.failPublishes(0);
		this.receiver.calm = true;
		this.note(`#${this.step} quiet`);
		for (let round = 0; ; round++) {
			await this.system.restartDead();
			for (const service of this.system.broker.services) {
				const s = service as unknown as {
					retryOutbox?(): Promise<void>;
					sweepPending?(): Promise<void>;
					finishUnfinished?(): Promise<void>;
				};
				await s.retryOutbox?.();
				await s.finishUnfinished?.();
			}
			await this.drainChannels();
			if (await this.pendingRecords()) {
				this.clock.advance(SWEEP_AFTER_MS);
				for (const service of this.system.broker.services)
					await (service as unknown as { sweepPending?(): Promise<void> }).sweepPending?.();
				continue;
			}
			if (!this.system.channels.backlog()) break;
			if (round > 20)
				throw new Violation(
					`messages never handled: ${this.system.channels.backlog()} waiting; failures: ${this.stuck()}`
				);
		}
		await this.jobs();
		await this.drainChannels();
		// Nothing in a seed is a poison message: each failure passes, and none may be given up on.
		const { deadLettered } = this.system.channels;
		if (deadLettered.length)
			throw new Violation(`messages dead-lettered: ${deadLettered.join("; ")}`);
		await drainWebhooks(this.system, ms => this.clock.advance(ms), LONGEST_WEBHOOK_RETRY_MS);
		await checkQuiet(this.system, this.model, this.clock.iso());
		await checkWebhooks(this.system, this.receiver, this.subscriptions);
		const received = this.receiver.received;
		this.note(
			`#${this.step} webhooks: ${received.length} requests received, ${received.filter(r => r.status >= 500).length} answered 500`
		);
		this.receiver.calm = false;
	}

	private async pendingRecords(): Promise<boolean> {
		for (const name of ["deals", "orders"]) {
			const store = (
				this.system.service(name) as unknown as { store: { count(q: object): Promise<number> } }
			).store;
			if (await store.count({ status: "pending" })) return true;
		}
		return false;
	}
}

export async function runSeed(seed: number, options: SeedOptions): Promise<SeedResult> {
	const started = performance.now();
	const sim = new Simulation(seed, options);
	try {
		await sim.run();
		return { seed, ok: true, trace: sim.trace, ms: performance.now() - started };
	} catch (err) {
		const failure = err instanceof Violation ? err.message : `${(err as Error).stack ?? err}`;
		return { seed, ok: false, failure, trace: sim.trace, ms: performance.now() - started };
	}
}
