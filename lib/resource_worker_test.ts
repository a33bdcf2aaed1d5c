import { expect, test } from "bun:test";
import type { Socket } from "node:net";
import { parseConfig, type ResourceConfig } from "./config.ts";
import type { Hello } from "./handshake.ts";
import {
  type FromWorker, jsHeapBytesOf, pipelineChangeOf, type Running, type StartMessage, type ToWorker,
  WorkerSession,
} from "./resource_worker.ts";

// Proves the heap figure of `hast list` stays meaningful in both cases Bun shows: external
// included in heapUsed (ordinary ArrayBuffers) and not (a fresh SharedArrayBuffer).
test("jsHeapBytes: heapUsed less external when it includes it, else heapUsed", () => {
  expect(jsHeapBytesOf({ heapUsed: 42_087_210, external: 41_958_186 })).toBe(129_024);
  expect(jsHeapBytesOf({ heapUsed: 546_816, external: 35_651_680 })).toBe(546_816);
  expect(jsHeapBytesOf({ heapUsed: 1_000, external: 1_000 })).toBe(1_000);
  // And on this process, with a fresh SharedArrayBuffer like the codec pipeline's slot pool:
  const slots = new SharedArrayBuffer(34 << 20);
  expect(jsHeapBytesOf(process.memoryUsage())).toBeGreaterThan(0);
  expect(slots.byteLength).toBe(34 << 20);
});

function resourceConfig(extra = ""): ResourceConfig {
  // Port 9, not the default: the default listen (0.0.0.0:8457) would make 127.0.0.2:8457 this
  // node itself, which the config refuses; nothing here connects to it.
  const text = `resource r {\n  local /dev/null\n  ${extra}\n  on a { remote 127.0.0.2:9 }\n}\n`;
  return parseConfig(text, "test.conf", { node: "a" }).resources[0]!;
}

/** A primary that records what the worker asks of it. */
class FakePrimary {
  readonly rates: number[] = [];
  readonly reconfigured: ResourceConfig[] = [];
  verifies = 0;
  constructor(readonly config: ResourceConfig) {}
  startVerify(): string | null {
    this.verifies++;
    return null;
  }
  setSyncRate(bytesPerSecond: number): void {
    this.rates.push(bytesPerSecond);
  }
  reconfigure(next: ResourceConfig): void {
    Object.assign(this.config, next);
    this.reconfigured.push(next);
  }
  status(): Record<string, unknown> {
    return { status: "complete", link: "connected" };
  }
}

/**
 * A WorkerSession whose start waits until the test lets it finish (`finishStart`), with the
 * messages it sent, its exit codes and log lines.
 */
function session(options: { role?: "primary" | "secondary" } = {}) {
  const sent: FromWorker[] = [];
  const exits: number[] = [];
  const logs: string[] = [];
  const attached: Hello[] = [];
  let finish!: () => void;
  const gate = new Promise<void>((resolve) => (finish = resolve));
  let primary: FakePrimary | null = null;
  let starts = 0;
  let stops = 0;
  const worker = new WorkerSession({
    send: (message) => sent.push(message),
    exit: (code) => exits.push(code),
    start: async (message: StartMessage) => {
      starts++;
      await gate;
      primary = new FakePrimary(message.config);
      const secondary = { reconfigure: () => {} };
      return {
        role: message.role, provider: {}, meta: { metadata: {} }, pipeline: null,
        ...(message.role === "primary" ? { primary } : { secondary }),
        stop: async () => void stops++,
      } as unknown as Running;
    },
    attach: async (_secondary, _handle, hello) => void attached.push(hello),
    makeLog: (component) => (level, text) => logs.push(`${component} ${level}: ${text}`),
  });
  const config = resourceConfig("checksum crc32");
  const start: ToWorker = { type: "start", role: options.role ?? "primary", config, force: false, debug: 0 };
  const replies = () => sent.filter((m) => m.type === "reply");
  return {
    worker, sent, exits, logs, attached, start, replies,
    finishStart: finish,
    get primary() {
      return primary;
    },
    get starts() {
      return starts;
    },
    get stops() {
      return stops;
    },
  };
}

// Found by review: a `hast verify` that reached a worker still starting (a crash or reload restart
// of a primary) was answered "this node is not primary", exit 69, and a status made `hast
// status` show the resource "failed". Proves both now say it is starting, the verify with 75
// (try again), and that once the start finished the same requests reach the primary.
test("a verify or status while the worker starts: 'starting' (exit 75), then the primary's", async () => {
  const s = session();
  const started = s.worker.handle(s.start);
  await s.worker.handle({ type: "verify", id: 1, bytesPerSecond: 0 });
  await s.worker.handle({ type: "status", id: 2 });
  expect(s.replies()).toEqual([
    { type: "reply", id: 1, value: { refusal: "its worker is still starting; try again once it runs", exitCode: 75 } },
    { type: "reply", id: 2, value: { status: "starting" } },
  ]);
  s.finishStart();
  await started;
  expect(s.sent.at(-1)).toEqual({ type: "ready", pid: process.pid });
  await s.worker.handle({ type: "verify", id: 3, bytesPerSecond: 0 });
  expect(s.replies().at(-1)).toEqual({ type: "reply", id: 3, value: { refusal: null, exitCode: 69 } });
  expect(s.primary!.verifies).toBe(1);
  await s.worker.handle({ type: "status", id: 4 });
  const status = s.replies().at(-1)!.value as Record<string, unknown>;
  expect([status.role, status.status]).toEqual(["primary", "complete"]);
});

