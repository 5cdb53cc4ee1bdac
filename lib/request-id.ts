/**
 * The request id of a POST sent with an `Idempotency-Key`: the gateway puts it in `ctx.meta.requestId`
 * and keeps it when it runs the request again (its first run's gateway died before recording the
 * answer; see services/idempotency.service.ts). An action that creates something records the id on
 * it, under a unique sparse index, and on a repeat answers what it created then instead of creating
 * it twice. Without the header there is no id and nothing changes.
 */
import type { Context } from "moleculer";
import type { Collection, IndexSpec } from "../mixins/db.mixin";

export interface RequestMeta {
	requestId?: string;
}

/** The index of a collection whose documents carry the request that created them. */
export const REQUEST_ID_INDEX: IndexSpec = { fields: { requestId: 1 }, unique: true, sparse: true };

/** `{ requestId }` to record on a new document, or nothing. */
export function requestIdOf(ctx: Context<unknown, RequestMeta>): { requestId?: string } {
	const { requestId } = ctx.meta;
	return typeof requestId === "string" ? { requestId } : {};
}

/** What this request created on an earlier run, if it ran before. */
export async function createdBefore<T extends { _id: string }>(
	store: Collection<T>,
	ctx: Context<unknown, RequestMeta>
): Promise<T | null> {
	const { requestId } = requestIdOf(ctx);
	if (!requestId) return null;
	return (await store.find({ query: { requestId }, limit: 1 }))[0] ?? null;
}
