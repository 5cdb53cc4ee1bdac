/**
 * Jest global setup of the MongoDB project: the suites run against the server at MONGO_URI when one
 * is given (a real MongoDB), and otherwise against the stand-in the tests bring (test/mongo),
 * started here in its own process so that it answers while the suites keep theirs busy. Each test
 * file then gets its own database (setup-env.ts).
 */
import { spawn } from "node:child_process";
import path from "node:path";
import readline from "node:readline";

export default async function setup(): Promise<void> {
	if (process.env.MONGO_URI) {
		process.env.TEST_MONGO_URI = process.env.MONGO_URI;
		return;
	}
	// The stand-in is compiled with the project (`npm test` builds first).
	const child = spawn(process.execPath, [path.resolve(__dirname, "../../dist/test/mongo/cli.js")], {
		stdio: ["ignore", "pipe", "inherit"]
	});
	const line = await new Promise<string>((resolve, reject) => {
		child.once("exit", code =>
			reject(
				new Error(`The MongoDB stand-in exited (${code}); is the project built (npm run build)?`)
			)
		);
		readline
			.createInterface({ input: child.stdout as NodeJS.ReadableStream })
			.once("line", resolve);
	});
	child.removeAllListeners("exit");
	process.env.TEST_MONGO_URI = line.trim();
	// Read by the teardown, which runs in this process.
	(globalThis as { mongoStandIn?: typeof child }).mongoStandIn = child;
}
