// RepeatLimiter: a message that repeats is logged once per interval, with the count held back.
import { expect, test } from "bun:test";
import { REPEAT_LIMITER_MAX_KEYS, RepeatLimiter } from "./log.ts";

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

test("the limiter forgets everything rather than grow past its bound", () => {
  let now = 0;
  const limiter = new RepeatLimiter(60_000, () => now);
  for (let i = 0; i < REPEAT_LIMITER_MAX_KEYS; i++) expect(limiter.pass(`k${i}`, "m")).toBe("m");
  expect(limiter.pass("k0", "m")).toBeNull();
  expect(limiter.pass("one more", "m")).toBe("m"); // the table was full: cleared
  expect(limiter.pass("k0", "m")).toBe("m");
});
