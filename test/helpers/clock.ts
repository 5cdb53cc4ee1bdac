/**
 * The test's own clock, so that no test reads the wall clock: in process, `Date` starts where the
 * test says and runs on at the real rate; a spawned node gets the same from libfaketime. Timers
 * (`setTimeout`, `setInterval`) keep real time in both, as Moleculer's timeouts need.
 */
import fs from "node:fs";
import path from "node:path";

/** Every API jest can fake except `Date`. */
const TIMERS = [
	"hrtime",
	"nextTick",
	"performance",
	"queueMicrotask",
	"requestAnimationFrame",
	"cancelAnimationFrame",
	"requestIdleCallback",
	"cancelIdleCallback",
	"setImmediate",
	"clearImmediate",
	"setInterval",
	"clearInterval",
	"setTimeout",
	"clearTimeout"
] as const;

/**
 * From here on in this test file, `new Date()` and `Date.now()` start at `at` (an ISO instant) and
 * run on with real time. Call it at the top of a `describe`, before the broker starts.
 */
export function clockFrom(at: string): void {
	beforeAll(() =>
		jest.useFakeTimers({ now: new Date(at), advanceTimers: true, doNotFake: [...TIMERS] })
	);
	afterAll(() => jest.useRealTimers());
}

/** Debian's libfaketime (package `faketime`), in the machine's own multiarch folder. */
export const LIBFAKETIME = fs
	.readdirSync("/usr/lib")
	.map(dir => path.join("/usr/lib", dir, "faketime/libfaketime.so.1"))
	.find(file => fs.existsSync(file));

/**
 * The environment that starts a spawned node's clock at `at` (`YYYY-MM-DD hh:mm:ss`, UTC) and runs it
 * on, `rate` times as fast as real time (60: a minute a second). Only the clock moves faster: the
 * node's timers keep real time (`FAKETIME_DONT_FAKE_MONOTONIC`).
 */
export function faketime(at: string, rate = 1): NodeJS.ProcessEnv {
	if (!LIBFAKETIME)
		throw new Error("libfaketime is missing: install Debian's package 'faketime' (.ci/run does)");
	return {
		LD_PRELOAD: LIBFAKETIME,
		FAKETIME: `@${at}${rate === 1 ? "" : ` x${rate}`}`,
		FAKETIME_DONT_FAKE_MONOTONIC: "1",
		TZ: "UTC"
	};
}
