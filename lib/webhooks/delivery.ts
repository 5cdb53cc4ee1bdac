/**
 * One webhook delivery as the Standard Webhooks specification (standardwebhooks.com) has it: a JSON
 * body signed with the endpoint's secret (`whsec_` and base64 of 32 random bytes) as
 * `v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">`, sent by POST to the
 * address that was checked (lib/webhooks/ssrf.ts), with a timeout; and when the next attempt of a
 * failed one is due.
 */
import { createHmac, randomBytes } from "node:crypto";
import http from "node:http";
import https from "node:https";
import type { LookupFunction } from "node:net";
import { BlockedAddress, resolveTarget, type AddressPolicy, type Target } from "./ssrf";

const SECRET_PREFIX = "whsec_";

export const newSecret = (): string => `${SECRET_PREFIX}${randomBytes(32).toString("base64")}`;

/** `v1,<signature>` of one message by one secret. */
export function signature(secret: string, id: string, timestamp: number, body: string): string {
	const key = Buffer.from(secret.slice(SECRET_PREFIX.length), "base64");
	return `v1,${createHmac("sha256", key).update(`${id}.${timestamp}.${body}`).digest("base64")}`;
}

/** What an attempt came to: the endpoint's HTTP status, or why there was none. */
export type Outcome = number | "TIMEOUT" | "NETWORK" | "BLOCKED_ADDRESS";

export interface Message {
	/** The `webhook-id`: the same on every attempt of one delivery. */
	id: string;
	/** When this attempt is signed. */
	at: Date;
	body: string;
	/** The secrets to sign with: the current one, and the previous one during its 24 h after a rotation. */
	secrets: string[];
}

/** The request's headers: one signature per secret, space-separated. */
export function headersOf(message: Message): Record<string, string> {
	const timestamp = Math.floor(message.at.getTime() / 1000);
	return {
		"content-type": "application/json",
		"user-agent": "OnePoint-Webhooks",
		"webhook-id": message.id,
		"webhook-timestamp": String(timestamp),
		"webhook-signature": message.secrets
			.map(secret => signature(secret, message.id, timestamp, message.body))
			.join(" ")
	};
}

/** A resolver that answers the checked address only, whatever the name resolves to by then. */
function pinned(target: Target): LookupFunction {
	return ((_host: string, options: { all?: boolean }, callback: (...args: unknown[]) => void) =>
		options.all
			? callback(null, [{ address: target.address, family: target.family }])
			: callback(null, target.address, target.family)) as unknown as LookupFunction;
}

const timedOut = (signal: AbortSignal) =>
	new Promise<never>((_resolve, reject) =>
		signal.addEventListener("abort", () => reject(signal.reason), { once: true })
	);

/**
 * POSTs `message` to `url` and answers what came of it: the status once the endpoint's answer
 * begins (its body is not waited for), `TIMEOUT` when no answer began within `timeoutMs` (the
 * name's resolution included), `NETWORK` when it could not be reached, `BLOCKED_ADDRESS` when the
 * policy refuses where it leads. Redirects are not followed: one is an answer that is not 2xx.
 */
export async function send(
	url: URL,
	message: Message,
	policy: AddressPolicy,
	timeoutMs: number
): Promise<Outcome> {
	const signal = AbortSignal.timeout(timeoutMs);
	let target: Target;
	try {
		target = await Promise.race([resolveTarget(url, policy), timedOut(signal)]);
	} catch (err) {
		if (err instanceof BlockedAddress) return "BLOCKED_ADDRESS";
		return signal.aborted ? "TIMEOUT" : "NETWORK";
	}
	return new Promise<Outcome>(resolve => {
		const request = (url.protocol === "https:" ? https : http).request(
			url,
			{ method: "POST", headers: headersOf(message), agent: false, lookup: pinned(target), signal },
			response => {
				resolve(response.statusCode ?? 0);
				response.resume();
			}
		);
		request.on("error", () => resolve(signal.aborted ? "TIMEOUT" : "NETWORK"));
		request.end(message.body);
	});
}

/** Whether an outcome is a success: any 2xx. */
export const delivered = (outcome: Outcome): boolean =>
	typeof outcome === "number" && outcome >= 200 && outcome < 300;

/**
 * The wait before retry number `retry` (1, 2, …) by the schedule, with ±20 % jitter so that the
 * retries of many deliveries that failed together do not all come back at the same moment; undefined
 * once the schedule is spent.
 */
export function retryDelay(
	schedule: readonly number[],
	retry: number,
	random = Math.random
): number | undefined {
	const base = schedule[retry - 1];
	return base === undefined ? undefined : Math.round(base * (0.8 + 0.4 * random()));
}
