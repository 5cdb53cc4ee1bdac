/**
 * NeDB datastores as this project opens them. NeDB appends every write to its file through the
 * thread pool, one write at a time per collection, and answers once the line is written. Here the
 * line is appended synchronously instead: the same guarantee — a write is with the operating system
 * before it is answered, so a killed process loses nothing it acknowledged — without a thread-pool
 * round trip per write, which was the deal path's largest cost (README, "Performance").
 */
import fs from "node:fs";
import Datastore from "@seald-io/nedb";
import { serialize } from "@seald-io/nedb/lib/model";

/** The part of NeDB's persistence this replaces (not in its typings). */
interface Persistence {
	persistNewStateAsync(docs: object[]): Promise<void>;
}

export function openDatastore<T extends object>(filename: string): Datastore<T> {
	const db = new Datastore<T>({ filename });
	(db.persistence as unknown as Persistence).persistNewStateAsync = async docs => {
		if (docs.length) fs.appendFileSync(filename, docs.map(doc => `${serialize(doc)}\n`).join(""), "utf8");
	};
	return db;
}
