/**
 * The README's quick-start demo (scripts/demo), run as a user runs it: it ends with "demo OK"
 * and leaves nothing behind, neither a process of its daemons and their workers nor its temp
 * dir. (It once left both daemons running: it started them through a shell function, so the
 * pids it killed at the end were those of subshells.)
 */
import { expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { run } from "./harness.ts";

const DEMO = join(import.meta.dir, "..", "scripts", "demo");

/** Pids of the processes whose command line contains `text`, and of all their descendants. */
function processesOf(text: string): number[] {
  const parent = new Map<number, number>();
  const matching: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      parent.set(Number(entry), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]));
      if (readFileSync(`/proc/${entry}/cmdline`, "utf8").includes(text)) matching.push(Number(entry));
    } catch {
      // the process ended meanwhile
    }
  }
  const found = new Set(matching);
  for (let grew = true; grew;) {
    grew = false;
    for (const [pid, ppid] of parent) {
      if (found.has(ppid) && !found.has(pid)) {
        found.add(pid);
        grew = true;
      }
    }
  }
  return [...found];
}

test("the quick-start demo succeeds and leaves no daemon, worker or temp dir behind", async () => {
  // On a timeout run() kills the demo's process group, which its daemons and workers are in.
  // From source: a dist/hast from an earlier build may be older than the code under test.
  const env = { HAST_DEMO_FROM_SOURCE: "1" };
  const result = await run(["bash", DEMO], { allowFailure: true, timeoutMs: 120_000, env });
  const work = result.stdout.match(/\/tmp\/hast-demo\.\w+/)?.[0];
  const leftover = work ? processesOf(work) : [];
  for (const pid of leftover) process.kill(pid, "SIGKILL"); // the demo's own daemons and workers
  expect(result.code, `stdout: ${result.stdout}\nstderr: ${result.stderr}`).toBe(0);
  expect(result.stdout).toContain("demo OK");
  expect(work).toBeDefined();
  expect(leftover).toEqual([]);
  expect(existsSync(work!)).toBe(false);
}, 150_000);
