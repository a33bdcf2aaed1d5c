/**
 * `hast serve`: the daemon (HAST's hastd). Owns the control socket, the
 * replication listen sockets and the configuration; runs one worker process
 * per active resource (spec §11) and restarts a worker that crashes.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { lookup } from "node:dns/promises";
import { dlopen, FFIType } from "bun:ffi";
import { chmodSync, closeSync, mkdirSync, openSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { dirname } from "node:path";
import {
  type Address, formatAddress, loadConfig, type NodeConfig, normalizeIp, type ResourceConfig,
} from "./config.ts";
import { controlRequest, controlServer, type ControlRequest, type ControlResponse } from "./control.ts";
import { parseHello, type Hello } from "./handshake.ts";
import { EX_CONFIG, EX_TEMPFAIL, EX_UNAVAILABLE } from "./exit_codes.ts";
import { execHooks } from "./hooks.ts";
import {
  type LogOutput, makeLogger, REFUSAL_LOG_INTERVAL_MS, RepeatLimiter, repeatKind, type Logger,
} from "./log.ts";
import type { FromWorker, ToWorker, WorkerRole } from "./resource_worker.ts";
import { MAX_ATTACH_HANDSHAKES } from "./secondary.ts";
import { describeResource } from "./status.ts";
import {
  encodeJson, FrameParser, HEADER_BYTES, MAX_JSON_BYTES, MessageType, ProtocolError, WIRE_MAGIC,
} from "./wire.ts";

export type Role = "init" | WorkerRole;

export interface DaemonOptions {
  configPath: string;
  node?: string;
  debug: number;
  pidfile?: string;
  /** Starts a worker process (tests pass fakes); default: `hast __worker` with an IPC channel. */
  spawnWorker?: () => ChildProcess;
  /** Ends the process once shutdown is done; default process.exit. */
  exit?: (code: number) => void;
  /** Whether start() installs the SIGTERM, SIGINT and SIGHUP handlers; default true. */
  signals?: boolean;
  /** The addresses of a remote's host name (tests hold it); default: the system's resolver. */
  lookupHost?: (host: string) => Promise<string[]>;
  /** Where the daemon's log lines go (tests read them); default: stderr. */
  logOutput?: LogOutput;
}

/** A worker that exits on its own is restarted after this delay. */
export const WORKER_RESTART_MS = 1000;
export const WORKER_RESTART_MAX_MS = 30_000;
/**
 * A worker that ran this long before it crashed had recovered: its restart waits WORKER_RESTART_MS
 * again. One that crashed sooner counts as the same trouble, and its restart waits twice as long.
 */
export const WORKER_STABLE_MS = 60_000;
/** How long a worker may take to stop before it is killed. */
export const WORKER_STOP_MS = 30_000;
/**
 * How long a worker may take to start (open the disk, read metadata and activemap) before it is
 * killed: role changes of a resource run one after another, so a hung start would block them all.
 */
export const WORKER_START_MS = 60_000;
/**
 * Time allowed for a replication connection from its accept until it is handed to a resource's
 * worker: checking the peer's address, reading its Hello, checking the Hello. A connection that
 * sends nothing, or trickles, is refused and closed after it.
 */
export const HELLO_TIMEOUT_MS = 10_000;
/**
 * Replication connections held before they are handed to a worker (see HELLO_TIMEOUT_MS); one
 * more is closed at once, unread. Each may hold a Hello of up to MAX_JSON_BYTES, so idle or
 * slow connections hold at most 16 × 64 KiB (found by review: they were unbounded, each could
 * hold 1 MiB, and 400 idle ones took the daemon from 50 to 462 MiB RSS). A primary keeps one
 * connection per resource and gets through in well under a second, so 16 leaves room for the
 * primaries of several resources reconnecting at once; a flood from the remote's address can
 * keep them out only while it lasts, as it could fill the listen backlog anyway.
 */
export const MAX_PREAUTH_CONNECTIONS = 16;
/**
 * The daemon's limits on replication connections, shown by `hast list` beside the worker's
 * (status.ts LIMITS): added here because status.ts cannot import this module (this one imports
 * it, and the cycle would leave the constants uninitialised when LIMITS is built).
 */
export const DAEMON_LIMITS = {
  replicationMaxPreauthConnections: MAX_PREAUTH_CONNECTIONS,
  replicationHelloTimeoutMs: HELLO_TIMEOUT_MS,
  replicationMaxHelloBytes: MAX_JSON_BYTES,
  secondaryMaxAttachHandshakes: MAX_ATTACH_HANDSHAKES,
};
/** Refusals logged under one key whatever the peer sent (the reason names what it sent). */
const REFUSAL_KEY_TOO_MANY = "too many connections waiting for their Hello";
/**
 * Lookups of a resource's remote for one connection: a reload that changes the remote while one
 * runs makes routePeer look the new one up; past this many, the connection is refused.
 */
