/**
 * The store's contract, on whichever store the project runs (SQLite, or MongoDB through mongoose):
 * every filter field counts, documents come back as plain objects, unique indexes hold, a new id
 * never lands on a taken one, and one collection closing leaves the others of the process working.
 */
import { ServiceBroker } from "moleculer";
import { openCollection, type Collection } from "../../mixins/db.mixin";

interface Doc {
	_id: string;
	orderId?: string;
	status?: string;
	balance?: number;
	version?: number;
	pending?: { cause: string }[];
	at?: string;
}

describe("the store", () => {
	const broker = new ServiceBroker({ logger: false });
	const owner = { broker, logger: broker.getLogger("store-test") };
	const opened: Collection<Doc>[] = [];
	const open = async (name: string, indexes: Parameters<typeof openCollection>[2] = []) => {
		const collection = openCollection<Doc>(owner, name, indexes);
		await collection.connect(owner.logger);
		opened.push(collection);
		return collection;
	};
	afterAll(() => Promise.all(opened.map(c => c.disconnect())));

	it("applies a conditional update only where every field of the condition matches", async () => {
		const accounts = await open("accounts-condition");
		await accounts.insertUnique({ _id: "a1", balance: 100, version: 1 });
		await accounts.insertUnique({
			_id: "a2",
			balance: 100,
			version: 1,
			pending: [{ cause: "deal:1" }]
		});
		expect(
			await accounts.update({ _id: "a1", version: 2 }, { $inc: { balance: -100, version: 1 } })
		).toBe(0);
		expect(
			await accounts.update({ _id: "a1", balance: { $gte: 150 } }, { $inc: { balance: -150 } })
		).toBe(0);
		expect(await accounts.findById("a1")).toEqual({ _id: "a1", balance: 100, version: 1 });
		expect(
			await accounts.update({ _id: "a1", version: 1 }, { $inc: { balance: -100, version: 1 } })
		).toBe(1);
		expect(
			(await accounts.find({ query: { "pending.0": { $exists: true } } })).map(d => d._id)
		).toEqual(["a2"]);
		expect(await accounts.count({ balance: 0 })).toBe(1);
	});

	it("answers plain objects, sorted, paged and filtered", async () => {
		const rows = await open("rows-plain");
		for (const [i, at] of ["2026-01-03", "2026-01-01", "2026-02-01", "2026-01-02"].entries())
			await rows.insertUnique({ _id: `r${i}`, at, balance: i });
		const page = await rows.page({ at: { $gte: "2026-01-01", $lt: "2026-02-01" } }, ["-at"], 1, 2);
		expect(page).toEqual({
			rows: [
				{ _id: "r0", at: "2026-01-03", balance: 0 },
				{ _id: "r3", at: "2026-01-02", balance: 3 }
			],
			total: 3,
			page: 1,
			pageSize: 2
		});
		const [row] = await rows.find({ query: { _id: "r2" } });
		expect(Object.getPrototypeOf(row)).toBe(Object.prototype);
		expect(JSON.parse(JSON.stringify(row))).toEqual(row);
	});

	it("holds the unique indexes it declares, without relying on a background build", async () => {
		const payments = await open("payments-unique", [{ fields: { orderId: 1 }, unique: true }]);
		expect(await payments.insertUnique({ _id: "p1", orderId: "o1" })).toBe(true);
		expect(await payments.insertUnique({ _id: "p2", orderId: "o1" })).toBe(false);
		expect(await payments.insertUnique({ _id: "p1", orderId: "o2" })).toBe(false);
		expect(await payments.find({ query: {} })).toEqual([{ _id: "p1", orderId: "o1" }]);
	});

	it("removes exactly the documents its filter matches, and says how many", async () => {
		const keys = await open("keys-remove", [{ fields: { balance: 1 } }]);
		for (const [i, balance] of [5, 10, 15].entries())
			await keys.insertUnique({ _id: `k${i}`, balance });
		expect(await keys.remove({ balance: { $lte: 10 } })).toBe(2);
		expect(await keys.remove({ balance: { $lte: 10 } })).toBe(0);
		expect(await keys.find({ query: {} })).toEqual([{ _id: "k2", balance: 15 }]);
	});

	it("finds an updated document under its indexed fields' new values only, and a unique clash on update changes nothing", async () => {
		const orders = await open("orders-reindexed", [
			{ fields: { status: 1 } },
			{ fields: { orderId: 1 }, unique: true }
		]);
		await orders.insertUnique({ _id: "o1", orderId: "x1", status: "pending", balance: 1 });
		await orders.insertUnique({ _id: "o2", orderId: "x2", status: "pending", balance: 2 });
		expect(
			await orders.update({ _id: "o1", status: "pending" }, { $set: { status: "settled" } })
		).toBe(1);
		expect(await orders.update({ _id: "o1" }, { $inc: { balance: 10 } })).toBe(1);
		expect(await orders.find({ query: { status: "pending" } })).toEqual([
			{ _id: "o2", orderId: "x2", status: "pending", balance: 2 }
		]);
		expect(await orders.find({ query: { status: "settled" } })).toEqual([
			{ _id: "o1", orderId: "x1", status: "settled", balance: 11 }
		]);
		await expect(
			orders.update({ _id: "o2" }, { $set: { orderId: "x1", status: "settled" } })
		).rejects.toThrow();
		expect(await orders.findById("o2")).toEqual({
			_id: "o2",
			orderId: "x2",
			status: "pending",
			balance: 2
		});
		expect((await orders.find({ query: { orderId: "x2" } })).map(d => d._id)).toEqual(["o2"]);
		expect((await orders.find({ query: { status: "settled" } })).map(d => d._id)).toEqual(["o1"]);
	});

	it("matches and sorts as MongoDB does: null and missing, numbers apart from strings and booleans, arrays", async () => {
		const mixed = await open("mixed-types", [{ fields: { status: 1 } }, { fields: { n: 1 } }]);
		for (const doc of [
			{ _id: "s1", status: "a", n: 1, flag: true },
			{ _id: "s2", status: "b", n: "1", flag: false },
			{ _id: "s3", status: null, n: 2 },
			{ _id: "s4", n: true },
			{ _id: "s5", status: "a", n: 1.5, tags: ["x", "y"] }
		])
			await mixed.insertUnique(doc as unknown as Doc);
		const ids = async (query: Record<string, unknown>, sort = ["_id"], limit = 0, offset = 0) =>
			(await mixed.find({ query, sort, limit, offset })).map(d => d._id);
		expect(await ids({ status: null })).toEqual(["s3", "s4"]);
		expect(await ids({ n: 1 })).toEqual(["s1"]);
		expect(await ids({ n: { $gte: 1 } })).toEqual(["s1", "s3", "s5"]);
		expect(await mixed.count({ n: { $gte: 1 } })).toBe(3);
		expect(await ids({ n: { $lt: "2" } })).toEqual(["s2"]);
		expect(await ids({ flag: true })).toEqual(["s1"]);
		expect(await ids({ status: { $in: ["a", "b"] } })).toEqual(["s1", "s2", "s5"]);
		expect(await ids({ status: { $ne: "a" } })).toEqual(["s2", "s3", "s4"]);
		expect(await ids({ status: { $nin: ["a"] } })).toEqual(["s2", "s3", "s4"]);
		expect(await ids({ $or: [{ status: "b" }, { n: 2 }] })).toEqual(["s2", "s3"]);
		expect(await ids({ tags: "x" })).toEqual(["s5"]);
		expect(await ids({ status: { $exists: false } })).toEqual(["s4"]);
		expect(await ids({}, ["-status", "_id"])).toEqual(["s2", "s1", "s5", "s3", "s4"]);
		// Numbers, then strings, then booleans.
		expect(await ids({}, ["n"])).toEqual(["s1", "s5", "s3", "s2", "s4"]);
		expect(await ids({}, ["n"], 2, 1)).toEqual(["s5", "s3"]);
		expect(await mixed.update({ status: null }, { $set: { status: "c" } })).toBe(2);
		expect(await ids({ status: "c" })).toEqual(["s3", "s4"]);
	});

	it("keeps every acknowledged write across reopening, also writes made after a reopening", async () => {
		const first = await open("ledger-reopened");
		await first.insertUnique({ _id: "e1", balance: 1 });
		await first.update({ _id: "e1" }, { $inc: { balance: 1 } });
		await first.disconnect();
		const second = await open("ledger-reopened");
		await second.insertUnique({ _id: "e2", balance: 5 });
		await second.update({ _id: "e1" }, { $inc: { balance: 1 } });
		await second.disconnect();
		const third = await open("ledger-reopened");
		expect(await third.find({ query: {}, sort: ["_id"] })).toEqual([
			{ _id: "e1", balance: 3 },
			{ _id: "e2", balance: 5 }
		]);
	});

	it("keeps serving a collection when another one of the process disconnects", async () => {
		const kept = await open("kept");
		const closed = openCollection<Doc>(owner, "closed");
		await closed.connect(owner.logger);
		await closed.disconnect();
		await kept.insertUnique({ _id: "k1" });
		expect(await kept.findById("k1")).toEqual({ _id: "k1" });
	});
});
