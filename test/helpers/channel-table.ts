/**
 * What flows between the services, read from the code: `docs/channels.md` is `channelDoc()`'s output
 * (`npm run docs:channels` writes it, test/unit/channels-doc.spec.ts checks it).
 *
 * - The durable channels and their payload types: the keys of `interface Channels` in
 *   contracts/channels.ts, read with the TypeScript compiler API.
 * - Their producers: the services whose file calls `outboxEvent("<channel>", …)`, directly or through
 *   a method of their own that passes its channel parameter on (`this.eventOf("deal.used", deal)`);
 *   also `sendToChannel("<channel>", …)`, should anything bypass the outbox.
 * - Their consumer groups: each service schema's `channels` once merged with its mixins, as Moleculer
 *   merges them, and as @moleculer/channels reads them (the key, or the definition's `name`; its
 *   `group`, by default the service's full name).
 * - The dead-letter channel: the channel adapters' `deadLettering.queueName` (config/broker.ts).
 * - Plain (non-durable) Moleculer events: `broker.broadcast/emit("<event>", …)` (or `ctx.…`) and each
 *   schema's `events`.
 */
import fs from "node:fs";
import path from "node:path";
import { Service, type ServiceSchema } from "moleculer";
import ts from "typescript";

/** The repository: the nearest folder above this file with a package.json (also when run from dist/). */
export const ROOT = (() => {
	for (let dir = __dirname; ; dir = path.dirname(dir)) {
		if (fs.existsSync(path.join(dir, "package.json"))) return dir;
		if (path.dirname(dir) === dir) throw new Error(`No package.json above ${__dirname}`);
	}
})();

/** Where the service modules are loaded from: services/ beside this file's tree (sources, or their build in dist/). */
const SERVICE_MODULES = path.join(__dirname, "../../services");

/** Folders scanned for producers, relative to the root. */
const SOURCE_DIRS = ["services", "mixins", "lib"];

/** What produces the dead-letter channel: no service, the channel adapters themselves. */
export const ADAPTERS = "the channel adapters";

export interface Consumer {
	group: string;
	service: string;
}

export interface ChannelRow {
	channel: string;
	/** The payload's type as written in `Channels`, on one line. */
	payload: string;
	/** The channel's doc comment in `Channels`. */
	doc: string;
	producers: string[];
	consumers: Consumer[];
}

export interface EventRow {
	event: string;
	producers: string[];
	consumers: string[];
}

export interface ChannelTable {
	/** Every channel of `Channels`, in declaration order. */
	channels: ChannelRow[];
	/** The dead-letter channel (config/broker.ts), when found, and its consumers. */
	deadLetters?: { channel: string; consumers: Consumer[] };
	/** Channels produced or consumed that `Channels` does not declare (nor is the dead-letter channel). */
	undeclared: { channel: string; producers: string[]; consumers: Consumer[] }[];
	/** Plain Moleculer events sent or handled by the services. */
	events: EventRow[];
	/** Producing calls whose channel could not be read (`file:line: text`): the producer lists would miss them. */
	unresolved: string[];
}

function parse(file: string): ts.SourceFile {
	return ts.createSourceFile(file, fs.readFileSync(file, "utf8"), ts.ScriptTarget.Latest, true);
}

const relative = (file: string) => path.relative(ROOT, file).split(path.sep).join("/");

function where(node: ts.Node): string {
	const source = node.getSourceFile();
	const { line } = source.getLineAndCharacterOfPosition(node.getStart());
	return `${relative(source.fileName)}:${line + 1}: ${node.getText().replace(/\s+/g, " ")}`;
}

/** A type node printed on one line, without its comments. */
function typeText(node: ts.TypeNode): string {
	const visit = (n: ts.Node) => {
		ts.setEmitFlags(n, ts.EmitFlags.SingleLine);
		n.forEachChild(visit);
	};
	visit(node);
	const printer = ts.createPrinter({ removeComments: true, newLine: ts.NewLineKind.LineFeed });
	return printer
		.printNode(ts.EmitHint.Unspecified, node, node.getSourceFile())
		.replace(/\s+/g, " ")
		.replace(/;\s*}/g, " }");
}

function docOf(node: ts.Node): string {
	const docs = (node as { jsDoc?: ts.JSDoc[] }).jsDoc ?? [];
	return docs
		.map(doc => ts.getTextOfJSDocComment(doc.comment) ?? "")
		.join(" ")
		.replace(/\s+/g, " ")
		.trim();
}

