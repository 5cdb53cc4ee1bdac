/**
 * Imports: a programme moving onto OnePoint brings its members and their balances as one CSV
 * (`memberId,name,phone,email,points,earnedAt`; `points` and `earnedAt` may be left out, as columns
 * or as cells). This service owns the import jobs and their row reports; it writes nothing of its
 * own into members or points: each row's member is joined by `members.importBatch`, its opening
 * balance posted by `points.open` (one `import:<memberId>` entry, in the lot of `earnedAt`'s month).
 *
 * Streamed, never whole in memory: the request's body is spooled to a file under DATA_DIR as it
 * arrives (refused with 413 past IMPORT_MAX_BYTES, and the file removed: nothing changed), counted,
 * answered 202, then read again row by row and applied a batch at a time. Rows are independent: a
 * bad one is reported by its line (the header is line 1) and a code, and the others go on. Both
 * owners' writes are idempotent by the member's id, so the same file again changes nothing (every
 * row `skipped`).
 *
 * Durable: the job, its counts and the last line applied are written after each batch. A node that
 * stops or dies mid-import resumes its running jobs from that line when it starts again (the rows of
 * the batch in flight run again, harmlessly, and count as `skipped`); a running job whose file this
 * node no longer has is marked `failed` with what it had done.
 */
import fs from "node:fs";
import path from "node:path";
import type { Readable } from "node:stream";
import { parse, type CsvError, type Info } from "csv-parse";
import type {
	Context,
	Service,
	ServiceBroker,
	ServiceSchema,
	ServiceSettingSchema
} from "moleculer";
import { ConfiguredSettings } from "../config/settings";
import { clientError, notFound } from "../lib/errors";
import { actorOf, type CallerMeta } from "../lib/gateway/access";
import type { AnswerMeta } from "../lib/gateway/answers";
import { sortableId } from "../lib/ids";
import { monthOf } from "../lib/months";
import * as P from "../lib/params";
import { DbMixin, openCollection, type Collection, type DbThis } from "../mixins/db.mixin";
import type { ImportedMember, ImportedOutcome } from "./members.service";
import type { OpeningResult } from "./points.service";

export interface ImportJob {
	_id: string;
	status: "running" | "completed" | "failed";
	/** The rows of the file, the header not counted. */
	total: number;
	done: number;
	created: number;
	skipped: number;
	/** Rows refused, each with a row report. */
	failed: number;
	/** The line of the last row applied (the header is line 1): where a resumed job goes on. */
	lastRow: number;
	/** Whether the file has `points` and `earnedAt` columns. */
	columns: number;
	/** The node that runs it, and its spooled file there. */
	nodeID: string;
	file: string;
	by: string;
	startedAt: string;
	finishedAt?: string;
	/** Why a job failed. */
	reason?: string;
}

/** A refused row: its line in the file, a stable code and what is wrong. */
export interface RowReport {
	/** `<importId>:<line, 10 digits>`: the reports of a job, in line order, by id alone. */
	_id: string;
	row: number;
	code: string;
	message: string;
}

export interface ImportView {
	importId: string;
	status: ImportJob["status"];
	total: number;
	done: number;
	created: number;
	skipped: number;
	failed: number;
	/** The first MAX_REPORTED refused rows, in line order. */
	errors: { row: number; code: string; message: string }[];
	startedAt: string;
	finishedAt?: string;
	reason?: string;
}

/** What a request's `ctx.meta` carries for a streamed body (set by the gateway). */
export interface StreamMeta extends CallerMeta, AnswerMeta {
	/** The body's declared size (`Content-Length`), when it has one. */
	contentLength?: number;
}

interface Settings extends ServiceSettingSchema {
	importMaxBytes: number;
	/** Where the spooled files are kept: DATA_DIR/imports. */
	spoolDir: string;
	/** Rows applied per batch: one call to each owner and one write of the job per batch. */
	batchSize: number;
	/** How long one batch's call to an owner may take (ms). */
	batchTimeoutMs: number;
	/**
	 * Messages the node's embedded channel store may hold before the next batch waits for the
	 * consumers: it keeps what is waiting in memory, and an import outruns the read models by far.
	 */
	maxBacklog: number;
}

interface Row {
	row: number;
	memberId: string;
	name: string;
	phone?: string;
	email?: string;
	points?: number;
	month?: string;
}

type Refused = { row: number; code: string; message: string };

