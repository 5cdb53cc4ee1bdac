/**
 * The deployment files cannot be run here (no Docker engine, no Kubernetes cluster): check what can be
 * checked without one. The compose files parse, every container is health-checked and waits for what it
 * depends on, NATS runs with JetStream (in production three servers, streams of 3 replicas fsynced
 * before they are acknowledged; MongoDB a three-member replica set with majority writes); every place
 * that lists the nodes (the docs' many-node example, both compose files, the Kubernetes Deployments) runs
 * every OnePoint service exactly once; the nodes set only configuration the code reads; the image runs
 * files that the build produces. The Kubernetes manifests (the monitoring ones too) are valid against the
 * Kubernetes and Prometheus Operator schemas, group the services as compose does, autoscale exactly the
 * groups that docs/operations.md says may scale, probe the paths and ports the nodes serve, and give a pod
 * longer to stop than its drain takes.
 */
import { execFileSync } from "node:child_process";
import { generateKeyPairSync } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parse } from "yaml";
import { loadConfig } from "../../config";
import { createBrokerOptions } from "../../config/broker";
import {
	KUBERNETES,
	kubectl,
	kustomized,
	modelsOf,
	readManifests,
	ROOT,
	schemaErrors,
	yamlFiles,
	type Manifest
} from "../helpers/manifests";

const read = (file: string) => fs.readFileSync(path.join(ROOT, file), "utf8");

interface ComposeService {
	image?: string;
	build?: string;
	command?: string[];
	restart?: string;
	environment?: Record<string, string>;
	volumes?: string[];
	healthcheck?: { test: string[] };
	depends_on?: Record<string, { condition: string }>;
}

type Compose = { services: Record<string, ComposeService> };

const composeFile = (file: string) => parse(read(file), { merge: true }) as Compose;
const nodesOf = (compose: Compose) => Object.values(compose.services).filter(s => s.build);

/** Every service in services/, by the name SERVICES takes. */
const SERVICE_NAMES = fs
	.readdirSync(path.join(ROOT, "services"))
	.filter(f => f.endsWith(".service.ts"))
	.map(f => f.replace(/\.service\.ts$/, ""))
	.sort();

/** The names the configuration reads (config/index.ts), and SERVICES (read by moleculer-runner). */
const configSource = read("config/index.ts");
const readByNode = (name: string) => name === "SERVICES" || configSource.includes(`"${name}"`);

/** The nodes' groups of services, by node name: the Kubernetes Deployments group them the same way. */
const groupsOf = (compose: Compose) =>
	Object.fromEntries(
		Object.entries(compose.services)
			.filter(([, s]) => s.build)
			.map(([name, s]) => [name, s.environment?.SERVICES ?? ""])
	);

/** The many-node example of docs/operations.md, from its `nats-server` on. */
const manyNodeExample = () =>
	/```sh\n(nats-server[\s\S]*?)```/.exec(read("docs/operations.md"))?.[1] ?? "";

/** The Kubernetes base's manifests, and what its Deployments run. */
const kubernetesBase = kustomized("base");
const kubernetesDeployments = kubernetesBase.filter(m => m.kind === "Deployment");
const container = (d: Manifest) => d.spec.template.spec.containers[0];
const envOf = (d: Manifest): Record<string, string> =>
	Object.fromEntries(
		(container(d).env as { name: string; value: string }[]).map(e => [e.name, e.value])
	);

/**
 * What docs/operations.md ("Which services scale out") says of each service, by its name: the first line of
 * the item that names it.
 */
const scaleOut: Record<string, string> = Object.fromEntries(
	[
		...(
			/### Which services scale out\n([\s\S]*?)\n## /.exec(read("docs/operations.md"))?.[1] ?? ""
		).matchAll(/^- ((?:`[\w-]+`(?:, )?)+): (.*)$/gm)
	].flatMap(([, names, says]) => [...names.matchAll(/`([\w-]+)`/g)].map(([, name]) => [name, says]))
);
/** Whether that page says `service` may run as several instances on MongoDB. */
const scalesOnMongo = (service: string) =>
	/several on (MongoDB|either store)/.test(scaleOut[service] ?? "");

