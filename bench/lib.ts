/** What the benchmarks share: load generation, figures, the correctness check and the table. */
import type { EventEmitter } from "node:events";
import fs from "node:fs";
import autocannon from "autocannon";
import type { System } from "../test/helpers/system";
import { TOKENS } from "../test/helpers/system";

export interface Options {
	/** How long each measured load runs (s). */
	seconds: number;
	/** Concurrent connections or callers. */
	connections: number;
	/** Members the deals are spread over. */
	members: number;
	/** Ledger sizes of the growth benchmark. */
	sizes: number[];
	/** Throughput is also reported per window of this many seconds (whole seconds over HTTP). */
	window: number;
	/** Rows of the bulk import (and so entries of the ledger export). */
	importRows: number;
}

export interface Figures {
	perSecond: number;
	p50: number;
	p99: number;
	errors: number;
	/** Per second in each consecutive window of the load: flat when the last is within 20% of the first. */
	windows: number[];
}

/** Is the last window's throughput within 20% of the first's? */
export const isFlat = (f: Figures): boolean =>
	f.windows.length > 0 && f.windows[f.windows.length - 1] >= 0.8 * f.windows[0];

export interface Row {
	what: string;
	figures: Figures;
	baseline: string;
	baselineFigures: Figures;
}

export const AUTH = { authorization: `Bearer ${TOKENS.staff}`, "content-type": "application/json" };

/** A deal body as a busy shop sends them: 70% saves, 30% small uses, over many members. */
export function dealBody(members: number, prefix = "b"): Record<string, unknown> {
	const memberId = `${prefix}${Math.floor(Math.random() * members)}`;
	return Math.random() < 0.7
		? {
				memberId,
				merchantId: String(20 + Math.floor(Math.random() * 5)),
				dealAmount: 1000 + Math.floor(Math.random() * 99_000),
				type: "save"
			}
		: {
				memberId,
				merchantId: String(20 + Math.floor(Math.random() * 5)),
				dealAmount: 1000,
				type: "use",
				point: 1 + Math.floor(Math.random() * 20)
			};
}

/** Drives one HTTP request shape with autocannon for `seconds`. */
export async function httpLoad(
	url: string,
	options: Options,
	request: autocannon.Request
): Promise<Figures> {
	const window = Math.max(1, Math.round(options.window));
	const perSecond: number[] = [];
	// Without a callback autocannon's instance is also the promise of its result (not in its typings).
	const instance = autocannon({
		url,
		connections: options.connections,
		duration: options.seconds,
		requests: [request]
	}) as unknown as EventEmitter & Promise<autocannon.Result>;
	// It ticks once a second with the responses of that second (and once more as it stops).
	instance.on("tick", ({ counter }: { counter: number }) => perSecond.push(counter));
	const result = await instance;
	const windows: number[] = [];
	for (let i = 0; i + window <= Math.min(perSecond.length, options.seconds); i += window)
		windows.push(perSecond.slice(i, i + window).reduce((a, b) => a + b, 0) / window);
	return {
		perSecond: result.requests.average,
		p50: result.latency.p50,
		p99: result.latency.p99,
		errors: result.errors + result.timeouts + result.non2xx,
		windows
	};
}

/** Calls `call` from `connections` concurrent callers for `seconds`, timing each call. */
export async function callLoad(options: Options, call: () => Promise<unknown>): Promise<Figures> {
	const latencies: number[] = [];
	const windows = Array.from(
		{ length: Math.max(1, Math.floor(options.seconds / options.window)) },
		() => 0
	);
	let errors = 0;
	const started = performance.now();
	const deadline = started + options.seconds * 1000;
	const caller = async () => {
		while (performance.now() < deadline) {
			const t = performance.now();
			try {
				await call();
				const done = performance.now();
				latencies.push(done - t);
				const w = Math.floor((done - started) / 1000 / options.window);
				if (w < windows.length) windows[w]++;
			} catch {
				errors++;
			}
		}
	};
	await Promise.all(Array.from({ length: options.connections }, caller));
	const elapsed = (performance.now() - started) / 1000;
	latencies.sort((a, b) => a - b);
	return {
		perSecond: latencies.length / elapsed,
		p50: percentile(latencies, 0.5),
		p99: percentile(latencies, 0.99),
		errors,
		windows: windows.map(n => n / options.window)
	};
}

