/**
 * Partial returns over real HTTP, through the gateway and its tokens: returns adding up to the whole,
 * refusals that change nothing, a merchant's rights, and billing after a use's partial returns.
 */
import { eventually } from "../helpers/broker";
import { faketime } from "../helpers/clock";
import { System, TOKENS } from "../helpers/system";

jest.setTimeout(60_000);

describe("partial returns over HTTP", () => {
	let system: System;
	const api = <T = any>(
		method: string,
		urlPath: string,
		body?: unknown,
		headers?: Record<string, string | null>
	) => system.call<T>(method, `/api${urlPath}`, body, headers);
	const balance = async (memberId: string) =>
		(await api("GET", `/points/${memberId}`)).body.balance as number;
	const history = async (memberId: string) =>
		(await api("GET", `/points/${memberId}/history?pageSize=100`)).body.rows as Array<{
			cause: string;
			amount: number;
		}>;
	/** The member's balance equals the sum of its ledger, once the events have landed. */
	const settled = (memberId: string, expected: number) =>
		eventually(async () => {
			const rows = await history(memberId);
			expect({
				balance: await balance(memberId),
				ledger: rows.reduce((sum, e) => sum + e.amount, 0)
			}).toEqual({
				balance: expected,
				ledger: expected
			});
			return rows;
		});
	const returnOf = (id: string, body?: unknown, headers?: Record<string, string | null>) =>
		api("POST", `/deals/${id}/cancel`, body, headers);

	beforeAll(async () => {
		system = await System.start(faketime("2026-05-14 10:00:00"));
		for (const memberId of ["0001", "0002"])
			expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);
	});
	afterAll(() => system.stop());

	it("returns a save in three parts that revoke exactly its points", async () => {
		const saved = (
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: 10001,
				type: "save"
			})
		).body;
		expect(saved.point).toBe(100);
		await settled("0001", 100);
		const steps = [
			[{ amount: 3333 }, "partially_cancelled", 33],
			[{ amount: "3333" }, "partially_cancelled", 66],
			[undefined, "cancelled", 100]
		] as const;
		for (const [body, status, returnedPoints] of steps) {
			const res = await returnOf(saved.id, body);
			expect(res.status).toBe(200);
			expect(res.body).toMatchObject({ id: saved.id, status, returnedPoints });
		}
		const rows = await settled("0001", 0);
		expect(
			rows.filter(e => e.cause.startsWith(`deal-return:${saved.id}:`)).map(e => e.amount)
		).toEqual([-34, -33, -33]);
		const again = await returnOf(saved.id, { amount: 1 });
		expect(again).toMatchObject({
			status: 409,
			body: { type: "DEAL_ALREADY_CANCELLED", code: 409 }
		});
	});

	it("refuses a return over the remainder and bad amounts with a code, and changes nothing", async () => {
		const saved = (
			await api("POST", "/deals", {
				memberId: "0002",
				merchantId: "20",
				dealAmount: 5000,
				type: "save"
			})
		).body;
		await settled("0002", 50);
		expect((await returnOf(saved.id, { amount: 1000 })).body).toMatchObject({
			status: "partially_cancelled",
			returnedPoints: 10
		});
		await settled("0002", 40);
		const before = {
			deal: (await api("GET", `/deals/${saved.id}`)).body,
			ledger: await history("0002")
		};

		const over = await returnOf(saved.id, { amount: 4001 });
		expect(over.status).toBe(409);
		expect(over.body).toEqual({
			name: "MoleculerClientError",
			message: expect.any(String),
			code: 409,
			type: "RETURN_EXCEEDS_REMAINDER",
			data: { id: saved.id, amount: 4001, remainder: 4000 }
		});
		for (const amount of [0, -1, 2.5, "abc", "", 10_000_000_001, { $gt: 0 }]) {
			const res = await returnOf(saved.id, { amount });
			expect({ amount, status: res.status, type: res.body.type }).toEqual({
				amount,
				status: 422,
				type: "VALIDATION_ERROR"
			});
			expect(res.body.data).toEqual([expect.objectContaining({ field: "amount" })]);
		}
		expect((await returnOf(saved.id, { amount: 10, note: "x" })).body).toMatchObject({
			type: "VALIDATION_ERROR"
		});

		await settled("0002", 40);
		expect({
			deal: (await api("GET", `/deals/${saved.id}`)).body,
			ledger: await history("0002")
		}).toEqual(before);
	});

	it("lets a merchant return only its own deals", async () => {
		const saved = (
			await api("POST", "/deals", {
				memberId: "0002",
				merchantId: "20",
				dealAmount: 2000,
				type: "save"
			})
		).body;
		const other = await returnOf(
			saved.id,
			{ amount: 100 },
			{ authorization: `Bearer ${TOKENS.merchant21}` }
		);
		expect(other).toMatchObject({ status: 403, body: { type: "FORBIDDEN" } });
		expect((await api("GET", `/deals/${saved.id}`)).body.status).toBe("success");
		const own = await returnOf(
			saved.id,
			{ amount: 100 },
			{ authorization: `Bearer ${TOKENS.merchant20}` }
		);
		expect(own).toMatchObject({
			status: 200,
			body: { status: "partially_cancelled", returnedAmount: 100, returnedPoints: 1 }
		});
	});

	it("bills a use less its partial returns, in the view and the month's settlement", async () => {
		await settled("0001", 0);
		await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "21",
			dealAmount: 100000,
			type: "save"
		});
		await settled("0001", 1000);
		const used = (
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "21",
				dealAmount: 9000,
				type: "use",
				point: 900
			})
		).body;
		expect(used.status).toBe("success");
		expect((await returnOf(used.id, { amount: 2000 })).body).toMatchObject({ returnedPoints: 200 });
		expect((await returnOf(used.id, { amount: 1000 })).body).toMatchObject({ returnedPoints: 300 });
		await settled("0001", 400);
		await eventually(async () =>
			expect((await api("GET", `/billing-amount-views/${used.id}`)).body).toMatchObject({
				dealId: used.id,
				point: 600,
				returnedPoints: 300
			})
		);
		const month = used.dealDate.slice(0, 7).replace("-", "");
		const settlement = await api(
			"POST",
			"/billings",
			{ merchantId: "21", billingMonth: month },
			{ authorization: `Bearer ${TOKENS.merchant21}` }
		);
		// 600 points less the 2 % fee; on the other side, the 1000 points the save issued, at 1 each.
		expect(settlement.body).toMatchObject({
			status: "provisional",
			usedPoints: 600,
			dealCount: 1,
			billingAmount: 588,
			issued: { points: 1000, amount: 1000 },
			net: 588 - 1000,
			lines: [
				{ kind: "save", type: "save", points: 1000, amount: 1000 },
				{ kind: "use", type: "use", dealId: used.id, points: 600, amount: 588 }
			]
		});
	});
});
