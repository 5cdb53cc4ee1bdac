/**
 * Why a module: moleculer-web resolves an alias's action to an endpoint before it calls it, and answers
 * 503 at once when there is none; while the one node of a service is being replaced (a redeploy), the
 * gateway waits for the new one instead. That means wrapping moleculer-web's internal `aliasHandler`:
 * the wrap and its fence live here. When it waits, and calls between services: lib/service-wait.ts.
 */
import { assertPatchable, PATCHES } from "../patches";

/** moleculer-web's `aliasHandler(req, res, alias)`; `alias.action` is the action it resolves. */
export type AliasHandler = (
	req: unknown,
	res: unknown,
	alias: { action?: string }
) => Promise<unknown>;

/** How many parameters the checked `aliasHandler` declares. */
const ALIAS_HANDLER_ARITY = 3;

/**
 * moleculer-web's own `aliasHandler`, from its service schema (`ApiGateway`); throws at start-up when an
 * upgrade removed it or changed its parameters. Routing calls it as `this.aliasHandler(...)`, so a
 * service method of that name replaces it.
 */
export function stockAliasHandler(gateway: { methods?: object }): AliasHandler {
	const methods = (gateway.methods ?? {}) as Record<string, (...args: unknown[]) => unknown>;
	assertPatchable(PATCHES.moleculerWebAliases, methods);
	const method = methods.aliasHandler;
	if (method.length !== ALIAS_HANDLER_ARITY)
		throw new Error(
			`moleculer-web's aliasHandler now takes ${method.length} parameters, not ${ALIAS_HANDLER_ARITY} ` +
				`(req, res, alias): the patch in ${PATCHES.moleculerWebAliases.where} was checked against ` +
				`${PATCHES.moleculerWebAliases.checked}; re-check it before upgrading`
		);
	return method as AliasHandler;
}