interface Methods {
	spool(ctx: Context<object, StreamMeta>, file: string): Promise<number>;
	countRows(file: string): Promise<{ header: string[]; total: number }>;
	run(job: ImportJob): Promise<void>;
	applyBatch(job: ImportJob, rows: (Row | Refused)[]): Promise<void>;
	applyRetrying(job: ImportJob, rows: (Row | Refused)[]): Promise<void>;
	untilConsumersKeepUp(): Promise<void>;
	readRow(job: ImportJob, record: string[], row: number): Row | Refused;
	finish(job: ImportJob, status: ImportJob["status"], reason?: string): Promise<void>;
	toView(job: ImportJob, errors: RowReport[]): ImportView;
	tooLarge(bytes?: number): Error;
	launch(job: ImportJob): void;
	now(): Date;
}

type This = Service<Settings> &
	DbThis<ImportJob> &
	Methods & {
		reports: Collection<RowReport>;
		/** The jobs this instance is running, to wait for when it stops. */
		running: Map<string, Promise<void>>;
		stopping: boolean;
	};

/** The columns, in order; the last two may be left out. */
const COLUMNS = ["memberId", "name", "phone", "email", "points", "earnedAt"];
/** How often an import held up by its consumers looks at the backlog again (ms). */
const BACKLOG_POLL_MS = 50;

/** The embedded channel adapter's count of messages waiting for a consumer group. */
interface Backlogged {
	backlog?(): Promise<number>;
}

/** How long a batch waits before it is tried again, when an owner could not take it (ms). */
const RETRY_MS = 1000;
/** Thrown out of a job's run when the service stops: the job stays running, to be resumed. */
const STOPPING = new Error("The imports service is stopping");

/** How many refused rows a job's view lists. */
const MAX_REPORTED = 1000;

/** The CSV reading rules, the same when counting and when applying. */
const csvParser = (onSkip: (err: CsvError) => void) =>
	parse({
		info: true,
		relax_column_count: true,
		skip_empty_lines: true,
		skip_records_with_error: true,
		// A stray quote inside a field is data: strictly, the parser loses its place and skips the
		// good rows after it. An unclosed quote still runs to the end of the file: one malformed row.
		relax_quotes: true,
		bom: true,
		on_skip: err => {
			if (err) onSkip(err);
			return undefined;
		}
	});

/** `YYYY-MM-DD`, or an ISO instant with its offset. */
const ISO_DATE = /^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,3})?)?(Z|[+-]\d{2}:\d{2}))?$/;

const reportId = (importId: string, row: number) => `${importId}:${String(row).padStart(10, "0")}`;

const refused = (row: number, code: string, message: string): Refused => ({ row, code, message });

const isRefused = (row: Row | Refused): row is Refused => "code" in row;

