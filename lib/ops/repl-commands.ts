/**
 * The operator's commands in the Moleculer REPL (`npm run repl`, or `npm start -- --repl`), beside
 * the built-in ones (`call`, `services`, `nodes`, …). Each calls the actions a client would, on
 * whichever node of the cluster serves them, and prints a short readable answer; a failure prints
 * one line with the error's code, never a stack.
 */
import fs from "node:fs";
import path from "node:path";
import { SingleBar } from "cli-progress";
import type { ServiceBroker } from "moleculer";
import type { SettlementView as Settlement } from "../../services/billing.service";
import type { DeadLetterView } from "../../services/dead-letters.service";
import type { ImportView } from "../../services/imports.service";
import type { MemberView } from "../../services/members.service";
import type { MerchantView } from "../../services/merchants.service";
import type { AccountView, ExpiryRun, TransferView } from "../../services/points.service";
import { monthOf } from "../months";

/** What moleculer-repl hands a custom command: its positional arguments by name. */
type Args = Record<string, unknown>;

export interface OperatorCommand {
	command: string;
	description: string;
	action(broker: ServiceBroker, args: Args): Promise<void>;
}

interface LedgerPage {
	rows: {
		at: string;
		cause: string;
		kind: string;
		amount: number;
		balanceAfter: number;
		shortfall?: number;
		reason?: string;
		by?: string;
		counterpartId?: string;
	}[];
	total: number;
}

interface Audit {
	accounts: number;
	entries: number;
	adjustments: { count: number; added: number; taken: number };
	expired: number;
	mismatches: {
		memberId: string;
		balance: number;
		ledgerSum: number;
		lots: number;
		pending: number;
	}[];
}

const LAST_ENTRIES = 10;
/** How often the import's progress is asked for (ms). */
const PROGRESS_MS = 250;
/** How many refused rows the import command prints. */
const REFUSED_SHOWN = 20;

/** Runs a command, printing a failure as one line (`Error [CODE]: message`). */
function guarded(
	run: (broker: ServiceBroker, args: Args) => Promise<void>
): OperatorCommand["action"] {
	return async (broker, args) => {
		try {
			await run(broker, args);
		} catch (err) {
			const e = err as { type?: string; message?: string };
			console.log(`Error [${e.type ?? "ERROR"}]: ${e.message ?? String(err)}`);
		}
	};
}

const settlementLine = (s: Settlement) =>
	`${s.merchantId} ${s.billingMonth} ${s.status}: ${s.usedPoints} points used in ${s.dealCount} deal(s), adjustments ${s.adjustmentPoints}, fee ${s.fee}, billing amount ${s.billingAmount}; issued ${s.issued.points} points for ${s.issued.amount}; net ${netLine(s.net)}; bonus ${s.bonus.points} points, funded by the coalition (${s.status === "final" ? `settled ${s.settledAt}` : `as of ${s.computedAt}`})`;

/** Who pays whom: positive, the coalition pays the merchant. */
const netLine = (net: number) =>
	net >= 0 ? `${net} (the coalition pays)` : `${-net} (the merchant pays)`;

const termsLine = (t: MerchantView["terms"]) =>
	`earn rate ${t.earnRate}, redemption fee ${t.redemptionFee}, point price ${t.pointPrice}`;

/** The month the node's clock is in: "this month" of the commands. */
const thisMonth = () => monthOf(new Date().toISOString());

interface MonthList {
	billingMonth: string;
	status: Settlement["status"];
	settlements: Settlement[];
	totals: Pick<Settlement, "redeemed" | "issued" | "net">;
}

