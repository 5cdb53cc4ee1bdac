/**
 * The embedded store's file (lib/store/nedb.ts): what a load reads back, and when it rewrites the
 * file. A file less than two thirds superseded is kept as it is (no rewrite of a large ledger at
 * every start); one more superseded, or ending in a torn line, is rewritten, at load and, once
 * long, while running; every acknowledged write survives.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type Datastore from "@seald-io/nedb";
import { closeDatastore, openDatastore } from "../../lib/store/nedb";

interface Doc {
	_id: string;
	n?: number;
	memberId?: string;
	at?: unknown;
}

const lines = (file: string) => fs.readFileSync(file, "utf8").split("\n").filter(Boolean);
const row = (doc: object) => `${JSON.stringify(doc)}\n`;

describe("the embedded store's file", () => {
	let dir: string;
	const opened: Datastore<Doc>[] = [];
	const load = async (file: string) => {
		const db = openDatastore<Doc>(file);
		opened.push(db);
		await db.loadDatabaseAsync();
		return db;
	};
	const all = async (db: Datastore<Doc>) => (await db.findAsync({}).sort({ _id: 1 })) as Doc[];

	beforeEach(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), "nedb-file-"))));
	afterEach(() => {
		opened.splice(0).forEach(db => closeDatastore(db));
		fs.rmSync(dir, { recursive: true, force: true });
	});

	it("keeps a file less than two thirds superseded as it is (each document written, then updated once), and appends to it", async () => {
		const file = path.join(dir, "deals.db");
		fs.writeFileSync(
			file,
			row({ _id: "a", n: 1 }) +
				row({ _id: "b", n: 0 }) +
				row({ _id: "a", n: 2 }) +
				row({ _id: "b", n: 1 })
		);
		const inode = fs.statSync(file).ino;
		const db = await load(file);
		expect(await all(db)).toEqual([
			{ _id: "a", n: 2 },
			{ _id: "b", n: 1 }
		]);
		expect(fs.statSync(file).ino).toBe(inode);
		expect(lines(file)).toHaveLength(4);

		await db.insertAsync({ _id: "c", n: 1 });
		await db.updateAsync({ _id: "b" }, { $set: { n: 5 } });
		closeDatastore(db);
		expect(await all(await load(file))).toEqual([
			{ _id: "a", n: 2 },
			{ _id: "b", n: 5 },
			{ _id: "c", n: 1 }
		]);
	});

	it("rewrites a file at least two thirds superseded, with the same documents", async () => {
		const file = path.join(dir, "accounts.db");
		const updates = [1, 2, 3, 4].map(n => row({ _id: "a", n })).join("");
		fs.writeFileSync(
			file,
			updates +
				row({ _id: "b", n: 1 }) +
				row({ _id: "gone" }) +
				row({ _id: "gone", $$deleted: true })
		);
		const db = await load(file);
		expect(await all(db)).toEqual([
			{ _id: "a", n: 4 },
			{ _id: "b", n: 1 }
		]);
		expect(lines(file).map(line => JSON.parse(line) as Doc)).toEqual([
			{ _id: "a", n: 4 },
			{ _id: "b", n: 1 }
		]);
	});

	it("rewrites a file ending in a torn line, so that the next write starts a line of its own", async () => {
		const file = path.join(dir, "deals.db");
		fs.writeFileSync(
			file,
			row({ _id: "a", n: 1 }) + row({ _id: "b", n: 1 }) + row({ _id: "c", n: 1 }) + '{"_id":"d","n'
		);
		const db = await load(file);
		expect((await all(db)).map(d => d._id)).toEqual(["a", "b", "c"]);
		await db.insertAsync({ _id: "e", n: 1 });
		closeDatastore(db);
		expect((await all(await load(file))).map(d => d._id)).toEqual(["a", "b", "c", "e"]);
	});

	it("rewrites a file while running once it is long and mostly superseded, never an append-only one", async () => {
		const accounts = path.join(dir, "accounts.db");
		const db = await load(accounts);
		await db.insertAsync({ _id: "a", n: 0 });
		for (let n = 1; n <= 12_000; n++) await db.updateAsync({ _id: "a" }, { $set: { n } });
		// The rewrite is queued behind the write that found it due; a read waits its turn.
		expect(await all(db)).toEqual([{ _id: "a", n: 12_000 }]);
		expect(lines(accounts).length).toBeLessThan(10_000);
		closeDatastore(db);
		expect(await all(await load(accounts))).toEqual([{ _id: "a", n: 12_000 }]);

		const ledger = path.join(dir, "ledger.db");
		const entries = await load(ledger);
		const inode = fs.statSync(ledger).ino;
		for (let n = 0; n < 12_000; n++) await entries.insertAsync({ _id: `e${n}`, n });
		expect(await entries.countAsync({})).toBe(12_000);
		expect(lines(ledger)).toHaveLength(12_000);
		expect(fs.statSync(ledger).ino).toBe(inode);
	});

	it("refuses a file of which more than a tenth is corrupt", async () => {
		const file = path.join(dir, "members.db");
		fs.writeFileSync(file, row({ _id: "a" }) + "not json\n" + row({ _id: "b" }) + "{also not\n");
		await expect(load(file)).rejects.toThrow(/50% of the data file is corrupt/);
	});

	it("reads NeDB's own forms: dates, removed documents, declared and removed indexes", async () => {
		const file = path.join(dir, "entries.db");
		fs.writeFileSync(
			file,
			row({ _id: "a", memberId: "m1", at: { $$date: Date.UTC(2026, 0, 2) } }) +
				row({ _id: "b", memberId: "m2" }) +
				row({ _id: "b", $$deleted: true }) +
				row({ $$indexCreated: { fieldName: "memberId", unique: true } }) +
				row({ $$indexCreated: { fieldName: "at" } }) +
				row({ $$indexRemoved: "at" })
		);
		const db = await load(file);
		expect(await all(db)).toEqual([
			{ _id: "a", memberId: "m1", at: new Date(Date.UTC(2026, 0, 2)) }
		]);
		// NeDB does not type its indexes.
		expect(Object.keys((db as unknown as { indexes: object }).indexes).sort()).toEqual([
			"_id",
			"memberId"
		]);
		await expect(db.insertAsync({ _id: "c", memberId: "m1" })).rejects.toMatchObject({
			errorType: "uniqueViolated"
		});
	});
});