const ROUTE_LOOKUPS_MAX = 3;

interface Failure {
  message: string;
  exitCode: number;
}

interface Slot {
  config: ResourceConfig;
  role: Role;
  /** The one worker of the resource; at most one exists at any time. */
  child: ChildProcess | null;
  /** Resolves once `child` has exited or failed to spawn. */
  childGone: Promise<void>;
  pending: Map<number, (value: unknown) => void>;
  /** The daemon asked `child` to stop: its exit is no crash, and it takes no new role. */
  stopping: boolean;
  /** Set once a reload removed the resource: nothing may start a worker for it again. */
  removed: boolean;
  lastError: string;
  /** When lastError was set (ISO 8601), "" if never: it stays after the worker recovers. */
  lastErrorAt: string;
  /** Crashes in a row of workers that ran less than WORKER_STABLE_MS; a role command resets it. */
  crashes: number;
  /** The role a role change is starting a worker in (slot.role is init meanwhile), or null. */
  starting: WorkerRole | null;
  /**
   * Role changes, reload restarts and crash restarts of the resource, chained so that one runs
   * at a time: each stops the worker before it may start another, and a same-role request sees
   * the outcome of the ones before it. Without it, two changes that overlapped both waited for
   * the old worker's exit and both spawned one; the untracked one kept serving.
   */
  queue: Promise<void>;
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
  /** The control socket and pidfile this daemon created: shutdown removes these, not the config's. */
  private controlPath: string | null = null;
  private pidfilePath: string | null = null;
  /** Resources a reload removed whose worker may still be stopping: shutdown waits for them too. */
  private readonly removing = new Set<Slot>();
  /** SIGHUPs, applied one after another. */
  private reloads: Promise<void> = Promise.resolve();
  private listeners: net.Server[] = [];
  /** Refused replication connections, logged once a minute per peer and reason. */
  private readonly refusals = new RepeatLimiter(REFUSAL_LOG_INTERVAL_MS);
  /**
   * Replication connections not yet handed to a worker nor refused, with the timer that refuses
   * them after HELLO_TIMEOUT_MS: at most MAX_PREAUTH_CONNECTIONS.
   */
  private readonly unrouted = new Map<net.Socket, ReturnType<typeof setTimeout>>();
  private nextRequestId = 1;
  private shuttingDown = false;

  constructor(private readonly options: DaemonOptions) {
    this.log = makeLogger("daemon", options.debug, { output: options.logOutput });
    this.config = loadConfig(options.configPath, { node: options.node, checkKeys: true });
    for (const resource of this.config.resources) this.slots.set(resource.resource, newSlot(resource));
  }

  /** The pidfile the configuration (or -P) asks for. */
  get pidfile(): string {
    return this.options.pidfile ?? this.config.pidfile;
  }

  /** The lock that keeps a second daemon of this control socket from starting; held until exit. */
  private lockFd: number | null = null;

  /** Takes the daemon's lock, binds the control and listen sockets and writes the pidfile. */
  async start(): Promise<void> {
    const control = this.config.control;
    if (control.kind !== "unix") throw new Error("Cannot serve control: only uds:// control addresses are supported");
    // Before the ping: two daemons started at once both found no one answering, and the second
    // removed the first one's control socket to bind its own (found by review). The loser then
    // failed to bind the replication port and exited, leaving the first running and listening
    // but unreachable: every `hast role` failed and no new daemon could start.
    this.lockFd = lockDaemon(daemonLockPath(control.path));
    try {
      this.control = await this.openControl(control);
      this.controlPath = control.path;
      for (const address of this.config.listen) await this.openListener(address);
      if (this.listeners.length === 0 && this.config.listen.length > 0) {
        throw new Error("Cannot listen: no listen address could be bound");
      }
    } catch (error) {
      this.closeSockets();
      throw error;
    }
    this.writePidfile(this.pidfile);
    if (this.options.signals !== false) {
      process.on("SIGTERM", () => void this.shutdown("SIGTERM"));
      process.on("SIGINT", () => void this.shutdown("SIGINT"));
      process.on("SIGHUP", () => void this.reload());
    }
    this.log("info", `serving ${this.slots.size} resources as node "${this.config.node}"`);
  }

