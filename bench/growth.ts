/**
 * 4. Growth: reads as the ledger grows — `GET /points/:id`, the history page and the dashboard's
 * member query — then writes (`POST /api/deals` for the grown members, a full load), with the
 * process's memory, at each ledger size; and the start-up time on that data.
 * The data folder is written directly as NeDB files (100 entries per member, as the points and
 * dashboard services would have written them), not by a million HTTP calls; the node imports them
 * into its SQLite file at its first start, so that start-up includes the import.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
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

/** Writes one NeDB file, a JSON document per line, without holding them all in memory. */
async function writeLines(file: string, count: number, line: (i: number) => object): Promise<void> {
	const out = fs.createWriteStream(file);
	for (let i = 0; i < count; i++)
		if (!out.write(`${JSON.stringify(line(i))}\n`))
			await new Promise<void>(resolve => out.once("drain", () => resolve()));
	await new Promise<void>((resolve, reject) => {
		out.once("error", reject);
		out.end(() => resolve());
	});
}

export async function writeLedger(dataDir: string, entries: number): Promise<number> {
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
	await writeLines(path.join(dataDir, "ledger.db"), entries, entry);
	await writeLines(path.join(dataDir, "dashboard-entries.db"), entries, i => {
		const { _id, seq: _seq, ...rest } = entry(i);
		return { _id, ...rest };
	});
	const opened = new Date(base).toISOString();
	await writeLines(path.join(dataDir, "accounts.db"), members, m => ({
		_id: `g${m}`,
		balance: 10 * perMember(m),
		status: "active",
		openedAt: opened,
		updatedAt: opened
	}));
	await writeLines(path.join(dataDir, "dashboard-members.db"), members, m => ({
		_id: `g${m}`,
		status: "active",
		balance: 10 * perMember(m)
	}));
	await writeLines(path.join(dataDir, "members.db"), members, m => ({
		_id: `g${m}`,
		name: `grown ${m}`,
		phone: null,
		email: null,
		status: "active",
		joinedAt: opened
	}));
	return members;
}

export async function growthBench(options: Options, reads = 200): Promise<GrowthRow[]> {
	const rows: GrowthRow[] = [];
	for (const entries of options.sizes) {
		const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-growth-"));
		try {
			const members = await writeLedger(dataDir, entries);
			const anyMember = () => `g${Math.floor(Math.random() * members)}`;
			// The rate limiter would refuse the write load: lifted, as for the HTTP benchmark.
			const system = new System(
				await freePort(),
				{ RATE_LIMIT: "1000000000" },
				await freePort(),
				dataDir
			);
			system.startTimeoutMs = 300_000;
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
