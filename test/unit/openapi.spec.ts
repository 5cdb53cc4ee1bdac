/**
 * The published contract: `GET /api/openapi.json` is a valid OpenAPI document; every route the
 * gateway serves is in it and every operation in it is served; actions without `rest` (internal
 * ones such as `points.debit`) are not; and each operation's parameters are its action's params.
 */
import fs from "node:fs";
import path from "node:path";
import SwaggerParser from "@apidevtools/swagger-parser";
import type { ServiceBroker } from "moleculer";
import ApiService from "../../services/api.service";
import { createTestBroker, type AnyServiceSchema } from "../helpers/broker";
import { freePort, TOKENS } from "../helpers/system";

interface Operation {
	operationId: string;
	security?: unknown[];
	parameters?: { name: string; in: string; required: boolean; schema: Record<string, unknown> }[];
	requestBody?: {
		content: {
			"application/json": {
				schema: {
					properties: Record<string, Record<string, unknown>>;
					required?: string[];
					additionalProperties?: boolean;
				};
			};
		};
	};
}
interface Contract {
	openapi: string;
	paths: Record<string, Record<string, Operation>>;
}

const SERVICES_DIR = path.join(__dirname, "../../services");
/** Every service schema in `services/`, as the runner loads them. */
const schemas: AnyServiceSchema[] = fs
	.readdirSync(SERVICES_DIR)
	.filter(file => file.endsWith(".service.ts"))
	// eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded by name, as moleculer-runner loads them
	.map(file => (require(path.join(SERVICES_DIR, file)) as { default: AnyServiceSchema }).default);

/** `service.action` → its `rest` ("METHOD /path"), or undefined for an internal action. */
const declared = new Map(
	schemas.flatMap(schema =>
		Object.entries(schema.actions ?? {}).map(
			([name, action]) => [`${schema.name}.${name}`, (action as { rest?: string }).rest] as const
		)
	)
);

const toOpenApiPath = (route: string) => route.replace(/:(\w+)/g, "{$1}");

