/**
 * The calendar's hard moments, on the system as `npm start` runs it, over HTTP and its REPL, with
 * its clock set by the test and moving (libfaketime; `x20`: a minute every three seconds): a year's
 * last minutes into the next, the ends of February in a leap year and a common one, and a node that
 * was down over month ends. Timers keep real time, so a job's next check is a real minute away.
 */
import { eventually } from "../helpers/broker";
import { faketime } from "../helpers/clock";
import { System } from "../helpers/system";

jest.setTimeout(180_000);

/** The node's own clock, from the `Date` header of its answer (to the second). */
async function nodeTime(system: System): Promise<string> {
	const date = (await system.call("GET", "/api/me")).headers.get("date");
	return new Date(date as string).toISOString();
}

/** Waits until the node's clock has passed `at` (an ISO instant). */
async function until(system: System, at: string): Promise<void> {
	await eventually(
		async () => {
			const now = await nodeTime(system);
			if (now <= at) throw new Error(`The node's clock is at ${now}, not yet past ${at}`);
		},
		60_000,
		200
	);
}

interface Line {
	kind: string;
	dealId: string;
	points: number;
	month?: string;
	reason?: string;
}
const lines = (settlement: { lines: Line[] }) =>
	settlement.lines.map(
		l => `${l.kind} ${l.dealId} ${l.points}${l.month ? ` ${l.month} ${l.reason}` : ""}`
	);

/** A member holding `points` (earned at 1 % at merchant 21, so merchant 20's settlements hold only its uses). */
async function memberWith(system: System, memberId: string, points: number): Promise<void> {
	expect(
		(await system.call("POST", "/api/members", { memberId, name: `Member ${memberId}` })).status
	).toBe(201);
	const saved = await system.call("POST", "/api/deals", {
		memberId,
		merchantId: "21",
		dealAmount: points * 100,
		type: "save"
	});
	expect(saved.status).toBe(201);
	await eventually(async () =>
		expect((await system.call("GET", `/api/points/${memberId}`)).body.balance).toBe(points)
	);
}

async function use(
	system: System,
	memberId: string,
	point: number
): Promise<{ id: string; dealDate: string }> {
	const used = await system.call("POST", "/api/deals", {
		memberId,
		merchantId: "20",
		dealAmount: point * 10,
		type: "use",
		point
	});
	expect(used.body).toMatchObject({ status: "success", point });
	return used.body;
}

