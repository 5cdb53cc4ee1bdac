/**
 * The MongoDB stand-in as a process of its own, for suites whose services run in child processes:
 * `node dist/test/mongo/cli.js [--port N]` prints `mongodb://127.0.0.1:<port>` once it listens and
 * runs until SIGTERM or SIGINT.
 */
import { MongoStandIn } from "./wire-server";

async function main(): Promise<void> {
	const flag = process.argv.indexOf("--port");
	const port = flag === -1 ? 0 : Number(process.argv[flag + 1]);
	if (!Number.isInteger(port) || port < 0 || port > 65535)
		throw new Error(`Invalid --port '${process.argv[flag + 1]}'`);
	const standIn = await MongoStandIn.start(port);
	const stop = () =>
		standIn.stop().then(
			() => process.exit(0),
			() => process.exit(1)
		);
	process.once("SIGTERM", stop);
	process.once("SIGINT", stop);
	process.stdout.write(`mongodb://127.0.0.1:${standIn.port}\n`);
}

main().catch(err => {
	console.error(err);
	process.exit(1);
});
