/**
 * What an operator sees of a running system (docs/monitoring.md): its `/metrics`, which promtool
 * finds nothing to say of and which exports every series the alerts and the dashboard name; one
 * trace per HTTP request, collected by a real HTTP receiver standing in for Zipkin, across the
 * embedded adapter and across nodes over NATS; `X-Trace-Id` on every answer; and JSON logs at debug
 * level that hold no token, secret or member's name, phone or email.
 */
import { eventually } from "../helpers/broker";
import { alertGroups, dashboardQueries, exported, promtool, seriesIn } from "../helpers/monitoring";
import { NatsServer } from "../helpers/nats";
import { Receiver } from "../helpers/receiver";
import { freePort, System, TOKENS } from "../helpers/system";

jest.setTimeout(120_000);

/** A span as Moleculer's Zipkin exporter sends it (API v2). */
interface Span {
	traceId: string;
	id: string;
	parentId?: string;
	name: string;
	localEndpoint: { serviceName: string | null };
	tags: Record<string, string>;
}

/** The spans the receiver got, of one trace. */
function spansOf(receiver: Receiver, traceId: string): Span[] {
	return receiver
		.at("/api/v2/spans")
		.flatMap(request => JSON.parse(request.body) as Span[])
		.filter(span => span.traceId === traceId);
}

/** What a trace must hold of a `use` deal: the gateway, the deal, the debit, and its event's consumers. */
async function expectUseDealTrace(receiver: Receiver, traceId: string): Promise<Span[]> {
	return eventually(() => {
		const spans = spansOf(receiver, traceId);
		const names = spans.map(span => `${span.localEndpoint.serviceName} ${span.name}`);
		expect(names).toEqual(
			expect.arrayContaining([
				"api POST /api/deals",
				"deals action 'deals.create'",
				"points action 'points.debit'",
				"billing channel 'onepoint.deal.used'",
				"dashboard channel 'onepoint.deal.used'"
			])
		);
		// One tree: every span but the gateway's has its parent in the trace.
		const ids = new Set(spans.map(span => span.id));
		expect(spans.filter(span => !span.parentId).map(span => span.name)).toEqual([
			"POST /api/deals"
		]);
		expect(spans.filter(span => span.parentId && !ids.has(span.parentId))).toEqual([]);
		return spans;
	}, 20_000);
}

const MEMBER = { name: "Haneul Seo-yeon", phone: "+82-10-5555-0199", email: "haneul@example.org" };

describe("monitoring one node on the embedded channel adapter", () => {
	let system: System;
	let zipkin: Receiver;
	const api = (
		method: string,
		urlPath: string,
		body?: unknown,
		headers: Record<string, string | null> = {}
	) => system.call(method, `/api${urlPath}`, body, headers);

	beforeAll(async () => {
		zipkin = await Receiver.start();
		system = await System.start({
			TRACING: "zipkin",
			ZIPKIN_URL: zipkin.url(""),
			LOG_FORMAT: "json",
			LOG_LEVEL: "debug"
		});
	});
	afterAll(async () => {
		await system.stop();
		await zipkin.stop();
	});

	let useTraceId = "";
	let memberToken = "";

	it("runs the seed scenario and an order, each answer with its own X-Trace-Id", async () => {
		const answers = [
			await api("POST", "/members", { memberId: "0001", ...MEMBER }),
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: "100000",
				type: "save"
			}),
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: "10000",
				type: "use",
				point: " 100"
			}),
			await api("GET", "/points/0001"),
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: "10000",
				type: "use",
				point: "10000"
			}),
			await api("POST", "/orders", { memberId: "0001", productId: "p1", qty: 2, unitPrice: 1500 }),
			await api("POST", "/members/0001/sessions")
		];
		expect(answers.map(a => a.status)).toEqual([201, 201, 201, 200, 201, 201, 201]);
		memberToken = answers[6].body.token;
		expect(
			(await api("GET", "/points/0001", undefined, { authorization: `Bearer ${memberToken}` }))
				.status
		).toBe(200);
		// Refused and unrouted requests carry one too.
		answers.push(await api("GET", "/points/0001", undefined, { authorization: null }));
		answers.push(await system.call("GET", "/nowhere"));
		const ids = answers.map(a => a.headers.get("x-trace-id"));
		for (const id of ids) expect(id).toMatch(/^[0-9a-f]{16}$/);
		expect(new Set(ids).size).toBe(ids.length);
		useTraceId = ids[2] as string;
	});

	it("sends one trace for a use deal: gateway, deal, debit and its event's consumers", async () => {
		const spans = await expectUseDealTrace(zipkin, useTraceId);
		// Spans carry ids, not what members sent.
		expect(JSON.stringify(spans)).not.toContain(MEMBER.name);
	});

	it("exports every onepoint series, which promtool finds nothing to say of", async () => {
		const metrics = await (await fetch(`http://127.0.0.1:${system.opsPort}/metrics`)).text();
		const { output } = promtool(["check", "metrics"], metrics);
		expect(output.split("\n").filter(line => line.includes("onepoint_"))).toEqual([]);
		expect(metrics).toMatch(/^onepoint_deals_total\{[^}]*type="use",status="success"\} 1$/m);
		expect(metrics).toMatch(/^onepoint_deals_total\{[^}]*type="use",status="fail"\} 1$/m);
		expect(metrics).toMatch(/^onepoint_points_posted_total\{[^}]*kind="use"\} 100$/m);
		expect(metrics).toMatch(
			/^onepoint_http_requests_total\{[^}]*route="\/api\/points\/:memberId",method="GET",status="200"\} 2$/m
		);
		expect(metrics).toMatch(
			/^onepoint_http_request_duration_seconds_count\{[^}]*route="\/api\/deals",method="POST"\} 3$/m
		);
		expect(metrics).toMatch(
			/^onepoint_channel_backlog\{[^}]*channel="deal\.used",group="billing"\} 0$/m
		);
		expect(metrics).toMatch(/^onepoint_node_ready\{namespace="onepoint",node_id="[^"]+"\} 1$/m);
		// No month is past its grace on a fresh store: the series is declared, without values.
		expect(metrics).toMatch(/^# TYPE onepoint_settlements_open gauge$/m);
		expect(metrics).not.toMatch(/^onepoint_settlements_open\{/m);
	});

	it("exports every series the alerts and the dashboard name", async () => {
		const metrics = await (await fetch(`http://127.0.0.1:${system.opsPort}/metrics`)).text();
		// `up` is Prometheus' own, of every target it scrapes.
		const available = new Set([...exported(metrics), "up"]);
		const named = [
			...alertGroups().flatMap(group => group.rules.map(rule => rule.expr)),
			...dashboardQueries()
		].flatMap(seriesIn);
		expect(named.length).toBeGreaterThan(10);
		expect([...new Set(named)].filter(name => !available.has(name))).toEqual([]);
	});

	it("logs one JSON object per line, with ids and without tokens, secrets or members' data", async () => {
		await system.stop();
		const lines = system.log.split("\n").filter(line => line.trim());
		const entries = lines.map(line => JSON.parse(line) as Record<string, unknown>);
		for (const entry of entries)
			expect(entry).toEqual(
				expect.objectContaining({
					time: expect.any(String),
					level: expect.any(String),
					nodeID: expect.any(String)
				})
			);
		expect(entries.some(e => e.level === "debug")).toBe(true);
		expect(entries.filter(e => e.traceId === useTraceId).map(e => e.svc)).toContain("api");
		for (const secret of [
			TOKENS.staff,
			TOKENS.merchant20,
			memberToken,
			MEMBER.name,
			MEMBER.phone,
			MEMBER.email
		])
			expect([secret, system.log.includes(secret)]).toEqual([secret, false]);
	});
});

