/**
 * A short run of `npm run bench -- --smoke` (the built script, as the full run uses it), so the
 * benchmarks cannot rot: every part runs, prints its figures beside their baselines, and every
 * balance still equals the sum of its ledger after the load. No speed is asserted here.
 */
import { spawn } from "node:child_process";
import path from "node:path";

jest.setTimeout(180_000);

const ROOT = path.resolve(__dirname, "../..");

function runSmoke(): Promise<{ code: number | null; output: string }> {
	return new Promise((resolve, reject) => {
		const child = spawn(
			process.execPath,
			["--disable-warning=ExperimentalWarning", "dist/bench/run.js", "--smoke"],
			{ cwd: ROOT }
		);
		let output = "";
		child.stdout.on("data", chunk => (output += chunk));
		child.stderr.on("data", chunk => (output += chunk));
		child.once("error", reject);
		child.once("exit", code => resolve({ code, output }));
	});
}

describe("npm run bench -- --smoke", () => {
	it("runs every part, prints each figure beside its baseline, and leaves every account equal to its ledger", async () => {
		const { code, output } = await runSmoke();
		expect({ code, tail: output.slice(-3000) }).toMatchObject({ code: 0 });
		for (const part of [
			"POST /api/deals (HTTP, one process)",
			'broker.call("deals.create")',
			"deals.create over NATS (3 nodes)"
		]) {
			const line = output.split("\n").find(l => l.includes(part)) ?? "";
			// The measure, its baseline and a ratio, on one row.
			expect(line).toMatch(/'\d[\d,]*'.*(GET \/api\/me|trivial action).*'\d+%'/);
		}
		// Our gateway's trivial route beside stock moleculer-web's, measured in the same run.
		expect(output).toMatch(
			/'GET \/api\/me \(our gateway, metrics on\)'.*'\d[\d,]*'.*'stock moleculer-web, trivial action'.*'\d+%'/
		);
		// The trivial route with tracing on, beside it with tracing off.
		expect(output).toMatch(
			/'GET \/api\/me \(our gateway, tracing on, all sampled\)'.*'\d[\d,]*'.*'GET \/api\/me \(tracing off\)'.*'\d+%'/
		);
		// Each load's throughput per window, and whether it held flat.
		expect(output).toMatch(/Throughput over each load: per second in each \d+-second window/);
		expect(output).toMatch(/broker\.call\("deals\.create"\) +( +[\d,]+){2,} +(flat|NOT FLAT)/);
		expect(output).toMatch(
			/Deals \(HTTP\) with entries already stored[\s\S]*1,000 entries +( +[\d,]+){2,} +(flat|NOT FLAT)/
		);
		expect(output).toMatch(
			/(MET|MISSED) +deal writes within 2× from 1,000 to 3,000 entries stored/
		);
		expect(output).toMatch(
			/(MET|MISSED) +our gateway's trivial route ≥ 80% of stock moleculer-web's/
		);
		expect(output).toMatch(
			/dashboard's member query \(p50 \/ p99 ms\): [\d.]+ \/ [\d.]+ at rest, [\d.]+ \/ [\d.]+ under the HTTP deal load/
		);
		expect(output).toMatch(/Growth: reads/);
		expect(output).toMatch(/'1,000'.*'3,000'|'1,000'[\s\S]*'3,000'/);
		expect(output).toMatch(/(MET|MISSED) +HTTP deals ≥ 50%/);
		expect(output).toContain("MET     every balance equals the sum of its ledger after every load");
		// A load of failing calls would measure failures: every deal of every load was answered.
		expect(output).toContain("MET     every deal load answered without errors");
		expect(output).toMatch(/(MET|MISSED) +start-up at 3,000 entries ≤ 2 s and RSS ≤ 300 MB/);
	});
});
