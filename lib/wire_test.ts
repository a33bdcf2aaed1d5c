/**
 * The replication framing: frames round-trip through the incremental parser
 * whatever the chunking (split at every byte offset), and malformed input
 * (bad magic, version, type, oversized payload) is rejected before anything
 * large is allocated.
 */
import { describe, expect, test } from "bun:test";
import {
  encodeFrame, encodeJson, decodeJson, FrameParser, HEADER_BYTES, MAX_PAYLOAD_BYTES, MessageType,
  ProtocolError, type Frame,
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
});
