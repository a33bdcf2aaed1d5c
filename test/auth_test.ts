/**
 * Mutual authentication of the replication link (`authkey`, lib/auth.ts), driven in-process
 * through the real Primary and Secondary (test/sim.ts), with key files on disk:
 * - the same key on both sides connects and replicates;
 * - a different key, or a key on one side only, is refused, with the reason on the side that
 *   can tell, and nothing reaches the secondary's disk;
 * - a key file that is too short or readable by others is refused with a message naming it;
 *   so is one owned by another user, one too large to be a key, or one that is not a regular
 *   file (a FIFO would block the worker, which reads the key at every connection); only
 *   trailing ASCII whitespace (a newline) is not part of the key.
 */
import { afterAll, afterEach, beforeAll, expect, test } from "bun:test";
import { createHmac, randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import {
  chmodSync, chownSync, closeSync, constants, mkdtempSync, openSync, rmSync, truncateSync, writeFileSync, writeSync,
} from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ActiveMap } from "../lib/activemap.ts";
import { AUTHKEY_MAX_BYTES, helloDigest, readAuthKey } from "../lib/auth.ts";
import type { ResourceConfig } from "../lib/config.ts";
import { parseHello, type Hello } from "../lib/handshake.ts";
import { Primary } from "../lib/primary.ts";
import { systemClock } from "../lib/remote_link.ts";
import { tcpNetwork } from "../lib/transport.ts";
import { encodeFrame, encodeJson, FrameParser, HEADER_BYTES, MessageType } from "../lib/wire.ts";
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
  await s.stop();
  sim = null;
  // A missing key file stops the primary before it connects (the secondary saw only a Goodbye).
  const missing = join(dir, "missing");
  const m = start({ authkey: missing, secondaryAuthkey: keyFile("present", "0123456789abcdef0123") });
  expect(await refusedWith(m)).toMatch(/Cannot use authkey ".*missing": ENOENT/);
  expect(m.connectsMade).toBe(0);
});

test("a key file owned by another user is refused: that user could read or replace the key", () => {
  // Found by review: only the mode was checked, so a 0600 file of an unprivileged user passed.
  const foreign = keyFile("foreign", "0123456789abcdef0123");
  chownSync(foreign, 65534, 65534);
  expect(() => readAuthKey(foreign)).toThrow(`Cannot use authkey "${foreign}": owned by uid 65534`);
  chownSync(foreign, process.getuid!(), process.getgid!());
  expect(readAuthKey(foreign).toString()).toBe("0123456789abcdef0123");
});

test("a key file larger than a key is refused before it is read", () => {
  // Found by review: it was read whole at every connection attempt, however large (a log or an
  // image named by mistake: its size in memory each time, and the event loop held meanwhile).
  const largest = keyFile("largest", "k".repeat(AUTHKEY_MAX_BYTES));
  expect(readAuthKey(largest).byteLength).toBe(AUTHKEY_MAX_BYTES);
  const over = keyFile("over", "k".repeat(AUTHKEY_MAX_BYTES + 1));
  expect(() => readAuthKey(over))
    .toThrow(`Cannot use authkey "${over}": ${AUTHKEY_MAX_BYTES + 1} bytes, at most ${AUTHKEY_MAX_BYTES} allowed`);
  const huge = keyFile("huge", "");
  truncateSync(huge, 1 << 30); // sparse
  expect(() => readAuthKey(huge)).toThrow(`Cannot use authkey "${huge}": ${1 << 30} bytes, at most`);
});

test("only trailing ASCII whitespace is left out of a key; a binary key keeps its bytes 0x85 and 0xA0", () => {
  // Found by review: the file went through latin1 and String.trimEnd(), which in Bun also
  // strips 0x85 and 0xA0 (Unicode NEL and NBSP), bytes of a random binary key like any other.
  const text = Buffer.from("0123456789abcdef0123");
  for (const end of ["\n", "\r\n", " \t\n", ""]) {
    const path = keyFile("text", Buffer.concat([text, Buffer.from(end)]).toString("latin1"));
    expect(readAuthKey(path).equals(text)).toBe(true);
  }
  for (const last of [0x85, 0xa0]) {
    const binary = Buffer.concat([randomBytes(31).map((b) => b | 0x80), Buffer.from([last])]);
    const path = join(dir, "binary");
    writeFileSync(path, binary);
    chmodSync(path, 0o600);
    expect(readAuthKey(path).toString("hex")).toBe(binary.toString("hex"));
  }
});

