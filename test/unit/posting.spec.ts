/**
 * The posting rules (lib/posting.ts) without a broker or a store: causes, the entries each change
 * drafts from an account as read, and the account after applying them. And the retry-on-race loop
 * (lib/retry-on-race.ts) both points and deals write through.
 */
import type { DealReturnedEvent } from "../../contracts/channels";
import { sumOf } from "../../lib/expiry";
import {
	adjustment,
	applyDrafts,
	Cause,
	dealSource,
	debiting,
	earning,
	expiries,
	lotsOf,
	opening,
	orderSource,
	partialReturn,
	postedOf,
	restoration,
	reversal,
	revocation,
	totalOf,
	transferIn,
	transferOf,
	transferOut,
	transferRefund,
	withdrawal,
	type AccountState,
	type Draft,
	type Source
} from "../../lib/posting";
import { LOST, retryOnRace } from "../../lib/retry-on-race";

const account = (
	balance: number,
	lots?: AccountState["lots"],
	status: AccountState["status"] = "active"
): AccountState => ({
	_id: "m1",
	balance,
	status,
	updatedAt: "2026-05-10T12:00:00.000Z",
	...(lots ? { lots } : {})
});
const deal: Source = { memberId: "m1", sourceType: "deal", sourceId: "d1", merchantId: "20" };
const order: Source = { memberId: "m1", sourceType: "order", sourceId: "o1" };

/** Sequence numbers a test can predict. */
const counter = () => {
	let n = 0;
	return () => String(++n).padStart(4, "0");
};

describe("causes (lib/posting.ts)", () => {
	it.each([
		[Cause.of(deal), "deal:d1"],
		[Cause.of(order), "order:o1"],
		[Cause.cancel(deal), "deal-cancel:d1"],
		[Cause.cancel(order), "order-cancel:o1"],
		[Cause.dealReturn("d1", 2), "deal-return:d1:2"],
		[Cause.withdrawal("m1"), "expiry:m1"],
		[Cause.afterWithdrawal("m1", "deal:d1"), "expiry:m1:deal:d1"],
		[Cause.lotExpiry("m1", "202601"), "expire:m1:202601"],
		[Cause.adjustment("01J0"), "adjustment:01J0"]
	])("%s is %s", (built, expected) => expect(built).toBe(expected));

	it("reads the adjustment back from its cause, and sources from events", () => {
		expect(Cause.adjustmentIdOf(Cause.adjustment("01J0"))).toBe("01J0");
		expect(
			dealSource({
				dealId: "d1",
				memberId: "m1",
				merchantId: "20",
				dealAmount: 1,
				type: "save",
				point: 1,
				dealDate: "2026-05-01T00:00:00Z"
			})
		).toEqual(deal);
		expect(
			orderSource({
				orderId: "o1",
				memberId: "m1",
				productId: "p",
				qty: 1,
				unitPrice: 1,
				totalPrice: 1,
				rate: 0,
				points: 0
			})
		).toEqual(order);
	});
});

