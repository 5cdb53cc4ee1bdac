/**
 * 5. Bulk data: a CSV of `importRows` members with opening balances streamed to `POST /api/imports`
 * from a file on disk (rows applied per second, from the 202 to `completed`), then the whole
 * ledger streamed from `GET /api/exports/ledger` (entries per second, and the node's memory before
 * and after). One node, all services, as `npm start` runs it. `npm run bench -- --import-rows=1000000`
 * for a million rows.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import http from "node:http";
import { System } from "../test/helpers/system";
import { AUTH, rssMb } from "./lib";

export interface BulkFigures {
	rows: number;
	importSeconds: number;
	rowsPerSecond: number;
	exported: number;
	exportSeconds: number;
	entriesPerSecond: number;
	rssBeforeExportMb: number;
	rssAfterExportMb: number;
}

/** Writes the CSV a line at a time, never whole in memory. */
async function writeCsv(file: string, rows: number): Promise<void> {
	const out = fs.createWriteStream(file);
	out.write("memberId,name,phone,email,points,earnedAt\n");
	for (let i = 1; i <= rows; i++)
		if (
			!out.write(
				`i${i},Member ${i},010-${String(i % 10_000).padStart(4, "0")}-0000,,${(i % 900) + 100},2026-0${1 + (i % 4)}-15\n`
			)
		)
			await new Promise<void>(resolve => out.once("drain", () => resolve()));
	await new Promise<void>(resolve => out.end(() => resolve()));
}

export async function bulkBench(importRows: number): Promise<BulkFigures> {
	const folder = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-bench-bulk-"));
	const file = path.join(folder, "members.csv");
	await writeCsv(file, importRows);
	const system = await System.start({ LOG_LEVEL: "warn" });
	try {
		const started = performance.now();
		// Its own connection (no pool): the gateway closes an upload's connection after the answer.
		const answer = await new Promise<{ importId: string }>((resolve, reject) => {
			const req = http.request(
				`${system.url}/api/imports`,
				{
					method: "POST",
					agent: false,
					headers: {
						authorization: AUTH.authorization,
						"content-type": "text/csv",
						"content-length": String(fs.statSync(file).size)
					}
				},
				res => {
					let body = "";
					res.on("data", chunk => (body += chunk));
					res.on("end", () =>
						res.statusCode === 202
							? resolve(JSON.parse(body) as { importId: string })
							: reject(new Error(`The import was refused: ${res.statusCode} ${body}`))
					);
				}
			);
			req.on("error", reject);
			fs.createReadStream(file).pipe(req);
		});
		const { importId } = answer;
		for (;;) {
			// A connection each: a node busy with a million rows can let a kept-alive one lapse under it.
			const job = (
				await system.call("GET", `/api/imports/${importId}`, undefined, { connection: "close" })
			).body;
			if (job.status !== "running") {
				if (job.status !== "completed" || job.done !== importRows)
					throw new Error(`The import ended ${JSON.stringify(job)}`);
				break;
			}
			await new Promise(resolve => setTimeout(resolve, 500));
		}
		const importSeconds = (performance.now() - started) / 1000;

		const rssBeforeExportMb = rssMb(system.pid as number);
		const exportStarted = performance.now();
		const exported = await fetch(`${system.url}/api/exports/ledger`, {
			headers: { authorization: AUTH.authorization }
		});
		let lines = 0;
		for await (const chunk of exported.body as unknown as AsyncIterable<Uint8Array>)
			for (const byte of chunk) if (byte === 10) lines++;
		const exportSeconds = (performance.now() - exportStarted) / 1000;
		return {
			rows: importRows,
			importSeconds,
			rowsPerSecond: importRows / importSeconds,
			exported: lines,
			exportSeconds,
			entriesPerSecond: lines / exportSeconds,
			rssBeforeExportMb,
			rssAfterExportMb: rssMb(system.pid as number)
		};
	} catch (err) {
		console.error(`The node's log:\n${system.log.slice(-5000)}`);
		throw err;
	} finally {
		await system.stop();
		fs.rmSync(folder, { recursive: true, force: true });
	}
}
