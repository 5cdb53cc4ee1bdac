/**
 * Merchants as partners over a cluster (NATS), on each store: a data node with every service and its
 * own gateway, and a second gateway node. A key issued on one gateway works on both and, revoked,
 * is refused by both within 5 s; a merchant's month of saves, uses and returns settles both sides,
 * the JSON and the CSV statement agree, and a return after the month closed is carried into the next.
 */
import { parse } from "csv-parse/sync";
import { eventually } from "../helpers/broker";
import { faketime } from "../helpers/clock";
import { NatsServer } from "../helpers/nats";
import { freePort, System } from "../helpers/system";

jest.setTimeout(120_000);

interface Line {
	kind: string;
	type: string;
	dealId: string;
	points: number;
	amount: number;
	reason?: string;
	month?: string;
}

describe("merchants over a cluster", () => {
	let nats: NatsServer;
	let data: System;
	let edge: System;

	beforeAll(async () => {
		nats = await NatsServer.start();
		const env = (name: string) => ({
			TRANSPORTER: nats.url,
			NODE_ID: `${name}-${process.pid}`,
			RATE_LIMIT: "1000000",
			MONTH_END_GRACE_MINUTES: "0",
			...faketime("2026-05-20 10:00:00")
		});
		data = new System(await freePort(), env("data"), await freePort());
		edge = new System(await freePort(), { ...env("edge"), SERVICES: "api" }, await freePort());
		await Promise.all([data.start(), edge.start()]);
		await eventually(async () =>
			expect((await edge.call("GET", "/api/merchants")).status).toBe(200)
		);
		await data.call("POST", "/api/members", { memberId: "k001", name: "Kim" });
	});

	afterAll(async () => {
		await Promise.all([data, edge].map(node => node?.stop()));
		await nats?.stop();
	});

	it("honours a key on every gateway, and refuses it on every gateway within 5 s of its revocation", async () => {
		expect(
			(await edge.call("POST", "/api/merchants", { merchantId: "bakery", name: "Bakery" })).status
		).toBe(201);
		const issued = await data.call("POST", "/api/merchants/bakery/keys", { name: "pos" });
		expect(issued.status).toBe(201);
		const auth = { authorization: `Bearer ${issued.body.token}` };
		for (const gateway of [data, edge])
			expect((await gateway.call("GET", "/api/me", undefined, auth)).body).toEqual({
				role: "merchant",
				merchantId: "bakery"
			});
		const made = await edge.call(
			"POST",
			"/api/deals",
			{ memberId: "k001", merchantId: "bakery", dealAmount: 20_000, type: "save" },
			auth
		);
		expect(made).toMatchObject({ status: 201, body: { merchantId: "bakery", point: 200 } });

		expect(
			(await data.call("DELETE", `/api/merchants/bakery/keys/${issued.body.keyId}`)).body.status
		).toBe("revoked");
		for (const gateway of [data, edge])
			await eventually(
				async () =>
					expect(await gateway.call("GET", "/api/me", undefined, auth)).toMatchObject({
						status: 401,
						body: { type: "INVALID_TOKEN" }
					}),
				5_000
			);
	});

	it("settles both sides of a merchant's month, JSON and CSV alike, and carries a later return into the next month", async () => {
		await data.call("POST", "/api/merchants", {
			merchantId: "grocer",
			name: "Grocer",
			earnRate: 0.05,
			redemptionFee: 0.1,
			pointPrice: 1.2
		});
		const deal = async (body: object) =>
			(await edge.call("POST", "/api/deals", { memberId: "k001", merchantId: "grocer", ...body }))
				.body as { id: string; point: number };
		// Saves: 10,000 → 500 points and 3,333 → 166; a use of 300.
		const big = await deal({ dealAmount: 10_000, type: "save" });
		const small = await deal({ dealAmount: 3_333, type: "save" });
		expect([big.point, small.point]).toEqual([500, 166]);
		// With the bakery's 200 from the test above.
		await eventually(async () =>
			expect((await data.call("GET", "/api/points/k001")).body.balance).toBe(866)
		);
		const use = await deal({ dealAmount: 30_000, type: "use", point: 300 });
		// Half the big save returned (250 points back), a third of the use (100 restored).
		await edge.call("POST", `/api/deals/${big.id}/cancel`, { amount: 5_000 });
		await edge.call("POST", `/api/deals/${use.id}/cancel`, { amount: 10_000 });

		// Issued 250 + 166 = 416 points × 1.2 = 499 (250 × 1.2 = 300, 166 × 1.2 = 199.2 → 199);
		// redeemed 200 points, less the 10 % fee: 180; net 180 − 499 = −319 (the merchant pays).
		const settlement = await eventually(async () => {
			const s = (await data.call("GET", "/api/billings/grocer/202605")).body;
			expect(s).toMatchObject({
				status: "provisional",
				redeemed: { points: 200, fee: 20, amount: 180 },
				issued: { points: 416, amount: 499 },
				net: -319,
				billingAmount: 180
			});
			return s as { lines: Line[]; net: number };
		});
		const csv = await edge.call("GET", "/api/billings/grocer/202605/statement.csv");
		expect(csv.status).toBe(200);
		expect(csv.headers.get("content-type")).toMatch(/^text\/csv/);
		const rows = parse(csv.body as string, { columns: true }) as Record<string, string>[];
		const lines = rows.filter(r => r.kind !== "total");
		expect(lines.map(r => [r.kind, r.type, r.dealId, Number(r.points), Number(r.amount)])).toEqual(
			settlement.lines.map(l => [l.kind, l.type, l.dealId, l.points, l.amount])
		);
		const totals = Object.fromEntries(
			rows.filter(r => r.kind === "total").map(r => [r.type, Number(r.amount)])
		);
		// The bonus row has points and no amount: the coalition funds it (none here: one tier).
		expect(totals).toEqual({ redeemed: 180, fee: 20, issued: 499, net: -319, bonus: 0 });

		// The month closes (its end passed, no grace); the rest of the big save returned in June is
		// June's line: 250 points taken back at the recorded price, −300.
		await data.stop();
		Object.assign(data.env, faketime("2026-06-02 09:00:00"));
		await data.start();
		await eventually(
			async () =>
				expect((await data.call("GET", "/api/billings/grocer/202605")).body).toMatchObject({
					status: "final",
					net: -319
				}),
			30_000
		);
		await edge.call("POST", `/api/deals/${big.id}/cancel`, {});
		const june = await eventually(async () => {
			const s = (await data.call("GET", "/api/billings/grocer/202606")).body;
			expect(s.issued).toEqual({ points: -250, amount: -300 });
			return s as { lines: Line[]; net: number };
		});
		expect(june.lines).toEqual([
			expect.objectContaining({
				kind: "adjustment",
				type: "save",
				dealId: big.id,
				points: -250,
				amount: -300,
				month: "202605",
				reason: "RETURNED_AFTER_SETTLEMENT"
			})
		]);
		expect(june.net).toBe(300);
		expect((await data.call("GET", "/api/billings/grocer/202605")).body.net).toBe(-319);

		// The coalition's view of May: every merchant's settlement and the totals.
		const may = (await edge.call("GET", "/api/billings?billingMonth=202605")).body;
		expect(may.status).toBe("final");
		expect(may.settlements.map((s: { merchantId: string }) => s.merchantId)).toEqual([
			"bakery",
			"grocer"
		]);
		expect(may.totals).toEqual({
			redeemed: { points: 200, fee: 20, amount: 180 },
			// The bakery's save of 200 points at the default price of 1.
			issued: { points: 616, amount: 699 },
			net: -519,
			bonus: { points: 0 }
		});
	});

	it("holds a save's points over the cluster until its window ends, then releases them once across a restart", async () => {
		expect(
			(
				await edge.call("POST", "/api/merchants", {
					merchantId: "holder",
					name: "Holder",
					holdDays: 1
				})
			).status
		).toBe(201);
		await edge.call("POST", "/api/members", { memberId: "k002", name: "Lee" });
		await eventually(async () =>
			expect((await edge.call("GET", "/api/points/k002")).status).toBe(200)
		);
		const saved = (
			await edge.call("POST", "/api/deals", {
				memberId: "k002",
				merchantId: "holder",
				dealAmount: 10_000,
				type: "save"
			})
		).body as { id: string };
		await eventually(async () =>
			expect((await edge.call("GET", "/api/points/k002")).body).toMatchObject({
				balance: 0,
				held: 100,
				releasing: [{ dealId: saved.id, points: 100 }]
			})
		);
		// Two days on, past the one-day window: released at start, once.
		await data.stop();
		Object.assign(data.env, faketime("2026-06-04 09:00:00"));
		await data.start();
		await eventually(async () =>
			expect((await edge.call("GET", "/api/points/k002")).body).toMatchObject({
				balance: 100,
				held: 0
			})
		);
		const history = (await edge.call("GET", "/api/points/k002/history")).body as {
			rows: { cause: string }[];
		};
		expect(history.rows.filter(e => e.cause === `release:${saved.id}`)).toHaveLength(1);
	});
});
