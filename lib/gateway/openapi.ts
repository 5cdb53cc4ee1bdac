/**
 * The published HTTP contract, read from the same schemas that serve it: an action is public when it
 * declares `rest: "METHOD /path"` (relative to `/api`), and its fastest-validator `params` become the
 * document's parameters and request bodies. The gateway's alias table and `GET /api/openapi.json`
 * both come from `publishedRoutes`, so a route cannot be served without being documented, or the
 * other way round. Read from the schemas rather than the live registry: the contract does not shrink
 * while a service's nodes are down (its routes answer 503 then, not 404).
 */
import type { ActionSchema } from "moleculer";

declare module "moleculer" {
	interface ActionSchema {
		/**
		 * The media type of a successful answer that is not JSON (`text/csv; charset=utf-8`):
		 * moleculer-web sends it as the Content-Type, and the contract documents it.
		 */
		responseType?: string;
		/**
		 * The media type of a request body the action reads as a stream (`text/csv`), not parsed by the
		 * gateway: the alias passes the request itself (`ctx.stream`), and the contract documents it.
		 */
		requestType?: string;
	}
}

type Method = "GET" | "POST" | "PUT" | "PATCH" | "DELETE";

/** A fastest-validator rule: an object, or the shorthand `"string|optional"`. */
type Rule = string | RuleObject;
interface RuleObject {
	type?: string;
	optional?: boolean;
	default?: unknown;
	min?: number;
	max?: number;
	length?: number;
	positive?: boolean;
	negative?: boolean;
	integer?: boolean;
	signed?: boolean;
	pattern?: RegExp | string;
	values?: readonly unknown[];
	enum?: readonly unknown[];
	props?: Record<string, Rule>;
	properties?: Record<string, Rule>;
	strict?: boolean | "remove";
	items?: Rule;
}
type Rules = Record<string, Rule | boolean>;

export type JsonSchema = Record<string, unknown>;

export interface PublishedRoute {
	method: Method;
	/** Relative to `/api`, in moleculer-web's form: `/deals/:id/cancel`. */
	path: string;
	/** `service.action` */
	action: string;
	summary?: string;
	params: Rules;
	/** A successful answer's media type, when not JSON. */
	responseType?: string;
	/** The media type of a body streamed to the action, when not JSON. */
	requestType?: string;
}

/** What is read of a service schema (any schema's `this` type fits). */
interface SchemaShape {
	name?: string;
	actions?: object;
	mixins?: readonly object[];
}

/** Actions of a schema and its mixins, the schema's own winning (as Moleculer merges them). */
function actionsOf(schema: SchemaShape): Record<string, ActionSchema> {
	const merged: Record<string, ActionSchema> = {};
	for (const mixin of schema.mixins ?? []) Object.assign(merged, actionsOf(mixin));
	for (const [name, action] of Object.entries(schema.actions ?? {})) {
		if (action && typeof action === "object") merged[name] = action as ActionSchema;
		// `false` removes a mixin's action (the store mixin turns off moleculer-db's CRUD actions).
		else if (action === false) delete merged[name];
	}
	return merged;
}

/** Every action with a `rest:` route, in the order the services and their actions are listed. */
export function publishedRoutes(
	services: readonly (SchemaShape & { name: string })[]
): PublishedRoute[] {
	const routes: PublishedRoute[] = [];
	const seen = new Map<string, string>();
	for (const service of services) {
		for (const [name, action] of Object.entries(actionsOf(service))) {
			if (!action.rest) continue;
			const actionName = `${service.name}.${name}`;
			const match =
				typeof action.rest === "string"
					? /^(GET|POST|PUT|PATCH|DELETE) (\/\S*)$/.exec(action.rest)
					: null;
			if (!match)
				throw new Error(
					`${actionName}: rest must read "METHOD /path", not ${JSON.stringify(action.rest)}`
				);
			const route = `${match[1]} ${match[2]}`;
			if (seen.has(route))
				throw new Error(`${route} is declared by both ${seen.get(route)} and ${actionName}`);
			seen.set(route, actionName);
			routes.push({
				method: match[1] as Method,
				path: match[2],
				action: actionName,
				summary: action.summary,
				params: (action.params ?? {}) as Rules,
				...(action.responseType ? { responseType: action.responseType } : {}),
				...(action.requestType ? { requestType: action.requestType } : {})
			});
		}
	}
	return routes;
}

