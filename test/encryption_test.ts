/**
 * Encryption of the replication link (`encryption aes-256-gcm`, lib/link_crypto.ts), driven
 * in-process through the real Primary and Secondary (test/sim.ts), which pass every byte
 * through the real sealing code and a tamper hook:
 * - with the same key and setting on both sides, the pair connects and replicates, and no
 *   written data crosses the link in the clear (with `encryption none` it does: the control);
 * - a bit flipped on the way is caught: the connection drops, the secondary applies nothing of
 *   that record, and the data resyncs on the next connection;
 * - a different setting on the two sides is refused with the reason, before the exchange.
 * The real-process test on a TCP relay is test/encryption_wire_test.ts.
 */
import { afterAll, afterEach, beforeAll, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MessageType } from "../lib/wire.ts";
import { waitFor } from "./harness.ts";
import { inSync, Sim, type SimOptions } from "./sim.ts";

let dir = "";
let keyPath = "";
let sim: Sim | null = null;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "hast-encryption-"));
  keyPath = join(dir, "key");
  writeFileSync(keyPath, "correct horse battery staple\n");
  chmodSync(keyPath, 0o600);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(async () => {
  await sim?.stop();
  sim = null;
});

const MARKER = Buffer.from("HAST-PLAINTEXT-MARKER-");

function start(options: Partial<SimOptions>): Sim {
  sim = new Sim({ replication: "fullsync", compression: "none", keepdirty: 0, authkey: keyPath, ...options });
  sim.start();
  return sim;
}

/** Data that is the marker over and over, `bytes` long. */
function marked(bytes: number): Uint8Array {
  const data = new Uint8Array(bytes);
  for (let at = 0; at < bytes; at += MARKER.byteLength) {
    data.set(MARKER.subarray(0, Math.min(MARKER.byteLength, bytes - at)), at);
  }
  return data;
}

/** Records what crosses the link in both directions. */
function record(s: Sim): { toSecondary: Buffer[]; toPrimary: Buffer[] } {
  const seen = { toSecondary: [] as Buffer[], toPrimary: [] as Buffer[] };
  s.tamperToSecondary = (bytes) => (seen.toSecondary.push(Buffer.from(bytes)), bytes);
  s.tamperToPrimary = (bytes) => (seen.toPrimary.push(Buffer.from(bytes)), bytes);
  return seen;
}

const holdsMarker = (chunks: Buffer[]) => Buffer.concat(chunks).includes(MARKER);

test("encrypted, the pair replicates and no written data crosses the link in the clear", async () => {
  for (const encryption of ["none", "aes-256-gcm"] as const) {
    const s = start({ encryption });
    const seen = record(s);
    await inSync(s, `${encryption}: connected`);
    await s.primary.write(4096, marked(8192), false);
    await s.primary.write(2 * 1024 * 1024, marked(1024 * 1024), true);
    expect(Buffer.compare(s.secondaryDisk.bytes, s.primaryDisk.bytes)).toBe(0);
    expect(holdsMarker(seen.toSecondary)).toBe(encryption === "none");
    expect(s.primary.status().linkEncrypted).toBe(encryption !== "none");
    expect(s.secondary.status().linkEncrypted).toBe(encryption !== "none");
    expect(s.logs.filter((l) => / (warn|error):/.test(l))).toEqual([]);
    await s.stop();
    sim = null;
  }
});

test("a bit flipped on the way drops the connection, is never applied, and the data resyncs", async () => {
  const s = start({ encryption: "aes-256-gcm" });
  await inSync(s, "connected");
  let flipped = false;
  s.tamperToSecondary = (bytes) => {
    if (flipped || bytes.byteLength < 65536) return bytes;
    flipped = true;
    const copy = bytes.slice();
    copy[copy.byteLength >> 1]! ^= 0x04;
    return copy;
  };
  const data = marked(1024 * 1024);
  await s.primary.write(0, data, false);
  await waitFor("the secondary refused the record", () =>
    s.logs.some((l) => l.includes("Cannot decrypt record")) || undefined, { timeoutMs: 5_000, intervalMs: 10 });
  await inSync(s, "reconnected and resynced");
  expect(Buffer.compare(s.secondaryDisk.bytes.subarray(0, data.byteLength), data)).toBe(0);
  expect(Buffer.compare(s.secondaryDisk.bytes, s.primaryDisk.bytes)).toBe(0);
});

test("a bit flipped in a reply drops the connection; the write is still answered once the pair is back", async () => {
  const s = start({ encryption: "aes-256-gcm" });
  await inSync(s, "connected");
  let flipped = false;
  s.tamperToPrimary = (bytes) => {
    if (flipped) return bytes;
    flipped = true;
    const copy = bytes.slice();
    copy[copy.byteLength - 1]! ^= 0x80; // the tag
    return copy;
  };
  await s.primary.write(0, marked(4096), false);
  await waitFor("the primary refused the record", () =>
    s.logs.some((l) => l.startsWith("primary") && l.includes("Cannot decrypt record")) || undefined,
  { timeoutMs: 5_000, intervalMs: 10 });
  await inSync(s, "reconnected");
  expect(Buffer.compare(s.secondaryDisk.bytes, s.primaryDisk.bytes)).toBe(0);
});

test("a different encryption setting on the two sides is refused with the reason, before the exchange", async () => {
  for (const [mine, theirs] of [["aes-256-gcm", "none"], ["none", "aes-256-gcm"]] as const) {
    const s = start({ encryption: mine, secondaryEncryption: theirs });
    const seen = record(s);
    const error = await waitFor("refused", () => {
      const st = s.primary.status();
      return st.link !== "connected" && st.linkError !== "" ? st.linkError : undefined;
    }, { timeoutMs: 5_000, intervalMs: 10 });
    expect(error).toContain(`the primary's link encryption is "${mine}", this node's is "${theirs}"`);
    await s.primary.write(0, marked(4096), false);
    expect(s.secondaryDisk.bytes.subarray(0, 4096).every((b) => b === 0)).toBe(true);
    expect(holdsMarker(seen.toSecondary)).toBe(false);
    await s.stop();
    sim = null;
  }
});

test("a reload that turns encryption on at both sides reconnects, encrypted", async () => {
  const s = start({ encryption: "none" });
  await inSync(s, "connected in the clear");
  const next = { ...s.config(), encryption: "aes-256-gcm" as const };
  s.secondary.reconfigure({ ...next });
  s.primary.reconfigure({ ...next });
  await waitFor("reconnected", () => s.logs.some((l) => l.includes("reconnecting")) || undefined);
  await inSync(s, "connected encrypted");
  const seen = record(s);
  await s.primary.write(0, marked(65536), false);
  expect(Buffer.compare(s.secondaryDisk.bytes, s.primaryDisk.bytes)).toBe(0);
  expect(seen.toSecondary.length).toBeGreaterThan(0);
  expect(holdsMarker(seen.toSecondary)).toBe(false);
});

test("part of a frame smuggled in behind Auth: the secondary refuses, and the primary hears why", async () => {
  const s = start({ encryption: "aes-256-gcm" });
  s.tamperToSecondary = (bytes) =>
    bytes[5] === MessageType.Auth ? Buffer.concat([bytes, new Uint8Array(10)]) : bytes;
  const error = await waitFor("refused", () => {
    const st = s.primary.status();
    return st.link !== "connected" && st.linkError !== "" ? st.linkError : undefined;
  }, { timeoutMs: 5_000, intervalMs: 10 });
  expect(error).toContain("part of a frame arrived before the switch");
  expect(s.secondary.status().link).not.toBe("connected");
});
