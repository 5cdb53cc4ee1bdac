/**
 * The MongoDB stand-in (test/mongo) as the services meet it: over TCP, through the real `mongodb`
 * driver and through mongoose. Each test works in a database of its own.
 */
import net from "node:net";
import { deserialize, serialize } from "bson";
import {
	Long,
	MongoBulkWriteError,
	MongoClient,
	MongoServerError,
	ObjectId,
	type Document
} from "mongodb";
import mongoose from "mongoose";
import { MongoStandIn } from "../mongo/wire-server";

let standIn: MongoStandIn;
let client: MongoClient;
let databases = 0;
const freshDb = () => client.db(`standin-${++databases}`);
/** Documents of any shape with an `_id` of their own (the driver's default types expect an ObjectId). */
type Row = { _id: string | number | ObjectId; [field: string]: any };

beforeAll(async () => {
	standIn = await MongoStandIn.start(0);
	client = await new MongoClient(standIn.uri("admin")).connect();
});

afterAll(async () => {
	await client?.close();
	await standIn?.stop();
});

/** The code of the MongoDB error a promise is rejected with. */
async function codeOf(promise: Promise<unknown>): Promise<unknown> {
	try {
		await promise;
	} catch (err) {
		expect(err).toBeInstanceOf(MongoServerError);
		return (err as MongoServerError).code;
	}
	throw new Error("expected a MongoDB error");
}

describe("the wire protocol", () => {
	const header = (length: number, requestId: number, opCode: number) => {
		const buffer = Buffer.alloc(16);
		buffer.writeInt32LE(length, 0);
		buffer.writeInt32LE(requestId, 4);
		buffer.writeInt32LE(opCode, 12);
		return buffer;
	};
	const opQuery = (requestId: number, ns: string, query: Document) => {
		const name = Buffer.from(`${ns}\0`);
		const doc = serialize(query);
		const skipAndReturn = Buffer.alloc(8);
		skipAndReturn.writeInt32LE(-1, 4);
		return Buffer.concat([
			header(16 + 4 + name.length + 8 + doc.length, requestId, 2004),
			Buffer.alloc(4),
			name,
			skipAndReturn,
			doc
		]);
	};
	const opMsg = (
		requestId: number,
		body: Document,
		sequence?: { field: string; docs: Document[] }
	) => {
		const sections = [Buffer.from([0]), serialize(body)];
		if (sequence) {
			const docs = sequence.docs.map(doc => serialize(doc));
			const field = Buffer.from(`${sequence.field}\0`);
			const size = Buffer.alloc(4);
			size.writeInt32LE(4 + field.length + docs.reduce((sum, doc) => sum + doc.length, 0), 0);
			sections.push(Buffer.from([1]), size, field, ...docs);
		}
		const length = 16 + 4 + sections.reduce((sum, part) => sum + part.length, 0);
		return Buffer.concat([header(length, requestId, 2013), Buffer.alloc(4), ...sections]);
	};

	/** A raw connection that collects replies as { responseTo, opCode, body }. */
	async function rawConnection() {
		const socket = net.connect(standIn.port, "127.0.0.1");
		await new Promise(resolve => socket.once("connect", resolve));
		let pending = Buffer.alloc(0);
		const replies: { responseTo: number; opCode: number; body: Document }[] = [];
		socket.on("data", chunk => {
			pending = Buffer.concat([pending, chunk]);
			while (pending.length >= 4 && pending.length >= pending.readInt32LE(0)) {
				const message = pending.subarray(0, pending.readInt32LE(0));
				pending = pending.subarray(message.length);
				const opCode = message.readInt32LE(12);
				// OP_REPLY's document follows 20 bytes of its own fields; OP_MSG's follows flagBits and a section kind.
				replies.push({
					responseTo: message.readInt32LE(8),
					opCode,
					body: deserialize(message.subarray(opCode === 1 ? 36 : 21))
				});
			}
		});
		const received = async (count: number) => {
			for (
				const deadline = Date.now() + 5000;
				replies.length < count;
				await new Promise(resolve => setTimeout(resolve, 5))
			) {
				if (Date.now() > deadline)
					throw new Error(`${replies.length} of ${count} replies after 5 s`);
			}
			return replies.splice(0, count);
		};
		return { socket, received };
	}

	it("answers the legacy handshake with OP_REPLY and refuses other OP_QUERY commands", async () => {
		const { socket, received } = await rawConnection();
		socket.write(opQuery(1, "admin.$cmd", { isMaster: 1, helloOk: true }));
		socket.write(opQuery(2, "test.$cmd", { find: "things" }));
		const [hello, find] = await received(2);
		expect(hello).toMatchObject({
			responseTo: 1,
			opCode: 1,
			body: {
				ismaster: true,
				isWritablePrimary: true,
				maxWireVersion: 17,
				minWireVersion: 0,
				ok: 1
			}
		});
		expect(hello.body.compression).toBeUndefined();
		expect(find).toMatchObject({ responseTo: 2, opCode: 1, body: { ok: 0, code: 352 } });
		socket.destroy();
	});

	it("reads several messages from one chunk, one message from many, and document sequences", async () => {
		const { socket, received } = await rawConnection();
		socket.write(
			Buffer.concat([
				opMsg(10, { ping: 1, $db: "admin" }),
				opMsg(11, { buildInfo: 1, $db: "admin" })
			])
		);
		expect(await received(2)).toMatchObject([
			{ responseTo: 10, opCode: 2013, body: { ok: 1 } },
			{ responseTo: 11, opCode: 2013, body: { version: "6.0.0-standin", ok: 1 } }
		]);

		const insert = opMsg(
			12,
			{ insert: "things", $db: "wire-seq" },
			{ field: "documents", docs: [{ _id: 1 }, { _id: 2 }] }
		);
		for (let at = 0; at < insert.length; at += 7) {
			socket.write(insert.subarray(at, at + 7));
			await new Promise(resolve => setImmediate(resolve));
		}
		expect(await received(1)).toMatchObject([{ responseTo: 12, body: { n: 2, ok: 1 } }]);
		expect(await client.db("wire-seq").collection<Row>("things").countDocuments()).toBe(2);
		socket.destroy();
	});

	it("answers the driver's handshake as a standalone 6.0 server and refuses unknown commands", async () => {
		const admin = client.db("admin");
		expect(await admin.command({ hello: 1 })).toMatchObject({
			isWritablePrimary: true,
			maxWireVersion: 17,
			maxBsonObjectSize: 16 * 1024 * 1024,
			ok: 1
		});
		expect(await admin.command({ buildInfo: 1 })).toMatchObject({ version: "6.0.0-standin" });
		expect(await codeOf(admin.command({ noSuchCommand: 1 }))).toBe(59);
	});
});

