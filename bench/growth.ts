/**
 * 4. Growth: reads as the ledger grows — `GET /points/:id`, the history page and the dashboard's
 * member query — then writes (`POST /api/deals` for the grown members, a full load), with the
 * process's memory, at each ledger size; and the start-up time on that data.
 * The data folder's SQLite tables are written directly (100 entries per member, as the points and
 * dashboard services would have written them), not by millions of HTTP calls. The node's first start
 * builds the services' indexes on them; the start-up timed is the second, as after a restart.
 */
import fs from "node:fs";
import { DatabaseSync } from "node:sqlite";
import os from "node:os";
import path from "node:path";
import { createTableSql } from "../lib/store/sqlite-collection";
import { freePort, System } from "../test/helpers/system";
import { AUTH, dealBody, httpLoad, readLatencies, rssMb, type Figures, type Options } from "./lib";

const ENTRIES_PER_MEMBER = 100;

export interface GrowthRow {
	entries: number;
	startupSeconds: number;
	rssMb: number;
	/** p50 and p99 (ms) per query. */
	reads: Record<"balance" | "history" | "dashboard", { p50: number; p99: number }>;
	/** Deals over HTTP with this many entries already stored. */
	writes: Figures;
}

/** Rows written per transaction: one commit per batch, as a bulk load should. */
const BATCH = 100_000;

/** Writes `count` documents into collection `name`'s table, without holding them all in memory. */
function writeTable(
	db: DatabaseSync,
	name: string,
	count: number,
	doc: (i: number) => object
): void {
	db.exec(createTableSql(name));
	const insert = db.prepare(`INSERT INTO "${name}" (_id, doc) VALUES (?, ?)`);
	for (let start = 0; start < count; start += BATCH) {
		db.exec("BEGIN");
		for (let i = start; i < Math.min(count, start + BATCH); i++) {
			const row = doc(i) as { _id: string };
			insert.run(row._id, JSON.stringify(row));
		}
		db.exec("COMMIT");
	}
}

export function writeLedger(dataDir: string, entries: number): number {
	const members = Math.max(1, Math.floor(entries / ENTRIES_PER_MEMBER));
	const base = Date.UTC(2026, 0, 1);
	const entry = (i: number) => {
		const member = i % members;
		const nth = Math.floor(i / members);
		const at = new Date(base + i * 1000).toISOString();
		return {
			_id: `deal:g${i}`,
			memberId: `g${member}`,
			kind: "earn",
			amount: 10,
			balanceAfter: 10 * (nth + 1),
			sourceType: "deal",
			sourceId: `g${i}`,
			merchantId: String(20 + (i % 5)),
			at,
			seq: `${(base + i * 1000).toString(36).padStart(9, "0")}${String(i).padStart(8, "0")}`
		};
	};
	const perMember = (m: number) => Math.floor(entries / members) + (m < entries % members ? 1 : 0);
	const db = new DatabaseSync(path.join(dataDir, "onepoint.sqlite"));
	db.exec("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF");
	writeTable(db, "ledger", entries, entry);
	writeTable(db, "dashboard-entries", entries, i => {
		const { _id, seq: _seq, ...rest } = entry(i);
		return { _id, ...rest };
	});
	const opened = new Date(base).toISOString();
	writeTable(db, "accounts", members, m => ({
		_id: `g${m}`,
		balance: 10 * perMember(m),
		status: "active",
		openedAt: opened,
		updatedAt: opened
	}));
	writeTable(db, "dashboard-members", members, m => ({
		_id: `g${m}`,
		status: "active",
		balance: 10 * perMember(m)
	}));
	writeTable(db, "members", members, m => ({
		_id: `g${m}`,
		name: `grown ${m}`,
		phone: null,
		email: null,
		status: "active",
		joinedAt: opened
	}));
	db.close();
	return members;
}

export async function growthBench(options: Options, reads = 200): Promise<GrowthRow[]> {
	const rows: GrowthRow[] = [];
	for (const entries of options.sizes) {
		const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-growth-"));
		try {
			const members = writeLedger(dataDir, entries);
			const anyMember = () => `g${Math.floor(Math.random() * members)}`;
			// The rate limiter would refuse the write load: lifted, as for the HTTP benchmark.
			const system = new System(
				await freePort(),
				{ RATE_LIMIT: "1000000000" },
				await freePort(),
				dataDir
			);
			system.startTimeoutMs = 1_800_000;
			// The first start builds the services' indexes on the data written above.
			await system.start();
			await system.stop();
			const started = performance.now();
			await system.start();
			const startupSeconds = (performance.now() - started) / 1000;
			try {
				const row: GrowthRow = {
					entries,
					startupSeconds,
					rssMb: 0,
					reads: {
						balance: await readLatencies(
							system,
							() => `/api/points/${anyMember()}`,
							n => n < reads
						),
						history: await readLatencies(
							system,
							() => `/api/points/${anyMember()}/history`,
							n => n < reads
						),
						dashboard: await readLatencies(
							system,
							() => `/api/dashboard/members/${anyMember()}`,
							n => n < reads
						)
					},
					writes: await httpLoad(`${system.url}/api/deals`, options, {
						method: "POST",
						headers: AUTH,
						setupRequest: req => ({ ...req, body: JSON.stringify(dealBody(members, "g")) })
					})
				};
				row.rssMb = rssMb(system.pid as number);
				rows.push(row);
			} finally {
				await system.stop();
			}
		} finally {
			fs.rmSync(dataDir, { recursive: true, force: true });
		}
	}
	return rows;
}
