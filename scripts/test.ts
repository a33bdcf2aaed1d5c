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
// Test files are found at any depth (not only directly in lib/, test/, workers/), outside
// node_modules, dist and dot-directories: a *_test.ts in a new subdirectory runs too.
//
// After a file, whatever it left behind fails it, and is removed: a process still carrying the
// file's HAST_TEST_RUN_ID (every descendant inherits it, also one that left the process group by
// setsid or by daemonizing), a network namespace named after its bun process (the harness names
// them hast<pid><n>), and a mount or loop device that appeared while it ran and is still there.
// (Mounts and loop devices are matched by appearing during the file; a run next to other
// test runs on the same machine may therefore blame a file for another run's leftover.)
//
// Environment: HAST_TEST_FILE_TIMEOUT_S (default 900) bounds each file; HAST_TEST_ROOT (default
// this repository) is where test files are looked for (the runner's own tests use it).

import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

const ROOT = path.resolve(process.env.HAST_TEST_ROOT ?? path.join(import.meta.dir, ".."));
const FILE_TIMEOUT_S = Number(process.env.HAST_TEST_FILE_TIMEOUT_S ?? 900);
const PER_TEST_TIMEOUT_MS = 600_000;
const KILL_GRACE_MS = 5_000;
/** How long processes of a finished file get to exit (one that was just sent SIGTERM) before they count as left. */
const LEFTOVER_GRACE_MS = 5_000;
const SKIPPED_DIRS = new Set(["node_modules", "dist"]);

interface Outcome {
  file: string;
  code: number | null;
  timedOut: boolean;
  seconds: number;
  /** From the JUnit report; null if there is none. */
  counts: Counts | null;
  /** What the file left behind (and the runner then removed). */
  leftovers: string[];
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
  if (o.counts.failures > 0) return `FAIL (${o.counts.failures} failed)`;
  if (o.counts.skipped > 0) return `FAIL (${o.counts.skipped} skipped)`;
  if (o.leftovers.length > 0) return `FAIL (${o.leftovers.length} left behind)`;
  return "ok";
}

/** Paths (relative to ROOT) of all *_test.ts files under `dir`, at any depth, sorted. */
function findTests(dir: string): string[] {
  const found: string[] = [];
  for (const entry of fs.readdirSync(path.join(ROOT, dir), { withFileTypes: true })) {
    const relative = dir === "" ? entry.name : `${dir}/${entry.name}`;
    if (entry.isDirectory() && !entry.name.startsWith(".") && !SKIPPED_DIRS.has(entry.name)) {
      found.push(...findTests(relative));
    } else if (entry.isFile() && /_test\.ts$/.test(entry.name)) {
      found.push(relative);
    }
  }
  return found.sort();
}

function testFiles(filters: string[]): string[] {
  const found = findTests("");
  return filters.length === 0 ? found : found.filter((f) => filters.some((s) => f.includes(s)));
}

/** Mounts (/proc/self/mountinfo lines without their ids) and attached loop devices with backing files. */
function mountsAndLoops(): Set<string> {
  const seen = new Set<string>();
  for (const line of fs.readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
    const fields = line.split(" ");
    if (fields.length > 5) seen.add(`mount ${fields[4]} (${line.slice(line.indexOf(" - ") + 3)})`);
  }
  for (const name of fs.existsSync("/sys/block") ? fs.readdirSync("/sys/block") : []) {
    try {
      const backing = fs.readFileSync(`/sys/block/${name}/loop/backing_file`, "utf8").trim();
      seen.add(`loop device /dev/${name} on ${backing}`);
    } catch {
      // not a loop device, or not attached
    }
  }
  return seen;
}

/** Live (not zombie) processes whose environment holds `marker`, as "pid (command)". */
function processesMarked(marker: string): Map<number, string> {
  const found = new Map<number, string>();
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
      if (stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")) continue;
      if (!fs.readFileSync(`/proc/${entry}/environ`, "utf8").split("\0").includes(marker)) continue;
      found.set(Number(entry), fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").replaceAll("\0", " ").trim());
    } catch {
      // the process ended meanwhile
    }
  }
  return found;
}

/**
 * Lists and removes what a finished file left: processes carrying `marker` (given a grace
 * period to exit first), namespaces `hast<bunPid>…`, and mounts and loop devices not in `before`.
 */