describe("through the driver", () => {
	it("stores documents with their BSON types and hands out copies", async () => {
		const db = freshDb();
		const things = db.collection("things");
		const at = new Date("2024-05-01T10:00:00.000Z");
		const ref = new ObjectId();
		const big = Long.fromString("9007199254740993");
		const { insertedId } = await things.insertOne({
			at,
			ref,
			big,
			nested: { list: [1, "two", { three: 3 }] }
		});
		expect(insertedId).toBeInstanceOf(ObjectId);

		const found = await things.findOne({ _id: insertedId });
		expect(found?.at).toEqual(at);
		expect(found?.ref.equals(ref)).toBe(true);
		expect(Long.isLong(found?.big) && found?.big.toString()).toBe("9007199254740993");
		expect(found?.nested).toEqual({ list: [1, "two", { three: 3 }] });
		expect(await things.findOne({ at, ref })).not.toBeNull();

		// A cursor's later batches show the documents as they were when it was opened.
		await db
			.collection<Row>("things")
			.insertMany(Array.from({ length: 5 }, (_, i) => ({ _id: i, n: i })));
		const cursor = things.find({ n: { $exists: true } }, { batchSize: 2 });
		expect(await cursor.next()).toEqual({ _id: 0, n: 0 });
		await things.updateMany({}, { $set: { n: -1 } });
		expect((await cursor.toArray()).map(d => d.n)).toEqual([1, 2, 3, 4]);
	});

	it("inserts, replaces and deletes, and keeps _id immutable", async () => {
		const things = freshDb().collection<Row>("things");
		await things.insertMany([
			{ _id: "a", v: 1 },
			{ _id: "b", v: 2 },
			{ _id: "c", v: 3 }
		]);

		expect(await things.replaceOne({ _id: "a" }, { w: 10 })).toMatchObject({
			matchedCount: 1,
			modifiedCount: 1
		});
		expect(await things.findOne({ _id: "a" })).toEqual({ _id: "a", w: 10 });
		expect(await things.updateOne({ _id: "b" }, { $set: { v: 2 } })).toMatchObject({
			matchedCount: 1,
			modifiedCount: 0
		});
		// Setting `_id` to the value it has is allowed (mongoose does it); changing it is not.
		expect(await things.updateOne({ _id: "b" }, { $set: { _id: "b", v: 3 } })).toMatchObject({
			matchedCount: 1,
			modifiedCount: 1
		});

		expect(await codeOf(things.updateOne({ _id: "b" }, { $set: { _id: "z" } }))).toBe(66);
		expect(await codeOf(things.replaceOne({ _id: "b" }, { _id: "z", v: 9 }))).toBe(66);
		expect(await codeOf(things.updateOne({ _id: "b" }, { $inc: { _id: 1 } }))).toBe(66);
		expect(await things.findOne({ _id: "b" })).toEqual({ _id: "b", v: 3 });

		expect(await things.deleteOne({ v: { $gte: 2 } })).toMatchObject({ deletedCount: 1 });
		expect(await things.deleteMany({})).toMatchObject({ deletedCount: 2 });
		expect(await things.countDocuments()).toBe(0);
	});

	it("applies the update operators the services use", async () => {
		type Member = {
			_id: string;
			balance: number;
			note?: string;
			tags: string[];
			pending: { id: number }[];
			deals?: number;
			profile?: { tier: string };
		};
		const members = freshDb().collection<Member>("members");
		await members.insertOne({
			_id: "m1",
			balance: 100,
			note: "x",
			tags: ["a"],
			pending: [{ id: 1 }, { id: 2 }, { id: 3 }]
		});

		const result = await members.updateOne(
			{ _id: "m1" },
			{
				$inc: { balance: -30, deals: 1 },
				$set: { "profile.tier": "gold" },
				$unset: { note: "" },
				$push: { tags: { $each: ["b", "c"] } },
				$pull: { pending: { id: { $in: [1, 3] } } }
			}
		);
		expect(result).toMatchObject({ matchedCount: 1, modifiedCount: 1 });
		expect(await members.findOne({ _id: "m1" })).toEqual({
			_id: "m1",
			balance: 70,
			tags: ["a", "b", "c"],
			pending: [{ id: 2 }],
			deals: 1,
			profile: { tier: "gold" }
		});

		expect(
			await codeOf(members.updateOne({ _id: "m1" }, { $set: { balance: 1 }, $inc: { balance: 1 } }))
		).toBe(40);
		expect(await codeOf(members.updateOne({ _id: "m1" }, { $frobnicate: { balance: 1 } }))).toBe(9);
	});

	it("answers `_id` equalities and `$in`s from the `_id` index as a scan would, and updates top-level fields", async () => {
		const things = freshDb().collection<Row>("things");
		await things.insertMany([
			{ _id: "b", n: 1, note: "x", profile: { tier: "base" } },
			{ _id: "a", n: 2 },
			{ _id: 5, n: 3 }
		]);
		const ids = async (filter: Document, sort?: Document) =>
			(await things.find(filter, sort ? { sort } : {}).toArray()).map(d => d._id);

		// In natural order; numbers of any type equal by value.
		expect(await ids({ _id: { $in: [5.0, "a", "b", "zz"] } })).toEqual(["b", "a", 5]);
		expect(await ids({ _id: { $in: ["a", "b"] } }, { _id: 1 })).toEqual(["a", "b"]);
		expect(await ids({ _id: { $in: [/^[ab]$/] } })).toEqual(["b", "a"]);
		expect(await ids({ _id: "a", n: 3 })).toEqual([]);
		expect(await things.find({ _id: "a" }, { projection: { n: 0 } }).toArray()).toEqual([
			{ _id: "a" }
		]);
		expect(await things.countDocuments({ _id: { $in: ["a", "b", "c"] } })).toBe(2);

		const result = await things.updateOne(
			{ _id: "b" },
			{ $set: { n: 10, tags: ["t"] }, $inc: { visits: 2 }, $unset: { note: "" } }
		);
		expect(result).toMatchObject({ matchedCount: 1, modifiedCount: 1 });
		expect(await things.findOne({ _id: "b" })).toEqual({
			_id: "b",
			n: 10,
			profile: { tier: "base" },
			tags: ["t"],
			visits: 2
		});
		await expect(things.updateOne({ _id: "b" }, { $inc: { n: "1" } } as Document)).rejects.toThrow(
			"non-numeric"
		);
	});

	it("filters with the query operators the services use", async () => {
		const deals = freshDb().collection<Row>("deals");
		await deals.insertMany([
			{ _id: "d1", at: "2024-04-30T23:59:59.999Z", status: "done", pending: [] },
			{ _id: "d2", at: "2024-05-01T00:00:00.000Z", status: "open", pending: ["x"] },
			{
				_id: "d3",
				at: "2024-05-31T12:00:00.000Z",
				status: "done",
				pending: ["x", "y"],
				cancelledAt: null
			},
			{ _id: "d4", at: "2024-06-01T00:00:00.000Z", status: "cancelled" }
		]);
		const ids = async (filter: Document) =>
			(await deals.find(filter).sort({ _id: 1 }).toArray()).map(d => d._id);

		expect(
			await ids({ at: { $gte: "2024-05-01T00:00:00.000Z", $lt: "2024-06-01T00:00:00.000Z" } })
		).toEqual(["d2", "d3"]);
		expect(await ids({ pending: { $exists: false } })).toEqual(["d4"]);
		expect(await ids({ "pending.0": { $exists: false } })).toEqual(["d1", "d4"]);
		expect(await ids({ cancelledAt: { $exists: true } })).toEqual(["d3"]);
		expect(await ids({ status: { $ne: "done" } })).toEqual(["d2", "d4"]);
		expect(await ids({ pending: { $size: 2 } })).toEqual(["d3"]);
		expect(await ids({ $or: [{ status: "open" }, { pending: "y" }] })).toEqual(["d2", "d3"]);
		expect(await codeOf(deals.find({ at: { $nope: 1 } }).toArray())).toBe(2);
	});

	it("sorts, skips and limits, and pages a long result through getMore", async () => {
		const monitored = await new MongoClient(standIn.uri("admin"), {
			monitorCommands: true
		}).connect();
		try {
			const rows = monitored.db(`standin-${++databases}`).collection<Row>("rows");
			await rows.insertMany(
				Array.from({ length: 250 }, (_, i) => ({ _id: i, n: i % 50, label: `row ${i}` }))
			);
			const page = await rows
				.find({}, { projection: { label: 0 } })
				.sort({ n: -1, _id: 1 })
				.skip(3)
				.limit(4)
				.toArray();
			expect(page).toEqual([
				{ _id: 199, n: 49 },
				{ _id: 249, n: 49 },
				{ _id: 48, n: 48 },
				{ _id: 98, n: 48 }
			]);

			const commands: string[] = [];
			monitored.on("commandStarted", event => commands.push(event.commandName));
			const all = await rows.find({}, { batchSize: 60 }).toArray();
			expect(all.map(d => d._id)).toEqual(Array.from({ length: 250 }, (_, i) => i));
			expect(commands.filter(name => name === "getMore")).toHaveLength(4);

			// A cursor closed early is killed on the server: its next getMore would not find it.
			commands.length = 0;
			const early = rows.find({}, { batchSize: 10 });
			await early.next();
			await early.close();
			expect(commands).toEqual(["find", "killCursors"]);
		} finally {
			await monitored.close();
		}
	});

	it("counts, lists distinct values and aggregates", async () => {
		const ledger = freshDb().collection("ledger");
		await ledger.insertMany([
			{ memberId: "a", points: 100, tags: ["x", "y"] },
			{ memberId: "a", points: -30, tags: ["y"] },
			{ memberId: "b", points: 50 }
		]);
		expect(await ledger.countDocuments({ memberId: "a" })).toBe(2);
		expect(await ledger.countDocuments({}, { skip: 1, limit: 5 })).toBe(2);
		expect(await ledger.estimatedDocumentCount()).toBe(3);
		expect((await ledger.distinct("memberId")).sort()).toEqual(["a", "b"]);
		expect((await ledger.distinct("tags", { memberId: "a" })).sort()).toEqual(["x", "y"]);
		const totals = await ledger
			.aggregate([
				{ $match: { points: { $gt: -1000 } } },
				{ $group: { _id: "$memberId", total: { $sum: "$points" } } },
				{ $sort: { _id: 1 } }
			])
			.toArray();
		expect(totals).toEqual([
			{ _id: "a", total: 70 },
			{ _id: "b", total: 50 }
		]);
	});

	it("finds and modifies: the document after, an upsert from the filter's equalities, and removal", async () => {
		const points = freshDb().collection<Row>("points");
		await points.insertOne({ _id: "a", balance: 10 });

		expect(
			await points.findOneAndUpdate(
				{ _id: "a" },
				{ $inc: { balance: 5 } },
				{ returnDocument: "after" }
			)
		).toEqual({
			_id: "a",
			balance: 15
		});
		expect(
			await points.findOneAndUpdate(
				{ _id: "a" },
				{ $inc: { balance: 5 } },
				{ returnDocument: "before" }
			)
		).toEqual({
			_id: "a",
			balance: 15
		});

		const upserted = await points.findOneAndUpdate(
			{ _id: "b", tier: "silver", balance: { $gte: 0 } },
			{ $inc: { balance: 7 }, $setOnInsert: { createdBy: "upsert" } },
			{ upsert: true, returnDocument: "after", includeResultMetadata: true }
		);
		expect(upserted.lastErrorObject).toEqual({ n: 1, updatedExisting: false, upserted: "b" });
		expect(upserted.value).toEqual({ _id: "b", tier: "silver", balance: 7, createdBy: "upsert" });

		const again = await points.findOneAndUpdate(
			{ _id: "b" },
			{ $inc: { balance: 1 }, $setOnInsert: { createdBy: "again" } },
			{ upsert: true, returnDocument: "after", includeResultMetadata: true }
		);
		expect(again.lastErrorObject).toEqual({ n: 1, updatedExisting: true });
		expect(again.value).toEqual({ _id: "b", tier: "silver", balance: 8, createdBy: "upsert" });

		expect(
			await points.findOneAndUpdate({ _id: "zz" }, { $set: { x: 1 } }, { returnDocument: "after" })
		).toBeNull();
		expect(await points.findOneAndDelete({}, { sort: { balance: -1 } })).toEqual({
			_id: "a",
			balance: 20
		});
		expect(await points.countDocuments()).toBe(1);
	});

	it("upserts with updateOne once, then matches", async () => {
		const months = freshDb().collection<Row>("months");
		const upsert = () =>
			months.updateOne(
				{ merchantId: "m1", month: "202405" },
				{ $inc: { total: 100 }, $setOnInsert: { openedAt: "first" } },
				{ upsert: true }
			);

		const first = await upsert();
		expect(first).toMatchObject({ matchedCount: 0, modifiedCount: 0, upsertedCount: 1 });
		expect(first.upsertedId).toBeInstanceOf(ObjectId);
		expect(await upsert()).toMatchObject({
			matchedCount: 1,
			modifiedCount: 1,
			upsertedCount: 0,
			upsertedId: null
		});
		expect(await months.find({}, { projection: { _id: 0 } }).toArray()).toEqual([
			{ merchantId: "m1", month: "202405", total: 200, openedAt: "first" }
		]);
	});

	it("enforces unique indexes on inserts, updates and upserts, leaving the original unchanged", async () => {
		const members = freshDb().collection<Row>("members");
		await members.insertMany([
			{ _id: "a", email: "a@x" },
			{ _id: "b", email: "b@x" },
			{ _id: "c", email: "a@x" }
		]);

		// An index over duplicates is refused, and not half-built.
		expect(await codeOf(members.createIndex({ email: 1 }, { unique: true }))).toBe(11000);
		expect((await members.indexes()).map(index => index.name)).toEqual(["_id_"]);
		await members.deleteOne({ _id: "c" });
		expect(await members.createIndex({ email: 1 }, { unique: true })).toBe("email_1");
		expect(await members.indexes()).toEqual([
			{ v: 2, key: { _id: 1 }, name: "_id_" },
			{ v: 2, key: { email: 1 }, name: "email_1", unique: true }
		]);

		const insertError = await members.insertOne({ _id: "d", email: "a@x" }).catch(err => err);
		expect(insertError).toBeInstanceOf(MongoServerError);
		expect(insertError).toMatchObject({
			code: 11000,
			keyPattern: { email: 1 },
			keyValue: { email: "a@x" }
		});
		expect(insertError.message).toContain('index: email_1 dup key: { email: "a@x" }');
		expect(await codeOf(members.insertOne({ _id: "a", email: "new@x" }))).toBe(11000);

		expect(await codeOf(members.updateOne({ _id: "b" }, { $set: { email: "a@x" } }))).toBe(11000);
		expect(await codeOf(members.replaceOne({ _id: "b" }, { email: "a@x", name: "B" }))).toBe(11000);
		expect(await codeOf(members.findOneAndUpdate({ _id: "b" }, { $set: { email: "a@x" } }))).toBe(
			11000
		);
		expect(
			await codeOf(members.updateOne({ _id: "e" }, { $set: { email: "b@x" } }, { upsert: true }))
		).toBe(11000);
		expect(await members.find().sort({ _id: 1 }).toArray()).toEqual([
			{ _id: "a", email: "a@x" },
			{ _id: "b", email: "b@x" }
		]);

		// Updating a document to its own key is no clash; freeing a key lets another take it.
		expect(
			await members.updateOne({ _id: "a" }, { $set: { email: "a@x", seen: true } })
		).toMatchObject({ modifiedCount: 1 });
		await members.updateOne({ _id: "a" }, { $set: { email: "a2@x" } });
		expect(await members.updateOne({ _id: "b" }, { $set: { email: "a@x" } })).toMatchObject({
			modifiedCount: 1
		});

		// A missing field is indexed as null: only one document may lack it.
		await members.insertOne({ _id: "f" });
		expect(await codeOf(members.insertOne({ _id: "g", email: null }))).toBe(11000);
	});

	it("stops an ordered insert at its first duplicate and carries on past it when unordered", async () => {
		const slots = freshDb().collection("slots");
		await slots.createIndex({ merchantId: 1, month: 1 }, { unique: true, name: "merchant_month" });
		const batch = [
			{ merchantId: "m", month: 1 },
			{ merchantId: "m", month: 2 },
			{ merchantId: "m", month: 1 },
			{ merchantId: "n", month: 1 }
		];

		const ordered = await slots.insertMany(batch.map(doc => ({ ...doc }))).catch(err => err);
		expect(ordered).toBeInstanceOf(MongoBulkWriteError);
		expect(ordered).toMatchObject({ code: 11000, insertedCount: 2 });
		expect(ordered.writeErrors).toHaveLength(1);
		expect(ordered.writeErrors[0]).toMatchObject({ index: 2, code: 11000 });
		expect(await slots.countDocuments()).toBe(2);

		await slots.deleteMany({});
		const unordered = await slots
			.insertMany(
				batch.map(doc => ({ ...doc })),
				{ ordered: false }
			)
			.catch(err => err);
		expect(unordered).toMatchObject({ code: 11000, insertedCount: 3 });
		expect(await slots.countDocuments()).toBe(3);
	});

	it("lets exactly the affordable share of 50 concurrent conditional updates from 5 clients through", async () => {
		const name = `standin-${++databases}`;
		await client.db(name).collection<Row>("points").insertOne({ _id: "m", balance: 1000 });
		const clients = await Promise.all(
			Array.from({ length: 5 }, () => new MongoClient(standIn.uri(name)).connect())
		);
		try {
			const results = await Promise.all(
				Array.from({ length: 50 }, (_, i) =>
					clients[i % 5]
						.db()
						.collection<Row>("points")
						.updateOne({ _id: "m", balance: { $gte: 100 } }, { $inc: { balance: -100 } })
				)
			);
			expect(results.filter(r => r.modifiedCount === 1)).toHaveLength(10);
			expect(results.every(r => r.matchedCount === r.modifiedCount)).toBe(true);
			expect(await client.db(name).collection<Row>("points").findOne({ _id: "m" })).toEqual({
				_id: "m",
				balance: 0
			});
		} finally {
			await Promise.all(clients.map(c => c.close()));
		}
	});

	it("keeps databases apart, lists them and drops them", async () => {
		const [one, two] = [freshDb(), freshDb()];
		await one.collection<Row>("members").insertOne({ _id: "x", in: "one" });
		await two.collection<Row>("members").insertOne({ _id: "x", in: "two" });
		await two.collection<Row>("deals").insertOne({ _id: "d" });
		expect(await one.collection<Row>("members").find().toArray()).toEqual([
			{ _id: "x", in: "one" }
		]);
		expect(
			(await two.listCollections({}, { nameOnly: true }).toArray()).map(c => c.name).sort()
		).toEqual(["deals", "members"]);
		expect((await two.listCollections({ name: "deals" }).toArray()).map(c => c.name)).toEqual([
			"deals"
		]);

		const names = async () =>
			(await client.db("admin").admin().listDatabases({ nameOnly: true })).databases.map(
				d => d.name
			);
		expect(await names()).toEqual(expect.arrayContaining([one.databaseName, two.databaseName]));

		expect(await two.dropDatabase()).toBe(true);
		expect(await names()).not.toContain(two.databaseName);
		expect(await two.collection<Row>("members").countDocuments()).toBe(0);
		expect(await two.listCollections().toArray()).toEqual([]);
		expect(await one.collection<Row>("members").countDocuments()).toBe(1);

		expect(await one.collection<Row>("members").drop()).toBe(true);
		expect(await codeOf(one.collection<Row>("members").drop())).toBe(26);
	});

	it("fails commands as the failCommand fail point says, as mongod does in test mode", async () => {
		const db = freshDb();
		const admin = client.db("admin");
		const hiccup = {
			configureFailPoint: "failCommand",
			mode: { times: 1 },
			data: { failCommands: ["insert"], errorCode: 112 }
		};
		await admin.command(hiccup);
		expect(await codeOf(db.collection<Row>("deals").insertOne({ _id: "d1" }))).toBe(112);
		await db.collection<Row>("deals").insertOne({ _id: "d1" });
		await db.collection<Row>("deals").insertOne({ _id: "d2" });
		expect(await db.collection<Row>("deals").countDocuments()).toBe(2);

		// Our extension: only one namespace fails, until switched off.
		await admin.command({
			...hiccup,
			mode: "alwaysOn",
			data: { ...hiccup.data, namespace: `${db.databaseName}.ledger` }
		});
		try {
			expect(await codeOf(db.collection<Row>("ledger").insertOne({ _id: "e1" }))).toBe(112);
			expect(await codeOf(db.collection<Row>("ledger").insertOne({ _id: "e1" }))).toBe(112);
			await db.collection<Row>("deals").insertOne({ _id: "d3" });
		} finally {
			await admin.command({ configureFailPoint: "failCommand", mode: "off" });
		}
		await db.collection<Row>("ledger").insertOne({ _id: "e1" });
		expect(await db.collection<Row>("ledger").countDocuments()).toBe(1);
	});

	it("refuses transactions, as a standalone server does", async () => {
		const session = client.startSession();
		try {
			session.startTransaction();
			expect(
				await codeOf(freshDb().collection<Row>("deals").insertOne({ _id: "t" }, { session }))
			).toBe(20);
		} finally {
			await session.endSession();
		}
	});
});

