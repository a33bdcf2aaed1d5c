/**
 * Role commands that overlap, against a real daemon and real workers: whatever their timing, the
 * daemon ends with exactly one worker process for the resource, the one `hast list` shows, in
 * the role last asked for; after `role init` no worker is left and the export no longer answers.
 * Before the fix, two overlapping changes both spawned a worker; the one holding the disk kept
 * serving NBD untracked. The requests go straight to the control socket so that they overlap.
 */
import { describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import net from "node:net";
import { loadConfig } from "../lib/config.ts";
import { controlRequest, type ControlResponse } from "../lib/control.ts";
import { Provider } from "../lib/provider.ts";
import { type Cluster, createCluster, hastCommand } from "./cluster.ts";
import { Cleanup, run } from "./harness.ts";

const TEST_TIMEOUT_MS = 120_000;
const REQUEST_TIMEOUT_MS = 60_000;

function role(c: Cluster, name: "init" | "primary" | "secondary"): Promise<ControlResponse> {
  const request = { command: "role" as const, role: name, names: ["data"], force: false };
  return controlRequest(c.nodes.a.control, request, REQUEST_TIMEOUT_MS);
}

/** The daemon's child processes: its workers (no hooks are configured). */
async function workerPids(c: Cluster): Promise<number[]> {
  const result = await run(["pgrep", "-P", String(c.nodes.a.daemon!.pid)], { allowFailure: true });
  return result.stdout.split("\n").filter((line) => line !== "").map(Number);
}

async function listRow(c: Cluster): Promise<Record<string, unknown>> {
  const result = await c.hast("a", ["list", "--json"]);
  return JSON.parse(result.stdout).resources[0];
}

/** Exactly one worker runs, `hast list` shows its pid, in `expected` role. */
async function expectOneWorker(c: Cluster, expected: string): Promise<void> {
  const row = await listRow(c);
  expect(row.role).toBe(expected);
  expect(await workerPids(c)).toEqual([row.workerPid as number]);
}

/** Whether something accepts connections on the export's Unix socket. */
function exportAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(path);
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

describe("overlapping role commands on a real daemon", () => {
  test("leave one tracked worker in the last role asked for; role init leaves none", async () => {
    const cleanup = new Cleanup();
    try {
      const c = await createCluster(cleanup);
      await c.hast("a", ["create", "data"]);
      await c.startDaemon("a");
      expect((await role(c, "secondary")).ok).toBe(true);
      // Both arrive while the secondary worker stops.
      const both = await Promise.all([role(c, "primary"), role(c, "primary")]);
      expect(both).toEqual([{ ok: true, value: null }, { ok: true, value: null }]);
      await expectOneWorker(c, "primary");
      expect(await exportAnswers(c.nodes.a.socket)).toBe(true);
      // `primary` arrives while `secondary` stops the primary worker: it must not count as done.
      const toSecondary = role(c, "secondary");
      await Bun.sleep(20);
      const toPrimary = role(c, "primary");
      expect(await toSecondary).toEqual({ ok: true, value: null });
      expect(await toPrimary).toEqual({ ok: true, value: null });
      await expectOneWorker(c, "primary");
      expect(await role(c, "init")).toEqual({ ok: true, value: null });
      expect(await workerPids(c)).toEqual([]);
      const row = await listRow(c);
      expect(row.status).toBe("stopped");
      expect(row.workerPid).toBeNull();
      expect(await exportAnswers(c.nodes.a.socket)).toBe(false);
    } finally {
      await cleanup.run();
    }
  }, TEST_TIMEOUT_MS);
});

describe("a worker whose daemon dies while the worker starts", () => {
  // Found by review: the worker ignored the daemon's disconnect until its start had finished,
  // then ran on unsupervised: a primary serving NBD and holding the disk's lock, which no daemon
  // could stop and which made the next daemon's `role primary` fail (in use).
  test("stops once started: the export closes, the disk is unlocked, the worker exits", async () => {
    const cleanup = new Cleanup();
    try {
      const c = await createCluster(cleanup);
      await c.hast("a", ["create", "data"]);
      const config = loadConfig(c.configPath, { node: "a" }).resources[0]!;
      const [command, ...args] = hastCommand();
      const worker = spawn(command!, [...args, "__worker"], { stdio: ["ignore", "inherit", "inherit", "ipc"] });
      const exited = new Promise<number | null>((resolve) => worker.on("exit", (code) => resolve(code)));
      cleanup.add("kill the worker", () => void worker.kill("SIGKILL"));
      worker.send({ type: "start", role: "primary", config, force: false, debug: 0 });
      await Bun.sleep(5); // well before the start has opened the disk and the export
      worker.disconnect(); // what the worker sees when its daemon is SIGKILLed
      const code = await Promise.race([exited, Bun.sleep(15_000).then(() => "still running")]);
      expect(code).toBe(0);
      expect(await exportAnswers(c.nodes.a.socket)).toBe(false);
      Provider.open(c.nodes.a.image, { exclusive: true }).close();
    } finally {
      await cleanup.run();
    }
  }, TEST_TIMEOUT_MS);
});
