/**
 * The Kubernetes manifests under deploy/kubernetes, read as an operator's tools read them, and checked
 * against the Kubernetes schemas by `kubernetes-models` (ES modules only: run in a child Node process,
 * which jest's CommonJS runtime is not).
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { parseAllDocuments } from "yaml";

export const ROOT = path.resolve(__dirname, "../..");
export const KUBERNETES = path.join(ROOT, "deploy/kubernetes");

export interface Manifest {
	apiVersion: string;
	kind: string;
	metadata: { name: string; [key: string]: unknown };
	[key: string]: any;
}

/** Every document of a YAML file. */
export function readManifests(file: string): Manifest[] {
	return parseAllDocuments(fs.readFileSync(file, "utf8")).map(doc => {
		if (doc.errors.length) throw new Error(`${file}: ${doc.errors[0].message}`);
		return doc.toJS() as Manifest;
	});
}

/** Every YAML file below `dir`, relative to it. */
export function yamlFiles(dir: string): string[] {
	return fs
		.readdirSync(dir, { recursive: true, encoding: "utf8" })
		.filter(file => /\.ya?ml$/.test(file))
		.sort();
}

// apiVersion `apps/v1` is the module `kubernetes-models/apps/v1/<Kind>`; the core group's `v1` is `v1/<Kind>`.
const VALIDATOR = `
const manifests = JSON.parse(await new Response(process.stdin).text());
const errors = [];
for (const manifest of manifests) {
	const where = manifest.kind + " " + manifest.metadata?.name;
	let Model;
	try {
		Model = (await import("kubernetes-models/" + manifest.apiVersion + "/" + manifest.kind))[manifest.kind];
	} catch {
		errors.push(where + ": no schema for " + manifest.apiVersion + " " + manifest.kind);
		continue;
	}
	try {
		new Model(manifest).validate();
	} catch (err) {
		errors.push(where + ": " + err.message);
	}
}
process.stdout.write(JSON.stringify(errors));
`;

/** Kubernetes' own kinds (`v1`, `apps/v1`, `autoscaling/v2`, `*.k8s.io/…`), not a custom resource's. */
export const builtIn = (m: Manifest): boolean => {
	const group = m.apiVersion.includes("/") ? m.apiVersion.split("/")[0] : "";
	return !group.includes(".") || group.endsWith(".k8s.io");
};

/**
 * What the Kubernetes schemas find wrong with `manifests`, one line each; empty when all are valid.
 * Custom resources (a ServiceMonitor, the MongoDB operator's) are not in those schemas: left to checks of
 * their own.
 */
export function schemaErrors(manifests: Manifest[]): string[] {
	const out = execFileSync(process.execPath, ["--input-type=module", "-e", VALIDATOR], {
		cwd: ROOT,
		input: JSON.stringify(manifests.filter(builtIn))
	});
	return JSON.parse(out.toString()) as string[];
}

/** The kubectl on this machine, if any (`kubectl kustomize` renders an overlay as `kubectl apply -k` would). */
export function kubectl(): string | undefined {
	try {
		return execFileSync("sh", ["-c", "command -v kubectl"]).toString().trim() || undefined;
	} catch {
		return undefined;
	}
}