describe("through mongoose", () => {
	let connection: mongoose.Connection;
	let Member: mongoose.Model<any>;

	beforeAll(async () => {
		connection = await mongoose.createConnection(standIn.uri(`standin-${++databases}`)).asPromise();
		const schema = new mongoose.Schema(
			{ _id: String },
			{ strict: false, strictQuery: false, versionKey: false }
		);
		schema.index({ email: 1 }, { unique: true });
		Member = connection.model("Member", schema, "members");
		await Member.init();
		await Member.createIndexes();
	});

	afterAll(() => connection?.close());

	it("builds the schema's indexes", async () => {
		const indexes = await Member.listIndexes();
		expect(indexes.map(index => [index.name, !!index.unique])).toEqual([
			["_id_", false],
			["email_1", true]
		]);
	});

	it("creates, reads lean, counts, updates and upserts", async () => {
		await Member.insertMany(
			Array.from({ length: 12 }, (_, i) => ({
				_id: `m${String(i).padStart(2, "0")}`,
				email: `m${i}@x`,
				balance: i * 10,
				joinedAt: new Date(Date.UTC(2024, 0, i + 1))
			})),
			{ lean: true }
		);
		expect(await Member.findById("m03").lean()).toEqual({
			_id: "m03",
			email: "m3@x",
			balance: 30,
			joinedAt: new Date(Date.UTC(2024, 0, 4))
		});

		const rich = await Member.find({ balance: { $gte: 50 } })
			.sort({ balance: -1 })
			.skip(1)
			.limit(3)
			.lean();
		expect(rich.map(m => m._id)).toEqual(["m10", "m09", "m08"]);
		expect(await Member.countDocuments({ balance: { $lt: 50 } })).toBe(5);

		expect(
			(await Member.updateMany({ balance: { $lt: 30 } }, { $inc: { balance: 1000 } })).matchedCount
		).toBe(3);
		expect(await Member.countDocuments({ balance: { $gte: 1000 } })).toBe(3);

		await Member.updateOne(
			{ _id: "m99" },
			{ $set: { email: "m99@x" }, $inc: { balance: 5 } },
			{ upsert: true }
		);
		expect(await Member.findById("m99").lean()).toEqual({ _id: "m99", email: "m99@x", balance: 5 });

		const after = await Member.findOneAndUpdate(
			{ _id: "m99" },
			{ $inc: { balance: 5 } },
			{ new: true, upsert: true }
		).lean();
		expect(after).toEqual({ _id: "m99", email: "m99@x", balance: 10 });
		const created = await Member.findOneAndUpdate(
			{ _id: "m98" },
			{ $set: { email: "m98@x" } },
			{ new: true, upsert: true }
		).lean();
		expect(created).toEqual({ _id: "m98", email: "m98@x" });

		// mongoose turns a plain update document, `_id` and all, into a $set.
		await Member.updateOne({ _id: "m98" }, { _id: "m98", email: "m98@x", note: "set" });
		expect(await Member.findByIdAndDelete("m98").lean()).toEqual({
			_id: "m98",
			email: "m98@x",
			note: "set"
		});
		expect(await Member.countDocuments()).toBe(13);
	});

	it("reports unique violations with code 11000 and keeps the stored document", async () => {
		await Member.create({ _id: "u1", email: "taken@x" });
		await expect(
			Member.insertMany([{ _id: "u2", email: "taken@x" }], { lean: true })
		).rejects.toMatchObject({ code: 11000 });
		await expect(Member.create({ _id: "u1", email: "other@x" })).rejects.toMatchObject({
			code: 11000
		});
		await Member.create({ _id: "u3", email: "free@x" });
		await expect(
			Member.updateOne({ _id: "u3" }, { $set: { email: "taken@x" } })
		).rejects.toMatchObject({ code: 11000 });
		expect(
			await Member.find({ _id: { $in: ["u1", "u2", "u3"] } })
				.sort({ _id: 1 })
				.lean()
		).toEqual([
			{ _id: "u1", email: "taken@x" },
			{ _id: "u3", email: "free@x" }
		]);
	});
});