describe("the published API contract", () => {
	let broker: ServiceBroker;
	let url: string;
	let contract: Contract;
	/** "METHOD /api/path" → its operation. */
	let operations: Map<string, Operation>;

	beforeAll(async () => {
		const port = await freePort();
		// Every service, so that a route's action is there and its answer is about the route, not a 503.
		broker = createTestBroker([...schemas.filter(schema => schema.name !== "api"), ApiService], {
			PORT: String(port),
			HOST: "127.0.0.1",
			API_KEYS: `${TOKENS.staff}=staff`
		});
		await broker.start();
		url = `http://127.0.0.1:${port}`;
		const response = await fetch(`${url}/api/openapi.json`);
		expect(response.status).toBe(200);
		contract = (await response.json()) as Contract;
		operations = new Map(
			Object.entries(contract.paths).flatMap(([p, ops]) =>
				Object.entries(ops).map(([method, op]) => [`${method.toUpperCase()} ${p}`, op] as const)
			)
		);
	});
	afterAll(() => broker.stop());

	it("is a valid OpenAPI 3.1 document, served without a token", async () => {
		expect(contract.openapi).toBe("3.1.0");
		await expect(SwaggerParser.validate(structuredClone(contract) as never)).resolves.toBeDefined();
	});

	it("has every route the gateway serves, and nothing it does not", async () => {
		const aliases =
			await broker.call<{ methods: string; fullPath: string; actionName?: string }[]>(
				"api.listAliases"
			);
		const served = aliases
			.filter(alias => alias.fullPath.startsWith("/api/"))
			.map(alias => `${alias.methods} ${toOpenApiPath(alias.fullPath)}`);
		expect(served.length).toBeGreaterThan(20);
		expect([...operations.keys()].sort()).toEqual([...served].sort());
	});

	it("answers every documented operation (401 without a token, not 404), and the public ones without", async () => {
		for (const [route, op] of operations) {
			const [method, p] = route.split(" ");
			const response = await fetch(url + p.replace(/\{\w+\}/g, "x1"), { method });
			const isPublic = Array.isArray(op.security) && op.security.length === 0;
			if (p === "/api/dashboard/stream" || !isPublic)
				expect([route, response.status]).toEqual([route, 401]);
			else expect([route, response.status]).toEqual([route, 200]);
			await response.body?.cancel();
		}
	});

	it("documents every action with a rest route, under its own name, and no internal action", () => {
		const documented = new Set([...operations.values()].map(op => op.operationId));
		const internal = [...declared].filter(([, rest]) => !rest).map(([name]) => name);
		expect(internal).toEqual(
			expect.arrayContaining(["points.debit", "points.audit", "payments.pay", "billing.closeMonth"])
		);
		for (const name of internal) expect(documented).not.toContain(name);
		for (const [name, rest] of declared) {
			if (!rest) continue;
			const [method, route] = rest.split(" ");
			expect([name, operations.get(`${method} /api${toOpenApiPath(route)}`)?.operationId]).toEqual([
				name,
				name
			]);
		}
	});

	it("gives each operation its action's params: path, query or a strict JSON body", () => {
		const create = operations.get("POST /api/deals");
		const body = create?.requestBody?.content["application/json"].schema;
		expect(body).toMatchObject({
			required: expect.arrayContaining(["memberId", "merchantId", "dealAmount", "type"]),
			additionalProperties: false,
			properties: {
				memberId: { type: "string", pattern: "^[A-Za-z0-9_-]{1,64}$" },
				dealAmount: {
					oneOf: [
						{ type: "integer", exclusiveMinimum: 0, maximum: 10_000_000_000 },
						{ type: "string", pattern: "^\\s*\\d+\\s*$" }
					]
				},
				type: { enum: ["save", "use"] },
				point: { oneOf: [{ type: "integer" }, { type: "string" }] }
			}
		});
		expect(body?.required).not.toContain("point");
		expect(create?.parameters).toEqual([
			expect.objectContaining({ name: "Idempotency-Key", in: "header", required: false })
		]);

		const list = operations.get("GET /api/deals")?.parameters ?? [];
		expect(list).toEqual(
			expect.arrayContaining([
				{
					name: "merchantId",
					in: "query",
					required: false,
					schema: expect.objectContaining({ type: "string" })
				},
				{
					name: "pageSize",
					in: "query",
					required: false,
					schema: { type: "integer", minimum: 1, maximum: 100, default: 20 }
				}
			])
		);
		expect(
			operations
				.get("GET /api/billings/{merchantId}/{billingMonth}")
				?.parameters?.map(p => [p.name, p.in, p.required])
		).toEqual([
			["merchantId", "path", true],
			["billingMonth", "path", true]
		]);
	});

	it("documents the bulk routes as staff's only: the import's CSV body, the exports' CSV and NDJSON answers", () => {
		const raw = (route: string) => operations.get(route) as unknown as Record<string, any>;
		for (const route of [
			"POST /api/imports",
			"GET /api/imports/{importId}",
			"GET /api/exports/ledger",
			"GET /api/members.csv"
		])
			expect([route, raw(route)["x-roles"]]).toEqual([route, ["staff"]]);
		const start = raw("POST /api/imports");
		expect(start.requestBody).toEqual({
			required: true,
			content: { "text/csv": { schema: { type: "string" } } }
		});
		// A streamed body is not kept: no Idempotency-Key there.
		expect(start.parameters).toBeUndefined();
		expect(Object.keys(start.responses)).toEqual(expect.arrayContaining(["413", "415"]));
		expect(Object.keys(raw("GET /api/exports/ledger").responses["2XX"].content)).toEqual([
			"application/x-ndjson"
		]);
		expect(raw("GET /api/exports/ledger").parameters.map((p: { name: string }) => p.name)).toEqual([
			"from",
			"to",
			"after"
		]);
		expect(Object.keys(raw("GET /api/members.csv").responses["2XX"].content)).toEqual(["text/csv"]);
	});

	it("serves the reference page and its assets from the package", async () => {
		const page = await fetch(`${url}/docs/`);
		expect(page.status).toBe(200);
		const html = await page.text();
		for (const asset of [...html.matchAll(/(?:src|href)="([^"]+)"/g)].map(m => m[1])) {
			expect(asset).toMatch(/^\/|^[\w.-]+$/);
			const response = await fetch(new URL(asset, `${url}/docs/`));
			expect([asset, response.status]).toEqual([asset, 200]);
			await response.body?.cancel();
		}
		expect((await fetch(`${url}/vendor/not-a-vendored-file.js`)).status).toBe(404);
	});
});
