/**
 * Who is calling, as the gateway resolved it (`ctx.meta.user`), and the one rule services apply
 * themselves: a merchant, or a member, sees and changes only what belongs to its own id. Calls
 * without a user (between services, from the REPL) are trusted.
 */
import { createHash } from "node:crypto";
import type { Context } from "moleculer";
import type { Role } from "../../config";
import { clientError } from "../errors";

export interface CallerMeta {
	user?: Role | null;
}

export function forbidden(message = "This token may not do that"): ReturnType<typeof clientError> {
	return clientError(403, "FORBIDDEN", message);
}

/** Refuses (403) a merchant acting on another merchant's deal, view row or settlement. */
export function assertOwnMerchant(
	ctx: Context<unknown, CallerMeta>,
	merchantId: string | undefined
): void {
	const user = ctx.meta.user;
	if (user?.kind === "merchant" && user.merchantId !== merchantId)
		throw forbidden("A merchant token reaches only its own merchant's data");
}

/** Refuses (403) a member token acting on another member's deal or order. */
export function assertOwnMember(ctx: Context<unknown, CallerMeta>, memberId: string): void {
	const user = ctx.meta.user;
	if (user?.kind === "member" && user.memberId !== memberId)
		throw forbidden("A member token reaches only its own member's data");
}

/**
 * Who a staff-only action records as having done it: the staff token's name, `staff`, or `operator`
 * for a call from inside (the REPL), which has no user.
 */
export function actorOf(ctx: Context<unknown, CallerMeta>): string {
	const user = ctx.meta.user;
	return user?.kind === "staff" ? (user.name ?? "staff") : "operator";
}

/**
 * What an issued key's token is stored and looked up by: its SHA-256, base64url. The merchants
 * service stores it, the gateway looks a bearer token up by it: one definition for both.
 */
export const tokenHash = (token: string): string =>
	createHash("sha256").update(token).digest("base64url");
