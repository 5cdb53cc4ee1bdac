// Each test file gets its own empty data folder and quiet logs, before any config is read.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

process.env.DATA_DIR = fs.mkdtempSync(path.join(os.tmpdir(), "onepoint-test-"));
process.env.LOG_LEVEL ??= "error";
process.env.METRICS_PORT ??= "0";
