import { expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { deriveLinkKeys, Opener, RECORD_MAX_BYTES, Sealer } from "./link_crypto.ts";
import { encodeJson, MessageType, ProtocolError } from "./wire.ts";

const authkey = Buffer.from("correct horse battery staple");
const primaryNonce = randomBytes(32);
const secondaryNonce = randomBytes(32);
const hello = randomBytes(32);
const primary = deriveLinkKeys(authkey, "data", primaryNonce, secondaryNonce, "primary", hello);
const secondary = deriveLinkKeys(authkey, "data", primaryNonce, secondaryNonce, "secondary", hello);

/** Seals `messages` as primary → secondary records, as one byte stream. */
function stream(messages: Uint8Array[]): Buffer {
  const sealer = new Sealer(primary.send);
  return Buffer.concat(messages.flatMap((m) => sealer.seal(m)));
}

function openAll(bytes: Uint8Array, chunkBytes: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  const opener = new Opener(secondary.receive, (p) => out.push(Buffer.from(p)));
  for (let at = 0; at < bytes.byteLength; at += chunkBytes) opener.push(bytes.subarray(at, at + chunkBytes));
  expect(opener.idle).toBe(true);
  return out;
}

test("each direction has its own key; the two sides derive the same pair, swapped", () => {
  expect(primary.send.equals(secondary.receive)).toBe(true);
  expect(primary.receive.equals(secondary.send)).toBe(true);
  expect(primary.send.equals(primary.receive)).toBe(false);
  const otherResource = deriveLinkKeys(authkey, "other", primaryNonce, secondaryNonce, "primary", hello);
  const otherNonce = deriveLinkKeys(authkey, "data", randomBytes(32), secondaryNonce, "primary", hello);
  const otherHello = deriveLinkKeys(authkey, "data", primaryNonce, secondaryNonce, "primary", randomBytes(32));
  expect(otherResource.send.equals(primary.send)).toBe(false);
  expect(otherNonce.send.equals(primary.send)).toBe(false);
  expect(otherHello.send.equals(primary.send)).toBe(false);
});

test("records open in order from chunks of any size, including one byte at a time", () => {
  const hex = (list: Uint8Array[]) => list.map((m) => Buffer.from(m).toString("hex"));
  const small = [randomBytes(1), randomBytes(4096), randomBytes(33)];
  expect(hex(openAll(stream(small), 1))).toEqual(hex(small));
  const large = [randomBytes(1), randomBytes(1 << 20), randomBytes(RECORD_MAX_BYTES), randomBytes(33)];
  const bytes = stream(large);
  for (const chunk of [7, 4096, 65536, bytes.byteLength]) expect(hex(openAll(bytes, chunk))).toEqual(hex(large));
});

test("the ciphertext does not contain the plaintext", () => {
  const marker = Buffer.from("HAST-PLAINTEXT-MARKER-".repeat(100));
  expect(stream([marker]).includes(Buffer.from("PLAINTEXT-MARKER"))).toBe(false);
});

test("any changed bit, in length, body or tag, fails to open and nothing is handed on", () => {
  const bytes = stream([randomBytes(100)]);
  for (const bit of [3, 4 * 8 + 5, bytes.byteLength * 8 - 1]) {
    const bad = Buffer.from(bytes);
    bad[bit >> 3]! ^= 1 << (bit & 7);
    const opened: Uint8Array[] = [];
    const opener = new Opener(secondary.receive, (p) => opened.push(p));
    expect(() => opener.push(bad)).toThrow(ProtocolError);
    expect(opened).toEqual([]);
  }
});

test("a dropped, repeated or reordered record fails to open (records are numbered)", () => {
  const sealer = new Sealer(primary.send);
  const [first, second, third] = [1, 2, 3].map((n) => Buffer.concat(sealer.seal(Buffer.alloc(10, n))));
  for (const order of [[first, third], [first, first], [second, first]]) {
    const opener = new Opener(secondary.receive, () => {});
    expect(() => opener.push(Buffer.concat(order as Buffer[]))).toThrow(/Cannot decrypt record/);
  }
});

test("a record sealed with the other direction's key or another connection's keys fails to open", () => {
  const reflected = Buffer.concat(new Sealer(secondary.send).seal(Buffer.alloc(10)));
  expect(() => new Opener(secondary.receive, () => {}).push(reflected)).toThrow(ProtocolError);
  const later = deriveLinkKeys(authkey, "data", randomBytes(32), randomBytes(32), "primary", hello);
  const replayed = Buffer.concat(new Sealer(primary.send).seal(Buffer.alloc(10)));
  expect(() => new Opener(later.receive, () => {}).push(replayed)).toThrow(ProtocolError);
});

test("an oversized or empty record length is refused before anything is allocated", () => {
  const header = Buffer.alloc(4);
  header.writeUInt32BE(RECORD_MAX_BYTES + 1);
  expect(() => new Opener(secondary.receive, () => {}).push(header)).toThrow(/record of 2097153 bytes/);
  expect(() => new Opener(secondary.receive, () => {}).push(Buffer.alloc(4))).toThrow(/record of 0 bytes/);
  expect(() => new Sealer(primary.send).seal(new Uint8Array(RECORD_MAX_BYTES + 1))).toThrow(RangeError);
});

test("an unsealed frame from a peer that does not encrypt is named as such", () => {
  const frame = Buffer.concat(encodeJson(MessageType.HelloReply, { accepted: true }));
  expect(() => new Opener(secondary.receive, () => {}).push(frame)).toThrow(/peer sends unsealed frames/);
});