  private writePidfile(path: string): void {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, `${process.pid}\n`);
    this.pidfilePath = path;
  }

  private async openControl(control: Address): Promise<net.Server> {
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
    return server;
  }

  /** Some listen address of the last reload could not be bound (the next SIGHUP retries). */
  private listenIncomplete = false;

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

  /**
   * Checks that the peer's address is the remote of some resource before reading anything from
   * it (anyone else is refused at once, without buffering a Hello for HELLO_TIMEOUT_MS); then
   * reads the Hello, checks resource, role and source address, and hands the socket over. At
   * most MAX_PREAUTH_CONNECTIONS are in these steps at once, each for at most HELLO_TIMEOUT_MS.
   */
  private onPeer(socket: net.Socket): void {
    socket.pause();
    socket.on("error", () => {});
    const from = normalizeIp(socket.remoteAddress ?? "");
    if (this.unrouted.size >= MAX_PREAUTH_CONNECTIONS) {
      // Closed unread and unanswered: an answer could wait in a full send buffer, holding it.
      this.logRefusal(REFUSAL_KEY_TOO_MANY, `refused connection from ${from}: ` +
        `${MAX_PREAUTH_CONNECTIONS} connections already wait for their Hello (closed at once)`);
      socket.destroy();
      return;
    }
    const timer = setTimeout(() => this.refusePeer(socket, `no Hello within ${HELLO_TIMEOUT_MS} ms`),
      HELLO_TIMEOUT_MS);
    timer.unref();
    this.unrouted.set(socket, timer);
    socket.once("close", () => this.release(socket));
    void this.isSomeRemote(from).then((known) => {
      if (!this.unrouted.has(socket)) return; // refused meanwhile (timeout)
      if (known) this.readHello(socket);
      else this.refusePeer(socket, `address ${from} is not the remote of any resource here`);
    }, (error: Error) => this.refusePeer(socket, `cannot check address ${from}: ${error.message}`));
  }

  /** Stops counting `socket` as unrouted; false if it was not (already refused, routed or closed). */
  private release(socket: net.Socket): boolean {
    const timer = this.unrouted.get(socket);
    if (timer === undefined) return false;
    clearTimeout(timer);
    this.unrouted.delete(socket);
    return true;
  }

  /** True when `address` is (one of the addresses of) the remote of a resource. */
  private async isSomeRemote(address: string): Promise<boolean> {
    for (const slot of this.slots.values()) {
      const remote = slot.config.remote;
      if (remote !== null && (await this.resolveAll(remote.host)).includes(address)) return true;
    }
    return false;
  }

  /** The addresses of `host` (itself if it is one), none if it cannot be looked up. */
  private async resolveAll(host: string): Promise<string[]> {
    if (net.isIP(host)) return [normalizeIp(host)];
    try {
      return (await (this.options.lookupHost ?? lookupAll)(host)).map(normalizeIp);
    } catch {
      return [];
    }
  }

  /**
   * Answers a refusal the primary's handshake reads as its reason, then closes; once per
   * connection. `kind` keys the log's repeat limiter: by default the reason without what it
   * quotes or counts, which a peer could vary to get each refusal logged (log.ts repeatKind).
   */
  private refusePeer(socket: net.Socket, reason: string, kind = repeatKind(reason)): void {
    if (!this.release(socket)) return;
    // A primary retries every RECONNECT_INTERVAL_MS: one line per peer and reason per minute.
    this.logRefusal(`${socket.remoteAddress} ${kind}`, `refused connection from ${socket.remoteAddress}: ${reason}`);
    if (!socket.destroyed) socket.end(Buffer.concat(encodeJson(MessageType.HelloReply, { accepted: false, reason })));
    setTimeout(() => socket.destroy(), 1000).unref();
  }

  private logRefusal(key: string, message: string): void {
    const line = this.refusals.pass(key, message);
    if (line !== null) this.log("warn", line);
  }

  /** Reads the Hello, refusing one whose header announces more than MAX_JSON_BYTES unread. */
  private readHello(socket: net.Socket): void {
    const refuse = (reason: string, kind = repeatKind(reason)) => {
      socket.removeAllListeners("data");
      socket.resume(); // drops what else it sends until the close, so that the answer is not reset
      this.refusePeer(socket, reason, kind);
    };
    let got = false;
    const parser = new FrameParser((frame) => {
      if (got) throw new ProtocolError("data after Hello before the reply");
      got = true;
      socket.pause();
      socket.removeAllListeners("data");
      let hello: Hello;
      try {
        hello = parseHello(frame);
      } catch (error) {
        return refuse((error as Error).message);
      }
      this.routePeer(socket, hello).then((refusal) => refusal && refuse(refusal.reason, refusal.kind),
        (error) => refuse(String(error)));
    });
    // The header is checked before the parser sees it: the parser allocates the payload it
    // announces (up to MAX_PAYLOAD_BYTES) at once.
    const header = new Uint8Array(HEADER_BYTES);
    let headerFill = 0;
    socket.on("data", (chunk: Buffer) => {
      if (!this.unrouted.has(socket)) return; // refused (timeout): dropped until the close
      try {
        let rest: Uint8Array = chunk;
        if (headerFill < HEADER_BYTES) {
          const take = Math.min(HEADER_BYTES - headerFill, chunk.byteLength);
          header.set(chunk.subarray(0, take), headerFill);
          headerFill += take;
          if (headerFill < HEADER_BYTES) return;
          const unfit = helloHeaderError(header);
          if (unfit !== null) return refuse(unfit, "Hello header unfit");
          parser.push(header);
          rest = chunk.subarray(take);
        }
        if (rest.byteLength > 0) parser.push(rest);
      } catch (error) {
        refuse((error as Error).message);
      }
    });
    socket.resume();
  }

  /**
   * Hands the connection to the resource's worker; returns why it is refused instead, or null
   * once handed over. Names from the Hello are quoted with JSON.stringify: a name with quotes
   * or newlines must not be able to forge log lines. The peer's address is checked against the
   * remote in force when the socket is handed over: a reload (SIGHUP) while the remote's name is
   * looked up may change it, and then the new one is looked up (before, a connection from the
   * old remote was handed to the resource after a reload had replaced it; found by review).
   */
  private async routePeer(socket: net.Socket, hello: Hello): Promise<{ reason: string; kind: string } | null> {
    const refused = (reason: string) => ({ reason, kind: repeatKind(reason) });
    const from = normalizeIp(socket.remoteAddress ?? "");
    for (let lookups = 0; lookups < ROUTE_LOOKUPS_MAX; lookups++) {
      const slot = this.slots.get(hello.resource);
      if (!slot) return { reason: `unknown resource ${JSON.stringify(hello.resource)}`, kind: "unknown resource" };
      const name = JSON.stringify(slot.config.resource);
      const remote = slot.config.remote;
      if (remote === null) return refused(`resource ${name} has remote none`);
      const allowed = await this.resolveAll(remote.host);
      if (this.slots.get(hello.resource) !== slot || slot.config.remote?.host !== remote.host) continue;
      // From here to the hand-over nothing awaits: the config checked is the one in force.
      if (!allowed.includes(from)) {
        return refused(`address ${from} is not the configured remote ${remote.host} of ${name}`);
      }
      if (slot.role !== "secondary" || !slot.child || slot.stopping) {
        return refused(`resource ${name} is not secondary here (role ${slot.role})`);
      }
      if (!this.unrouted.has(socket)) return null; // refused meanwhile (timeout)
      if (!sendTo(slot.child, { type: "peer", hello }, socket)) return refused(`the worker of ${name} is gone`);
      this.release(socket);
      return null;
    }
    return refused(`the remote of resource ${JSON.stringify(hello.resource)} changed ${ROUTE_LOOKUPS_MAX} times ` +
      "while it was looked up");
  }

  // ---- control commands -------------------------------------------------------

  private async handle(request: ControlRequest): Promise<ControlResponse> {
    if (request.command === "ping") return { ok: true, value: { pid: process.pid } };
    let slots: Slot[];
    try {
      slots = this.select(request.names ?? [], request.command === "role");
    } catch (error) { // a name not in the config: as the CLI answers it (README, exit codes)
      return { ok: false, error: (error as Error).message, exitCode: EX_CONFIG };
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
    const started: string[] = [];
    // 75 (try again) only when every refusal is one that passes by itself (a worker starting).
    let exitCode = EX_TEMPFAIL;
    for (const slot of slots) {
      const name = slot.config.resource;
      let refusal: unknown = `it is not primary here (role ${slot.role}); verify runs on the primary`;
      let code = EX_UNAVAILABLE;
      if (slot.starting === "primary") {
        refusal = "it is starting as primary; try again once it runs";
        code = EX_TEMPFAIL;
      } else if (slot.role === "primary" && slot.child) {
        const answer = (await this.ask(slot, (id) => ({ type: "verify", id, bytesPerSecond }))) as
          { refusal: unknown; exitCode?: number } | null;
        refusal = answer === null ? "its worker did not answer" : answer.refusal;
        if (typeof answer?.exitCode === "number") code = answer.exitCode;
      }
      if (refusal !== null) {
        if (code !== EX_TEMPFAIL) exitCode = EX_UNAVAILABLE;
        errors.push(`Cannot verify "${name}": ${String(refusal)}`);
      } else {
        started.push(name);
        this.log("info", `resource "${name}": verify started`);
      }
    }
    // Those that started run on: say so, or the operator would take the error for all of them.
    if (errors.length > 0 && started.length > 0) errors.push(`verify started on ${started.join(", ")} all the same`);
    if (errors.length > 0) return { ok: false, error: errors.join("\n"), exitCode };
    return { ok: true, value: null };
  }

  private select(names: string[], allowAll: boolean): Slot[] {
    if (names.length === 0 || (allowAll && names.length === 1 && names[0] === "all")) return [...this.slots.values()];
    // Each resource once, however often it is named (found by review: a 4 MB request naming one
    // resource a million times built a 5 GB answer).
    return [...new Set(names)].map((name) => {
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

  /** Any role to any other, after the resource's earlier changes (spec §9). */
  private setRole(slot: Slot, role: Role, force: boolean): Promise<Failure | null> {
    return this.serialise(slot, () => this.changeRole(slot, role, force));
  }

  /**
   * Runs `operation` once every earlier one of the resource has finished, so that role changes,
   * reload restarts and crash restarts never overlap (see Slot.queue).
   */
  private serialise<T>(slot: Slot, operation: () => Promise<T>): Promise<T> {
    const result = slot.queue.then(operation);
    slot.queue = result.then(() => {}, () => {});
    return result;
  }

  /** Stops the old worker, starts the new one; run only through serialise(). */
  private async changeRole(slot: Slot, role: Role, force: boolean): Promise<Failure | null> {
    const old = slot.role;
    // A no-op only when a worker runs in that role; earlier changes have finished (queue).
    if (old === role && (role === "init" || (slot.child !== null && !slot.stopping))) return null;
    await this.stopWorker(slot);
    slot.role = "init";
    slot.crashes = 0;
    if (role !== "init") {
      slot.starting = role;
      const failure = await this.startWorker(slot, role, force).finally(() => (slot.starting = null));
      if (failure) {
        // The old worker is gone all the same (found by review: no role hook said so, and a hook
        // that acts on leaving primary never ran).
        if (old !== "init") this.roleChanged(slot, old, "init");
        return failure;
      }
    }
    this.roleChanged(slot, old, role);
    return null;
  }

  /** Records a change of the resource's role: logs it and runs the role hook (spec §10). */
  private roleChanged(slot: Slot, old: Role, role: Role): void {
    slot.role = role;
    this.log("info", `resource "${slot.config.resource}": role ${old} → ${role}`);
    execHooks(slot.config.exec, slot.config.resource, this.log).run("role", [old, role]);
  }

  /** Starts the resource's one worker and resolves once it runs or failed; run only through serialise(). */
  private async startWorker(slot: Slot, role: WorkerRole, force: boolean): Promise<Failure | null> {
    const name = slot.config.resource;
    assert.equal(slot.child, null, `resource "${name}" already has a worker`);
    if (this.shuttingDown || slot.removed) {
      const why = slot.removed ? "it was removed from the configuration" : "the daemon is shutting down";
      return { message: `Cannot start worker for "${name}": ${why}`, exitCode: EX_TEMPFAIL };
    }
    let child: ChildProcess;
    try {
      child = (this.options.spawnWorker ?? spawnSelfWorker)();
    } catch (error) {
      return { message: `Cannot start worker for "${name}": ${(error as Error).message}`, exitCode: EX_TEMPFAIL };
    }
    slot.child = child;
    slot.stopping = false;
    const started = this.superviseWorker(slot, child, role);
    const timer = setTimeout(() => {
      this.log("error", `resource "${name}": worker ${child.pid} did not start in ${WORKER_START_MS} ms; killing it`);
      child.kill("SIGKILL");
    }, WORKER_START_MS);
    // A worker that failed to spawn has no channel: its 'error' settles `started`.
    sendTo(child, { type: "start", role, config: slot.config, force, debug: this.options.debug });
    const failure = await started;
    clearTimeout(timer);
    return failure;
  }

  /**
   * Follows a worker from its spawn to its end: its replies, its readiness (the promise returned)
   * and its end, which clears slot.child and, unless asked for, restarts it. Bun reports a failed
   * spawn (ENOENT, EAGAIN) by 'error' alone, never 'exit'; a worker without a pid is such a one.
   */
  private superviseWorker(slot: Slot, child: ChildProcess, role: WorkerRole): Promise<Failure | null> {
    const name = slot.config.resource;
    let gone!: () => void;
    slot.childGone = new Promise((resolve) => (gone = resolve));
    return new Promise((resolve) => {
      let settled = false;
      /** The worker reported that it cannot start: its exit is that, not a crash. */
      let startFailed = false;
      let ended = false;
      let readyAt = 0;
      child.on("message", (message: FromWorker) => {
        if (message.type === "ready" && !settled) {
          settled = true;
          readyAt = Date.now();
          resolve(null);
        } else if (message.type === "failed" && !settled) {
          settled = true;
          startFailed = true;
          setLastError(slot, message.message);
          resolve({ message: message.message, exitCode: message.exitCode });
        } else if (message.type === "reply") {
          slot.pending.get(message.id)?.(message.value);
          slot.pending.delete(message.id);
        }
      });
      /** `why` completes "Cannot start worker", `how` "worker exited unexpectedly". */
      const end = (why: string, how: string) => {
        if (ended) return;
        ended = true;
        const stopped = slot.stopping;
        if (slot.child === child) slot.child = null;
        for (const reply of slot.pending.values()) reply(null);
        slot.pending.clear();
        gone();
        if (!settled) {
          settled = true;
          resolve({ message: `Cannot start worker for "${name}": ${why}`, exitCode: EX_TEMPFAIL });
        } else if (!stopped && !this.shuttingDown && !startFailed) {
          this.onWorkerCrash(slot, role, how, Date.now() - readyAt);
        }
      };
      child.on("exit", (code, signal) => end(`exited (${signal ?? code})`, signal ?? String(code)));
      child.on("error", (error) => {
        if (child.pid === undefined) end(error.message, error.message);
        else this.log("warn", `resource "${name}": worker ${child.pid}: ${error.message}`);
      });
    });
  }

  /**
   * Restarts a crashed worker in the same role, after a delay that doubles (up to
   * WORKER_RESTART_MAX_MS) with each crash of a worker that ran less than WORKER_STABLE_MS (found
   * by review: a worker that started and crashed again at once was restarted every second for
   * ever) and with each failed start, e.g. while its disk fails. The role the operator chose is
   * kept; `hast status` shows the last error meanwhile. The restart waits for any role change
   * under way, and gives way to it: a worker running by then is left alone.
   */
  private onWorkerCrash(slot: Slot, role: WorkerRole, how: string, ranMs: number): void {
    slot.crashes = ranMs < WORKER_STABLE_MS ? slot.crashes + 1 : 1;
    const times = slot.crashes > 1 ? `, ${slot.crashes} times in a row` : "";
    setLastError(slot, `worker exited unexpectedly (${how})${times}`);
    this.restartWorker(slot, role, slot.crashes - 1);
  }

  private restartWorker(slot: Slot, role: WorkerRole, attempt: number): void {
    const delayMs = Math.min(WORKER_RESTART_MS * 2 ** attempt, WORKER_RESTART_MAX_MS);
    this.log("error", `resource "${slot.config.resource}": ${slot.lastError}; restarting in ${delayMs} ms`);
    setTimeout(() => void this.serialise(slot, async () => {
      if (slot.role !== role || slot.child || slot.removed || this.shuttingDown) return;
      const failure = await this.startWorker(slot, role, false);
      if (!failure) return;
      setLastError(slot, `restart failed: ${failure.message}`);
      this.restartWorker(slot, role, attempt + 1);
    }), delayMs);
  }

  /** Stops the worker, if any, and resolves once it has exited. */
  private async stopWorker(slot: Slot): Promise<void> {
    const child = slot.child;
    if (!child) return;
    slot.stopping = true;
    sendTo(child, { type: "stop" });
    const timer = setTimeout(() => child.kill("SIGKILL"), WORKER_STOP_MS);
    await slot.childGone;
    clearTimeout(timer);
    assert.notEqual(slot.child, child);
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
      if (sendTo(child, make(id))) return;
      slot.pending.get(id)?.(null);
      slot.pending.delete(id);
    });
  }

  private async describe(slot: Slot, full: boolean): Promise<unknown> {
    const worker = slot.role === "init" ? null : await this.ask(slot, (id) => ({ type: "status", id }));
    const row = describeResource(slot.config, slot.role, worker as Record<string, unknown> | null, {
      full, pid: slot.child?.pid ?? null, lastError: slot.lastError, lastErrorAt: slot.lastErrorAt,
    });
    if (full) row.limits = { ...(row.limits as Record<string, number>), ...DAEMON_LIMITS };
    return row;
  }

  // ---- signals -------------------------------------------------------------------

  /**
   * SIGHUP: re-read the config; new resources start in init, removed ones stop; control, pidfile
   * and listen apply live (spec §9). Resolves once applied; overlapping reloads run in turn.
   */
  reload(): Promise<void> {
    const done = this.reloads.then(() => this.reloadOnce());
    this.reloads = done.catch((error: Error) => this.log("error", `SIGHUP: ${error.stack ?? error}`));
    return done;
  }

  private async reloadOnce(): Promise<void> {
    let next: NodeConfig;
    try {
      next = loadConfig(this.options.configPath, { node: this.options.node, checkKeys: true });
    } catch (error) {
      this.log("error", `SIGHUP: config not reloaded: ${(error as Error).message}`);
      return;
    }
    const names = new Set(next.resources.map((r) => r.resource));
    for (const [name, slot] of this.slots) {
      if (names.has(name)) continue;
      this.slots.delete(name);
      this.removing.add(slot);
      await this.serialise(slot, async () => {
        slot.removed = true;
        await this.changeRole(slot, "init", false);
      }).finally(() => this.removing.delete(slot));
    }
    for (const resource of next.resources) {
      const slot = this.slots.get(resource.resource);
      if (!slot) {
        this.slots.set(resource.resource, newSlot(resource));
        continue;
      }
      await this.reconfigure(slot, resource);
    }
    // Also when an address of the last reload could not be bound: this SIGHUP tries it again
    // (found by review: it was never retried, and the node could be left listening on nothing).
    const listenChanged = this.listenIncomplete || JSON.stringify(next.listen) !== JSON.stringify(this.config.listen);
    this.config = next;
    await this.moveControl(next.control);
    this.movePidfile(this.pidfile);
    if (listenChanged) {
      for (const listener of this.listeners.splice(0)) listener.close();
      for (const address of next.listen) await this.openListener(address);
      const missing = next.listen.length - this.listeners.length;
      this.listenIncomplete = missing > 0;
      if (missing > 0) {
        this.log("error", `SIGHUP: ${missing} of ${next.listen.length} listen addresses of ${next.file} could ` +
          "not be bound: primaries cannot reach the secondaries here on them; fix it and send SIGHUP again");
      }
    }
    this.log("info", "configuration reloaded");
  }

  /**
   * Applies a resource's new settings (spec §9): a change of `name`, `local`
   * or `export` restarts its worker; anything else is swapped in place by the
   * worker (which reconnects when remote, source, checksum or compression
   * changed).
   */
  private reconfigure(slot: Slot, next: ResourceConfig): Promise<void> {
    // Queued: a worker being started gets the change once it runs (it would drop it before).
    return this.serialise(slot, () => this.applyResourceConfig(slot, next));
  }

  private async applyResourceConfig(slot: Slot, next: ResourceConfig): Promise<void> {
    const before = slot.config;
    slot.config = next;
    if (JSON.stringify(before) === JSON.stringify(next) || slot.role === "init") return;
    const restart = before.name !== next.name || before.local !== next.local ||
      JSON.stringify(before.export) !== JSON.stringify(next.export);
    if (!restart) {
      if (slot.child) sendTo(slot.child, { type: "reconfigure", config: next });
      return;
    }
    const role = slot.role;
    await this.stopWorker(slot);
    const failure = await this.startWorker(slot, role, false);
    if (failure) {
      setLastError(slot, `restart after reload failed: ${failure.message}`);
      this.log("error", `resource "${next.resource}": ${slot.lastError}`);
      this.roleChanged(slot, role, "init");
    }
  }

  /** Opens the control socket a reload named, then closes the old one; keeps the old on failure. */
  private async moveControl(control: Address): Promise<void> {
    const path = control.kind === "unix" ? control.path : null;
    if (path === this.controlPath) return;
    try {
      const server = await this.openControl(control);
      this.control?.close();
      if (this.controlPath !== null) rmSync(this.controlPath, { force: true });
      this.control = server;
      this.controlPath = path;
      this.log("info", `control socket moved to "${path}"`);
    } catch (error) {
      this.log("error", `SIGHUP: control socket stays "${this.controlPath}": ${(error as Error).message}`);
    }
  }

  /** Writes the pidfile a reload named, then removes the old one; keeps the old on failure. */
  private movePidfile(path: string): void {
    if (path === this.pidfilePath) return;
    const old = this.pidfilePath;
    try {
      this.writePidfile(path);
      if (old !== null) rmSync(old, { force: true });
    } catch (error) {
      this.log("error", `SIGHUP: pidfile stays "${old}": ${(error as Error).message}`);
    }
  }

  /**
   * SIGTERM: stops every worker, removes the control socket and pidfile, exits. Workers stop at
   * once, not after queued role changes; those then start nothing (startWorker checks shuttingDown).
   */
  async shutdown(why: string): Promise<void> {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    this.log("info", `${why}: stopping workers`);
    // Also those a reload is removing (found by review: shutdown exited without stopping them).
    await Promise.all([...this.slots.values(), ...this.removing].map(async (slot) => {
      await this.stopWorker(slot);
      await slot.queue;
      assert.equal(slot.child, null, `resource "${slot.config.resource}" kept a worker after shutdown`);
    }));
    this.closeSockets();
    if (this.pidfilePath !== null) rmSync(this.pidfilePath, { force: true });
    // The lock file stays: removing it would let two daemons lock two different files.
    if (this.lockFd !== null) closeSync(this.lockFd);
    this.lockFd = null;
    (this.options.exit ?? process.exit)(0);
  }

  /** Closes the control and listen sockets and removes the control socket this daemon created. */
  private closeSockets(): void {
    this.control?.close();
    this.control = null;
    for (const listener of this.listeners.splice(0)) listener.close();
    for (const socket of [...this.unrouted.keys()]) socket.destroy();
    if (this.controlPath !== null) rmSync(this.controlPath, { force: true });
    this.controlPath = null;
  }
}

/** The file a daemon locks while it serves the control socket at `controlPath`. */
export function daemonLockPath(controlPath: string): string {
  return `${controlPath}.lock`;
}

const LOCK_EX = 2;
const LOCK_NB = 4;
let flock: ((fd: number, operation: number) => number) | null = null;

/**
 * Opens and flock()s `path`, returning the descriptor to hold for the daemon's life. The kernel
 * drops the lock when the process ends, however it ends, so a killed daemon leaves nothing that
 * blocks the next start. The descriptor is close-on-exec: workers and hooks do not hold it.
 * @throws with exitCode 75 when another process holds the lock
 */
function lockDaemon(path: string): number {
  flock ??= dlopen("libc.so.6", { flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 } }).symbols.flock;
  mkdirSync(dirname(path), { recursive: true });
  const fd = openSync(path, "a", 0o600);
  if (flock(fd, LOCK_EX | LOCK_NB) === 0) return fd;
  closeSync(fd);
  const error = new Error(`Cannot start: a daemon already runs for this control socket (it holds "${path}")`);
  throw Object.assign(error, { exitCode: EX_TEMPFAIL });
}

