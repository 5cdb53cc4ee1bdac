import type { ServiceBroker, ServiceSchema } from "moleculer";
import { applyToLots, expiredThrough, expiringSoon } from "../../lib/expiry";
import { addMonths } from "../../lib/months";
import PointsService, { type AccountView, type ExpiryRun } from "../../services/points.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";

type Send = (channel: string, payload: object) => Promise<void>;
interface Entry {
	cause: string;
	kind: string;
	amount: number;
	lotMonth?: string;
}

/** The points service on a clock the test moves, its expiry job checking for a new day every 20 ms and reading 7 accounts at a time. */
const pointsOnClock = (
	clock: () => Date,
	pointsValidMonths: number,
	methods: Record<string, unknown> = {}
) => ({
	name: "points",
	// Moleculer types a mixin as the plain schema; this one is typed with its own settings.
	mixins: [PointsService as unknown as Partial<ServiceSchema>],
	settings: { pointsValidMonths, expiryCheckMs: 20, expiryBatch: 7 },
	methods: { now: clock, ...methods }
});

function client(broker: ServiceBroker) {
	const send: Send = (channel, payload) =>
		(broker as unknown as { sendToChannel: Send }).sendToChannel(channel, payload);
	const account = (memberId: string) =>
		broker.call<AccountView, object>("points.get", { memberId });
	const ledger = async (memberId: string) =>
		(await broker.call<{ rows: Entry[] }, object>("points.history", { memberId, pageSize: 100 }))
			.rows;
	return {
		send,
		account,
		ledger,
		balance: async (memberId: string) => (await account(memberId)).balance,
		expiries: async (memberId: string) =>
			(await ledger(memberId)).filter(e => e.cause.startsWith("expire:")),
		/** An earning, applied before it returns. */
		earn: async (memberId: string, dealId: string, point: number) => {
			await send("deal.saved", { dealId, memberId, merchantId: "20", point });
			await eventually(async () =>
				expect((await ledger(memberId)).some(e => e.cause === `deal:${dealId}`)).toBe(true)
			);
		},
		use: (memberId: string, dealId: string, amount: number) =>
			broker.call("points.debit", {
				memberId,
				sourceType: "deal",
				sourceId: dealId,
				merchantId: "20",
				amount
			}),
		audit: () => broker.call<{ mismatches: unknown[]; expired: number }>("points.audit")
	};
}

describe("earning lots and what expires when (lib/expiry)", () => {
	it("expires a month's earnings at the end of the month that many months later", () => {
		expect(addMonths("202611", 3)).toBe("202702");
		expect(addMonths("202601", -1)).toBe("202512");
		// Valid 12 months: January 2026's earnings last through January 2027 and are gone in February.
		expect(expiredThrough(new Date("2027-01-31T23:59:59.999Z"), 12)).toBe("202512");
		expect(expiredThrough(new Date("2027-02-01T00:00:00.000Z"), 12)).toBe("202601");
	});

	it("takes points from the oldest lots first, or from the lot an expiry names", () => {
		const lots = { "202601": 100, "202602": 200 };
		expect(applyToLots(lots, -150, "202603")).toEqual({ "202602": 150 });
		expect(applyToLots(lots, 50, "202603")).toEqual({ "202601": 100, "202602": 200, "202603": 50 });
		expect(applyToLots(lots, -200, "202603", "202602")).toEqual({ "202601": 100 });
		expect(applyToLots(lots, -300, "202603")).toEqual({});
	});

	it("shows what expires at the end of this month (with anything overdue) and of the next two; nothing when points never expire", () => {
		const lots = { "202512": 5, "202601": 10, "202602": 20, "202603": 30 };
		expect(expiringSoon(lots, 2, new Date("2026-03-15T00:00:00.000Z"))).toEqual([
			{ month: "202603", expiresAt: "2026-04-01T00:00:00.000Z", points: 15 },
			{ month: "202604", expiresAt: "2026-05-01T00:00:00.000Z", points: 20 },
			{ month: "202605", expiresAt: "2026-06-01T00:00:00.000Z", points: 30 }
		]);
		expect(expiringSoon(lots, 0, new Date("2030-01-01T00:00:00.000Z"))).toEqual([]);
	});
});

