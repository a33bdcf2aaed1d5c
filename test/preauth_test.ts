/**
 * Replication connections that have not authenticated yet, against a real secondary daemon (node
 * b, authkey set) from the primary's address, as a flood or a broken peer would make them:
 * - a Hello whose header announces more than MAX_JSON_BYTES is refused at its header, unread;
 * - at most MAX_PREAUTH_CONNECTIONS wait for their Hello in the daemon: one more is closed at
 *   once, unanswered, and the silent ones are refused after HELLO_TIMEOUT_MS;
 * - at most MAX_ATTACH_HANDSHAKES wait in the secondary's authentication: one more is refused;
 * - refusals are logged once per host and reason (not per source port), and a resource name
 *   from the Hello is escaped in the log, so it cannot forge log lines.
 * After each flood the real primary (node a) connects and its writes land on b. The tests share
 * one cluster and run in order; each leaves a in role init, so that no connection of its own
 * competes with the test's.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { chmodSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { HELLO_TIMEOUT_MS, MAX_PREAUTH_CONNECTIONS } from "../lib/daemon.ts";
import { MAX_ATTACH_HANDSHAKES } from "../lib/secondary.ts";
import {
  decodeJson, encodeHeader, encodeJson, FrameParser, MAX_IO_BYTES, MAX_JSON_BYTES, MessageType, WIRE_VERSION,
} from "../lib/wire.ts";
import { type Cluster, createCluster } from "./cluster.ts";
import { Cleanup, makeTempDir, run, waitFor } from "./harness.ts";

const PRIMARY_IP = "127.0.0.1";
/** Long enough for a refusal after HELLO_TIMEOUT_MS on a loaded machine; no bound on speed. */
const WAIT_MS = HELLO_TIMEOUT_MS + 20_000;

const cleanup = new Cleanup();
let c: Cluster;
let port = 0;

beforeAll(async () => {
  const keyDir = await makeTempDir(cleanup, "hast-preauth-key-");
  const key = join(keyDir, "authkey");
  writeFileSync(key, "0123456789abcdef-preauth\n");
  chmodSync(key, 0o600);
  c = await createCluster(cleanup, { sizeBytes: 8 * 1024 * 1024, resourceLines: [`authkey ${key}`] });
  port = Number(/listen tcp:\/\/127\.0\.0\.2:(\d+)/.exec(readFileSync(c.configPath, "utf8"))![1]);
  await c.createBoth();
  await c.startDaemon("a");
  await c.startDaemon("b");
  await c.hast("b", ["role", "secondary", "data"]);
}, 120_000);

afterAll(() => cleanup.run(), 60_000);

interface Received {
  type: number;
  body: Record<string, unknown> | null;
}

/** A raw replication connection from the primary's address to b. */
interface Probe {
  socket: net.Socket;
  /** Frames received so far, JSON ones decoded. */
  frames: Received[];
  connected: Promise<void>;
  closed: Promise<void>;
  isClosed(): boolean;
}

const JSON_TYPES = new Set<number>([MessageType.HelloReply, MessageType.Goodbye, MessageType.AuthChallenge]);

function probe(send: Uint8Array | null = null): Probe {
  const socket = net.connect({ host: "127.0.0.2", port, localAddress: PRIMARY_IP });
  const frames: Received[] = [];
  const parser = new FrameParser((frame) =>
    frames.push({ type: frame.type, body: JSON_TYPES.has(frame.type) ? decodeJson(frame) : null }));
  let isClosed = false;
  const connected = new Promise<void>((resolve) => socket.once("connect", () => {
    if (send !== null) socket.write(send);
    resolve();
  }));
  const closed = new Promise<void>((resolve) => socket.once("close", () => {
    isClosed = true;
    resolve();
  }));
  socket.on("data", (chunk: Buffer) => parser.push(chunk));
  socket.on("error", () => {});
  return { socket, frames, connected, closed, isClosed: () => isClosed };
}

