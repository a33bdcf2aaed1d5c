/**
 * The replication framing: frames round-trip through the incremental parser
 * whatever the chunking (split at every byte offset), and malformed input
 * (bad magic, version, type, oversized payload) is rejected before anything
 * large is allocated.
 */
import { describe, expect, test } from "bun:test";
import {
  encodeFrame, encodeHeader, encodeJson, decodeJson, FrameFlag, FrameParser, HEADER_BYTES, MAX_IO_BYTES,
  MAX_JSON_BYTES, MAX_PAYLOAD_BYTES, MessageType, ProtocolError, type Frame,
} from "./wire.ts";

function flat(pieces: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(pieces));
}

function parseAll(bytes: Uint8Array, splits: number[]): Frame[] {
  const frames: Frame[] = [];
  const parser = new FrameParser((f) => frames.push({ ...f, payload: f.payload.slice() }));
  let at = 0;
  for (const cut of [...splits, bytes.byteLength]) {
    parser.push(bytes.subarray(at, cut));
    at = cut;
  }
  return frames;
}

const payload = new Uint8Array(100).map((_, i) => i * 7);
const stream = flat([
  ...encodeFrame({ type: MessageType.Write, seq: 9, offset: 2 ** 40, length: 100, flags: 1, payload }),
  ...encodeFrame({ type: MessageType.Flush, seq: 10 }),
  ...encodeJson(MessageType.Goodbye, { reason: "bye" }),
]);

