/**
 * docs/channels.md, what flows between the services, is what the code says (test/helpers/channel-table.ts),
 * and the code's channels hang together: every channel of `Channels` is sent by some service and
 * received by some consumer group, and nothing is sent or received on a channel `Channels` does not
 * declare (the dead-letter channel aside: the channel adapters send it, config/broker.ts names it).
 */
import fs from "node:fs";
import path from "node:path";
import { channelDoc, channelTable, ROOT, type ChannelTable } from "../helpers/channel-table";

/** Channels that no group consumes by design, and why (none so far). */
const UNCONSUMED_BY_DESIGN: Record<string, string> = {};

let table: ChannelTable;

beforeAll(() => {
	table = channelTable();
});

test("docs/channels.md is what the code says (run `npm run docs:channels` after changing a channel, a producer or a consumer)", () => {
	const file = path.join(ROOT, "docs/channels.md");
	const written = fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
	const generated = channelDoc(table);
	if (written === generated) return;
	const [have, want] = [written.split("\n"), generated.split("\n")];
	const line =
		Array.from({ length: Math.max(have.length, want.length) }, (_, i) => i).find(
			i => have[i] !== want[i]
		) ?? 0;
	throw new Error(
		`docs/channels.md is out of date: run \`npm run docs:channels\` and commit the result.\n` +
			`First difference, line ${line + 1}:\n  docs/channels.md: ${have[line] ?? "(missing)"}\n  from the code:    ${want[line] ?? "(nothing)"}`
	);
});

test("the table reads the channels, their producers and consumers from the code", () => {
	expect(table.channels.length).toBeGreaterThan(0);
	const saved = table.channels.find(c => c.channel === "deal.saved");
	expect(saved).toMatchObject({ payload: "DealEvent", producers: ["deals"] });
	expect(saved?.consumers.map(c => c.group)).toContain("points");
	// Through deals' own `eventOf(channel, deal)`, not a literal `outboxEvent("deal.used", …)`.
	expect(table.channels.find(c => c.channel === "deal.used")?.producers).toEqual(["deals"]);
});

test("every producing call names its channel where the table can read it", () => {
	expect(table.unresolved).toEqual([]);
});

test("every channel of `Channels` has a producer service and a consumer group", () => {
	const unproduced = table.channels.filter(c => c.producers.length === 0).map(c => c.channel);
	const unconsumed = table.channels
		.filter(c => c.consumers.length === 0 && !(c.channel in UNCONSUMED_BY_DESIGN))
		.map(c => c.channel);
	expect({ unproduced, unconsumed }).toEqual({ unproduced: [], unconsumed: [] });
});

test("every channel sent or received is declared in `Channels` (or is the dead-letter channel)", () => {
	expect(table.undeclared).toEqual([]);
	expect(table.deadLetters?.consumers.map(c => c.service)).toEqual(["dead-letters"]);
});

test("every producer is a service (an event sent from a mixin or a helper would be named by its file instead)", () => {
	const files = table.channels.flatMap(c => c.producers).filter(p => p.includes("/"));
	expect(files).toEqual([]);
});