/** Every place that lists the nodes' services, as each node's SERVICES. */
const NODE_LISTS: Record<string, () => string[]> = {
	"docs/operations.md's many-node example": () =>
		[...manyNodeExample().matchAll(/^SERVICES=(\S+)/gm)].map(([, services]) => services),
	"docker-compose.yml": () => Object.values(groupsOf(composeFile("docker-compose.yml"))),
	"docker-compose.prod.yml": () => Object.values(groupsOf(composeFile("docker-compose.prod.yml"))),
	"deploy/kubernetes/base's Deployments": () => kubernetesDeployments.map(d => envOf(d).SERVICES)
};

describe.each(Object.keys(NODE_LISTS))("%s", place => {
	it("runs every service of services/ on exactly one node", () => {
		const placed = NODE_LISTS[place]().flatMap(services => services.split(","));
		expect(placed.sort()).toEqual(SERVICE_NAMES);
	});
});

describe("docs/operations.md, which services scale out", () => {
	it("says of every service of services/ whether it scales out", () => {
		expect(Object.keys(scaleOut).sort()).toEqual(SERVICE_NAMES);
	});
});

describe.each(["docker-compose.yml", "docker-compose.prod.yml"])("%s", file => {
	const compose = composeFile(file);
	const nodes = nodesOf(compose);

	it("health-checks every long-running container and starts each only after what it depends on is ready", () => {
		for (const [name, service] of Object.entries(compose.services)) {
			// A one-shot container (the replica set's initiation) runs to its end instead.
			const oneShot = service.restart === "no";
			if (!oneShot)
				expect({ name, test: service.healthcheck?.test?.[0] }).toEqual({ name, test: "CMD" });
			for (const [dependency, { condition }] of Object.entries(service.depends_on ?? {}))
				expect({ name, dependency, condition }).toEqual({
					name,
					dependency,
					condition:
						compose.services[dependency].restart === "no"
							? "service_completed_successfully"
							: "service_healthy"
				});
		}
	});

	it("runs every node over NATS and MongoDB", () => {
		for (const node of nodes)
			expect(node.environment).toMatchObject({
				TRANSPORTER: expect.stringMatching(/^nats:\/\//),
				MONGO_URI: expect.stringMatching(/^mongodb:\/\//)
			});
	});

	it("sets only environment variables the configuration (or moleculer-runner: SERVICES) reads", () => {
		for (const node of nodes)
			for (const name of Object.keys(node.environment ?? {}))
				expect({ name, read: readByNode(name) }).toEqual({ name, read: true });
	});

	it("gives the imports node a stable NODE_ID and a volume for DATA_DIR: a job resumes only with both", () => {
		const [imports, ...others] = nodes.filter(n =>
			n.environment?.SERVICES.split(",").includes("imports")
		);
		expect(others).toEqual([]);
		expect(imports?.environment?.NODE_ID).toEqual(expect.stringMatching(/^[\w-]+$/));
		// The image's DATA_DIR.
		expect(read("Dockerfile")).toMatch(/\bDATA_DIR=\/data\b/);
		expect(imports?.volumes).toContainEqual(expect.stringMatching(/^[\w-]+:\/data$/));
	});
});

describe("docker-compose.yml (development)", () => {
	const compose = composeFile("docker-compose.yml");

	it("runs one NATS server with JetStream, of the version production runs", () => {
		expect(compose.services.nats.command).toContain("-js");
		const natsImages = Object.values(composeFile("docker-compose.prod.yml").services)
			.map(s => s.image)
			.filter(image => image?.startsWith("nats:"));
		expect(new Set(natsImages)).toEqual(new Set([compose.services.nats.image]));
	});

	it("suggests scaling out only nodes whose every service scales out on MongoDB", () => {
		const scaled = [...read("docker-compose.yml").matchAll(/--scale ([\w-]+)=/g)].map(([, n]) => n);
		expect(scaled.length).toBeGreaterThan(0);
		const groups = groupsOf(compose);
		for (const node of scaled)
			expect({ node, scales: groups[node].split(",").every(scalesOnMongo) }).toEqual({
				node,
				scales: true
			});
	});
});

describe("docker-compose.prod.yml (production)", () => {
	const compose = composeFile("docker-compose.prod.yml");
	const nodes = nodesOf(compose);
	const natsServers = Object.keys(compose.services).filter(n => /^nats-\d$/.test(n));
	const mongoMembers = Object.keys(compose.services).filter(n => /^mongo-\d$/.test(n));

	it("runs three NATS servers with JetStream, routed to each other, fsyncing every write", () => {
		expect(natsServers).toHaveLength(3);
		for (const name of natsServers) {
			const command = compose.services[name].command ?? [];
			expect(command).toContain("-js");
			expect(command[command.indexOf("--name") + 1]).toBe(name);
			const routes = command[command.indexOf("--routes") + 1].split(",");
			expect(routes.sort()).toEqual(natsServers.map(n => `nats://${n}:6222`));
			expect(command[command.indexOf("-c") + 1]).toBe("/etc/nats/nats.conf");
		}
		const conf = read("deploy/compose/nats.conf");
		expect(conf).toMatch(/^\s*sync_interval: always$/m);
		expect(conf).toMatch(/^\s*store_dir: \/data$/m);
	});

	it("runs MongoDB as a three-member replica set that a one-shot container initiates", () => {
		expect(mongoMembers).toHaveLength(3);
		for (const name of mongoMembers)
			expect(compose.services[name].command).toEqual(["--replSet", "rs0", "--bind_ip_all"]);
		const init = compose.services["mongo-init"];
		expect(init.restart).toBe("no");
		expect(Object.keys(init.depends_on ?? {}).sort()).toEqual(mongoMembers);
		const script = (init.command ?? []).join(" ");
		expect(script).toContain('rs.initiate({ _id: "rs0"');
		for (const name of mongoMembers) expect(script).toContain(`host: "${name}:27017"`);
	});

	it("gives every node every server and member, streams of 3 replicas and majority writes", () => {
		for (const node of nodes) {
			const env = node.environment ?? {};
			expect(env.TRANSPORTER.split(",").sort()).toEqual(natsServers.map(n => `nats://${n}:4222`));
			// Not a WHATWG URL: several hosts.
			const [, hosts, query] = /^mongodb:\/\/([^/]+)\/onepoint\?(.*)$/.exec(env.MONGO_URI) ?? [];
			expect(hosts.split(",").sort()).toEqual(mongoMembers.map(m => `${m}:27017`));
			expect(new URLSearchParams(query).get("replicaSet")).toBe("rs0");
			expect(env).toMatchObject({
				NODE_ENV: "production",
				NATS_STREAM_REPLICAS: "3",
				MONGO_WRITE_CONCERN: "majority"
			});
			const config = loadConfig({ ...env, API_KEYS: "", MEMBER_TOKEN_KEY: "" });
			expect(config).toMatchObject({ natsStreamReplicas: 3, mongoWriteConcern: "majority" });
		}
	});

	it("groups the services as the development file does", () => {
		expect(groupsOf(compose)).toEqual(groupsOf(composeFile("docker-compose.yml")));
	});
});

describe("the image", () => {
	it("runs files that `npm run build` produces", () => {
		const cmd = /^CMD (\[.*\])$/m.exec(read("Dockerfile"));
		const args = JSON.parse(cmd?.[1] ?? "[]") as string[];
		// Checked against the sources, so that the fast tier needs no build: dist/x.js is compiled from x.ts.
		const sourceOf = (file: string) =>
			file.startsWith("dist/") ? file.replace(/^dist\//, "").replace(/\.js$/, ".ts") : file;
		for (const file of args.filter(a => a.startsWith("dist/") || a.startsWith("node_modules/")))
			expect(fs.existsSync(path.join(ROOT, sourceOf(file)))).toBe(true);
		expect(read("Dockerfile")).toContain("SERVICEDIR=dist/services");
		expect(SERVICE_NAMES.length).toBeGreaterThan(0);
	});
});

describe("starting nodes", () => {
	const scripts = (JSON.parse(read("package.json")) as { scripts: Record<string, string> }).scripts;

	it("builds once in `npm start`; `start:node` runs what is built and never builds", () => {
		expect(scripts.start).toMatch(/^npm run build && /);
		expect(scripts["start:node"]).not.toMatch(/build|tsc/);
		expect(scripts["start:node"]).toContain("--config dist/moleculer.config.js");
	});

	it("starts the many-node example of docs/operations.md from one build", () => {
		const example = manyNodeExample();
		const starts = example.split("\n").filter(line => /SERVICES=/.test(line));
		expect(starts.length).toBeGreaterThan(1);
		for (const line of starts) expect(line).toMatch(/npm run start:node &$/);
		expect(example).toMatch(/^npm run build\b/m);
	});
});

describe("deploy/kubernetes", () => {
	const base = readKustomization("base");
	const manifests = kubernetesBase;
	const ofKind = (kind: string) => manifests.filter(m => m.kind === kind);
	const deployments = kubernetesDeployments;
	const configMap = ofKind("ConfigMap")[0];
	const component = (d: Manifest) => d.metadata.name.replace(/^onepoint-/, "");

	function readKustomization(dir: string): Record<string, unknown> {
		return parse(fs.readFileSync(path.join(KUBERNETES, dir, "kustomization.yaml"), "utf8"));
	}

	it("are valid against the Kubernetes schemas, every manifest of the base and the overlays", () => {
		const overlays = ["overlays/dev", "overlays/production"].flatMap(dir =>
			yamlFiles(path.join(KUBERNETES, dir))
				.filter(f => f !== "kustomization.yaml")
				.flatMap(f => readManifests(path.join(KUBERNETES, dir, f)))
		);
		expect(overlays.length).toBeGreaterThan(0);
		// Patches are partial: checked as what they patch, merged into a whole manifest below.
		expect(schemaErrors(manifests)).toEqual([]);
		// What the production overlay adds for Prometheus: a Service, and the Prometheus Operator's kinds.
		const monitoring = kustomized("monitoring");
		expect(monitoring.map(m => m.kind).sort()).toEqual([
			"PrometheusRule",
			"Service",
			"ServiceMonitor"
		]);
		expect(monitoring.filter(m => !modelsOf(m))).toEqual([]);
		expect(schemaErrors(monitoring)).toEqual([]);
		for (const patch of overlays) {
			const target = manifests.find(m => m.kind === patch.kind) as Manifest;
			const merged: Manifest = { ...target, ...patch, spec: { ...target.spec, ...patch.spec } };
			if (patch.data) merged.data = { ...target.data, ...patch.data };
			expect(schemaErrors([merged])).toEqual([]);
		}
	});

	it("lists in the kustomizations only files that exist", () => {
		for (const dir of ["base", "overlays/dev", "overlays/production"]) {
			const k = readKustomization(dir) as {
				resources?: string[];
				patches?: { path: string }[];
			};
			for (const file of [...(k.resources ?? []), ...(k.patches ?? []).map(p => p.path)])
				expect(fs.existsSync(path.join(KUBERNETES, dir, file))).toBe(true);
		}
		expect(yamlFiles(path.join(KUBERNETES, "base")).sort()).toEqual(
			["kustomization.yaml", ...(base.resources as string[])].sort()
		);
	});

	it("has a Deployment per group of services, grouped as docker-compose.prod.yml groups them", () => {
		const groups = Object.fromEntries(deployments.map(d => [component(d), envOf(d).SERVICES]));
		expect(groups).toEqual(groupsOf(composeFile("docker-compose.prod.yml")));
	});

	it("probes /ready and /live on the port the nodes serve them (METRICS_PORT), and the gateway on PORT", () => {
		const opsPort = loadConfig(configMap.data).metricsPort;
		expect(opsPort).toBe(3030);
		for (const d of deployments) {
			const c = container(d);
			const port = (name: string) =>
				(c.ports as { name: string; containerPort: number }[]).find(p => p.name === name)
					?.containerPort;
			expect(c.readinessProbe.httpGet).toEqual({ path: "/ready", port: "ops" });
			expect(c.livenessProbe.httpGet).toEqual({ path: "/live", port: "ops" });
			expect(port("ops")).toBe(opsPort);
			if (component(d) === "gateway") {
				expect(port("http")).toBe(loadConfig(envOf(d)).port);
				const service = ofKind("Service").find(s => s.metadata.name === d.metadata.name);
				expect(service?.spec.ports[0].targetPort).toBe("http");
			}
		}
		// The probes the nodes serve (lib/ops/reporter.ts).
		const reporter = read("lib/ops/reporter.ts");
		expect(reporter).toContain('req.url === "/live" || req.url === "/ready"');
	});

	it("sets only configuration the code reads, from one ConfigMap and one Secret", () => {
		for (const name of Object.keys(configMap.data))
			expect({ name, read: readByNode(name) }).toEqual({ name, read: true });
		expect(() => loadConfig(configMap.data)).not.toThrow();
		for (const d of deployments) {
			for (const name of Object.keys(envOf(d)))
				expect({ name, read: readByNode(name) }).toEqual({ name, read: true });
			expect(container(d).envFrom).toEqual([
				{ configMapRef: { name: "onepoint-config" } },
				{ secretRef: { name: "onepoint-keys" } }
			]);
		}
		// Each overlay makes the Secret with the keys the nodes read.
		for (const dir of ["overlays/dev", "overlays/production"]) {
			const k = readKustomization(dir) as {
				secretGenerator: { name: string; envs: string[]; files: string[] }[];
			};
			expect(k.secretGenerator).toEqual([
				{
					name: "onepoint-keys",
					envs: ["keys.env"],
					files: ["MEMBER_TOKEN_KEY=member-token-key.pem"]
				}
			]);
			expect(readByNode("MEMBER_TOKEN_KEY")).toBe(true);
		}
	});

	it("gives a pod longer to stop than its node's drain takes", () => {
		const broker = createBrokerOptions(
			loadConfig({ TRANSPORTER: "nats://127.0.0.1:4222", METRICS_PORT: "off" })
		);
		const drainMs =
			(broker.registry?.stopDelay ?? 0) +
			((broker.tracking as { shutdownTimeout: number }).shutdownTimeout ?? 0);
		for (const d of deployments) {
			const preStop = container(d).lifecycle.preStop.exec.command as string[];
			expect(preStop[0]).toBe("sleep");
			const stopMs = Number(preStop[1]) * 1000 + drainMs;
			expect(d.spec.template.spec.terminationGracePeriodSeconds * 1000).toBeGreaterThan(stopMs);
		}
	});

	it("autoscales a group exactly when every service in it scales out on MongoDB (docs/operations.md)", () => {
		const autoscaled = ofKind("HorizontalPodAutoscaler").map(h => h.spec.scaleTargetRef.name);
		for (const d of deployments)
			expect({
				group: envOf(d).SERVICES,
				autoscaled: autoscaled.includes(d.metadata.name)
			}).toEqual({
				group: envOf(d).SERVICES,
				autoscaled: envOf(d).SERVICES.split(",").every(scalesOnMongo)
			});
	});

	it("gives the imports pod a stable NODE_ID and a persistent volume for DATA_DIR: a job resumes only with both", () => {
		const imports = deployments.find(d => envOf(d).SERVICES === "imports") as Manifest;
		expect(envOf(imports).NODE_ID).toEqual(expect.stringMatching(/^[\w-]+$/));
		const spec = imports.spec.template.spec;
		const mount = container(imports).volumeMounts.find(
			(m: { mountPath: string }) => m.mountPath === "/data"
		);
		const volume = spec.volumes.find((v: { name: string }) => v.name === mount?.name);
		const claim = ofKind("PersistentVolumeClaim").find(
			c => c.metadata.name === volume?.persistentVolumeClaim?.claimName
		);
		expect(claim).toBeDefined();
	});

	it("scales out what may (the gateway; on MongoDB deals and points) and keeps one of the rest", () => {
		const autoscaled = ofKind("HorizontalPodAutoscaler").map(h => h.spec.scaleTargetRef.name);
		expect(autoscaled.sort()).toEqual(["onepoint-deals", "onepoint-gateway", "onepoint-points"]);
		for (const d of deployments) {
			const scales = autoscaled.includes(d.metadata.name);
			// A one-instance service never runs twice, even for a moment of a rollout.
			expect({ name: d.metadata.name, strategy: d.spec.strategy.type }).toEqual({
				name: d.metadata.name,
				strategy: scales ? "RollingUpdate" : "Recreate"
			});
			if (scales) expect(d.spec.strategy.rollingUpdate).toEqual({ maxSurge: 1, maxUnavailable: 0 });
			else expect(d.spec.replicas).toBe(1);
			const budget = ofKind("PodDisruptionBudget").find(p => p.metadata.name === d.metadata.name);
			expect(budget?.spec.selector.matchLabels).toEqual(d.spec.selector.matchLabels);
		}
	});

	it("runs NATS (the nats chart) and MongoDB (the community operator) replicated three times", () => {
		const nats = parse(read("deploy/kubernetes/nats/values.yaml"));
		expect(nats.config.cluster).toEqual({ enabled: true, replicas: 3 });
		expect(nats.config.jetstream).toMatchObject({
			enabled: true,
			fileStore: { enabled: true, pvc: { enabled: true } },
			merge: { sync_interval: "always" }
		});
		const [mongo] = readManifests(path.join(KUBERNETES, "mongodb/mongodb.yaml"));
		expect(mongo).toMatchObject({
			apiVersion: "mongodbcommunity.mongodb.com/v1",
			kind: "MongoDBCommunity",
			spec: { members: 3, type: "ReplicaSet" }
		});
		expect(configMap.data).toMatchObject({
			NATS_STREAM_REPLICAS: "3",
			MONGO_WRITE_CONCERN: "majority",
			TRANSPORTER: "nats://nats:4222"
		});
	});

	const kubectlPath = kubectl();
	(kubectlPath ? it : it.skip)(
		`renders each overlay with kubectl kustomize${kubectlPath ? "" : " (skipped: kubectl is not installed)"}`,
		() => {
			// The overlays' keys are the operator's files, never committed: made here in a copy.
			const copy = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-kustomize-"));
			fs.cpSync(KUBERNETES, copy, { recursive: true });
			const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
			for (const overlay of ["dev", "production"]) {
				const dir = path.join(copy, "overlays", overlay);
				fs.writeFileSync(
					path.join(dir, "keys.env"),
					"API_KEYS=staff-token-0123456789=staff\nMONGO_URI=mongodb://a:27017,b:27017,c:27017/onepoint\n"
				);
				fs.writeFileSync(
					path.join(dir, "member-token-key.pem"),
					privateKey.export({ type: "pkcs8", format: "pem" })
				);
				const rendered = execFileSync(kubectlPath as string, ["kustomize", dir]).toString();
				const objects = rendered
					.split(/^---$/m)
					.map(doc => parse(doc) as Manifest)
					.filter(Boolean);
				expect(objects.filter(o => o.kind === "Deployment")).toHaveLength(deployments.length);
				const secret = objects.find(o => o.kind === "Secret") as Manifest;
				expect(Object.keys(secret.data).sort()).toEqual([
					"API_KEYS",
					"MEMBER_TOKEN_KEY",
					"MONGO_URI"
				]);
				// kubectl folds long base64 over lines, which Kubernetes reads and the schema's format does not.
				for (const key of Object.keys(secret.data))
					secret.data[key] = secret.data[key].replace(/\s/g, "");
				expect(schemaErrors(objects)).toEqual([]);
			}
		}
	);
});
