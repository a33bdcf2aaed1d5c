/**
 * What the benchmark measures: the reference NBD server (nbdkit's file plugin) and hast set-ups
 * (a primary on 127.0.0.1, optionally a secondary on 127.0.0.2), each in its own directory with
 * file-backed disks, a config, daemons started with `hast serve -F`, and its NBD export on a Unix
 * socket. Every process is registered with {@link Processes}, so the caller stops it by PID.
 */
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { commandLine, type Processes, runCommand, type Started, waitFor } from "./proc.ts";

/** How long daemons, roles and connections may take to come up. */
const SETUP_TIMEOUT_MS = 60_000;
/** How long a set-up may take to drain in-flight replication after a workload. */
const SETTLE_TIMEOUT_MS = 120_000;
/** In the command line of hast's resource worker processes (`hast __worker`). */
const WORKER_MARKER = "__worker";

/** Resident set of a process, from /proc/PID/status. */
export interface MemoryStats {
  rssBytes: number;
  /** VmHWM: the peak resident set since the process started. */
  hwmBytes: number;
}

/** Anything fio can be pointed at. */
export interface Target {
  /** Short name used in the table. */
  label: string;
  uri: string;
  sizeBytes: number;
  /** Waits until the target is idle (replication drained) before the next measurement. */
  settle(): Promise<void>;
}

/** Starts nbdkit's file plugin on a fresh file of `sizeBytes` in `dir`; returns the target. */
export async function startReference(
  processes: Processes, dir: string, sizeBytes: number,
): Promise<Target> {
  const file = join(dir, "ref.img");
  const socket = join(dir, "ref.sock");
  writeFileSync(file, "");
  await runCommand(["truncate", "-s", String(sizeBytes), file]);
  const logPath = join(dir, "ref.log");
  const argv = ["nbdkit", "--foreground", "--unix", socket, "--pidfile", join(dir, "ref.pid"),
    "file", file];
  const started = processes.spawn("nbdkit", argv, { logPath });
  const uri = `nbd+unix:///?socket=${socket}`;
  await waitFor("nbdkit to serve", async () => {
    if (started.hasExited()) {
      throw new Error(`Cannot start nbdkit: ${readFileSync(logPath, "utf8")}`);
    }
    if (!existsSync(socket)) return undefined;
    const r = await runCommand(["nbdinfo", "--size", uri], { allowFailure: true });
    return r.code === 0 ? true : undefined;
  }, { timeoutMs: SETUP_TIMEOUT_MS });
  return { label: "reference (nbdkit file)", uri, sizeBytes, settle: async () => {} };
}

/** Role of node b in a {@link HastSetup}. */
export type SecondaryMode = "none" | "secondary" | "init";

/** Options of a {@link HastSetup}. */
export interface HastSetupOptions {
  label: string;
  dir: string;
  /** argv prefix that runs hast. */
  hast: string[];
  port: number;
  sizeBytes: number;
  /** "none": no daemon b (remote unreachable); "init": daemon b runs, resource stopped there. */
  secondary: SecondaryMode;
  /** Lines inside the resource section, e.g. "replication async". */
  resourceLines: string[];
  /**
   * Write the disk images full of zeros instead of leaving them sparse, so that the first write
   * to a block does not pay for file-system allocation (a block device would not).
   */
  preallocate?: boolean;
  /** Give both nodes the same fresh `authkey` (for `encryption aes-256-gcm` in resourceLines). */
  authkey?: boolean;
}

type NodeName = "a" | "b";

/** A hast primary (node a) with an optional secondary (node b) on loopback. */
export class HastSetup implements Target {
  readonly label: string;
  readonly uri: string;
  sizeBytes = 0;
  readonly options: HastSetupOptions;
  readonly #processes: Processes;
  readonly #daemons = new Map<NodeName, Started>();
  #workerPid = 0;
  #workerPidChanges = 0;

  constructor(processes: Processes, options: HastSetupOptions) {
    this.#processes = processes;
    this.options = options;
    this.label = options.label;
    this.uri = `nbd+unix:///?socket=${this.#path("a.sock")}`;
  }

