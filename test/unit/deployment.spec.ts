/**
 * docker-compose.yml and the Dockerfile cannot be run here (no Docker engine): check what can be
 * checked without one — the file parses, every service is health-checked, the node's image runs files
 * the build produces, and the environment it sets is configuration the code reads.
 */
import fs from "node:fs";
import path from "node:path";
import { parse } from "yaml";

const ROOT = path.resolve(__dirname, "../..");
const read = (file: string) => fs.readFileSync(path.join(ROOT, file), "utf8");

interface ComposeService {
	image?: string;
	build?: string;
	environment?: Record<string, string>;
	healthcheck?: { test: string[] };
	depends_on?: Record<string, { condition: string }>;
}

describe("deployment files", () => {
	const compose = parse(read("docker-compose.yml")) as { services: Record<string, ComposeService> };
	const configSource = read("config/index.ts");

	it("health-checks every service and starts nodes only after what they depend on is healthy", () => {
		for (const [name, service] of Object.entries(compose.services)) {
			expect({ name, test: service.healthcheck?.test?.[0] }).toEqual({ name, test: "CMD" });
			for (const dependency of Object.values(service.depends_on ?? {})) expect(dependency.condition).toBe("service_healthy");
		}
	});

	it("sets only environment variables the configuration reads", () => {
		for (const service of Object.values(compose.services).filter(s => s.build))
			for (const name of Object.keys(service.environment ?? {})) expect(configSource).toContain(`"${name}"`);
	});

	it("runs, in the image, files that `npm run build` produces", () => {
		const cmd = /^CMD (\[.*\])$/m.exec(read("Dockerfile"));
		const args = JSON.parse(cmd?.[1] ?? "[]") as string[];
		for (const file of args.filter(a => a.startsWith("dist/") || a.startsWith("node_modules/"))) expect(fs.existsSync(path.join(ROOT, file))).toBe(true);
	});
});