describe("drafting rules (lib/posting.ts)", () => {
	it.each<[string, AccountState, Draft[]]>([
		[
			"an active member earns",
			account(0),
			[{ _id: "deal:d1", kind: "earn", amount: 100, ...deal }]
		],
		[
			"a withdrawn member's earning expires on arrival",
			account(0, {}, "closed"),
			[
				{ _id: "deal:d1", kind: "earn", amount: 100, ...deal },
				{ _id: "expiry:m1:deal:d1", kind: "expire", amount: -100, ...deal }
			]
		]
	])("earning: %s", (_, acc, drafts) => expect(earning(acc, deal, 100)).toEqual(drafts));

	it("restores a use, expiring on arrival after a withdrawal", () => {
		expect(restoration(account(0), "deal-cancel:d1", deal, 40)).toEqual([
			{ _id: "deal-cancel:d1", kind: "restore", amount: 40, ...deal }
		]);
		expect(restoration(account(0, {}, "closed"), "deal-cancel:d1", deal, 40)).toEqual([
			{ _id: "deal-cancel:d1", kind: "restore", amount: 40, ...deal },
			{ _id: "expiry:m1:deal-cancel:d1", kind: "expire", amount: -40, ...deal }
		]);
	});

	it.each<[number, number, number, number | undefined]>([
		// points, balance → amount taken, shortfall
		[100, 500, -100, undefined],
		[100, 100, -100, undefined],
		[100, 30, -30, 70],
		[100, 0, 0, 100]
	])(
		"revokes %i points from a balance of %i: %i, shortfall %s — never below 0",
		(points, balance, amount, shortfall) => {
			const draft = revocation("deal-cancel:d1", deal, points, balance);
			expect(draft).toEqual({
				_id: "deal-cancel:d1",
				kind: "revoke",
				amount,
				...deal,
				...(shortfall ? { shortfall } : {})
			});
			expect(balance + draft.amount).toBeGreaterThanOrEqual(0);
			expect(-draft.amount + (draft.shortfall ?? 0)).toBe(points);
		}
	);

	it("expires each lot due as its own entry, naming the lot", () => {
		const acc = account(600, { "202601": 100, "202602": 200, "202603": 300 });
		expect(expiries(acc, "202602")).toEqual([
			{
				_id: "expire:m1:202601",
				kind: "expire",
				amount: -100,
				sourceType: "member",
				sourceId: "m1",
				lotMonth: "202601"
			},
			{
				_id: "expire:m1:202602",
				kind: "expire",
				amount: -200,
				sourceType: "member",
				sourceId: "m1",
				lotMonth: "202602"
			}
		]);
		expect(expiries(acc, "202512")).toEqual([]);
		expect(totalOf(expiries(acc, "202612"))).toBe(-600);
	});

	it("counts an account's balance without lots as earned in the month of its last change", () => {
		expect(lotsOf(account(250))).toEqual({ "202605": 250 });
		expect(lotsOf(account(250, { "202601": 50 }))).toEqual({ "202601": 50, "202605": 200 });
		expect(expiries(account(250), "202605")).toEqual([
			expect.objectContaining({ _id: "expire:m1:202605", amount: -250 })
		]);
	});

	it.each<[string, AccountState, number, string | undefined, Draft[] | string]>([
		[
			"within the balance",
			account(500),
			200,
			undefined,
			[{ _id: "deal:d1", kind: "use", amount: -200, ...deal }]
		],
		[
			"the whole balance",
			account(500),
			500,
			undefined,
			[{ _id: "deal:d1", kind: "use", amount: -500, ...deal }]
		],
		["beyond the balance", account(500), 501, undefined, "INSUFFICIENT_POINTS"],
		["on a closed account", account(500, {}, "closed"), 1, undefined, "ACCOUNT_CLOSED"],
		[
			"with lots due: they expire first",
			account(300, { "202601": 100, "202605": 200 }),
			150,
			"202603",
			[
				{
					_id: "expire:m1:202601",
					kind: "expire",
					amount: -100,
					sourceType: "member",
					sourceId: "m1",
					lotMonth: "202601"
				},
				{ _id: "deal:d1", kind: "use", amount: -150, ...deal }
			]
		],
		[
			"beyond what is still valid",
			account(300, { "202601": 100, "202605": 200 }),
			201,
			"202603",
			"INSUFFICIENT_POINTS"
		]
	])("debiting %s", (_, acc, amount, dueThrough, expected) =>
		expect(debiting(acc, deal, amount, dueThrough)).toEqual(expected)
	);

	it.each<[string, { amount: number } | null, number, Draft[]]>([
		[
			"not applied yet: voided",
			null,
			500,
			[{ _id: "deal-cancel:d1", kind: "void", amount: 0, ...deal }]
		],
		[
			"a use: restored in full",
			{ amount: -80 },
			0,
			[{ _id: "deal-cancel:d1", kind: "restore", amount: 80, ...deal }]
		],
		[
			"an earning: revoked",
			{ amount: 80 },
			500,
			[{ _id: "deal-cancel:d1", kind: "revoke", amount: -80, ...deal }]
		],
		[
			"an earning partly spent: revoked to 0",
			{ amount: 80 },
			50,
			[{ _id: "deal-cancel:d1", kind: "revoke", amount: -50, ...deal, shortfall: 30 }]
		]
	])("reversal of a source %s", (_, original, balance, expected) =>
		expect(reversal(account(balance), deal, original)).toEqual(expected)
	);

	describe("a deal's partial return", () => {
		const returned = (type: "save" | "use", points: number): DealReturnedEvent => ({
			dealId: "d1",
			memberId: "m1",
			merchantId: "20",
			dealAmount: 1000,
			type,
			point: 100,
			dealDate: "2026-05-01T00:00:00.000Z",
			return: { n: 2, amount: 300, points, at: "2026-05-02T00:00:00.000Z" },
			returnedAmount: 600,
			returnedPoints: points * 2,
			status: "partially_cancelled"
		});

		it.each<[string, "save" | "use", { amount: number } | null, number, Draft[]]>([
			[
				"of a use gives its points back",
				"use",
				{ amount: -100 },
				0,
				[{ _id: "deal-return:d1:2", kind: "restore", amount: 30, ...deal }]
			],
			[
				"of a use never debited gives nothing",
				"use",
				null,
				0,
				[{ _id: "deal-return:d1:2", kind: "void", amount: 0, ...deal }]
			],
			[
				"of a save revokes its points",
				"save",
				{ amount: 100 },
				100,
				[{ _id: "deal-return:d1:2", kind: "revoke", amount: -30, ...deal }]
			],
			[
				"of a save spent meanwhile revokes what is left",
				"save",
				{ amount: 100 },
				10,
				[{ _id: "deal-return:d1:2", kind: "revoke", amount: -10, ...deal, shortfall: 20 }]
			],
			[
				"that overtook its save posts the earning first",
				"save",
				null,
				0,
				[
					{ _id: "deal:d1", kind: "earn", amount: 100, ...deal },
					{ _id: "deal-return:d1:2", kind: "revoke", amount: -30, ...deal }
				]
			]
		])("%s", (_, type, original, balance, expected) =>
			expect(partialReturn(account(balance), returned(type, 30), original)).toEqual(expected)
		);
	});

	it("withdraws everything as one entry", () => {
		expect(withdrawal(account(420))).toEqual([
			{ _id: "expiry:m1", kind: "expire", amount: -420, sourceType: "member", sourceId: "m1" }
		]);
	});

	it.each<[string, AccountState, number, Draft[] | string]>([
		[
			"gives points",
			account(0),
			50,
			[
				{
					_id: "adjustment:a1",
					kind: "adjust",
					amount: 50,
					sourceType: "adjustment",
					sourceId: "a1",
					reason: "Goodwill",
					by: "ann"
				}
			]
		],
		[
			"takes points down to 0",
			account(50),
			-50,
			[
				{
					_id: "adjustment:a1",
					kind: "adjust",
					amount: -50,
					sourceType: "adjustment",
					sourceId: "a1",
					reason: "Goodwill",
					by: "ann"
				}
			]
		],
		["never takes below 0", account(50), -51, "INSUFFICIENT_POINTS"],
		["is refused after a withdrawal", account(50, {}, "closed"), 10, "ACCOUNT_CLOSED"]
	])("an adjustment %s", (_, acc, amount, expected) =>
		expect(adjustment(acc, "a1", amount, "Goodwill", "ann")).toEqual(expected)
	);
});