  /** Creates disks, config and metadata, starts the daemons and assigns roles. */
  async start(): Promise<void> {
    const nodes: NodeName[] = this.options.secondary === "none" ? ["a"] : ["a", "b"];
    for (const node of nodes) {
      await this.#createImage(this.#path(`${node}.img`));
    }
    if (this.options.authkey) {
      writeFileSync(this.#path("authkey"), randomBytes(32).toString("base64") + "\n", { mode: 0o600 });
    }
    writeFileSync(this.#path("hast.conf"), this.#config());
    for (const node of nodes) await this.hast(node, ["create", "data"]);
    for (const node of nodes) await this.#startDaemon(node);
    if (this.options.secondary === "secondary") await this.hast("b", ["role", "secondary", "data"]);
    await this.hast("a", ["role", "primary", "data"]);
    const wanted = this.options.secondary === "secondary" ? "complete" : "degraded";
    await this.waitStatus(`status ${wanted}`, (s) => s.status === wanted, SETUP_TIMEOUT_MS);
    const list = await this.list("a");
    this.sizeBytes = list.worker.metadata.datasizeBytes;
    this.#workerPid = list.workerPid;
    this.#processes.adopt(this.#workerPid, WORKER_MARKER);
    if (this.options.secondary !== "none") {
      const pid = (await this.list("b")).workerPid;
      if (typeof pid === "number" && pid > 0) this.#processes.adopt(pid, WORKER_MARKER);
    }
  }

  /** Runs `hast -c CONF --node NODE args…`. */
  hast(node: NodeName, args: string[], allowFailure = false) {
    const argv = [...this.options.hast, "-c", this.#path("hast.conf"), "--node", node, ...args];
    return runCommand(argv, { allowFailure });
  }

  /** `hast list --json` of the resource on `node`. */
  async list(node: NodeName): Promise<Record<string, any>> {
    return JSON.parse((await this.hast(node, ["list", "--json"])).stdout).resources[0];
  }

  /** `hast status --json` of the resource on the primary. */
  async status(): Promise<Record<string, any>> {
    return JSON.parse((await this.hast("a", ["status", "--json"])).stdout).resources[0];
  }

  /** Polls the primary's status until `predicate` holds; returns that status. */
  async waitStatus(
    what: string,
    predicate: (s: Record<string, any>) => boolean,
    timeoutMs: number,
    intervalMs = 100,
  ): Promise<Record<string, any>> {
    let last: Record<string, any> = {};
    try {
      return await waitFor(what, async () => {
        last = await this.status();
        return predicate(last) ? last : undefined;
      }, { timeoutMs, intervalMs });
    } catch (error) {
      const state = JSON.stringify(last);
      throw new Error(`${this.label}: ${(error as Error).message}; last status ${state}`);
    }
  }

  /** Waits until the primary has no replication in flight and is complete (or degraded). */
  async settle(): Promise<void> {
    const wanted = this.options.secondary === "secondary" ? "complete" : "degraded";
    let last: Record<string, any> = {};
    try {
      await waitFor("replication to drain", async () => {
        last = await this.list("a");
        this.#noteWorkerPid(last.workerPid);
        const idle = last.status === wanted && last.worker?.remoteInFlight === 0;
        return idle ? true : undefined;
      }, { timeoutMs: SETTLE_TIMEOUT_MS, intervalMs: 100 });
    } catch (error) {
      const state = JSON.stringify(last).slice(0, 500);
      throw new Error(`${this.label}: ${(error as Error).message}; last: ${state}`);
    }
  }

  /** Memory of the primary's resource worker (null when it is gone). */
  workerMemory(): MemoryStats | null {
    return readMemory(this.#workerPid);
  }

  /** How many times the primary's worker PID changed since start (a restarted worker). */
  get workerRestarts(): number {
    return this.#workerPidChanges;
  }

  /** Warning and error lines of both daemons' logs, grouped by message with counts. */
  logFindings(): Map<string, number> {
    const found = new Map<string, number>();
    for (const node of ["a", "b"] as const) {
      const path = this.#path(`${node}.log`);
      if (!existsSync(path)) continue;
      for (const line of readFileSync(path, "utf8").split("\n")) {
        const match = /^\S+ hast\[\d+\] (.*?): (warn|error): (.*)$/.exec(line);
        if (match === null) continue;
        const key = `${node} ${match[2]}: ${match[3].replace(/\d+/g, "N")}`;
        found.set(key, (found.get(key) ?? 0) + 1);
      }
    }
    return found;
  }

  /** Stops the daemons of this set-up (SIGTERM, then SIGKILL). */
  async stop(): Promise<void> {
    for (const daemon of this.#daemons.values()) await this.#processes.stop(daemon);
    this.#daemons.clear();
  }

  /** Path of a file in this set-up's directory. */
  #path(name: string): string {
    return join(this.options.dir, name);
  }

  #noteWorkerPid(pid: unknown): void {
    if (typeof pid !== "number" || pid === this.#workerPid) return;
    this.#workerPidChanges += 1;
    this.#workerPid = pid;
    this.#processes.adopt(pid, WORKER_MARKER);
  }

  async #startDaemon(node: NodeName): Promise<void> {
    const argv = [...this.options.hast, "-c", this.#path("hast.conf"), "--node", node,
      "serve", "-F"];
    const logPath = this.#path(`${node}.log`);
    const daemon = this.#processes.spawn(`hast ${node} (${this.label})`, argv, { logPath });
    this.#daemons.set(node, daemon);
    await waitFor(`daemon ${node} to answer`, async () => {
      if (daemon.hasExited()) {
        throw new Error(`Cannot start daemon ${node}: ${readFileSync(logPath, "utf8")}`);
      }
      const r = await this.hast(node, ["status", "--json"], true);
      return r.code === 0 ? true : undefined;
    }, { timeoutMs: SETUP_TIMEOUT_MS });
  }

  async #createImage(image: string): Promise<void> {
    const sizeBytes = this.options.sizeBytes;
    if (this.options.preallocate !== true) {
      writeFileSync(image, "");
      await runCommand(["truncate", "-s", String(sizeBytes), image]);
      return;
    }
    const blockBytes = 1 << 20;
    if (sizeBytes % blockBytes !== 0) {
      throw new RangeError(`Cannot preallocate: size "${sizeBytes}" is not a multiple of 1 MiB`);
    }
    await runCommand(["dd", "if=/dev/zero", `of=${image}`, `bs=${blockBytes}`,
      `count=${sizeBytes / blockBytes}`, "conv=fsync", "status=none"], { timeoutMs: 600_000 });
  }

  #config(): string {
    const ip: Record<NodeName, string> = { a: "127.0.0.1", b: "127.0.0.2" };
    const port = this.options.port;
    const lines = ["timeout 5"];
    for (const node of ["a", "b"] as const) {
      lines.push(`on ${node} {`, `  control uds://${this.#path(`${node}.ctl`)}`,
        `  pidfile ${this.#path(`${node}.pid`)}`, `  listen tcp://${ip[node]}:${port}`, "}");
    }
    lines.push("resource data {", ...this.options.resourceLines.map((line) => `  ${line}`));
    if (this.options.authkey) lines.push(`  authkey ${this.#path("authkey")}`);
    for (const node of ["a", "b"] as const) {
      const other = node === "a" ? "b" : "a";
      lines.push(`  on ${node} {`, `    local ${this.#path(`${node}.img`)}`,
        `    remote tcp://${ip[other]}:${port}`, `    source tcp://${ip[node]}`,
        `    export uds://${this.#path(`${node}.sock`)}`, "  }");
    }
    lines.push("}");
    return lines.join("\n") + "\n";
  }
}

/**
 * VmRSS and VmHWM of the resource worker `pid`, or null when it is not running: a PID whose
 * command line is not a `hast __worker` (the worker exited and the PID was reused, or the daemon's
 * PID was passed) is not measured.
 */
export function readMemory(pid: number): MemoryStats | null {
  if (!commandLine(pid).includes(WORKER_MARKER)) return null;
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/status`, "utf8");
  } catch {
    return null;
  }
  const field = (name: string): number => {
    const match = new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text);
    return match === null ? Number.NaN : Number(match[1]) * 1024;
  };
  return { rssBytes: field("VmRSS"), hwmBytes: field("VmHWM") };
}