/** The keys of `interface Channels`, with their payload types and doc comments. */
export function declaredChannels(root = ROOT): Omit<ChannelRow, "producers" | "consumers">[] {
	const source = parse(path.join(root, "contracts/channels.ts"));
	const channels = source.statements.find(
		(s): s is ts.InterfaceDeclaration => ts.isInterfaceDeclaration(s) && s.name.text === "Channels"
	);
	if (!channels) throw new Error("contracts/channels.ts declares no `interface Channels`");
	return channels.members.map(member => {
		if (
			!ts.isPropertySignature(member) ||
			!member.type ||
			!(ts.isStringLiteral(member.name) || ts.isIdentifier(member.name))
		)
			throw new Error(`Unexpected member of Channels: ${where(member)}`);
		return { channel: member.name.text, payload: typeText(member.type), doc: docOf(member) };
	});
}

/** The strings an expression can be, when it is written as literals (`"a"`, `c ? "a" : "b"`, `"a" as X`). */
function literals(expr: ts.Expression): string[] | undefined {
	if (ts.isStringLiteral(expr) || ts.isNoSubstitutionTemplateLiteral(expr)) return [expr.text];
	if (
		ts.isParenthesizedExpression(expr) ||
		ts.isAsExpression(expr) ||
		ts.isSatisfiesExpression(expr)
	)
		return literals(expr.expression);
	if (ts.isConditionalExpression(expr)) {
		const [a, b] = [literals(expr.whenTrue), literals(expr.whenFalse)];
		return a && b ? [...a, ...b] : undefined;
	}
	return undefined;
}

/** The called function's name: `f(…)`, `this.f(…)`, `x.y.f(…)`. */
function calleeName(call: ts.CallExpression): string | undefined {
	const callee = call.expression;
	if (ts.isIdentifier(callee)) return callee.text;
	if (ts.isPropertyAccessExpression(callee)) return callee.name.text;
	return undefined;
}

type FunctionLike = ts.FunctionLikeDeclaration;

/** The function a node is in, and its name (a method, a property, a variable, a function declaration). */
function enclosingFunction(node: ts.Node): { fn: FunctionLike; name?: string } | undefined {
	for (let n = node.parent; n; n = n.parent) {
		if (ts.isFunctionLike(n) && "body" in n) {
			const fn = n as FunctionLike;
			const named =
				fn.name ??
				(ts.isPropertyAssignment(fn.parent) || ts.isVariableDeclaration(fn.parent)
					? fn.parent.name
					: undefined);
			const name =
				named && (ts.isIdentifier(named) || ts.isStringLiteral(named)) ? named.text : undefined;
			return { fn, name };
		}
	}
	return undefined;
}

function calls(source: ts.SourceFile): ts.CallExpression[] {
	const found: ts.CallExpression[] = [];
	const visit = (n: ts.Node) => {
		if (ts.isCallExpression(n)) found.push(n);
		n.forEachChild(visit);
	};
	visit(source);
	return found;
}

interface ProducerSite {
	channel: string;
	file: string;
}

/**
 * Where channels are produced: `outboxEvent("<channel>", …)`, and calls of the functions that pass
 * their own parameter on as `outboxEvent`'s channel (found until no new one appears), with literal
 * channels; also `sendToChannel("<channel>", …)`.
 */
function producerSites(root: string): { sites: ProducerSite[]; unresolved: string[] } {
	const files = SOURCE_DIRS.flatMap(dir => {
		const abs = path.join(root, dir);
		return fs.existsSync(abs)
			? (fs.readdirSync(abs, { recursive: true }) as string[]).map(f => path.join(abs, f))
			: [];
	})
		.filter(f => f.endsWith(".ts") && !f.endsWith(".d.ts"))
		.sort();
	const sources = files.map(parse);
	/** Producing function name → the index of its channel parameter. */
	const producing = new Map<string, number>([["outboxEvent", 0]]);
	const sites = new Map<string, ProducerSite>();
	const unresolved = new Map<ts.Node, string>();
	for (let grown = true; grown;) {
		grown = false;
		for (const source of sources)
			for (const call of calls(source)) {
				const name = calleeName(call);
				const index = name === undefined ? undefined : producing.get(name);
				if (index === undefined) continue;
				const arg = call.arguments[index];
				const channels = arg && literals(arg);
				if (channels) {
					for (const channel of channels)
						sites.set(`${source.fileName}|${channel}`, { channel, file: source.fileName });
					continue;
				}
				// A parameter passed on: the function is a producer too, by that parameter.
				const outer = arg && ts.isIdentifier(arg) ? enclosingFunction(call) : undefined;
				const param =
					outer?.fn.parameters.findIndex(
						p => ts.isIdentifier(p.name) && p.name.text === (arg as ts.Identifier).text
					) ?? -1;
				if (outer?.name && param >= 0) {
					if (producing.get(outer.name) !== param) {
						producing.set(outer.name, param);
						grown = true;
					}
					unresolved.delete(call);
				} else unresolved.set(call, where(call));
			}
	}
	// Not the outbox's own sending (`sendToChannel(event.channel, …)`): only a literal channel is a producer.
	for (const source of sources)
		for (const call of calls(source)) {
			const channels =
				calleeName(call) === "sendToChannel" && call.arguments[0]
					? literals(call.arguments[0])
					: undefined;
			for (const channel of channels ?? [])
				sites.set(`${source.fileName}|${channel}`, { channel, file: source.fileName });
		}
	return { sites: [...sites.values()], unresolved: [...unresolved.values()] };
}