describe("FrameParser", () => {
  test("splits at every byte offset give the same three frames", () => {
    for (let cut = 0; cut <= stream.byteLength; cut++) {
      const frames = parseAll(stream, [cut]);
      expect(frames.length).toBe(3);
      expect(frames[0]!.offset).toBe(2 ** 40);
      expect(frames[0]!.seq).toBe(9);
      expect(Buffer.compare(frames[0]!.payload, payload)).toBe(0);
      expect(frames[1]!.type).toBe(MessageType.Flush);
      expect(decodeJson(frames[2]!)).toEqual({ reason: "bye" });
    }
  });

  test("one byte at a time", () => {
    const cuts = Array.from({ length: stream.byteLength - 1 }, (_, i) => i + 1);
    expect(parseAll(stream, cuts).length).toBe(3);
  });

  test("bad magic, version, type and oversized payload are protocol errors", () => {
    const good = flat(encodeFrame({ type: MessageType.Flush }));
    const corrupt = (at: number, value: number) => {
      const copy = good.slice();
      copy[at] = value;
      return () => parseAll(copy, []);
    };
    expect(corrupt(0, 0)).toThrow(/bad magic/);
    expect(corrupt(4, 9)).toThrow(/protocol version 9/);
    expect(corrupt(5, 99)).toThrow(/unknown type 99/);
    const huge = good.slice();
    new DataView(huge.buffer).setUint32(8, MAX_PAYLOAD_BYTES + 1);
    expect(() => parseAll(huge, [])).toThrow(ProtocolError);
    expect(HEADER_BYTES).toBe(32);
  });

  test("a JSON message that is not an object is rejected", () => {
    const bytes = flat(encodeFrame({ type: MessageType.Hello, payload: new TextEncoder().encode("[1]") }));
    const frames = parseAll(bytes, []);
    expect(() => decodeJson(frames[0]!)).toThrow(/not a JSON object/);
  });

  test("garbage after a valid frame: the frame is delivered, then the garbage is refused", () => {
    const frames: Frame[] = [];
    const parser = new FrameParser((f) => frames.push(f));
    const bytes = flat([...encodeFrame({ type: MessageType.Flush, seq: 5 }), new Uint8Array(HEADER_BYTES).fill(0x41)]);
    expect(() => parser.push(bytes)).toThrow(/bad magic 0x41414141/);
    expect(frames.map((f) => f.seq)).toEqual([5]);
  });

  test("the largest payloads are accepted", () => {
    const write = new Uint8Array(MAX_PAYLOAD_BYTES).fill(1);
    const map = new Uint8Array(MAX_IO_BYTES).fill(2);
    const hello = new TextEncoder().encode(JSON.stringify({ pad: "x".repeat(MAX_JSON_BYTES - 10) }));
    expect(hello.byteLength).toBe(MAX_JSON_BYTES);
    const frames = parseAll(flat([
      ...encodeFrame({ type: MessageType.Write, length: MAX_IO_BYTES, payload: write }),
      ...encodeFrame({ type: MessageType.Map, flags: FrameFlag.Last, payload: map }),
      ...encodeFrame({ type: MessageType.Hello, payload: hello }),
    ]), []);
    expect(frames.map((f) => f.payload.byteLength)).toEqual([MAX_PAYLOAD_BYTES, MAX_IO_BYTES, MAX_JSON_BYTES]);
  });

  // Found by review: the parser bounded every payload by MAX_PAYLOAD_BYTES whatever the type, and
  // let any flag bits through: a peer could send a megabyte with a Keepalive, Read or Flush (read
  // into memory, then ignored) or a JSON message, and flags no receiver checks. Each is refused
  // at the header now, before anything is allocated.
  test("a payload or flag that the frame's type cannot have is refused at the header", () => {
    const header = (type: MessageType, payloadBytes: number, flags = 0) =>
      encodeHeader({ type, flags, seq: 1, offset: 0, length: 4096, error: 0 }, payloadBytes);
    const refused: [MessageType, number, number, RegExp][] = [
      [MessageType.Keepalive, 1, 0, /type 7 carries no payload, got 1 bytes/],
      [MessageType.Read, MAX_IO_BYTES, 0, /type 3 carries no payload/],
      [MessageType.Delete, 512, 0, /type 5 carries no payload/],
      [MessageType.Flush, 1, 0, /type 6 carries no payload/],
      [MessageType.Verify, 32, 0, /type 12 carries no payload/],
      [MessageType.Hello, MAX_JSON_BYTES + 1, 0, /payload of 65537 bytes exceeds 65536 for type 1/],
      [MessageType.Goodbye, MAX_IO_BYTES, 0, /exceeds 65536 for type 11/],
      [MessageType.SyncDone, MAX_JSON_BYTES + 1, 0, /exceeds 65536 for type 9/],
      [MessageType.Map, MAX_IO_BYTES + 1, 0, /exceeds 1048576 for type 10/],
      [MessageType.Write, 0, 0x100, /flags 0x100 not allowed on type 4/],
      [MessageType.Read, 0, FrameFlag.Fua, /flags 0x1 not allowed on type 3/],
      [MessageType.Reply, 0, FrameFlag.Fua, /flags 0x1 not allowed on type 8/],
      [MessageType.Delete, 0, FrameFlag.Sha256, /flags 0x20 not allowed on type 5/],
      [MessageType.Map, 0, FrameFlag.Received, /flags 0x2 not allowed on type 10/],
      [MessageType.Keepalive, 0, 0x8000, /flags 0x8000 not allowed on type 7/],
    ];
    for (const [type, payloadBytes, flags, why] of refused) {
      let delivered = 0;
      const parser = new FrameParser(() => delivered++);
      expect(() => parser.push(header(type, payloadBytes, flags))).toThrow(why);
      expect(delivered).toBe(0);
    }
    // The control: what hast itself sends passes.
    const accepted: [MessageType, number, number][] = [
      [MessageType.Keepalive, 0, 0], [MessageType.Read, 0, 0], [MessageType.Flush, 0, 0],
      [MessageType.Delete, 0, FrameFlag.Fua], [MessageType.Verify, 0, 0],
      [MessageType.Write, 0, FrameFlag.Fua | FrameFlag.Sync | FrameFlag.Hole | FrameFlag.Lz4 | FrameFlag.Sha256],
      [MessageType.Write, 4, FrameFlag.Crc32],
      [MessageType.Reply, 0, FrameFlag.Received], [MessageType.Reply, 36, FrameFlag.Lz4 | FrameFlag.Crc32],
      [MessageType.Map, 0, FrameFlag.Last], [MessageType.Hello, MAX_JSON_BYTES, 0],
    ];
    for (const [type, payloadBytes, flags] of accepted) {
      const frames = parseAll(flat([header(type, payloadBytes, flags), new Uint8Array(payloadBytes)]), []);
      expect([frames.length, frames[0]!.flags, frames[0]!.payload.byteLength]).toEqual([1, flags, payloadBytes]);
    }
  });
});
