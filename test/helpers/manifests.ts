/**
 * The Kubernetes manifests under deploy/kubernetes, read as an operator's tools read them, and checked
 * against the Kubernetes schemas by `kubernetes-models` and against the Prometheus Operator's by
 * `@kubernetes-models/prometheus-operator` (ES modules only: run in a child Node process, which jest's
 * CommonJS runtime is not).
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { parse, parseAllDocuments } from "yaml";

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

/** The package of a custom resource's models, by its API group: the Prometheus Operator's kinds. */
const CUSTOM_MODELS: Record<string, string> = {
	"monitoring.coreos.com": "@kubernetes-models/prometheus-operator"
};

/** Kubernetes' own kinds (`v1`, `apps/v1`, `autoscaling/v2`, `*.k8s.io/…`), not a custom resource's. */
const builtIn = (m: Manifest): boolean => {
	const group = m.apiVersion.includes("/") ? m.apiVersion.split("/")[0] : "";
	return !group.includes(".") || group.endsWith(".k8s.io");
};

/** The package whose models validate `m`, if any: `kubernetes-models` for Kubernetes' own kinds. */
export function modelsOf(m: Manifest): string | undefined {
	return builtIn(m) ? "kubernetes-models" : CUSTOM_MODELS[m.apiVersion.split("/")[0]];
}

// apiVersion `apps/v1` is the module `kubernetes-models/apps/v1/<Kind>`; the core group's `v1` is `v1/<Kind>`;
// the custom resources' packages are laid out the same way.
const VALIDATOR = `
const manifests = JSON.parse(await new Response(process.stdin).text());
const errors = [];
for (const { models, manifest } of manifests) {
	const where = manifest.kind + " " + manifest.metadata?.name;
	let Model;
	try {
		Model = (await import(models + "/" + manifest.apiVersion + "/" + manifest.kind))[manifest.kind];
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

/**
 * What the schemas find wrong with `manifests`, one line each; empty when all are valid. Kubernetes' own
 * kinds and the Prometheus Operator's are checked; another custom resource (the MongoDB operator's) is
 * left to checks of its own.
 */
export function schemaErrors(manifests: Manifest[]): string[] {
	const checked = manifests.flatMap(manifest => {
		const models = modelsOf(manifest);
		return models ? [{ models, manifest }] : [];
	});
	const out = execFileSync(process.execPath, ["--input-type=module", "-e", VALIDATOR], {
		cwd: ROOT,
		input: JSON.stringify(checked)
	});
	return JSON.parse(out.toString()) as string[];
}

/** The resources of a kustomization under deploy/kubernetes (`base`, `monitoring`), every document of each. */
export function kustomized(dir: string): Manifest[] {
	const { resources } = parse(
		fs.readFileSync(path.join(KUBERNETES, dir, "kustomization.yaml"), "utf8")
	) as { resources: string[] };
	return resources.flatMap(file => readManifests(path.join(KUBERNETES, dir, file)));
}

/** The kubectl on this machine, if any (`kubectl kustomize` renders an overlay as `kubectl apply -k` would). */
export function kubectl(): string | undefined {
	try {
		return execFileSync("sh", ["-c", "command -v kubectl"]).toString().trim() || undefined;
	} catch {
		return undefined;
	}
}
