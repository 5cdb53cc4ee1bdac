import type { SeedResult } from "./simulation";

/** What a failed seed prints: what failed, the end of its trace, and how to run it again. */
export function report(result: SeedResult, lines = 40): string {
	return [
		`seed ${result.seed} FAILED: ${result.failure}`,
		`last ${Math.min(lines, result.trace.length)} of ${result.trace.length} steps:`,
		...result.trace.slice(-lines).map(line => `  ${line}`),
		`replay: npm run simulate -- --seed ${result.seed}`
	].join("\n");
}
