/**
 * The ledger export at volume: a million entries, written straight into a NeDB file of the ledger
 * (as the points service wrote them before issue 25, not by a million requests) that the node imports
 * at start, streamed over HTTP as NDJSON. Every line comes, in posting order, while the memory the
 * export holds stays flat: the heap, collected as the lines arrive, grows by a small fraction of what
 * is sent.
 * SQLite only (in jest.config.js's list run once): on the MongoDB stand-in a million entries would take
 * most of CI's budget to write; the export's order and resumption on MongoDB are in
 * test/unit/exports.spec.ts.
 */
import fs from "node:fs";
import path from "node:path";
import { runInNewContext } from "node:vm";
import { setFlagsFromString } from "node:v8";
import type { ServiceBroker } from "moleculer";
import { encodeTime } from "ulid";
import ApiService from "../../services/api.service";
import PointsService from "../../services/points.service";
import { createTestBroker } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freePort, TOKENS } from "../helpers/system";

const ENTRIES = 1_000_000;
/** What the export may keep beyond what it held before it began (bytes), against ~180 MB sent. */
const HEAP_BOUND = 48 * 1024 * 1024;

jest.setTimeout(900_000);

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

const cause = (i: number) => `deal:e${String(i).padStart(7, "0")}`;

/** A ULID as `sortableId` makes them: the millisecond, then (here) a counter in place of randomness. */
const seqOf = (at: number, i: number) => encodeTime(at, 10) + encodeTime(i, 10).padStart(16, "0");

/** The ledger as a NeDB file, a line an entry, one every 10 ms from New Year, never whole in memory. */
async function writeLedger(file: string): Promise<void> {
	const start = Date.parse("2026-01-01T00:00:00.000Z");
	const out = fs.createWriteStream(file);
	for (let i = 0; i < ENTRIES; i++) {
		const at = start + i * 10;
		const line = JSON.stringify({
			_id: cause(i),
			memberId: `e${i % 10_000}`,
			kind: "earn",
			amount: 10,
			balanceAfter: 10 * (Math.floor(i / 10_000) + 1),
			sourceType: "deal",
			sourceId: `e${i}`,
			merchantId: "20",
			at: new Date(at).toISOString(),
			seq: seqOf(at, i)
		});
		if (!out.write(`${line}\n`)) await new Promise<void>(resolve => out.once("drain", resolve));
	}
	await new Promise<void>(resolve => out.end(resolve));
}

describe(`the ledger export of ${ENTRIES} entries`, () => {
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let port: number;

	beforeAll(async () => {
		port = await freePort();
		await writeLedger(path.join(process.env.DATA_DIR as string, "ledger.db"));
		broker = createTestBroker([ApiService, PointsService], {
			PORT: String(port),
			HOST: "127.0.0.1",
			API_KEYS: `${TOKENS.staff}=staff`
		});
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("streams every entry in posting order in bounded memory", async () => {
		gc();
		const before = process.memoryUsage().heapUsed;
		let most = 0;
		const res = await fetch(`http://127.0.0.1:${port}/api/exports/ledger`, {
			headers: { Authorization: `Bearer ${TOKENS.staff}` }
		});
		expect(res.status).toBe(200);
		expect(res.headers.get("content-type")).toMatch(/^application\/x-ndjson/);

		let count = 0;
		let bytes = 0;
		let partial = "";
		let outOfOrder = 0;
		for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
			bytes += chunk.length;
			const text = partial + Buffer.from(chunk).toString("utf8");
			const lines = text.split("\n");
			partial = lines.pop() as string;
			for (const line of lines) {
				if (!line.startsWith(`{"cause":"${cause(count)}"`)) outOfOrder++;
				count++;
				// What is still held after a collection, every 200,000 lines: garbage is not growth.
				if (count % 200_000 === 0) {
					gc();
					most = Math.max(most, process.memoryUsage().heapUsed - before);
				}
			}
		}
		expect(partial).toBe("");
		expect(count).toBe(ENTRIES);
		expect(outOfOrder).toBe(0);
		expect(bytes).toBeGreaterThan(3 * HEAP_BOUND);
		expect(most).toBeLessThan(HEAP_BOUND);
	});
});
