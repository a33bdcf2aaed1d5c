import { describe, expect, test } from "bun:test";
import {
  ClientFlag,
  Command,
  CommandFlag,
  decodeGreeting,
  decodeInfoRequest,
  decodeOptionReplyHeader,
  decodeRequest,
  decodeSimpleReply,
  encodeClientFlags,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeInfoString,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeServerReplyData,
  encodeSimpleReply,
  HandshakeFlag,
  InfoType,
  type NbdClientFrame,
  NbdProtocolError,
  type NbdRequest,
  NbdServerParser,
  Option,
  OptionReply,
  quoteBounded,
} from "./nbd_protocol.ts";

const LIMITS = { maxOptionBytes: 65536, maxPayloadBytes: 1 << 20 };

function hexOf(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("hex");
}

function concat(parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

/** Feed `pieces` to a fresh parser, switching to transmission after GO/EXPORT_NAME. */
function parseAll(pieces: Uint8Array[]): NbdClientFrame[] {
  const parser = new NbdServerParser(LIMITS);
  const frames: NbdClientFrame[] = [];
  for (const piece of pieces) {
    parser.push(piece);
    for (let frame = parser.next(); frame !== null; frame = parser.next()) {
      frames.push(frame);
      const entersTransmission =
        frame.kind === "option" &&
        (frame.option === Option.GO || frame.option === Option.EXPORT_NAME);
      if (entersTransmission) parser.enterTransmission();
    }
  }
  expect(parser.incompleteFrame()).toBeNull();
  return frames;
}

describe("codecs", () => {
  // Golden bytes written out by hand from the spec catch mistakes a round trip would hide.
  test("greeting, client flags and export-name reply match the spec byte for byte", () => {
    const greeting = encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES);
    expect(hexOf(greeting)).toBe("4e42444d41474943" + "49484156454f5054" + "0003");
    expect(decodeGreeting(greeting)).toBe(3);
    expect(hexOf(encodeClientFlags(ClientFlag.FIXED_NEWSTYLE))).toBe("00000001");
    const padded = encodeExportNameReply(0x1_0000_0200, 0x0145, false);
    expect(padded.length).toBe(8 + 2 + 124);
    expect(hexOf(padded.subarray(0, 10))).toBe("0000000100000200" + "0145");
    expect(padded.subarray(10).every((b) => b === 0)).toBe(true);
    expect(encodeExportNameReply(512, 1, true).length).toBe(10);
  });

  test("option replies and info payloads match the spec byte for byte", () => {
    const ack = encodeOptionReply(Option.GO, OptionReply.ACK);
    expect(hexOf(ack)).toBe("0003e889045565a9" + "00000007" + "00000001" + "00000000");
    expect(decodeOptionReplyHeader(ack)).toEqual({
      option: Option.GO,
      replyType: OptionReply.ACK,
      length: 0,
    });
    const err = encodeOptionReply(Option.INFO, OptionReply.ERR_UNKNOWN, new Uint8Array([0x41]));
    expect(hexOf(err)).toBe("0003e889045565a9" + "00000006" + "80000006" + "00000001" + "41");
    expect(hexOf(encodeInfoExport(1 << 20, 0x15))).toBe("0000" + "0000000000100000" + "0015");
    expect(hexOf(encodeInfoBlockSize(1, 4096, 1 << 25))).toBe(
      "0003" + "00000001" + "00001000" + "02000000",
    );
    expect(hexOf(encodeInfoString(InfoType.NAME, "ab"))).toBe("0001" + "6162");
    expect(hexOf(encodeServerReplyData("ab", "x"))).toBe("00000002" + "6162" + "78");
  });

  test("request and simple reply round trip at the extremes of every field", () => {
    const requests: NbdRequest[] = [
      { flags: 0, type: Command.READ, cookie: 0n, offset: 0, length: 0 },
      {
        flags: 0xffff,
        type: 0xffff,
        cookie: 2n ** 64n - 1n,
        offset: Number.MAX_SAFE_INTEGER,
        length: 2 ** 32 - 1,
      },
      { flags: CommandFlag.FUA, type: Command.WRITE, cookie: 42n, offset: 2 ** 40, length: 4096 },
    ];
    for (const request of requests) {
      const bytes = encodeRequest(request);
      expect(bytes.length).toBe(28);
      expect(decodeRequest(bytes)).toEqual(request);
    }
    expect(hexOf(encodeRequest(requests[2]!))).toBe(
      "25609513" + "0001" + "0001" + "000000000000002a" + "0000010000000000" + "00001000",
    );
    const reply = encodeSimpleReply(22, 2n ** 64n - 2n);
    expect(hexOf(reply)).toBe("67446698" + "00000016" + "fffffffffffffffe");
    expect(decodeSimpleReply(reply)).toEqual({ errno: 22, cookie: 2n ** 64n - 2n });
  });

  test("info requests round trip and malformed ones are rejected with the reason", () => {
    const request = { name: "dätä", infoTypes: [InfoType.NAME, InfoType.BLOCK_SIZE, 77] };
    expect(decodeInfoRequest(encodeInfoRequest(request))).toEqual(request);
    expect(decodeInfoRequest(encodeInfoRequest({ name: "", infoTypes: [] }))).toEqual({
      name: "",
      infoTypes: [],
    });
    const good = encodeInfoRequest(request);
    expect(() => decodeInfoRequest(good.subarray(0, good.length - 1))).toThrow(/expected/);
    expect(() => decodeInfoRequest(concat([good, new Uint8Array(1)]))).toThrow(/expected/);
    expect(() => decodeInfoRequest(new Uint8Array(3))).toThrow(/too short/);
    const hugeName = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0, 0]);
    expect(() => decodeInfoRequest(hugeName)).toThrow(/name length 4294967295/);
    const badUtf8 = new Uint8Array([0, 0, 0, 1, 0xc3, 0, 0]);
    expect(() => decodeInfoRequest(badUtf8)).toThrow(/UTF-8/);
  });

  test("encoders refuse values that do not fit their fields", () => {
    const base = { flags: 0, type: 0, cookie: 1n, offset: 0, length: 1 };
    expect(() => encodeRequest({ ...base, offset: -1 })).toThrow(RangeError);
    expect(() => encodeRequest({ ...base, offset: 2 ** 53 })).toThrow(RangeError);
    expect(() => encodeRequest({ ...base, length: 2 ** 32 })).toThrow(RangeError);
    expect(() => encodeGreeting(0x10000)).toThrow(RangeError);
    expect(() => encodeInfoString(InfoType.NAME, "a\0b")).toThrow(RangeError);
    expect(() => encodeInfoString(InfoType.NAME, "x".repeat(4097))).toThrow(RangeError);
  });

  // A peer's string is quoted whole up to 256 characters, else cut with an ellipsis and never
  // in the middle of a surrogate pair, so the quote stays valid UTF-16 and short.
  test("quoteBounded cuts long strings at 256 characters, whole code points only", () => {
    expect(quoteBounded("data")).toBe("'data'");
    expect(quoteBounded("x".repeat(256))).toBe(`'${"x".repeat(256)}'`);
    expect(quoteBounded("x".repeat(4096))).toBe(`'${"x".repeat(256)}…'`);
    expect(quoteBounded("x".repeat(255) + "😀" + "y")).toBe(`'${"x".repeat(255)}…'`);
    expect(() => encodeInfoString(InfoType.NAME, "x".repeat(5000))).toThrow(/^.{0,400}$/);
  });
});

