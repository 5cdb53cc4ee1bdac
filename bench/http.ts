/**
 * 1. HTTP: `POST /api/deals` against the system as `npm start` runs it (metrics on), beside the same
 * gateway answering a trivial authenticated action (`GET /api/me`), itself beside stock moleculer-web
 * answering a trivial action: the floor HTTP and moleculer-web set. Meanwhile a member of staff reads
 * the dashboard: its member query at rest and under the deal load. Then the same deals, each under a
 * new `Idempotency-Key`, beside the deals without one: what taking and recording a key costs. And the
 * trivial route again on a node with tracing on (every request sampled, spans sent to a Zipkin
 * stand-in that takes and drops them), beside the same route with tracing off.
 */
import { fork } from "node:child_process";
import http from "node:http";
import path from "node:path";
import { freePort, System } from "../test/helpers/system";
import {
	AUTH,
	auditOverHttp,
	dealBody,
	httpLoad,
	joinMembers,
	readLatencies,
	settledAudit,
	type Figures,
	type Options,
	type Row
} from "./lib";

/** Stock moleculer-web's `GET /api/me`, in a process of its own (`stock-gateway.ts`), with Moleculer's metrics or not. */
async function stockGatewayLoad(options: Options, metrics: boolean): Promise<Figures> {
	const port = await freePort();
	const child = fork(
		path.join(__dirname, "stock-gateway.js"),
		[String(port), ...(metrics ? ["metrics"] : [])],
		{ stdio: "inherit" }
	);
	try {
		await new Promise<void>((resolve, reject) => {
			child.once("message", () => resolve());
			child.once("exit", code => reject(new Error(`The stock gateway exited with ${code}`)));
		});
		return await httpLoad(`http://127.0.0.1:${port}/api/me`, options, { method: "GET" });
	} finally {
		child.kill();
	}
}

/** A Zipkin collector that takes every batch of spans and keeps none (a benchmark sends millions). */
async function spanSink(): Promise<{ url: string; close(): Promise<void> }> {
	const port = await freePort();
	const server = http.createServer((req, res) => {
		req.resume();
		req.on("end", () => res.writeHead(202).end());
	});
	await new Promise<void>(resolve => server.listen(port, "127.0.0.1", resolve));
	return {
		url: `http://127.0.0.1:${port}`,
		close: () => new Promise(resolve => server.close(() => resolve()))
	};
}

/** `GET /api/me` on a node of its own with every request traced. */
async function tracedLoad(options: Options): Promise<Figures> {
	const sink = await spanSink();
	const system = await System.start({
		RATE_LIMIT: "1000000000",
		TRACING: "zipkin",
		TRACING_SAMPLE: "1",
		ZIPKIN_URL: sink.url
	});
	try {
		return await httpLoad(`${system.url}/api/me`, options, { method: "GET", headers: AUTH });
	} finally {
		await system.stop();
		await sink.close();
	}
}

export interface DashboardReads {
	atRest: { p50: number; p99: number };
	underLoad: { p50: number; p99: number };
}

export async function httpBench(options: Options): Promise<{
	row: Row;
	gateway: Row;
	gatewayMetrics: Row;
	traced: Row;
	keyed: Row;
	dashboard: DashboardReads;
	audit: { accounts: number; mismatches: number };
}> {
	// The rate limiter would refuse a benchmark's load: lift it for this run.
	const system = await System.start({ RATE_LIMIT: "1000000000" });
	try {
		await joinMembers(system, options.members);
		const dashboardUrl = () =>
			`/api/dashboard/members/b${Math.floor(Math.random() * options.members)}`;
		const atRest = await readLatencies(system, dashboardUrl, n => n < 100);
		const trivial = await httpLoad(`${system.url}/api/me`, options, {
			method: "GET",
			headers: AUTH
		});
		const traced = await tracedLoad(options);
		const stock = await stockGatewayLoad(options, false);
		const stockMetrics = await stockGatewayLoad(options, true);
		let loading = true;
		const [deals, underLoad] = await Promise.all([
			httpLoad(`${system.url}/api/deals`, options, {
				method: "POST",
				headers: AUTH,
				setupRequest: req => ({ ...req, body: JSON.stringify(dealBody(options.members)) })
			}).finally(() => (loading = false)),
			readLatencies(system, dashboardUrl, () => loading)
		]);
		let key = 0;
		const keyed = await httpLoad(`${system.url}/api/deals`, options, {
			method: "POST",
			setupRequest: req => ({
				...req,
				headers: { ...AUTH, "idempotency-key": `bench-${process.pid}-${++key}` },
				body: JSON.stringify(dealBody(options.members))
			})
		});
		return {
			row: {
				what: "POST /api/deals (HTTP, one process)",
				figures: deals,
				baseline: "GET /api/me",
				baselineFigures: trivial
			},
			keyed: {
				what: "POST /api/deals with Idempotency-Key",
				figures: keyed,
				baseline: "POST /api/deals",
				baselineFigures: deals
			},
			gateway: {
				what: "GET /api/me (our gateway, metrics on)",
				figures: trivial,
				baseline: "stock moleculer-web, trivial action",
				baselineFigures: stock
			},
			gatewayMetrics: {
				what: "GET /api/me (our gateway, metrics on)",
				figures: trivial,
				baseline: "stock moleculer-web, Moleculer's metrics on",
				baselineFigures: stockMetrics
			},
			traced: {
				what: "GET /api/me (our gateway, tracing on, all sampled)",
				figures: traced,
				baseline: "GET /api/me (tracing off)",
				baselineFigures: trivial
			},
			dashboard: { atRest, underLoad },
			audit: await settledAudit(() => auditOverHttp(system, options.members))
		};
	} finally {
		await system.stop();
	}
}