test("a FIFO in place of the key file is refused without blocking the reader", async () => {
  // Found by review: the resource's worker reads the key at every connection, and a FIFO put at
  // its path after the config was checked blocked that read, and the worker with it (its NBD
  // export included), until a writer came. A child process reads; this test is that writer.
  const fifo = join(dir, "fifo");
  execFileSync("mkfifo", ["-m", "600", fifo]);
  const script = `import { readAuthKey } from ${JSON.stringify(join(import.meta.dir, "../lib/auth.ts"))};\n` +
    `try { console.log("read " + readAuthKey(${JSON.stringify(fifo)}).byteLength + " bytes"); }\n` +
    "catch (error) { console.log(error.message); }";
  const child = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "inherit" });
  let exited = false;
  void child.exited.then(() => (exited = true));
  await waitFor("the child refuses the FIFO or waits for a writer", () => {
    if (exited) return true;
    let fd: number;
    try {
      fd = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK); // ENXIO until a reader has it open
    } catch {
      return undefined;
    }
    writeSync(fd, "0123456789abcdef0123");
    closeSync(fd);
    return true;
  }, { timeoutMs: 30_000, intervalMs: 10 });
  await child.exited;
  expect((await new Response(child.stdout).text()).trim()).toBe(`Cannot use authkey "${fifo}": not a regular file`);
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

