/**
 * The data stage table (spec §7): every compression/checksum combination
 * round-trips; holes travel as length only; lz4 is used only when it saves at
 * least 1 KiB; a flipped bit anywhere in a checksummed payload is caught.
 */
import { expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { decodePayload, encodePayload, isAllZero } from "./payload_codec.ts";
import { FrameFlag, ProtocolError } from "./wire.ts";

const kinds = {
  compression: ["none", "hole", "lz4"] as const,
  checksum: ["none", "crc32", "sha256"] as const,
};
const samples = {
  zeros: new Uint8Array(65536),
  random: new Uint8Array(randomBytes(65536)),
  text: new Uint8Array(Buffer.alloc(65536, "hast replicates blocks ")),
  small: new Uint8Array(Buffer.alloc(1000, "x")),
};

test("all combinations round-trip", () => {
  for (const compression of kinds.compression) {
    for (const checksum of kinds.checksum) {
      for (const data of Object.values(samples)) {
        const { flags, pieces } = encodePayload(data, { compression, checksum });
        const wire = new Uint8Array(Buffer.concat(pieces));
        const back = decodePayload(flags, wire, data.byteLength, checksum);
        expect(Buffer.compare(back, data)).toBe(0);
      }
    }
  }
});

test("holes and lz4 thresholds", () => {
  expect(encodePayload(samples.zeros, { compression: "hole", checksum: "none" }))
    .toEqual({ flags: FrameFlag.Hole, pieces: [] });
  expect(encodePayload(samples.text, { compression: "lz4", checksum: "none" }).flags).toBe(FrameFlag.Lz4);
  expect(encodePayload(samples.random, { compression: "lz4", checksum: "none" }).flags).toBe(0);
  expect(encodePayload(samples.small, { compression: "lz4", checksum: "none" }).flags).toBe(0);
  expect(isAllZero(samples.zeros)).toBe(true);
  expect(isAllZero(samples.text)).toBe(false);
});

test("a flipped bit is caught by crc32 and sha256", () => {
  for (const checksum of ["crc32", "sha256"] as const) {
    for (const data of [samples.random, samples.text]) {
      const { flags, pieces } = encodePayload(data, { compression: "lz4", checksum });
      const wire = new Uint8Array(Buffer.concat(pieces));
      for (const at of [0, wire.byteLength >> 1, wire.byteLength - 1]) {
        const bad = wire.slice();
        bad[at]! ^= 0x10;
        expect(() => decodePayload(flags, bad, data.byteLength, checksum)).toThrow(/mismatch/);
      }
    }
  }
});

test("a checksum other than the agreed one is refused", () => {
  const { flags, pieces } = encodePayload(samples.text, { compression: "none", checksum: "crc32" });
  expect(() => decodePayload(flags, new Uint8Array(Buffer.concat(pieces)), 65536, "sha256")).toThrow(/agreed/);
});

// Large payloads that barely compress (3% saved, like fio's buffers) travel uncompressed: the
// 64 KiB sample does not shrink by 1/8. A payload whose start compresses well is compressed.
test("large, barely compressible payloads skip lz4; compressible ones use it", () => {
  const barely = new Uint8Array(randomBytes(1024 * 1024));
  for (let at = 512; at + 16 <= barely.byteLength; at += 512) barely.copyWithin(at, at - 512, at - 496);
  const options = { compression: "lz4", checksum: "none" } as const;
  expect(encodePayload(barely, options).flags & FrameFlag.Lz4).toBe(0);
  const text = new Uint8Array(Buffer.alloc(1024 * 1024, "hast "));
  const packed = encodePayload(text, options);
  expect(packed.flags & FrameFlag.Lz4).toBe(FrameFlag.Lz4);
  const body = new Uint8Array(Buffer.concat(packed.pieces));
  expect(Buffer.compare(decodePayload(packed.flags, body, text.byteLength, "none"), text)).toBe(0);
});

// The codec threads pass their slot's output region: compressed and expanded bytes land at its
// start, byte-identical to the default path; bytes sent as is stay views of the input.
test("encoding and decoding into a given buffer", () => {
  for (const compression of kinds.compression) {
    for (const checksum of kinds.checksum) {
      for (const data of Object.values(samples)) {
        const codec = { compression, checksum };
        const into = new Uint8Array(70000).fill(0xee);
        const fresh = encodePayload(data, codec);
        const given = encodePayload(data, codec, into);
        expect(given.flags).toBe(fresh.flags);
        expect(Buffer.compare(Buffer.concat(given.pieces), Buffer.concat(fresh.pieces))).toBe(0);
        const body = given.pieces[0];
        if (given.flags & FrameFlag.Lz4) expect(body!.buffer).toBe(into.buffer);
        if (!(given.flags & (FrameFlag.Lz4 | FrameFlag.Hole)) && body) expect(body).toBe(data);

        const wire = new Uint8Array(Buffer.concat(fresh.pieces));
        const out = new Uint8Array(70000).fill(0xee);
        const back = decodePayload(fresh.flags, wire, data.byteLength, checksum, out);
        expect(Buffer.compare(back, data)).toBe(0);
        const expanded = (fresh.flags & (FrameFlag.Lz4 | FrameFlag.Hole)) !== 0;
        expect(back.buffer).toBe(expanded ? out.buffer : wire.buffer);
      }
    }
  }
  const { flags, pieces } = encodePayload(samples.text, { compression: "lz4", checksum: "none" });
  expect(() => decodePayload(flags, pieces[0]!, 65536, "none", new Uint8Array(1000))).toThrow(/too small/);
});

// Peer data is untrusted: a body that expands past the request's length (a decompression bomb),
// one that falls short, a truncated or bit-flipped lz4 block, a hole with a body, a payload
// shorter than its trailer, or random bytes under any flag. Each must be a ProtocolError (the
// caller drops the connection and writes nothing), and nothing past `length` in `into` changes.
test("malformed peer payloads are ProtocolErrors and never write past the length", () => {
  const text = samples.text.subarray(0, 20_000);
  const packed = new Uint8Array(Buffer.concat(encodePayload(text, { compression: "lz4", checksum: "none" }).pieces));
  const bodies: Uint8Array[] = [new Uint8Array(0), Uint8Array.from([0xf0]), new Uint8Array(randomBytes(300))];
  for (let cut = 0; cut < packed.byteLength; cut += 97) bodies.push(packed.subarray(0, cut));
  for (let at = 0; at < packed.byteLength; at += 101) {
    const flipped = packed.slice();
    flipped[at]! ^= 0x5a;
    bodies.push(flipped);
  }
  const lengths = [0, 1, 511, 4097, text.byteLength - 1, text.byteLength + 1, 65_537];
  const flagSets = [0, FrameFlag.Lz4, FrameFlag.Hole, FrameFlag.Lz4 | FrameFlag.Hole];
  const canary = 0xee;
  let accepted = 0;
  for (const body of bodies) {
    for (const length of lengths) {
      for (const flags of flagSets) {
        const into = new Uint8Array(70_000).fill(canary);
        try {
          const out = decodePayload(flags, body, length, "none", into);
          expect(out.byteLength).toBe(length); // accepted only as exactly `length` bytes
          accepted++;
        } catch (error) {
          expect(error).toBeInstanceOf(ProtocolError);
        }
        expect(into.subarray(length).every((b) => b === canary)).toBe(true);
      }
    }
  }
  expect(accepted).toBeGreaterThan(0); // holes of every length, and bodies that happen to fit
  expect(() => decodePayload(FrameFlag.Lz4, packed, text.byteLength - 1, "none")).toThrow(ProtocolError);
  expect(() => decodePayload(FrameFlag.Hole, Uint8Array.from([0]), 10, "none")).toThrow("hole with a body");
  expect(() => decodePayload(FrameFlag.Crc32, Uint8Array.from([1, 2]), 2, "crc32")).toThrow("shorter than");
  expect(() => decodePayload(0, new Uint8Array(0), 2 ** 32 - 1, "none")).toThrow(ProtocolError);
});

// Spec §7: the checksum covers the compressed bytes, i.e. exactly the body on the wire.
test("the checksum trailer covers the body as sent (compressed, or empty for a hole)", () => {
  const packed = encodePayload(samples.text, { compression: "lz4", checksum: "crc32" });
  expect(packed.flags & FrameFlag.Lz4).toBe(FrameFlag.Lz4);
  const [body, trailer] = packed.pieces;
  expect(Buffer.from(trailer!).readUInt32BE(0)).toBe(Bun.hash.crc32(body!) >>> 0);
  const hole = encodePayload(new Uint8Array(12_345), { compression: "hole", checksum: "crc32" });
  expect(hole.pieces.length).toBe(1);
  expect(Buffer.from(hole.pieces[0]!).readUInt32BE(0)).toBe(Bun.hash.crc32(new Uint8Array(0)) >>> 0);
  expect(decodePayload(hole.flags, hole.pieces[0]!, 12_345, "crc32")).toEqual(new Uint8Array(12_345));
});