// Found by review: `hast syncrate` and a reload (reconfigure) that reached a starting worker were
// dropped (the daemon's reply said done), so the role ran with the old rate and settings. Proves
// both reach the role once it runs.
test("a syncrate and a reconfigure while the worker starts reach the role once it runs", async () => {
  const s = session();
  const started = s.worker.handle(s.start);
  const next = { ...resourceConfig("checksum crc32"), timeoutSeconds: 7 };
  await s.worker.handle({ type: "reconfigure", config: next });
  // After the reload: a reload replaces the rate `hast syncrate` set (README).
  await s.worker.handle({ type: "syncrate", id: 1, bytesPerSecond: 12345 });
  s.finishStart();
  await started;
  // The rate went into the settings the primary started with; the reload was applied after it.
  expect(s.primary!.config.syncRateBytesPerSecond).toBe(12345);
  expect(s.primary!.reconfigured).toEqual([next]);
  expect(s.primary!.config.timeoutSeconds).toBe(7);
  await s.worker.handle({ type: "syncrate", id: 2, bytesPerSecond: 999 });
  expect(s.primary!.rates).toEqual([999]);
});

// Proves a second start (a daemon bug) does not open the disk again: before, its failure (in use)
// made the worker report "failed" and exit, ending the role that ran.
test("a second start message is ignored and logged; the running role goes on", async () => {
  const s = session();
  const started = s.worker.handle(s.start);
  s.finishStart();
  await started;
  await s.worker.handle(s.start);
  expect(s.starts).toBe(1);
  expect(s.exits).toEqual([]);
  expect(s.sent.filter((m) => m.type !== "reply")).toEqual([{ type: "ready", pid: process.pid }]);
  expect(s.logs.some((l) => l.includes("error: ignoring a start message"))).toBe(true);
});

// Proves a request of a type this worker does not know is answered (null) and logged, so that
// the daemon does not wait for it until its timeout.
test("a message of unknown type is answered null and logged", async () => {
  const s = session();
  await s.worker.handle({ type: "frobnicate", id: 9 } as unknown as ToWorker);
  expect(s.replies()).toEqual([{ type: "reply", id: 9, value: null }]);
  expect(s.logs.some((l) => l.includes('ignoring a message of unknown type "frobnicate"'))).toBe(true);
});

// Proves a stop that arrives while the worker starts waits for the start, stops what it
// started, exits 0, and never says ready; a status meanwhile says "stopping".
test("a stop during the start: the role is stopped once started, exit 0, no ready", async () => {
  const s = session();
  const started = s.worker.handle(s.start);
  const stopped = s.worker.handle({ type: "stop" });
  await s.worker.handle({ type: "status", id: 1 });
  expect(s.replies()).toEqual([{ type: "reply", id: 1, value: { status: "stopping" } }]);
  s.finishStart();
  await Promise.all([started, stopped]);
  expect(s.stops).toBe(1);
  expect(s.exits).toEqual([0]);
  expect(s.sent.some((m) => m.type === "ready")).toBe(false);
});

// Found by review: a primary's connection that reached a secondary worker still starting (a
// restart) was closed unanswered. Proves it is handed to the secondary once the start finished.
test("a primary's connection that arrives during the start is attached once the secondary runs", async () => {
  const s = session({ role: "secondary" });
  const started = s.worker.handle(s.start);
  let destroyed = false;
  const handle = { destroy: () => void (destroyed = true) } as unknown as Socket;
  const hello = { resource: "r" } as Hello;
  const peer = s.worker.handle({ type: "peer", hello }, handle);
  s.finishStart();
  await Promise.all([started, peer]);
  expect(destroyed).toBe(false);
  expect(s.attached).toEqual([hello]);
});

// Proves a reload that changes whether codec threads run says, in the log and in `hast list`,
// that it waits for the next start (the threads are started and stopped with the role).
test("a reloaded pipeline setting is reported pending until the next start", async () => {
  const s = session();
  const started = s.worker.handle(s.start);
  s.finishStart();
  await started;
  // Started with checksum crc32 and pipeline on/auto per host: the fake runs no threads.
  await s.worker.handle({ type: "reconfigure", config: resourceConfig("checksum crc32\n  pipeline on") });
  expect(s.logs.some((l) => l.includes("pipeline: the codec threads start at the next role change"))).toBe(true);
  await s.worker.handle({ type: "status", id: 1 });
  const status = s.replies().at(-1)!.value as Record<string, unknown>;
  expect(status.pipelineChange).toBe("the codec threads start at the next role change or restart (none run now)");
  const running = { pipeline: {} } as unknown as Running;
  expect(pipelineChangeOf(running, resourceConfig("checksum crc32\n  pipeline off"))).toMatch(/threads stop at/);
  expect(pipelineChangeOf(running, resourceConfig("checksum none\n  pipeline on"))).toMatch(/threads stop at/);
  expect(pipelineChangeOf(running, resourceConfig("checksum sha256\n  pipeline on"))).toBeNull();
});
