/**
 * The expiry job on two instances sharing MongoDB at once, while uses race with it: the in-process
 * lock serialises nothing between them; the account's versioned write must.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ServiceBroker, ServiceSchema } from "moleculer";
import PointsService, { type ExpiryRun, type PostResult } from "../../services/points.service";
import { createTestBroker, eventually } from "../helpers/broker";

type Send = (channel: string, payload: object) => Promise<void>;

interface Entry {
	cause: string;
	kind: string;
	amount: number;
}

describe("the expiry job on two instances sharing MongoDB", () => {
	let a: ServiceBroker;
	let b: ServiceBroker;
	let clock = new Date("2026-03-10T10:00:00.000Z");
	const MEMBERS = 25;
	const members = Array.from({ length: MEMBERS }, (_, i) => `c${String(i).padStart(3, "0")}`);
	const send = (broker: ServiceBroker, channel: string, payload: object) =>
		(broker as unknown as { sendToChannel: Send }).sendToChannel(channel, payload);
	const ledger = async (memberId: string) =>
		(await a.call<{ rows: Entry[] }, object>("points.history", { memberId, pageSize: 100 })).rows;

	// Valid one month; the daily check is far off, so the test runs the job itself.
	const instance = () =>
		createTestBroker(
			[
				{
					name: "points",
					mixins: [PointsService as unknown as Partial<ServiceSchema>],
					settings: { pointsValidMonths: 1, expiryCheckMs: 3_600_000 },
					methods: { now: () => clock }
				}
			],
			{ DATA_DIR: fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-instance-")) }
		);

	beforeAll(async () => {
		[a, b] = [instance(), instance()];
		await Promise.all([a.start(), b.start()]);
	});
	afterAll(() => Promise.all([a.stop(), b.stop()]));

	it("expires each member's month once, whichever instance gets there first, and uses racing with it never overdraw", async () => {
		// March: 100 each; April: 50 each.
		for (const memberId of members)
			await send(a, "deal.saved", {
				dealId: `mar-${memberId}`,
				memberId,
				merchantId: "20",
				point: 100
			});
		await eventually(async () =>
			expect((await Promise.all(members.map(ledger))).every(rows => rows.length === 1)).toBe(true)
		);
		clock = new Date("2026-04-10T10:00:00.000Z");
		for (const memberId of members)
			await send(b, "deal.saved", {
				dealId: `apr-${memberId}`,
				memberId,
				merchantId: "20",
				point: 50
			});
		await eventually(async () =>
			expect((await Promise.all(members.map(ledger))).every(rows => rows.length === 2)).toBe(true)
		);

		// May: March's points are due. The job runs twice on each instance while each member, from the
		// last, tries to use 120 on either: the jobs (in id order) and the uses meet somewhere between.
		clock = new Date("2026-05-01T00:00:01.000Z");
		const uses: PostResult[] = [];
		const useAll = async () => {
			for (let i = MEMBERS - 1; i >= 0; i--)
				uses[i] = await (i % 2 ? a : b).call<PostResult, object>("points.debit", {
					memberId: members[i],
					sourceType: "deal",
					sourceId: `use-${members[i]}`,
					merchantId: "20",
					amount: 120
				});
		};
		const [runs] = await Promise.all([
			Promise.all([a, b, a, b].map(broker => broker.call<ExpiryRun, object>("points.expire", {}))),
			useAll()
		]);

		let expired = 0;
		for (const [i, memberId] of members.entries()) {
			const rows = await ledger(memberId);
			const expiries = rows.filter(e => e.kind === "expire");
			const balance = (await a.call<{ balance: number }, object>("points.get", { memberId }))
				.balance;
			expect(balance).toBeGreaterThanOrEqual(0);
			if (uses[i].applied) {
				// The use came first and took March's 100 and 20 of April's: nothing of March was left to expire.
				expect(expiries).toEqual([]);
				expect(balance).toBe(30);
			} else {
				// The expiry came first: 50 left, not enough for the use.
				expect(uses[i].reason).toBe("INSUFFICIENT_POINTS");
				expect(expiries).toMatchObject([{ cause: `expire:${memberId}:202603`, amount: -100 }]);
				expect(balance).toBe(50);
				expired += 100;
			}
		}
		// Every point expired was counted by exactly one run.
		expect(runs.reduce((sum, run) => sum + run.points, 0)).toBe(expired);
		await eventually(async () =>
			expect((await b.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([])
		);
		expect(await a.call<ExpiryRun, object>("points.expire", {})).toEqual({
			through: "202603",
			members: 0,
			points: 0
		});
	});
});
