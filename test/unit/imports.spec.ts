/**
 * Bulk import, on each store, over HTTP as a client sends it: a CSV body streamed to the imports
 * service, answered 202, applied row by row through members and points. Bad rows are reported by
 * line and code while the others go on; the same file again changes nothing; a file over
 * IMPORT_MAX_BYTES is 413 with nothing changed; a node stopped mid-import resumes where it was.
 */
import fs from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import type { ServiceBroker } from "moleculer";
import ApiService from "../../services/api.service";
import DashboardService from "../../services/dashboard.service";
import IdempotencyService from "../../services/idempotency.service";
import ImportsService, { type ImportView } from "../../services/imports.service";
import MembersService from "../../services/members.service";
import PointsService, { type AccountView } from "../../services/points.service";
import {
	createTestBroker,
	drained,
	eventually,
	withSettings,
	type AnyServiceSchema
} from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freePort, TOKENS } from "../helpers/system";

const HEADER = "memberId,name,phone,email,points,earnedAt";
const MAX_BYTES = 64 * 1024;

/** `count` good rows from member `<prefix><n>`, each with n points earned in April 2026. */
const goodRows = (prefix: string, count: number) =>
	Array.from(
		{ length: count },
		(_, i) =>
			`${prefix}${i + 1},Member ${i + 1},010-0000-${String(i).padStart(4, "0")},,${i + 1},2026-04-0${1 + (i % 9)}`
	);

