/**
 * The whole system in this process, as the simulator runs it: every service of services/ on one
 * broker with the production options (validator, breaker, timeouts, internal middlewares), on SQLite
 * in a fresh folder or on a fresh MongoDB database, with two things swapped in: the channel adapter
 * is the simulator's (sim/channels.ts), and a middleware can make a synchronous call time out after
 * its effect happened. Clients talk to it over HTTP, through the real gateway.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { AddressInfo } from "node:net";
import type { Server } from "node:http";
import {
	Errors,
	ServiceBroker,
	type Middleware,
	type Service,
	type ServiceSchema,
	type Validators
} from "moleculer";
import { Middleware as ChannelsMiddleware } from "@moleculer/channels";
import { MongoClient } from "mongodb";
import mongoose from "mongoose";
import { loadConfig, type Config } from "../config";
import { createBrokerOptions } from "../config/broker";
import Api from "../services/api.service";
import Billing from "../services/billing.service";
import Dashboard from "../services/dashboard.service";
import DeadLetters from "../services/dead-letters.service";
import Deals from "../services/deals.service";
import Deliveries from "../services/deliveries.service";
import Idempotency from "../services/idempotency.service";
import Members from "../services/members.service";
import Merchants from "../services/merchants.service";
import MyPoints from "../services/my-points.service";
import Orders from "../services/orders.service";
import Payments from "../services/payments.service";
import Points from "../services/points.service";
import Webhooks from "../services/webhooks.service";
import { SimChannels } from "./channels";
import type { SimClock } from "./clock";
import { StoreFaults } from "./store";
import { bodyOf } from "../test/helpers/system";

type AnySchema = ServiceSchema<any, any, any, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

export const SCHEMAS: AnySchema[] = [
	Api,
	Billing,
	Dashboard,
	DeadLetters,
	Deals,
	Deliveries,
	Idempotency,
	Members,
	Merchants,
	MyPoints,
	Orders,
	Payments,
	Points,
	Webhooks
];

/** Services a simulated crash may stop, and the synchronous calls whose answer a fault may lose. */
export const CRASHABLE = [
	"points",
	"deals",
	"orders",
	"members",
	"billing",
	"payments",
	"idempotency"
];
export const TIMED_OUT_CALLS = ["points.debit", "payments.pay", "idempotency.complete"];

const CONNECTION_EVENTS = ["connected", "disconnected", "error", "reconnected"];

// Mongoose formats a stack trace at every query, kept for one error ("Query was already executed")
// that the services never meet: under jest's source maps that was 7% of a MongoDB seed's time.
mongoose.set("skipOriginalStackTraces", true);

export const STAFF_TOKEN = "sim-staff-token-0123456789";

export interface Reply {
	status: number;
	body: unknown;
	/** The body's text, byte for byte: what a replay must repeat. */
	text: string;
	replayed: boolean;
}

export interface Store {
	kind: "sqlite" | "mongodb";
	/** MongoDB: the server's URI; each seed gets a database of its own on it. */
	mongoUri?: string;
}

type Checker = ReturnType<Validators.Base["compile"]>;

/**
 * Params checkers an earlier seed's broker compiled, by schema: every seed declares the same actions
 * with the same validator options, and compiling them again was a tenth of an embedded-store seed.
 * A checker depends on its schema only; one with a function in it is compiled each time.
 */
const checkers = new Map<string, Checker>();

/** The schema as text, regular expressions and non-finite numbers spelled out; undefined if it holds a function. */
function schemaKey(schema: object): string | undefined {
	let plain = true;
	const key = JSON.stringify(schema, (_key, value: unknown) => {
		if (typeof value === "function") plain = false;
		if (value instanceof RegExp) return `\u0000/${value.source}/${value.flags}`;
		// JSON would write Infinity and NaN as null.
		return typeof value === "number" && !Number.isFinite(value) ? `\u0000${value}` : value;
	});
	return plain ? key : undefined;
}

function reuseCheckers(validator: Validators.Base): void {
	const compile = validator.compile.bind(validator);
	validator.compile = schema => {
		const key = schemaKey(schema);
		if (key === undefined) return compile(schema);
		let checker = checkers.get(key);
		if (!checker) checkers.set(key, (checker = compile(schema)));
		return checker;
	};
}

/** A synchronous call answered with a timeout after its handler ran (one-shot, by action name). */
function callTimeouts(armed: Set<string>, onFault: (what: string) => void): Middleware {
	return {
		name: "SimCallTimeouts",
		localAction(next: (ctx: never) => Promise<unknown>, action: { name: string }) {
			if (!TIMED_OUT_CALLS.includes(action.name)) return next;
			return async (ctx: never) => {
				const result = await next(ctx);
				if (armed.delete(action.name)) {
					onFault(`${action.name} ran, its caller saw a timeout`);
					throw new Errors.RequestTimeoutError({ action: action.name, nodeID: "sim" });
				}
				return result;
			};
		}
	} as unknown as Middleware;
}

export class SimSystem {
	readonly broker: ServiceBroker;
	/** The node's configuration: the defaults the simulation did not set, such as the open merchants' terms. */
	readonly config: Config;
	readonly channels: SimChannels;
	readonly faults = new StoreFaults();
	readonly timeouts = new Set<string>();
	private readonly dataDir: string;
	private readonly mongoUri?: string;
	private readonly listeners = new Map<string, Set<unknown>>();
	private port = 0;
	/** Services that died and wait to be started again. */
	readonly dead = new Set<string>();