/** Waits for the first frame of `type` on `p` and returns its JSON body. */
async function frameOf(p: Probe, type: MessageType): Promise<Record<string, unknown>> {
  const found = await waitFor(`a frame of type ${type}`, () => {
    const frame = p.frames.find((f) => f.type === type);
    if (frame) return frame;
    if (p.isClosed()) throw new Error(`closed without a frame of type ${type}: ${JSON.stringify(p.frames)}`);
    return undefined;
  }, { timeoutMs: WAIT_MS, intervalMs: 20 });
  return found.body!;
}

/** A Hello for resource "data" as a primary would send it, with `fields` changed. */
function hello(fields: Record<string, unknown> = {}): Uint8Array {
  return Buffer.concat(encodeJson(MessageType.Hello, {
    protocol: WIRE_VERSION, resource: "data", resuid: "1", proposedResuid: "1", localcnt: "0", remotecnt: "0",
    datasizeBytes: 4096, extentsizeBytes: 4096, replication: "fullsync", checksum: "none", compression: "none",
    ...fields,
  }));
}

const AUTH = { auth: true, authNonce: "ab".repeat(32) };

function logOfB(): string {
  return readFileSync(c.nodes.b.log, "utf8");
}

async function waitForLog(text: string): Promise<void> {
  await waitFor(`b's log to contain ${JSON.stringify(text)}`, () => logOfB().includes(text) || undefined,
    { timeoutMs: WAIT_MS, intervalMs: 50 });
}

let round = 0;

/** a becomes primary, connects to b, and what it writes lands on b; then a goes back to init. */
async function primaryReplicates(): Promise<void> {
  await c.hast("a", ["role", "primary", "data"]);
  await c.waitStatus("a", "pair complete", (s) => s.status === "complete" && s.link === "connected");
  const payload = randomBytes(256 * 1024);
  const file = join(c.dir, `round-${round++}.bin`);
  writeFileSync(file, payload);
  await run(["nbdcopy", "--flush", file, c.uri("a")]);
  // fullsync: a answered each write after b's reply, so b has it.
  expect(Buffer.compare(Buffer.from(await c.readData("b", 0, payload.byteLength)), payload)).toBe(0);
  await c.hast("a", ["role", "init", "data"]);
}

test("a Hello whose header announces more than MAX_JSON_BYTES is refused at its header", async () => {
  // Only the header is sent: before the fix the daemon allocated the 1 MiB it announced and waited
  // for it until HELLO_TIMEOUT_MS, then refused it for sending no Hello in time.
  const header = encodeHeader({ type: MessageType.Hello, flags: 0, seq: 0, offset: 0, length: 0, error: 0 },
    MAX_IO_BYTES);
  const p = probe(header);
  const reason = `Cannot start connection: a Hello of ${MAX_IO_BYTES} bytes exceeds ${MAX_JSON_BYTES}`;
  expect(await frameOf(p, MessageType.HelloReply)).toEqual({ accepted: false, reason });
  await p.closed;
  await waitForLog(`refused connection from ${PRIMARY_IP}: ${reason}`);
}, 120_000);

test("connections waiting for their Hello are capped, the silent ones time out, the primary gets in", async () => {
  // MAX_PREAUTH_CONNECTIONS silent connections fill the daemon's room; they are accepted in the
  // order they connected, so one more made after them all connected is over the cap. Before the
  // fix it was held like the others and refused only when its Hello did not come in time.
  const silent = Array.from({ length: MAX_PREAUTH_CONNECTIONS }, () => probe());
  await Promise.all(silent.map((p) => p.connected));
  const over = probe();
  await over.closed;
  expect(over.frames).toEqual([]);
  await waitForLog(`${MAX_PREAUTH_CONNECTIONS} connections already wait for their Hello (closed at once)`);
  for (const p of silent) {
    const reply = await frameOf(p, MessageType.HelloReply);
    expect(reply).toEqual({ accepted: false, reason: `no Hello within ${HELLO_TIMEOUT_MS} ms` });
  }
  await primaryReplicates();
}, 180_000);

