/**
 * The alert rules (deploy/prometheus/alerts.yml): promtool checks them and runs their unit tests
 * (alerts.test.yml: every alert, firing and not firing); each has a summary and a runbook that is a
 * section of docs/monitoring.md; the Kubernetes PrometheusRule carries the same groups, and the
 * ServiceMonitor scrapes the ops port of the Service beside it.
 */
import fs from "node:fs";
import path from "node:path";
import { alertGroups, promtool, readYaml, type RuleGroup } from "../helpers/monitoring";

const rules = alertGroups().flatMap(group => group.rules);

describe("the alert rules", () => {
	it("pass promtool's check", () => {
		const { status, output } = promtool(["check", "rules", "alerts.yml"]);
		expect(output).toContain(`SUCCESS: ${rules.length} rules found`);
		expect(status).toBe(0);
	});

	it("pass their unit tests, and every alert has one", () => {
		const { status, output } = promtool(["test", "rules", "alerts.test.yml"]);
		expect(output).toContain("SUCCESS");
		expect(status).toBe(0);
		const tests = readYaml<{
			tests: { alert_rule_test: { alertname: string; exp_alerts: unknown[] }[] }[];
		}>("deploy/prometheus/alerts.test.yml").tests.flatMap(test => test.alert_rule_test);
		for (const { alert } of rules) {
			const cases = tests.filter(test => test.alertname === alert);
			// Firing and not firing.
			expect([alert, cases.some(c => c.exp_alerts.length > 0)]).toEqual([alert, true]);
			expect([alert, cases.some(c => c.exp_alerts.length === 0)]).toEqual([alert, true]);
		}
	});

	it("each have a summary and a runbook, a section of docs/monitoring.md", () => {
		const page = fs.readFileSync(path.resolve(__dirname, "../../docs/monitoring.md"), "utf8");
		const anchors = [...page.matchAll(/^#+ (.+)$/gm)].map(([, heading]) =>
			heading
				.toLowerCase()
				.replace(/[^a-z0-9 -]/g, "")
				.replace(/ /g, "-")
		);
		for (const { alert, annotations } of rules) {
			expect([alert, annotations?.summary]).toEqual([alert, expect.any(String)]);
			expect([alert, annotations?.runbook]).toEqual([
				alert,
				`docs/monitoring.md#${alert.toLowerCase()}`
			]);
			expect(anchors).toContain(alert.toLowerCase());
		}
	});

	it("are the Kubernetes PrometheusRule's, group for group", () => {
		const rule = readYaml<{ kind: string; spec: { groups: RuleGroup[] } }>(
			"deploy/kubernetes/monitoring/prometheus-rule.yaml"
		);
		expect(rule.kind).toBe("PrometheusRule");
		expect(rule.spec.groups).toEqual(alertGroups());
	});

	it("are scraped on Kubernetes: the ServiceMonitor selects the ops Service and its port", () => {
		const dir = "deploy/kubernetes/monitoring";
		const kustomization = readYaml<{ resources: string[] }>(`${dir}/kustomization.yaml`);
		for (const file of kustomization.resources)
			expect(fs.existsSync(path.resolve(__dirname, "../..", dir, file))).toBe(true);
		const service = readYaml<{
			metadata: { labels: Record<string, string> };
			spec: { ports: { name: string }[] };
		}>(`${dir}/ops-service.yaml`);
		const monitor = readYaml<{
			kind: string;
			spec: {
				selector: { matchLabels: Record<string, string> };
				endpoints: { port: string; path: string }[];
			};
		}>(`${dir}/service-monitor.yaml`);
		expect(monitor.kind).toBe("ServiceMonitor");
		expect(service.metadata.labels).toMatchObject(monitor.spec.selector.matchLabels);
		expect(monitor.spec.endpoints).toEqual([
			expect.objectContaining({ port: service.spec.ports[0].name, path: "/metrics" })
		]);
	});
});
