/**
 * Encryption of the replication link (`encryption aes-256-gcm`) between two real `hast serve`
 * daemons on loopback. The primary's `remote` points at a TCP relay in this file, which
 * forwards to the secondary's real listen address, records every byte in both directions and
 * can flip one bit of the primary→secondary stream. It proves:
 * - with `encryption none` the written data crosses the link in the clear (the control: the
 *   relay sees the data, so the next check can fail);
 * - with `encryption aes-256-gcm` the pair replicates, the secondary's disk holds the data at
 *   its offset, and the data appears in neither direction of the recorded bytes;
 * - a bit flipped on the way during a write is caught: the connection drops with a decryption
 *   error in both logs (the secondary's Goodbye tells the primary why), the secondary's disk
 *   never holds a corrupted byte, and after the relay passes the next connection unmodified
 *   the data resyncs and both disks are identical;
 * - `encryption aes-256-gcm` without an authkey is a config error naming the file and line.
 * The in-process counterpart (simulated link, same checks) is test/encryption_test.ts.
 */
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { closeSync, openSync, readFileSync, readSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { type Cluster, type ClusterOptions, createCluster } from "./cluster.ts";
import { Cleanup, makeTempDir, run, waitFor } from "./harness.ts";

/** Time per test: two daemons, an initial sync, a write and maybe a resync. */
const TEST_TIMEOUT_MS = 120_000;
const EX_CONFIG = 78;
/** Each provider: small, so the initial sync (recorded by the relay) stays small. */
const PROVIDER_BYTES = 8 * 1024 * 1024;
const MARKER = Buffer.from("HAST-PLAINTEXT-MARKER-");
const PATTERN_BYTES = 64 * 1024;
/** Where the pattern is written: not at 0, so "at the right offset" means something. */
const PATTERN_OFFSET = 1024 * 1024;
/**
 * Where in the primary→secondary stream, counted from when the test arms it, the relay flips
 * a bit: inside the 64 KiB write that follows (keepalives in between are a few dozen bytes).
 */
const FLIP_AFTER_BYTES = 16 * 1024;
/** The bit flipped: every byte of MARKER has two or more bits set, so none turns into 0. */
const FLIP_MASK = 0x10;
/** The relay's own loopback address, distinct from both nodes' (127.0.0.1, 127.0.0.2). */
const RELAY_HOST = "127.0.0.3";
/** How often the secondary's disk is sampled while a tampered write settles. */
const SAMPLE_INTERVAL_MS = 10;
const DECRYPT_FAILURE = /cannot decrypt/i;

/** The bytes one relayed connection carried in each direction. */
interface RelayedConnection {
  toSecondary: Buffer[];
  toPrimary: Buffer[];
  toSecondaryBytes: number;
}

/**
 * A TCP relay from `RELAY_HOST` to the secondary's listen address. It connects from the
 * primary's address, because the secondary accepts replication only from its configured remote.
 */
class TapRelay {
  readonly connections: RelayedConnection[] = [];
  /** Where the armed flip lands: a connection and a byte offset in its primary→secondary stream. */
  flip: { connection: number; atByte: number; done: boolean } | null = null;
  readonly #server = net.createServer((socket) => this.#relay(socket));
  readonly #sockets = new Set<net.Socket>();

  constructor(private readonly target: { host: string; port: number; fromHost: string }) {}

  /** Listens on a free port of RELAY_HOST; returns that port. */
  async listen(): Promise<number> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once("error", reject).listen(0, RELAY_HOST, () => resolve());
    });
    return (this.#server.address() as net.AddressInfo).port;
  }

  /** Flips FLIP_MASK in the byte `afterBytes` from now on the latest connection, once. */
  armFlip(afterBytes: number): void {
    const connection = this.connections.length - 1;
    if (connection < 0) throw new Error("Cannot arm the flip: no connection yet");
    const atByte = this.connections[connection]!.toSecondaryBytes + afterBytes;
    this.flip = { connection, atByte, done: false };
  }

  /** True when `needle` appears in the recorded bytes of some connection in that direction. */
  saw(direction: "toSecondary" | "toPrimary", needle: Uint8Array): boolean {
    return this.connections.some((c) => Buffer.concat(c[direction]).includes(needle));
  }

  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  #relay(fromPrimary: net.Socket): void {
    const index = this.connections.length;
    const seen: RelayedConnection = { toSecondary: [], toPrimary: [], toSecondaryBytes: 0 };
    this.connections.push(seen);
    const { host, port, fromHost } = this.target;
    const toSecondary = net.connect({ host, port, localAddress: fromHost });
    for (const socket of [fromPrimary, toSecondary]) {
      this.#sockets.add(socket);
      socket.on("error", () => {}); // either side's end closes both; the daemons log why
      socket.on("close", () => {
        this.#sockets.delete(socket);
        fromPrimary.destroy();
        toSecondary.destroy();
      });
    }
    forward(fromPrimary, toSecondary, (chunk) => {
      const out = this.#maybeFlip(index, seen.toSecondaryBytes, chunk);
      seen.toSecondaryBytes += chunk.byteLength;
      seen.toSecondary.push(Buffer.from(chunk));
      return out;
    });
    forward(toSecondary, fromPrimary, (chunk) => {
      seen.toPrimary.push(Buffer.from(chunk));
      return chunk;
    });
  }

  /** `chunk` (which starts at `start` of connection `index`'s stream), with the armed bit flipped. */
  #maybeFlip(index: number, start: number, chunk: Buffer): Buffer {
    const flip = this.flip;
    if (flip === null || flip.done || flip.connection !== index) return chunk;
    if (flip.atByte < start || flip.atByte >= start + chunk.byteLength) return chunk;
    const copy = Buffer.from(chunk);
    copy[flip.atByte - start]! ^= FLIP_MASK;
    flip.done = true;
    return copy;
  }
}