test("authentication handshakes in progress are capped per resource; the primary gets in after", async () => {
  // Each of these is routed to b's worker and waits there for an Auth that never comes (it
  // received the challenge). Before the fix one more was taken on too and challenged.
  const waiting = Array.from({ length: MAX_ATTACH_HANDSHAKES }, () => probe(hello(AUTH)));
  for (const p of waiting) await frameOf(p, MessageType.AuthChallenge);
  const over = probe(hello(AUTH));
  const reply = await frameOf(over, MessageType.HelloReply);
  expect(reply).toEqual({
    accepted: false, reason: `${MAX_ATTACH_HANDSHAKES} connections are already in their handshake here; try again`,
  });
  await over.closed;
  expect(over.frames.some((f) => f.type === MessageType.AuthChallenge)).toBe(false);
  await waitForLog(`${MAX_ATTACH_HANDSHAKES} connections are already in their handshake here`);
  for (const p of waiting) p.socket.destroy();
  await primaryReplicates();
}, 180_000);

test("`hast list` shows the limits on connections that have not authenticated", async () => {
  const listed = JSON.parse((await c.hast("b", ["list", "--json"])).stdout).resources[0];
  expect(listed.limits).toMatchObject({
    replicationMaxPreauthConnections: MAX_PREAUTH_CONNECTIONS, replicationHelloTimeoutMs: HELLO_TIMEOUT_MS,
    replicationMaxHelloBytes: MAX_JSON_BYTES, secondaryMaxAttachHandshakes: MAX_ATTACH_HANDSHAKES,
    controlMaxConnections: 64,
  });
});

test("a refusal repeated from new source ports is logged once per host and reason", async () => {
  // Two Hellos without authentication from two ports of one host, then one refused for another
  // reason, logged after them. Before the fix the limiter was keyed on host:port: two lines.
  const required = "authentication required: this node has an authkey and the primary sent none";
  for (let i = 0; i < 2; i++) {
    const p = probe(hello());
    expect(await frameOf(p, MessageType.HelloReply)).toMatchObject({ accepted: false, reason: expect.stringMatching(
      /^authentication required/) });
    await p.closed;
  }
  const other = probe(hello({ ...AUTH, encryption: "aes-256-gcm" }));
  expect(String((await frameOf(other, MessageType.HelloReply)).reason)).toContain("link encryption");
  await waitForLog(`refused primary from ${PRIMARY_IP}`);
  await waitFor("the later refusal logged", () =>
    logOfB().split("\n").some((line) => line.includes("refused primary") && line.includes("link encryption")) ||
    undefined, { timeoutMs: WAIT_MS, intervalMs: 50 });
  const lines = logOfB().split("\n").filter((line) => line.includes("refused primary") && line.includes(required));
  expect(lines.length).toBe(1);
}, 120_000);

test("a resource name from the Hello is escaped in the log and cannot forge a line", async () => {
  const forged = "2030-01-01T00:00:00.000Z hast[1] daemon: error: FORGED";
  const name = `x" accepted\n${forged}`;
  const p = probe(hello({ resource: name }));
  const reply = await frameOf(p, MessageType.HelloReply);
  await waitForLog(`refused connection from ${PRIMARY_IP}: unknown resource "x`);
  // Before the fix the name went into the line as it was: its newline began a line of its own.
  expect(logOfB().split("\n").filter((line) => line.startsWith(forged))).toEqual([]);
  const reason = `unknown resource ${JSON.stringify(name)}`;
  expect(reply).toEqual({ accepted: false, reason });
  expect(logOfB()).toContain(`refused connection from ${PRIMARY_IP}: ${reason}\n`);
}, 120_000);
