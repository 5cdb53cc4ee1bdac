/** Jest global teardown of the MongoDB project: stops the stand-in, or drops this run's databases on a real server. */
import type { ChildProcess } from "node:child_process";
import { MongoClient } from "mongodb";
import { TEST_DB_PREFIX } from "./store";

export default async function teardown(): Promise<void> {
	const standIn = (globalThis as { mongoStandIn?: ChildProcess }).mongoStandIn;
	if (standIn) {
		const exited = new Promise(resolve => standIn.once("exit", resolve));
		standIn.kill("SIGTERM");
		await exited;
		return;
	}
	const client = await MongoClient.connect(process.env.TEST_MONGO_URI as string);
	try {
		const { databases } = await client.db().admin().listDatabases({ nameOnly: true });
		for (const { name } of databases)
			if (name.startsWith(TEST_DB_PREFIX)) await client.db(name).dropDatabase();
	} finally {
		await client.close();
	}
}
