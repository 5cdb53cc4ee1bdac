/**
 * `npm run bench`: every figure beside its baseline from the same run, then the targets, met or
 * not. `npm run bench -- --smoke` runs each part for a moment (the test suite does, so it cannot rot).
 * `--import-rows=<n>` sets the bulk import's rows (100,000 by default), `--bulk` runs that part only.
 * Loopback only; each part stops by itself.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { Options } from "./lib";

// The in-process part's services read DATA_DIR when the configuration is first loaded, so the
// folder is chosen before any part is.
process.env.DATA_DIR = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-bench-"));
process.env.LOG_LEVEL ??= "warn";

const FULL: Options = {
	seconds: 60,
	window: 5,
	connections: 20,
	members: 500,
	sizes: [10_000, 100_000, 1_000_000, 10_000_000],
	importRows: 100_000
};
const SMOKE: Options = {
	seconds: 2,
	window: 1,
	connections: 4,
	members: 20,
	sizes: [1_000, 3_000],
	importRows: 500
};

/** `--import-rows=<n>`, if given. */
const importRowsArg = process.argv.map(arg => /^--import-rows=(\d+)$/.exec(arg)?.[1]).find(Boolean);

async function runBulk(options: Options): Promise<void> {
	const { fmt } = await import("./lib");
	const { bulkBench } = await import("./imports");
	const bulk = await bulkBench(options.importRows);
	console.log(
		`\nBulk data: ${fmt(bulk.rows)} rows imported in ${fmt(bulk.importSeconds, 1)} s (${fmt(bulk.rowsPerSecond)} rows/s); the ledger's ${fmt(bulk.exported)} entries exported as NDJSON in ${fmt(bulk.exportSeconds, 1)} s (${fmt(bulk.entriesPerSecond)} entries/s), the node's RSS ${fmt(bulk.rssBeforeExportMb)} MB before, ${fmt(bulk.rssAfterExportMb)} MB after`
	);
	if (bulk.exported !== bulk.rows)
		throw new Error(`The export had ${bulk.exported} lines for ${bulk.rows} entries`);
}

