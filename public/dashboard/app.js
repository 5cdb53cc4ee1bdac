// OnePoint staff dashboard: plain JavaScript over the gateway's /api/dashboard routes.
// The staff token stays in this tab (sessionStorage) and goes only into Authorization headers.
"use strict";

const $ = selector => document.querySelector(selector);
const state = {
	token: sessionStorage.getItem("onepoint-token") || "",
	memberId: "",
	page: 1,
	pageSize: 10,
	charts: {}
};
const number = value => Number(value || 0).toLocaleString("en-US");

/** A transaction's note: a transfer's other member, an adjustment's reason and who made it, a tier's change. */
const note = t =>
	t.counterpartId
		? `${t.type === "in" ? "from" : "to"} ${t.counterpartId}`
		: t.by
			? `${t.reason} (${t.by})`
			: t.reason || "";

async function api(path) {
	const res = await fetch(`/api${path}`, { headers: { Authorization: `Bearer ${state.token}` } });
	const body = await res.json().catch(() => ({}));
	if (!res.ok)
		throw Object.assign(new Error(body.message || res.statusText), {
			status: res.status,
			type: body.type
		});
	return body;
}

function chart(id, type, labels, datasets) {
	state.charts[id]?.destroy();
	state.charts[id] = new Chart($(`#${id}`), {
		type,
		data: { labels, datasets },
		options: {
			animation: false,
			responsive: true,
			plugins: { legend: { display: datasets.length > 1 } },
			scales: { y: { beginAtZero: true } }
		}
	});
}

function rows(tbody, items, cells) {
	tbody.replaceChildren(
		...items.map(item => {
			const tr = document.createElement("tr");
			for (const [text, className] of cells(item)) {
				const td = document.createElement("td");
				td.textContent = text;
				if (className) td.className = className;
				tr.append(td);
			}
			return tr;
		})
	);
}

async function loadOverview() {
	const o = await api("/dashboard/overview");
	$("#overview-members").textContent = number(o.members);
	$("#overview-active").textContent = number(o.activeAccounts);
	$("#overview-outstanding").textContent = number(o.pointsOutstanding);
	// null when the dead-letters service did not answer.
	$("#overview-dead-letters").textContent = o.deadLetters == null ? "?" : number(o.deadLetters);
	chart(
		"deals-per-day",
		"bar",
		o.dealsPerDay.map(d => d.day.slice(5)),
		[{ label: "Deals", data: o.dealsPerDay.map(d => d.deals), backgroundColor: "#2d6cdf" }]
	);
	rows($("#top-merchants tbody"), o.topMerchants, m => [
		[m.merchantId],
		[number(m.deals)],
		[number(m.earnedPoints)],
		[number(m.usedPoints)]
	]);
	// Null while billing does not answer. Each side's amount, with its points.
	const points = side => `${number(side.amount)} (${number(side.points)} points)`;
	rows($("#settlement-preview tbody"), o.settlementPreview ?? [], m => [
		[m.merchantId],
		[points(m.issued)],
		[points(m.redeemed)],
		[number(m.net), m.net < 0 ? "net-negative" : "net-positive"]
	]);
	// No months when points never expire (POINTS_VALID_MONTHS=0).
	const expiring = o.expiringSoon.months;
	$("#expiring-soon").hidden = $("#overview-expiring-figure").hidden = !expiring.length;
	$("#overview-expiring").textContent = number(expiring.reduce((sum, e) => sum + e.points, 0));
	rows($("#expiring-months tbody"), expiring, e => [[e.month], [number(e.points)]]);
	rows($("#expiring-members tbody"), o.expiringSoon.members, m => [
		[`${m.name || ""} (${m.memberId})`],
		[number(m.points)],
		[m.firstMonth || ""]
	]);
}

