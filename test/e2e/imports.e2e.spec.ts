/**
 * An import at volume, on each store: 100,000 rows (5,000 on the MongoDB stand-in, see ROWS), run
 * twice over HTTP. The first creates every member with its opening balance; the second skips every
 * row and changes nothing; every balance equals its ledger throughout.
 */
import type { ServiceBroker } from "moleculer";
import ApiService from "../../services/api.service";
import IdempotencyService from "../../services/idempotency.service";
import ImportsService, { type ImportView } from "../../services/imports.service";
import MembersService from "../../services/members.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained, eventually } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { onMongo } from "../helpers/store";
import { freePort, TOKENS } from "../helpers/system";

/**
 * The stand-in answers MongoDB's wire protocol from one JavaScript process: 100,000 rows there
 * would take most of CI's budget (20,000 took over 10 minutes on a busy machine), so it imports
 * 5,000: the same code paths, batch for batch.
 */
const ROWS = onMongo() ? 5_000 : 100_000;

// CI's run at 74920fd took 620 s and hit the former 600-s bound on a loaded machine.
jest.setTimeout(1_500_000);

describe(`an import of ${ROWS} rows, run twice`, () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let port: number;
	const csv = [
		"memberId,name,phone,email,points,earnedAt",
		...Array.from(
			{ length: ROWS },
			(_, i) =>
				`v${i + 1},Member ${i + 1},,m${i + 1}@example.com,${(i % 500) + 1},2026-0${1 + (i % 4)}-15`
		)
	].join("\n");
	const importOnce = async () => {
		const res = await fetch(`http://127.0.0.1:${port}/api/imports`, {
			method: "POST",
			headers: { Authorization: `Bearer ${TOKENS.staff}`, "Content-Type": "text/csv" },
			body: csv
		});
		expect(res.status).toBe(202);
		const { importId } = (await res.json()) as { importId: string };
		return eventually(
			async () => {
				const job = await broker.call<ImportView, object>("imports.get", { importId });
				expect(job.status).toBe("completed");
				return job;
			},
			700_000,
			500
		);
	};
	const audit = () =>
		broker.call<{ accounts: number; entries: number; mismatches: unknown[] }>("points.audit");

	beforeAll(async () => {
		port = await freePort();
		broker = createTestBroker(
			[ApiService, IdempotencyService, MembersService, PointsService, ImportsService],
			{ PORT: String(port), HOST: "127.0.0.1", API_KEYS: `${TOKENS.staff}=staff` }
		);
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("creates every member and opening balance once; the second run skips every row and changes nothing", async () => {
		const first = await importOnce();
		expect(first).toMatchObject({ total: ROWS, done: ROWS, created: ROWS, skipped: 0, failed: 0 });
		await drained(broker, 120_000);
		const after = await audit();
		expect(after).toMatchObject({ accounts: ROWS, entries: ROWS, mismatches: [] });

		const second = await importOnce();
		expect(second).toMatchObject({ total: ROWS, done: ROWS, created: 0, skipped: ROWS, failed: 0 });
		await drained(broker, 120_000);
		expect(await audit()).toEqual(after);
		expect(await broker.call("points.get", { memberId: `v${ROWS}` })).toMatchObject({
			balance: ((ROWS - 1) % 500) + 1
		});
	});
});
