/**
 * The LZ4 block codec round-trips every kind of data, produces and reads the
 * same format as the reference implementation (lz4-napi, the C library's
 * block format with a 4-byte size prefix), gives up when the output would not
 * fit, and rejects malformed input at every truncation point without writing
 * outside its output buffer.
 */
import { expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { compressSync, uncompressSync } from "lz4-napi";
import { compressBlock, decompressBlock } from "./lz4.ts";

const MIB = 1024 * 1024;

function inputs(): [string, Uint8Array][] {
  const text = Buffer.alloc(MIB, "hast replicates every write to the secondary; ");
  const mixed = Buffer.concat([randomBytes(300_000), Buffer.alloc(200_000), text.subarray(0, 300_000)]);
  const far = Buffer.concat([randomBytes(70_000), randomBytes(1000)]);
  far.set(far.subarray(0, 1000), 70_000); // a repeat 70,000 bytes back: beyond the 64 KiB window
  const cases: [string, Uint8Array][] = [
    ["text 1 MiB", text], ["random 1 MiB", randomBytes(MIB)], ["zeros 1 MiB", Buffer.alloc(MIB)],
    ["mixed", mixed], ["far repeat", far], ["one byte repeated", Buffer.alloc(5000, 7)],
    ["two-byte pattern", Buffer.alloc(4099, "ab")], ["runs of 300 literals", runs()],
  ];
  for (let n = 0; n <= 40; n++) cases.push([`${n} random bytes`, randomBytes(n)]);
  for (let n = 0; n <= 40; n++) cases.push([`${n} zero bytes`, Buffer.alloc(n)]);
  return cases;
}

function runs(): Uint8Array {
  const parts: Buffer[] = [];
  for (let i = 0; i < 50; i++) parts.push(randomBytes(300), Buffer.alloc(20 + i * 13, i));
  return Buffer.concat(parts);
}

function compress(data: Uint8Array): Uint8Array {
  const dst = new Uint8Array(data.byteLength + Math.ceil(data.byteLength / 255) + 16);
  const n = compressBlock(data, dst);
  expect(n).toBeGreaterThan(0);
  return dst.subarray(0, n);
}

test("every input round-trips, and compressible data shrinks", () => {
  for (const [what, data] of inputs()) {
    const packed = compress(data);
    const out = new Uint8Array(data.byteLength);
    expect(decompressBlock(packed, out), what).toBe(data.byteLength);
    expect(Buffer.compare(out, data), what).toBe(0);
  }
  expect(compress(Buffer.alloc(MIB, "hast ")).byteLength).toBeLessThan(MIB / 100);
});

test("the format is the reference implementation's, both ways", () => {
  for (const [what, data] of inputs()) {
    if (data.byteLength === 0) continue;
    const prefix = Buffer.alloc(4);
    prefix.writeUInt32LE(data.byteLength);
    const ours = Buffer.concat([prefix, compress(data)]);
    expect(Buffer.compare(uncompressSync(ours), data), what).toBe(0);
    const theirs = compressSync(Buffer.from(data));
    const out = new Uint8Array(data.byteLength);
    expect(decompressBlock(theirs.subarray(4), out), what).toBe(data.byteLength);
    expect(Buffer.compare(out, data), what).toBe(0);
  }
});

test("compression gives up when the output would not fit", () => {
  const random = randomBytes(MIB);
  expect(compressBlock(random, new Uint8Array(MIB - 1024))).toBe(-1);
  expect(compressBlock(Buffer.alloc(MIB, "x"), new Uint8Array(16))).toBe(-1);
  expect(compressBlock(randomBytes(10), new Uint8Array(10))).toBe(-1);
});

test("malformed input is rejected at every truncation point, never overflowing", () => {
  const data = Buffer.concat([Buffer.alloc(3000, "hast "), randomBytes(500), Buffer.alloc(600, 1)]);
  const packed = compress(data);
  const canary = 0xa5;
  for (let cut = 0; cut < packed.byteLength; cut++) {
    const backing = new Uint8Array(data.byteLength + 64).fill(canary);
    const out = backing.subarray(0, data.byteLength);
    let result: number | Error;
    try {
      result = decompressBlock(packed.subarray(0, cut), out);
    } catch (error) {
      result = error as Error;
    }
    if (typeof result === "number") expect(result, `cut ${cut}`).toBeLessThan(data.byteLength);
    else expect(result.message, `cut ${cut}`).toMatch(/^Cannot decompress lz4: /);
    expect(backing.subarray(data.byteLength).every((b) => b === canary), `cut ${cut}`).toBe(true);
  }
  // An offset reaching before the start, and output longer than the buffer.
  expect(() => decompressBlock(Uint8Array.from([0x10, 0x41, 0x05, 0x00, 0x00]), new Uint8Array(64)))
    .toThrow("offset 5");
  expect(() => decompressBlock(compress(Buffer.alloc(100, 3)), new Uint8Array(99))).toThrow("exceeds 99");
});
