/**
 * The operator's REPL commands, typed into the REPL of a running node (`npm start -- --repl`) the
 * way an operator would, after a scenario made over HTTP.
 */
import fs from "node:fs";
import path from "node:path";
import { eventually } from "../helpers/broker";
import { storeChannelMessage } from "../helpers/channel-store";
import { faketime } from "../helpers/clock";
import { tamper } from "../helpers/store";
import { System } from "../helpers/system";

jest.setTimeout(60_000);

describe("operator commands in the Moleculer REPL", () => {
	let system: System;
	const api = (method: string, urlPath: string, body?: unknown) =>
		system.call(method, `/api${urlPath}`, body);
	// The node's clock (libfaketime) is in May 2026: "this month" is 202605.
	const month = "202605";

	beforeAll(async () => {
		system = await System.start(faketime("2026-05-14 10:00:00"), true);
		await api("POST", "/members", { memberId: "r001", name: "Park Jisoo" });
		await api("POST", "/deals", {
			memberId: "r001",
			merchantId: "20",
			dealAmount: 100000,
			type: "save"
		});
		await eventually(async () =>
			expect((await api("GET", "/points/r001")).body.balance).toBe(1000)
		);
		for (const point of [100, 200, 200])
			await api("POST", "/deals", {
				memberId: "r001",
				merchantId: "20",
				dealAmount: 10000,
				type: "use",
				point
			});
	});
	afterAll(() => system.stop());

	it("member <id> shows the member, the balance and the last ledger entries", async () => {
		const out = await system.type("member r001", /ledger entries:[\s\S]*└/);
		expect(out).toContain("Member r001 Park Jisoo: active");
		expect(out).toContain("Balance: 500 points");
		expect(out).toContain("Last 4 of 4 ledger entries");
		expect(out).toMatch(/deal:\w+.*use.*-200/);
		expect(await system.type("member nobody", /Error/)).toContain("Error [MEMBER_NOT_FOUND]");
	});

	it("member-token <memberId> prints a member token that acts as that member", async () => {
		const out = await system.type("member-token r001", /valid until .*\n/);
		const token = /(eyJ[\w-]+\.[\w-]+\.[\w-]+)/.exec(out)?.[1];
		expect(out).toMatch(/valid until 2026-05-14T10:/);
		expect(
			(await system.call("GET", "/api/me", undefined, { authorization: `Bearer ${token}` })).body
		).toEqual({ role: "member", memberId: "r001" });
		expect(await system.type("member-token nobody", /Error/)).toContain("Error [MEMBER_NOT_FOUND]");
	});

	it("settle <merchantId> <YYYYMM> shows this month's provisional settlement and its lines: (100 + 200 + 200) × 0.98 = 490", async () => {
		const out = await system.type(`settle 20 ${month}`, /Settlement [\s\S]*└/);
		// The save earned 1,000 points, issued at the default price of 1: the merchant owes 1000 − 490.
		expect(out).toMatch(
			new RegExp(
				`Settlement 20 ${month} provisional: 500 points used in 3 deal\\(s\\), adjustments 0, fee 10, billing amount 490; issued 1000 points for 1000; net 510 \\(the merchant pays\\); bonus 0 points, funded by the coalition \\(as of `
			)
		);
		expect(out.match(/│ +'use' +│/g)).toHaveLength(3);
		expect((await api("GET", `/billings/20/${month}`)).body).toMatchObject({
			status: "provisional",
			billingAmount: 490
		});
		expect(await system.type("settle 20 2026-13", /Error/)).toContain("Error [VALIDATION_ERROR]");
		expect(await system.type("settle 20 000101", /Error/)).toContain("Error [VALIDATION_ERROR]");
	});

	it("month-end [YYYYMM] runs the month-end job: a month not yet ended stays open", async () => {
		expect(await system.type(`month-end ${month}`, /Month-end.*\n/)).toMatch(
			/Month-end: nothing more can close yet \(closed through no month\)/
		);
		expect((await api("GET", `/billings/20/${month}`)).body).toMatchObject({
			status: "provisional"
		});
	});

	it("audit checks every account against its ledger", async () => {
		expect(await system.type("audit", /Audit \w+.*\n/)).toMatch(
			/Audit OK: 1 account\(s\), 4 ledger entries/
		);
	});

	it("audit reports an account that differs from its ledger", async () => {
		await system.stop();
		await tamper(system, "accounts", "r001", { balance: 700 });
		await system.start();
		const out = await system.type("audit", /Audit \w+[\s\S]*└/);
		expect(out).toContain("Audit FAILED: 1 of 1 account(s) differ from their ledger");
		expect(out).toMatch(/r001.*700.*500/);
	});

	it("dead-letters lists a dead letter with its error, and replay applies it once", async () => {
		// A dead letter as the channel adapter leaves it: an accrual the points group gave up on.
		await system.stop();
		const payload = {
			dealId: "dlsave1",
			memberId: "r001",
			merchantId: "20",
			dealAmount: 5000,
			type: "save",
			point: 50,
			dealDate: "2026-05-14T09:00:00.000Z"
		};
		const headers = {
			"x-dead-letter-id": "0deadletter0001",
			"x-original-channel": "onepoint.deal.saved",
			"x-original-group": "points",
			"x-error-message": "store unavailable",
			"x-tries": "9"
		};
		storeChannelMessage(system.dataDir, {
			id: `zz${Date.now()}`,
			channel: "onepoint.DEAD_LETTERS",
			payload: JSON.stringify(payload),
			headers,
			pending: ["dead-letters"]
		});
		await system.start();
		const accruals = async () =>
			(await api("GET", "/points/r001/history?pageSize=100")).body.rows.filter(
				(r: { cause: string }) => r.cause === "deal:dlsave1"
			).length;

		const listed = await eventually(async () => {
			const out = await system.type("dead-letters", /dead letter\(s\) waiting.*\n(.*\n)*/);
			expect(out).toContain("1 dead letter(s) waiting for a replay");
			return out;
		});
		expect(listed).toMatch(
			/0deadletter0001 onepoint\.deal\.saved \(points\) after 9 tries, .*: store unavailable \{"dealId":"dlsave1"/
		);
		expect(await accruals()).toBe(0);

		expect(await system.type("dead-letters replay 0deadletter0001", /Replayed .*\n/)).toContain(
			"Replayed 1 dead letter(s): 0deadletter0001"
		);
		await eventually(async () => expect(await accruals()).toBe(1));
		expect(await system.type("dead-letters replay 0deadletter0001", /Error.*\n/)).toContain(
			"Error [DEAD_LETTER_ALREADY_REPLAYED]"
		);
		expect(await system.type("dead-letters replay all", /Replayed .*\n/)).toContain(
			"Replayed 0 dead letter(s)"
		);
		expect(await system.type("dead-letters", /waiting.*\n/)).toContain("0 dead letter(s) waiting");
		await new Promise(resolve => setTimeout(resolve, 200));
		expect(await accruals()).toBe(1);
	});

	it("merchant <id> and merchants show the partners, their terms and this month's figures", async () => {
		await api("POST", "/merchants", { merchantId: "cafe", name: "Repl Cafe", earnRate: 0.05 });
		await api("POST", "/merchants/cafe/terms", { earnRate: 0.1, from: "2026-06-01T00:00:00Z" });
		await api("POST", "/merchants/cafe/keys", { name: "till" });
		await api("POST", "/deals", {
			memberId: "r001",
			merchantId: "cafe",
			dealAmount: 1000,
			type: "save"
		});
		const out = await system.type("merchant cafe", /\d{6} \(provisional\).*\n/);
		expect(out).toContain("Merchant cafe Repl Cafe: active, registered 2026-05-14");
		expect(out).toContain("Terms: earn rate 0.05, redemption fee 0.02, point price 1 (since ");
		expect(out).toContain(
			"from 2026-06-01T00:00:00.000Z: earn rate 0.1, redemption fee 0.02, point price 1"
		);
		expect(out).toContain("Keys: 1 active of 1");
		expect(out).toContain(
			`${month} (provisional): issued 50 points for 50, redeemed 0 points for 0 (fee 0), net 50 (the merchant pays)`
		);
		expect(await system.type("merchant nobody", /Error.*\n/)).toContain(
			"Error [MERCHANT_NOT_FOUND]"
		);

		const table = await system.type("merchants", /Coalition: .*\n/);
		expect(table).toContain(`1 registered merchant(s); ${month} (provisional):`);
		expect(table).toMatch(/'cafe' +│ +'Repl Cafe' +│ +'active' +│ +50 +│ +0 +│ +-50 /);
		expect(table).toMatch(/'20' +│ +'\(not registered\)' +│ +'default terms' +│ +\d+ +│ +490 +│/);
		expect(table).toMatch(
			/Coalition: issued \d+ points for \d+, redeemed 500 points for 490, net /
		);
	});

	it("transfer <from> <to> <points> moves points, and member <id> lists them with the other member", async () => {
		await api("POST", "/members", { memberId: "r002", name: "Kim Minji" });
		await api("POST", "/members", { memberId: "r003", name: "Lee Jiho" });
		await api("POST", "/deals", {
			memberId: "r002",
			merchantId: "20",
			dealAmount: 50000,
			type: "save"
		});
		await eventually(async () => expect((await api("GET", "/points/r002")).body.balance).toBe(500));
		expect(await system.type("transfer r002 r003 120", /Transfer .*\n/)).toMatch(
			/Transfer \w{26}: 120 points from r002 to r003, completed at 2026-05-14T/
		);
		const out = await system.type("member r003", /ledger entries:[\s\S]*└/);
		expect(out).toContain("Balance: 120 points");
		expect(out).toMatch(/transfer-in:\w+.*'transfer'.*120.*'r002'/);
		expect(await system.type("transfer r003 r003 1", /Error.*\n/)).toContain(
			"Error [TRANSFER_TO_SELF]"
		);
	});

	it("import <file> applies a CSV with a progress bar, reports refused rows, and skips every row the second time", async () => {
		const file = path.join(system.dataDir, "members.csv");
		fs.writeFileSync(
			file,
			[
				"memberId,name,phone,email,points,earnedAt",
				...Array.from(
					{ length: 300 },
					(_, i) => `imp${i + 1},Imported ${i + 1},,,${i + 1},2026-04-20`
				),
				"imp-bad,Bad,,,lots,2026-04-20"
			].join("\n")
		);
		const out = await system.type(
			`import ${file}`,
			/Import \w+ completed.*\n[\s\S]*row 302/,
			60_000
		);
		expect(out).toMatch(/Import \w+: 301 rows/);
		// The bar: rows done of the total, the rate and the time left.
		expect(out).toMatch(/Import \[=+\] 100% \| 301\/301 rows \| \d+ rows\/s \| ETA \d+s/);
		expect(out).toMatch(/301 of 301 rows, 300 created, 0 skipped, 1 refused/);
		expect(out).toContain("row 302: INVALID_POINTS");
		await eventually(async () =>
			expect((await api("GET", "/points/imp300")).body.balance).toBe(300)
		);

		const again = await system.type(`import ${file}`, /Import \w+ completed.*\n/, 60_000);
		expect(again).toMatch(/301 of 301 rows, 0 created, 300 skipped, 1 refused/);
		expect(await system.type("import /no/such/file.csv", /Error.*\n/)).toMatch(
			/Error \[ERROR\]: ENOENT/
		);
	});
});
