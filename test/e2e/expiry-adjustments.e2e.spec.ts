/**
 * Points that expire and staff adjustments over real HTTP, on a node whose clock the test sets
 * (libfaketime, preloaded into the node's process): earnings of several months with a use between,
 * a node down over a month's end that catches up when it is back, the REPL's `expire` and `audit`,
 * and adjustments with and without the right to make them.
 */
import { eventually } from "../helpers/broker";
import { faketime } from "../helpers/clock";
import { System, TOKENS } from "../helpers/system";

jest.setTimeout(90_000);

const ALICE = "alice-staff-token-0123456789";
const API_KEYS = `${TOKENS.staff}=staff,${ALICE}=staff:alice,${TOKENS.merchant20}=merchant:20`;
const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

interface Entry {
	cause: string;
	kind: string;
	amount: number;
	reason?: string;
	by?: string;
	lotMonth?: string;
}

describe("points that expire and staff adjustments, over HTTP on a set clock", () => {
	let system: System;
	const api = (
		method: string,
		path: string,
		body?: unknown,
		headers: Record<string, string | null> = {}
	) => system.call(method, `/api${path}`, body, headers);
	const ledger = async (memberId: string) =>
		(await api("GET", `/points/${memberId}/history?pageSize=100`)).body.rows as Entry[];
	const balance = async (memberId: string) =>
		(await api("GET", `/points/${memberId}`)).body.balance as number;
	/** Restarts the node on the same data with its clock at `at`. */
	const restartAt = async (at: string) => {
		await system.stop();
		Object.assign(system.env, faketime(at));
		await system.start();
	};

	beforeAll(async () => {
		system = await System.start(
			{ API_KEYS, POINTS_VALID_MONTHS: "1", ...faketime("2026-03-10 10:00:00") },
			true
		);
	});
	afterAll(() => system.stop());

	it("expires March's earnings left after a use at the end of April, also when the node was down at midnight", async () => {
		await api("POST", "/members", { memberId: "e001", name: "Choi Minji" });
		expect(
			(
				await api("POST", "/deals", {
					memberId: "e001",
					merchantId: "20",
					dealAmount: 100000,
					type: "save"
				})
			).status
		).toBe(201);
		await eventually(async () => expect(await balance("e001")).toBe(1000));
		expect(
			(
				await api("POST", "/deals", {
					memberId: "e001",
					merchantId: "20",
					dealAmount: 5000,
					type: "use",
					point: 300
				})
			).body.status
		).toBe("success");

		await restartAt("2026-04-12 09:00:00");
		await api("POST", "/deals", {
			memberId: "e001",
			merchantId: "20",
			dealAmount: 50000,
			type: "save"
		});
		await eventually(async () => expect(await balance("e001")).toBe(1200));
		expect((await api("GET", "/points/e001")).body.expiring).toEqual([
			{ month: "202604", expiresAt: "2026-05-01T00:00:00.000Z", points: 700 },
			{ month: "202605", expiresAt: "2026-06-01T00:00:00.000Z", points: 500 },
			{ month: "202606", expiresAt: "2026-07-01T00:00:00.000Z", points: 0 }
		]);
		await eventually(async () =>
			expect((await api("GET", "/dashboard/overview")).body.expiringSoon.months[0]).toEqual({
				month: "202604",
				expiresAt: "2026-05-01T00:00:00.000Z",
				points: 700
			})
		);
		expect(
			(await api("GET", "/dashboard/members/e001")).body.expiring.map(
				(e: { points: number }) => e.points
			)
		).toEqual([700, 500, 0]);

		// Down over April's end; back on May 3rd, it catches up at start.
		await restartAt("2026-05-03 08:00:00");
		await eventually(async () =>
			expect((await ledger("e001")).filter(e => e.kind === "expire")).toMatchObject([
				{ cause: "expire:e001:202603", amount: -700, lotMonth: "202603" }
			])
		);
		expect(await balance("e001")).toBe(500);
		await eventually(async () =>
			expect((await api("GET", "/dashboard/members/e001")).body.member).toMatchObject({
				balance: 500,
				expired: 700
			})
		);

		// Once more: a rerun finds nothing left.
		await restartAt("2026-05-03 09:00:00");
		expect(await system.type("expire", /Expiry through.*\n/)).toContain(
			"Expiry through 202603: 0 points of 0 member(s) expired"
		);
		expect(await system.type("expire 202604", /Error.*\n/)).toContain("Error [EXPIRY_NOT_DUE]");
		expect((await ledger("e001")).filter(e => e.kind === "expire")).toHaveLength(1);
		const audit = await system.type("audit", /Adjustments:.*\n/);
		expect(audit).toContain("Audit OK: 1 account(s), 4 ledger entries");
		expect(audit).toContain("Adjustments: 0 (+0 / -0 points); expired: 700 points.");
	});

	it("lets staff adjust a balance, recording the reason and who; merchants may not", async () => {
		expect((await api("GET", "/me", undefined, bearer(ALICE))).body).toEqual({
			role: "staff",
			name: "alice"
		});
		expect((await api("GET", "/me")).body).toEqual({ role: "staff" });

		const added = await api(
			"POST",
			"/points/e001/adjustments",
			{ amount: 250, reason: "Goodwill for a lost receipt" },
			bearer(ALICE)
		);
		expect(added.status).toBe(201);
		expect(added.body).toMatchObject({
			memberId: "e001",
			amount: 250,
			reason: "Goodwill for a lost receipt",
			by: "alice",
			balance: 750
		});
		const taken = await api("POST", "/points/e001/adjustments", {
			amount: -50,
			reason: "Double earning"
		});
		expect(taken.body).toMatchObject({ amount: -50, by: "staff", balance: 700 });

		const merchant = await api(
			"POST",
			"/points/e001/adjustments",
			{ amount: 1000, reason: "Self-service" },
			bearer(TOKENS.merchant20)
		);
		expect(merchant.status).toBe(403);
		expect(merchant.body).toMatchObject({ code: 403, type: "FORBIDDEN" });
		expect(
			(
				await api(
					"POST",
					"/points/e001/adjustments",
					{ amount: 1000, reason: "x" },
					{ authorization: null }
				)
			).status
		).toBe(401);

		await eventually(async () =>
			expect((await ledger("e001")).filter(e => e.kind === "adjust")).toHaveLength(2)
		);
		expect(
			(await ledger("e001"))
				.filter(e => e.kind === "adjust")
				.map(({ cause, amount, reason, by }) => ({ cause, amount, reason, by }))
		).toEqual([
			{
				cause: `adjustment:${taken.body.adjustmentId}`,
				amount: -50,
				reason: "Double earning",
				by: "staff"
			},
			{
				cause: `adjustment:${added.body.adjustmentId}`,
				amount: 250,
				reason: "Goodwill for a lost receipt",
				by: "alice"
			}
		]);
		await eventually(async () =>
			expect((await api("GET", "/dashboard/members/e001")).body.member).toMatchObject({
				balance: 700,
				adjusted: 200
			})
		);
		await eventually(async () =>
			expect((await api("GET", "/my-points/e001")).body).toMatchObject({ adjustedTotal: 200 })
		);
		expect(await system.type("audit", /Adjustments:.*\n/)).toContain(
			"Adjustments: 2 (+250 / -50 points); expired: 700 points."
		);
		// A positive adjustment is an earning of May: valid through June.
		expect((await api("GET", "/points/e001")).body.expiring).toEqual([
			{ month: "202605", expiresAt: "2026-06-01T00:00:00.000Z", points: 450 },
			{ month: "202606", expiresAt: "2026-07-01T00:00:00.000Z", points: 250 },
			{ month: "202607", expiresAt: "2026-08-01T00:00:00.000Z", points: 0 }
		]);
	});

	it("refuses bad adjustments with a clear 4xx and a code, changing nothing", async () => {
		await api("POST", "/members", { memberId: "e002", name: "Gone Soon" });
		await eventually(async () => expect((await api("GET", "/points/e002")).status).toBe(200));
		await api("DELETE", "/members/e002");
		const state = () => Promise.all([api("GET", "/points/e001").then(r => r.body), ledger("e001")]);
		const before = await state();

		const cases: [unknown, number, string, string?][] = [
			[{ amount: -701, reason: "More than there is" }, 409, "INSUFFICIENT_POINTS"],
			[{ amount: 0, reason: "Nothing" }, 422, "VALIDATION_ERROR"],
			[{ amount: 2.5, reason: "Half" }, 422, "VALIDATION_ERROR"],
			[{ amount: "ten", reason: "Text" }, 422, "VALIDATION_ERROR"],
			[{ amount: 9_007_199_254_740_992, reason: "Beyond safe" }, 422, "VALIDATION_ERROR"],
			[{ amount: 10 }, 422, "VALIDATION_ERROR"],
			[{ amount: 10, reason: "" }, 422, "VALIDATION_ERROR"],
			[{ amount: 10, reason: "x".repeat(501) }, 422, "VALIDATION_ERROR"],
			[{ amount: 10, reason: "ok", by: "mallory" }, 422, "VALIDATION_ERROR"],
			['{"amount":10,"reason":"ok","__proto__":{"amount":-5000}}', 422, "VALIDATION_ERROR"],
			["{not json", 400, "INVALID_JSON"],
			[{ amount: 10, reason: "Unknown" }, 404, "MEMBER_NOT_FOUND", "nobody"],
			[{ amount: 10, reason: "Withdrawn" }, 409, "MEMBER_WITHDRAWN", "e002"],
			[{ amount: 10, reason: "Bad id" }, 422, "VALIDATION_ERROR", "a$b"]
		];
		for (const [body, status, type, memberId = "e001"] of cases) {
			const reply = await api(
				"POST",
				`/points/${memberId}/adjustments`,
				typeof body === "string" ? body : JSON.stringify(body),
				{
					"content-type": "application/json"
				}
			);
			expect({ body, status: reply.status, type: reply.body.type }).toEqual({ body, status, type });
			expect(Object.keys(reply.body).sort()).toEqual(
				expect.arrayContaining(["code", "message", "name", "type"])
			);
		}
		expect(await state()).toEqual(before);
	});
});
