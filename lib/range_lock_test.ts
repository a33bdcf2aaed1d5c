/**
 * The range lock: overlapping ranges exclude each other and are granted in
 * arrival order; disjoint ranges proceed at once; releasing twice asserts.
 */
import { expect, test } from "bun:test";
import { RangeLock } from "./range_lock.ts";

test("overlapping waiters are granted in FIFO order, disjoint ones at once", async () => {
  const lock = new RangeLock();
  const order: string[] = [];
  const r1 = await lock.acquire(0, 100);
  const p2 = lock.acquire(50, 100).then((r) => (order.push("second"), r));
  const p3 = lock.acquire(120, 10).then((r) => (order.push("third-overlaps-second"), r));
  const r4 = await lock.acquire(1000, 10); // disjoint from everything: immediate
  order.push("disjoint");
  expect(lock.stats()).toEqual({ held: 2, waiting: 2 });
  r1();
  const r2 = await p2;
  await Promise.resolve();
  expect(order).toEqual(["disjoint", "second"]);
  r2();
  (await p3)();
  r4();
  expect(order).toEqual(["disjoint", "second", "third-overlaps-second"]);
  expect(lock.stats()).toEqual({ held: 0, waiting: 0 });
  expect(() => r1()).toThrow();
});
