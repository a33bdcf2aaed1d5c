/**
 * `hast verify --wait` (lib/cli.ts) against a daemon whose resource worker is a fake that runs a
 * verify that never ends: when the worker crashes and the daemon restarts it in the same role,
 * the command must end (the verify it started is gone) instead of polling forever (found by
 * review).
 */
import { expect, test } from "bun:test";
import type { ChildProcess } from "node:child_process";
import { EventEmitter } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCli } from "../lib/cli.ts";
import { controlRequest } from "../lib/control.ts";
import { Daemon, WORKER_RESTART_MS } from "../lib/daemon.ts";
import { EX_TEMPFAIL } from "../lib/exit_codes.ts";
import type { ToWorker } from "../lib/resource_worker.ts";

/** A worker that starts at once in any role; a verify it is asked for runs until it exits. */
class VerifyingWorker extends EventEmitter {
  static next = 920_000;
  readonly pid = VerifyingWorker.next++;
  connected = true;
  verifyStartedAt: string | null = null;
  /** Status requests answered while the verify ran. */
  polledDuringVerify = 0;

  send(message: ToWorker): boolean {
    setTimeout(() => {
      if (!this.connected) return;
      if (message.type === "start") return this.emit("message", { type: "ready", pid: this.pid });
      if (message.type === "stop") return this.kill();
      if (!("id" in message)) return;
      let value: unknown = null;
      if (message.type === "verify") {
        this.verifyStartedAt = new Date().toISOString();
        value = { refusal: null };
      } else if (message.type === "status") {
        if (this.verifyStartedAt !== null) this.polledDuringVerify++;
        const verify = this.verifyStartedAt === null ? null : {
          state: "running", checkedBytes: 0, skippedBytes: 0, totalBytes: 1, startedAt: this.verifyStartedAt,
        };
        value = { status: "complete", verify };
      }
      this.emit("message", { type: "reply", id: message.id, value });
    }, 1);
    return true;
  }

  kill(): boolean {
    if (!this.connected) return true;
    this.connected = false;
    this.emit("exit", 1, null);
    return true;
  }
}

async function until(condition: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await Bun.sleep(20);
  }
}

/** A daemon serving resources `names` (node a) whose workers are VerifyingWorkers; stop() cleans up. */
async function startDaemon(prefix: string, names: string[]) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const conf = join(dir, "hast.conf");
  const resource = (name: string) => [
    `resource ${name} {`, `  local ${join(dir, `${name}.img`)}`, `  export uds://${join(dir, `${name}.sock`)}`,
    "  on a { remote 127.0.0.2 }", "}",
  ];
  writeFileSync(conf, [
    `control uds://${join(dir, "ctl.sock")}`, `pidfile ${join(dir, "hast.pid")}`, "listen tcp://127.0.0.1:0",
    ...names.flatMap(resource), "",
  ].join("\n"));
  const workers: VerifyingWorker[] = [];
  const daemon = new Daemon({
    configPath: conf, node: "a", debug: 0, signals: false,
    spawnWorker: () => {
      const worker = new VerifyingWorker();
      workers.push(worker);
      return worker as unknown as ChildProcess;
    },
    exit: () => {},
  });
  await daemon.start();
  const stop = async () => {
    await daemon.shutdown("test end");
    for (const worker of workers) worker.kill();
    rmSync(dir, { recursive: true, force: true });
  };
  return { conf, control: join(dir, "ctl.sock"), workers, stop };
}

test("`verify --wait` ends when the worker running the verify crashed and was restarted", async () => {
  const { conf, control, workers, stop } = await startDaemon("hast-verify-wait-", ["r"]);
  try {
    const role = await controlRequest(control, { command: "role", role: "primary", names: ["r"] });
    expect(role.ok).toBe(true);
    let stderr = "";
    const write = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((text: string) => {
      stderr += text;
      return true;
    }) as typeof process.stderr.write;
    const cli = runCli(["-c", conf, "--node", "a", "verify", "--wait", "r"]).finally(() => {
      process.stderr.write = write;
    });
    try {
      await until(() => (workers[0]?.polledDuringVerify ?? 0) > 0, "the command to see the verify running");
      workers[0]!.kill(); // a crash; the daemon restarts the worker in its role
      await until(() => workers.length === 2, "the daemon to restart the worker", WORKER_RESTART_MS + 10_000);
      const outcome = await Promise.race([cli, Bun.sleep(5_000).then(() => "still waiting")]);
      expect(outcome).toBe(EX_TEMPFAIL);
    } finally {
      process.stderr.write = write; // also if the command never ends
    }
    expect(stderr).toContain('Cannot verify "r": the verify this command started is gone');
  } finally {
    await stop();
  }
});

test("a verify of several resources names those it could not start and those it started", async () => {
  const { control, workers, stop } = await startDaemon("hast-verify-some-", ["r", "s"]);
  try {
    expect((await controlRequest(control, { command: "role", role: "primary", names: ["r"] })).ok).toBe(true);
    const answer = await controlRequest(control, { command: "verify", names: ["r", "s"] });
    expect(answer).toMatchObject({ ok: false });
    const error = (answer as { error: string }).error;
    expect(error).toContain('Cannot verify "s": it is not primary here (role init)');
    expect(error).toContain("verify started on r all the same");
    expect(workers[0]!.verifyStartedAt).not.toBeNull();
  } finally {
    await stop();
  }
});
