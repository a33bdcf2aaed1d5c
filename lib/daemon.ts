/**
 * `hast serve`: the daemon (HAST's hastd). Owns the control socket, the
 * replication listen sockets and the configuration; runs one worker process
 * per active resource (spec §11) and restarts a worker that crashes.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { lookup } from "node:dns/promises";
import { chmodSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { dirname } from "node:path";
import { formatAddress, loadConfig, type NodeConfig, type ResourceConfig } from "./config.ts";
import { controlRequest, controlServer, type ControlRequest, type ControlResponse } from "./control.ts";
import { parseHello, type Hello } from "./handshake.ts";
import { EX_UNAVAILABLE } from "./exit_codes.ts";
import { execHooks } from "./hooks.ts";
import { makeLogger, REFUSAL_LOG_INTERVAL_MS, RepeatLimiter, type Logger } from "./log.ts";
import type { FromWorker, ToWorker, WorkerRole } from "./resource_worker.ts";
import { encodeJson, FrameParser, MessageType, ProtocolError } from "./wire.ts";
import { describeResource } from "./status.ts";

export type Role = "init" | WorkerRole;

export interface DaemonOptions {
  configPath: string;
  node?: string;
  debug: number;
  pidfile?: string;
}

/** A worker that exits on its own is restarted after this delay. */
export const WORKER_RESTART_MS = 1000;
export const WORKER_RESTART_MAX_MS = 30_000;
/** How long a worker may take to stop before it is killed. */
export const WORKER_STOP_MS = 30_000;
/** Time allowed for a connecting primary to send its Hello. */
export const HELLO_TIMEOUT_MS = 10_000;

interface Failure {
  message: string;
  exitCode: number;
}

interface Slot {
  config: ResourceConfig;
  role: Role;
  child: ChildProcess | null;
  pending: Map<number, (value: unknown) => void>;
  stopping: boolean;
  lastError: string;
}

/**
 * Bun's allocator (mimalloc) hands freed memory back to the kernel, and every page it later
 * reuses must be faulted in again. On this VM a page fault costs about 18 µs (bench/RESULTS.md:
 * touching 256 MiB of fresh memory, 65,590 faults, 17–19 µs each), about 20 times a bare-metal
 * fault. The purge delay is not what decides it: Bun purges at its collections whatever the
 * delay, so under 4 KiB QD32 writes a worker made 900–1,050 madvise(MADV_DONTNEED) calls per
 * 5 s with a delay of 1 s, 10 s and 100 s alike, and about 165 with purging off (strace). With
 * purging off, a worker took half the page faults, and 4 KiB QD32 writes with a secondary ran
 * 30–60% faster (memsync 6,650–7,450 → 9,750–12,400 IOPS; async 5,900–7,150 → 7,950–10,450).
 * The cost: freed memory is kept for reuse, never returned, so RSS stays at its high-water
 * mark. It is bounded, because every buffer and queue has a limit: over nine rounds of the four
 * bench workloads, a memsync primary's RSS levelled off at 330 MB (with purging at 1 s, it peaked
 * at 230 MB and fell back between loads); in the full bench, memsync and async primaries peaked
 * at about 570 MiB (240 and 330 before). An operator's own MIMALLOC_PURGE_DELAY wins.
 */
export const WORKER_MIMALLOC_PURGE_DELAY = "-1";

/** The environment a worker starts with: the daemon's, plus the purge setting unless it has one. */
export function workerEnv(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const purgeDelay = env.MIMALLOC_PURGE_DELAY ?? WORKER_MIMALLOC_PURGE_DELAY;
  return { ...env, MIMALLOC_PURGE_DELAY: purgeDelay };
}

/** The command that starts a worker: the same executable (compiled or `bun main.ts`). */
export function selfCommand(args: string[]): { command: string; args: string[] } {
  const compiled = Bun.main.startsWith("/$bunfs");
  return { command: process.execPath, args: compiled ? args : [Bun.main, ...args] };
}

