// The test command (`npm test`): runs every test file in its own `bun test` process, with a
// hard time limit per file. A test that blocks its own event loop (for instance a synchronous
// file call on a FUSE mount served by the same process) cannot be stopped by bun's per-test
// timeout; here it is killed with its whole process group, reported, and the run goes on.
//
//   bun scripts/test.ts [substring…]     only files whose path contains one of the substrings
//
// Each file also writes a JUnit report, read afterwards: a file passes only if bun exited 0
// AND the report exists, counts at least one test and no skipped or todo test. So a skipped
// test, a file whose tests all vanished, or a test that ended the process early (no report)
// fails the run instead of counting as a pass.
//
// Environment: HAST_TEST_FILE_TIMEOUT_S (default 900) bounds each file.

import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
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
  /** From the JUnit report; null if there is none. */
  counts: Counts | null;
}

interface Counts {
  tests: number;
  failures: number;
  skipped: number;
}

const REPORT_DIR = fs.mkdtempSync(path.join(os.tmpdir(), "hast-test-reports-"));

/** The totals of bun's JUnit report (the <testsuites> element), or null if it is missing. */
function readCounts(reportPath: string): Counts | null {
  let xml: string;
  try {
    xml = fs.readFileSync(reportPath, "utf8");
  } catch {
    return null;
  }
  const head = /<testsuites\b[^>]*>/.exec(xml)?.[0];
  if (head === undefined) return null;
  const attribute = (name: string) => Number(new RegExp(`\\b${name}="(\\d+)"`).exec(head)?.[1] ?? NaN);
  const counts = { tests: attribute("tests"), failures: attribute("failures"), skipped: attribute("skipped") };
  return Object.values(counts).every(Number.isInteger) ? counts : null;
}

function verdictOf(o: Outcome): string {
  if (o.timedOut) return "TIMEOUT";
  if (o.code !== 0) return `FAIL (exit ${o.code})`;
  if (o.counts === null) return "FAIL (no report)";
  if (o.counts.tests === 0) return "FAIL (no tests)";
  if (o.counts.skipped > 0) return `FAIL (${o.counts.skipped} skipped)`;
  return "ok";
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
  const report = path.join(REPORT_DIR, `${file.replaceAll("/", "_")}.xml`);
  const args = ["test", "--timeout", String(PER_TEST_TIMEOUT_MS), "--reporter=junit",
    `--reporter-outfile=${report}`, `./${file}`];
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: ROOT, stdio: "inherit", detached: true });
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
      resolve({ file, code, timedOut, seconds: (Date.now() - started) / 1000, counts: readCounts(report) });
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
  try {
    for (const file of files) outcomes.push(await runFile(file));
  } finally {
    fs.rmSync(REPORT_DIR, { recursive: true, force: true });
  }
  const failed = outcomes.filter((o) => verdictOf(o) !== "ok");
  process.stdout.write("\ntest files:\n");
  for (const o of outcomes) {
    const tests = o.counts === null ? "" : `${o.counts.tests} tests`;
    process.stdout.write(`  ${verdictOf(o).padEnd(18)} ${o.seconds.toFixed(1).padStart(7)} s  ` +
      `${tests.padStart(9)}  ${o.file}\n`);
  }
  const total = outcomes.reduce((sum, o) => sum + o.seconds, 0);
  const sum = (key: keyof Counts) => outcomes.reduce((n, o) => n + (o.counts?.[key] ?? 0), 0);
  process.stdout.write(`${outcomes.length - failed.length} of ${outcomes.length} files passed` +
    ` in ${total.toFixed(0)} s; tests: ${sum("tests")}, failed ${sum("failures")}, skipped ${sum("skipped")}\n`);
  return failed.length === 0 ? 0 : 1;
}

process.exit(await main());