/**
 * moleculer-web's alias table for the routes: `{"POST /deals": "deals.create"}`; a route whose body
 * is streamed to its action, moleculer-web's `stream:` alias (`"POST /imports": "stream:imports.start"`).
 */
export function aliasesOf(routes: readonly PublishedRoute[]): Record<string, string> {
	return Object.fromEntries(
		routes.map(route => [
			`${route.method} ${route.path}`,
			route.requestType ? `stream:${route.action}` : route.action
		])
	);
}

function ruleObject(rule: Rule): RuleObject {
	if (typeof rule !== "string") return rule;
	const [type, ...flags] = rule.split("|");
	return { type, optional: flags.includes("optional") };
}

const isOptional = (rule: Rule) => {
	const r = ruleObject(rule);
	return r.optional === true || r.default !== undefined;
};

/** JSON Schema (OpenAPI 3.1) of one fastest-validator rule; unknown types are documented as "anything". */
export function schemaOf(input: Rule): JsonSchema {
	const rule = ruleObject(input);
	const schema: JsonSchema = {};
	switch (rule.type) {
		case "string":
			Object.assign(schema, {
				type: "string",
				minLength: rule.min ?? rule.length,
				maxLength: rule.max ?? rule.length
			});
			if (rule.pattern)
				schema.pattern = rule.pattern instanceof RegExp ? rule.pattern.source : rule.pattern;
			if (rule.enum) schema.enum = [...rule.enum];
			break;
		case "number":
			Object.assign(schema, {
				type: rule.integer ? "integer" : "number",
				minimum: rule.min,
				maximum: rule.max
			});
			if (rule.positive) schema.exclusiveMinimum = 0;
			if (rule.negative) schema.exclusiveMaximum = 0;
			break;
		case "amount": {
			// lib/params.ts: a whole number within bounds, also sent as a string of digits.
			const number = rule.signed
				? {
						type: "integer",
						minimum: rule.max === undefined ? undefined : -rule.max,
						maximum: rule.max,
						not: { const: 0 }
					}
				: { type: "integer", exclusiveMinimum: 0, maximum: rule.max };
			schema.oneOf = [
				number,
				{ type: "string", pattern: rule.signed ? "^\\s*-?\\d+\\s*$" : "^\\s*\\d+\\s*$" }
			];
			break;
		}
		case "boolean":
			schema.type = "boolean";
			break;
		case "enum":
			schema.enum = [...(rule.values ?? [])];
			break;
		case "email":
			Object.assign(schema, { type: "string", format: "email", maxLength: rule.max });
			break;
		case "date":
			Object.assign(schema, { type: "string", format: "date-time" });
			break;
		case "object":
			Object.assign(
				schema,
				objectSchema((rule.props ?? rule.properties ?? {}) as Rules, rule.strict === true)
			);
			break;
		case "array":
			Object.assign(schema, {
				type: "array",
				items: rule.items ? schemaOf(rule.items) : {},
				minItems: rule.min ?? rule.length,
				maxItems: rule.max ?? rule.length
			});
			break;
	}
	if (rule.default !== undefined && typeof rule.default !== "function")
		schema.default = rule.default;
	for (const key of Object.keys(schema)) if (schema[key] === undefined) delete schema[key];
	return schema;
}