describe("31 December 23:56 into 1 January, at twenty times real speed", () => {
	let system: System;
	const december: { id: string; dealDate: string }[] = [];
	let january: { id: string; dealDate: string };
	const overview = async () => (await system.call("GET", "/api/dashboard/overview")).body;

	beforeAll(async () => {
		system = await System.start({
			MONTH_END_GRACE_MINUTES: "3",
			...faketime("2027-12-31 23:56:00", 20)
		});
	});
	afterAll(() => system.stop());

	it("puts uses before midnight in December, in the settlement and the dashboard's month", async () => {
		await memberWith(system, "y001", 10_000);
		december.push(await use(system, "y001", 100), await use(system, "y001", 200));
		for (const deal of december) expect(deal.dealDate < "2028-01-01T00:00:00.000Z").toBe(true);
		// Merchant 21 issued the member's points in December: the other side of the month.
		await eventually(async () =>
			expect((await overview()).settlementPreview).toEqual([
				expect.objectContaining({
					merchantId: "20",
					billingMonth: "202712",
					usedPoints: 300,
					adjustmentPoints: 0,
					billingAmount: 294,
					issued: { points: 0, amount: 0 },
					net: 294
				}),
				expect.objectContaining({
					merchantId: "21",
					billingMonth: "202712",
					billingAmount: 0,
					issued: { points: 10_000, amount: 10_000 },
					net: -10_000
				})
			])
		);
		expect((await overview()).topMerchants).toContainEqual({
			merchantId: "20",
			deals: 2,
			earnedPoints: 0,
			usedPoints: 300
		});
		// Still December by the node's clock when the overview was read.
		expect(await nodeTime(system)).toMatch(/^2027-12-31T23:5/);
	});

	it("puts a use after midnight in January; December stays provisional until its grace has passed", async () => {
		await until(system, "2028-01-01T00:00:00.000Z");
		january = await use(system, "y001", 400);
		expect(january.dealDate >= "2028-01-01T00:00:00.000Z").toBe(true);
		const asked = await system.call("POST", "/api/billings", {
			merchantId: "20",
			billingMonth: "202712"
		});
		expect(asked.status).toBe(200);
		expect(asked.body).toMatchObject({ status: "provisional", usedPoints: 300, dealCount: 2 });
		expect((await system.call("GET", "/api/billings/20/202801")).body).toMatchObject({
			status: "provisional",
			usedPoints: 400
		});
		// The dashboard's month is January now: its uses only.
		await eventually(async () =>
			expect((await overview()).settlementPreview).toEqual([
				expect.objectContaining({
					merchantId: "20",
					billingMonth: "202801",
					usedPoints: 400,
					adjustmentPoints: 0,
					billingAmount: 392,
					net: 392
				})
			])
		);
		expect((await overview()).topMerchants).toEqual([
			{ merchantId: "20", deals: 1, earnedPoints: 0, usedPoints: 400 }
		]);
		expect((await nodeTime(system)) < "2028-01-01T00:03:00.000Z").toBe(true);
	});

	it("makes December final after the grace with exactly its uses; a return on 1 January of a December use is January's adjustment", async () => {
		await until(system, "2028-01-01T00:03:00.000Z");
		const final = await system.call("POST", "/api/billings", {
			merchantId: "20",
			billingMonth: "202712"
		});
		expect(final.status).toBe(201);
		expect(final.body).toMatchObject({
			status: "final",
			usedPoints: 300,
			dealCount: 2,
			adjustmentPoints: 0,
			billingAmount: 294
		});
		expect(lines(final.body)).toEqual([`use ${december[0].id} 100`, `use ${december[1].id} 200`]);

		expect((await system.call("POST", `/api/deals/${december[0].id}/cancel`)).status).toBe(200);
		await eventually(async () =>
			expect(lines((await system.call("GET", "/api/billings/20/202801")).body)).toEqual([
				`adjustment ${december[0].id} -100 202712 CANCELLED_AFTER_SETTLEMENT`,
				`use ${january.id} 400`
			])
		);
		expect((await system.call("GET", "/api/billings/20/202801")).body).toMatchObject({
			status: "provisional",
			usedPoints: 400,
			adjustmentPoints: -100,
			billingAmount: 294
		});
		expect((await system.call("GET", "/api/billings/20/202712")).body).toEqual(final.body);
		await eventually(async () =>
			expect((await overview()).settlementPreview).toEqual([
				expect.objectContaining({
					merchantId: "20",
					billingMonth: "202801",
					usedPoints: 400,
					adjustmentPoints: -100,
					billingAmount: 294,
					net: 294
				})
			])
		);
		expect((await system.call("GET", "/api/points/y001")).body.balance).toBe(
			10_000 - 300 - 400 + 100
		);
	});
});