async function collectLeftovers(marker: string, bunPid: number, before: Set<string>): Promise<string[]> {
  const left: string[] = [];
  let marked = processesMarked(marker);
  for (const deadline = Date.now() + LEFTOVER_GRACE_MS; marked.size > 0 && Date.now() < deadline;) {
    await Bun.sleep(100);
    marked = processesMarked(marker);
  }
  for (const [pid, command] of marked) {
    left.push(`process ${pid} (${command})`);
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // it ended meanwhile
    }
  }
  const netnsDir = "/run/netns";
  for (const ns of fs.existsSync(netnsDir) ? fs.readdirSync(netnsDir) : []) {
    if (!ns.startsWith(`hast${bunPid}`)) continue;
    left.push(`network namespace ${ns}`);
    spawnSync("ip", ["netns", "del", ns]);
  }
  // Mounts and loop devices are listed, not removed: unmounting by guess could hit someone else's.
  for (const item of mountsAndLoops()) if (!before.has(item)) left.push(item);
  return left;
}

/** The running file's process group, killed if the runner itself is interrupted. */
let runningGroup: number | undefined;

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // the group is already gone
  }
}

async function runFile(file: string): Promise<Outcome> {
  const started = Date.now();
  const report = path.join(REPORT_DIR, `${file.replaceAll("/", "_")}.xml`);
  const args = ["test", "--timeout", String(PER_TEST_TIMEOUT_MS), "--reporter=junit",
    `--reporter-outfile=${report}`, `./${file}`];
  const marker = `HAST_TEST_RUN_ID=${process.pid}-${started}-${file}`;
  const env = { ...process.env, HAST_TEST_RUN_ID: marker.slice(marker.indexOf("=") + 1) };
  const before = mountsAndLoops();
  const { code, timedOut, pid } = await new Promise<{ code: number | null; timedOut: boolean; pid: number }>(
    (resolve) => {
      const child = spawn(process.execPath, args, { cwd: ROOT, stdio: "inherit", detached: true, env });
      runningGroup = child.pid;
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        process.stderr.write(`\n${file}: still running after ${FILE_TIMEOUT_S} s; killing it\n`);
        killGroup(child.pid!, "SIGTERM");
        setTimeout(() => killGroup(child.pid!, "SIGKILL"), KILL_GRACE_MS).unref();
      }, FILE_TIMEOUT_S * 1000);
      child.on("error", (error) => {
        clearTimeout(timer);
        process.stderr.write(`\n${file}: cannot run bun: ${error.message}\n`);
        resolve({ code: null, timedOut, pid: child.pid ?? 0 });
      });
      child.on("exit", (code) => {
        clearTimeout(timer);
        resolve({ code, timedOut, pid: child.pid! });
      });
    },
  );
  runningGroup = undefined;
  const leftovers = pid === 0 ? [] : await collectLeftovers(marker, pid, before);
  // Whatever the file left behind in its process group goes with it.
  if (pid !== 0) killGroup(pid, "SIGKILL");
  if (leftovers.length > 0) {
    process.stderr.write(`\n${file} left behind:\n${leftovers.map((l) => `  ${l}\n`).join("")}`);
  }
  return { file, code, timedOut, seconds: (Date.now() - started) / 1000, counts: readCounts(report), leftovers };
}

for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(signal, () => {
    if (runningGroup !== undefined) killGroup(runningGroup, "SIGKILL");
    fs.rmSync(REPORT_DIR, { recursive: true, force: true });
    process.exit(130);
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
    process.stdout.write(`  ${verdictOf(o).padEnd(22)} ${o.seconds.toFixed(1).padStart(7)} s  ` +
      `${tests.padStart(9)}  ${o.file}\n`);
  }
  const total = outcomes.reduce((sum, o) => sum + o.seconds, 0);
  const sum = (key: keyof Counts) => outcomes.reduce((n, o) => n + (o.counts?.[key] ?? 0), 0);
  process.stdout.write(`${outcomes.length - failed.length} of ${outcomes.length} files passed` +
    ` in ${total.toFixed(0)} s; tests: ${sum("tests")}, failed ${sum("failures")}, skipped ${sum("skipped")}\n`);
  return failed.length === 0 ? 0 : 1;
}

process.exit(await main());