describe("tracing across nodes over NATS", () => {
	let nats: NatsServer;
	let zipkin: Receiver;
	const nodes: System[] = [];
	let gateway: System;

	async function startNode(name: string, services: string, port = 0): Promise<System> {
		const node = new System(
			port,
			{
				TRANSPORTER: nats.url,
				SERVICES: services,
				NODE_ID: `${name}-${process.pid}`,
				TRACING: "zipkin",
				ZIPKIN_URL: zipkin.url("")
			},
			await freePort()
		);
		nodes.push(node);
		await node.start();
		return node;
	}

	beforeAll(async () => {
		nats = await NatsServer.start();
		zipkin = await Receiver.start();
		await Promise.all([
			startNode("points", "points"),
			startNode("core", "members,merchants,deals"),
			startNode("views", "billing,dashboard")
		]);
		gateway = await startNode("gateway", "api", await freePort());
		await eventually(async () =>
			expect((await gateway.call("GET", "/api/health")).status).toBe(200)
		);
	});
	afterAll(async () => {
		await Promise.all(nodes.map(node => node.stop()));
		await nats.stop();
		await zipkin.stop();
	});

	it("follows a use deal through the gateway, deals, points and its consumers, node to node", async () => {
		const api = (urlPath: string, body: unknown) => gateway.call("POST", `/api${urlPath}`, body);
		expect((await api("/members", { memberId: "0001", name: "Kim" })).status).toBe(201);
		const save = { memberId: "0001", merchantId: "20", dealAmount: 100000, type: "save" };
		await eventually(async () => expect((await api("/deals", save)).status).toBe(201));
		await eventually(async () =>
			expect((await gateway.call("GET", "/api/points/0001")).body.balance).toBe(1000)
		);
		const use = await api("/deals", { ...save, dealAmount: 10000, type: "use", point: 100 });
		expect(use.body.status).toBe("success");
		const spans = await expectUseDealTrace(zipkin, use.headers.get("x-trace-id") as string);
		const nodeOf = (name: string) => spans.find(span => span.name === name)?.tags.nodeID;
		expect(nodeOf("POST /api/deals")).toBe(`gateway-${process.pid}`);
		expect(nodeOf("action 'deals.create'")).toBe(`core-${process.pid}`);
		expect(nodeOf("action 'points.debit'")).toBe(`points-${process.pid}`);
		expect(
			spans
				.filter(span => span.name === "channel 'onepoint.deal.used'")
				.map(span => span.tags.nodeID)
		).toContain(`views-${process.pid}`);
	});

	it("reports each consumer group's backlog from JetStream, which promtool finds nothing to say of", async () => {
		const views = nodes.find(node => node.env.NODE_ID === `views-${process.pid}`) as System;
		const metrics = await (await fetch(`http://127.0.0.1:${views.opsPort}/metrics`)).text();
		expect(metrics).toMatch(
			/^onepoint_channel_backlog\{[^}]*channel="deal\.used",group="billing"\} 0$/m
		);
		expect(metrics).toMatch(
			/^onepoint_channel_oldest_seconds\{[^}]*channel="deal\.used",group="dashboard"\} 0$/m
		);
		const { output } = promtool(["check", "metrics"], metrics);
		expect(output.split("\n").filter(line => line.includes("onepoint_"))).toEqual([]);
	});
});