export class Daemon {
  private config: NodeConfig;
  private readonly slots = new Map<string, Slot>();
  private readonly log: Logger;
  private control: net.Server | null = null;
  private listeners: net.Server[] = [];
  /** Refused replication connections, logged once a minute per peer and reason. */
  private readonly refusals = new RepeatLimiter(REFUSAL_LOG_INTERVAL_MS);
  private nextRequestId = 1;
  private shuttingDown = false;

  constructor(private readonly options: DaemonOptions) {
    this.log = makeLogger("daemon", options.debug);
    this.config = loadConfig(options.configPath, { node: options.node });
    for (const resource of this.config.resources) this.slots.set(resource.resource, newSlot(resource));
  }

  get pidfile(): string {
    return this.options.pidfile ?? this.config.pidfile;
  }

  /** Binds the control and listen sockets and writes the pidfile. */
  async start(): Promise<void> {
    await this.openControl();
    for (const address of this.config.listen) await this.openListener(address);
    if (this.listeners.length === 0 && this.config.listen.length > 0) {
      throw new Error("Cannot listen: no listen address could be bound");
    }
    mkdirSync(dirname(this.pidfile), { recursive: true });
    writeFileSync(this.pidfile, `${process.pid}\n`);
    process.on("SIGTERM", () => void this.shutdown("SIGTERM"));
    process.on("SIGINT", () => void this.shutdown("SIGINT"));
    process.on("SIGHUP", () => void this.reload());
    this.log("info", `serving ${this.slots.size} resources as node "${this.config.node}"`);
  }