/** A whole client conversation: flags, three options, then one of each request. */
function clientStream(): { bytes: Uint8Array; expected: NbdClientFrame[] } {
  const infoData = encodeInfoRequest({ name: "data", infoTypes: [InfoType.BLOCK_SIZE] });
  const payload = new Uint8Array(1000).map((_, i) => (i * 7) & 0xff);
  const write: NbdRequest = { flags: 1, type: Command.WRITE, cookie: 2n, offset: 512, length: 1e3 };
  const read: NbdRequest = { flags: 0, type: Command.READ, cookie: 1n, offset: 0, length: 4096 };
  const empty: NbdRequest = { flags: 0, type: Command.WRITE, cookie: 3n, offset: 0, length: 0 };
  const flush: NbdRequest = { flags: 0, type: Command.FLUSH, cookie: 4n, offset: 0, length: 0 };
  const disc: NbdRequest = { flags: 0, type: Command.DISC, cookie: 5n, offset: 0, length: 0 };
  const flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;
  const parts = [
    encodeClientFlags(flags),
    encodeOption(Option.LIST),
    encodeOption(Option.INFO, infoData),
    encodeOption(Option.GO, infoData),
    encodeRequest(read),
    encodeRequest(write),
    payload,
    encodeRequest(empty),
    encodeRequest(flush),
    encodeRequest(disc),
  ];
  const expected: NbdClientFrame[] = [
    { kind: "clientFlags", flags },
    { kind: "option", option: Option.LIST, data: new Uint8Array(0) },
    { kind: "option", option: Option.INFO, data: infoData },
    { kind: "option", option: Option.GO, data: infoData },
    { kind: "request", request: read, payload: null },
    { kind: "request", request: write, payload },
    { kind: "request", request: empty, payload: new Uint8Array(0) },
    { kind: "request", request: flush, payload: null },
    { kind: "request", request: disc, payload: null },
  ];
  return { bytes: concat(parts), expected };
}

