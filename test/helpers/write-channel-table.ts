/** Writes docs/channels.md from the code (`npm run docs:channels`); test/unit/channels-doc.spec.ts checks it. */
import fs from "node:fs";
import path from "node:path";
import { channelDoc, ROOT } from "./channel-table";

const file = path.join(ROOT, "docs/channels.md");
fs.mkdirSync(path.dirname(file), { recursive: true });
fs.writeFileSync(file, channelDoc());
console.log(`Wrote ${path.relative(process.cwd(), file) || file}`);
