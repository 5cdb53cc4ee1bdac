/** What the monitoring suites read: the alert rules, the dashboard's queries, and promtool. */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";

const ROOT = path.resolve(__dirname, "../..");
export const PROMETHEUS_DIR = path.join(ROOT, "deploy/prometheus");

export interface AlertRule {
	alert: string;
	expr: string;
	for?: string;
	labels?: Record<string, string>;
	annotations?: Record<string, string>;
}

export interface RuleGroup {
	name: string;
	rules: AlertRule[];
}

export function readYaml<T>(file: string): T {
	return YAML.parse(fs.readFileSync(path.join(ROOT, file), "utf8")) as T;
}

export const alertGroups = (): RuleGroup[] =>
	readYaml<{ groups: RuleGroup[] }>("deploy/prometheus/alerts.yml").groups;

/** Every query of the Grafana dashboard. */
export function dashboardQueries(): string[] {
	const dashboard = JSON.parse(
		fs.readFileSync(path.join(ROOT, "deploy/grafana/onepoint.json"), "utf8")
	) as { panels: { targets: { expr: string }[] }[] };
	return dashboard.panels.flatMap(panel => panel.targets.map(target => target.expr));
}

/** The series a PromQL expression names: ours, and Prometheus's own `up`. */
export function seriesIn(expr: string): string[] {
	return [...expr.matchAll(/\b(onepoint_[a-z0-9_]+|up)\b(?=\s*[{[)]|\s*[=!<>]|\s*$)/g)].map(
		m => m[1]
	);
}

/** The series a `/metrics` answer declares (a histogram's as Prometheus stores them). */
export function exported(metrics: string): Set<string> {
	const names = new Set<string>();
	for (const [, name, type] of metrics.matchAll(/^# TYPE (\S+) (\S+)$/gm)) {
		names.add(name);
		if (type === "histogram")
			for (const part of ["bucket", "sum", "count"]) names.add(`${name}_${part}`);
	}
	return names;
}

/** Runs Debian's promtool (package `prometheus`) in deploy/prometheus; its output and exit status. */
export function promtool(
	args: string[],
	input?: string
): { status: number | null; output: string } {
	const run = spawnSync("promtool", args, { cwd: PROMETHEUS_DIR, input, encoding: "utf8" });
	if (run.error)
		throw new Error(`promtool cannot run (apt-get install prometheus): ${run.error.message}`);
	return { status: run.status, output: `${run.stdout}${run.stderr}` };
}