describe("NbdServerParser", () => {
  // Proves chunk boundaries never matter: the same stream cut at every byte offset (and in
  // three pieces around every offset) yields exactly the frames of the unsplit stream.
  test("every frame split at every byte offset parses identically", () => {
    const { bytes, expected } = clientStream();
    expect(parseAll([bytes])).toEqual(expected);
    for (let cut = 0; cut <= bytes.length; cut++) {
      const pieces = [bytes.subarray(0, cut), bytes.subarray(cut)];
      expect(parseAll(pieces)).toEqual(expected);
      const third = [bytes.subarray(0, cut >> 1), bytes.subarray(cut >> 1, cut), pieces[1]!];
      expect(parseAll(third)).toEqual(expected);
    }
  });

  test("one byte at a time, and many frames in one chunk, parse identically", () => {
    const { bytes, expected } = clientStream();
    const singles = Array.from(bytes, (_, i) => bytes.subarray(i, i + 1));
    expect(parseAll(singles)).toEqual(expected);
    const doubled = concat([bytes.subarray(0, 4), bytes.subarray(4)]);
    expect(parseAll([doubled])).toEqual(expected);
  });

  test("a WRITE payload lands in one buffer of exactly its length, not a view of a chunk", () => {
    const parser = new NbdServerParser(LIMITS);
    parser.push(encodeClientFlags(1));
    parser.next();
    parser.push(encodeOption(Option.EXPORT_NAME));
    parser.next();
    parser.enterTransmission();
    const request = { flags: 0, type: Command.WRITE, cookie: 9n, offset: 0, length: 300 };
    const chunk = concat([encodeRequest(request), new Uint8Array(300).fill(7), new Uint8Array(5)]);
    parser.push(chunk.subarray(0, 100));
    expect(parser.next()).toBeNull();
    expect(parser.incompleteFrame()).toBe("WRITE payload incomplete: 72 of 300 bytes");
    parser.push(chunk.subarray(100));
    const frame = parser.next();
    expect(frame?.kind).toBe("request");
    const payload = (frame as { payload: Uint8Array }).payload;
    expect(payload.buffer.byteLength).toBe(300);
    expect(payload.every((b) => b === 7)).toBe(true);
    expect(parser.bufferedBytes).toBe(5);
    expect(parser.incompleteFrame()).toBe("5 bytes of an incomplete request");
  });

  test("a WRITE over maxPayloadBytes is skipped without storing it, then parsing goes on", () => {
    const parser = new NbdServerParser({ maxOptionBytes: 16, maxPayloadBytes: 64 });
    parser.push(concat([encodeClientFlags(1), encodeOption(Option.EXPORT_NAME)]));
    parser.next();
    parser.next();
    parser.enterTransmission();
    const big = { flags: 0, type: Command.WRITE, cookie: 1n, offset: 0, length: 100_000 };
    const read = { flags: 0, type: Command.READ, cookie: 2n, offset: 0, length: 64 };
    parser.push(encodeRequest(big));
    expect(parser.next()).toBeNull();
    for (let sent = 0; sent < big.length; sent += 9999) {
      parser.push(new Uint8Array(Math.min(9999, big.length - sent)));
      if (sent + 9999 < big.length) expect(parser.next()).toBeNull();
    }
    expect(parser.next()).toEqual({ kind: "oversizedWrite", request: big });
    parser.push(encodeRequest(read));
    expect(parser.next()).toEqual({ kind: "request", request: read, payload: null });
  });

  test("bad option magic fails with the offending value, and the parser stays failed", () => {
    const parser = new NbdServerParser(LIMITS);
    parser.push(encodeClientFlags(1));
    parser.next();
    parser.push(new TextEncoder().encode("GET / HT"));
    expect(() => parser.next()).toThrow(NbdProtocolError);
    expect(parser.phase).toBe("failed");
    expect(parser.next()).toBeNull();
    const again = new NbdServerParser(LIMITS);
    again.push(concat([encodeClientFlags(1), new TextEncoder().encode("GET / HTTP/1.1")]));
    again.next();
    expect(() => again.next()).toThrow("bad magic 0x474554202f204854");
  });

  test("bad request magic fails as soon as 4 bytes are there, naming the value", () => {
    const parser = new NbdServerParser(LIMITS);
    parser.push(concat([encodeClientFlags(1), encodeOption(Option.EXPORT_NAME)]));
    parser.next();
    parser.next();
    parser.enterTransmission();
    parser.push(new Uint8Array([0xde, 0xad, 0xbe]));
    expect(parser.next()).toBeNull();
    parser.push(new Uint8Array([0xef]));
    expect(() => parser.next()).toThrow("bad magic 0xdeadbeef (expected 0x25609513)");
  });

  test("a huge option length is reported before anything is allocated or awaited", () => {
    const parser = new NbdServerParser(LIMITS);
    parser.push(encodeClientFlags(1));
    parser.next();
    const header = encodeOption(Option.GO).slice(0, 16);
    new DataView(header.buffer).setUint32(12, 0xffffffff);
    parser.push(header);
    expect(parser.next()).toEqual({
      kind: "optionTooBig",
      option: Option.GO,
      lengthBytes: 0xffffffff,
    });
    expect(parser.phase).toBe("failed");
  });

  test("truncated input is described, frames received before it are still delivered", () => {
    const { bytes } = clientStream();
    const parser = new NbdServerParser(LIMITS);
    parser.push(bytes.subarray(0, 3));
    expect(parser.next()).toBeNull();
    expect(parser.incompleteFrame()).toBe("3 bytes of an incomplete client flags");
    parser.push(bytes.subarray(3, 4 + 16 + 5));
    expect(parser.next()?.kind).toBe("clientFlags");
    expect(parser.next()?.kind).toBe("option");
    expect(parser.next()).toBeNull();
    expect(parser.incompleteFrame()).toBe("5 bytes of an incomplete option");
    expect(() => parser.enterTransmission()).not.toThrow();
    expect(() => parser.enterTransmission()).toThrow(/phase 'transmission'/);
  });

  test("decoders reject truncated frames with a clear message", () => {
    expect(() => decodeRequest(new Uint8Array(27))).toThrow(/shorter than a header/);
    expect(() => decodeSimpleReply(new Uint8Array(15))).toThrow(/only 15 bytes/);
    expect(() => decodeGreeting(new Uint8Array(18))).toThrow(/bad magic/);
    expect(() => decodeOptionReplyHeader(new Uint8Array(20))).toThrow(/bad magic/);
  });
});
