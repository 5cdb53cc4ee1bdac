/**
 * The embedded store's own query matching and update operators (lib/store/documents.ts) against
 * mingo's, which follow MongoDB: on every pair of these documents and conditions, what the fast path
 * decides is what mingo decides, and what it leaves undecided it leaves untouched.
 */
import { Query, update } from "mingo";
import { applyModifier, matches } from "../../lib/store/documents";

const DOCS: Record<string, unknown>[] = [
	{
		_id: "a",
		n: 1,
		s: "x",
		b: true,
		nul: null,
		o: { k: "v", n: 2 },
		arr: [1, 2],
		subs: [{ id: "e1" }]
	},
	{ _id: "b", n: 2.5, s: "y", b: false, o: { k: "w" }, arr: [] },
	{ _id: "c", n: "1", s: 3 },
	{ _id: "d" }
];

const QUERIES: Record<string, unknown>[] = [
	{ n: 1 },
	{ n: "1" },
	{ n: { $gte: 1 } },
	{ n: { $lt: "2" } },
	{ n: { $gt: 1, $lte: 2.5 } },
	{ s: { $in: ["x", 3] } },
	{ s: { $nin: ["x", null] } },
	{ s: { $ne: "x" } },
	{ nul: null },
	{ nul: { $exists: true } },
	{ missing: null },
	{ missing: { $ne: null } },
	{ missing: { $exists: false } },
	{ b: true },
	{ b: { $ne: false } },
	{ "o.k": "v" },
	{ "o.n": { $gt: 1 } },
	{ "o.k.z": { $exists: false } },
	{ arr: 1 },
	{ "arr.0": { $exists: true } },
	{ "subs.id": "e1" },
	{ o: { k: "v", n: 2 } },
	{ $or: [{ n: 2.5 }, { s: 3 }] },
	{ $and: [{ n: { $exists: true } }, { s: { $ne: "y" } }] },
	{ _id: "a", n: 1, s: "x" },
	{ _id: { $in: ["a", "d"] }, n: { $exists: false } }
];

const MODIFIERS: Record<string, unknown>[] = [
	{ $set: { n: 5, "o.k": "z", "p.q": 1 } },
	{ $set: { s: "x" } },
	{ $unset: { n: "", "o.k": "", missing: "" } },
	{ $inc: { n: 2, fresh: 1 } },
	{ $inc: { n: 0 } },
	{ $max: { n: 2, m: 7 } },
	{ $min: { n: 2, "o.n": 1 } },
	{ $push: { arr: 3, subs: { $each: [{ id: "e2" }, { id: "e3" }] } } },
	{ $pull: { subs: { id: { $in: ["e1", "e3"] } }, arr: 2 } },
	{ $pull: { arr: { $gte: 2 } } },
	{ $set: { n: 1 }, $inc: { n: 1 } },
	{ $set: { "arr.0": 9 } }
];

describe("the embedded store's matching and updates", () => {
	it("match as mingo (MongoDB) does wherever they decide, which is most cases", () => {
		let decided = 0;
		for (const query of QUERIES)
			for (const doc of DOCS) {
				const mine = matches(doc, query);
				if (mine !== undefined) decided++;
				if (mine !== undefined)
					expect({ query, doc, matched: mine }).toEqual({
						query,
						doc,
						matched: new Query(query, {}).test(doc)
					});
			}
		expect(decided).toBeGreaterThan((QUERIES.length * DOCS.length * 3) / 4);
	});

	it("update as mingo (MongoDB) does wherever they decide, which is most cases, and leave the document alone where they do not", () => {
		let decided = 0;
		for (const modifier of MODIFIERS)
			for (const doc of DOCS) {
				const mine = structuredClone(doc);
				const theirs = structuredClone(doc);
				const changed = applyModifier(mine, modifier);
				if (changed === undefined) {
					expect(mine).toEqual(doc);
					continue;
				}
				decided++;
				let modified: string[];
				try {
					modified = update(theirs, modifier as never);
				} catch (err) {
					throw new Error(`${JSON.stringify({ modifier, doc })}: mingo refuses (${err})`);
				}
				expect({ modifier, doc, result: mine }).toEqual({ modifier, doc, result: theirs });
				expect({ modifier, doc, changed }).toEqual({ modifier, doc, changed: modified.length > 0 });
			}
		expect(decided).toBeGreaterThan((MODIFIERS.length * DOCS.length) / 2);
	});
});
