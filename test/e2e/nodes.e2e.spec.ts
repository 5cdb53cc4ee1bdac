/** Two nodes side by side on one host: the second one's METRICS_PORT collides with the first's. */
import { freePort, System } from "../helpers/system";

jest.setTimeout(60_000);

describe("two nodes on one host", () => {
	let first: System;
	beforeAll(async () => {
		first = new System(await freePort(), {}, await freePort());
		await first.start();
	});
	afterAll(() => first.stop());

	it("stops a second node on a taken METRICS_PORT with one line naming the variable, not a stack", async () => {
		const second = new System(await freePort(), {}, first.opsPort);
		// Its probe port answers for the first node, so wait for the second to end, not to be ready.
		await second.start().catch(() => undefined);
		try {
			expect(await second.exited()).toBe(1);
			expect(second.log).toMatch(
				new RegExp(
					`METRICS_PORT ${first.opsPort} is in use \\(another node on this host\\?\\): give each node on a host its own METRICS_PORT`
				)
			);
			expect(second.log).not.toMatch(/Unhandled|EADDRINUSE|\n\s+at .*:\d+:\d+/);
		} finally {
			await second.stop();
		}
		// The first node is untouched.
		expect(await first.ready()).toBe(true);
	});

	it("runs a second node beside the first with its own METRICS_PORT", async () => {
		const second = new System(await freePort(), {}, await freePort());
		try {
			await second.start();
			expect((await second.call("GET", "/api/health")).status).toBe(200);
		} finally {
			await second.stop();
		}
	});
});
