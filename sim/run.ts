/**
 * `npm run simulate [-- --seeds N | --seed S] [--store sqlite|mongodb] [--from F]`: runs seeds of the
 * simulation (sim/simulation.ts) one after another, 10,000 by default, and stops at the first that
 * fails, printing its seed, what failed and the end of its trace. `--seed S` runs that one seed
 * again, printing its whole trace. MongoDB is the server at MONGO_URI, or else the stand-in of
 * test/mongo, started for the run.
 */
import { spawn, type ChildProcess } from "node:child_process";
import path from "node:path";
import readline from "node:readline";
import { report } from "./report";
import { runSeed } from "./simulation";
import type { Store } from "./system";

interface Args {
	seeds: number;
	from: number;
	only?: number;
	store: Store;
}

function parse(argv: string[]): Args {
	const value = (name: string) => {
		const i = argv.indexOf(name);
		return i >= 0 ? argv[i + 1] : undefined;
	};
	const whole = (name: string, raw: string | undefined, fallback: number) => {
		if (raw === undefined) return fallback;
		if (!/^\d{1,10}$/.test(raw)) throw new Error(`${name} takes a whole number, got '${raw}'`);
		return Number(raw);
	};
	const kind = value("--store") ?? (process.env.MONGO_URI ? "mongodb" : "sqlite");
	if (kind !== "sqlite" && kind !== "mongodb")
		throw new Error(`--store is sqlite or mongodb, got '${kind}'`);
	const only = value("--seed");
	return {
		seeds: whole("--seeds", value("--seeds"), 10_000),
		from: whole("--from", value("--from"), 1),
		only: only === undefined ? undefined : whole("--seed", only, 0),
		store: { kind, mongoUri: process.env.MONGO_URI }
	};
}

/** The MongoDB stand-in of test/mongo in a process of its own (as jest's MongoDB project runs it); its URI. */
async function startStandIn(): Promise<{ uri: string; child: ChildProcess }> {
	const child = spawn(process.execPath, [path.resolve(__dirname, "../test/mongo/cli.js")], {
		stdio: ["ignore", "pipe", "inherit"]
	});
	const uri = await new Promise<string>((resolve, reject) => {
		child.once("exit", code => reject(new Error(`The MongoDB stand-in exited (${code})`)));
		readline
			.createInterface({ input: child.stdout as NodeJS.ReadableStream })
			.once("line", resolve);
	});
	child.removeAllListeners("exit");
	return { uri: uri.trim(), child };
}

async function main(): Promise<number> {
	const args = parse(process.argv.slice(2));
	if (args.store.kind === "mongodb" && !args.store.mongoUri) {
		const standIn = await startStandIn();
		args.store.mongoUri = standIn.uri;
		process.once("exit", () => standIn.child.kill());
		console.log(`MongoDB stand-in at ${standIn.uri}`);
	}
	if (args.only !== undefined) {
		const result = await runSeed(args.only, { store: args.store });
		console.log(
			result.ok
				? `seed ${result.seed} passed (${result.ms.toFixed(0)} ms)`
				: report(result, Infinity)
		);
		if (result.ok) console.log(result.trace.join("\n"));
		return result.ok ? 0 : 1;
	}
	const started = performance.now();
	for (let seed = args.from; seed < args.from + args.seeds; seed++) {
		const result = await runSeed(seed, { store: args.store });
		if (!result.ok) {
			console.error(report(result));
			return 1;
		}
		const done = seed - args.from + 1;
		if (done % 50 === 0 || done === args.seeds) {
			const s = (performance.now() - started) / 1000;
			console.log(
				`${done} seeds passed on ${args.store.kind} in ${s.toFixed(1)} s (${(done / s).toFixed(1)} seeds/s)`
			);
		}
	}
	return 0;
}

main().then(
	code => process.exit(code),
	err => {
		console.error(err);
		process.exit(2);
	}
);
