/** Why a module: moleculer-web merges body and query into the params with `Object.assign`; prototype keys must be refused before. */
import type { IncomingMessage, ServerResponse } from "node:http";
import { Errors } from "moleculer";

/**
 * Keys that reach an object's prototype. `Object.assign` turns a `__proto__` key into the params'
 * prototype: strict validation never sees it, and optional fields could be read through it.
 */
const HOSTILE_KEYS = new Set(["__proto__", "constructor", "prototype"]);

/** The path of the first hostile key in a parsed JSON body, at any depth (iteratively: no stack to exhaust). */
export function hostileKeyIn(value: unknown, root = "body"): string | undefined {
	const stack: [unknown, string][] = [[value, root]];
	while (stack.length) {
		const [node, at] = stack.pop() as [unknown, string];
		if (node === null || typeof node !== "object") continue;
		for (const key of Object.keys(node)) {
			if (HOSTILE_KEYS.has(key)) return `${at}.${key}`;
			stack.push([(node as Record<string, unknown>)[key], `${at}.${key}`]);
		}
	}
	return undefined;
}

/** The first hostile key in a raw query string (`a[__proto__][b]=1`, `constructor=x`), before qs drops or merges it. */
export function hostileKeyInQuery(url: string): string | undefined {
	const query = url.split("?", 2)[1];
	if (!query) return undefined;
	for (const pair of query.split("&")) {
		let name = pair.split("=", 1)[0].replace(/\+/g, " ");
		try {
			name = decodeURIComponent(name);
		} catch {
			// Undecodable: qs keeps it as it is, and so do we.
		}
		if (name.split(/[[\].]/).some(segment => HOSTILE_KEYS.has(segment))) return `query.${name}`;
	}
	return undefined;
}

/** Route middleware, after the body parser and before moleculer-web merges the params: a hostile key is a 422. */
export function refuseHostileKeys(
	req: IncomingMessage & { body?: unknown },
	_res: ServerResponse,
	next: (err?: Error) => void
): void {
	const key = hostileKeyIn(req.body) ?? hostileKeyInQuery(req.url ?? "");
	if (!key) return next();
	next(
		new Errors.ValidationError(`The key '${key}' is not allowed`, "VALIDATION_ERROR", [
			{ type: "forbiddenKey", field: key, message: `The key '${key}' is not allowed.` }
		])
	);
}