export const operatorCommands: OperatorCommand[] = [
	{
		command: "member <memberId>",
		description:
			"A member, their balance and tier, what expires soon and their last ledger entries",
		action: guarded(async (broker, { memberId }) => {
			const member = await broker.call<MemberView, object>("members.get", { memberId });
			console.log(
				`Member ${member.memberId} ${member.name ?? "(personal data erased)"}: ${member.status}, joined ${member.joinedAt}${member.withdrawnAt ? `, withdrawn ${member.withdrawnAt}` : ""}${member.erasedAt ? `, erased ${member.erasedAt} by ${member.erasedBy}` : ""}`
			);
			const account = await broker.call<AccountView, object>("points.get", { memberId });
			console.log(
				`Balance: ${account.balance} points, ${account.held} held (account ${account.status})`
			);
			for (const hold of account.releasing)
				console.log(`  held: ${hold.points} of deal ${hold.dealId} until ${hold.releaseAt}`);
			const { tier } = account;
			console.log(
				`Tier: ${tier.name} since ${tier.since}; earned ${tier.earned12m} points in 12 months${tier.next ? `, ${tier.next.needed} more to ${tier.next.name}` : ""}`
			);
			const expiring = account.expiring.filter(e => e.points > 0);
			if (expiring.length)
				console.log(
					`Expiring: ${expiring.map(e => `${e.points} at the end of ${e.month}`).join(", ")}`
				);
			const ledger = await broker.call<LedgerPage, object>("points.history", {
				memberId,
				pageSize: LAST_ENTRIES
			});
			console.log(`Last ${ledger.rows.length} of ${ledger.total} ledger entries:`);
			console.table(
				ledger.rows.map(
					({ at, cause, kind, amount, balanceAfter, shortfall, reason, by, counterpartId }) => ({
						at,
						cause,
						kind,
						amount,
						balanceAfter,
						...(shortfall ? { shortfall } : {}),
						...(by ? { by, reason } : {}),
						...(counterpartId ? { counterpartId } : {})
					})
				)
			);
		})
	},
	{
		command: "merchant <merchantId>",
		description:
			"A merchant: its status, the terms in force and those to come, its keys and this month's issued, redeemed and net figures",
		action: guarded(async (broker, { merchantId }) => {
			const merchant = await broker.call<MerchantView, object>("merchants.get", { merchantId });
			console.log(
				`Merchant ${merchant.merchantId} ${merchant.name}: ${merchant.status}${merchant.suspendedAt ? ` since ${merchant.suspendedAt}` : ""}, registered ${merchant.createdAt}`
			);
			console.log(`Terms: ${termsLine(merchant.terms)} (since ${merchant.terms.from})`);
			for (const later of merchant.termsHistory.filter(t => t.from > merchant.terms.from))
				console.log(`  from ${later.from}: ${termsLine(later)}`);
			const keys = await broker.call<{ rows: { status: string }[]; total: number }, object>(
				"merchants.keys",
				{ merchantId, pageSize: 100 }
			);
			console.log(
				`Keys: ${keys.rows.filter(k => k.status === "active").length} active of ${keys.total}`
			);
			const s = await broker.call<Settlement, object>("billing.get", {
				merchantId,
				billingMonth: thisMonth()
			});
			console.log(
				`${s.billingMonth} (${s.status}): issued ${s.issued.points} points for ${s.issued.amount}, redeemed ${s.redeemed.points} points for ${s.redeemed.amount} (fee ${s.redeemed.fee}), net ${netLine(s.net)}`
			);
		})
	},
	{
		command: "merchants",
		description:
			"Every registered merchant, and every other with deals this month, with its status and this month's issued, redeemed and net figures",
		action: guarded(async broker => {
			const billingMonth = thisMonth();
			const [registered, month] = await Promise.all([
				broker.call<{ rows: MerchantView[]; total: number }, object>("merchants.list", {
					pageSize: 100
				}),
				broker.call<MonthList, object>("billing.list", { billingMonth })
			]);
			const figures = new Map(month.settlements.map(s => [s.merchantId, s]));
			const ids = [
				...new Set([...registered.rows.map(m => m.merchantId), ...figures.keys()])
			].sort();
			const byId = new Map(registered.rows.map(m => [m.merchantId, m]));
			console.log(
				`${registered.total} registered merchant(s)${registered.total > registered.rows.length ? ` (the first ${registered.rows.length} below)` : ""}; ${billingMonth} (${month.status}):`
			);
			console.table(
				ids.map(merchantId => {
					const m = byId.get(merchantId);
					const s = figures.get(merchantId);
					return {
						merchantId,
						name: m?.name ?? "(not registered)",
						status: m?.status ?? "default terms",
						issued: s?.issued.amount ?? 0,
						redeemed: s?.redeemed.amount ?? 0,
						net: s?.net ?? 0
					};
				})
			);
			const { issued, redeemed, net } = month.totals;
			console.log(
				`Coalition: issued ${issued.points} points for ${issued.amount}, redeemed ${redeemed.points} points for ${redeemed.amount}, net ${netLine(net)}`
			);
		})
	},
	{
		command: "settle <merchantId> <billingMonth>",
		description:
			"A merchant's settlement of a month (YYYYMM) and its lines: provisional while the month is open, final once it has closed",
		action: guarded(async (broker, { merchantId, billingMonth }) => {
			const settlement = await broker.call<Settlement, object>("billing.settle", {
				merchantId,
				billingMonth
			});
			console.log(`Settlement ${settlementLine(settlement)}`);
			if (settlement.lines.length) console.table(settlement.lines);
		})
	},
	{
		command: "month-end [billingMonth]",
		description:
			"Runs the month-end job: closes every month up to this one (default: the last one) that can close",
		action: guarded(async (broker, { billingMonth }) => {
			const closed = await broker.call<
				{
					closedThrough: string | null;
					months: { billingMonth: string; created: number; settlements: Settlement[] }[];
				},
				object
			>("billing.closeMonth", billingMonth ? { billingMonth } : {});
			if (!closed.months.length)
				console.log(
					`Month-end: nothing more can close yet (closed through ${closed.closedThrough ?? "no month"})`
				);
			for (const month of closed.months) {
				console.log(
					`Month-end ${month.billingMonth}: ${month.settlements.length} merchant(s), ${month.created} made final`
				);
				for (const settlement of month.settlements) console.log(`  ${settlementLine(settlement)}`);
			}
		})
	},
	{
		command: "transfer <fromMemberId> <toMemberId> <points>",
		description:
			"Transfers points from one member to another: completed, or failed with the sender refunded if the receiver withdrew meanwhile",
		action: guarded(async (broker, { fromMemberId, toMemberId, points }) => {
			const transfer = await broker.call<TransferView, object>("points.transfer", {
				memberId: fromMemberId,
				toMemberId,
				points
			});
			console.log(
				`Transfer ${transfer.transferId}: ${transfer.points} points from ${transfer.fromMemberId} to ${transfer.toMemberId}, ${transfer.status}${transfer.reason ? ` (${transfer.reason}: refunded)` : ""} at ${transfer.at}`
			);
		})
	},
	{
		command: "import <file>",
		description:
			"Imports members and opening balances from a CSV file on this node (memberId,name,phone,email,points,earnedAt), with a progress bar",
		action: guarded(async (broker, { file }) => {
			const csv = path.resolve(String(file));
			const { size } = await fs.promises.stat(csv);
			const started = await broker.call<{ importId: string; total: number }, object>(
				"imports.start",
				{},
				{ stream: fs.createReadStream(csv), meta: { contentLength: size } }
			);
			console.log(`Import ${started.importId}: ${started.total} rows`);
			// On a terminal the bar redraws in place; piped (a log), it prints a line every 2 s.
			const bar = new SingleBar({
				format:
					"Import [{bar}] {percentage}% | {value}/{total} rows | {rate} rows/s | ETA {eta_formatted}",
				noTTYOutput: !process.stdout.isTTY,
				hideCursor: true
			});
			const began = performance.now();
			bar.start(started.total, 0, { rate: 0 });
			let job: ImportView;
			for (;;) {
				job = await broker.call<ImportView, object>("imports.get", { importId: started.importId });
				const seconds = (performance.now() - began) / 1000;
				bar.update(job.done, { rate: Math.round(job.done / Math.max(seconds, 0.001)) });
				if (job.status !== "running") break;
				await new Promise(resolve => setTimeout(resolve, PROGRESS_MS));
			}
			bar.stop();
			console.log(
				`Import ${job.importId} ${job.status}: ${job.done} of ${job.total} rows, ${job.created} created, ${job.skipped} skipped, ${job.failed} refused${job.reason ? ` (${job.reason})` : ""}`
			);
			for (const error of job.errors.slice(0, REFUSED_SHOWN))
				console.log(`  row ${error.row}: ${error.code} ${error.message}`);
		})
	},
	{
		command: "member-token <memberId>",
		description:
			"Issues a member token (a session OnePoint signs, valid MEMBER_TOKEN_TTL_S seconds) for an active member, to try the member API",
		action: guarded(async (broker, { memberId }) => {
			const session = await broker.call<{ token: string; expiresAt: string }, object>(
				"members.startSession",
				{ memberId: String(memberId) }
			);
			console.log(`${session.token}\n(valid until ${session.expiresAt})`);
		})
	},
	{
		command: "expire [through]",
		description:
			"Runs the expiry job: expires the earnings left of every month due (or only through this month, YYYYMM, if it is due)",
		action: guarded(async (broker, { through }) => {
			const run = await broker.call<ExpiryRun, object>(
				"points.expire",
				through ? { through: String(through) } : {}
			);
			console.log(
				`Expiry through ${run.through}: ${run.points} points of ${run.members} member(s) expired`
			);
		})
	},
	{
		command: "audit",
		description:
			"Checks every account's balance against the sum of its ledger and of its earning lots, and totals adjustments and expired points",
		action: guarded(async broker => {
			const audit = await broker.call<Audit>("points.audit");
			const { count, added, taken } = audit.adjustments;
			const totals = `Adjustments: ${count} (+${added} / -${taken} points); expired: ${audit.expired} points.`;
			if (!audit.mismatches.length) {
				console.log(
					`Audit OK: ${audit.accounts} account(s), ${audit.entries} ledger entries; every balance equals the sum of its ledger.`
				);
				console.log(totals);
				return;
			}
			console.log(
				`Audit FAILED: ${audit.mismatches.length} of ${audit.accounts} account(s) differ from their ledger:`
			);
			console.table(audit.mismatches);
			console.log(totals);
		})
	},
	{
		command: "dead-letters [action] [id]",
		description:
			"Lists the dead letters waiting for a replay with their error; 'dead-letters replay <id|all>' sends them again to the group that failed them",
		action: guarded(async (broker, { action, id }) => {
			if (action === "replay") {
				if (!id)
					throw Object.assign(new Error("Say which: dead-letters replay <id|all>"), {
						type: "USAGE"
					});
				const result = await broker.call<{ count: number; replayed: DeadLetterView[] }, object>(
					"dead-letters.replay",
					{ id }
				);
				console.log(
					`Replayed ${result.count} dead letter(s)${result.replayed.length ? `: ${result.replayed.map(l => l.id).join(", ")}` : ""}`
				);
				return;
			}
			if (action)
				throw Object.assign(
					new Error(`Unknown action '${String(action)}': dead-letters [replay <id|all>]`),
					{ type: "USAGE" }
				);
			const page = await broker.call<{ rows: DeadLetterView[]; total: number }, object>(
				"dead-letters.list",
				{ pageSize: 100 }
			);
			console.log(
				`${page.total} dead letter(s) waiting for a replay${page.total > page.rows.length ? ` (the newest ${page.rows.length} below)` : ""}`
			);
			for (const l of page.rows)
				console.log(
					`  ${l.id} ${l.channel} (${l.group}) after ${l.tries} tries, ${l.deadAt}: ${l.error} ${JSON.stringify(l.payload)}`
				);
		})
	}
];
