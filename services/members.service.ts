/**
 * Members: who belongs to the membership. Joining and withdrawing are announced on durable
 * channels, so they keep working while the points service is down; its account follows later.
 *
 * Erasure (the right to be forgotten): name, phone and email are removed here and, by
 * `member.erased`, from every read model; an active member is withdrawn in the same write (its
 * points forfeited as at withdrawal). The member stays under its id, so deals, orders, the ledger
 * and settlements keep adding up; the record says who erased it and when, not what was erased.
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { randomInt } from "node:crypto";
import { outboxEvent } from "../contracts/channels";
import type { CallerMeta } from "../lib/gateway/access";
import { created, type AnswerMeta } from "../lib/gateway/answers";
import { conflict, notFound } from "../lib/errors";
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

interface Methods {
	toView(member: Member): MemberView;
	findMember(memberId: string): Promise<Member>;
}

type This = Service & DbThis<Member> & OutboxMethods & Methods;

const MembersService: ServiceSchema<object, Methods, object, This> = {
	name: "members",
	mixins: [DbMixin("members", [OUTBOX_INDEX, REQUEST_ID_INDEX]), OutboxMixin],

	actions: {
		join: {
			rest: "POST /members",
			summary:
				"Join: a new member and their points account (an eight-digit memberId is made up when none is given)",
			params: {
				$$strict: true,
				memberId: P.optionalId,
				name: { type: "string", trim: true, min: 1, max: 100 },
				phone: { type: "string", trim: true, pattern: /^[0-9+() -]{3,20}$/, optional: true },
				email: { type: "email", max: 200, optional: true }
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
					const joinedAt = new Date().toISOString();
					const member: Member = {
						_id: memberId,
						name,
						phone: phone ?? null,
						email: email ?? null,
						status: "active",
						joinedAt,
						...requestIdOf(ctx)
					};
					if (
						await this.changeWithEvents({ insert: member }, [
							outboxEvent("member.joined", { memberId, name, joinedAt })
						])
					)
						return joined(member);
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

		get: {
			rest: "GET /members/:memberId",
			summary: "A member and their status",
			params: { $$strict: true, memberId: P.id },
			async handler(this: This, ctx: Context<{ memberId: string }>) {
				return this.toView(await this.findMember(ctx.params.memberId));
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
				const user = ctx.meta.user;
				// The gateway lets only staff here; a call without a user comes from inside (the REPL).
				const erasedBy = user?.kind === "staff" ? (user.name ?? "staff") : "operator";
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
				return this.toView(member);
			}
		}
	},

	methods: {
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

		async findMember(this: This, memberId: string): Promise<Member> {
			const member = await this.store.findById(memberId);
			if (!member)
				throw notFound("MEMBER_NOT_FOUND", `Member '${memberId}' not found`, { memberId });
			return member;
		}
	}
};

export default MembersService;
