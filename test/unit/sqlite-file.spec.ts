/**
 * The embedded store's file (lib/store/sqlite.ts, lib/store/sqlite-collection.ts): what survives a
 * restart, that a write is answered only once its transaction has committed (another connection to
 * the file sees it then, and not before), that a write failing in a group leaves the others of the
 * group, and that a data folder of NeDB files is imported once.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import type { Service, ServiceSchema } from "moleculer";
import { loadConfig } from "../../config";
import { Collection, DbMixin, type DbThis } from "../../mixins/db.mixin";
import { createTestBroker } from "../helpers/broker";

interface Doc {
	_id: string;
	n?: number;
	memberId?: string;
	at?: unknown;
}

const row = (doc: object) => `${JSON.stringify(doc)}\n`;

describe("the embedded store's file", () => {
	let dir: string;
	const env = () => ({ DATA_DIR: dir });
	const brokers: ReturnType<typeof createTestBroker>[] = [];
	const service = (name: string): ServiceSchema => ({
		name,
		mixins: [DbMixin(name, [{ fields: { memberId: 1 } }])]
	});
	/** A broker of one service whose main store is the collection `name`, started. */
	const start = async (name: string) => {
		const broker = createTestBroker([service(name)], env());
		brokers.push(broker);
		await broker.start();
		return (broker.getLocalService(name) as Service & DbThis<Doc>).store;
	};
	/** Another connection to the node's file, as another process would have. */
	const peek = (table: string) => {
		const db = new DatabaseSync(path.join(dir, "onepoint.sqlite"));
		try {
			return (db.prepare(`SELECT _id FROM "${table}" ORDER BY _id`).all() as { _id: string }[]).map(
				r => r._id
			);
		} finally {
			db.close();
		}
	};

	beforeEach(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), "sqlite-file-"))));
	afterEach(async () => {
		await Promise.all(brokers.splice(0).map(b => b.stop()));
		fs.rmSync(dir, { recursive: true, force: true });
	});

	it("keeps what was answered across a restart: inserts, updates and removals", async () => {
		const first = await start("accounts");
		await first.insertUnique({ _id: "a", n: 1 });
		await first.insertUnique({ _id: "b", n: 1 });
		await first.insertUnique({ _id: "gone", n: 1 });
		await first.update({ _id: "a" }, { $inc: { n: 1 } });
		await first.remove({ _id: "gone" });
		await brokers.pop()?.stop();

		const second = await start("accounts");
		expect(await second.find({ query: {}, sort: ["_id"] })).toEqual([
			{ _id: "a", n: 2 },
			{ _id: "b", n: 1 }
		]);
	});

	it("answers a write once its transaction has committed: another connection sees it then, not before", async () => {
		const deals = await start("deals");
		await deals.insertUnique({ _id: "first" });
		let answered = false;
		const written = deals.insertUnique({ _id: "w1" }).then(ok => (answered = ok));
		// Made in this turn, in the transaction still open: the store's own reads see it, no other connection does.
		expect(await deals.findById("w1")).toEqual({ _id: "w1" });
		expect(answered).toBe(false);
		expect(peek("deals")).toEqual(["first"]);
		await written;
		expect(answered).toBe(true);
		expect(peek("deals")).toEqual(["first", "w1"]);
	});

	it("undoes a write that fails in a group, and only it", async () => {
		const members = await start("members");
		await members.insertUnique({ _id: "m0", n: 0 });
		const group = await Promise.allSettled([
			members.insertUnique({ _id: "m1", n: 1 }),
			members.update({ _id: "m0" }, { $set: { n: 1 } }),
			members.update({ _id: "m0" }, { $bad: { n: 2 } }),
			members.insertUnique({ _id: "m1", n: 9 }),
			members.insertUnique({ _id: "m2", n: 2 })
		]);
		expect(group.map(r => (r.status === "fulfilled" ? r.value : "rejected"))).toEqual([
			true,
			1,
			"rejected",
			false,
			true
		]);
		expect(peek("members")).toEqual(["m0", "m1", "m2"]);
		expect(await members.find({ query: {}, sort: ["_id"] })).toEqual([
			{ _id: "m0", n: 1 },
			{ _id: "m1", n: 1 },
			{ _id: "m2", n: 2 }
		]);
	});

	it("imports a collection's NeDB file once, at the first start, and keeps it as `.migrated`", async () => {
		const file = path.join(dir, "entries.db");
		fs.writeFileSync(
			file,
			row({ _id: "a", n: 1, memberId: "m1" }) +
				row({ $$indexCreated: { fieldName: "memberId" } }) +
				row({ _id: "b", n: 1, memberId: "m2", at: { $$date: Date.UTC(2026, 0, 2) } }) +
				row({ _id: "a", n: 2, memberId: "m1" }) +
				row({ _id: "gone", n: 1, memberId: "m1" }) +
				row({ _id: "gone", $$deleted: true }) +
				row({ _id: "a", n: 3, memberId: "m1" }) +
				// The write the process died in: never answered.
				'{"_id":"c","n'
		);
		const expected = [
			{ _id: "a", n: 3, memberId: "m1" },
			{ _id: "b", n: 1, memberId: "m2", at: "2026-01-02T00:00:00.000Z" }
		];
		const first = await start("entries");
		expect(await first.find({ query: {}, sort: ["_id"] })).toEqual(expected);
		expect(await first.find({ query: { memberId: "m1" } })).toEqual([expected[0]]);
		expect(fs.existsSync(file)).toBe(false);
		expect(fs.existsSync(`${file}.migrated`)).toBe(true);
		await first.insertUnique({ _id: "d", n: 1 });
		await brokers.pop()?.stop();

		const second = await start("entries");
		expect(await second.count({})).toBe(3);
		expect(await second.find({ query: {}, sort: ["_id"] })).toEqual([
			...expected,
			{ _id: "d", n: 1 }
		]);
	});

	it("refuses a NeDB file with a line it cannot read before its end, and leaves the file", async () => {
		const file = path.join(dir, "ledger.db");
		fs.writeFileSync(file, row({ _id: "a" }) + "not json\n" + row({ _id: "b" }));
		const ledger = new Collection<Doc>("ledger", [], loadConfig({ ...process.env, ...env() }));
		await expect(ledger.adapter.connect()).rejects.toThrow(
			/ledger\.db, line 2: not a JSON document/
		);
		expect(fs.existsSync(file)).toBe(true);
		const db = new DatabaseSync(path.join(dir, "onepoint.sqlite"));
		expect(db.prepare("SELECT name FROM sqlite_master WHERE name = 'ledger'").all()).toEqual([]);
		db.close();
	});
});
