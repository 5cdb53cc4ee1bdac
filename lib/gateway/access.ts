/**
 * Who is calling, as the gateway resolved it (`ctx.meta.user`), and the one rule services apply
 * themselves: a merchant, or a member, sees and changes only what belongs to its own id. Calls
 * without a user (between services, from the REPL) are trusted.
 */
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