/** Pipes `from` into `to` through `transform`, pausing `from` while `to` is full. */
function forward(from: net.Socket, to: net.Socket, transform: (chunk: Buffer) => Buffer): void {
  from.on("data", (chunk: Buffer) => {
    if (!to.write(transform(chunk))) from.pause();
  });
  to.on("drain", () => from.resume());
}

/** A free TCP port on `host` (bound and released: the daemon binds it right after). */
async function freePort(host: string): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(0, host, () => resolve()));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** MARKER over and over, PATTERN_BYTES long. */
function pattern(): Buffer {
  const data = Buffer.alloc(PATTERN_BYTES);
  for (let at = 0; at < data.byteLength; at += MARKER.byteLength) MARKER.copy(data, at);
  return data;
}

let cleanup = new Cleanup();
let dir = "";
let keyPath = "";
let patternPath = "";
beforeEach(async () => {
  cleanup = new Cleanup();
  dir = await makeTempDir(cleanup, "hast-encwire-");
  keyPath = join(dir, "data.key");
  writeFileSync(keyPath, "a shared secret of the pair\n", { mode: 0o600 });
  patternPath = join(dir, "pattern");
  writeFileSync(patternPath, pattern());
});
afterEach(() => cleanup.run());

/** A keyed pair with `encryption` whose primary (a) reaches the secondary (b) through a relay. */
async function relayedPair(encryption: string): Promise<{ c: Cluster; relay: TapRelay }> {
  const port = await freePort("127.0.0.2");
  const relay = new TapRelay({ host: "127.0.0.2", port, fromHost: "127.0.0.1" });
  cleanup.add("close the relay", () => relay.close());
  const relayPort = await relay.listen();
  const options: ClusterOptions = {
    port,
    sizeBytes: PROVIDER_BYTES,
    resourceLines: [`authkey ${keyPath}`, `encryption ${encryption}`, "compression none"],
    remoteOverride: { a: `${RELAY_HOST}:${relayPort}` },
  };
  const c = await createCluster(cleanup, options);
  await c.startPair();
  return { c, relay };
}

/** Writes the pattern at PATTERN_OFFSET through a's NBD export and flushes. */
async function writePattern(c: Cluster): Promise<void> {
  await run(["qemu-io", "-f", "raw", c.uri("a"),
    "-c", `write -s ${patternPath} ${PATTERN_OFFSET} ${PATTERN_BYTES}`, "-c", "flush"]);
}

function inSync(c: Cluster, what: string): Promise<Record<string, any>> {
  return c.waitStatus("a", what, (s) => s.status === "complete" && s.dirtyBytes === 0, 60_000);
}

