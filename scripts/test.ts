// The test command (`npm test`): runs every test file in its own `bun test` process, with a
// hard time limit per file. A test that blocks its own event loop (for instance a synchronous
// file call on a FUSE mount served by the same process) cannot be stopped by bun's per-test
// timeout; here it is killed with its whole process group, reported, and the run goes on.
//
//   bun scripts/test.ts [substring…]     only files whose path contains one of the substrings
//
// Environment: HAST_TEST_FILE_TIMEOUT_S (default 900) bounds each file.

import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";

const ROOT = path.resolve(import.meta.dir, "..");
const FILE_TIMEOUT_S = Number(process.env.HAST_TEST_FILE_TIMEOUT_S ?? 900);
const PER_TEST_TIMEOUT_MS = 600_000;
const KILL_GRACE_MS = 5_000;

interface Outcome {
  file: string;
  code: number | null;
  timedOut: boolean;
  seconds: number;
}

function testFiles(filters: string[]): string[] {
  const found: string[] = [];
  for (const dir of ["lib", "test", "workers"]) {
    const full = path.join(ROOT, dir);
    if (!fs.existsSync(full)) continue;
    for (const name of fs.readdirSync(full).sort()) {
      if (/_test\.ts$/.test(name)) found.push(`${dir}/${name}`);
    }
  }
  return filters.length === 0 ? found : found.filter((f) => filters.some((s) => f.includes(s)));
}

function runFile(file: string): Promise<Outcome> {
  const started = Date.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["test", "--timeout", String(PER_TEST_TIMEOUT_MS), `./${file}`],
      { cwd: ROOT, stdio: "inherit", detached: true });
    let timedOut = false;
    const killGroup = (signal: NodeJS.Signals) => {
      try {
        process.kill(-child.pid!, signal);
      } catch {
        // the group is already gone
      }
    };
    const timer = setTimeout(() => {
      timedOut = true;
      process.stderr.write(`\n${file}: still running after ${FILE_TIMEOUT_S} s; killing it\n`);
      killGroup("SIGTERM");
      setTimeout(() => killGroup("SIGKILL"), KILL_GRACE_MS).unref();
    }, FILE_TIMEOUT_S * 1000);
    child.on("exit", (code) => {
      clearTimeout(timer);
      // Whatever the file left behind in its process group goes with it.
      killGroup("SIGKILL");
      resolve({ file, code, timedOut, seconds: (Date.now() - started) / 1000 });
    });
  });
}

async function main(): Promise<number> {
  const files = testFiles(process.argv.slice(2));
  if (files.length === 0) {
    process.stderr.write(`test: no test file matches ${JSON.stringify(process.argv.slice(2))}\n`);
    return 64;
  }
  const outcomes: Outcome[] = [];
  for (const file of files) outcomes.push(await runFile(file));
  const failed = outcomes.filter((o) => o.code !== 0);
  process.stdout.write("\ntest files:\n");
  for (const o of outcomes) {
    const verdict = o.timedOut ? "TIMEOUT" : o.code === 0 ? "ok" : `FAIL (exit ${o.code})`;
    process.stdout.write(`  ${verdict.padEnd(14)} ${o.seconds.toFixed(1).padStart(7)} s  ${o.file}\n`);
  }
  const total = outcomes.reduce((sum, o) => sum + o.seconds, 0);
  process.stdout.write(`${outcomes.length - failed.length} of ${outcomes.length} files passed` +
    ` in ${total.toFixed(0)} s\n`);
  return failed.length === 0 ? 0 : 1;
}

process.exit(await main());
