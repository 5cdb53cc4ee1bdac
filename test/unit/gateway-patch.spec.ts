/**
 * The gateway replaces moleculer-web's internal `callAction` with its idempotent call
 * (lib/gateway/idempotent-call.ts). This suite fails when an upgrade of moleculer-web changes what that
 * relies on: the installed version, the method and its parameters, that routing calls the service's
 * own `callAction` (after authentication), that the stock one sends an answer with one `res.end(body)`
 * and throws a failure for `onError` to send. The real gateway runs here, with stand-ins for the
 * idempotency service and the actions behind two routes.
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Errors, type Context, type ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import { CALL_ACTION_ARITY, stockCallAction } from "../../lib/gateway/idempotent-call";
import { PATCHES } from "../../lib/patches";
import ApiService from "../../services/api.service";
import type { Begun, StoredResponse } from "../../services/idempotency.service";
import { createTestBroker } from "../helpers/broker";
import { freePort, TOKENS } from "../helpers/system";

const ROOT = path.resolve(__dirname, "../..");
const installed = (
	JSON.parse(
		fs.readFileSync(path.join(ROOT, "node_modules/moleculer-web/package.json"), "utf8")
	) as { version: string }
).version;
const stock = (ApiGateway.methods as Record<string, unknown>).callAction as (
	...args: unknown[]
) => unknown;
const base64url = (text: string) => createHash("sha256").update(text).digest("base64url");

describe("the patch of moleculer-web's callAction", () => {
	it("was checked against the installed moleculer-web", () => {
		expect(installed).toBe(PATCHES.moleculerWeb.checked);
	});

	it("wraps a method moleculer-web still has, with the parameters the wrap passes on", () => {
		expect(typeof stock).toBe("function");
		expect(stock.length).toBe(CALL_ACTION_ARITY);
		expect(String(stock)).toMatch(
			/^async callAction\(route, actionName, req, res, params, isStream\)/
		);
		expect(stockCallAction(ApiGateway)).toBe(stock);
	});

	it("refuses to start, naming the patch and the checked version, when the method is gone or changed", async () => {
		expect(() => stockCallAction({ methods: {} })).toThrow(
			"lib/gateway/idempotent-call.ts patches moleculer-web internals checked against 0.11.0; the installed version lacks callAction"
		);
		expect(() => stockCallAction({ methods: { callAction: "no" } })).toThrow(
			"the installed version lacks callAction"
		);
		expect(() =>
			stockCallAction({ methods: { callAction: async (_route: unknown, _req: unknown) => true } })
		).toThrow("moleculer-web's callAction now takes 2 parameters, not 6");
		// The gateway itself, on a moleculer-web without it: its creation fails, before it listens.
		const methods = ApiGateway.methods as Record<string, unknown>;
		const broker = createTestBroker([], { API_KEYS: `${TOKENS.staff}=staff`, PORT: "0" });
		delete methods.callAction;
		try {
			expect(() => broker.createService(ApiService)).toThrow(
				"the installed version lacks callAction"
			);
		} finally {
			methods.callAction = stock;
			await broker.stop();
		}
	});

	describe("as the gateway uses it", () => {
		let broker: ServiceBroker;
		let url: string;
		/** What the stand-in idempotency service was asked, in order; `next` is what `begin` answers. */
		let asked: { action: string; params: Record<string, unknown> }[];
		let next: Begun;
		/** The calls that reached the stand-in actions, with their request id. */
		let ran: { action: string; params: unknown; requestId?: string }[];

		const post = (route: string, body: object, headers: Record<string, string> = {}) =>
			fetch(`${url}/api${route}`, {
				method: "POST",
				headers: {
					Authorization: `Bearer ${TOKENS.staff}`,
					"Content-Type": "application/json",
					...headers
				},
				body: JSON.stringify(body)
			});
		const idempotency = (action: string) => (ctx: Context<Record<string, unknown>>) => {
			asked.push({ action, params: ctx.params });
			return action === "begin" ? next : true;
		};

		beforeAll(async () => {
			const port = await freePort();
			broker = createTestBroker(
				[
					ApiService,
					{
						name: "idempotency",
						actions: {
							begin: { visibility: "public", handler: idempotency("begin") },
							complete: { visibility: "public", handler: idempotency("complete") },
							release: { visibility: "public", handler: idempotency("release") }
						}
					},
					{
						name: "members",
						actions: {
							join(
								ctx: Context<
									unknown,
									{ requestId?: string; $statusCode?: number; $location?: string }
								>
							) {
								ran.push({
									action: "members.join",
									params: ctx.params,
									requestId: ctx.meta.requestId
								});
								ctx.meta.$statusCode = 201;
								ctx.meta.$location = "/api/members/m-1";
								return { memberId: "m-1", name: "Ann" };
							}
						}
					},
					{
						name: "deals",
						actions: {
							create(ctx: Context<{ fail?: string }, { requestId?: string }>) {
								ran.push({
									action: "deals.create",
									params: ctx.params,
									requestId: ctx.meta.requestId
								});
								if (ctx.params.fail === "undone")
									throw new Errors.MoleculerError("Points unavailable", 503, "POINTS_UNAVAILABLE", {
										retryAfter: 5
									});
								throw new Errors.MoleculerError("boom", 500, "BOOM");
							}
						}
					}
				],
				{ PORT: String(port), HOST: "127.0.0.1", API_KEYS: `${TOKENS.staff}=staff` }
			);
			await broker.start();
			url = `http://127.0.0.1:${port}`;
		});
		afterAll(() => broker.stop());
		beforeEach(() => {
			asked = [];
			ran = [];
			next = { outcome: "run", requestId: "01JREQUEST0000000000000000" };
		});

		it("routes a POST through the service's own callAction, and records the answer exactly as sent", async () => {
			const response = await post(
				"/members",
				{ name: "Ann", email: "ann@example.com" },
				{ "Idempotency-Key": "k-1" }
			);
			const body = Buffer.from(await response.arrayBuffer());
			expect(response.status).toBe(201);
			expect(response.headers.get("location")).toBe("/api/members/m-1");
			expect(JSON.parse(body.toString())).toEqual({ memberId: "m-1", name: "Ann" });
			expect(ran).toEqual([
				{
					action: "members.join",
					params: { name: "Ann", email: "ann@example.com" },
					requestId: "01JREQUEST0000000000000000"
				}
			]);
			const running = {
				scope: base64url(TOKENS.staff),
				key: "k-1",
				requestId: "01JREQUEST0000000000000000"
			};
			expect(asked).toEqual([
				{
					action: "begin",
					params: {
						scope: running.scope,
						key: "k-1",
						// Keys in order: the canonical body.
						fingerprint: base64url('POST /api/members\n{"email":"ann@example.com","name":"Ann"}')
					}
				},
				{
					action: "complete",
					params: {
						...running,
						response: {
							status: 201,
							headers: {
								"Content-Type": "application/json; charset=utf-8",
								Location: "/api/members/m-1"
							},
							body: body.toString("base64")
						} satisfies StoredResponse
					}
				}
			]);
		});

		it("replays a recorded answer without calling the action", async () => {
			next = {
				outcome: "replay",
				response: {
					status: 201,
					headers: { "Content-Type": "application/json; charset=utf-8" },
					body: Buffer.from('{"a":1}').toString("base64")
				}
			};
			const response = await post("/members", { name: "Ann" }, { "Idempotency-Key": "k-2" });
			expect(response.status).toBe(201);
			expect(response.headers.get("idempotent-replayed")).toBe("true");
			expect(await response.text()).toBe('{"a":1}');
			expect(ran).toEqual([]);
			expect(asked.map(a => a.action)).toEqual(["begin"]);
		});

		it("gets the action's failure thrown back, sent by onError, and releases the key on a 5xx", async () => {
			const failed = await post("/deals", { fail: "boom" }, { "Idempotency-Key": "k-3" });
			expect(failed.status).toBe(500);
			expect(await failed.json()).toEqual({
				name: "InternalError",
				message: "Internal server error",
				code: 500,
				type: "INTERNAL_ERROR"
			});
			const undone = await post("/deals", { fail: "undone" }, { "Idempotency-Key": "k-4" });
			expect(undone.status).toBe(503);
			expect(undone.headers.get("retry-after")).toBe("5");
			expect(asked.filter(a => a.action === "release").map(a => a.params)).toEqual([
				{
					scope: base64url(TOKENS.staff),
					key: "k-3",
					requestId: "01JREQUEST0000000000000000",
					renew: false
				},
				{
					scope: base64url(TOKENS.staff),
					key: "k-4",
					requestId: "01JREQUEST0000000000000000",
					renew: true
				}
			]);
			expect(asked.filter(a => a.action === "complete")).toEqual([]);
		});

		it("leaves a call without a key to moleculer-web, and is not reached before authentication", async () => {
			const plain = await post("/members", { name: "Ann" });
			expect(plain.status).toBe(201);
			expect(ran.map(r => r.requestId)).toEqual([undefined]);
			const anonymous = await fetch(`${url}/api/members`, {
				method: "POST",
				headers: { "Content-Type": "application/json", "Idempotency-Key": "k-5" },
				body: "{}"
			});
			expect(anonymous.status).toBe(401);
			expect(asked).toEqual([]);
			expect(ran).toHaveLength(1);
		});
	});
});