/** Starts `hast __worker` with an IPC channel. */
function spawnSelfWorker(): ChildProcess {
  const { command, args } = selfCommand(["__worker"]);
  return spawn(command, args, { stdio: ["ignore", "inherit", "inherit", "ipc"], env: workerEnv() });
}

function newSlot(config: ResourceConfig): Slot {
  return {
    config, role: "init", child: null, childGone: Promise.resolve(), pending: new Map(), stopping: false,
    removed: false, lastError: "", lastErrorAt: "", crashes: 0, starting: null, queue: Promise.resolve(),
  };
}

/**
 * Sends to a worker if its IPC channel is open. False when it is not: the worker has exited, is
 * exiting, or never spawned (Bun's child then has no send()); its end is reported by
 * superviseWorker. A send that fails later is reported by the child's 'error' event.
 */
function sendTo(child: ChildProcess, message: ToWorker, handle?: net.Socket): boolean {
  if (!child.connected || typeof child.send !== "function") return false;
  try {
    child.send(message, handle as never);
    return true;
  } catch {
    return false;
  }
}

/**
 * Why the header of a connection's first frame is no Hello the daemon reads, or null. Checked
 * before the payload is allocated. A header that is no HAST frame at all is left to the
 * FrameParser, which refuses it before allocating too.
 */
export function helloHeaderError(header: Uint8Array): string | null {
  assert.equal(header.byteLength, HEADER_BYTES);
  const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
  if (view.getUint32(0) !== WIRE_MAGIC) return null;
  const type = view.getUint8(5);
  if (type !== MessageType.Hello) return `Cannot start connection: first message has type ${type}`;
  const payloadBytes = view.getUint32(8);
  if (payloadBytes > MAX_JSON_BYTES) {
    return `Cannot start connection: a Hello of ${payloadBytes} bytes exceeds ${MAX_JSON_BYTES}`;
  }
  return null;
}

/** Every address the system's resolver has for `host`. */
async function lookupAll(host: string): Promise<string[]> {
  return (await lookup(host, { all: true })).map((a) => a.address);
}

/** Records a worker-level error and when it happened (`hast list`: lastError, lastErrorAt). */
function setLastError(slot: Slot, message: string): void {
  slot.lastError = message;
  slot.lastErrorAt = new Date().toISOString();
}
