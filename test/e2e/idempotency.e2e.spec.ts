/**
 * Safe retries over real HTTP: two gateways over a real nats-server, one on the node that keeps the
 * data (all services) and one with the gateway alone. A POST retried with its `Idempotency-Key` is
 * answered once and replayed byte for byte, on either gateway, after a restart of the data node, and
 * after the gateway that ran it died before answering; a changed request is refused, a running one is
 * 409, bad keys are 400 and change nothing, and without the header nothing changes.
 * Orders are slow for real (PAYMENT_DELAY_MS), to catch a request while it runs.
 */
import { eventually } from "../helpers/broker";
import { all, type Deal, type Entry, type Order } from "../helpers/cluster";
import { NatsServer } from "../helpers/nats";
import { freePort, System, TOKENS } from "../helpers/system";

jest.setTimeout(120_000);

interface Raw {
	status: number;
	text: string;
	headers: Headers;
}

describe("Idempotency-Key over HTTP, across gateways and restarts", () => {
	let nats: NatsServer;
	let data: System;
	let edge: System;
	let started = 0;

	/** A node on the cluster; the data node runs every service (and the first gateway). */
	async function node(services?: string, env: NodeJS.ProcessEnv = {}): Promise<System> {
		const nodeEnv = {
			TRANSPORTER: nats.url,
			NODE_ID: `idem-${process.pid}-${++started}`,
			RATE_LIMIT: "1000000",
			...(services ? { SERVICES: services } : {}),
			...env
		};
		const system = new System(await freePort(), nodeEnv, await freePort());
		await system.start();
		return system;
	}

	/** One POST as it went over the wire: status, body bytes (as text) and headers. */
	async function post(
		via: System,
		urlPath: string,
		body: unknown,
		key?: string,
		token = TOKENS.staff
	): Promise<Raw> {
		const res = await fetch(`${via.url}/api${urlPath}`, {
			method: "POST",
			headers: {
				authorization: `Bearer ${token}`,
				"content-type": "application/json",
				...(key !== undefined ? { "idempotency-key": key } : {})
			},
			body: typeof body === "string" ? body : JSON.stringify(body)
		});
		return { status: res.status, text: await res.text(), headers: res.headers };
	}
	const api = (method: string, urlPath: string, body?: unknown) =>
		data.call(method, `/api${urlPath}`, body);
	const balance = async (memberId: string) =>
		(await api("GET", `/points/${memberId}`)).body.balance as number;
	const deals = (memberId: string) => all<Deal>(api, `/deals?memberId=${memberId}`);
	const join = async (memberId: string) =>
		expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);
	/** The same answer, byte for byte, marked as a replay. */
	const expectReplay = (replay: Raw, first: Raw) => {
		expect({
			status: replay.status,
			text: replay.text,
			type: replay.headers.get("content-type"),
			location: replay.headers.get("location")
		}).toEqual({
			status: first.status,
			text: first.text,
			type: first.headers.get("content-type"),
			location: first.headers.get("location")
		});
		expect(replay.headers.get("idempotent-replayed")).toBe("true");
	};

	beforeAll(async () => {
		nats = await NatsServer.start();
		// A lease of 3 s: a request here takes about 1 s at most (the slow payment).
		data = await node(undefined, { PAYMENT_DELAY_MS: "1000", IDEMPOTENCY_LEASE_MS: "3000" });
		edge = await node("api");
		await eventually(async () => expect((await edge.call("GET", "/api/me")).status).toBe(200));
		for (const memberId of ["i001", "i002", "i003", "i004", "i005"]) await join(memberId);
		await eventually(async () => expect(await balance("i005")).toBe(0));
	});

	afterAll(async () => {
		await Promise.all([data, edge].map(n => n?.stop()));
		await nats?.stop();
	});

	it("makes a deal retried 20 times at once, on both gateways, exactly once, earning once", async () => {
		const save = { memberId: "i001", merchantId: "20", dealAmount: 120_000, type: "save" };
		const answers = await Promise.all(
			Array.from({ length: 20 }, (_, i) =>
				post(i % 2 ? edge : data, "/deals", save, "pos-7:receipt-0001")
			)
		);
		const created = answers.filter(a => a.status === 201);
		// Every answer is the deal, or "still running" for a retry that overtook it.
		expect(answers.filter(a => a.status !== 201).map(a => JSON.parse(a.text).type)).toEqual(
			answers.filter(a => a.status !== 201).map(() => "REQUEST_IN_PROGRESS")
		);
		expect(created.length).toBeGreaterThanOrEqual(1);
		expect(new Set(created.map(a => a.text)).size).toBe(1);
		const deal = JSON.parse(created[0].text);
		expect(deal).toMatchObject({ memberId: "i001", point: 1200, status: "success" });

		// Once answered, every retry on either gateway is that answer.
		const first = created.find(a => !a.headers.has("idempotent-replayed")) ?? created[0];
		for (const via of [data, edge])
			expectReplay(await post(via, "/deals", save, "pos-7:receipt-0001"), first);

		await eventually(async () => expect(await balance("i001")).toBe(1200));
		expect((await deals("i001")).map(d => d.id)).toEqual([deal.id]);
		const ledger = await all<Entry>(api, "/points/i001/history");
		expect(ledger.map(e => [e.cause, e.amount])).toEqual([[`deal:${deal.id}`, 1200]]);
	});

	it("replays a join byte for byte, and a refusal too, without doing anything again", async () => {
		const first = await post(
			edge,
			"/members",
			{ name: "Walk-in", phone: "010-5555-0000" },
			"join-1"
		);
		expect(first.status).toBe(201);
		expect(first.headers.has("idempotent-replayed")).toBe(false);
		// The same body with its keys in another order is the same request.
		expectReplay(
			await post(data, "/members", { phone: "010-5555-0000", name: "Walk-in" }, "join-1"),
			first
		);
		expect(
			(await api("GET", first.headers.get("location")?.replace("/api", "") as string)).body
		).toEqual(JSON.parse(first.text));

		const refused = await post(
			edge,
			"/deals",
			{ memberId: "nobody", merchantId: "20", dealAmount: 100, type: "save" },
			"refused-1"
		);
		expect(refused.status).toBe(404);
		await join("nobody");
		// The refusal stands for its key, even though the request would now succeed.
		expectReplay(
			await post(
				edge,
				"/deals",
				{ memberId: "nobody", merchantId: "20", dealAmount: 100, type: "save" },
				"refused-1"
			),
			refused
		);
		expect(await deals("nobody")).toEqual([]);
	});

	it("refuses the key for a changed body or another path (422), and keeps each token's keys apart", async () => {
		const use = { memberId: "i001", merchantId: "20", dealAmount: 1000, type: "use", point: 100 };
		const first = await post(data, "/deals", use, "use-1");
		expect(JSON.parse(first.text)).toMatchObject({ status: "success", point: 100 });
		for (const [path, body] of [
			["/deals", { ...use, point: 1000 }],
			["/orders", { memberId: "i001", productId: "toast", qty: 1, unitPrice: 100 }]
		] as const) {
			const reused = await post(edge, path, body, "use-1");
			expect(reused.status).toBe(422);
			expect(JSON.parse(reused.text)).toMatchObject({
				name: "MoleculerClientError",
				code: 422,
				type: "IDEMPOTENCY_KEY_REUSED",
				data: { key: "use-1" }
			});
		}
		// Merchant 20's key of the same name is its own.
		const merchants = await post(edge, "/deals", use, "use-1", TOKENS.merchant20);
		expect(merchants.status).toBe(201);
		expect(merchants.headers.has("idempotent-replayed")).toBe(false);
		await eventually(async () => expect(await balance("i001")).toBe(1000));
		expect(await deals("i001")).toHaveLength(3);
	});

	it("answers 409 while the first request runs, then its answer, with one order and one payment", async () => {
		const body = { memberId: "i002", productId: "toast", qty: 1, unitPrice: 3000 };
		const running = post(data, "/orders", body, "order-1");
		// Running: the order is stored, waiting for the (slow) payment.
		await eventually(async () =>
			expect(await all<Order>(api, "/orders?memberId=i002&status=pending")).toHaveLength(1)
		);
		const overtaking = await post(edge, "/orders", body, "order-1");
		expect(overtaking.status).toBe(409);
		expect(JSON.parse(overtaking.text)).toMatchObject({
			code: 409,
			type: "REQUEST_IN_PROGRESS",
			data: { key: "order-1" }
		});
		expect(Number(overtaking.headers.get("retry-after"))).toBeGreaterThan(0);
		const first = await running;
		expect(first.status).toBe(201);
		expectReplay(await post(edge, "/orders", body, "order-1"), first);
		const orders = await all<Order>(api, "/orders?memberId=i002");
		expect(orders.map(o => [o.id, o.status])).toEqual([[JSON.parse(first.text).id, "paid"]]);
		expect((await api("GET", `/payments?orderId=${orders[0].id}`)).body.total).toBe(1);
		await eventually(async () => expect(await balance("i002")).toBe(300));
	});

	it("refuses bad keys with 400 INVALID_IDEMPOTENCY_KEY and changes nothing", async () => {
		const save = { memberId: "i003", merchantId: "20", dealAmount: 10_000, type: "save" };
		for (const key of ["", "k".repeat(256), "tab\there", "caf\u00e9"]) {
			const res = await post(edge, "/deals", save, key);
			expect(res.status).toBe(400);
			expect(JSON.parse(res.text)).toMatchObject({ code: 400, type: "INVALID_IDEMPOTENCY_KEY" });
		}
		expect(await deals("i003")).toEqual([]);
		// The longest key there may be, of every printable character.
		const printable = Array.from({ length: 95 }, (_, i) => String.fromCharCode(32 + i))
			.join("")
			.trim();
		expect((await post(edge, "/deals", save, printable.padEnd(255, "~"))).status).toBe(201);
		expect(await deals("i003")).toHaveLength(1);
	});

	it("changes nothing without the header: the same POST twice is two deals", async () => {
		const save = { memberId: "i004", merchantId: "20", dealAmount: 10_000, type: "save" };
		const [one, two] = [await post(edge, "/deals", save), await post(edge, "/deals", save)];
		expect([one.status, two.status]).toEqual([201, 201]);
		expect(one.headers.has("idempotent-replayed") || two.headers.has("idempotent-replayed")).toBe(
			false
		);
		expect(JSON.parse(one.text).id).not.toBe(JSON.parse(two.text).id);
		await eventually(async () => expect(await balance("i004")).toBe(200));
	});

	it("keeps the keys through a restart of the data node", async () => {
		const save = { memberId: "i004", merchantId: "20", dealAmount: 30_000, type: "save" };
		const first = await post(edge, "/deals", save, "before-restart");
		expect(first.status).toBe(201);
		await data.stop();
		await data.start();
		await eventually(async () =>
			expect((await post(edge, "/deals", save, "before-restart")).status).toBe(201)
		);
		expectReplay(await post(data, "/deals", save, "before-restart"), first);
		await eventually(async () => expect(await balance("i004")).toBe(500));
		expect(await deals("i004")).toHaveLength(3);
	});

	it("runs a request whose gateway died before answering again once its lease ends, answering the same order", async () => {
		const body = { memberId: "i005", productId: "toast", qty: 2, unitPrice: 2500 };
		const lost = post(edge, "/orders", body, "order-lost").catch((err: unknown) => err);
		await eventually(async () =>
			expect(await all<Order>(api, "/orders?memberId=i005&status=pending")).toHaveLength(1)
		);
		await edge.stop("SIGKILL");
		// The client never got an answer.
		expect(await lost).toHaveProperty("message", "fetch failed");
		// The dead gateway's lease still holds the key.
		expect((await post(data, "/orders", body, "order-lost")).status).toBe(409);
		const rerun = await eventually(
			async () => {
				const res = await post(data, "/orders", body, "order-lost");
				expect(res.status).toBe(201);
				return res;
			},
			10_000,
			200
		);
		// Run again, not replayed: under the same request id, orders answered the order it had made.
		expect(rerun.headers.has("idempotent-replayed")).toBe(false);
		const order = JSON.parse(rerun.text);
		expect(order).toMatchObject({ memberId: "i005", status: "paid", points: 500 });
		expectReplay(await post(data, "/orders", body, "order-lost"), rerun);
		const orders = await all<Order>(api, "/orders?memberId=i005");
		expect(orders.map(o => o.id)).toEqual([order.id]);
		expect((await api("GET", `/payments?orderId=${order.id}`)).body.total).toBe(1);
		await eventually(async () => expect(await balance("i005")).toBe(500));
	});
});