/** Sequential GETs of `nextUrl()` until `more(count)` says stop: their p50 and p99 (ms). */
export async function readLatencies(
	system: System,
	nextUrl: () => string,
	more: (count: number) => boolean
): Promise<{ p50: number; p99: number }> {
	const latencies: number[] = [];
	while (more(latencies.length)) {
		const url = nextUrl();
		const t = performance.now();
		const res = await system.call("GET", url);
		if (res.status !== 200) throw new Error(`${url} answered ${res.status}`);
		latencies.push(performance.now() - t);
	}
	latencies.sort((a, b) => a - b);
	return { p50: percentile(latencies, 0.5), p99: percentile(latencies, 0.99) };
}

function percentile(sorted: number[], p: number): number {
	return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] : NaN;
}

/** Joins the members the deals go to, through the gateway. */
export async function joinMembers(system: System, members: number): Promise<void> {
	for (let i = 0; i < members; i += 50)
		await Promise.all(
			Array.from({ length: Math.min(50, members - i) }, (_, k) =>
				system.call("POST", "/api/members", { memberId: `b${i + k}`, name: `bench ${i + k}` })
			)
		);
}

/** Every balance equals the sum of its ledger (read over HTTP, all pages). */
export async function auditOverHttp(
	system: System,
	members: number
): Promise<{ accounts: number; mismatches: number }> {
	let mismatches = 0;
	for (let i = 0; i < members; i++) {
		const memberId = `b${i}`;
		const { balance } = (await system.call<{ balance: number }>("GET", `/api/points/${memberId}`))
			.body;
		let sum = 0;
		for (let page = 1; ; page++) {
			const history = (
				await system.call<{ rows: { amount: number }[]; total: number }>(
					"GET",
					`/api/points/${memberId}/history?page=${page}&pageSize=100`
				)
			).body;
			sum += history.rows.reduce((s, e) => s + e.amount, 0);
			if (page * 100 >= history.total) break;
		}
		if (sum !== balance || balance < 0) mismatches++;
	}
	return { accounts: members, mismatches };
}

/**
 * The audit once the load's aftermath has settled: accruals still travel as events after the last
 * answer, and a posting in flight has its new balance before its ledger copy. Asks again until two
 * audits agree and nothing is in flight (or 30 s pass), and reports the last one.
 */
export async function settledAudit(
	audit: () => Promise<{ accounts: number; mismatches: number }>
): Promise<{ accounts: number; mismatches: number }> {
	const deadline = Date.now() + 30_000;
	let last = await audit();
	for (;;) {
		await new Promise(resolve => setTimeout(resolve, 500));
		const next = await audit();
		if ((next.mismatches === 0 && last.mismatches === 0) || Date.now() > deadline) return next;
		last = next;
	}
}

/** Resident memory of a process (MB), from /proc. */
export function rssMb(pid: number): number {
	const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
	return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN) / 1024;
}

const fmt = (n: number, digits = 0) =>
	Number.isFinite(n)
		? n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits })
		: "–";

/** One line per measure: the figure, its baseline from the same run, and their ratio. */
export function printRows(title: string, rows: Row[]): void {
	console.log(`\n${title}`);
	console.table(
		rows.map(({ what, figures, baseline, baselineFigures }) => ({
			measure: what,
			"per s": fmt(figures.perSecond),
			"p50 ms": fmt(figures.p50, 1),
			"p99 ms": fmt(figures.p99, 1),
			errors: figures.errors,
			baseline,
			"baseline per s": fmt(baselineFigures.perSecond),
			"baseline p99 ms": fmt(baselineFigures.p99, 1),
			ratio: `${fmt((100 * figures.perSecond) / baselineFigures.perSecond)}%`
		}))
	);
}

/** Each load's throughput per window, and whether it held within 20% of its first window. */
export function printWindows(
	title: string,
	loads: { what: string; figures: Figures }[],
	window: number
): void {
	console.log(`\n${title}: per second in each ${window}-second window`);
	for (const { what, figures } of loads)
		console.log(
			`  ${what.padEnd(46)} ${figures.windows.map(n => fmt(n).padStart(7)).join(" ")}  ${isFlat(figures) ? "flat" : "NOT FLAT"}`
		);
}

/** Prints a target and whether this run met it; returns whether it did. */
export function target(description: string, met: boolean): boolean {
	console.log(`${met ? "MET    " : "MISSED "} ${description}`);
	return met;
}

export { fmt };
