/**
 * The system as `npm start` runs it, driven over real HTTP: the seed's scenario, a restart on the same
 * data, duplicate delivery, racing uses and hostile input.
 */
import { eventually } from "../helpers/broker";
import { isStored, storeChannelMessage } from "../helpers/channel-store";
import { faketime } from "../helpers/clock";
import { System } from "../helpers/system";

jest.setTimeout(60_000);

describe("OnePoint over HTTP", () => {
	let system: System;
	const api = <T = any>(method: string, urlPath: string, body?: unknown) =>
		system.call<T>(method, `/api${urlPath}`, body);
	const balance = async (memberId: string) =>
		(await api("GET", `/points/${memberId}`)).body.balance as number;
	// The node's clock (libfaketime) is in May 2026: "this month" is 202605.
	const month = "202605";
	const ids: Record<number, string> = {};

	beforeAll(async () => {
		system = await System.start(faketime("2026-05-14 10:00:00"));
	});
	afterAll(() => system.stop());

	async function ledgerSum(memberId: string): Promise<number> {
		const { body } = await api("GET", `/points/${memberId}/history?pageSize=100`);
		expect(body.total).toBeLessThanOrEqual(100);
		return body.rows.reduce((sum: number, row: { amount: number }) => sum + row.amount, 0);
	}

	describe("the seed's scenario", () => {
		it("joins members 0001 and 0002, each with an account", async () => {
			for (const memberId of ["0001", "0002"]) {
				const joined = await api("POST", "/members", { memberId, name: `member ${memberId}` });
				expect(joined.status).toBe(201);
				expect(joined.body).toMatchObject({
					memberId,
					status: "active",
					joinedAt: expect.any(String)
				});
			}
			expect((await api("POST", "/members", { memberId: "0001", name: "again" })).status).toBe(409);
			await eventually(async () => expect(await balance("0002")).toBe(0));
		});

		it("1. a save of 100000 earns 1000", async () => {
			const res = await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: "100000",
				type: "save"
			});
			expect(res.status).toBe(201);
			expect(res.body).toMatchObject({
				point: 1000,
				status: "success",
				dealDate: expect.any(String)
			});
			ids[1] = res.body.id;
			await eventually(async () => expect(await balance("0001")).toBe(1000));
			expect((await api("GET", `/deals/${ids[1]}`)).body).toMatchObject({
				point: 1000,
				status: "success"
			});
		});

		it('2. a use of point=" 100" leaves 900 and shows in the billing view', async () => {
			const res = await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: "10000",
				type: "use",
				point: " 100"
			});
			expect(res.body).toMatchObject({ point: 100, status: "success" });
			ids[2] = res.body.id;
			expect(await balance("0001")).toBe(900);
			await eventually(async () =>
				expect((await api("GET", `/billing-amount-views/${ids[2]}`)).body).toMatchObject({
					dealId: ids[2],
					point: 100,
					merchantId: "20"
				})
			);
		});

		it("3. a use of 10000 fails and changes nothing", async () => {
			const res = await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: "10000",
				type: "use",
				point: "10000"
			});
			expect(res.body).toMatchObject({
				point: 10000,
				status: "fail",
				reason: "INSUFFICIENT_POINTS"
			});
			ids[3] = res.body.id;
			expect(await balance("0001")).toBe(900);
			expect((await api("GET", `/billing-amount-views/${ids[3]}`)).status).toBe(404);
		});

		it("4. another save brings 0001 to 1900", async () => {
			ids[4] = (
				await api("POST", "/deals", {
					memberId: "0001",
					merchantId: "20",
					dealAmount: "100000",
					type: "save"
				})
			).body.id;
			await eventually(async () => expect(await balance("0001")).toBe(1900));
		});

		it("5. 0002 saves 100000 and uses 200 twice: 600", async () => {
			await api("POST", "/deals", {
				memberId: "0002",
				merchantId: "20",
				dealAmount: "100000",
				type: "save"
			});
			await eventually(async () => expect(await balance("0002")).toBe(1000));
			for (let i = 0; i < 2; i++)
				expect(
					(
						await api("POST", "/deals", {
							memberId: "0002",
							merchantId: "20",
							dealAmount: "10000",
							type: "use",
							point: " 200"
						})
					).body.status
				).toBe("success");
			expect(await balance("0002")).toBe(600);
		});

		it("6. settling merchant 20 for this month gives 490 on the spot, provisional while the month is open", async () => {
			await eventually(async () => {
				const views = await api("GET", `/deals?merchantId=20&pageSize=100`);
				const uses = views.body.rows.filter(
					(d: { type: string; status: string }) => d.type === "use" && d.status === "success"
				);
				for (const deal of uses)
					expect((await api("GET", `/billing-amount-views/${deal.id}`)).status).toBe(200);
			});
			const first = await api("POST", "/billings", { merchantId: "20", billingMonth: month });
			expect(first.status).toBe(200);
			expect(first.body).toMatchObject({
				merchantId: "20",
				billingMonth: month,
				status: "provisional",
				usedPoints: 500,
				dealCount: 3,
				billingAmount: 490
			});
			// The use side; the saves at merchant 20 are the other side of the same settlement.
			expect(
				first.body.lines
					.filter((l: { type: string }) => l.type === "use")
					.map((l: { points: number }) => l.points)
					.sort()
			).toEqual([100, 200, 200]);
			const { computedAt: _at, ...figures } = first.body;
			expect(
				(await api("POST", "/billings", { merchantId: "20", billingMonth: month })).body
			).toMatchObject(figures);
			expect((await api("GET", `/billings/20/${month}`)).body).toMatchObject(figures);
		});

		it("keeps every balance equal to the sum of its ledger", async () => {
			expect(await ledgerSum("0001")).toBe(1900);
			expect(await ledgerSum("0002")).toBe(600);
		});
	});

	it("loses nothing across a restart on the same data folder", async () => {
		// A provisional settlement says when it was computed: compare the rest.
		const read = () =>
			Promise.all([
				api("GET", "/points/0001"),
				api("GET", `/deals/${ids[2]}`),
				api("GET", `/billings/20/${month}`),
				api("GET", "/points/0002/history")
			]);
		const bodies = (replies: { body: { computedAt?: string } }[]) =>
			replies.map(({ body: { computedAt: _at, ...body } }) => body);
		const before = await read();
		await system.stop();
		await system.start();
		expect(bodies(await read())).toEqual(bodies(before));
	});

	it("applies an event delivered twice only once", async () => {
		await api("POST", "/members", { memberId: "0300", name: "dup" });
		const saved = (
			await api("POST", "/deals", {
				memberId: "0300",
				merchantId: "20",
				dealAmount: "50000",
				type: "save"
			})
		).body;
		await eventually(async () => expect(await balance("0300")).toBe(500));
		// Deliver the accrual again the way a crash before an acknowledgement would: the same
		// message once more in the channel store, picked up at the next start.
		await system.stop();
		const payload = {
			dealId: saved.id,
			memberId: "0300",
			merchantId: "20",
			dealAmount: 50000,
			type: "save",
			point: 500,
			dealDate: saved.dealDate
		};
		const id = `zz${Date.now()}`;
		storeChannelMessage(system.dataDir, {
			id,
			channel: "onepoint.deal.saved",
			payload: JSON.stringify(payload),
			pending: ["points"]
		});
		await system.start();
		// Handled by every group, the message's row is deleted.
		await eventually(() => expect(isStored(system.dataDir, id)).toBe(false));
		expect(await balance("0300")).toBe(500);
		const history = (await api("GET", "/points/0300/history")).body;
		expect(history.total).toBe(1);
	});

	it("lets exactly the affordable uses among 50 racing ones succeed", async () => {
		await api("POST", "/members", { memberId: "0400", name: "race" });
		await api("POST", "/deals", {
			memberId: "0400",
			merchantId: "20",
			dealAmount: "100000",
			type: "save"
		});
		await eventually(async () => expect(await balance("0400")).toBe(1000));
		const results = await Promise.all(
			Array.from({ length: 50 }, () =>
				api("POST", "/deals", {
					memberId: "0400",
					merchantId: "20",
					dealAmount: "1000",
					type: "use",
					point: "70"
				})
			)
		);
		const statuses = results.map(r => r.body.status);
		expect(statuses.filter(s => s === "success")).toHaveLength(14);
		expect(statuses.filter(s => s === "fail")).toHaveLength(36);
		expect(await balance("0400")).toBe(20);
		expect(await ledgerSum("0400")).toBe(20);
	});

	it("cancels a deal exactly once under concurrent requests", async () => {
		const used = (
			await api("POST", "/deals", {
				memberId: "0001",
				merchantId: "20",
				dealAmount: "1000",
				type: "use",
				point: "300"
			})
		).body;
		expect(await balance("0001")).toBe(1600);
		const replies = await Promise.all(
			Array.from({ length: 5 }, () => api("POST", `/deals/${used.id}/cancel`))
		);
		expect(replies.map(r => r.status).sort()).toEqual([200, 409, 409, 409, 409]);
		await eventually(async () => expect(await balance("0001")).toBe(1900));
		await new Promise(resolve => setTimeout(resolve, 200));
		expect(await balance("0001")).toBe(1900);
		expect(await ledgerSum("0001")).toBe(1900);
	});

	it("withdraws a member: points expire in the ledger and later deals are refused", async () => {
		await api("POST", "/members", { memberId: "0500", name: "leaving" });
		await api("POST", "/deals", {
			memberId: "0500",
			merchantId: "20",
			dealAmount: "30000",
			type: "save"
		});
		await eventually(async () => expect(await balance("0500")).toBe(300));
		expect((await api("DELETE", "/members/0500")).body).toMatchObject({ status: "withdrawn" });
		await eventually(async () => expect(await balance("0500")).toBe(0));
		const expiry = (await api("GET", "/points/0500/history")).body.rows[0];
		expect(expiry).toMatchObject({ cause: "expiry:0500", kind: "expire", amount: -300 });
		const refused = await api("POST", "/deals", {
			memberId: "0500",
			merchantId: "20",
			dealAmount: "30000",
			type: "save"
		});
		expect(refused.status).toBe(409);
		expect(refused.body.type).toBe("MEMBER_WITHDRAWN");
	});

	describe("bad input", () => {
		const cases: [string, string, string, unknown, number, string][] = [
			["missing fields", "POST", "/deals", { memberId: "0001" }, 422, "VALIDATION_ERROR"],
			[
				"negative amount",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: -100, type: "save" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"non-numeric amount",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: "lots", type: "save" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"fractional points",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "use", point: 1.5 },
				422,
				"VALIDATION_ERROR"
			],
			[
				"negative points",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "use", point: -500 },
				422,
				"VALIDATION_ERROR"
			],
			[
				"a use without points",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "use" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"unknown type",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "gift" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"overflowing amount",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: 1e300, type: "save" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"unknown field",
				"POST",
				"/deals",
				{ memberId: "0001", merchantId: "20", dealAmount: 100, type: "save", status: "success" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"operator as member id in body",
				"POST",
				"/deals",
				{ memberId: { $gt: "" }, merchantId: "20", dealAmount: 100, type: "save" },
				422,
				"VALIDATION_ERROR"
			],
			[
				"operator as id in path",
				"GET",
				`/points/${encodeURIComponent('{"$gt": ""}')}`,
				undefined,
				422,
				"VALIDATION_ERROR"
			],
			[
				"operator as deal id",
				"POST",
				`/deals/${encodeURIComponent('{"$gt":""}')}/cancel`,
				undefined,
				422,
				"VALIDATION_ERROR"
			],
			[
				"$where in a filter",
				"GET",
				"/deals?memberId[$where]=1",
				undefined,
				422,
				"VALIDATION_ERROR"
			],
			["malformed JSON", "POST", "/deals", '{"memberId": "0001",', 400, "INVALID_JSON"],
			[
				"unknown member",
				"POST",
				"/deals",
				{ memberId: "7777", merchantId: "20", dealAmount: 100, type: "save" },
				404,
				"MEMBER_NOT_FOUND"
			],
			["unknown deal", "GET", "/deals/nosuchdeal", undefined, 404, "DEAL_NOT_FOUND"],
			["unknown route", "GET", "/nowhere", undefined, 404, "NOT_FOUND"],
			["member without name", "POST", "/members", { memberId: "0600" }, 422, "VALIDATION_ERROR"],
			[
				"bad billing month",
				"POST",
				"/billings",
				{ merchantId: "20", billingMonth: "2020-7" },
				422,
				"VALIDATION_ERROR"
			]
		];

		it.each(cases)(
			"%s (%s %s) is refused and changes nothing",
			async (_name, method, urlPath, body, status, type) => {
				const before = await Promise.all([
					api("GET", "/points/0001"),
					api("GET", "/deals?pageSize=1"),
					api("GET", "/points/0001/history?pageSize=1")
				]);
				const res = await api(method, urlPath, body);
				expect(res.status).toBe(status);
				expect(res.body).toMatchObject({
					code: status,
					type,
					name: expect.any(String),
					message: expect.any(String)
				});
				expect(JSON.stringify(res.body)).not.toMatch(/\bat .*\.js:\d+/);
				const after = await Promise.all([
					api("GET", "/points/0001"),
					api("GET", "/deals?pageSize=1"),
					api("GET", "/points/0001/history?pageSize=1")
				]);
				expect(after.map(r => r.body)).toEqual(before.map(r => r.body));
			}
		);
	});
});