describe("the end of February, with points valid one month after the month earned", () => {
	/** Earns 1,000 points in January, then runs on from the last minutes of 28 February at twenty times real speed. */
	async function januaryThenFebruary(year: number): Promise<System> {
		const system = await System.start(
			{ POINTS_VALID_MONTHS: "1", ...faketime(`${year}-01-20 10:00:00`) },
			true
		);
		await memberWith(system, "f001", 1000);
		await restartAt(system, `${year}-02-28 23:58:00`);
		return system;
	}
	/** Restarts the node on the same data, its clock running on from `at` at twenty times real speed. */
	async function restartAt(system: System, at: string): Promise<void> {
		await system.stop();
		Object.assign(system.env, faketime(at, 20));
		await system.start();
	}
	const expiring = async (system: System) =>
		(await system.call("GET", "/api/points/f001")).body.expiring;
	const expiries = async (system: System) =>
		(await system.call("GET", "/api/points/f001/history?pageSize=100")).body.rows
			.filter((e: { kind: string }) => e.kind === "expire")
			.map((e: { cause: string; amount: number }) => `${e.cause} ${e.amount}`);

	it("in a leap year: January's points last through 29 February, and expire once on 1 March; the 29th's earnings last through March", async () => {
		const system = await januaryThenFebruary(2028);
		try {
			expect(await expiring(system)).toEqual([
				{ month: "202802", expiresAt: "2028-03-01T00:00:00.000Z", points: 1000 },
				{ month: "202803", expiresAt: "2028-04-01T00:00:00.000Z", points: 0 },
				{ month: "202804", expiresAt: "2028-05-01T00:00:00.000Z", points: 0 }
			]);
			await until(system, "2028-02-29T00:00:00.000Z");
			const saved = await system.call("POST", "/api/deals", {
				memberId: "f001",
				merchantId: "21",
				dealAmount: 50_000,
				type: "save"
			});
			expect(saved.body.dealDate).toMatch(/^2028-02-29T/);
			await eventually(async () =>
				expect((await system.call("GET", "/api/points/f001")).body.balance).toBe(1500)
			);
			// The leap day is still February: nothing is due.
			expect(await system.type("expire", /Expiry through.*\n/)).toMatch(
				/Expiry through 202712: 0 points of 0 member\(s\) expired/
			);
			expect(await expiring(system)).toEqual([
				{ month: "202802", expiresAt: "2028-03-01T00:00:00.000Z", points: 1000 },
				{ month: "202803", expiresAt: "2028-04-01T00:00:00.000Z", points: 500 },
				{ month: "202804", expiresAt: "2028-05-01T00:00:00.000Z", points: 0 }
			]);

			// The last minutes of the leap day, into March.
			await restartAt(system, "2028-02-29 23:58:00");
			expect(await system.type("expire", /Expiry through.*\n/)).toMatch(
				/Expiry through 202712: 0 points/
			);
			await until(system, "2028-03-01T00:00:00.000Z");
			expect(await system.type("expire", /Expiry through.*\n/)).toMatch(
				/Expiry through 202801: 1000 points of 1 member\(s\) expired/
			);
			expect(await system.type("expire", /Expiry through.*\n/)).toMatch(
				/Expiry through 202801: 0 points of 0 member\(s\) expired/
			);
			await eventually(async () =>
				expect(await expiries(system)).toEqual(["expire:f001:202801 -1000"])
			);
			expect((await system.call("GET", "/api/points/f001")).body).toMatchObject({
				balance: 500,
				expiring: [
					{ month: "202803", expiresAt: "2028-04-01T00:00:00.000Z", points: 500 },
					{ month: "202804", expiresAt: "2028-05-01T00:00:00.000Z", points: 0 },
					{ month: "202805", expiresAt: "2028-06-01T00:00:00.000Z", points: 0 }
				]
			});
		} finally {
			await system.stop();
		}
	});

	it("in a common year: January's points expire on 1 March, right after the 28th, by the job itself, once", async () => {
		const system = await januaryThenFebruary(2027);
		try {
			expect((await expiring(system))[0]).toEqual({
				month: "202702",
				expiresAt: "2027-03-01T00:00:00.000Z",
				points: 1000
			});
			await until(system, "2027-03-01T00:00:00.000Z");
			// The job looks for a new day once a (real) minute.
			await eventually(
				async () => expect(await expiries(system)).toEqual(["expire:f001:202701 -1000"]),
				90_000,
				500
			);
			expect((await system.call("GET", "/api/points/f001")).body).toMatchObject({
				balance: 0,
				expiring: [{ month: "202703", points: 0 }, {}, {}]
			});
			// Restarted later that day, it runs again at start and finds nothing more.
			await restartAt(system, "2027-03-01 09:00:00");
			expect(await system.type("expire", /Expiry through.*\n/)).toMatch(
				/Expiry through 202701: 0 points/
			);
			expect(await expiries(system)).toEqual(["expire:f001:202701 -1000"]);
		} finally {
			await system.stop();
		}
	});
});

describe("a node that was down over month ends", () => {
	it("closes each missed month once, in order, soon after it is back", async () => {
		const system = await System.start(faketime("2028-03-15 10:00:00"));
		try {
			await memberWith(system, "d001", 5000);
			const march = await use(system, "d001", 100);
			await system.stop();

			// Back briefly in April: March closes at the first check after start.
			Object.assign(system.env, faketime("2028-04-20 10:00:00"));
			await system.start();
			await eventually(
				async () =>
					expect((await system.call("GET", "/api/billings/20/202803")).body).toMatchObject({
						status: "final"
					}),
				30_000,
				250
			);
			const april = await use(system, "d001", 200);
			await system.stop();

			// Down over the ends of April and May.
			Object.assign(system.env, faketime("2028-06-02 08:00:00"));
			await system.start();
			await eventually(
				async () =>
					expect((await system.call("GET", "/api/billings/20/202804")).body).toMatchObject({
						status: "final"
					}),
				30_000,
				250
			);
			const final = (await system.call("GET", "/api/billings/20/202804")).body;
			expect(lines(final)).toEqual([`use ${april.id} 200`]);
			expect(final).toMatchObject({ usedPoints: 200, dealCount: 1, billingAmount: 196 });
			// May closed too (merchant 20 had nothing in it); June is open.
			expect((await system.call("GET", "/api/billings/20/202805")).body).toMatchObject({
				code: 404,
				type: "SETTLEMENT_NOT_FOUND"
			});
			expect((await system.call("GET", "/api/billings/20/202806")).body).toMatchObject({
				status: "provisional",
				usedPoints: 0
			});
			expect(lines((await system.call("GET", "/api/billings/20/202803")).body)).toEqual([
				`use ${march.id} 100`
			]);

			// Once: asked again, and after another restart, April's final settlement is the one made.
			expect(
				(await system.call("POST", "/api/billings", { merchantId: "20", billingMonth: "202804" }))
					.status
			).toBe(200);
			await system.stop();
			await system.start();
			expect((await system.call("GET", "/api/billings/20/202804")).body).toEqual(final);
		} finally {
			await system.stop();
		}
	});
});
