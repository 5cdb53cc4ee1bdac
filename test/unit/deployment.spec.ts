/**
 * docker-compose.yml and the Dockerfile cannot be run here (no Docker engine): check what can be
 * checked without one — the file parses, every container is health-checked and waits for healthy
 * dependencies, NATS runs with JetStream, every OnePoint service runs on some node, the nodes set only
 * configuration the code reads, and the image runs files that the build produces.
 */
import fs from "node:fs";
import path from "node:path";
import { parse } from "yaml";

const ROOT = path.resolve(__dirname, "../..");
const read = (file: string) => fs.readFileSync(path.join(ROOT, file), "utf8");

interface ComposeService {
	image?: string;
	build?: string;
	command?: string[];
	environment?: Record<string, string>;
	healthcheck?: { test: string[] };
	depends_on?: Record<string, { condition: string }>;
}

describe("deployment files", () => {
	const compose = parse(read("docker-compose.yml"), { merge: true }) as {
		services: Record<string, ComposeService>;
	};
	const nodes = Object.values(compose.services).filter(s => s.build);

	it("health-checks every container and starts each only after what it depends on is healthy", () => {
		for (const [name, service] of Object.entries(compose.services)) {
			expect({ name, test: service.healthcheck?.test?.[0] }).toEqual({ name, test: "CMD" });
			for (const dependency of Object.values(service.depends_on ?? {}))
				expect(dependency.condition).toBe("service_healthy");
		}
	});

	it("runs NATS with JetStream and every service of services/ on some node", () => {
		expect(compose.services.nats.command).toContain("-js");
		const placed = nodes.flatMap(n => (n.environment?.SERVICES ?? "").split(","));
		const services = fs
			.readdirSync(path.join(ROOT, "services"))
			.map(f => f.replace(".service.ts", ""));
		expect(placed.sort()).toEqual(services.sort());
		for (const node of nodes)
			expect(node.environment).toMatchObject({
				TRANSPORTER: expect.stringMatching(/^nats:\/\//),
				MONGO_URI: expect.stringMatching(/^mongodb:\/\//)
			});
	});

	it("sets only environment variables the configuration (or moleculer-runner: SERVICES) reads", () => {
		const configSource = read("config/index.ts");
		for (const node of nodes)
			for (const name of Object.keys(node.environment ?? {}).filter(n => n !== "SERVICES"))
				expect(configSource).toContain(`"${name}"`);
	});

	it("runs, in the image, files that `npm run build` produces", () => {
		const cmd = /^CMD (\[.*\])$/m.exec(read("Dockerfile"));
		const args = JSON.parse(cmd?.[1] ?? "[]") as string[];
		// Checked against the sources, so that the fast tier needs no build: dist/x.js is compiled from x.ts.
		const sourceOf = (file: string) =>
			file.startsWith("dist/") ? file.replace(/^dist\//, "").replace(/\.js$/, ".ts") : file;
		for (const file of args.filter(a => a.startsWith("dist/") || a.startsWith("node_modules/")))
			expect(fs.existsSync(path.join(ROOT, sourceOf(file)))).toBe(true);
		expect(read("Dockerfile")).toContain("SERVICEDIR=dist/services");
		expect(fs.readdirSync(path.join(ROOT, "services")).some(f => f.endsWith(".service.ts"))).toBe(
			true
		);
	});
});