/** Plain Moleculer events sent with a literal name: `broker.broadcast("x", …)`, `ctx.emit("x", …)`, … */
function eventSites(root: string): { event: string; file: string }[] {
	const found: { event: string; file: string }[] = [];
	for (const dir of SOURCE_DIRS) {
		const abs = path.join(root, dir);
		if (!fs.existsSync(abs)) continue;
		for (const f of (fs.readdirSync(abs, { recursive: true }) as string[]).sort()) {
			if (!f.endsWith(".ts") || f.endsWith(".d.ts")) continue;
			const source = parse(path.join(abs, f));
			for (const call of calls(source)) {
				const callee = call.expression;
				if (
					!ts.isPropertyAccessExpression(callee) ||
					!["emit", "broadcast", "broadcastLocal"].includes(callee.name.text)
				)
					continue;
				if (!/(^|\.)(broker|ctx)$/.test(callee.expression.getText())) continue;
				for (const event of (call.arguments[0] && literals(call.arguments[0])) ?? [])
					found.push({ event, file: source.fileName });
			}
		}
	}
	return found;
}

/** The dead-letter channel: `deadLettering: { …, queueName: "<channel>" }` in config/broker.ts. */
function deadLetterChannel(root: string): string | undefined {
	const file = path.join(root, "config/broker.ts");
	if (!fs.existsSync(file)) return undefined;
	let found: string | undefined;
	const visit = (n: ts.Node) => {
		if (
			ts.isPropertyAssignment(n) &&
			n.name.getText() === "deadLettering" &&
			ts.isObjectLiteralExpression(n.initializer)
		)
			for (const prop of n.initializer.properties)
				if (ts.isPropertyAssignment(prop) && prop.name.getText() === "queueName")
					found = literals(prop.initializer)?.[0];
		n.forEachChild(visit);
	};
	visit(parse(file));
	return found;
}

interface LoadedService {
	/** The service file (absolute, in the sources). */
	file: string;
	name: string;
	/** The schema merged with its mixins. */
	merged: Partial<ServiceSchema>;
}

/** Every service schema in services/*.service.ts, merged with its mixins as Moleculer merges them. */
export function loadServices(root = ROOT): LoadedService[] {
	const dir = path.join(root, "services");
	return fs
		.readdirSync(dir)
		.filter(file => file.endsWith(".service.ts"))
		.sort()
		.map(file => {
			const modulePath = path.join(SERVICE_MODULES, file.replace(/\.ts$/, ""));
			// Loaded by name, as moleculer-runner loads them.
			// eslint-disable-next-line @typescript-eslint/no-require-imports
			const schema = (require(modulePath) as { default: ServiceSchema }).default;
			if (!schema?.name)
				throw new Error(`services/${file} exports no service schema as its default`);
			// Moleculer's own merge (`merged` hooks aside: they need a live service).
			const merged = schema.mixins
				? Service.prototype.applyMixins.call(Service.prototype, schema)
				: schema;
			return { file: path.join(dir, file), name: String(merged.name), merged };
		});
}

/** The consumer groups of each channel in a merged schema, as @moleculer/channels reads `channels`. */
function consumersOf(service: LoadedService): { channel: string; consumer: Consumer }[] {
	const { merged } = service;
	const fullName = Service.getVersionedFullName(
		service.name,
		(merged.settings as { $noVersionPrefix?: boolean } | undefined)?.$noVersionPrefix
			? undefined
			: merged.version
	);
	return Object.entries((merged.channels ?? {}) as Record<string, unknown>).map(([key, def]) => {
		const chan = (typeof def === "function" ? {} : def) as { name?: string; group?: string };
		return {
			channel: chan.name ?? key,
			consumer: { group: chan.group ?? fullName, service: service.name }
		};
	});
}

const byText = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
const unique = (values: string[]) => [...new Set(values)].sort(byText);
const uniqueConsumers = (consumers: Consumer[]) =>
	[...new Map(consumers.map(c => [`${c.group}|${c.service}`, c])).values()].sort(
		(a, b) => byText(a.group, b.group) || byText(a.service, b.service)
	);