describe("applying drafts to an account (lib/posting.ts)", () => {
	const at = "2026-05-20T08:00:00.000Z";

	it("puts an opening balance in the lot of the month it names, once per member, and none on a closed account", () => {
		const acc = account(100, { "202605": 100 });
		const drafts = opening(acc, 250, "202603") as Draft[];
		expect(drafts).toEqual([
			{
				_id: "import:m1",
				kind: "import",
				amount: 250,
				sourceType: "member",
				sourceId: "m1",
				lotMonth: "202603"
			}
		]);
		expect(Cause.opening("m1")).toBe("import:m1");
		const { balance, lots } = applyDrafts(acc, drafts, at, counter());
		expect([balance, lots]).toEqual([350, { "202603": 250, "202605": 100 }]);
		// The oldest lot goes first: a later use takes the opening balance's points before May's.
		const used = applyDrafts(
			{ ...acc, balance, lots },
			[{ _id: "order:o1", kind: "use", amount: -300, ...order }],
			at,
			counter()
		);
		expect(used.lots).toEqual({ "202605": 50 });
		expect(opening(account(0, undefined, "closed"), 250, "202603")).toBe("ACCOUNT_CLOSED");
	});

	it("gives each entry the balance after it, the member, the time and the next seq", () => {
		const acc = account(300, { "202601": 100, "202604": 200 });
		const drafts = [
			...earning(acc, deal, 50),
			{ _id: "order:o1", kind: "use" as const, amount: -120, ...order }
		];
		const { entries, balance, lots } = applyDrafts(acc, drafts, at, counter());
		expect(entries).toEqual([
			{
				_id: "deal:d1",
				memberId: "m1",
				kind: "earn",
				amount: 50,
				sourceType: "deal",
				sourceId: "d1",
				merchantId: "20",
				balanceAfter: 350,
				at,
				seq: "0001"
			},
			{
				_id: "order:o1",
				memberId: "m1",
				kind: "use",
				amount: -120,
				sourceType: "order",
				sourceId: "o1",
				balanceAfter: 230,
				at,
				seq: "0002"
			}
		]);
		expect(balance).toBe(230);
		// The earning is May's; the use takes the oldest lots first.
		expect(lots).toEqual({ "202604": 180, "202605": 50 });
		// As events and the history show it: named by its cause, without the ledger's own fields.
		const posted = postedOf(entries[1]);
		expect(posted).toMatchObject({
			cause: "order:o1",
			kind: "use",
			amount: -120,
			balanceAfter: 230,
			at
		});
		expect(posted).not.toHaveProperty("_id");
		expect(posted).not.toHaveProperty("seq");
	});

	it("names the member as the source of entries about no deal or order", () => {
		const { entries } = applyDrafts(account(100), withdrawal(account(100)), at, counter());
		expect(entries[0]).toMatchObject({ sourceType: "member", sourceId: "m1", balanceAfter: 0 });
	});

	it("takes an expiry from its own lot", () => {
		const acc = account(300, { "202601": 100, "202602": 200 });
		const { lots, balance } = applyDrafts(acc, expiries(acc, "202602").slice(1), at, counter());
		expect(lots).toEqual({ "202601": 100 });
		expect(balance).toBe(100);
	});

	const lotted = account(400, { "202512": 150, "202602": 250 });
	it.each<[string, AccountState, Draft[]]>([
		[
			"an earning and a use",
			lotted,
			[...earning(lotted, deal, 70), ...(debiting(lotted, order, 300) as Draft[])]
		],
		["a use expiring the lots due", lotted, debiting(lotted, deal, 100, "202601") as Draft[]],
		[
			"a withdrawn member's earning",
			account(0, {}, "closed"),
			earning(account(0, {}, "closed"), deal, 90)
		],
		[
			"a revocation with a shortfall",
			lotted,
			[revocation("deal-cancel:d1", deal, 900, lotted.balance)]
		],
		[
			"a restoration and an adjustment",
			lotted,
			[
				...restoration(lotted, "deal-cancel:d1", deal, 60),
				...(adjustment(lotted, "a1", -400, "r", "x") as Draft[])
			]
		],
		["the expiry of every lot", lotted, expiries(lotted, "202612")],
		["a withdrawal", lotted, withdrawal(lotted)],
		[
			"anything on an account from before lots",
			account(500),
			[...earning(account(500), deal, 10), ...(debiting(account(500), order, 480) as Draft[])]
		]
	])("keeps the lots summing to the balance, never below 0: %s", (_, acc, drafts) => {
		const { entries, balance, lots } = applyDrafts(acc, drafts, at, counter());
		expect(sumOf(lots)).toBe(balance);
		expect(balance).toBe(acc.balance + totalOf(drafts));
		expect(balance).toBeGreaterThanOrEqual(0);
		for (const entry of entries) expect(entry.balanceAfter).toBeGreaterThanOrEqual(0);
		expect(entries.at(-1)?.balanceAfter ?? acc.balance).toBe(balance);
		expect(Object.values(lots).every(points => points > 0)).toBe(true);
	});
});

