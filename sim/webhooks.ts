/**
 * A partner's webhook endpoint as the simulator runs it: a real HTTP server on 127.0.0.1 that
 * answers 500 at a rate drawn from the seed (never at a quiet moment), sometimes after a short delay,
 * and records every request; and the checks of what it received against what happened.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import type { Service } from "moleculer";
import type { Collection } from "../mixins/db.mixin";
import type { Deal } from "../services/deals.service";
import type { Delivery } from "../services/webhooks.service";
import { Violation } from "./checks";
import type { Prng } from "./prng";
import type { SimSystem } from "./system";

export interface Received {
	/** The path the webhook was subscribed at: which webhook it is for. */
	path: string;
	id: string;
	timestamp: string;
	signature: string;
	body: string;
	status: number;
}

/** A webhook the seed subscribed: where, to what, and its secret. */
export interface Subscription {
	path: string;
	webhookId: string;
	secret: string;
	events: string[];
	merchantId?: string;
}

export class Receiver {
	readonly received: Received[] = [];
	/** At a quiet moment it answers 200 to everything. */
	calm = false;
	private server?: http.Server;

	constructor(
		private readonly rng: Prng,
		private readonly failRate: number
	) {}

	async start(): Promise<number> {
		this.server = http.createServer((req, res) => {
			const chunks: Buffer[] = [];
			req.on("data", (chunk: Buffer) => chunks.push(chunk));
			req.on("end", () => {
				const status = !this.calm && this.rng.chance(this.failRate) ? 500 : 200;
				const delay = this.rng.chance(0.2) ? this.rng.int(1, 20) : 0;
				this.received.push({
					path: req.url ?? "",
					id: String(req.headers["webhook-id"]),
					timestamp: String(req.headers["webhook-timestamp"]),
					signature: String(req.headers["webhook-signature"]),
					body: Buffer.concat(chunks).toString("utf8"),
					status
				});
				setTimeout(() => res.writeHead(status).end(), delay);
			});
		});
		await new Promise<void>(resolve => this.server?.listen(0, "127.0.0.1", resolve));
		return (this.server.address() as AddressInfo).port;
	}

	async stop(): Promise<void> {
		const server = this.server;
		if (!server) return;
		server.closeAllConnections();
		await new Promise<void>(resolve => server.close(() => resolve()));
	}
}

type WebhooksService = Service & {
	deliveries: Collection<Delivery>;
	sending: Set<Promise<void>>;
	dispatch(): Promise<void>;
};

/**
 * Sends every delivery that is due until none is left pending: the webhooks service's dispatcher run
 * and its attempts awaited, and the clock moved past the longest retry wait when one is pending.
 */
export async function drainWebhooks(
	system: SimSystem,
	advance: (ms: number) => void,
	longestRetryMs: number
): Promise<void> {
	const service = system.service("webhooks") as WebhooksService;
	for (let round = 0; round < 10; round++) {
		await service.dispatch();
		await Promise.all([...service.sending]);
		if (!(await service.deliveries.count({ status: { $in: ["pending", "sending"] } }))) return;
		advance(Math.ceil(longestRetryMs * 1.2) + 1);
	}
	throw new Violation("webhook deliveries still pending after 10 rounds of retries");
}

/** The Standard Webhooks signature, computed here from the spec (not by the code under test). */
function signedBy(secret: string, r: Received): boolean {
	const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
	const expected = Buffer.from(
		createHmac("sha256", key).update(`${r.id}.${r.timestamp}.${r.body}`).digest("base64")
	);
	return r.signature.split(" ").some(s => {
		const given = Buffer.from(s.replace(/^v1,/, ""));
		return (
			s.startsWith("v1,") && given.length === expected.length && timingSafeEqual(given, expected)
		);
	});
}

/**
 * Once quiet and drained: every subscribed event that happened reached its webhook (or was given up
 * after every attempt failed), each signed with the webhook's secret, under one `webhook-id` across
 * its retries; nothing was sent of an event that did not happen.
 */
export async function checkWebhooks(
	system: SimSystem,
	receiver: Receiver,
	subscriptions: Subscription[]
): Promise<void> {
	const fail = (message: string): never => {
		throw new Violation(message);
	};
	const deals = await (system.service("deals") as Service & { store: Collection<Deal> }).store.find(
		{ query: {} }
	);
	const members = await (
		system.service("members") as Service & { store: Collection<{ _id: string }> }
	).store.find({ query: {} });
	const deliveries = await (system.service("webhooks") as WebhooksService).deliveries.find({
		query: {}
	});
	for (const sub of subscriptions) {
		const expected = new Set<string>();
		if (sub.events.includes("deal.created"))
			for (const deal of deals)
				if (
					deal.status !== "fail" &&
					deal.status !== "pending" &&
					(!sub.merchantId || deal.merchantId === sub.merchantId)
				)
					expected.add(`deal.created:${deal._id}`);
		if (sub.events.includes("member.joined"))
			for (const member of members) expected.add(`member.joined:${member._id}`);
		const idsByEvent = new Map<string, Set<string>>();
		const byId = new Map<string, Received[]>();
		for (const r of receiver.received.filter(x => x.path === sub.path)) {
			if (!signedBy(sub.secret, r))
				fail(`webhook ${sub.path}: delivery ${r.id} is not signed with its secret`);
			const body = JSON.parse(r.body) as {
				type: string;
				data: { dealId?: string; memberId?: string };
			};
			const event = `${body.type}:${body.type === "deal.created" ? body.data.dealId : body.data.memberId}`;
			if (!expected.has(event))
				fail(`webhook ${sub.path} was sent ${event}, which did not happen (or is not its)`);
			idsByEvent.set(event, (idsByEvent.get(event) ?? new Set()).add(r.id));
			byId.set(r.id, [...(byId.get(r.id) ?? []), r]);
		}
		for (const [event, ids] of idsByEvent)
			if (ids.size > 1)
				fail(`webhook ${sub.path}: ${event} was sent under ${ids.size} webhook-ids`);
		for (const event of expected) {
			const ids = idsByEvent.get(event);
			const id = ids ? [...ids][0] : undefined;
			const attempts = id ? (byId.get(id) ?? []) : [];
			if (attempts.some(r => r.status < 300)) continue;
			const queued = deliveries.find(d => d._id === id);
			// Given up only after every attempt was answered with a failure.
			if (queued?.status === "failed" && queued.attempts === attempts.length) continue;
			fail(
				`webhook ${sub.path}: ${event} never delivered (${attempts.length} attempts received, queued as ${queued ? `${queued.status} after ${queued.attempts}` : "nothing"})`
			);
		}
	}
}
