import type { Context } from "moleculer";
import type { MemberView } from "../services/members.service";
import { conflict } from "./errors";

/**
 * Asks the member's owner (members), within `timeoutMs`, whether the member is still active: deals,
 * orders and adjustments refuse one who has withdrawn (409 MEMBER_WITHDRAWN), or is unknown (404).
 */
export async function assertActiveMember(
	ctx: Context,
	memberId: string,
	timeoutMs: number
): Promise<void> {
	const member = await ctx.call<MemberView, { memberId: string }>(
		"members.get",
		{ memberId },
		{ timeout: timeoutMs }
	);
	if (member.status !== "active")
		throw conflict("MEMBER_WITHDRAWN", `Member '${memberId}' has withdrawn`, { memberId });
}