async function loadMember(options = {}) {
	if (!state.memberId) return;
	try {
		const [m, page] = await Promise.all([
			api(`/dashboard/members/${encodeURIComponent(state.memberId)}`),
			api(
				`/dashboard/members/${encodeURIComponent(state.memberId)}/transactions?page=${state.page}&pageSize=${state.pageSize}`
			)
		]);
		$("#member-error").textContent = "";
		$("#member").hidden = false;
		$("#member-name").textContent = `${m.member.name || ""} (${m.member.memberId})`;
		$("#member-status").textContent = m.member.status;
		$("#member-status").className = `badge ${m.member.status}`;
		// Null until a posting has stated the member's tier.
		$("#member-tier").hidden = !m.tier;
		if (m.tier) {
			$("#member-tier").textContent = m.tier.name;
			$("#member-tier").title = `since ${new Date(m.tier.since).toLocaleString()}`;
		}
		for (const key of ["balance", "held", "earned", "used", "cancelled", "expired", "adjusted"])
			$(`#${key}`).textContent = number(m.member[key]);
		$("#member-expiring-soon").hidden = !m.expiring.length;
		rows($("#member-expiring tbody"), m.expiring, e => [[e.month], [number(e.points)]]);
		chart(
			"balance-chart",
			"line",
			m.series.map(p => new Date(p.at).toLocaleString()),
			[
				{
					label: "Balance",
					data: m.series.map(p => p.balance),
					borderColor: "#2d6cdf",
					tension: 0.2
				}
			]
		);
		chart(
			"monthly-chart",
			"bar",
			m.monthly.map(x => x.month),
			[
				{ label: "Earned", data: m.monthly.map(x => x.earned), backgroundColor: "#3a9d5d" },
				{ label: "Used", data: m.monthly.map(x => x.used), backgroundColor: "#2d6cdf" },
				{ label: "Cancelled", data: m.monthly.map(x => x.cancelled), backgroundColor: "#e0a030" },
				{ label: "Expired", data: m.monthly.map(x => x.expired), backgroundColor: "#b42318" },
				{ label: "Adjusted", data: m.monthly.map(x => x.adjusted), backgroundColor: "#7a5cc2" }
			]
		);
		rows($("#by-merchant tbody"), m.byMerchant, x => [
			[x.merchantId],
			[number(x.earned)],
			[number(x.used)]
		]);
		const known = new Set([...$("#transactions tbody").children].map(tr => tr.dataset.id));
		rows($("#transactions tbody"), page.rows, t => [
			[new Date(t.at).toLocaleString()],
			[t.kind],
			[t.type],
			[t.merchantId || ""],
			[number(t.amount)],
			[number(t.point)],
			[t.returnedAmount ? `${number(t.returnedAmount)} (${number(t.returnedPoints)} points)` : ""],
			[t.status.replace("_", " "), `status-${t.status}`],
			[note(t)]
		]);
		[...$("#transactions tbody").children].forEach((tr, i) => {
			tr.dataset.id = page.rows[i].id;
			if (options.live && !known.has(tr.dataset.id)) tr.classList.add("fresh");
		});
		const pages = Math.max(1, Math.ceil(page.total / page.pageSize));
		$("#page").textContent = `page ${page.page} of ${pages} (${page.total} transactions)`;
		$("#prev").disabled = page.page <= 1;
		$("#next").disabled = page.page >= pages;
	} catch (err) {
		$("#member").hidden = true;
		$("#member-error").textContent =
			err.status === 404 ? `No member '${state.memberId}'.` : err.message;
	}
}

/** Follows the gateway's event stream (fetch, so the token goes in a header) and refreshes what changed. */
async function follow() {
	for (;;) {
		try {
			const res = await fetch("/api/dashboard/stream", {
				headers: { Authorization: `Bearer ${state.token}` }
			});
			if (!res.ok) throw new Error(res.statusText);
			$("#live").hidden = false;
			const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
			let buffer = "";
			let pending;
			for (;;) {
				const { value, done } = await reader.read();
				if (done) break;
				buffer += value;
				const events = buffer.split("\n\n");
				buffer = events.pop();
				const updates = events
					.filter(e => e.startsWith("event: update"))
					.map(e => JSON.parse(e.slice(e.indexOf("data: ") + 6)));
				if (!updates.length) continue;
				const touchesMember = updates.some(u => u.memberIds.includes(state.memberId));
				// Coalesce a burst of updates into one refresh.
				clearTimeout(pending);
				pending = setTimeout(() => {
					loadOverview().catch(() => undefined);
					if (touchesMember && state.page === 1) loadMember({ live: true });
				}, 150);
			}
		} catch {
			// the stream broke: retry below
		}
		$("#live").hidden = true;
		await new Promise(resolve => setTimeout(resolve, 2000));
	}
}

async function signIn(token) {
	state.token = token;
	try {
		await loadOverview();
	} catch (err) {
		$("#signin-error").textContent =
			err.status === 401
				? "Unknown token."
				: err.status === 403
					? "This token is not a staff token."
					: err.message;
		return;
	}
	sessionStorage.setItem("onepoint-token", token);
	$("#signin").hidden = true;
	$("#app").hidden = false;
	follow();
}

$("#signin-form").addEventListener("submit", event => {
	event.preventDefault();
	signIn($("#token").value.trim());
});
$("#search-form").addEventListener("submit", event => {
	event.preventDefault();
	state.memberId = $("#member-id").value.trim();
	state.page = 1;
	loadMember();
});
$("#prev").addEventListener("click", () => {
	state.page--;
	loadMember();
});
$("#next").addEventListener("click", () => {
	state.page++;
	loadMember();
});
if (state.token) signIn(state.token);
