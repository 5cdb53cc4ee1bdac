/**
 * Members: who belongs to the membership. Joining and withdrawing are announced on durable
 * channels, so they keep working while the points service is down; its account follows later.
 *
 * Erasure (the right to be forgotten): name, phone and email are removed here and, by
 * `member.erased`, from every read model; an active member is withdrawn in the same write (its
 * points forfeited as at withdrawal). The member stays under its id, so deals, orders, the ledger
 * and settlements keep adding up; the record says who erased it and when, not what was erased.
 *
 * Sessions: OnePoint signs member tokens (ES256, lib/member-tokens.ts) for operators without an
 * identity provider. Gateways learn that a member's access ended by the `member.accessEnded`
 * broadcast at withdrawal and erasure, and ask `access` for a member they do not know.
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { randomInt } from "node:crypto";
import Validator from "fastest-validator";
import { ConfiguredSettings } from "../config/settings";
import { outboxEvent } from "../contracts/channels";
import { actorOf, type CallerMeta } from "../lib/gateway/access";
import { created, CSV, csvAnswer, type AnswerMeta } from "../lib/gateway/answers";
import { clientError, conflict, notFound } from "../lib/errors";
import { loadOwnKey, signSession, type OwnKey, type OwnKeySource } from "../lib/member-tokens";
import * as P from "../lib/params";
import { createdBefore, REQUEST_ID_INDEX, requestIdOf, type RequestMeta } from "../lib/request-id";
import { DbMixin, type DbThis } from "../mixins/db.mixin";
import {
	OutboxMixin,
	OUTBOX_INDEX,
	type OutboxMethods,
	type WithOutbox
} from "../mixins/outbox.mixin";

export interface Member extends WithOutbox {
	/** Null once erased, with phone and email. */
	name: string | null;
	phone: string | null;
	email: string | null;
	status: "active" | "withdrawn" | "erased";
	joinedAt: string;
	withdrawnAt?: string;
	erasedAt?: string;
	/** Who erased it: a staff token's name, `staff`, or `operator` from the REPL. */
	erasedBy?: string;
	/** The request (Idempotency-Key) that joined the member, if it had one. */
	requestId?: string;
}

export interface MemberView {
	memberId: string;
	name: string | null;
	phone: string | null;
	email: string | null;
	status: Member["status"];
	joinedAt: string;
	withdrawnAt?: string;
	erasedAt?: string;
	erasedBy?: string;
}

/** A member as they join: every personal field still there. */
type Joining = Member & { name: string };

interface Methods {
	toView(member: Member): MemberView;
	findMember(memberId: string): Promise<Member>;
	/** Tells every gateway at once that a member's tokens are refused from now on. */
	endAccess(ctx: Context, memberId: string): Promise<void>;
	/** Stores a member who joins and the `member.joined` that says so; false when the id is taken. */
	insertJoined(member: Joining): Promise<boolean>;
	/** The clock; a test may run the service with another. */
	now(): Date;
}

interface Settings extends OwnKeySource {
	/** The `aud` of the sessions issued here (MEMBER_JWT_AUDIENCE). */
	audience: string;
	/** How long a session is valid (s). */
	sessionTtlS: number;
}

type This = Service<Settings> &
	DbThis<Member> &
	OutboxMethods &
	Methods & {
		ownKey: Promise<OwnKey>;
	};

/** The contact fields, as at joining and at a change. */
const CONTACT = {
	phone: { type: "string", trim: true, pattern: /^[0-9+() -]{3,20}$/, optional: true },
	email: { type: "email", max: 200, optional: true }
} as const;
const NAME = { type: "string", trim: true, min: 1, max: 100 } as const;

/** A member as an import's row brings it: checked by the same rules as a join. */
export interface ImportedMember {
	/** The row's line in the file, given back with its outcome. */
	row: number;
	memberId: string;
	name: string;
	phone?: string;
	email?: string;
}

/** What became of an imported member: joined now, there already (and its status), or refused. */
export type ImportedOutcome =
	| { row: number; outcome: "created" | "exists"; status: Member["status"] }
	| { row: number; outcome: "invalid"; code: string; message: string };

/** The code an import's row is refused with, by the field that failed the joining rules. */
const IMPORT_CODES: Record<string, string> = {
	memberId: "INVALID_MEMBER_ID",
	name: "INVALID_NAME",
	phone: "INVALID_PHONE",
	email: "INVALID_EMAIL"
};

const checkImported = new Validator().compile({
	$$strict: "remove",
	memberId: P.id,
	name: NAME,
	...CONTACT
});