/** An object's schema from its props; `strict` (fastest-validator's `$$strict`) refuses other keys. */
export function objectSchema(rules: Rules, strict: boolean): JsonSchema {
	const props = Object.entries(rules).filter(
		(entry): entry is [string, Rule] => !entry[0].startsWith("$$") && typeof entry[1] !== "boolean"
	);
	const required = props.filter(([, rule]) => !isOptional(rule)).map(([name]) => name);
	return {
		type: "object",
		properties: Object.fromEntries(props.map(([name, rule]) => [name, schemaOf(rule)])),
		...(required.length ? { required } : {}),
		...(strict ? { additionalProperties: false } : {})
	};
}

/** Who may call an action, as the gateway's authorisation decides it; `public` needs no token. */
export interface Access {
	public: boolean;
	/** One sentence for the reader: "Staff only", "Staff, or a merchant for its own merchantId"… */
	who: string;
	/** The roles that may call it (`x-roles`): `staff`, `merchant`, `member`; none when public. */
	roles: ("staff" | "merchant" | "member")[];
}

export interface DocumentOptions {
	title: string;
	version: string;
	description: string;
	/** Prefix of every route, as the gateway mounts them. */
	basePath: string;
	access(action: string): Access;
	/** Parameters the gateway itself takes on every POST (e.g. a header), in OpenAPI form. */
	postParameters?: JsonSchema[];
	/** Routes the gateway serves itself, not through an action (already in OpenAPI form). */
	extraPaths?: Record<string, Record<string, JsonSchema>>;
}

const errorResponse = (description: string) => ({
	description,
	content: { "application/json": { schema: { $ref: "#/components/schemas/Error" } } }
});

const COMPONENTS = {
	securitySchemes: {
		bearer: {
			type: "http",
			scheme: "bearer",
			description:
				"A token from API_KEYS (`<token>=staff` or `<token>=merchant:<merchantId>`), or a merchant key issued through the API."
		},
		memberToken: {
			type: "http",
			scheme: "bearer",
			bearerFormat: "JWT",
			description:
				"A member token: a JWT (ES256, RS256 or EdDSA) from the operator's identity provider (MEMBER_JWKS_URL, MEMBER_JWT_ISSUER, MEMBER_JWT_AUDIENCE, MEMBER_ID_CLAIM) or a session OnePoint issued (`POST /api/members/{memberId}/sessions`, keys at `/api/.well-known/jwks.json`). It acts as one member, on its own rows only."
		}
	},
	schemas: {
		Error: {
			type: "object",
			description: "Every error has this shape; `type` is the machine-readable code.",
			required: ["name", "message", "code", "type"],
			properties: {
				name: { type: "string" },
				message: { type: "string" },
				code: { type: "integer", description: "The HTTP status" },
				type: {
					type: "string",
					examples: ["VALIDATION_ERROR", "INSUFFICIENT_POINTS", "SERVICE_UNAVAILABLE"]
				},
				data: {
					description:
						"Details: the fields that failed validation, the ids involved, `retryAfter` on a 503."
				}
			}
		}
	},
	responses: {
		BadRequest: errorResponse("Malformed request (INVALID_JSON)"),
		Unauthorized: errorResponse("No token, or an unknown one"),
		Forbidden: errorResponse("The token's role may not do this"),
		NotFound: errorResponse("No such resource"),
		Conflict: errorResponse(
			"The resource's state refuses it (e.g. INSUFFICIENT_POINTS, DEAL_ALREADY_CANCELLED)"
		),
		ValidationError: errorResponse(
			"A parameter is missing, unknown or out of range (VALIDATION_ERROR, with the fields in `data`)"
		),
		TooManyRequests: errorResponse("Over the per-token rate limit; see Retry-After"),
		PayloadTooLarge: errorResponse(
			"The body is over its limit (e.g. IMPORT_TOO_LARGE); nothing changed"
		),
		UnsupportedMediaType: errorResponse(
			"The body is not of the media type the route reads (UNSUPPORTED_MEDIA_TYPE)"
		),
		ServiceUnavailable: errorResponse(
			"A service behind the gateway cannot answer now; see Retry-After"
		)
	}
};

const ref = (name: string) => ({ $ref: `#/components/responses/${name}` });

