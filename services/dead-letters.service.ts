/**
 * Dead letters: the messages a consumer group gave up on after its last retry, kept with their error
 * so that an operator can see them (`dead-letters` in the REPL, the dashboard's overview, the
 * `onepoint_dead_letters_waiting` gauge) and replay them once the cause is fixed. A replay sends
 * the message again to the group that failed it, and to no other; consumers apply each event once by
 * its key, so a replay applies what never was, and repeats nothing that was.
 */
import type { Context, Service, ServiceSchema } from "moleculer";
import { conflict, notFound } from "../lib/errors";
import { onScrape, SERIES } from "../lib/ops/metrics";
import * as P from "../lib/params";
import { DEAD_LETTER, REPLAY_GROUP } from "../lib/channels/redelivery";
import { DbMixin, type DbThis } from "../mixins/db.mixin";

export interface DeadLetter {
	_id: string;
	/** The channel and consumer group that gave up on the message. */
	channel: string;
	group: string;
	error: string;
	tries: number;
	payload: unknown;
	/** The message's own headers (its context), sent again with a replay. */
	headers: Record<string, string>;
	deadAt: string;
	/** `replaying` between taking it and having sent it again (back to `dead` if that failed). */
	status: "dead" | "replaying" | "replayed";
	replayedAt?: string;
}

export interface DeadLetterView extends Omit<DeadLetter, "_id" | "headers"> {
	id: string;
}

interface ChannelAdapter {
	publish(
		channel: string,
		payload: unknown,
		opts: { headers: Record<string, string> }
	): Promise<void>;
	parseMessageHeaders(raw: unknown): Record<string, string> | null;
}

interface Methods {
	channels(): ChannelAdapter;
	replayOne(letter: DeadLetter): Promise<boolean>;
	toView(letter: DeadLetter): DeadLetterView;
}

type This = Service & DbThis<DeadLetter> & Methods & { scrape?: () => void };

const DEAD_LETTER_HEADERS = new Set<string>([...Object.values(DEAD_LETTER), REPLAY_GROUP]);

const DeadLettersService: ServiceSchema<object, Methods, object, This> = {
	name: "dead-letters",
	mixins: [DbMixin("dead-letters")],

	actions: {
		/** Dead letters, newest first: those waiting for a replay by default. */
		list: {
			visibility: "public",
			params: {
				$$strict: true,
				status: { type: "enum", values: ["dead", "replaying", "replayed", "all"], default: "dead" },
				...P.paging
			},
			async handler(this: This, ctx: Context<{ status: string; page: number; pageSize: number }>) {
				const { status, page, pageSize } = ctx.params;
				return this.store.newestFirst(
					{ status: status === "all" ? undefined : status },
					page,
					pageSize,
					letter => this.toView(letter)
				);
			}
		},

		/** How many dead letters wait for a replay. */
		count: {
			visibility: "public",
			params: { $$strict: true },
			async handler(this: This) {
				return { waiting: await this.store.count({ status: "dead" }) };
			}
		},

		/** Sends one dead letter (by id), or every waiting one (`all`), again to the group that failed it. */
		replay: {
			visibility: "public",
			params: { $$strict: true, id: P.id },
			async handler(this: This, ctx: Context<{ id: string }>) {
				const letters =
					ctx.params.id === "all"
						? await this.store.find({ query: { status: "dead" }, sort: ["_id"] })
						: [await this.store.findById(ctx.params.id)];
				const replayed: DeadLetterView[] = [];
				for (const letter of letters) {
					if (!letter)
						throw notFound(
							"DEAD_LETTER_NOT_FOUND",
							`No dead letter '${ctx.params.id}'`,
							ctx.params
						);
					if (await this.replayOne(letter))
						replayed.push(this.toView({ ...letter, status: "replayed" }));
					else if (ctx.params.id !== "all")
						throw conflict(
							"DEAD_LETTER_ALREADY_REPLAYED",
							`Dead letter '${letter._id}' is already replayed`,
							{ id: letter._id }
						);
				}
				return { replayed, count: replayed.length };
			}
		}
	},

	channels: {
		DEAD_LETTERS: {
			group: "dead-letters",
			// Nowhere further to go: keep trying (every minute, after the first few) until it is stored.
			maxRetries: 100_000,
			async handler(this: This, payload: unknown, raw?: unknown) {
				const headers = this.channels().parseMessageHeaders(raw) ?? {};
				const ownHeaders = Object.fromEntries(
					Object.entries(headers).filter(([key]) => !DEAD_LETTER_HEADERS.has(key))
				);
				const source = raw as { id?: string; seq?: number };
				await this.store.insertUnique({
					// The adapters name each dead letter; one from an older adapter is named by its message.
					_id: headers[DEAD_LETTER.id] ?? `m${source.id ?? source.seq}`,
					channel: headers[DEAD_LETTER.channel] ?? "unknown",
					group: headers[DEAD_LETTER.group] ?? "unknown",
					error: headers[DEAD_LETTER.error] ?? "unknown",
					tries: Number(headers[DEAD_LETTER.tries] ?? 0),
					payload,
					headers: ownHeaders,
					deadAt: new Date().toISOString(),
					status: "dead"
				});
			}
		}
	},

	methods: {
		channels(this: This) {
			return (this.broker as unknown as { channelAdapter: ChannelAdapter }).channelAdapter;
		},

		/** Takes the letter (of two replays, one wins), sends it, then records it replayed. */
		async replayOne(this: This, letter: DeadLetter) {
			if (
				!(await this.store.update(
					{ _id: letter._id, status: "dead" },
					{ $set: { status: "replaying" } }
				))
			)
				return false;
			try {
				await this.channels().publish(letter.channel, letter.payload, {
					headers: { ...letter.headers, [REPLAY_GROUP]: letter.group }
				});
			} catch (err) {
				await this.store.update({ _id: letter._id }, { $set: { status: "dead" } });
				throw err;
			}
			await this.store.update(
				{ _id: letter._id },
				{ $set: { status: "replayed", replayedAt: new Date().toISOString() } }
			);
			return true;
		},

		toView(letter: DeadLetter): DeadLetterView {
			const { _id, headers: _headers, ...rest } = letter;
			return { id: _id, ...rest };
		}
	},

	async started(this: This) {
		// A replay a crash interrupted may or may not have been sent: it waits again (a second send is harmless).
		await this.store.update({ status: "replaying" }, { $set: { status: "dead" } });
		this.scrape = onScrape(this.broker, async () => [
			{ name: SERIES.deadLetters, value: await this.store.count({ status: "dead" }) }
		]);
	},

	stopped(this: This) {
		this.scrape?.();
	}
};

export default DeadLettersService;