describe("a relayed link", () => {
  test("encryption none: the written data crosses the link in the clear (the control)", async () => {
    const { c, relay } = await relayedPair("none");
    await writePattern(c);
    expect((await inSync(c, "written and in sync")).linkEncrypted).toBe(false);
    expect((await c.status("b")).linkEncrypted).toBe(false);
    expect(Buffer.compare(await c.readData("b", PATTERN_OFFSET, PATTERN_BYTES), pattern())).toBe(0);
    expect(relay.saw("toSecondary", MARKER)).toBe(true);
  }, TEST_TIMEOUT_MS);

  test("aes-256-gcm: the pair replicates and the data crosses the link in neither direction", async () => {
    const { c, relay } = await relayedPair("aes-256-gcm");
    await writePattern(c);
    // `hast status` on both nodes says the link is sealed.
    expect((await inSync(c, "written and in sync")).linkEncrypted).toBe(true);
    expect((await c.status("b")).linkEncrypted).toBe(true);
    expect(Buffer.compare(await c.readData("b", PATTERN_OFFSET, PATTERN_BYTES), pattern())).toBe(0);
    expect(Buffer.compare(await c.readData("a"), await c.readData("b"))).toBe(0);
    expect(relay.connections.length).toBeGreaterThan(0);
    expect(relay.saw("toSecondary", MARKER)).toBe(false);
    expect(relay.saw("toPrimary", MARKER)).toBe(false);
  }, TEST_TIMEOUT_MS);

  test("aes-256-gcm: a bit flipped during a write drops the link, is never applied, and resyncs", async () => {
    const { c, relay } = await relayedPair("aes-256-gcm");
    const dataOffsetBytes = (await c.dump("b")).dataOffsetBytes as number;
    const sampler = sampleSecondary(c.nodes.b.image, dataOffsetBytes + PATTERN_OFFSET);
    try {
      relay.armFlip(FLIP_AFTER_BYTES);
      await writePattern(c);
      await waitFor("a decryption failure logged", () => decryptFailureLogged(c) || undefined,
        { timeoutMs: 10_000 });
      await waitFor("a new connection", () => relay.connections.length > relay.flip!.connection + 1 || undefined,
        { timeoutMs: 30_000 });
      await inSync(c, "reconnected and resynced");
    } finally {
      sampler.stop();
    }
    expect(relay.flip!.done).toBe(true);
    expect(sampler.samples()).toBeGreaterThan(0);
    expect(sampler.corruptAt()).toBeNull();
    expect(Buffer.compare(await c.readData("b", PATTERN_OFFSET, PATTERN_BYTES), pattern())).toBe(0);
    expect(Buffer.compare(await c.readData("a"), await c.readData("b"))).toBe(0);
  }, TEST_TIMEOUT_MS);
});

/** Both logs say why: the secondary found it, and told the primary in its Goodbye. */
function decryptFailureLogged(c: Cluster): boolean {
  return [c.nodes.a.log, c.nodes.b.log].every((log) => DECRYPT_FAILURE.test(readFileSync(log, "utf8")));
}

/**
 * Reads the pattern's range of the secondary's image every SAMPLE_INTERVAL_MS until stopped,
 * and remembers the first byte that is neither the old content (0) nor the pattern's byte: a
 * copy of the write with a bit flipped (pwrite may be seen half done, but byte by byte).
 */
function sampleSecondary(image: string, fileOffset: number) {
  const expected = pattern();
  const buffer = Buffer.alloc(PATTERN_BYTES);
  let samples = 0;
  let corruptAt: number | null = null;
  const fd = openSync(image, "r");
  const timer = setInterval(() => {
    readSync(fd, buffer, 0, PATTERN_BYTES, fileOffset);
    samples++;
    for (let i = 0; i < PATTERN_BYTES && corruptAt === null; i++) {
      if (buffer[i] !== 0 && buffer[i] !== expected[i]) corruptAt = i;
    }
  }, SAMPLE_INTERVAL_MS);
  return {
    samples: () => samples,
    corruptAt: () => corruptAt,
    stop() {
      clearInterval(timer);
      closeSync(fd);
    },
  };
}

describe("the config", () => {
  // Both places the option may be set: the resource section and the global section.
  for (const where of ["resource", "global"] as const) {
    test(`encryption aes-256-gcm without an authkey (${where} section) fails, naming file and line`, async () => {
      const c = await createCluster(cleanup, {
        sizeBytes: PROVIDER_BYTES,
        resourceLines: where === "resource" ? ["encryption aes-256-gcm"] : [],
      });
      if (where === "global") {
        writeFileSync(c.configPath, `encryption aes-256-gcm\n${readFileSync(c.configPath, "utf8")}`);
      }
      const line = readFileSync(c.configPath, "utf8").split("\n")
        .findIndex((text) => text.trim() === "encryption aes-256-gcm") + 1;
      expect(line).toBeGreaterThan(0);
      const result = await c.hast("a", ["create", "data"], { allowFailure: true });
      expect(result.code, result.stderr).toBe(EX_CONFIG);
      expect(result.stderr).toContain(`${c.configPath}:${line}:`);
      expect(result.stderr).toMatch(/encryption aes-256-gcm.*authkey/);
    }, TEST_TIMEOUT_MS);
  }
});
