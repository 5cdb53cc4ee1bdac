/**
 * The README and docs/ link to each other and into the code: every relative link must name a file
 * that exists, and the README stays a front door (at most 200 lines, none over 120 characters).
 */
import fs from "node:fs";
import path from "node:path";

const ROOT = path.resolve(__dirname, "../..");
const pages = [
	"README.md",
	...fs
		.readdirSync(path.join(ROOT, "docs"))
		.filter(f => f.endsWith(".md"))
		.map(f => `docs/${f}`)
];

describe("the docs", () => {
	it.each(pages)("%s: every relative link names a file that exists", page => {
		const text = fs.readFileSync(path.join(ROOT, page), "utf8");
		const targets = [...text.matchAll(/\]\(([^)\s#]+)(?:#[^)]*)?\)/g)]
			.map(m => m[1])
			.filter(t => !/^[a-z]+:/.test(t));
		const broken = targets.filter(t => !fs.existsSync(path.join(ROOT, path.dirname(page), t)));
		expect(broken).toEqual([]);
	});

	it("keeps the README a front door: at most 200 lines, none over 120 characters", () => {
		const lines = fs.readFileSync(path.join(ROOT, "README.md"), "utf8").split("\n");
		expect(lines.length).toBeLessThanOrEqual(200);
		expect(lines.filter(line => line.length > 120)).toEqual([]);
	});
});
