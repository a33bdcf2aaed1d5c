// Proves the buffer pool's contract: buffers are reused, the pool keeps at most `capacity`,
// payloads outside its size range are not pooled, and a buffer given back twice (or one the
// pool never handed out) fails loudly instead of being shared by two requests.
import { expect, test } from "bun:test";
import { BufferPool } from "./buffer_pool.ts";

test("a buffer given back is handed out again, as a view of the requested length", () => {
  const pool = new BufferPool(1024, 2, 64);
  const a = pool.take(1000)!;
  expect(a.byteLength).toBe(1000);
  expect(a.buffer.byteLength).toBe(1024);
  expect(pool.owns(a)).toBe(true);
  // Only the view take() returned is the pool's: a part of it cannot be given back for it.
  expect(pool.owns(a.subarray(0, 10))).toBe(false);
  expect(() => pool.give(a.subarray(0, 10))).toThrow(/given back twice or not from this pool/);
  pool.give(a);
  expect(pool.owns(a)).toBe(false);
  const b = pool.take(64)!;
  expect(b.buffer).toBe(a.buffer);
  expect(b.byteLength).toBe(64);
  expect(pool.stats()).toEqual({ free: 0, reused: 1, allocated: 1 });
});

test("sizes outside [minBytes, bufferBytes] are not pooled", () => {
  const pool = new BufferPool(1024, 2, 64);
  expect(pool.take(63)).toBeNull();
  expect(pool.take(1025)).toBeNull();
  expect(pool.stats()).toEqual({ free: 0, reused: 0, allocated: 0 });
});

test("an empty pool allocates; at most `capacity` buffers are kept", () => {
  const pool = new BufferPool(256, 2, 1);
  const taken = [pool.take(256)!, pool.take(256)!, pool.take(256)!];
  expect(new Set(taken.map((t) => t.buffer)).size).toBe(3);
  for (const t of taken) pool.give(t);
  expect(pool.stats()).toEqual({ free: 2, reused: 0, allocated: 3 });
});

test("giving a buffer back twice, or one not from the pool, fails", () => {
  const pool = new BufferPool(256, 4, 1);
  const a = pool.take(100)!;
  pool.give(a);
  expect(() => pool.give(a)).toThrow(/given back twice or not from this pool/);
  expect(() => pool.give(new Uint8Array(256))).toThrow(/given back twice or not from this pool/);
  expect(pool.stats().free).toBe(1);
});