function operationOf(
	route: PublishedRoute,
	access: Access,
	postParameters: JsonSchema[]
): JsonSchema {
	const pathParams = [...route.path.matchAll(/:(\w+)/g)].map(m => m[1]);
	const rules = Object.entries(route.params).filter(
		(entry): entry is [string, Rule] => !entry[0].startsWith("$$") && typeof entry[1] !== "boolean"
	);
	const inPath = rules.filter(([name]) => pathParams.includes(name));
	const rest = rules.filter(([name]) => !pathParams.includes(name));
	const hasBody = route.method !== "GET" && route.method !== "DELETE";
	const parameters = [
		...inPath.map(([name, rule]) => ({ name, in: "path", required: true, schema: schemaOf(rule) })),
		...(hasBody
			? []
			: rest.map(([name, rule]) => ({
					name,
					in: "query",
					required: !isOptional(rule),
					schema: schemaOf(rule)
				}))),
		// A streamed body is not kept: those routes take no Idempotency-Key.
		...(route.method === "POST" && !route.requestType ? postParameters : [])
	];
	const body =
		hasBody && rest.length
			? objectSchema(Object.fromEntries(rest), route.params.$$strict === true)
			: undefined;
	const [service] = route.action.split(".");
	// A media type without its parameters (`; charset=…`): the key OpenAPI's `content` expects.
	const mediaType = route.responseType?.split(";")[0].trim();
	return {
		operationId: route.action,
		tags: [service],
		summary: route.summary ?? route.action,
		description: `${access.who}. Action \`${route.action}\`.`,
		"x-roles": access.roles,
		security: access.public
			? []
			: access.roles.includes("member")
				? [{ bearer: [] }, { memberToken: [] }]
				: [{ bearer: [] }],
		...(parameters.length ? { parameters } : {}),
		...(route.requestType
			? {
					requestBody: {
						required: true,
						content: { [route.requestType]: { schema: { type: "string" } } }
					}
				}
			: body
				? {
						requestBody: {
							required: Array.isArray(body.required),
							content: { "application/json": { schema: body } }
						}
					}
				: {}),
		responses: {
			"2XX": mediaType
				? {
						description: `Done: the resource as ${mediaType}`,
						content: { [mediaType]: { schema: { type: "string" } } }
					}
				: {
						description: "Done: the resource or result as JSON",
						content: { "application/json": { schema: {} } }
					},
			...(hasBody ? { "400": ref("BadRequest") } : {}),
			...(route.requestType
				? { "413": ref("PayloadTooLarge"), "415": ref("UnsupportedMediaType") }
				: {}),
			...(access.public ? {} : { "401": ref("Unauthorized"), "403": ref("Forbidden") }),
			...(pathParams.length ? { "404": ref("NotFound") } : {}),
			...(route.method === "GET" ? {} : { "409": ref("Conflict") }),
			...(rules.length ? { "422": ref("ValidationError") } : {}),
			"429": ref("TooManyRequests"),
			"503": ref("ServiceUnavailable")
		}
	};
}

/** The OpenAPI 3.1 document of the routes. */
export function openApiDocument(
	routes: readonly PublishedRoute[],
	options: DocumentOptions
): JsonSchema {
	const paths: Record<string, Record<string, JsonSchema>> = {};
	for (const route of routes) {
		const path = options.basePath + route.path.replace(/:(\w+)/g, "{$1}");
		paths[path] ??= {};
		paths[path][route.method.toLowerCase()] = operationOf(
			route,
			options.access(route.action),
			options.postParameters ?? []
		);
	}
	for (const [path, operations] of Object.entries(options.extraPaths ?? {}))
		paths[path] = { ...paths[path], ...operations };
	return {
		openapi: "3.1.0",
		info: { title: options.title, version: options.version, description: options.description },
		servers: [{ url: "/" }],
		security: [{ bearer: [] }],
		paths,
		components: COMPONENTS
	};
}