describe("points that expire, on a controlled clock", () => {
	describe("with POINTS_VALID_MONTHS=2", () => {
		let broker: ServiceBroker;
		let c: ReturnType<typeof client>;
		let clock = new Date("2026-01-15T10:00:00.000Z");

		beforeAll(async () => {
			broker = createTestBroker([pointsOnClock(() => clock, 2)]);
			await broker.start();
			c = client(broker);
		});
		afterAll(() => broker.stop());
		// Eventually: a posting's last step (clearing it from the account) may still be under way.
		afterEach(() => eventually(async () => expect((await c.audit()).mismatches).toEqual([])));

		it("expires earnings of several months at each month's end, oldest first, after the uses in between took the oldest", async () => {
			await c.earn("x001", "x-d1", 100);
			clock = new Date("2026-02-10T10:00:00.000Z");
			await c.earn("x001", "x-d2", 200);
			// Takes January's 100 and 50 of February's.
			await c.use("x001", "x-u1", 150);
			clock = new Date("2026-03-05T10:00:00.000Z");
			await c.earn("x001", "x-d3", 300);
			await c.use("x001", "x-u2", 100);
			expect(await c.account("x001")).toMatchObject({
				balance: 350,
				expiring: [
					{ month: "202603", points: 0 },
					{ month: "202604", expiresAt: "2026-05-01T00:00:00.000Z", points: 50 },
					{ month: "202605", points: 300 }
				]
			});
			clock = new Date("2026-04-20T10:00:00.000Z");
			await c.earn("x001", "x-d4", 400);

			// April ends: February's 50 left expire; January's were all used, so nothing of theirs does.
			clock = new Date("2026-05-01T00:00:05.000Z");
			await eventually(async () =>
				expect(await c.expiries("x001")).toMatchObject([
					{ cause: "expire:x001:202602", kind: "expire", amount: -50, lotMonth: "202602" }
				])
			);
			expect(await c.balance("x001")).toBe(700);

			// May ends: March's 300.
			clock = new Date("2026-06-01T03:00:00.000Z");
			await eventually(async () =>
				expect((await c.expiries("x001")).map(e => [e.cause, e.amount])).toEqual([
					["expire:x001:202603", -300],
					["expire:x001:202602", -50]
				])
			);
			expect(await c.account("x001")).toMatchObject({
				balance: 400,
				expiring: [
					{ month: "202606", points: 400 },
					{ month: "202607", points: 0 },
					{ month: "202608", points: 0 }
				]
			});
		});

		it("is safe to rerun, refuses a month still valid, and counts every expiry in the audit", async () => {
			expect(await broker.call<ExpiryRun, object>("points.expire", {})).toEqual({
				through: "202603",
				members: 0,
				points: 0
			});
			expect(await broker.call<ExpiryRun, object>("points.expire", { through: "202602" })).toEqual({
				through: "202602",
				members: 0,
				points: 0
			});
			await expect(broker.call("points.expire", { through: "202604" })).rejects.toMatchObject({
				code: 409,
				type: "EXPIRY_NOT_DUE",
				data: { through: "202604", due: "202603" }
			});
			await expect(broker.call("points.expire", { through: "2026-04" })).rejects.toMatchObject({
				code: 422,
				type: "VALIDATION_ERROR"
			});
			expect(await c.expiries("x001")).toHaveLength(2);
			expect((await c.audit()).expired).toBe(350);
		});

		it("lets a revocation take the oldest earnings first, and never takes the balance below 0", async () => {
			clock = new Date("2026-06-10T10:00:00.000Z");
			await c.earn("x002", "y-d1", 100);
			clock = new Date("2026-07-10T10:00:00.000Z");
			await c.earn("x002", "y-d2", 100);
			// July's earning revoked: June's points go first, July's are left.
			await c.send("deal.cancelled", { dealId: "y-d2", memberId: "x002", merchantId: "20" });
			await eventually(async () => expect(await c.balance("x002")).toBe(100));
			expect((await c.account("x002")).expiring).toEqual([
				{ month: "202607", expiresAt: "2026-08-01T00:00:00.000Z", points: 0 },
				{ month: "202608", expiresAt: "2026-09-01T00:00:00.000Z", points: 0 },
				{ month: "202609", expiresAt: "2026-10-01T00:00:00.000Z", points: 100 }
			]);
			// A cancelled use gives its points back as an earning of the month it is cancelled in.
			await c.use("x002", "y-u1", 60);
			clock = new Date("2026-08-20T10:00:00.000Z");
			await c.send("deal.cancelled", { dealId: "y-u1", memberId: "x002", merchantId: "20" });
			await eventually(async () => expect(await c.balance("x002")).toBe(100));
			clock = new Date("2026-10-01T00:00:01.000Z");
			await eventually(async () =>
				expect(await c.expiries("x002")).toMatchObject([
					{ cause: "expire:x002:202607", amount: -40 }
				])
			);
			expect(await c.balance("x002")).toBe(60);
			clock = new Date("2026-11-01T00:00:01.000Z");
			// The balance changes before the posting's ledger entry is written (both stores): wait for both.
			await eventually(async () => {
				expect(await c.balance("x002")).toBe(0);
				expect((await c.expiries("x002")).map(e => e.cause)).toEqual([
					"expire:x002:202608",
					"expire:x002:202607"
				]);
			});
		});

		it("still expires everything at once on withdrawal, and the job leaves a closed account alone", async () => {
			await c.earn("x003", "w-d1", 70);
			clock = new Date("2026-12-02T10:00:00.000Z");
			await c.earn("x003", "w-d2", 30);
			await c.send("member.withdrawn", { memberId: "x003", withdrawnAt: clock.toISOString() });
			await eventually(async () =>
				expect(
					(await c.ledger("x003")).filter(e => e.kind === "expire").map(e => [e.cause, e.amount])
				).toEqual([["expiry:x003", -100]])
			);
			expect(await c.account("x003")).toMatchObject({ balance: 0, status: "closed" });
			clock = new Date("2027-03-01T00:00:01.000Z");
			expect(await broker.call<ExpiryRun, object>("points.expire", {})).toMatchObject({
				members: 0
			});
			await drained(broker);
			expect(await c.expiries("x003")).toEqual([]);
		});

		it("counts the balance of an account from before the lots as earned in the month of its last change", async () => {
			await c.earn("x004", "l-d1", 100);
			// As such an account is stored: no lots, last changed in January.
			const points = broker.getLocalService("points") as unknown as {
				store: { update(query: object, update: object): Promise<number> };
			};
			await points.store.update(
				{ _id: "x004" },
				{ $unset: { lots: true, oldestLot: true }, $set: { updatedAt: "2027-01-15T10:00:00.000Z" } }
			);
			expect((await c.account("x004")).expiring).toMatchObject([
				{ month: "202703", points: 100 },
				{ points: 0 },
				{ points: 0 }
			]);
			clock = new Date("2027-04-01T00:00:01.000Z");
			await eventually(async () =>
				expect(await c.expiries("x004")).toMatchObject([
					{ cause: "expire:x004:202701", amount: -100 }
				])
			);
			expect(await c.balance("x004")).toBe(0);
		});
	});

	describe("a node that stops in the middle of the job", () => {
		const MEMBERS = 30;
		const members = Array.from({ length: MEMBERS }, (_, i) => `r${String(i).padStart(3, "0")}`);
		let clock = new Date("2027-05-10T10:00:00.000Z");

		it("finishes the run when it is back, expiring each member's month once", async () => {
			const before = createTestBroker([pointsOnClock(() => clock, 1)]);
			await before.start();
			const b = client(before);
			for (const memberId of members) await b.earn(memberId, `r-${memberId}`, 10);
			await before.stop();

			// June ends while the node is down; it starts on July 1st, and dies after a third of the run.
			clock = new Date("2027-07-01T06:00:00.000Z");
			let expired = 0;
			const original = (
				PointsService.methods as {
					expireLots: (this: unknown, memberId: string, through: string) => Promise<number>;
				}
			).expireLots;
			const dying = createTestBroker(
				[
					pointsOnClock(() => clock, 1, {
						expireLots(this: unknown, memberId: string, through: string) {
							// Counts this test's members only: the store also holds the tests' above.
							if (memberId.startsWith("r") && ++expired > MEMBERS / 3)
								throw new Error("The node died");
							return original.call(this, memberId, through);
						}
					})
				],
				{ LOG_LEVEL: "fatal" }
			);
			await dying.start();
			const d = client(dying);
			await eventually(() => expect(expired).toBeGreaterThan(MEMBERS / 3));
			expect(
				(await Promise.all(members.map(m => d.balance(m)))).filter(balance => balance === 0)
			).toHaveLength(MEMBERS / 3);
			await dying.stop();

			// Back, it catches up at start: the rest expire, the first third are not expired again.
			const after = createTestBroker([pointsOnClock(() => clock, 1)]);
			await after.start();
			const a = client(after);
			try {
				await eventually(async () =>
					expect(
						(await Promise.all(members.map(m => a.balance(m)))).every(balance => balance === 0)
					).toBe(true)
				);
				for (const memberId of members)
					expect((await a.expiries(memberId)).map(e => [e.cause, e.amount])).toEqual([
						[`expire:${memberId}:202705`, -10]
					]);
				expect(await after.call<ExpiryRun, object>("points.expire", {})).toMatchObject({
					members: 0,
					points: 0
				});
				await eventually(async () => expect((await a.audit()).mismatches).toEqual([]));
			} finally {
				await after.stop();
			}
		});
	});

	describe("a use in the minute after a month's end, before the expiry job has run", () => {
		let clock = new Date("2027-08-10T10:00:00.000Z");

		it("expires the lots past their validity first, with the job's own entries, so expired points are never spent", async () => {
			// The job never runs on this node: only the use can expire anything.
			const broker = createTestBroker([pointsOnClock(() => clock, 2, { scheduleExpiry() {} })]);
			await broker.start();
			const c = client(broker);
			try {
				await c.earn("u001", "u-d1", 100);
				clock = new Date("2027-09-05T10:00:00.000Z");
				await c.earn("u001", "u-d2", 50);
				// October has ended: August's 100 are gone, September's 50 are left to spend.
				clock = new Date("2027-11-01T00:00:30.000Z");
				expect(await c.use("u001", "u-u1", 51)).toMatchObject({
					applied: false,
					reason: "INSUFFICIENT_POINTS"
				});
				expect(await c.use("u001", "u-u2", 30)).toMatchObject({ applied: true, balance: 20 });
				await eventually(async () =>
					expect((await c.ledger("u001")).map(e => [e.cause, e.amount])).toEqual([
						["deal:u-u2", -30],
						["expire:u001:202708", -100],
						["deal:u-d2", 50],
						["deal:u-d1", 100]
					])
				);
				// The job, run afterwards, finds nothing left to expire.
				expect(await broker.call<ExpiryRun, object>("points.expire", {})).toEqual({
					through: "202708",
					members: 0,
					points: 0
				});
				expect((await c.account("u001")).expiring[0]).toEqual({
					month: "202711",
					expiresAt: "2027-12-01T00:00:00.000Z",
					points: 20
				});
				await eventually(async () => expect((await c.audit()).mismatches).toEqual([]));
			} finally {
				await broker.stop();
			}
		});
	});

	// Last: the brokers above would expire this member's points.
	describe("with POINTS_VALID_MONTHS=0", () => {
		let broker: ServiceBroker;
		let c: ReturnType<typeof client>;
		let clock = new Date("2026-01-10T12:00:00.000Z");

		beforeAll(async () => {
			broker = createTestBroker([pointsOnClock(() => clock, 0)]);
			await broker.start();
			c = client(broker);
		});
		afterAll(() => broker.stop());

		it("never expires anything", async () => {
			await c.earn("z001", "z-d1", 500);
			clock = new Date("2031-06-01T00:00:00.000Z");
			await expect(broker.call("points.expire", {})).rejects.toMatchObject({
				code: 409,
				type: "EXPIRY_OFF"
			});
			expect(await c.account("z001")).toMatchObject({ balance: 500, expiring: [] });
			expect(await c.expiries("z001")).toEqual([]);
		});
	});
});