/** Everything the page says, from the code. */
export function channelTable(root = ROOT): ChannelTable {
	const declared = declaredChannels(root);
	const services = loadServices(root);
	const serviceOf = new Map(services.map(s => [s.file, s.name]));
	/** A service file is its service; a mixin or helper is named by its path. */
	const producerName = (file: string) => serviceOf.get(file) ?? relative(file);

	const { sites, unresolved } = producerSites(root);
	const producers = new Map<string, string[]>();
	for (const site of sites)
		producers.set(site.channel, [...(producers.get(site.channel) ?? []), producerName(site.file)]);
	const consumers = new Map<string, Consumer[]>();
	for (const { channel, consumer } of services.flatMap(consumersOf))
		consumers.set(channel, [...(consumers.get(channel) ?? []), consumer]);

	const deadLetter = deadLetterChannel(root);
	const names = new Set(declared.map(c => c.channel));
	const undeclared = unique([...producers.keys(), ...consumers.keys()])
		.filter(channel => !names.has(channel) && channel !== deadLetter)
		.map(channel => ({
			channel,
			producers: unique(producers.get(channel) ?? []),
			consumers: uniqueConsumers(consumers.get(channel) ?? [])
		}));

	const emitted = eventSites(root);
	// Not Moleculer's own `$…` events (`$services.changed`, `$node.connected`, …): the broker sends those.
	const handled = services.flatMap(s =>
		Object.keys((s.merged.events ?? {}) as object)
			.filter(event => !event.startsWith("$"))
			.map(event => ({ event, service: s.name }))
	);
	const events = unique([...emitted.map(e => e.event), ...handled.map(h => h.event)]).map(
		event => ({
			event,
			producers: unique(emitted.filter(e => e.event === event).map(e => producerName(e.file))),
			consumers: unique(handled.filter(h => h.event === event).map(h => h.service))
		})
	);

	return {
		channels: declared.map(c => ({
			...c,
			producers: unique(producers.get(c.channel) ?? []),
			consumers: uniqueConsumers(consumers.get(c.channel) ?? [])
		})),
		deadLetters:
			deadLetter === undefined
				? undefined
				: { channel: deadLetter, consumers: uniqueConsumers(consumers.get(deadLetter) ?? []) },
		undeclared,
		events,
		unresolved
	};
}

const list = (names: string[]) => (names.length ? names.join(", ") : "nobody");
/** A consumer group, with its service when that is not named the same. */
const groups = (consumers: Consumer[]) =>
	list(consumers.map(c => (c.group === c.service ? c.group : `${c.group} (in ${c.service})`)));
const sentence = (text: string) =>
	text ? ` ${text.charAt(0).toUpperCase()}${text.slice(1)}${/[.!?]$/.test(text) ? "" : "."}` : "";

/** docs/channels.md: the table as Markdown, already as Prettier formats it. */
export function channelDoc(table: ChannelTable = channelTable()): string {
	const lines = [
		"# What flows between the services",
		"",
		"Which service sends what to which other, for finding who is affected by a change to an event: generated from the code by `npm run docs:channels` and checked by a test (test/unit/channels-doc.spec.ts), so edit the code, not this page.",
		"",
		"## Durable channels",
		"",
		"Each channel of `Channels` in contracts/channels.ts, its payload type, the services that send it (through their outbox) and the consumer groups that receive it; each group gets every message once.",
		"",
		...table.channels.map(
			c =>
				`- **${c.channel}** (\`${c.payload}\`) — from ${list(c.producers)}; to ${groups(c.consumers)}.${sentence(c.doc)}`
		),
		...table.undeclared.map(
			c =>
				`- **${c.channel}** (not declared in \`Channels\`) — from ${list(c.producers)}; to ${groups(c.consumers)}.`
		)
	];
	if (table.deadLetters)
		lines.push(
			`- **${table.deadLetters.channel}** (the failed message, with its channel, group and error in headers) — from ${ADAPTERS}, once a consumer group has given up on a message that failed for itself, after its retries (\`deadLettering\` in config/broker.ts; a store or a service unavailable is retried until it answers, never dead-lettered: lib/channels/redelivery.ts); to ${groups(table.deadLetters.consumers)}, which can replay it to the group that failed it.`
		);
	if (table.events.length)
		lines.push(
			"",
			"## Plain Moleculer events",
			"",
			"Not durable: only the nodes connected at that moment get them (Moleculer's own `$…` events aside).",
			"",
			...table.events.map(
				e => `- **${e.event}** — from ${list(e.producers)}; to ${list(e.consumers)}.`
			)
		);
	return lines.join("\n") + "\n";
}