describe("bulk import", () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let port: number;

	const start = async (
		batchSize = 500,
		points = true,
		more: AnyServiceSchema[] = [],
		maxBacklog = 10_000
	) => {
		broker = createTestBroker(
			[
				ApiService,
				IdempotencyService,
				MembersService,
				...(points ? [PointsService] : []),
				DashboardService,
				withSettings(ImportsService, { importMaxBytes: MAX_BYTES, batchSize, maxBacklog }),
				...more
			],
			{
				PORT: String(port),
				HOST: "127.0.0.1",
				API_KEYS: `${TOKENS.staff}=staff,${TOKENS.merchant20}=merchant:20`
			}
		);
		await broker.start();
	};
	const post = async (csv: string, headers: Record<string, string> = {}, token = TOKENS.staff) => {
		const res = await fetch(`http://127.0.0.1:${port}/api/imports`, {
			method: "POST",
			headers: { Authorization: `Bearer ${token}`, "Content-Type": "text/csv", ...headers },
			body: csv
		});
		return { status: res.status, headers: res.headers, body: (await res.json()) as any };
	};
	const job = async (importId: string) => {
		const res = await fetch(`http://127.0.0.1:${port}/api/imports/${importId}`, {
			headers: { Authorization: `Bearer ${TOKENS.staff}` }
		});
		return { status: res.status, body: (await res.json()) as ImportView };
	};
	const finished = (importId: string) =>
		eventually(async () => {
			const { body } = await job(importId);
			expect(body.status).not.toBe("running");
			return body;
		}, 60_000);
	const balance = async (memberId: string) =>
		(await broker.call<AccountView, object>("points.get", { memberId })).balance;
	const audit = () =>
		broker.call<{ accounts: number; entries: number; mismatches: unknown[] }>("points.audit");
	const members = async () => {
		let csv = "";
		for await (const chunk of await broker.call<Readable>("members.exportCsv")) csv += chunk;
		return csv.trim().split("\r\n").length - 1;
	};

	beforeAll(async () => {
		port = await freePort();
		await start();
	});
	afterAll(() => broker.stop());

	it("applies the good rows and reports each bad one by its line and code; the same file again skips every row", async () => {
		const csv = [
			HEADER,
			...goodRows("ok", 3),
			"bad-id!,Bad Id,,,10,2026-04-01",
			"nm1,,,,10,2026-04-01",
			"ph1,Phone,not a phone,,10,",
			"em1,Email,,not-an-email,10,",
			"pt1,Points,,,-5,2026-04-01",
			"pt2,Points,,,ten,",
			"ea1,Earned,,,10,2026-13-01",
			"ea2,Earned,,,10,2027-01-01",
			"cc1,Too,Many,,1,2026-04-01,extra",
			"nopoints,No Points,,,,",
			"ok1,Twice In File,,,999,2026-01-01",
			// An unclosed quote runs to the end of the file: one malformed row, on the last line.
			'qq1,"Unclosed,,,1,',
			"zz1,Swallowed,,,1,"
		].join("\n");
		const res = await post(csv);
		expect(res.status).toBe(202);
		expect(res.headers.get("location")).toBe(`/api/imports/${res.body.importId}`);
		expect(res.body).toEqual({ importId: expect.any(String), status: "running", total: 15 });

		const done = await finished(res.body.importId);
		expect(done).toMatchObject({
			status: "completed",
			total: 15,
			done: 15,
			created: 4,
			skipped: 1,
			failed: 10
		});
		expect(done.errors.map(e => [e.row, e.code])).toEqual([
			[5, "INVALID_MEMBER_ID"],
			[6, "INVALID_NAME"],
			[7, "INVALID_PHONE"],
			[8, "INVALID_EMAIL"],
			[9, "INVALID_POINTS"],
			[10, "INVALID_POINTS"],
			[11, "INVALID_EARNED_AT"],
			[12, "INVALID_EARNED_AT"],
			[13, "INVALID_ROW"],
			[17, "MALFORMED_ROW"]
		]);
		for (const error of done.errors) expect(error.message).toEqual(expect.any(String));

		await drained(broker);
		expect(await balance("ok1")).toBe(1);
		expect(await balance("ok3")).toBe(3);
		expect(await balance("nopoints")).toBe(0);
		await expect(broker.call("members.get", { memberId: "pt1" })).rejects.toMatchObject({
			type: "MEMBER_NOT_FOUND"
		});
		// One opening entry, in the lot of earnedAt's month: it counts as imported on the dashboard.
		const history = await broker.call<{ rows: Record<string, unknown>[] }, object>(
			"points.history",
			{ memberId: "ok2" }
		);
		expect(history.rows).toEqual([
			expect.objectContaining({
				cause: "import:ok2",
				kind: "import",
				amount: 2,
				lotMonth: "202604"
			})
		]);
		const dashboard = await broker.call<{ member: Record<string, number> }, object>(
			"dashboard.member",
			{ memberId: "ok2" }
		);
		expect(dashboard.member).toMatchObject({ balance: 2, imported: 2, earned: 0 });

		const before = await audit();
		expect(before.mismatches).toEqual([]);
		const again = await finished((await post(csv)).body.importId);
		expect(again).toMatchObject({ status: "completed", created: 0, skipped: 5, failed: 10 });
		await drained(broker);
		expect(await audit()).toEqual(before);
		expect(await balance("ok1")).toBe(1);
	});

	it("refuses a body over IMPORT_MAX_BYTES with 413, by its length or as it streams, and changes nothing", async () => {
		const big = [HEADER, ...goodRows("big", 2000)].join("\n");
		expect(Buffer.byteLength(big)).toBeGreaterThan(MAX_BYTES);
		const count = await members();
		const res = await post(big);
		expect([res.status, res.body.type]).toEqual([413, "IMPORT_TOO_LARGE"]);
		// Sent without a length (a stream), it is refused once the bytes received pass the limit.
		await expect(
			broker.call("imports.start", {}, { stream: Readable.from([Buffer.from(big)]) })
		).rejects.toMatchObject({ code: 413, type: "IMPORT_TOO_LARGE" });
		expect(await members()).toBe(count);
		expect(fs.readdirSync(path.join(process.env.DATA_DIR as string, "imports"))).toEqual([]);
	});

	it("refuses what is not an import: another media type, a wrong header, an Idempotency-Key, a merchant's token, an unknown job", async () => {
		const csv = [HEADER, ...goodRows("ref", 1)].join("\n");
		const typed = await post(csv, { "Content-Type": "text/plain" });
		expect([typed.status, typed.body.type]).toEqual([415, "UNSUPPORTED_MEDIA_TYPE"]);
		const header = await post("id,name\nx1,X");
		expect([header.status, header.body.type]).toEqual([422, "INVALID_CSV_HEADER"]);
		const keyed = await post(csv, { "Idempotency-Key": "import-1" });
		expect([keyed.status, keyed.body.type]).toEqual([400, "IDEMPOTENCY_KEY_UNSUPPORTED"]);
		expect((await post(csv, {}, TOKENS.merchant20)).status).toBe(403);
		const unknown = await job("nope");
		expect([unknown.status, (unknown.body as unknown as { type: string }).type]).toEqual([
			404,
			"IMPORT_NOT_FOUND"
		]);
		await expect(broker.call("members.get", { memberId: "ref1" })).rejects.toMatchObject({
			type: "MEMBER_NOT_FOUND"
		});
		// Four columns: members without opening balances.
		const short = await finished(
			(await post("memberId,name,phone,email\nshort1,Short One,,short@example.com")).body.importId
		);
		expect(short).toMatchObject({ status: "completed", created: 1, failed: 0 });
	});

	it("resumes a job a stopped node left running where it was, and fails one whose file is gone with what it had done", async () => {
		// Without points, a batch with opening balances waits (retried): the job holds there, running.
		const held = async (prefix: string) => {
			await broker.stop();
			await start(20, false);
			const csv = [
				HEADER,
				...Array.from({ length: 20 }, (_, i) => `${prefix}m${i + 1},Member ${i + 1},,,,`),
				...goodRows(prefix, 80)
			].join("\n");
			const importId = (await post(csv)).body.importId as string;
			await eventually(async () => expect((await job(importId)).body.done).toBe(20));
			expect((await job(importId)).body.status).toBe("running");
			await broker.stop();
			return importId;
		};

		const resumed = await held("res");
		await start(20);
		const done = await finished(resumed);
		expect(done).toMatchObject({
			status: "completed",
			total: 100,
			done: 100,
			created: 100,
			skipped: 0,
			failed: 0
		});
		await drained(broker);
		for (const n of [1, 40, 80]) expect(await balance(`res${n}`)).toBe(n);
		expect((await audit()).mismatches).toEqual([]);

		const lost = await held("lost");
		fs.rmSync(path.join(process.env.DATA_DIR as string, "imports", `${lost}.csv`));
		await start();
		expect((await job(lost)).body).toMatchObject({
			status: "failed",
			done: 20,
			created: 20,
			reason: expect.stringMatching(/file is gone/)
		});
	});

	it("holds an import while its events' consumers are behind, so the messages waiting stay bounded", async () => {
		await broker.stop();
		let open = () => undefined as void;
		const gate = new Promise<void>(resolve => (open = resolve));
		// A read model that cannot keep up: it takes no member.joined until the gate opens.
		const slowReader = {
			name: "slow-reader",
			channels: { "member.joined": { group: "slow-reader", handler: () => gate } }
		};
		await start(10, true, [slowReader], 5);
		const backlog = () =>
			(
				broker as unknown as { channelAdapter: { backlog(): Promise<number> } }
			).channelAdapter.backlog();
		const importId = (await post([HEADER, ...goodRows("bp", 40)].join("\n"))).body
			.importId as string;
		try {
			// One batch (10 joins and 10 postings), then it waits: without the wait all 40 rows go, 80 events.
			await eventually(async () => expect((await job(importId)).body.done).toBe(10));
			expect(await backlog()).toBeLessThanOrEqual(20);
			expect((await job(importId)).body).toMatchObject({ status: "running", done: 10 });
		} finally {
			// Also on a failure: a handler still held would hold the broker's stop.
			open();
		}
		expect(await finished(importId)).toMatchObject({ status: "completed", done: 40, created: 40 });
		await drained(broker);
		expect((await audit()).mismatches).toEqual([]);
	});
});
