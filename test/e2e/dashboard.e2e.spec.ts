/**
 * The staff dashboard in real headless Chromium (Debian's, driven by playwright-core): sign in with a
 * staff token, search a member, read the numbers of a scenario this test made, watch a new deal
 * arrive live and a partial return of it, and keep a screenshot (docs/dashboard.png shows one).
 */
import path from "node:path";
import { chromium, type Browser, type Page } from "playwright-core";
import { eventually } from "../helpers/broker";
import { faketime } from "../helpers/clock";
import { System, TOKENS } from "../helpers/system";

jest.setTimeout(90_000);

const SCREENSHOT = path.resolve(__dirname, "../artifacts/dashboard.png");

describe("staff dashboard in Chromium", () => {
	let system: System;
	let browser: Browser;
	let page: Page;
	const api = (method: string, urlPath: string, body?: unknown) =>
		system.call(method, `/api${urlPath}`, body);
	/** The overview's merchants this month: merchant, issued, redeemed, net. */
	const merchantRows = async () =>
		Promise.all(
			(await page.locator("#settlement-preview tbody tr").all()).map(row =>
				row.locator("td").allTextContents()
			)
		);

	beforeAll(async () => {
		// Points valid one month after the month earned: this month's expire at the end of the next.
		system = await System.start({ POINTS_VALID_MONTHS: "1", ...faketime("2026-05-14 10:00:00") });
		await api("POST", "/members", { memberId: "0001", name: "Kim Minji" });
		await api("POST", "/members", { memberId: "0002", name: "Lee" });
		await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "20",
			dealAmount: 100000,
			type: "save"
		});
		await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "21",
			dealAmount: 50000,
			type: "save"
		});
		await eventually(async () =>
			expect((await api("GET", "/points/0001")).body.balance).toBe(1500)
		);
		await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "20",
			dealAmount: 10000,
			type: "use",
			point: 300
		});
		const cancelled = await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "20",
			dealAmount: 10000,
			type: "use",
			point: 200
		});
		await api("POST", `/deals/${cancelled.body.id}/cancel`);
		// A breakfast order of 2 × 5000 earns 1000 points.
		expect(
			(
				await api("POST", "/orders", {
					memberId: "0001",
					productId: "breakfast-set",
					qty: 2,
					unitPrice: 5000
				})
			).body
		).toMatchObject({
			status: "paid"
		});
		await eventually(async () =>
			expect((await api("GET", "/dashboard/members/0001")).body.member).toMatchObject({
				balance: 2200,
				cancelled: 200
			})
		);

		browser = await chromium.launch({
			executablePath: "/usr/bin/chromium",
			args: [
				"--no-sandbox",
				"--disable-gpu",
				"--disable-quic",
				"--no-first-run",
				"--disable-background-networking",
				"--disable-component-update",
				"--disable-sync"
			]
		});
		page = await browser.newPage({ viewport: { width: 1280, height: 1500 } });
	});

	afterAll(async () => {
		await browser?.close();
		await system.stop();
	});

	it("refuses a token that is not a staff token", async () => {
		await page.goto(`${system.url}/dashboard/`);
		await page.fill("#token", TOKENS.merchant20);
		await page.click("#sign-in");
		await page.waitForSelector("#signin-error:has-text('not a staff token')");
		await page.fill("#token", "wrong-token-0123456789");
		await page.click("#sign-in");
		await page.waitForSelector("#signin-error:has-text('Unknown token')");
		expect(await page.isHidden("#app")).toBe(true);
	});

	it("signs in with a staff token and shows the overview", async () => {
		await page.fill("#token", TOKENS.staff);
		await page.click("#sign-in");
		await page.waitForSelector("#app", { state: "visible" });
		await expect(page.textContent("#overview-members")).resolves.toBe("2");
		await expect(page.textContent("#overview-outstanding")).resolves.toBe("2,200");
		await expect(page.textContent("#overview-dead-letters")).resolves.toBe("0");
		// This month's merchants, both sides: 20 issued 1,000 points (at 1 a point) and was paid
		// 300 × 0.98 = 294 for the use that stands; 21 issued 500. Net: what the coalition pays.
		await page.waitForSelector("#settlement-preview tbody tr");
		expect(await merchantRows()).toEqual([
			["20", "1,000 (1,000 points)", "294 (300 points)", "-706"],
			["21", "500 (500 points)", "0 (0 points)", "-500"]
		]);
		expect(await page.getAttribute("#settlement-preview tbody tr td:last-child", "class")).toBe(
			"net-negative"
		);
	});

	it("finds a member and shows the scenario's numbers", async () => {
		await page.fill("#member-id", "0001");
		await page.click("#search");
		await page.waitForSelector("#member", { state: "visible" });
		const ids = ["balance", "earned", "used", "cancelled", "expired"];
		const figures = Object.fromEntries(
			await Promise.all(ids.map(async id => [id, await page.textContent(`#${id}`)]))
		);
		expect(figures).toEqual({
			balance: "2,200",
			earned: "2,500",
			used: "500",
			cancelled: "200",
			expired: "0"
		});
		expect(await page.textContent("#member-name")).toContain("Kim Minji");
		expect(await page.locator("#transactions tbody tr").count()).toBe(5);
		expect(await page.textContent("#transactions tbody tr:first-child")).toContain("order");
		expect(await page.textContent("#by-merchant tbody")).toContain("21");
	});

	it("shows a new deal live, without reloading", async () => {
		await page.waitForSelector("#live", { state: "visible" });
		const created = await api("POST", "/deals", {
			memberId: "0001",
			merchantId: "22",
			dealAmount: 70000,
			type: "save"
		});
		expect(created.status).toBe(201);
		await page.waitForSelector("#balance:text-is('2,900')", { timeout: 10_000 });
		await page.waitForSelector("#transactions tbody tr.fresh");
		expect(await page.locator("#transactions tbody tr").count()).toBe(6);
		expect(await page.textContent("#transactions tbody tr:first-child")).toContain("22");
	});

	it("shows a partial return live: the deal's row, the balance and the cancelled total", async () => {
		const [latest] = (await api("GET", "/deals?memberId=0001&merchantId=22")).body.rows;
		// 30000 of 70000 returned: floor(700 × 3/7) = 300 points revoked.
		expect((await api("POST", `/deals/${latest.id}/cancel`, { amount: 30000 })).body).toMatchObject(
			{
				status: "partially_cancelled",
				returnedPoints: 300
			}
		);
		await page.waitForSelector("#balance:text-is('2,600')", { timeout: 10_000 });
		await page.waitForSelector("#transactions tbody tr:first-child td.status-partially_cancelled");
		const cells = await page.locator("#transactions tbody tr:first-child td").allTextContents();
		expect(cells.slice(3)).toEqual([
			"22",
			"70,000",
			"700",
			"30,000 (300 points)",
			"partially cancelled",
			""
		]);
		expect(await page.textContent("#cancelled")).toBe("500");
		// Merchant 22 issued 700 − 300 = 400 points: its month follows the return.
		await eventually(async () =>
			expect(await merchantRows()).toContainEqual([
				"22",
				"400 (400 points)",
				"0 (0 points)",
				"-400"
			])
		);
	});

	it("shows a staff adjustment with its reason, and the points expiring soon per member and overall", async () => {
		const adjusted = await api("POST", "/points/0001/adjustments", {
			amount: 100,
			reason: "Goodwill: late delivery"
		});
		expect(adjusted.status).toBe(201);
		await page.waitForSelector("#adjusted:text-is('100')", { timeout: 10_000 });
		expect(await page.textContent("#balance")).toBe("2,700");
		expect(await page.textContent("#transactions tbody tr:first-child")).toContain(
			"Goodwill: late delivery (staff)"
		);
		// Everything was earned this month: none expires at its end, all 2,700 at the end of the next.
		const cells = async (table: string) =>
			(await page.locator(`${table} tbody tr`).allTextContents()).map(row => row.trim());
		await eventually(async () => expect((await cells("#member-expiring"))[1]).toMatch(/2,700$/));
		expect((await cells("#member-expiring"))[0]).toBe("2026050");
		await page.waitForSelector("#overview-expiring:text-is('2,700')", { timeout: 10_000 });
		expect(await cells("#expiring-members")).toHaveLength(1);
		expect((await cells("#expiring-members"))[0]).toContain("Kim Minji (0001)2,700");
		await page.screenshot({ path: SCREENSHOT, fullPage: true });
	});

	it("renders the API reference from the gateway's own assets, every operation in it", async () => {
		const contract = (await (await fetch(`${system.url}/api/openapi.json`)).json()) as {
			paths: Record<string, object>;
		};
		const operations = Object.values(contract.paths).reduce(
			(sum, ops) => sum + Object.keys(ops).length,
			0
		);
		const reference = await browser.newPage();
		const elsewhere: string[] = [];
		reference.on("request", request => {
			if (!request.url().startsWith(system.url)) elsewhere.push(request.url());
		});
		await reference.goto(`${system.url}/docs`);
		await reference.waitForSelector(".opblock");
		expect(await reference.locator(".opblock").count()).toBe(operations);
		expect(await reference.textContent("body")).toContain("A deal at a merchant");
		expect(elsewhere).toEqual([]);
		await reference.close();
	});
});