const ImportsService: ServiceSchema<Settings, Methods, object, This> = {
	name: "imports",
	mixins: [
		DbMixin("imports"),
		ConfiguredSettings<Settings>(config => ({
			importMaxBytes: config.importMaxBytes,
			spoolDir: path.join(config.dataDir, "imports"),
			batchSize: 500,
			batchTimeoutMs: 120_000,
			maxBacklog: 10_000
		}))
	],

	actions: {
		/**
		 * Takes a CSV body as a stream: spooled, counted, then applied in the background. Answers 202
		 * with the job, which `get` follows.
		 */
		start: {
			rest: "POST /imports",
			summary:
				"Import members and opening balances from a CSV (memberId,name,phone,email,points,earnedAt), streamed: 202 with the job to follow",
			requestType: "text/csv",
			// Receiving and counting a large file takes longer than the broker's request timeout.
			timeout: 600_000,
			params: { $$strict: true },
			async handler(this: This, ctx: Context<object, StreamMeta>) {
				const { importMaxBytes } = this.settings;
				if (!ctx.stream)
					throw clientError(400, "CSV_REQUIRED", "Send the CSV as the request's body");
				if ((ctx.meta.contentLength ?? 0) > importMaxBytes)
					throw this.tooLarge(ctx.meta.contentLength);
				const importId = sortableId();
				fs.mkdirSync(this.settings.spoolDir, { recursive: true });
				const file = path.join(this.settings.spoolDir, `${importId}.csv`);
				try {
					await this.spool(ctx, file);
					const { header, total } = await this.countRows(file);
					const columns = header.map(name => name.trim());
					const expected = COLUMNS.slice(0, columns.length);
					if (
						(columns.length !== 4 && columns.length !== 6) ||
						columns.some((name, i) => name !== expected[i])
					)
						throw clientError(
							422,
							"INVALID_CSV_HEADER",
							`The first line must name the columns ${COLUMNS.join(",")} (the last two may be left out), got '${columns.join(",")}'`,
							{ header: columns }
						);
					const job: ImportJob = {
						_id: importId,
						status: "running",
						total,
						done: 0,
						created: 0,
						skipped: 0,
						failed: 0,
						lastRow: 1,
						columns: columns.length,
						nodeID: this.broker.nodeID,
						file,
						by: actorOf(ctx),
						startedAt: this.now().toISOString()
					};
					await this.store.insertUnique(job);
					this.launch(job);
					ctx.meta.$statusCode = 202;
					// moleculer-web sends `$location` with a 201 or a redirect only. The upload's connection is
					// closed after the answer: a client that reused it after a body of several chunks had it
					// reset by the server (seen with Node 22 and undici), so it opens a fresh one.
					ctx.meta.$responseHeaders = {
						Location: `/api/imports/${importId}`,
						Connection: "close"
					};
					return { importId, status: job.status, total };
				} catch (err) {
					await fs.promises.rm(file, { force: true });
					throw err;
				}
			}
		},

		get: {
			rest: "GET /imports/:importId",
			summary:
				"An import's progress: its status, rows done, created and skipped, and the refused rows with their line and code",
			params: { $$strict: true, importId: P.id },
			async handler(this: This, ctx: Context<{ importId: string }>): Promise<ImportView> {
				const { importId } = ctx.params;
				const job = await this.store.findById(importId);
				if (!job) throw notFound("IMPORT_NOT_FOUND", `No import '${importId}'`, { importId });
				const errors = await this.reports.find({
					query: { _id: { $gt: `${importId}:`, $lt: `${importId};` } },
					sort: ["_id"],
					limit: MAX_REPORTED
				});
				return this.toView(job, errors);
			}
		}
	},

	methods: {
		/**
		 * Writes the body to `file` as it arrives, counting its bytes: past IMPORT_MAX_BYTES it stops
		 * reading and refuses (413), leaving the connection to the gateway to answer on. Only a chunk at
		 * a time is in memory.
		 */
		async spool(this: This, ctx: Context<object, StreamMeta>, file: string) {
			const stream = ctx.stream as Readable;
			const out = fs.createWriteStream(file);
			let bytes = 0;
			try {
				await new Promise<void>((resolve, reject) => {
					const onData = (chunk: Buffer) => {
						bytes += chunk.length;
						if (bytes > this.settings.importMaxBytes) {
							stream.off("data", onData);
							stream.pause();
							reject(this.tooLarge(bytes));
						} else if (!out.write(chunk)) {
							stream.pause();
							out.once("drain", () => stream.resume());
						}
					};
					stream.on("data", onData);
					stream.once("end", resolve);
					stream.once("error", reject);
				});
			} finally {
				await new Promise<void>(resolve => out.end(() => resolve()));
			}
			return bytes;
		},

		/** Runs the job in the background; what it did is in its record either way. */
		launch(this: This, job: ImportJob) {
			this.running.set(
				job._id,
				this.run(job).catch(err =>
					this.logger.error(`Import '${job._id}' could not record its end:`, (err as Error).message)
				)
			);
		},

		/** The header and the number of rows after it (refused ones included). */
		async countRows(this: This, file: string) {
			let skipped = 0;
			let header: string[] | undefined;
			let records = 0;
			for await (const { record } of fs
				.createReadStream(file)
				.pipe(csvParser(() => skipped++)) as AsyncIterable<{ record: string[] }>) {
				header ??= record;
				records++;
			}
			return { header: header ?? [], total: Math.max(0, records - 1) + skipped };
		},

		/**
		 * Applies the file's rows after `job.lastRow`, a batch at a time. Stops between batches when
		 * the service stops: the job stays running, and is resumed at the next start.
		 */
		async run(this: This, job: ImportJob) {
			const skips: Refused[] = [];
			const parser = csvParser(err => {
				const row = (err as CsvError & { lines: number }).lines;
				if (row > job.lastRow)
					skips.push(refused(row, "MALFORMED_ROW", `Not a CSV row: ${err.message}`));
			});
			const input = fs.createReadStream(job.file);
			try {
				let batch: (Row | Refused)[] = [];
				/** The refused rows read so far up to `row`, in line order, before it. */
				const skipsThrough = (row: number) => {
					const before = skips.filter(s => s.row <= row);
					skips.splice(0, skips.length, ...skips.filter(s => s.row > row));
					return before;
				};
				for await (const { record, info } of input.pipe(parser) as AsyncIterable<{
					record: string[];
					info: Info;
				}>) {
					const row = info.lines;
					if (row <= job.lastRow) continue;
					batch.push(...skipsThrough(row), this.readRow(job, record, row));
					if (batch.length >= this.settings.batchSize) {
						await this.applyRetrying(job, batch);
						batch = [];
						await this.untilConsumersKeepUp();
						if (this.stopping) return;
					}
				}
				await this.applyRetrying(job, [...batch, ...skipsThrough(Infinity)]);
				await this.finish(job, "completed");
			} catch (err) {
				if (err === STOPPING) return;
				this.logger.error(`Import '${job._id}' failed:`, (err as Error).message);
				await this.finish(job, "failed", (err as Error).message);
			} finally {
				input.destroy();
				this.running.delete(job._id);
			}
		},

		/**
		 * Applies a batch until it is applied: an owner that is down or restarting holds the import up,
		 * it does not fail it (the batch runs again, idempotently). Gives up only when this service stops.
		 */
		async applyRetrying(this: This, job: ImportJob, batch: (Row | Refused)[]) {
			for (;;) {
				if (this.stopping) throw STOPPING;
				try {
					return await this.applyBatch(job, batch);
				} catch (err) {
					if (this.stopping) throw STOPPING;
					this.logger.warn(
						`Import '${job._id}' waits to apply rows after line ${job.lastRow}:`,
						(err as Error).message
					);
					await new Promise(resolve => setTimeout(resolve, RETRY_MS));
				}
			}
		},

		/**
		 * Waits while the embedded channel store holds more than `maxBacklog` messages (on NATS the
		 * backlog is JetStream's, on its disk: no wait). Measured at a million rows, the import ran ten
		 * times faster than the dashboard's consumer and the node's memory grew with the difference.
		 */
		async untilConsumersKeepUp(this: This) {
			const channels = (this.broker as ServiceBroker & { channelAdapter?: Backlogged })
				.channelAdapter;
			if (!channels?.backlog) return;
			while (!this.stopping && (await channels.backlog()) > this.settings.maxBacklog)
				await new Promise(resolve => setTimeout(resolve, BACKLOG_POLL_MS));
		},

		/** One row of the file as the owners take it, or why it is refused. */
		readRow(this: This, job: ImportJob, record: string[], row: number): Row | Refused {
			if (record.length !== job.columns)
				return refused(
					row,
					"INVALID_ROW",
					`The row has ${record.length} columns; the header names ${job.columns}`
				);
			const [memberId, name, phone, email, points = "", earnedAt = ""] = record.map(cell =>
				cell.trim()
			);
			const parsed: Row = {
				row,
				memberId,
				name,
				...(phone ? { phone } : {}),
				...(email ? { email } : {})
			};
			if (points !== "" && (!/^\d{1,10}$/.test(points) || Number(points) > P.MAX_POINTS))
				return refused(
					row,
					"INVALID_POINTS",
					`'points' must be a whole number from 0 to ${P.MAX_POINTS}, got '${points}'`
				);
			const now = this.now();
			const earned = earnedAt === "" ? now : new Date(earnedAt);
			if (
				earnedAt !== "" &&
				(!ISO_DATE.test(earnedAt) || Number.isNaN(earned.getTime()) || earned > now)
			)
				return refused(
					row,
					"INVALID_EARNED_AT",
					`'earnedAt' must be a date (YYYY-MM-DD, or an ISO instant) not in the future, got '${earnedAt}'`
				);
			// No points, or 0: the member without an opening balance.
			return Number(points) > 0
				? { ...parsed, points: Number(points), month: monthOf(earned.toISOString()) }
				: parsed;
		},

		/**
		 * Applies a batch: the members by `members.importBatch`, then the opening balances of those
		 * that are active by `points.open`; then the row reports and the job's counts in one write.
		 */
		async applyBatch(this: This, job: ImportJob, batch: (Row | Refused)[]) {
			if (!batch.length) return;
			const reports = batch.filter(isRefused);
			const rows = batch.filter((row): row is Row => !isRefused(row));
			const opts = { timeout: this.settings.batchTimeoutMs };
			const members = rows.length
				? await this.broker.call<ImportedOutcome[], { rows: ImportedMember[] }>(
						"members.importBatch",
						{ rows: rows.map(({ points: _p, month: _m, ...member }) => member) },
						opts
					)
				: [];
			const created = new Set<number>();
			const openings: { row: Row; memberId: string; points: number; month: string }[] = [];
			members.forEach((member, i) => {
				const row = rows[i];
				if (member.outcome === "invalid")
					reports.push(refused(row.row, member.code, member.message));
				else {
					if (member.outcome === "created") created.add(row.row);
					if (row.points && member.status !== "active" && member.outcome === "exists")
						reports.push(
							refused(
								row.row,
								"MEMBER_WITHDRAWN",
								`Member '${row.memberId}' has withdrawn: no opening balance`
							)
						);
					else if (row.points)
						openings.push({
							row,
							memberId: row.memberId,
							points: row.points,
							month: row.month as string
						});
				}
			});
			const opened = openings.length
				? await this.broker.call<OpeningResult[], object>(
						"points.open",
						{ openings: openings.map(({ row: _row, ...opening }) => opening) },
						opts
					)
				: [];
			opened.forEach((result, i) => {
				const { row } = openings[i];
				if (result.outcome === "created") created.add(row.row);
				else if (result.outcome === "withdrawn") {
					created.delete(row.row);
					reports.push(
						refused(
							row.row,
							"MEMBER_WITHDRAWN",
							`Member '${row.memberId}' has withdrawn: no opening balance`
						)
					);
				}
			});
			for (const report of reports)
				await this.reports.insertUnique({ _id: reportId(job._id, report.row), ...report });
			const failed = new Set(reports.map(r => r.row)).size;
			job.done += batch.length;
			job.failed += failed;
			job.created += created.size;
			job.skipped += batch.length - failed - created.size;
			job.lastRow = Math.max(job.lastRow, ...batch.map(row => row.row));
			const { done, failed: f, created: c, skipped, lastRow } = job;
			await this.store.update(
				{ _id: job._id, status: "running" },
				{ $set: { done, failed: f, created: c, skipped, lastRow } }
			);
		},

		async finish(this: This, job: ImportJob, status: ImportJob["status"], reason?: string) {
			job.status = status;
			job.finishedAt = this.now().toISOString();
			await this.store.update(
				{ _id: job._id },
				{ $set: { status, finishedAt: job.finishedAt, ...(reason ? { reason } : {}) } }
			);
			await fs.promises.rm(job.file, { force: true });
			this.logger.info(
				`Import '${job._id}' ${status}: ${job.done} of ${job.total} rows, ${job.created} created, ${job.skipped} skipped, ${job.failed} refused.`
			);
		},

		toView(job: ImportJob, errors: RowReport[]): ImportView {
			const { _id, status, total, done, created, skipped, failed, startedAt, finishedAt, reason } =
				job;
			return {
				importId: _id,
				status,
				total,
				done,
				created,
				skipped,
				failed,
				errors: errors.map(({ row, code, message }) => ({ row, code, message })),
				startedAt,
				...(finishedAt ? { finishedAt } : {}),
				...(reason ? { reason } : {})
			};
		},

		/** 413: the body is over IMPORT_MAX_BYTES. */
		tooLarge(this: This, bytes?: number) {
			return clientError(
				413,
				"IMPORT_TOO_LARGE",
				`The CSV is over IMPORT_MAX_BYTES (${this.settings.importMaxBytes} bytes)`,
				{ limit: this.settings.importMaxBytes, ...(bytes ? { bytes } : {}) }
			);
		},

		now: () => new Date()
	},

	created(this: This) {
		this.running = new Map();
		this.reports = openCollection<RowReport>(this, "import-rows");
	},

	async started(this: This) {
		this.stopping = false;
		await this.reports.connect(this.logger);
		// This node's jobs that a stop or a crash interrupted: resumed where they were, or failed
		// (with what they had done) when their file is gone.
		const interrupted = await this.store.find({
			query: { status: "running", nodeID: this.broker.nodeID }
		});
		for (const job of interrupted) {
			if (!fs.existsSync(job.file)) {
				await this.finish(
					job,
					"failed",
					"The spooled file is gone: the rows after lastRow were not applied"
				);
				continue;
			}
			this.logger.info(`Resuming import '${job._id}' after line ${job.lastRow}.`);
			this.launch(job);
		}
	},

	async stopped(this: This) {
		this.stopping = true;
		await Promise.all(this.running.values());
		await this.reports.disconnect();
	}
};

export default ImportsService;