// The secondary decides on a full sync from the Hello's metaflush and localWritesLost
// (handshake.ts syncForLoss): forging them (say metaflush on, to avoid a full sync) must fail too.
test("a Hello whose metaflush or loss flag was changed on the way fails the exchange", async () => {
  for (const field of ["metaflush", "localWritesLost"] as const) {
    const s = start({ authkey: keyFile(`forge-${field}`, "0123456789abcdef-forge") });
    let forged = 0;
    s.tamperToSecondary = (bytes) => {
      const hello = jsonOf(bytes, MessageType.Hello);
      if (hello === null) return bytes;
      expect(typeof hello[field]).toBe("boolean");
      forged++;
      return Buffer.concat(encodeJson(MessageType.Hello, { ...hello, [field]: !hello[field] }));
    };
    expect(await refusedWith(s)).toMatch(/the secondary's proof does not match .*Hello was changed on the way/);
    expect(forged).toBeGreaterThan(0);
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
    return Buffer.concat([bytes, ...encodeFrame({ type: MessageType.Keepalive })]); // a valid frame
  };
  await waitFor("smuggled twice", () => smuggled >= 2 || undefined, { timeoutMs: 10_000, intervalMs: 10 });
  expect(s.secondary.status().link).not.toBe("connected");
  expect(s.logs.some((l) => l.startsWith("secondary info: primary connected"))).toBe(false);
  expect(s.logs.some((l) => l.includes("during the authentication exchange"))).toBe(true);
});

/** Waits for a line of the primary's log that matches `pattern`; returns it. */
function primaryLogged(lines: string[], pattern: RegExp): Promise<string> {
  return waitFor(`primary log ${pattern}`, () => lines.find((l) => l.startsWith("primary") && pattern.test(l)),
    { timeoutMs: 10_000, intervalMs: 10 });
}

test("a HelloReply forged after the exchange is refused, and the primary does not sync from it", async () => {
  // A man in the middle passes the exchange through and replaces the secondary's reply with
  // "sync from the secondary, full": acted on, the secondary's empty disk would overwrite the
  // primary's data. Once with the proof removed, once with the secondary's proof kept.
  for (const keepProof of [false, true]) {
    const authkey = keyFile(`reply-${keepProof}`, "0123456789abcdef-reply");
    const s = new Sim({ replication: "fullsync", keepdirty: 0, authkey });
    sim = s;
    s.primaryDisk.bytes.set(pattern(65536));
    let replies = 0;
    s.tamperToPrimary = (bytes) => {
      const reply = jsonOf(bytes, MessageType.HelloReply);
      if (reply !== null) replies++;
      if (reply === null || reply.accepted !== true) return bytes;
      const { proof, ...fields } = reply;
      const lie = { ...fields, source: "secondary", full: true, reason: "forged", ...(keepProof ? { proof } : {}) };
      return Buffer.concat(encodeJson(MessageType.HelloReply, lie));
    };
    s.start();
    const refusal = keepProof ? /HelloReply has a proof that does not match/ : /HelloReply carries no proof/;
    const line = await primaryLogged(s.logs, refusal);
    expect(line).toContain("cannot connect: authentication failed: the secondary's HelloReply");
    // The second attempt is refused (the secondary adopted the resuid of the first Hello; the
    // primary did not): time enough for anything the first reply started to show.
    await waitFor("a second attempt", () => replies >= 2 || undefined, { timeoutMs: 10_000, intervalMs: 10 });
    expect(Buffer.compare(s.primaryDisk.bytes.subarray(0, 65536), pattern(65536))).toBe(0);
    expect(s.primary.status().link).not.toBe("connected");
    expect(s.logs.some((l) => l.startsWith("primary info: connected"))).toBe(false);
    expect(s.primaryMeta.metadata.syncTarget).toBe(false);
    await s.stop();
    sim = null;
  }
});

test("a split-brain verdict forged after the exchange is only a refusal", async () => {
  const s = start({ authkey: keyFile("late-split", "0123456789abcdef-late") });
  let forged = 0;
  s.tamperToPrimary = (bytes) => {
    if (jsonOf(bytes, MessageType.HelloReply) === null) return bytes;
    forged++;
    return Buffer.concat(encodeJson(MessageType.HelloReply, { accepted: false, splitBrain: true, reason: "forged" }));
  };
  await waitFor("two forged verdicts", () => forged >= 2 || undefined, { timeoutMs: 10_000, intervalMs: 10 });
  expect(await primaryLogged(s.logs, /secondary refused the connection: forged/)).toContain("primary error");
  expect(s.primary.status().link).not.toBe("split-brain");
  expect(s.events.some((e) => e.includes("split-brain"))).toBe(false);
});

test("a dirty map changed on the way is refused: the reply's proof covers the Map frames", async () => {
  // After a first sync the secondary sends its whole map area on each connect; a forger flips
  // its first byte (eight extents dirty that are not, or the reverse) and keeps the reply.
  const s = start({ authkey: keyFile("map", "0123456789abcdef-map") });
  await inSync(s, "connected");
  let changed = 0;
  s.tamperToPrimary = (bytes) => {
    if (bytes.byteLength <= HEADER_BYTES || bytes[5] !== MessageType.Map) return bytes;
    changed++;
    const copy = bytes.slice();
    copy[HEADER_BYTES] = copy[HEADER_BYTES]! ^ 0xff;
    return copy;
  };
  s.dropLink("test: reconnect");
  expect(await primaryLogged(s.logs, /dirty map differs from the one its HelloReply names/))
    .toContain("cannot connect: authentication failed");
  expect(changed).toBeGreaterThan(0);
  s.tamperToPrimary = (b) => b;
  await waitFor("connected again", () => s.primary.status().link === "connected" || undefined,
    { timeoutMs: 10_000, intervalMs: 10 });
});

/**
 * A secondary played by a plain TCP socket speaking the wire format: it holds `key` and passes
 * the exchange (as a secondary of an older hast would), then answers with `reply`, unsigned.
 * Records the type of every frame it receives.
 */
async function fakeSecondary(key: Buffer, reply: Record<string, unknown>) {
  const received: number[] = [];
  const sockets: net.Socket[] = [];
  const server = net.createServer((socket) => {
    sockets.push(socket);
    let hello: Hello | null = null;
    let theirs = Buffer.alloc(0);
    const ours = randomBytes(32);
    const parser = new FrameParser((frame) => {
      received.push(frame.type);
      if (frame.type === MessageType.Hello) {
        hello = parseHello(frame);
        theirs = Buffer.from(hello.authNonce!, "hex");
        const proof = createHmac("sha256", key).update(`hast-auth-2 secondary ${hello.resource}\n`)
          .update(theirs).update(ours).update(helloDigest(hello)).digest("hex");
        socket.write(Buffer.concat(encodeJson(MessageType.AuthChallenge, { nonce: ours.toString("hex"), proof })));
      } else if (frame.type === MessageType.Auth) {
        socket.write(Buffer.concat(encodeJson(MessageType.HelloReply, reply)));
      }
    });
    socket.on("data", (chunk: Buffer) => parser.push(chunk));
    socket.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  const close = async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  };
  return { port, received, close };
}

test("a real primary refuses an unsigned HelloReply from a plain-socket secondary and sends no sync", async () => {
  // The fake holds the key, so the exchange succeeds; its reply says "sync from the secondary,
  // full", unsigned. Acted on, the primary would send it Read requests to copy its disk.
  const path = keyFile("fake", "0123456789abcdef-fake");
  const fake = await fakeSecondary(readAuthKey(path), {
    accepted: true, resuid: "99", localcnt: "5", remotecnt: "0", source: "secondary", full: true,
    reason: "forged", mapBytes: 0, verify: true,
  });
  const layout = new Sim({ replication: "fullsync", authkey: path });
  const config = { ...layout.config(), remote: { kind: "tcp", family: "tcp", host: "127.0.0.1", port: fake.port } };
  const m = layout.primaryMeta.metadata;
  const logs: string[] = [];
  layout.primaryDisk.bytes.set(pattern(65536));
  const primary = new Primary({
    config: config as ResourceConfig, data: layout.primaryDisk, meta: layout.primaryMeta,
    activemap: new ActiveMap({
      extentCount: Math.ceil(m.datasizeBytes / m.extentsizeBytes), extentsizeBytes: m.extentsizeBytes,
      datasizeBytes: m.datasizeBytes, keepdirty: 0, onDisk: layout.primaryMeta.map,
    }),
    network: tcpNetwork, clock: systemClock, hooks: { run: () => {} },
    log: (level, message) => logs.push(`primary ${level}: ${message}`),
  });
  try {
    primary.start();
    expect(await primaryLogged(logs, /cannot connect/))
      .toContain("authentication failed: the secondary's HelloReply carries no proof");
    const hellos = () => fake.received.filter((t) => t === MessageType.Hello).length;
    await waitFor("a second attempt", () => hellos() >= 2 || undefined, { timeoutMs: 10_000, intervalMs: 10 });
    const handshake: number[] = [MessageType.Hello, MessageType.Auth, MessageType.Goodbye];
    expect(fake.received.filter((t) => !handshake.includes(t))).toEqual([]);
    expect(layout.primaryMeta.metadata.resuid).toBe(0n);
    expect(Buffer.compare(layout.primaryDisk.bytes.subarray(0, 65536), pattern(65536))).toBe(0);
    expect(primary.status().link).not.toBe("connected");
  } finally {
    await primary.stop();
    await fake.close();
  }
});
