import type { ServiceBroker } from "moleculer";
import { outboxEvent, type OutboxEvent, type TransferSent } from "../../contracts/channels";
import { transferOut, type Draft, type Refusal } from "../../lib/posting";
import ApiService from "../../services/api.service";
import DashboardService from "../../services/dashboard.service";
import IdempotencyService from "../../services/idempotency.service";
import MembersService from "../../services/members.service";
import PointsService, {
	type Account,
	type AccountView,
	type PostResult,
	type TransferRow,
	type TransferView
} from "../../services/points.service";
import { createTestBroker, drained, eventually, withSettings } from "../helpers/broker";
import { clockFrom } from "../helpers/clock";
import { freePort, TOKENS } from "../helpers/system";

interface Entry {
	cause: string;
	kind: string;
	amount: number;
	balanceAfter: number;
	sourceType: string;
	sourceId: string;
	counterpartId?: string;
	at: string;
}

/** What the points service does inside: a posting, as the transfer action makes its sender's. */
interface Points {
	post(
		memberId: string,
		plan: (
			account: Account,
			at: string
		) => Promise<Draft[] | { drafts: Draft[]; events: OutboxEvent[] } | Refusal>
	): Promise<PostResult>;
}

const LIMIT = 1000;

describe("transfers between members", () => {
	// The test's clock: "today" is 14 May 2026 (UTC) until a test moves it.
	clockFrom("2026-05-14T10:00:00.000Z");
	let broker: ServiceBroker;
	let port: number;

	const transfer = (memberId: string, params: object, meta: object = {}) =>
		broker.call<TransferView, object>(
			"points.transfer",
			{ memberId, ...params },
			{ meta: { user: { kind: "staff" }, ...meta } }
		);
	const history = async (memberId: string) =>
		(
			await broker.call<{ rows: Entry[] }, object>("points.history", {
				memberId,
				pageSize: 100
			})
		).rows;
	const transfers = async (memberId: string) =>
		(
			await broker.call<{ rows: TransferRow[]; total: number }, object>("points.transfers", {
				memberId,
				pageSize: 100
			})
		).rows;
	const balance = async (memberId: string) =>
		(await broker.call<AccountView, object>("points.get", { memberId })).balance;
	const join = async (memberId: string, points = 0) => {
		await broker.call("members.join", { memberId, name: `Member ${memberId}` });
		await eventually(() => broker.call("points.get", { memberId }));
		if (points) await broker.call("points.adjust", { memberId, amount: points, reason: "Opening" });
	};
	const withdraw = async (memberId: string) => {
		await broker.call("members.withdraw", { memberId });
		await eventually(async () =>
			expect((await broker.call<AccountView, object>("points.get", { memberId })).status).toBe(
				"closed"
			)
		);
	};
	/** Every balance and ledger of these members, and the number of entries in the whole ledger. */
	const state = async (memberIds: string[]) => ({
		entries: (await broker.call<{ entries: number }>("points.audit")).entries,
		members: await Promise.all(
			memberIds.map(async memberId => ({
				memberId,
				balance: await balance(memberId),
				ledger: await history(memberId)
			}))
		)
	});
	const http = async <T = TransferView>(
		method: string,
		path: string,
		body?: object,
		token = TOKENS.staff
	) => {
		const res = await fetch(`http://127.0.0.1:${port}/api${path}`, {
			method,
			headers: {
				Authorization: `Bearer ${token}`,
				...(body ? { "Content-Type": "application/json" } : {})
			},
			body: body && JSON.stringify(body)
		});
		return { status: res.status, headers: res.headers, body: (await res.json()) as T };
	};
	/** A channel's message, as its producer would send it (a redelivery, here). */
	const send = (channel: string, payload: object) =>
		(broker as unknown as { sendToChannel(c: string, p: object): Promise<void> }).sendToChannel(
			channel,
			payload
		);
	/** The sender's side of a transfer, written as the action writes it (with its event), by a request that dies there. */
	const sentOnly = (sent: Omit<TransferSent, "at">) =>
		(broker.getLocalService("points") as unknown as Points).post(
			sent.fromMemberId,
			async (account, at) => {
				const drafts = transferOut(account, sent, 0, LIMIT);
				return typeof drafts === "string"
					? drafts
					: { drafts, events: [outboxEvent("transfer.sent", { ...sent, at })] };
			}
		);

	beforeAll(async () => {
		port = await freePort();
		broker = createTestBroker(
			[
				ApiService,
				IdempotencyService,
				MembersService,
				withSettings(PointsService, { transferDailyLimit: LIMIT }),
				DashboardService
			],
			{
				PORT: String(port),
				HOST: "127.0.0.1",
				API_KEYS: `${TOKENS.staff}=staff,${TOKENS.merchant20}=merchant:20`
			}
		);
		await broker.start();
	});
	afterAll(() => broker.stop());
	afterEach(() =>
		eventually(async () =>
			expect((await broker.call<{ mismatches: unknown[] }>("points.audit")).mismatches).toEqual([])
		)
	);

	it("moves points from one member to another: 201 with its Location, an entry on each side, both balances", async () => {
		await join("t001", 500);
		await join("t002", 100);
		const res = await http("POST", "/points/t001/transfers", { toMemberId: "t002", points: 200 });
		expect(res.status).toBe(201);
		expect(res.headers.get("location")).toBe("/api/points/t001/transfers");
		const { transferId } = res.body as TransferView;
		expect(transferId).toMatch(/^[0-9A-Z]{26}$/);
		expect(res.body).toEqual({
			transferId,
			fromMemberId: "t001",
			toMemberId: "t002",
			points: 200,
			status: "completed",
			at: expect.stringMatching(/^2026-05-14T10:/)
		});
		expect([await balance("t001"), await balance("t002")]).toEqual([300, 300]);

		const [out] = await history("t001");
		const [received] = await history("t002");
		const about = { sourceType: "transfer", sourceId: transferId };
		expect(out).toMatchObject({
			cause: `transfer-out:${transferId}`,
			kind: "transfer",
			amount: -200,
			balanceAfter: 300,
			counterpartId: "t002",
			at: res.body.at,
			...about
		});
		expect(received).toMatchObject({
			cause: `transfer-in:${transferId}`,
			kind: "transfer",
			amount: 200,
			balanceAfter: 300,
			counterpartId: "t001",
			...about
		});

		const row = { transferId, fromMemberId: "t001", toMemberId: "t002", points: 200 };
		expect(await transfers("t001")).toEqual([
			{ ...row, direction: "sent", status: "completed", at: out.at }
		]);
		expect(await transfers("t002")).toEqual([
			{ ...row, direction: "received", status: "completed", at: received.at }
		]);
		expect((await http<object>("GET", "/points/t002/transfers")).body).toMatchObject({
			total: 1,
			rows: [{ transferId, direction: "received" }]
		});

		// Staff only: a merchant token may not move a member's points.
		const refused = await http(
			"POST",
			"/points/t001/transfers",
			{
				toMemberId: "t002",
				points: 1
			},
			TOKENS.merchant20
		);
		expect(refused.status).toBe(403);
		expect(await balance("t001")).toBe(300);

		// The dashboard lists each side among the member's transactions, naming the other member.
		await drained(broker);
		const latest = async (memberId: string) =>
			(await broker.call<{ latest: object[] }, object>("dashboard.member", { memberId })).latest;
		expect(await latest("t001")).toContainEqual(
			expect.objectContaining({
				kind: "transfer",
				id: transferId,
				type: "out",
				point: -200,
				status: "sent",
				counterpartId: "t002"
			})
		);
		expect(await latest("t002")).toContainEqual(
			expect.objectContaining({ kind: "transfer", type: "in", point: 200, counterpartId: "t001" })
		);
	});

	describe("refusals", () => {
		const members = ["b001", "b002", "b003"];
		beforeAll(async () => {
			await join("b001", 800);
			await join("b002", 5000);
			await join("b003", 50);
			await withdraw("b003");
		});

		it.each([
			["to oneself", 422, "TRANSFER_TO_SELF", "b001", { toMemberId: "b001", points: 10 }],
			[
				"from an unknown member",
				404,
				"MEMBER_NOT_FOUND",
				"nobody",
				{ toMemberId: "b002", points: 10 }
			],
			[
				"to an unknown member",
				404,
				"MEMBER_NOT_FOUND",
				"b001",
				{ toMemberId: "nobody", points: 10 }
			],
			[
				"from a withdrawn member",
				409,
				"MEMBER_WITHDRAWN",
				"b003",
				{ toMemberId: "b001", points: 10 }
			],
			[
				"to a withdrawn member",
				409,
				"MEMBER_WITHDRAWN",
				"b001",
				{ toMemberId: "b003", points: 10 }
			],
			[
				"more than the balance",
				409,
				"INSUFFICIENT_POINTS",
				"b001",
				{ toMemberId: "b002", points: 801 }
			],
			[
				"over the daily limit",
				409,
				"TRANSFER_LIMIT_EXCEEDED",
				"b002",
				{ toMemberId: "b001", points: 1001 }
			],
			["0 points", 422, "VALIDATION_ERROR", "b001", { toMemberId: "b002", points: 0 }],
			["-1 points", 422, "VALIDATION_ERROR", "b001", { toMemberId: "b002", points: -1 }],
			[
				"points that are not a number",
				422,
				"VALIDATION_ERROR",
				"b001",
				{ toMemberId: "b002", points: "abc" }
			],
			[
				"a fraction of a point",
				422,
				"VALIDATION_ERROR",
				"b001",
				{ toMemberId: "b002", points: 1.5 }
			],
			["a boolean", 422, "VALIDATION_ERROR", "b001", { toMemberId: "b002", points: true }],
			[
				"more than a billion",
				422,
				"VALIDATION_ERROR",
				"b001",
				{ toMemberId: "b002", points: 1_000_000_001 }
			],
			["no points", 422, "VALIDATION_ERROR", "b001", { toMemberId: "b002" }],
			["no receiver", 422, "VALIDATION_ERROR", "b001", { points: 10 }],
			[
				"a receiver that is a query",
				422,
				"VALIDATION_ERROR",
				"b001",
				{ toMemberId: { $gt: "" }, points: 10 }
			],
			[
				"an unknown field",
				422,
				"VALIDATION_ERROR",
				"b001",
				{ toMemberId: "b002", points: 10, note: "hi" }
			]
		])("refuses a transfer %s: %i %s, nothing changed", async (_, code, type, memberId, params) => {
			const before = await state(members);
			await expect(transfer(memberId, params)).rejects.toMatchObject({ code, type });
			expect(await state(members)).toEqual(before);
		});
	});

	it("counts a sender's transfers of the day against the limit, also when they race, and starts again the next UTC day", async () => {
		await join("l001", 10_000);
		await join("l002");
		expect(await transfer("l001", { toMemberId: "l002", points: 600 })).toMatchObject({
			status: "completed"
		});
		const before = await state(["l001", "l002"]);
		await expect(transfer("l001", { toMemberId: "l002", points: 500 })).rejects.toMatchObject({
			code: 409,
			type: "TRANSFER_LIMIT_EXCEEDED",
			data: { limit: LIMIT, sentToday: 600, points: 500 }
		});
		expect(await state(["l001", "l002"])).toEqual(before);

		// 20 transfers of 50 race for the 400 left today: exactly 8 go through.
		const results = await Promise.allSettled(
			Array.from({ length: 20 }, () => transfer("l001", { toMemberId: "l002", points: 50 }))
		);
		expect(results.filter(r => r.status === "fulfilled")).toHaveLength(8);
		expect(new Set(results.map(r => (r.status === "rejected" ? r.reason.type : "ok")))).toEqual(
			new Set(["ok", "TRANSFER_LIMIT_EXCEEDED"])
		);
		expect([await balance("l001"), await balance("l002")]).toEqual([9000, 1000]);

		// A minute after midnight (UTC), the day's limit is whole again.
		jest.setSystemTime(new Date("2026-05-15T00:01:00.000Z"));
		expect(await transfer("l001", { toMemberId: "l002", points: LIMIT })).toMatchObject({
			status: "completed",
			at: expect.stringMatching(/^2026-05-15T00:01/)
		});
		await expect(transfer("l001", { toMemberId: "l002", points: 1 })).rejects.toMatchObject({
			type: "TRANSFER_LIMIT_EXCEEDED",
			data: { sentToday: LIMIT }
		});
	});

	it("never takes a sender below 0, however many transfers race", async () => {
		await join("r001", 250);
		await join("r002");
		const results = await Promise.allSettled(
			Array.from({ length: 10 }, () => transfer("r001", { toMemberId: "r002", points: 50 }))
		);
		expect(results.filter(r => r.status === "fulfilled")).toHaveLength(5);
		expect([await balance("r001"), await balance("r002")]).toEqual([0, 250]);
	});

	it("finishes a transfer whose request died after the sender's write: the event credits the receiver, once", async () => {
		await join("c001", 300);
		await join("c002");
		const sent = {
			transferId: "01JCRASHEDTRANSFER00000001",
			fromMemberId: "c001",
			toMemberId: "c002",
			points: 120
		};
		expect(await sentOnly(sent)).toMatchObject({ applied: true });
		await eventually(async () =>
			expect(await transfers("c001")).toMatchObject([{ status: "completed" }])
		);
		expect([await balance("c001"), await balance("c002")]).toEqual([180, 120]);

		// The event again (a redelivery) changes nothing.
		const [out] = await history("c001");
		const again = { ...sent, at: out.at };
		const before = await state(["c001", "c002"]);
		await send("transfer.sent", again);
		await send("transfer.sent", again);
		await drained(broker);
		expect(await state(["c001", "c002"])).toEqual(before);
	});

	it("refunds the sender when the receiver withdrew between the sender's write and the credit", async () => {
		await join("w001", 300);
		await join("w002", 40);
		await withdraw("w002");
		const sent = {
			transferId: "01JWITHDRAWNRECEIVER000001",
			fromMemberId: "w001",
			toMemberId: "w002",
			points: 100
		};
		await sentOnly(sent);
		await eventually(async () =>
			expect((await history("w001")).map(e => [e.cause, e.kind, e.amount])).toEqual([
				[`transfer-refund:${sent.transferId}`, "restore", 100],
				[`transfer-out:${sent.transferId}`, "transfer", -100],
				[expect.stringMatching(/^adjustment:/), "adjust", 300]
			])
		);
		expect(await balance("w001")).toBe(300);
		// The receiver got nothing: its ledger is its opening and its withdrawal.
		expect((await history("w002")).map(e => e.kind)).toEqual(["expire", "adjust"]);
		expect(await balance("w002")).toBe(0);
		const [out] = await history("w001").then(rows => rows.filter(e => e.amount < 0));
		expect(await transfers("w001")).toEqual([
			{
				...sent,
				direction: "sent",
				status: "failed",
				reason: "MEMBER_WITHDRAWN",
				at: out.at
			}
		]);

		// A redelivered event, and the request run again under its id, change nothing and answer the same.
		const before = await state(["w001", "w002"]);
		await send("transfer.sent", { ...sent, at: out.at });
		await drained(broker);
		expect(
			await transfer("w001", { toMemberId: "w002", points: 100 }, { requestId: sent.transferId })
		).toEqual({ ...sent, status: "failed", reason: "MEMBER_WITHDRAWN", at: out.at });
		expect(await state(["w001", "w002"])).toEqual(before);
	});

	it("transfers once for one request run twice (Idempotency-Key: its gateway died before answering)", async () => {
		await join("i001", 500);
		await join("i002");
		const requestId = "01JREQUESTTRANSFER00000001";
		const [first, again] = await Promise.all(
			[1, 2].map(() => transfer("i001", { toMemberId: "i002", points: 70 }, { requestId }))
		);
		expect(first).toEqual({
			transferId: requestId,
			fromMemberId: "i001",
			toMemberId: "i002",
			points: 70,
			status: "completed",
			at: expect.any(String)
		});
		expect(again).toEqual(first);
		expect(await transfer("i001", { toMemberId: "i002", points: 70 }, { requestId })).toEqual(
			first
		);
		expect((await history("i001")).map(e => e.cause)).toContain(`transfer-out:${requestId}`);
		expect((await history("i002")).map(e => [e.cause, e.amount])).toEqual([
			[`transfer-in:${requestId}`, 70]
		]);
		expect([await balance("i001"), await balance("i002")]).toEqual([430, 70]);
	});

	it("keeps every balance equal to its ledger and the total unchanged through 50 concurrent transfers among 10 members", async () => {
		const members = Array.from({ length: 10 }, (_, i) => `x${String(i).padStart(3, "0")}`);
		for (const memberId of members) await join(memberId, 1000);
		const total = async () =>
			(await Promise.all(members.map(balance))).reduce((sum, b) => sum + b, 0);
		expect(await total()).toBe(10_000);

		// Each member sends 5 transfers of 10 to 99 points (within its balance and the limit) to the others.
		const made = await Promise.all(
			Array.from({ length: 50 }, (_, i) =>
				transfer(members[i % 10], {
					toMemberId: members[(i + 1 + (i % 9)) % 10],
					points: 10 + ((i * 37) % 90)
				})
			)
		);
		await drained(broker);

		expect(await total()).toBe(10_000);
		const audit = await broker.call<{ mismatches: unknown[] }>("points.audit");
		expect(audit.mismatches).toEqual([]);
		const causes = new Set((await Promise.all(members.map(history))).flat().map(e => e.cause));
		for (const t of made) {
			expect(t.status).toBe("completed");
			expect(causes.has(`transfer-out:${t.transferId}`)).toBe(true);
			expect(causes.has(`transfer-in:${t.transferId}`)).toBe(true);
		}
		expect([...causes].filter(c => c.startsWith("transfer-out:"))).toHaveLength(made.length);
		expect([...causes].filter(c => c.startsWith("transfer-in:"))).toHaveLength(made.length);
	});
});
