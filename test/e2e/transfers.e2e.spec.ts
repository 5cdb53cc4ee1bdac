/**
 * Transfers over real NATS (JetStream), each node its own process: 50 concurrent transfers among 10
 * members over HTTP, with the points node SIGKILLed midway and restarted on the same data. Afterwards
 * every balance equals its ledger, the total is unchanged, every transfer answered `completed` has both
 * its entries, and every transfer that left its sender (answered or not) reached its receiver or was
 * refunded: never one side alone.
 */
import { eventually } from "../helpers/broker";
import { all, explained, type Entry } from "../helpers/cluster";
import { NatsServer } from "../helpers/nats";
import { freePort, System, type Reply } from "../helpers/system";

jest.setTimeout(120_000);

describe("transfers through a killed points node", () => {
	let nats: NatsServer;
	const nodes: Record<string, System> = {};
	const members = Array.from({ length: 10 }, (_, i) => `t${String(i).padStart(3, "0")}`);
	const api = (method: string, urlPath: string, body?: unknown) =>
		nodes.gateway.call(method, `/api${urlPath}`, body);

	beforeAll(async () => {
		nats = await NatsServer.start();
		const start = async (name: string, services: string) => {
			const env = {
				TRANSPORTER: nats.url,
				SERVICES: services,
				NODE_ID: `${name}-${process.pid}`,
				CALL_TIMEOUT_MS: "1000",
				RATE_LIMIT: "1000000"
			};
			nodes[name] = new System(name === "gateway" ? await freePort() : 0, env, await freePort());
			await nodes[name].start();
		};
		await Promise.all([start("points", "points"), start("members", "members,merchants,deals")]);
		await start("gateway", "api");
		await eventually(async () => expect((await api("GET", "/health")).status).toBe(200));
	});

	afterAll(async () => {
		await Promise.all(Object.values(nodes).map(node => node.stop()));
		await nats.stop();
	});

	const balanceOf = async (memberId: string): Promise<number> =>
		(await api("GET", `/points/${memberId}`)).body.balance;

	it("keeps both sides of every transfer, or neither, and the total", () =>
		explained(nodes, async () => {
			for (const memberId of members) {
				expect((await api("POST", "/members", { memberId, name: memberId })).status).toBe(201);
				// 100000 at the default rate of 0.01: 1000 points each.
				const save = { memberId, merchantId: "20", dealAmount: 100_000, type: "save" };
				expect((await api("POST", "/deals", save)).status).toBe(201);
			}
			await eventually(async () => {
				for (const memberId of members) expect(await balanceOf(memberId)).toBe(1000);
			});

			// Each member sends 5 transfers of 10 to 99 points (never more than it has) to the others,
			// 10 at a time. Once 20 have answered, the points node is killed and restarted on its data;
			// a transfer that fails meanwhile is sent once more after the restart, as a client would.
			const answers: Reply[] = [];
			/** The answers to first tries that the node's death cut short. */
			const interrupted: Reply[] = [];
			let next = 0;
			let restarted: Promise<void> | undefined;
			const send = (i: number) =>
				api("POST", `/points/${members[i % 10]}/transfers`, {
					toMemberId: members[(i + 1 + (i % 9)) % 10],
					points: 10 + ((i * 37) % 90)
				});
			const worker = async () => {
				for (let i = next++; i < 50; i = next++) {
					let answer = await send(i);
					if (answer.status !== 201 && restarted) {
						interrupted.push(answer);
						await restarted;
						answer = await send(i);
					}
					answers.push(answer);
					if (answers.length === 20)
						restarted = nodes.points.stop("SIGKILL").then(() => nodes.points.start());
				}
			};
			await Promise.all(Array.from({ length: 10 }, worker));
			await restarted;

			const completed = answers.filter(a => a.status === 201);
			expect(completed.length).toBeGreaterThanOrEqual(20);
			expect(interrupted.length).toBeGreaterThan(0);
			// No refusal: what did not answer 201 failed for the node's death (a 5xx, a timeout).
			expect(answers.filter(a => a.status < 500 && a.status !== 201)).toEqual([]);
			for (const a of completed) expect(a.body).toMatchObject({ status: "completed" });

			// Once the events the dead node left have been handled: every transfer that left its
			// sender has reached its receiver, and no receiver has points that did not leave a sender.
			const ledgers = await eventually(
				async () => {
					const byMember = new Map<string, Entry[]>();
					for (const memberId of members)
						byMember.set(memberId, await all<Entry>(api, `/points/${memberId}/history`));
					const causes = [...byMember.values()].flat().map(e => e.cause);
					const ids = (prefix: string) =>
						causes
							.filter(c => c.startsWith(prefix))
							.map(c => c.slice(prefix.length))
							.sort();
					expect(ids("transfer-in:")).toEqual(ids("transfer-out:"));
					expect(ids("transfer-refund:")).toEqual([]);
					return byMember;
				},
				60_000,
				500
			);

			let total = 0;
			for (const memberId of members) {
				const ledger = ledgers.get(memberId) as Entry[];
				const balance = await balanceOf(memberId);
				expect({ memberId, balance }).toEqual({
					memberId,
					balance: ledger.reduce((sum, e) => sum + e.amount, 0)
				});
				expect(new Set(ledger.map(e => e.cause)).size).toBe(ledger.length);
				total += balance;
			}
			expect(total).toBe(10_000);
			const causes = new Set([...ledgers.values()].flat().map(e => e.cause));
			for (const { body } of completed) {
				expect(causes).toContain(`transfer-out:${body.transferId}`);
				expect(causes).toContain(`transfer-in:${body.transferId}`);
			}
			// An interrupted transfer may have happened (and been finished by its event), or not at all.
			const sent = [...causes].filter(c => c.startsWith("transfer-out:")).length;
			expect(sent).toBeGreaterThanOrEqual(completed.length);
			expect(sent).toBeLessThanOrEqual(completed.length + interrupted.length);
			// The listing agrees: nothing left pending.
			for (const memberId of members)
				for (const row of await all<{ status: string }>(api, `/points/${memberId}/transfers`))
					expect(row.status).toBe("completed");
		}));
});