	constructor(
		clock: SimClock,
		readonly store: Store,
		seed: number,
		onFault: (what: string) => void
	) {
		this.dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-sim-"));
		const mongoUri = store.kind === "mongodb" ? databaseUri(store.mongoUri, seed) : undefined;
		this.mongoUri = mongoUri;
		const config = loadConfig({
			DATA_DIR: this.dataDir,
			MONGO_URI: mongoUri,
			LOG_LEVEL: "fatal",
			METRICS_PORT: "off",
			PORT: "0",
			HOST: "127.0.0.1",
			API_KEYS: `${STAFF_TOKEN}=staff:sim`,
			POINTS_VALID_MONTHS: "2",
			// Members cross tiers within a seed: a save earns up to 1,000 points.
			TIERS: "base:0:1,silver:800:1.5,gold:3000:2",
			// Orders of up to 30,000: the largest are declined.
			PAYMENT_LIMIT: "20000",
			RATE_LIMIT: "1000000",
			// Minutes (LONGEST_WEBHOOK_RETRY_MS in sim/simulation.ts): the seed's clock moves bring retries due.
			WEBHOOK_RETRY_SCHEDULE: "1m,5m,10m",
			WEBHOOK_ALLOW_PRIVATE: "true"
		});
		this.config = config;
		this.channels = new SimChannels(clock, onFault);
		const options = createBrokerOptions(config);
		reuseCheckers(options.validator as Validators.Base);
		options.nodeID = `sim-${seed}`;
		// Nothing routes to this node from elsewhere: stopping need not wait for other nodes to notice.
		options.registry = { ...options.registry, stopDelay: 0 };
		options.middlewares = [
			callTimeouts(this.timeouts, onFault),
			...(options.middlewares ?? []).map(m =>
				typeof m === "object" && (m as { name?: string }).name === "Channels"
					? (ChannelsMiddleware as unknown as (o: object) => Middleware)({ adapter: this.channels })
					: m
			)
		];
		this.broker = new ServiceBroker(options);
		for (const schema of SCHEMAS) this.broker.createService(schema);
		this.faults.onFault = onFault;
		this.faults.onCrash = service => this.dead.add(service);
	}

	async start(): Promise<void> {
		for (const event of CONNECTION_EVENTS)
			this.listeners.set(event, new Set(mongoose.connection.listeners(event)));
		this.faults.activate();
		await this.broker.start();
		for (const service of this.broker.services) this.faults.adopt(service);
		const api = this.service("api") as Service & { server: Server };
		this.port = (api.server.address() as AddressInfo).port;
	}

	async stop(): Promise<void> {
		try {
			await this.broker.stop();
		} finally {
			this.faults.deactivate();
			fs.rmSync(this.dataDir, { recursive: true, force: true });
			if (this.mongoUri) await dropDatabase(this.mongoUri);
			// The adapter adds listeners to mongoose's one connection at every connect: this seed's go,
			// or they would keep each seed's whole system in memory.
			for (const event of CONNECTION_EVENTS)
				for (const listener of mongoose.connection.listeners(event))
					if (!this.listeners.get(event)?.has(listener))
						mongoose.connection.off(event, listener as (...args: unknown[]) => void);
		}
	}

	service(name: string): Service {
		const service = this.broker.getLocalService(name);
		if (!service) throw new Error(`No local service '${name}'`);
		return service;
	}

	/** Starts a new instance of every dead service, on the same store. */
	async restartDead(): Promise<string[]> {
		const names = [...this.dead];
		this.dead.clear();
		for (const name of names) {
			await this.broker.destroyService(this.service(name));
			const schema = SCHEMAS.find(s => s.name === name) as AnySchema;
			const fresh = this.broker.createService(schema);
			await this.broker.waitForServices([name], 10_000, 2);
			this.faults.adopt(fresh);
		}
		return names;
	}

	/** One request through the gateway, as staff. */
	async http(method: string, urlPath: string, body?: unknown, key?: string): Promise<Reply> {
		const res = await fetch(`http://127.0.0.1:${this.port}/api${urlPath}`, {
			method,
			headers: {
				authorization: `Bearer ${STAFF_TOKEN}`,
				...(body === undefined ? {} : { "content-type": "application/json" }),
				...(key ? { "idempotency-key": key } : {})
			},
			body: body === undefined ? undefined : JSON.stringify(body)
		});
		const { text, parsed } = await bodyOf(res);
		return {
			status: res.status,
			body: parsed,
			text,
			replayed: res.headers.get("idempotent-replayed") === "true"
		};
	}
}

/** A database of the seed's own on the server `base` names, dropped when the seed ends. */
function databaseUri(base: string | undefined, seed: number): string {
	if (!base)
		throw new Error("--store mongodb needs MONGO_URI (a server, or the stand-in of test/mongo)");
	const match = /^(mongodb(?:\+srv)?:\/\/[^/?]+)(?:\/[^?]*)?(\?.*)?$/.exec(base);
	if (!match) throw new Error(`Not a MongoDB URI: '${base}'`);
	return `${match[1]}/onepoint-sim-${process.pid}-${seed}${match[2] ?? ""}`;
}

async function dropDatabase(uri: string): Promise<void> {
	const client = await MongoClient.connect(uri);
	try {
		await client.db().dropDatabase();
	} finally {
		await client.close();
	}
}
