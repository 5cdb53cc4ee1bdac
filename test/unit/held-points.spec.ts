/**
 * Held points, on each store: a save at a merchant with `holdDays` is held until its return window
 * ends, then released once (by the job, or by a use that comes first); a return inside the window
 * takes back held points without a shortfall; a withdrawal forfeits them; their validity runs from
 * the release. The ledger sums to balance + held throughout (the audit, after every test).
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ServiceBroker } from "moleculer";
import DealsService, { type DealView } from "../../services/deals.service";
import MembersService from "../../services/members.service";
import MerchantsService from "../../services/merchants.service";
import PointsService, { type AccountView, type ReleaseRun } from "../../services/points.service";
import { createTestBroker, drained, eventually, withSettings } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freshDatabaseUri, onMongo } from "../helpers/store";

interface Entry {
	cause: string;
	kind: string;
	amount: number;
	held?: number;
	releaseAt?: string;
	shortfall?: number;
	balanceAfter: number;
}

describe("held points", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	// One store for the suite, kept across the restart below.
	const store = onMongo()
		? { MONGO_URI: freshDatabaseUri() }
		: { DATA_DIR: fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-held-")) };
	let broker: ServiceBroker;
	const start = async (releaseCheckMs: number) => {
		broker = createTestBroker(
			[
				MembersService,
				MerchantsService,
				withSettings(PointsService, { releaseCheckMs, pointsValidMonths: 1 }),
				DealsService
			],
			store
		);
		await broker.start();
	};
	const points = (memberId: string) => broker.call<AccountView, object>("points.get", { memberId });
	const history = async (memberId: string) =>
		(await broker.call<{ rows: Entry[] }, object>("points.history", { memberId, pageSize: 100 }))
			.rows;
	const deal = (params: object) => broker.call<DealView, object>("deals.create", params);
	const join = (memberId: string) => broker.call("members.join", { memberId, name: memberId });
	const at = (iso: string) => jest.setSystemTime(new Date(iso));

	beforeAll(async () => {
		await start(60_000);
		await broker.call("merchants.register", { merchantId: "shop", name: "Shop", holdDays: 14 });
	});
	afterAll(() => broker.stop());
	afterEach(async () => {
		await drained(broker);
		// A job's posting may still be copying its entries into the ledger.
		await eventually(async () =>
			expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([])
		);
	});

	it("holds a save's points for the merchant's holdDays: not spendable, shown with when they are released", async () => {
		await join("h001");
		const saved = await deal({
			memberId: "h001",
			merchantId: "shop",
			dealAmount: 10_000,
			type: "save"
		});
		expect(saved.terms).toMatchObject({ holdDays: 14 });
		await drained(broker);
		expect(await points("h001")).toMatchObject({
			balance: 0,
			held: 100,
			releasing: [
				{ dealId: saved.id, points: 100, releaseAt: expect.stringMatching(/^2026-05-28T10:00/) }
			]
		});
		expect((await history("h001"))[0]).toMatchObject({
			cause: `deal:${saved.id}`,
			kind: "earn",
			amount: 100,
			held: 100,
			balanceAfter: 0
		});

		// 30 spendable from a merchant without a hold (the seed's, on the defaults): 50 is too much.
		await deal({ memberId: "h001", merchantId: "20", dealAmount: 3_000, type: "save" });
		await drained(broker);
		const refused = await deal({
			memberId: "h001",
			merchantId: "20",
			dealAmount: 5_000,
			type: "use",
			point: 50
		});
		expect(refused).toMatchObject({ status: "fail", reason: "INSUFFICIENT_POINTS" });
		expect(
			(
				await deal({
					memberId: "h001",
					merchantId: "20",
					dealAmount: 3_000,
					type: "use",
					point: 30
				})
			).status
		).toBe("success");
		expect(await points("h001")).toMatchObject({ balance: 0, held: 100 });
	});

	it("takes a return inside the window from the hold, never leaving a shortfall", async () => {
		const [saved] = (
			await broker.call<{ rows: DealView[] }, object>("deals.list", {
				memberId: "h001",
				merchantId: "shop"
			})
		).rows;
		await broker.call("deals.cancel", { id: saved.id, amount: 5_000 });
		await drained(broker);
		const [entry] = await history("h001");
		expect(entry).toMatchObject({
			cause: `deal-return:${saved.id}:1`,
			kind: "revoke",
			amount: -50,
			held: -50
		});
		expect(entry.shortfall).toBeUndefined();
		expect(await points("h001")).toMatchObject({ balance: 0, held: 50 });
	});

	it("releases held points once their window ends, once, whatever restarts", async () => {
		await broker.stop();
		await start(100);
		at("2026-05-28T11:00:00.000Z");
		await eventually(async () =>
			expect(await points("h001")).toMatchObject({ balance: 50, held: 0, releasing: [] })
		);
		const releases = (await history("h001")).filter(e => e.kind === "release");
		expect(releases).toEqual([expect.objectContaining({ amount: 0, held: -50, balanceAfter: 50 })]);

		await broker.stop();
		await start(100);
		expect(await broker.call<ReleaseRun>("points.release")).toEqual({ members: 0, points: 0 });
		expect((await history("h001")).filter(e => e.kind === "release")).toHaveLength(1);
	});

	it("takes a return after the window from the balance, as before: what was spent is a shortfall", async () => {
		const [saved] = (
			await broker.call<{ rows: DealView[] }, object>("deals.list", {
				memberId: "h001",
				merchantId: "shop"
			})
		).rows;
		await deal({ memberId: "h001", merchantId: "20", dealAmount: 4_000, type: "use", point: 40 });
		await broker.call("deals.cancel", { id: saved.id });
		await drained(broker);
		expect((await history("h001"))[0]).toMatchObject({
			kind: "revoke",
			amount: -10,
			shortfall: 40
		});
		expect(await points("h001")).toMatchObject({ balance: 0, held: 0 });
	});

	it("lets a use release what is due first when the job has not run yet; validity runs from the release", async () => {
		await broker.stop();
		await start(3_600_000);
		await join("h002");
		const saved = await deal({
			memberId: "h002",
			merchantId: "shop",
			dealAmount: 20_000,
			type: "save"
		});
		await drained(broker);
		at("2026-06-12T11:00:00.000Z");
		const used = await deal({
			memberId: "h002",
			merchantId: "20",
			dealAmount: 15_000,
			type: "use",
			point: 150
		});
		expect(used.status).toBe("success");
		const [use, release] = await history("h002");
		expect([release.cause, release.held, use.kind, use.amount]).toEqual([
			`release:${saved.id}`,
			-200,
			"use",
			-150
		]);
		expect(await points("h002")).toMatchObject({ balance: 50, held: 0 });
		// Earned in May, released in June: with POINTS_VALID_MONTHS=1 they expire at the end of July.
		expect((await points("h002")).expiring).toEqual([
			expect.objectContaining({ month: "202606", points: 0 }),
			expect.objectContaining({ month: "202607", points: 50 }),
			expect.objectContaining({ month: "202608", points: 0 })
		]);
	});

	it("forfeits held points at a withdrawal, an entry for each deal", async () => {
		await join("h003");
		const saved = await deal({
			memberId: "h003",
			merchantId: "shop",
			dealAmount: 7_000,
			type: "save"
		});
		await deal({ memberId: "h003", merchantId: "20", dealAmount: 2_000, type: "save" });
		await drained(broker);
		await broker.call("members.withdraw", { memberId: "h003" });
		await drained(broker);
		expect(await points("h003")).toMatchObject({ balance: 0, held: 0, status: "closed" });
		const expiries = (await history("h003")).filter(e => e.kind === "expire");
		expect(expiries.map(e => [e.cause, e.amount, e.held]).sort()).toEqual([
			["expiry:h003", -20, undefined],
			[`expiry:h003:held:${saved.id}`, -70, -70]
		]);
	});

	it("refuses holdDays that are not a whole number of days from 0 to 365, changing nothing", async () => {
		for (const holdDays of [366, -1, 1.5, "two", true])
			await expect(
				broker.call("merchants.changeTerms", { merchantId: "shop", holdDays })
			).rejects.toMatchObject({ code: 422, type: "VALIDATION_ERROR" });
		expect(
			(
				await broker.call<{ termsHistory: unknown[] }, object>("merchants.get", {
					merchantId: "shop"
				})
			).termsHistory
		).toHaveLength(1);
	});
});

describe("held points with tiers", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	const points = (memberId: string) => broker.call<AccountView, object>("points.get", { memberId });
	const deal = (params: object) => broker.call<DealView, object>("deals.create", params);

	beforeAll(async () => {
		broker = createTestBroker(
			[
				MembersService,
				MerchantsService,
				withSettings(PointsService, { releaseCheckMs: 100 }),
				DealsService
			],
			{
				TIERS: "basic:0:1,silver:100:1.5",
				...(onMongo()
					? { MONGO_URI: freshDatabaseUri() }
					: { DATA_DIR: fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-held-tiers-")) })
			}
		);
		await broker.start();
		await broker.call("merchants.register", { merchantId: "shop", name: "Shop", holdDays: 14 });
		await broker.call("members.join", { memberId: "t001", name: "t001" });
	});
	afterAll(() => broker.stop());

	it("holds a save's bonus with its base, and a return inside the window takes both shares from the hold", async () => {
		await deal({ memberId: "t001", merchantId: "20", dealAmount: 10_000, type: "save" });
		await drained(broker);
		expect((await points("t001")).tier.name).toBe("silver");
		const saved = await deal({
			memberId: "t001",
			merchantId: "shop",
			dealAmount: 10_000,
			type: "save"
		});
		await drained(broker);
		// Base 100 and a bonus of 50 at 1.5, both held.
		expect(await points("t001")).toMatchObject({ balance: 100, held: 150 });
		await broker.call("deals.cancel", { id: saved.id, amount: 5_000 });
		await drained(broker);
		expect(await points("t001")).toMatchObject({ balance: 100, held: 75 });
		const history = await broker.call<{ rows: Entry[] }, object>("points.history", {
			memberId: "t001"
		});
		expect(
			history.rows.filter(e => e.kind === "revoke").map(e => [e.amount, e.held, e.shortfall])
		).toEqual([
			[-25, -25, undefined],
			[-50, -50, undefined]
		]);
		jest.setSystemTime(new Date("2026-05-29T00:00:00.000Z"));
		await eventually(async () =>
			expect(await points("t001")).toMatchObject({ balance: 175, held: 0 })
		);
		// The release's posting may still be copying its entry into the ledger as the balance shows.
		await eventually(async () =>
			expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([])
		);
	});
});
