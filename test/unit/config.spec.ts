import { loadConfig, parseApiKeys } from "../../config";

describe("configuration", () => {
	it("has defaults that run on an empty machine", () => {
		const config = loadConfig({});
		expect(config).toMatchObject({ port: 3000, earnRateBp: 100, settlementFeeBp: 200, rateLimit: 6000, apiKeys: [] });
		expect(config.mongoUri).toBeUndefined();
	});

	it("reads API_KEYS as tokens and roles", () => {
		expect(parseApiKeys("aaaaaaaaaaaaaaaa=staff, bbbbbbbbbbbbbbbb=merchant:20")).toEqual([
			{ token: "aaaaaaaaaaaaaaaa", role: { kind: "staff" } },
			{ token: "bbbbbbbbbbbbbbbb", role: { kind: "merchant", merchantId: "20" } }
		]);
	});

	it.each(["short=staff", "aaaaaaaaaaaaaaaa=admin", "aaaaaaaaaaaaaaaa=merchant:", "aaaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaa=merchant:a b"])("refuses API_KEYS entry %p", entry => {
		expect(() => parseApiKeys(entry)).toThrow(/API_KEYS entries must be/);
	});

	it("refuses a number that is not one", () => {
		expect(() => loadConfig({ PORT: "eighty" })).toThrow(/PORT must be a number/);
	});
});