  private async openControl(): Promise<void> {
    const control = this.config.control;
    if (control.kind !== "unix") throw new Error("Cannot serve control: only uds:// control addresses are supported");
    const alive = await controlRequest(control.path, { command: "ping" }, 2000).then(() => true, () => false);
    if (alive) {
      const error = new Error(`Cannot start: a daemon already answers on "${control.path}"`);
      throw Object.assign(error, { exitCode: 75 });
    }
    mkdirSync(dirname(control.path), { recursive: true });
    rmSync(control.path, { force: true });
    const server = controlServer((request) => this.handle(request), this.log);
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(control.path, () => resolve());
    });
    chmodSync(control.path, 0o600);
    this.control = server;
  }

  private async openListener(address: NodeConfig["listen"][number]): Promise<void> {
    const server = net.createServer({ pauseOnConnect: false }, (socket) => this.onPeer(socket));
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen({ host: address.host, port: address.port, ipv6Only: address.family === "tcp6" }, () => resolve());
      });
      this.listeners.push(server);
      this.log("info", `listening on ${formatAddress(address)}`);
    } catch (error) {
      this.log("warn", `cannot listen on ${formatAddress(address)}: ${(error as Error).message}`);
    }
  }

  // ---- incoming replication connections -------------------------------------

  /** Reads the Hello, checks resource, role and source address, then hands the socket over. */
  private onPeer(socket: net.Socket): void {
    const timer = setTimeout(() => refuse("no Hello in time"), HELLO_TIMEOUT_MS);
    const refuse = (reason: string) => {
      clearTimeout(timer);
      // A primary retries every RECONNECT_INTERVAL_MS: one line per peer and reason per minute.
      const line = this.refusals.pass(`${socket.remoteAddress} ${reason}`,
        `refused connection from ${socket.remoteAddress}: ${reason}`);
      if (line !== null) this.log("warn", line);
      if (!socket.destroyed) socket.end(Buffer.concat(encodeJson(MessageType.HelloReply, { accepted: false, reason })));
      setTimeout(() => socket.destroy(), 1000).unref();
    };
    let got = false;
    const parser = new FrameParser((frame) => {
      if (got) throw new ProtocolError("data after Hello before the reply");
      got = true;
      clearTimeout(timer);
      socket.pause();
      socket.removeAllListeners("data");
      let hello: Hello;
      try {
        hello = parseHello(frame);
      } catch (error) {
        return refuse((error as Error).message);
      }
      this.routePeer(socket, hello).then((reason) => reason && refuse(reason), (error) => refuse(String(error)));
    });
    socket.on("error", () => {});
    socket.on("data", (chunk: Buffer) => {
      try {
        parser.push(chunk);
      } catch (error) {
        refuse((error as Error).message);
      }
    });
  }

  /** Returns why the connection is refused, or null once handed to the worker. */
  private async routePeer(socket: net.Socket, hello: Hello): Promise<string | null> {
    const slot = [...this.slots.values()].find((s) => s.config.resource === hello.resource);
    if (!slot) return `unknown resource "${hello.resource}"`;
    const remote = slot.config.remote;
    if (remote === null) return `resource "${hello.resource}" has remote none`;
    const allowed = await resolveAll(remote.host);
    const from = normalizeIp(socket.remoteAddress ?? "");
    if (!allowed.includes(from)) {
      return `address ${from} is not the configured remote ${remote.host} of "${hello.resource}"`;
    }
    if (slot.role !== "secondary" || !slot.child) {
      return `resource "${hello.resource}" is not secondary here (role ${slot.role})`;
    }
    slot.child.send({ type: "peer", hello } satisfies ToWorker, socket as never);
    return null;
  }

  // ---- control commands -------------------------------------------------------

  private async handle(request: ControlRequest): Promise<ControlResponse> {
    if (request.command === "ping") return { ok: true, value: { pid: process.pid } };
    let slots: Slot[];
    try {
      slots = this.select(request.names ?? [], request.command === "role");
    } catch (error) {
      return { ok: false, error: (error as Error).message, exitCode: 64 };
    }
    switch (request.command) {
      case "role":
        return this.setRoles(slots, request.role!, request.force === true);
      case "status":
      case "list":
        return { ok: true, value: await Promise.all(slots.map((s) => this.describe(s, request.command === "list"))) };
      case "syncrate":
        for (const slot of slots) {
          slot.config.syncRateBytesPerSecond = request.bytesPerSecond ?? 0;
          await this.ask(slot, (id) => ({ type: "syncrate", id, bytesPerSecond: request.bytesPerSecond ?? 0 }));
        }
        return { ok: true, value: null };
      case "verify":
        return this.startVerifies(slots, request.bytesPerSecond ?? 0);
      default:
        return { ok: false, error: `unknown control command "${request.command}"`, exitCode: 64 };
    }
  }

  /** Starts an online verify on each primary resource named; fails naming those that cannot. */
  private async startVerifies(slots: Slot[], bytesPerSecond: number): Promise<ControlResponse> {
    const errors: string[] = [];
    for (const slot of slots) {
      const name = slot.config.resource;
      let refusal: unknown = `it is not primary here (role ${slot.role}); verify runs on the primary`;
      if (slot.role === "primary" && slot.child) {
        const answer = await this.ask(slot, (id) => ({ type: "verify", id, bytesPerSecond }));
        refusal = answer === null ? "its worker did not answer" : (answer as { refusal: unknown }).refusal;
      }
      if (refusal !== null) errors.push(`Cannot verify "${name}": ${String(refusal)}`);
      else this.log("info", `resource "${name}": verify started`);
    }
    if (errors.length > 0) return { ok: false, error: errors.join("\n"), exitCode: EX_UNAVAILABLE };
    return { ok: true, value: null };
  }

  private select(names: string[], allowAll: boolean): Slot[] {
    if (names.length === 0 || (allowAll && names.length === 1 && names[0] === "all")) return [...this.slots.values()];
    return names.map((name) => {
      const slot = this.slots.get(name);
      if (!slot) throw new Error(`Cannot find resource "${name}" in ${this.config.file}`);
      return slot;
    });
  }

  private async setRoles(slots: Slot[], role: Role, force: boolean): Promise<ControlResponse> {
    const errors: string[] = [];
    let exitCode = 0;
    for (const slot of slots) {
      const error = await this.setRole(slot, role, force);
      if (error) {
        errors.push(error.message);
        exitCode = error.exitCode;
      }
    }
    if (errors.length > 0) return { ok: false, error: errors.join("\n"), exitCode };
    return { ok: true, value: null };
  }

  /** Any role to any other: stops the old worker, starts the new one (spec §9). */
  private async setRole(slot: Slot, role: Role, force: boolean): Promise<Failure | null> {
    const old = slot.role;
    if (old === role && (role === "init" || slot.child)) return null;
    await this.stopWorker(slot);
    slot.role = "init";
    if (role !== "init") {
      const failure = await this.startWorker(slot, role, force);
      if (failure) return failure;
    }
    slot.role = role;
    this.log("info", `resource "${slot.config.resource}": role ${old} → ${role}`);
    execHooks(slot.config.exec, slot.config.resource, this.log).run("role", [old, role]);
    return null;
  }

  private startWorker(slot: Slot, role: WorkerRole, force: boolean): Promise<Failure | null> {
    const { command, args } = selfCommand(["__worker"]);
    const child = spawn(command, args, { stdio: ["ignore", "inherit", "inherit", "ipc"], env: workerEnv() });
    slot.child = child;
    slot.stopping = false;
    return new Promise((resolve) => {
      let settled = false;
      /** The worker reported that it cannot start: its exit is that, not a crash. */
      let startFailed = false;
      child.on("message", (message: FromWorker) => {
        if (message.type === "ready" && !settled) {
          settled = true;
          resolve(null);
        } else if (message.type === "failed" && !settled) {
          settled = true;
          startFailed = true;
          slot.lastError = message.message;
          resolve({ message: message.message, exitCode: message.exitCode });
        } else if (message.type === "reply") {
          slot.pending.get(message.id)?.(message.value);
          slot.pending.delete(message.id);
        }
      });
      child.on("exit", (code, signal) => {
        if (slot.child === child) slot.child = null;
        for (const reply of slot.pending.values()) reply(null);
        slot.pending.clear();
        if (!settled) {
          settled = true;
          const message = `Cannot start worker for "${slot.config.resource}": exited (${signal ?? code})`;
          resolve({ message, exitCode: 75 });
          return;
        }
        if (!slot.stopping && !this.shuttingDown && !startFailed) {
          this.onWorkerCrash(slot, role, signal ?? String(code));
        }
      });
      child.send({ type: "start", role, config: slot.config, force, debug: this.options.debug } satisfies ToWorker);
    });
  }

  /**
   * Restarts a crashed worker in the same role, retrying with a doubling delay (up to
   * WORKER_RESTART_MAX_MS) while it cannot start, e.g. while its disk fails. The role the
   * operator chose is kept; `hast status` shows the last error meanwhile.
   */
  private onWorkerCrash(slot: Slot, role: WorkerRole, how: string, attempt = 0): void {
    if (attempt === 0) slot.lastError = `worker exited unexpectedly (${how})`;
    const delayMs = Math.min(WORKER_RESTART_MS * 2 ** attempt, WORKER_RESTART_MAX_MS);
    this.log("error", `resource "${slot.config.resource}": ${slot.lastError}; restarting in ${delayMs} ms`);
    setTimeout(() => {
      if (slot.role !== role || slot.child || this.shuttingDown) return;
      void this.startWorker(slot, role, false).then((failure) => {
        if (!failure) return;
        slot.lastError = `restart failed: ${failure.message}`;
        this.onWorkerCrash(slot, role, how, attempt + 1);
      });
    }, delayMs);
  }

  private async stopWorker(slot: Slot): Promise<void> {
    const child = slot.child;
    if (!child) return;
    slot.stopping = true;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    if (child.connected) child.send({ type: "stop" } satisfies ToWorker);
    const timer = setTimeout(() => child.kill("SIGKILL"), WORKER_STOP_MS);
    await exited;
    clearTimeout(timer);
    slot.child = null;
  }

  private ask(slot: Slot, make: (id: number) => ToWorker): Promise<unknown> {
    const child = slot.child;
    if (!child?.connected) return Promise.resolve(null);
    const id = this.nextRequestId++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        slot.pending.delete(id);
        resolve(null);
      }, 5000);
      slot.pending.set(id, (value) => {
        clearTimeout(timer);
        resolve(value);
      });
      child.send(make(id));
    });
  }

  private async describe(slot: Slot, full: boolean): Promise<unknown> {
    const worker = slot.role === "init" ? null : await this.ask(slot, (id) => ({ type: "status", id }));
    return describeResource(slot.config, slot.role, worker as Record<string, unknown> | null, {
      full, pid: slot.child?.pid ?? null, lastError: slot.lastError,
    });
  }

  // ---- signals -------------------------------------------------------------------

  /** SIGHUP: re-read the config; new resources start in init, removed ones stop. */
  private async reload(): Promise<void> {
    let next: NodeConfig;
    try {
      next = loadConfig(this.options.configPath, { node: this.options.node });
    } catch (error) {
      this.log("error", `SIGHUP: config not reloaded: ${(error as Error).message}`);
      return;
    }
    const names = new Set(next.resources.map((r) => r.resource));
    for (const [name, slot] of this.slots) {
      if (!names.has(name)) {
        await this.setRole(slot, "init", false);
        this.slots.delete(name);
      }
    }
    for (const resource of next.resources) {
      const slot = this.slots.get(resource.resource);
      if (!slot) {
        this.slots.set(resource.resource, newSlot(resource));
        continue;
      }
      await this.reconfigure(slot, resource);
    }
    const listenChanged = JSON.stringify(next.listen) !== JSON.stringify(this.config.listen);
    this.config = next;
    if (listenChanged) {
      for (const listener of this.listeners.splice(0)) listener.close();
      for (const address of next.listen) await this.openListener(address);
    }
    this.log("info", "configuration reloaded");
  }

  /**
   * Applies a resource's new settings (spec §9): a change of `name`, `local`
   * or `export` restarts its worker; anything else is swapped in place by the
   * worker (which reconnects when remote, source, checksum or compression
   * changed).
   */
  private async reconfigure(slot: Slot, next: ResourceConfig): Promise<void> {
    const before = slot.config;
    slot.config = next;
    if (JSON.stringify(before) === JSON.stringify(next) || slot.role === "init") return;
    const restart = before.name !== next.name || before.local !== next.local ||
      JSON.stringify(before.export) !== JSON.stringify(next.export);
    if (!restart) {
      slot.child?.send({ type: "reconfigure", config: next } satisfies ToWorker);
      return;
    }
    const role = slot.role;
    await this.stopWorker(slot);
    const failure = await this.startWorker(slot, role, false);
    if (failure) {
      this.log("error", `resource "${next.resource}": restart after reload failed: ${failure.message}`);
      slot.role = "init";
    }
  }

  /** SIGTERM: stops every worker, removes the control socket and pidfile, exits. */
  async shutdown(why: string): Promise<void> {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    this.log("info", `${why}: stopping workers`);
    await Promise.all([...this.slots.values()].map((slot) => this.stopWorker(slot)));
    this.control?.close();
    for (const listener of this.listeners) listener.close();
    if (this.config.control.kind === "unix") rmSync(this.config.control.path, { force: true });
    rmSync(this.pidfile, { force: true });
    process.exit(0);
  }
}

function newSlot(config: ResourceConfig): Slot {
  return { config, role: "init", child: null, pending: new Map(), stopping: false, lastError: "" };
}

function normalizeIp(ip: string): string {
  return ip.startsWith("::ffff:") ? ip.slice(7) : ip;
}

async function resolveAll(host: string): Promise<string[]> {
  if (net.isIP(host)) return [normalizeIp(host)];
  try {
    return (await lookup(host, { all: true })).map((a) => normalizeIp(a.address));
  } catch {
    return [];
  }
}
