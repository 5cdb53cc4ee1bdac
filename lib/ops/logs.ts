/**
 * The node's logger (docs/monitoring.md#logs): Moleculer's short coloured text, or with
 * `LOG_FORMAT=json` one JSON object per line through Moleculer's Pino logger: `time`, `level`,
 * `nodeID`, `ns`, `svc` (the service), `msg`, and the trace's and request's ids where a line is
 * about a request or a message (lib/ops/tracing.ts).
 */
import type { LoggerConfig } from "moleculer";
import { pino, stdTimeFunctions, type Logger } from "pino";
import type { Config } from "../../config";
import { traceFields } from "./tracing";

const LEVELS = ["fatal", "error", "warn", "info", "debug", "trace"] as const;

/**
 * Moleculer logs as `console.log` would (`logger.warn("failed:", err.message)`); pino takes a
 * message and printf arguments, and would drop the rest. So the strings and numbers make the
 * message, an error goes to `err` (with its stack), and anything else to `data`.
 */
function lineOf(args: unknown[]): [Record<string, unknown>, string] {
	const fields: Record<string, unknown> = {};
	const words: string[] = [];
	const data: unknown[] = [];
	for (const arg of args)
		if (arg instanceof Error) fields.err = arg;
		else if (arg !== null && typeof arg === "object") data.push(arg);
		else words.push(String(arg));
	if (data.length) fields.data = data.length === 1 ? data[0] : data;
	return [fields, words.join(" ")];
}

export function loggerOptions(config: Config): LoggerConfig {
	if (config.logFormat === "text")
		return {
			type: "Console",
			options: { level: config.logLevel, formatter: "short", colors: config.logColors }
		};
	const root = pino({
		timestamp: stdTimeFunctions.isoTime,
		formatters: { level: label => ({ level: label }) },
		mixin: traceFields
	});
	return {
		type: "Pino",
		options: {
			level: config.logLevel,
			// Moleculer's bindings (`nodeID`, `ns`, `mod`, `svc`) on a child of one pino per process.
			createLogger(level: string, bindings: Record<string, unknown>) {
				const child: Logger = root.child(bindings, { level });
				return Object.fromEntries(
					LEVELS.map(type => [type, (...args: unknown[]) => child[type](...lineOf(args))])
				);
			}
		}
	};
}
