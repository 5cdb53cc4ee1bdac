/**
 * Exports, on each store, over HTTP: the ledger as NDJSON in posting order, resumable from the last
 * entry read, and filtered by time; every member as CSV, an erased one without personal data. Both
 * are staff's only.
 */
import type { ServiceBroker } from "moleculer";
import { parse } from "csv-parse/sync";
import type { LedgerEntry } from "../../lib/posting";
import { sortableId } from "../../lib/ids";
import type { Collection } from "../../mixins/db.mixin";
import ApiService from "../../services/api.service";
import IdempotencyService from "../../services/idempotency.service";
import MembersService from "../../services/members.service";
import PointsService from "../../services/points.service";
import { createTestBroker, drained } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freePort, TOKENS } from "../helpers/system";

/** Entries seeded straight into the ledger, more than two pages of the export's reads. */
const SEEDED = 2500;

describe("exports", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let port: number;
	const get = async (path: string, token = TOKENS.staff) => {
		const res = await fetch(`http://127.0.0.1:${port}/api${path}`, {
			headers: { Authorization: `Bearer ${token}` }
		});
		return { status: res.status, headers: res.headers, text: await res.text() };
	};
	const lines = (text: string) =>
		text
			.split("\n")
			.filter(Boolean)
			.map(line => JSON.parse(line) as { cause: string; at: string; amount: number });

	beforeAll(async () => {
		port = await freePort();
		broker = createTestBroker([ApiService, IdempotencyService, MembersService, PointsService], {
			PORT: String(port),
			HOST: "127.0.0.1",
			API_KEYS: `${TOKENS.staff}=staff,${TOKENS.merchant20}=merchant:20`
		});
		await broker.start();
		// Seeded in the store, in posting order (each a later `seq`), one an hour back from now.
		const ledger = (
			broker.getLocalService("points") as unknown as { ledger: Collection<LedgerEntry> }
		).ledger;
		const start = Date.parse("2026-05-01T00:00:00.000Z");
		for (let i = 0; i < SEEDED; i++)
			await ledger.insertUnique({
				_id: `deal:s${String(i).padStart(5, "0")}`,
				memberId: `s${i % 50}`,
				kind: "earn",
				amount: i + 1,
				balanceAfter: i + 1,
				sourceType: "deal",
				sourceId: `s${i}`,
				at: new Date(start + i * 60_000).toISOString(),
				seq: sortableId()
			});
	});
	afterAll(() => broker.stop());

	it("streams every ledger entry in posting order as NDJSON, and resumes after the last entry read", async () => {
		const res = await get("/exports/ledger");
		expect(res.status).toBe(200);
		expect(res.headers.get("content-type")).toMatch(/^application\/x-ndjson/);
		const all = lines(res.text);
		expect(all).toHaveLength(SEEDED);
		expect(all.map(e => e.cause)).toEqual(
			Array.from({ length: SEEDED }, (_, i) => `deal:s${String(i).padStart(5, "0")}`)
		);
		expect(all[0]).toMatchObject({ cause: "deal:s00000", memberId: "s0", kind: "earn", amount: 1 });
		expect(all[0]).not.toHaveProperty("seq");

		// A reader cut off after 1,234 lines goes on from the last one it read.
		const rest = lines((await get(`/exports/ledger?after=${all[1233].cause}`)).text);
		expect(rest.map(e => e.cause)).toEqual(all.slice(1234).map(e => e.cause));
		expect(lines((await get(`/exports/ledger?after=${all.at(-1)?.cause}`)).text)).toEqual([]);
	});

	it("keeps the entries posted from `from` to `to`, and refuses an `after` that is no entry", async () => {
		const from = "2026-05-01T01:00:00.000Z";
		const to = "2026-05-01T01:59:59.999Z";
		const hour = lines((await get(`/exports/ledger?from=${from}&to=${to}`)).text);
		expect(hour.map(e => e.cause)).toEqual(
			Array.from({ length: 60 }, (_, i) => `deal:s${String(60 + i).padStart(5, "0")}`)
		);
		const unknown = await get("/exports/ledger?after=deal:nothing");
		expect(unknown.status).toBe(422);
		expect(JSON.parse(unknown.text)).toMatchObject({ type: "ENTRY_NOT_FOUND" });
	});

	it("lists every member as CSV, an erased one without name, phone or email", async () => {
		await broker.call("members.join", {
			memberId: "c1",
			name: "Kept Kim",
			phone: "010-1111-2222",
			email: "kept@example.com"
		});
		await broker.call("members.join", {
			memberId: "c2",
			name: "Erin Park",
			phone: "010-9999-0001",
			email: "erin@example.com"
		});
		await broker.call("members.erase", { memberId: "c2" });
		await drained(broker);
		const res = await get("/members.csv");
		expect([res.status, res.headers.get("content-type")]).toEqual([200, "text/csv; charset=utf-8"]);
		expect(res.text.split("\r\n")[0]).toBe(
			"memberId,name,phone,email,status,joinedAt,withdrawnAt,erasedAt"
		);
		const rows = parse(res.text, { columns: true }) as Record<string, string>[];
		expect(rows.map(r => r.memberId)).toEqual(["c1", "c2"]);
		expect(rows[0]).toMatchObject({ name: "Kept Kim", phone: "010-1111-2222", status: "active" });
		expect(rows[1]).toMatchObject({ name: "", phone: "", email: "", status: "erased" });
		expect(res.text).not.toMatch(/Erin|erin@|9999-0001/);
	});

	it("is staff's only", async () => {
		for (const path of ["/exports/ledger", "/members.csv"])
			expect((await get(path, TOKENS.merchant20)).status).toBe(403);
	});
});
