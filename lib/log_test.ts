// The log: one line per event with time, pid, component and level; a peer's text cannot start a
// line; a log that cannot be written loses lines (counted) but never ends the process. And
// RepeatLimiter: a message that repeats is logged once per interval, with the count held back.
import { expect, test } from "bun:test";
import { closeSync, openSync } from "node:fs";
import { join } from "node:path";
import {
  LogOutput, makeLogger, oneLine, REPEAT_LIMITER_MAX_KEYS, RepeatLimiter, repeatKind,
} from "./log.ts";

test("a repeating message goes through once per interval, then with the number held back", () => {
  let now = 0;
  const limiter = new RepeatLimiter(60_000, () => now);
  expect(limiter.pass("peer A: init", "refused A")).toBe("refused A");
  now = 500;
  expect(limiter.pass("peer A: init", "refused A")).toBeNull();
  now = 1000;
  expect(limiter.pass("peer A: init", "refused A")).toBeNull();
  // Another key is another message.
  expect(limiter.pass("peer B: init", "refused B")).toBe("refused B");
  now = 60_000;
  expect(limiter.pass("peer A: init", "refused A")).toBe("refused A (and 2 times more in the 60 s before)");
  now = 130_000;
  expect(limiter.pass("peer A: init", "refused A")).toBe("refused A");
});

test("a full limiter limits new keys together, and forgets the keys whose interval has passed", () => {
  // Before, a full table was cleared: a flood of more keys than it holds (from many addresses)
  // got every message through again, one line each.
  let now = 0;
  const limiter = new RepeatLimiter(60_000, () => now);
  for (let i = 0; i < REPEAT_LIMITER_MAX_KEYS; i++) expect(limiter.pass(`k${i}`, "m")).toBe("m");
  expect(limiter.pass("k0", "m")).toBeNull();
  const together = "m (too many kinds of message to limit each: these are limited together)";
  expect(limiter.pass("one more", "m")).toBe(together);
  let passed = 0;
  for (let i = 0; i < 5000; i++) if (limiter.pass(`new ${i}`, "m") !== null) passed++;
  expect(passed).toBe(0);
  expect(limiter.pass("k0", "m")).toBeNull(); // still remembered
  // Half the keys come again after their interval; when a new key comes, the other half, whose
  // interval has passed too, are forgotten.
  now = 60_000;
  expect(limiter.pass("k0", "m")).toBe("m (and 2 times more in the 60 s before)");
  for (let i = 1; i < REPEAT_LIMITER_MAX_KEYS / 2; i++) expect(limiter.pass(`k${i}`, "m")).toBe("m");
  now = 90_000;
  expect(limiter.pass("a new key", "new")).toBe("new");
  expect(limiter.pass(`k${REPEAT_LIMITER_MAX_KEYS - 1}`, "m")).toBe("m"); // forgotten: through again
  expect(limiter.pass(`k${REPEAT_LIMITER_MAX_KEYS / 2 - 1}`, "m")).toBeNull(); // passed at 60 s
});

test("the kind of a message leaves out what the peer quoted and the numbers", () => {
  expect(repeatKind(`Cannot parse Hello: "resuid" is "12\\"x"`)).toBe("Cannot parse Hello: … is …");
  expect(repeatKind("unknown client flags 0x47455420")).toBe("unknown client flags #");
  expect(repeatKind("unknown export 'a'b'c'")).toBe("unknown export …");
  expect(repeatKind("x".repeat(1000)).length).toBe(200);
});

function capture(): { lines: string[]; output: LogOutput; fail: { error: Error | null } } {
  const lines: string[] = [];
  const fail: { error: Error | null } = { error: null };
  const output = new LogOutput((text) => {
    if (fail.error !== null) throw fail.error;
    lines.push(...text.split(/(?<=\n)/));
  });
  return { lines, output, fail };
}

test("a line has the time, pid, component and level; debug lines only with -d", () => {
  const { lines, output } = capture();
  const now = () => new Date("2030-01-02T03:04:05.678Z");
  makeLogger("data/primary", 0, { output, now })("info", "serving");
  makeLogger("daemon", 0, { output, now })("debug", "hidden");
  makeLogger("daemon", 1, { output, now })("debug", "shown");
  expect(lines).toEqual([
    `2030-01-02T03:04:05.678Z hast[${process.pid}] data/primary: info: serving\n`,
    `2030-01-02T03:04:05.678Z hast[${process.pid}] daemon: debug: shown\n`,
  ]);
});

test("a peer's text with line breaks or escape sequences stays on its line", () => {
  // Before, a name with a newline in any message started a line of its own, as if we wrote it.
  const { lines, output } = capture();
  const forged = "2030-01-02T03:04:05.678Z hast[1] daemon: error: forged";
  makeLogger("nbd", 0, { output })("warn", `unknown export 'x\n${forged}\r\u001b[2K\u2028'`);
  expect(lines.length).toBe(1);
  expect(lines[0]).toEndWith(`unknown export 'x\\n${forged}\\r\\u001b[2K\\u2028'\n`);
  expect(oneLine("a\tb\\n")).toBe("a\tb\\n");
});

test("lines that cannot be written are counted and reported once the log takes lines again", () => {
  const { lines, output, fail } = capture();
  const log = makeLogger("daemon", 0, { output });
  log("info", "one");
  fail.error = Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
  log("info", "two");
  log("warn", "three");
  expect(output.lostLines).toBe(2);
  fail.error = null;
  log("info", "four");
  expect(lines.map((line) => line.replace(/^\S+ hast\[\d+\] /, ""))).toEqual([
    "daemon: info: one\n",
    "log: error: 2 log lines could not be written and are lost: ENOSPC: no space left on device, write\n",
    "daemon: info: four\n",
  ]);
  expect(output.lostLines).toBe(0);
});

test("a process whose log is on a full disk goes on running", async () => {
  // Before the fix, process.stderr emitted an 'error' event that nothing handled: the daemon
  // (and each worker) exited with code 1 at the first line written to a full disk.
  const script = [
    `import { makeLogger } from ${JSON.stringify(join(import.meta.dir, "log.ts"))};`,
    `const log = makeLogger("daemon", 0);`,
    `for (let i = 0; i < 3; i++) log("warn", "line " + i);`,
    `setTimeout(() => { log("info", "again"); process.stdout.write("still running\\n"); }, 20);`,
  ].join("\n");
  const full = openSync("/dev/full", "w");
  try {
    const child = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: full });
    expect(await new Response(child.stdout).text()).toBe("still running\n");
    expect(await child.exited).toBe(0);
  } finally {
    closeSync(full);
  }
});