describe("a transfer's entries (lib/posting.ts)", () => {
	const at = "2026-05-20T08:00:00.000Z";
	const sent = { transferId: "t1", fromMemberId: "m1", toMemberId: "m2", points: 120 };
	const about = (counterpartId: string) => ({
		sourceType: "transfer",
		sourceId: "t1",
		counterpartId
	});
	const sender = account(300, { "202601": 100, "202604": 200 });
	const receiver = { ...account(0), _id: "m2" };

	it("names its three causes", () => {
		expect([Cause.transferOut("t1"), Cause.transferIn("t1"), Cause.transferRefund("t1")]).toEqual([
			"transfer-out:t1",
			"transfer-in:t1",
			"transfer-refund:t1"
		]);
	});

	it("takes the points from the sender's oldest lots, and reads the transfer back from the entry", () => {
		const drafts = transferOut(sender, sent, 0, 1000) as Draft[];
		expect(drafts).toEqual([
			{ _id: "transfer-out:t1", kind: "transfer", amount: -120, ...about("m2") }
		]);
		const { entries, lots } = applyDrafts(sender, drafts, at, counter());
		expect(lots).toEqual({ "202604": 180 });
		expect(transferOf(entries[0])).toEqual({ ...sent, at });
	});

	it.each<[string, AccountState, number, number, string]>([
		["a closed account", account(300, {}, "closed"), 0, 1000, "ACCOUNT_CLOSED"],
		["more than the day's limit leaves", sender, 881, 1000, "TRANSFER_LIMIT_EXCEEDED"],
		["more than the balance", account(119), 0, 1000, "INSUFFICIENT_POINTS"]
	])("refuses to send from %s", (_, acc, sentToday, limit, refusal) =>
		expect(transferOut(acc, sent, sentToday, limit)).toBe(refusal)
	);

	it("sends up to the limit exactly, and never a point past its validity", () => {
		expect(transferOut(sender, sent, 880, 1000)).toHaveLength(1);
		// January's 100 points are due: only April's 200 can be sent, after January's expiry.
		expect(transferOut(sender, { ...sent, points: 201 }, 0, 1000, "202601")).toBe(
			"INSUFFICIENT_POINTS"
		);
		const drafts = transferOut(sender, { ...sent, points: 200 }, 0, 1000, "202601") as Draft[];
		expect(drafts.map(d => [d._id, d.amount])).toEqual([
			["expire:m1:202601", -100],
			["transfer-out:t1", -200]
		]);
	});

	it("gives the receiver an earning of this month, unless its account has closed", () => {
		const drafts = transferIn(receiver, { ...sent, at }) as Draft[];
		expect(drafts).toEqual([
			{ _id: "transfer-in:t1", kind: "transfer", amount: 120, ...about("m1") }
		]);
		expect(applyDrafts(receiver, drafts, at, counter()).lots).toEqual({ "202605": 120 });
		expect(transferIn({ ...receiver, status: "closed" }, { ...sent, at })).toBe("ACCOUNT_CLOSED");
	});

	it("refunds the sender as a restoration, expiring on arrival if the sender has withdrawn", () => {
		const refund = { _id: "transfer-refund:t1", kind: "restore", amount: 120, ...about("m2") };
		expect(transferRefund(account(180), { ...sent, at })).toEqual([refund]);
		expect(transferRefund(account(0, {}, "closed"), { ...sent, at })).toEqual([
			refund,
			{
				_id: "expiry:m1:transfer-refund:t1",
				kind: "expire",
				amount: -120,
				memberId: "m1",
				sourceType: "transfer",
				sourceId: "t1"
			}
		]);
	});
});

