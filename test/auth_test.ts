/**
 * Mutual authentication of the replication link (`authkey`, lib/auth.ts), driven in-process
 * through the real Primary and Secondary (test/sim.ts), with key files on disk:
 * - the same key on both sides connects and replicates;
 * - a different key, or a key on one side only, is refused, with the reason on the side that
 *   can tell, and nothing reaches the secondary's disk;
 * - a key file that is too short or readable by others is refused with a message naming it.
 */
import { afterAll, afterEach, beforeAll, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readAuthKey } from "../lib/auth.ts";
import { encodeJson, HEADER_BYTES, MessageType } from "../lib/wire.ts";
import { waitFor } from "./harness.ts";
import { inSync, Sim, type SimOptions } from "./sim.ts";

let dir = "";
let sim: Sim | null = null;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "hast-auth-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(async () => {
  await sim?.stop();
  sim = null;
});

/** Writes a key file with `mode`; returns its path. */
function keyFile(name: string, contents: string, mode = 0o600): string {
  const path = join(dir, name);
  writeFileSync(path, contents);
  chmodSync(path, mode);
  return path;
}

function start(options: Partial<SimOptions>): Sim {
  sim = new Sim({ replication: "fullsync", keepdirty: 0, ...options });
  sim.start();
  return sim;
}

/** Waits until the primary has tried and failed at least once; returns its link error. */
async function refusedWith(s: Sim): Promise<string> {
  return waitFor("refused", () => {
    const st = s.primary.status();
    return st.link !== "connected" && st.linkError !== "" ? st.linkError : undefined;
  }, { timeoutMs: 5_000, intervalMs: 10 });
}

const pattern = (bytes: number) => new Uint8Array(bytes).map((_, i) => (i * 7 + 3) & 0xff);

test("the same key on both sides connects and replicates", async () => {
  const s = start({ authkey: keyFile("same", "correct horse battery staple\n") });
  await inSync(s, "connected");
  await s.primary.write(4096, pattern(8192), false);
  expect(Buffer.compare(s.secondaryDisk.bytes, s.primaryDisk.bytes)).toBe(0);
  expect(s.logs.filter((l) => l.includes("auth"))).toEqual([]);
});

test("a different key is refused on both sides; nothing reaches the secondary", async () => {
  const s = start({
    authkey: keyFile("mine", "0123456789abcdef-primary"),
    secondaryAuthkey: keyFile("theirs", "0123456789abcdef-secondary"),
  });
  expect(await refusedWith(s))
    .toMatch(/authentication failed: the secondary's proof does not match \(its authkey differs/);
  await waitFor("secondary logged it", () =>
    s.logs.some((l) => l.startsWith("secondary error") && l.includes("authentication failed")) || undefined,
  { timeoutMs: 5_000, intervalMs: 10 });
  await s.primary.write(0, pattern(4096), false);
  expect(s.secondaryDisk.bytes.subarray(0, 4096).every((b) => b === 0)).toBe(true);
  expect(s.secondary.status().link).not.toBe("connected");
});

test("a key on one side only is refused, saying which side lacks it", async () => {
  const secondaryOnly = start({ secondaryAuthkey: keyFile("sec-only", "0123456789abcdef0123") });
  expect(await refusedWith(secondaryOnly)).toMatch(/authentication required: this node has an authkey/);
  await secondaryOnly.stop();
  sim = null;
  const primaryOnly = start({ authkey: keyFile("pri-only", "0123456789abcdef0123"), secondaryAuthkey: null });
  expect(await refusedWith(primaryOnly)).toMatch(/the primary authenticates, but this node has no authkey/);
});

test("a short key or one readable by others is refused, naming the file", async () => {
  const open = keyFile("open", "0123456789abcdef0123", 0o644);
  expect(() => readAuthKey(open)).toThrow(`Cannot use authkey "${open}": readable by group or others (mode 644)`);
  const short = keyFile("short", "too short\n");
  expect(() => readAuthKey(short)).toThrow(`Cannot use authkey "${short}": 9 bytes, at least 16 needed`);
  expect(() => readAuthKey(join(dir, "missing"))).toThrow(/Cannot use authkey ".*missing": ENOENT/);
  const s = start({ authkey: open });
  expect(await refusedWith(s)).toContain(`Cannot use authkey "${open}"`);
});

/** The JSON body of a frame that starts `bytes` (the Sim passes one send() per call), if it is of `type`. */
function jsonOf(bytes: Uint8Array, type: number): Record<string, unknown> | null {
  if (bytes.byteLength < HEADER_BYTES || bytes[5] !== type) return null;
  return JSON.parse(Buffer.from(bytes.subarray(HEADER_BYTES)).toString("utf8"));
}

test("a Hello changed on the way fails the exchange and is not acted on", async () => {
  // The primary's counters say it has writes the secondary lacks; a forger rewrites them to
  // "nothing new" so that the secondary would become the sync source and overwrite them.
  for (const encryption of ["none", "aes-256-gcm"] as const) {
    const s = start({ authkey: keyFile(`forge-${encryption}`, "0123456789abcdef-forge"), encryption });
    let forged = 0;
    s.tamperToSecondary = (bytes) => {
      const hello = jsonOf(bytes, MessageType.Hello);
      if (hello === null) return bytes;
      forged++;
      const rewritten = { ...hello, localcnt: "0", remotecnt: "0", replication: "async" };
      return Buffer.concat(encodeJson(MessageType.Hello, rewritten));
    };
    expect(await refusedWith(s)).toMatch(/the secondary's proof does not match .*Hello was changed on the way/);
    expect(forged).toBeGreaterThan(0);
    expect(s.logs.some((l) => l.startsWith("secondary info: primary connected"))).toBe(false);
    await s.stop();
    sim = null;
  }
});

test("a refusal sent in place of the challenge is never taken as split-brain", async () => {
  const s = start({ authkey: keyFile("injected", "0123456789abcdef-inject") });
  s.tamperToPrimary = (bytes) => jsonOf(bytes, MessageType.AuthChallenge) === null ? bytes
    : Buffer.concat(encodeJson(MessageType.HelloReply, { accepted: false, splitBrain: true, reason: "forged" }));
  expect(await refusedWith(s)).toContain("forged");
  expect(s.primary.status().link).not.toBe("split-brain");
  expect(s.events.some((e) => e.includes("split-brain"))).toBe(false);
});

test("a frame smuggled in behind Auth closes the connection, and the secondary does not adopt it", async () => {
  const s = start({ authkey: keyFile("smuggle", "0123456789abcdef-smuggle") });
  let smuggled = 0;
  s.tamperToSecondary = (bytes) => {
    if (jsonOf(bytes, MessageType.Auth) === null) return bytes;
    smuggled++;
    return Buffer.concat([bytes, ...encodeJson(MessageType.Keepalive, {})]);
  };
  await waitFor("smuggled twice", () => smuggled >= 2 || undefined, { timeoutMs: 10_000, intervalMs: 10 });
  expect(s.secondary.status().link).not.toBe("connected");
  expect(s.logs.some((l) => l.startsWith("secondary info: primary connected"))).toBe(false);
  expect(s.logs.some((l) => l.includes("during the authentication exchange"))).toBe(true);
});
