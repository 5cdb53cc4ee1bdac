import type { Context } from "moleculer";

/** What moleculer-web reads from an action's `ctx.meta` to shape its HTTP answer. */
export interface AnswerMeta {
	$statusCode?: number;
	$location?: string;
}

/** Answers `201 Created` with the new resource's `Location`, and the resource. */
export function created<T>(ctx: Context<unknown, AnswerMeta>, location: string, view: T): T {
	ctx.meta.$statusCode = 201;
	ctx.meta.$location = location;
	return view;
}