async function runBench(options: Options): Promise<void> {
	const { fmt, isFlat, printRows, printWindows, target } = await import("./lib");
	const { httpBench } = await import("./http");
	const { inProcessBench } = await import("./in-process");
	const { natsBench } = await import("./nats");
	const { growthBench } = await import("./growth");

	console.log(
		`OnePoint benchmark: ${os.cpus().length} cores (${os.cpus()[0]?.model}), Node ${process.version}; ${options.seconds} s per load, ${options.connections} concurrent, ${options.members} members`
	);
	const http = await httpBench(options);
	const inProcess = await inProcessBench(options);
	const nats = await natsBench(options);
	const rows = [http.row, http.keyed, inProcess.row, nats.row];
	printRows("Deals beside their baseline (same run)", rows);
	printRows(
		"The gateway beside stock moleculer-web, without and with Moleculer's metrics (same run)",
		[http.gateway, http.gatewayMetrics]
	);
	printRows("The trivial route with tracing off and on (same run)", [http.traced]);
	const loads = rows.flatMap(r => [
		{ what: r.what, figures: r.figures },
		{ what: r.baseline, figures: r.baselineFigures }
	]);
	printWindows(
		"Throughput over each load",
		[
			...loads,
			{ what: "stock moleculer-web GET /api/me", figures: http.gateway.baselineFigures },
			{
				what: "stock moleculer-web GET /api/me, metrics on",
				figures: http.gatewayMetrics.baselineFigures
			},
			{ what: "GET /api/me, tracing on", figures: http.traced.figures }
		],
		options.window
	);
	const { atRest, underLoad } = http.dashboard;
	console.log(
		`\nThe dashboard's member query (p50 / p99 ms): ${fmt(atRest.p50, 1)} / ${fmt(atRest.p99, 1)} at rest, ${fmt(underLoad.p50, 1)} / ${fmt(underLoad.p99, 1)} under the HTTP deal load`
	);

	await runBulk(options);

	const growth = await growthBench(options);
	console.log(
		"\nGrowth: reads (p50 / p99 ms, HTTP), writes (HTTP deals) and memory by ledger size"
	);
	console.table(
		growth.map(g => ({
			"ledger entries": fmt(g.entries),
			"start-up s": fmt(g.startupSeconds, 1),
			"RSS MB": fmt(g.rssMb),
			"GET /points/:id": `${fmt(g.reads.balance.p50, 1)} / ${fmt(g.reads.balance.p99, 1)}`,
			"history page": `${fmt(g.reads.history.p50, 1)} / ${fmt(g.reads.history.p99, 1)}`,
			"dashboard member": `${fmt(g.reads.dashboard.p50, 1)} / ${fmt(g.reads.dashboard.p99, 1)}`,
			"deals per s": fmt(g.writes.perSecond),
			"deal p99 ms": fmt(g.writes.p99, 1)
		}))
	);
	printWindows(
		"Deals (HTTP) with entries already stored",
		growth.map(g => ({ what: `${fmt(g.entries)} entries`, figures: g.writes })),
		options.window
	);

	const audits = [
		{ part: "HTTP", ...http.audit },
		{ part: "in process", ...inProcess.audit },
		{ part: "NATS", ...nats.audit }
	];
	console.log("\nCorrectness after each load: every balance equals the sum of its ledger");
	console.table(audits);

	const [first, last] = [growth[0], growth[growth.length - 1]];
	// The start-up target is at a million entries (the smoke run's largest size stands in for it).
	const million = growth.find(g => g.entries === 1_000_000) ?? last;
	const flat = (read: "balance" | "history") => last.reads[read].p50 <= 2 * first.reads[read].p50;
	const dealLoads = [
		http.row.figures,
		inProcess.row.figures,
		nats.row.figures,
		...growth.map(g => g.writes)
	];
	console.log("\nTargets");
	const met = [
		target(
			`our gateway's trivial route ≥ 80% of stock moleculer-web's (${fmt((100 * http.gateway.figures.perSecond) / http.gateway.baselineFigures.perSecond)}%)`,
			http.gateway.figures.perSecond >= 0.8 * http.gateway.baselineFigures.perSecond
		),
		target(
			`our gateway's trivial route ≥ 80% of stock moleculer-web's with Moleculer's metrics on too (${fmt((100 * http.gatewayMetrics.figures.perSecond) / http.gatewayMetrics.baselineFigures.perSecond)}%)`,
			http.gatewayMetrics.figures.perSecond >= 0.8 * http.gatewayMetrics.baselineFigures.perSecond
		),
		target(
			`HTTP deals ≥ 25% of the trivial route's requests/s (${fmt((100 * http.row.figures.perSecond) / http.row.baselineFigures.perSecond)}%)`,
			http.row.figures.perSecond >= 0.25 * http.row.baselineFigures.perSecond
		),
		target(
			`HTTP deals ≥ 50% of the trivial route's requests/s (${fmt((100 * http.row.figures.perSecond) / http.row.baselineFigures.perSecond)}%)`,
			http.row.figures.perSecond >= 0.5 * http.row.baselineFigures.perSecond
		),
		target(
			`NATS deals ≥ 25% of the trivial request/reply (${fmt((100 * nats.row.figures.perSecond) / nats.row.baselineFigures.perSecond)}%)`,
			nats.row.figures.perSecond >= 0.25 * nats.row.baselineFigures.perSecond
		),
		target(
			`start-up at ${fmt(million.entries)} entries ≤ 2 s and RSS ≤ 300 MB (${fmt(million.startupSeconds, 1)} s, ${fmt(million.rssMb)} MB)`,
			million.startupSeconds <= 2 && million.rssMb <= 300
		),
		target(
			`balance read flat within 2× from ${fmt(first.entries)} to ${fmt(last.entries)} entries`,
			flat("balance")
		),
		target(
			`history read flat within 2× from ${fmt(first.entries)} to ${fmt(last.entries)} entries`,
			flat("history")
		),
		target(
			`deal writes within 2× from ${fmt(first.entries)} to ${fmt(last.entries)} entries stored (${fmt(first.writes.perSecond)} → ${fmt(last.writes.perSecond)} per s)`,
			last.writes.perSecond >= first.writes.perSecond / 2
		),
		target(
			"every deal load answered without errors",
			dealLoads.every(figures => figures.errors === 0)
		),
		target(
			"every deal load flat: its last window within 20% of its first",
			dealLoads.every(isFlat)
		),
		target(
			"every balance equals the sum of its ledger after every load",
			audits.every(a => a.mismatches === 0)
		)
	];
	console.log(`\n${met.filter(Boolean).length} of ${met.length} targets met.`);
}

const chosen = process.argv.includes("--smoke") ? SMOKE : FULL;
const options = importRowsArg ? { ...chosen, importRows: Number(importRowsArg) } : chosen;
(process.argv.includes("--bulk") ? runBulk(options) : runBench(options)).then(
	() => process.exit(0),
	err => {
		console.error(err);
		process.exit(1);
	}
);