/** The columns of `GET /api/members.csv`. */
const MEMBERS_COLUMNS = [
	"memberId",
	"name",
	"phone",
	"email",
	"status",
	"joinedAt",
	"withdrawnAt",
	"erasedAt"
];
const MEMBERS_PAGE = 1000;

/** The most rows of one kind the data export gathers (pages of 100). */
const EXPORT_MAX_PAGES = 100;

interface Page<T> {
	rows: T[];
	total: number;
}

/** A member who joins at `at`, active, with what they gave. */
function joining(
	memberId: string,
	{ name, phone, email }: { name: string; phone?: string; email?: string },
	at: Date
): Joining {
	return {
		_id: memberId,
		name,
		phone: phone ?? null,
		email: email ?? null,
		status: "active",
		joinedAt: at.toISOString()
	};
}

const MembersService: ServiceSchema<Settings, Methods, object, This> = {
	name: "members",
	mixins: [
		DbMixin("members", [OUTBOX_INDEX, REQUEST_ID_INDEX]),
		OutboxMixin,
		ConfiguredSettings<Settings>(config => ({
			memberTokenKey: config.memberTokenKey,
			dataDir: config.dataDir,
			production: config.nodeEnv === "production",
			audience: config.memberJwtAudience,
			sessionTtlS: config.memberTokenTtlS,
			$secureSettings: ["memberTokenKey"]
		}))
	],

	actions: {
		join: {
			rest: "POST /members",
			summary:
				"Join: a new member and their points account (an eight-digit memberId is made up when none is given)",
			params: {
				$$strict: true,
				memberId: P.optionalId,
				name: NAME,
				...CONTACT
			},
			async handler(
				this: This,
				ctx: Context<
					{ memberId?: string; name: string; phone?: string; email?: string },
					RequestMeta & AnswerMeta
				>
			) {
				const { name, phone, email } = ctx.params;
				const joined = (member: Member) =>
					created(ctx, `/api/members/${member._id}`, this.toView(member));
				// A request run again (its gateway died before answering) answers what it did.
				const before = await createdBefore(this.store, ctx);
				if (before) return joined(before);
				// Eight digits, like the seed's member numbers; a clash is retried, never overwritten.
				const generated = !ctx.params.memberId;
				for (let attempt = 0; attempt < 5; attempt++) {
					const memberId = ctx.params.memberId ?? String(randomInt(10_000_000, 100_000_000));
					const member: Joining = {
						...joining(memberId, { name, phone, email }, this.now()),
						...requestIdOf(ctx)
					};
					if (await this.insertJoined(member)) return joined(member);
					// Refused for its request id: the same request, running at the same time, joined first.
					const racing = await createdBefore(this.store, ctx);
					if (racing) return joined(racing);
					if (!generated) break;
				}
				throw conflict("MEMBER_EXISTS", `Member '${ctx.params.memberId}' already exists`, {
					memberId: ctx.params.memberId
				});
			}
		},

		/**
		 * Every member as CSV, by memberId, read a page at a time as the client takes them; an erased
		 * member's name, phone and email are empty.
		 */
		exportCsv: {
			rest: "GET /members.csv",
			summary: "Every member as CSV (an erased member without personal data), streamed",
			responseType: CSV,
			params: { $$strict: true },
			handler(this: This, ctx: Context<object, AnswerMeta>) {
				const store = this.store;
				const toView = this.toView.bind(this);
				return csvAnswer(
					ctx,
					{ filename: "members.csv", columns: MEMBERS_COLUMNS },
					(async function* () {
						for (let after = ""; ;) {
							const page = await store.find({
								query: { _id: { $gt: after } },
								sort: ["_id"],
								limit: MEMBERS_PAGE
							});
							yield page.map(toView);
							if (page.length < MEMBERS_PAGE) return;
							after = page[page.length - 1]._id;
						}
					})()
				);
			}
		},

		/**
		 * Members an import brings (`imports`): each row checked by the joining rules and joined, as
		 * `join` would, unless its memberId is taken (then left as it is: `exists`, with its status).
		 * Side by side, each its own write. Internal.
		 */
		importBatch: {
			visibility: "public",
			params: {
				$$strict: true,
				rows: { type: "array", max: 1000, items: { type: "object" } }
			},
			async handler(
				this: This,
				ctx: Context<{ rows: ImportedMember[] }>
			): Promise<ImportedOutcome[]> {
				// Those there already, in one read rather than one a row.
				const ids = ctx.params.rows.map(row => String(row.memberId));
				const known = new Map(
					(await this.store.find({ query: { _id: { $in: ids } } })).map(m => [m._id, m.status])
				);
				return Promise.all(
					ctx.params.rows.map(async (input): Promise<ImportedOutcome> => {
						const { row, ...fields } = input;
						const checked = checkImported(fields);
						if (checked !== true) {
							const [first] = checked as { field: string; message?: string }[];
							return {
								row,
								outcome: "invalid",
								code: IMPORT_CODES[first.field] ?? "INVALID_ROW",
								message: first.message ?? `'${first.field}' is not valid`
							};
						}
						const { memberId, name, phone, email } = fields;
						const status = known.get(memberId);
						if (status) return { row, outcome: "exists", status };
						const joined = await this.insertJoined(
							joining(memberId, { name, phone, email }, this.now())
						);
						if (joined) return { row, outcome: "created", status: "active" };
						// Joined meanwhile (the same member twice in a batch, or a join at the same time).
						const now = (await this.findMember(memberId)).status;
						return { row, outcome: "exists", status: now };
					})
				);
			}
		},

		get: {
			rest: "GET /members/:memberId",
			summary: "A member and their status",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				return this.toView(await this.findMember(ctx.params.memberId));
			}
		},

		/** A change of name or contact: validated as at joining; read models follow by `member.updated`. */
		update: {
			rest: "PATCH /members/:memberId",
			summary: "Change a member's name, phone or email",
			params: { $$strict: true, memberId: P.id, name: { ...NAME, optional: true }, ...CONTACT },
			async handler(
				this: This,
				ctx: Context<{ memberId: string; name?: string; phone?: string; email?: string }>
			) {
				const { memberId, ...change } = ctx.params;
				if (Object.keys(change).length === 0)
					throw clientError(422, "NOTHING_TO_CHANGE", "Give a name, phone or email to change");
				const member = await this.findMember(memberId);
				if (member.status !== "active")
					throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has withdrawn`, { memberId });
				const updatedAt = this.now().toISOString();
				const changed = await this.changeWithEvents(
					{ filter: { _id: memberId, status: "active" }, update: { $set: change } },
					[outboxEvent("member.updated", { memberId, ...change, updatedAt })]
				);
				// Withdrawn meanwhile: refused as above, on what it wrote.
				if (!changed) return ctx.call("members.update", ctx.params, { meta: ctx.meta });
				return this.toView(await this.findMember(memberId));
			}
		},

		/** For the gateway: whether a member's tokens may act (no rest). */
		access: {
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				const member = await this.store.findById(ctx.params.memberId);
				return member ? { status: member.status } : null;
			}
		},

		/**
		 * The operator's app, once it has identified the person its own way, gets a member token. The
		 * answer is `Cache-Control: no-store`: the gateway never keeps the token for an
		 * `Idempotency-Key`, and a retry gets a session of its own.
		 */
		startSession: {
			rest: "POST /members/:memberId/sessions",
			summary: `A member token (a JWT signed by OnePoint, ES256) for the member, valid MEMBER_TOKEN_TTL_S seconds; its keys at /api/.well-known/jwks.json`,
			params: { $$strict: true, memberId: P.id },
			async handler(
				this: This,
				ctx: Context<
					{ memberId: string },
					AnswerMeta & { $responseHeaders?: Record<string, string> }
				>
			) {
				const { memberId } = ctx.params;
				const member = await this.findMember(memberId);
				if (member.status !== "active")
					throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has withdrawn`, { memberId });
				const session = await signSession(
					await this.ownKey,
					memberId,
					this.settings.audience,
					this.settings.sessionTtlS,
					this.now()
				);
				ctx.meta.$statusCode = 201;
				ctx.meta.$responseHeaders = { "Cache-Control": "no-store" };
				return session;
			}
		},

		/**
		 * Every record OnePoint holds about the member, as the right of access asks, gathered from
		 * each owner. At most EXPORT_MAX_PAGES pages of each kind: `truncated` names those cut short.
		 */
		data: {
			rest: "GET /members/:memberId/data",
			summary:
				"Every record held about a member as one document: profile, account and ledger, deals, orders, payments, deliveries, transfers and tier",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				const { memberId } = ctx.params;
				const profile = this.toView(await this.findMember(memberId));
				const truncated: string[] = [];
				const all = async <T>(kind: string, action: string): Promise<T[]> => {
					const rows: T[] = [];
					for (let page = 1; page <= EXPORT_MAX_PAGES; page++) {
						const answer = await ctx.call<Page<T>, object>(action, {
							memberId,
							page,
							pageSize: 100
						});
						rows.push(...answer.rows);
						if (rows.length >= answer.total || answer.rows.length === 0) return rows;
					}
					truncated.push(kind);
					return rows;
				};
				// An account is opened by an event: a member who just joined may not have one yet.
				const account = await ctx
					.call("points.get", { memberId })
					.catch((err: { type?: string }) => {
						if (err.type === "ACCOUNT_NOT_FOUND") return null;
						throw err;
					});
				const [ledger, transfers, deals, orders, payments] = await Promise.all([
					all("ledger", "points.history"),
					all("transfers", "points.transfers"),
					all("deals", "deals.list"),
					all<{ id: string }>("orders", "orders.list"),
					all("payments", "payments.list")
				]);
				const deliveries = [];
				for (const order of orders) {
					const delivery = await ctx
						.call("deliveries.get", { orderId: order.id })
						.catch((err: { type?: string }) => {
							if (err.type === "DELIVERY_NOT_FOUND") return null;
							throw err;
						});
					if (delivery) deliveries.push(delivery);
				}
				return {
					memberId,
					exportedAt: this.now().toISOString(),
					profile,
					account,
					ledger,
					transfers,
					deals,
					orders,
					payments,
					deliveries,
					...(truncated.length > 0 ? { truncated } : {})
				};
			}
		},

		/** Erases the member's personal data, withdrawing it first if active. Idempotent. */
		erase: {
			rest: "POST /members/:memberId/erasure",
			summary:
				"Erase a member's personal data (withdrawing it if active): name, phone and email go from every store and read model",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }, CallerMeta>) {
				const { memberId } = ctx.params;
				const member = await this.findMember(memberId);
				if (member.status === "erased") return this.toView(member);
				const at = new Date().toISOString();
				// The gateway lets only staff here.
				const erasedBy = actorOf(ctx);
				const withdrawing = member.status === "active";
				const changed = await this.changeWithEvents(
					{
						filter: { _id: memberId, status: member.status },
						update: {
							$set: {
								name: null,
								phone: null,
								email: null,
								status: "erased",
								erasedAt: at,
								erasedBy,
								...(withdrawing ? { withdrawnAt: at } : {})
							}
						}
					},
					[
						...(withdrawing
							? [outboxEvent("member.withdrawn", { memberId, withdrawnAt: at })]
							: []),
						outboxEvent("member.erased", { memberId, erasedAt: at })
					]
				);
				// Withdrawn or erased meanwhile by another request: decide again on what it wrote.
				if (!changed) return ctx.call("members.erase", { memberId }, { meta: ctx.meta });
				await this.endAccess(ctx, memberId);
				return this.toView(await this.findMember(memberId));
			}
		},

		withdraw: {
			rest: "DELETE /members/:memberId",
			summary: "Withdraw a member: their points expire (recorded in the ledger)",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				const { memberId } = ctx.params;
				const withdrawnAt = new Date().toISOString();
				const changed = await this.changeWithEvents(
					{
						filter: { _id: memberId, status: "active" },
						update: { $set: { status: "withdrawn", withdrawnAt } }
					},
					[outboxEvent("member.withdrawn", { memberId, withdrawnAt })]
				);
				const member = await this.findMember(memberId);
				if (!changed)
					throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has already withdrawn`, {
						memberId,
						status: member.status
					});
				await this.endAccess(ctx, memberId);
				return this.toView(member);
			}
		}
	},

	methods: {
		insertJoined(this: This, member: Joining) {
			const { _id: memberId, name, joinedAt } = member;
			return this.changeWithEvents({ insert: member }, [
				outboxEvent("member.joined", { memberId, name, joinedAt })
			]);
		},

		toView(member: Member): MemberView {
			const { _id, name, phone, email, status, joinedAt, withdrawnAt, erasedAt, erasedBy } = member;
			return {
				memberId: _id,
				name,
				phone,
				email,
				status,
				joinedAt,
				...(withdrawnAt ? { withdrawnAt } : {}),
				...(erasedAt ? { erasedAt, erasedBy } : {})
			};
		},

		async endAccess(this: This, ctx: Context, memberId: string) {
			// Fire-and-forget: a gateway that misses it forgets the member within its cache's 2 s.
			await ctx.broadcast("member.accessEnded", { memberId });
		},

		now: () => new Date(),

		async findMember(this: This, memberId: string): Promise<Member> {
			const member = await this.store.findById(memberId);
			if (!member)
				throw notFound("MEMBER_NOT_FOUND", `Member '${memberId}' not found`, { memberId });
			return member;
		}
	},

	async started(this: This) {
		// Loaded (or, outside production, generated) before the first session is asked for.
		this.ownKey = loadOwnKey(this.settings);
		await this.ownKey;
	}
};

export default MembersService;
