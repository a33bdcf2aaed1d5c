import { expect, test } from "bun:test";
import { jsHeapBytesOf } from "./resource_worker.ts";

// Proves the heap figure of `hast list` stays meaningful in both cases Bun shows: external
// included in heapUsed (ordinary ArrayBuffers) and not (a fresh SharedArrayBuffer).
test("jsHeapBytes: heapUsed less external when it includes it, else heapUsed", () => {
  expect(jsHeapBytesOf({ heapUsed: 42_087_210, external: 41_958_186 })).toBe(129_024);
  expect(jsHeapBytesOf({ heapUsed: 546_816, external: 35_651_680 })).toBe(546_816);
  expect(jsHeapBytesOf({ heapUsed: 1_000, external: 1_000 })).toBe(1_000);
  // And on this process, with a fresh SharedArrayBuffer like the codec pipeline's slot pool:
  const slots = new SharedArrayBuffer(34 << 20);
  expect(jsHeapBytesOf(process.memoryUsage())).toBeGreaterThan(0);
  expect(slots.byteLength).toBe(34 << 20);
});