describe("retrying a write that lost a race (lib/retry-on-race.ts)", () => {
	it("retries until the attempt stands, counting the attempts", async () => {
		const seen: number[] = [];
		const attempt = async (n: number) => {
			seen.push(n);
			return n < 3 ? LOST : "written";
		};
		const result = await retryOnRace(attempt, { attempts: 20, what: "Account 'm1'" });
		expect(result).toBe("written");
		expect(seen).toEqual([1, 2, 3]);
	});

	it("gives up after the last attempt, with the message or the error asked for", async () => {
		let runs = 0;
		const lose = async () => {
			runs++;
			return LOST;
		};
		await expect(retryOnRace(lose, { attempts: 4, what: "Account 'm1'" })).rejects.toThrow(
			"Account 'm1' keeps changing concurrently"
		);
		expect(runs).toBe(4);
		const busy = (message: string) =>
			Object.assign(new Error(`${message}; try again`), { code: 503 });
		await expect(
			retryOnRace(lose, { attempts: 2, what: "Deal 'd1'", giveUp: busy })
		).rejects.toMatchObject({
			message: "Deal 'd1' keeps changing concurrently; try again",
			code: 503
		});
	});

	it("passes on what an attempt throws, without retrying", async () => {
		let runs = 0;
		const fail = async (): Promise<typeof LOST> => {
			runs++;
			throw new Error("refused");
		};
		await expect(retryOnRace(fail, { attempts: 5, what: "x" })).rejects.toThrow("refused");
		expect(runs).toBe(1);
	});
});
