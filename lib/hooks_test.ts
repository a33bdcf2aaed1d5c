import { afterAll, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execHooks, MAX_RUNNING_HOOKS, runningHooksOf } from "./hooks.ts";

const dir = mkdtempSync(join(tmpdir(), "hast-hooks-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A hook script that leaves a file named after its event in `dir`. */
function markerHook(): string {
  const path = join(dir, "mark.sh");
  writeFileSync(path, `#!/bin/sh\ntouch "${dir}/ran-$1"\n`);
  chmodSync(path, 0o755);
  return path;
}

async function until(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("Cannot wait: condition not met in time");
    await Bun.sleep(10);
  }
}

for (const [what, program] of [
  ["does not exist", join(dir, "missing-hook")],
  ["is not executable", join(dir, "noexec.sh")],
] as const) {
  test(`a hook that ${what} frees its running slot, so later hooks still run`, async () => {
    // 40 failed spawns, spread over time (more than MAX_RUNNING_HOOKS), each report an error and no false
    // "still running" warning; afterwards a valid hook runs and the count is back to 0.
    writeFileSync(join(dir, "noexec.sh"), "#!/bin/sh\nexit 0\n");
    chmodSync(join(dir, "noexec.sh"), 0o644);
    const logs: string[] = [];
    const log = (level: string, message: string) => logs.push(`${level}: ${message}`);
    const failing = execHooks(program, "r0", log, { warnMs: 50 });
    const fired = MAX_RUNNING_HOOKS + 8;
    for (let i = 0; i < fired; i++) {
      failing.run("connect", [String(i)]);
      // The spawn failure arrives asynchronously; wait for it, as separate events would.
      await until(() => failing.running() === 0);
    }
    await Bun.sleep(100);
    const failures = logs.filter((line) => line.startsWith("error:") && line.includes("could not start"));
    expect(failures.length).toBe(fired);
    expect(failures[0]).toContain(`"${program}"`);
    expect(failures[0]).toContain("connect r0 0");
    expect(logs.filter((line) => line.includes("still running"))).toEqual([]);

    const valid = execHooks(markerHook(), "r0", log, { warnMs: 50 });
    failing.run("syncstart", []);
    valid.run("disconnect", []);
    await until(() => existsSync(join(dir, "ran-disconnect")));
    await until(() => valid.running() === 0 && failing.running() === 0);
    expect(logs.filter((line) => line.includes("hooks still running"))).toEqual([]);
    rmSync(join(dir, "ran-disconnect"));
  });
}

test("a hook that outlives the warning time is reported once, and the count drops when it ends", async () => {
  // A real process sleeping past warnMs: one warning, then running() returns to 0 on exit.
  const path = join(dir, "slow.sh");
  writeFileSync(path, "#!/bin/sh\nsleep 0.3\n");
  chmodSync(path, 0o755);
  const logs: string[] = [];
  const hooks = execHooks(path, "r0", (level, message) => logs.push(`${level}: ${message}`), { warnMs: 50 });
  hooks.run("role", ["init", "primary"]);
  expect(hooks.running()).toBe(1);
  await until(() => hooks.running() === 0);
  expect(logs.filter((line) => line.includes("still running after 50 ms")).length).toBe(1);
});

test("a hook program given as a function is asked at each event (a reloaded exec applies)", async () => {
  const first = markerHook();
  const second = join(dir, "second.sh");
  writeFileSync(second, `#!/bin/sh\ntouch "${dir}/second-$1"\n`);
  chmodSync(second, 0o755);
  let program: string | null = first;
  const hooks = execHooks(() => program, "r0", () => {});
  hooks.run("connect", []);
  await until(() => hooks.running() === 0 && existsSync(join(dir, "ran-connect")));
  program = second;
  hooks.run("disconnect", []);
  await until(() => hooks.running() === 0 && existsSync(join(dir, "second-disconnect")));
  expect(existsSync(join(dir, "ran-disconnect"))).toBe(false);
  program = null;
  hooks.run("syncstart", []);
  expect(hooks.running()).toBe(0);
});

test("role hooks, each from a fresh runner as the daemon makes them, count against the resource's cap", async () => {
  // The daemon calls execHooks() anew for every role change. MAX_RUNNING_HOOKS + 1 such runners
  // start a hook that waits for a file to go: the last is refused and logged, while another
  // resource's hook still runs; once the hooks end, the count is back to 0.
  const hold = join(dir, "hold");
  writeFileSync(hold, "");
  const path = join(dir, "held.sh");
  writeFileSync(path, `#!/bin/sh\nwhile [ -e "${hold}" ]; do sleep 0.05; done\n`);
  chmodSync(path, 0o755);
  const logs: string[] = [];
  const log = (level: string, message: string) => logs.push(`${level}: ${message}`);
  const runners = [];
  try {
    for (let i = 0; i <= MAX_RUNNING_HOOKS; i++) {
      const runner = execHooks(path, "capped", log);
      runner.run("role", ["init", i % 2 === 0 ? "primary" : "secondary"]);
      runners.push(runner);
    }
    expect(runningHooksOf("capped")).toBe(MAX_RUNNING_HOOKS);
    expect(runners.reduce((sum, r) => sum + r.running(), 0)).toBe(MAX_RUNNING_HOOKS);
    expect(runners.at(-1)!.running()).toBe(0);
    const refused = logs.filter((line) => line.includes("not run for role"));
    expect(refused).toEqual([`error: hook "${path}" not run for role: ${MAX_RUNNING_HOOKS} hooks still running ` +
      `for "capped"`]);
    const other = execHooks(markerHook(), "other", log);
    other.run("role", ["init", "primary"]);
    await until(() => existsSync(join(dir, "ran-role")));
  } finally {
    rmSync(hold, { force: true });
  }
  await until(() => runningHooksOf("capped") === 0 && runningHooksOf("other") === 0, 10_000);
  expect(runners.every((r) => r.running() === 0)).toBe(true);
});
