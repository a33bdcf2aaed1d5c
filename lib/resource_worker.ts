/**
 * The per-resource worker process (spec §11): one per active resource, so a
 * crash in one resource cannot take down another. The daemon starts it as
 * `hast __worker`, talks to it over the Node IPC channel, and hands it the
 * primary's TCP connections (secondary role) after reading their Hello.
 *
 * Messages daemon → worker: start, peer (+ socket), status, syncrate, verify, reconfigure, stop.
 * The daemon sends a reconfigure only to a running worker (its role changes, reload restarts and
 * crash restarts of a resource run one at a time); one that arrives during the start is applied
 * once the role runs (WorkerSession).
 * Messages worker → daemon: ready, failed, reply.
 */
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import type { Socket } from "node:net";
import { ActiveMap } from "./activemap.ts";
import { memoryUsage as allocatorUsage } from "bun:jsc";
import { CodecPipeline } from "./codec_pipeline.ts";
import { RequestSlots } from "./request_slots.ts";
import type { ResourceConfig } from "./config.ts";
import type { Hello } from "./handshake.ts";
import { EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, exitCodeOf } from "./exit_codes.ts";
import { execHooks } from "./hooks.ts";
import { makeLogger, type Logger } from "./log.ts";
import { MetadataStore, stalenessOf } from "./metadata.ts";
import { NbdServer } from "./nbd_server.ts";
import { Primary, REQUEST_SLOT_MIN_BYTES, REQUEST_SLOTS } from "./primary.ts";
import { Provider } from "./provider.ts";
import { systemClock } from "./remote_link.ts";
import { Secondary } from "./secondary.ts";
import { providerDataStore, recordLocalWritesLost, type MetaStore } from "./storage.ts";
import { socketConnection, tcpNetwork } from "./transport.ts";
import { MAX_IO_BYTES } from "./wire.ts";

export type WorkerRole = "primary" | "secondary";

export type ToWorker =
  | { type: "start"; role: WorkerRole; config: ResourceConfig; force: boolean; debug: number }
  | { type: "peer"; hello: Hello }
  | { type: "status"; id: number }
  | { type: "syncrate"; id: number; bytesPerSecond: number }
  | { type: "verify"; id: number; bytesPerSecond: number }
  | { type: "reconfigure"; config: ResourceConfig }
  | { type: "stop" };

export type FromWorker =
  | { type: "ready"; pid: number }
  | { type: "failed"; message: string; exitCode: number }
  | { type: "reply"; id: number; value: unknown };

/** NBD limits of the export, shown by `hast list`. */
export const NBD_MAX_REQUEST_BYTES = 32 * 1024 * 1024;
/** The wire carries sector-aligned requests only (spec §7): clients do read-modify-write below. */
export const NBD_MIN_BLOCK_BYTES = 512;
export const NBD_MAX_IN_FLIGHT = 64;
/** Request payloads and replies not yet taken by the socket, per client. */
export const NBD_MAX_IN_FLIGHT_BYTES = 4 * NBD_MAX_REQUEST_BYTES;
export const NBD_MAX_CLIENTS = 16;

export interface Running {
  role: WorkerRole;
  provider: Provider;
  meta: MetadataStore;
  primary?: Primary;
  nbd?: NbdServer;
  secondary?: Secondary;
  pipeline: CodecPipeline | null;
  stop(): Promise<void>;
}

/** Sends to the daemon while the channel is open (a closed one throws, or reports an error). */
function send(message: FromWorker): void {
  if (process.connected) process.send?.(message);
}

export type StartMessage = Extract<ToWorker, { type: "start" }>;

/** What a WorkerSession needs from its process; runWorker passes the real ones, tests fakes. */
export interface WorkerHost {
  send(message: FromWorker): void;
  exit(code: number): void;
  /** Starts the resource: startResource. */
  start(message: StartMessage, log: Logger): Promise<Running>;
  /** Hands the primary's connection (a socket from the daemon) to the running secondary. */
  attach(secondary: Secondary, handle: Socket, hello: Hello): Promise<void>;
  makeLog(component: string, debug: number): Logger;
}

/** A refusal of `hast verify` and the exit code the CLI ends with (75: try again). */
export interface VerifyAnswer {
  refusal: string | null;
  exitCode: number;
}

/**
 * The worker's side of the IPC conversation with the daemon: one start, then requests, until a
 * stop or the daemon's disconnect. Requests that arrive before the start finished are answered
 * for what the worker is then (starting), or kept for the role once it runs (syncrate,
 * reconfigure, a primary's connection); found by review: a verify while starting answered
 * "this node is not primary", a status "failed", and a syncrate or reload then was lost.
 */
export class WorkerSession {
  private running: Running | null = null;
  /**
   * The start under way, if any. A stop, or the daemon going away, waits for it and then stops
   * what it started (found by review: with the daemon killed while its worker started, `running`
   * was still null, so the worker did not stop, and ran on as an unsupervised primary serving NBD
   * and holding the disk's lock; a stop meanwhile exited before the start had finished).
   */
  private starting: Promise<void> | null = null;
  /** Set once a stop or the daemon's disconnect arrived: the worker only ends from then on. */
  private ending: Promise<void> | null = null;
  /** The settings the worker runs with: the start's, then each reconfigure's. */
  private config: ResourceConfig | null = null;
  /** A rate `hast syncrate` set before the start arrived; applied to it. */
  private syncRateBytesPerSecond: number | null = null;
  /** The start failed: the worker exits once the daemon has read why. */
  private failed = false;
  private log: Logger;

  constructor(private readonly host: WorkerHost) {
    this.log = host.makeLog("worker", 0);
  }

  /** The resource's logger once the start arrived. */
  get logger(): Logger {
    return this.log;
  }

  /** Handles one message from the daemon; resolves once it has been dealt with. */
  async handle(message: ToWorker, handle?: Socket): Promise<void> {
    switch (message.type) {
      case "start":
        return this.start(message);
      case "peer":
        return this.peer(message.hello, handle);
      case "status":
        this.host.send({ type: "reply", id: message.id, value: this.status() });
        return;
      case "syncrate":
        this.setSyncRate(message.bytesPerSecond);
        this.host.send({ type: "reply", id: message.id, value: true });
        return;
      case "verify":
        this.host.send({ type: "reply", id: message.id, value: this.verify(message.bytesPerSecond) });
        return;
      case "reconfigure":
        return this.reconfigure(message.config);
      case "stop":
        return this.end();
      default: {
        // A daemon of another version: answered (null) so that it does not wait for a reply.
        const unknown = message as { type?: unknown; id?: unknown };
        this.log("warn", `ignoring a message of unknown type ${JSON.stringify(unknown.type)} from the daemon`);
        if (typeof unknown.id === "number") this.host.send({ type: "reply", id: unknown.id, value: null });
      }
    }
  }

  /** The daemon went away, or asked to stop: stops what runs (once it started) and exits 0. */
  end(): Promise<void> {
    this.ending ??= (async () => {
      await this.starting;
      await this.running?.stop();
      this.host.exit(0);
    })();
    return this.ending;
  }

  private async start(message: StartMessage): Promise<void> {
    if (this.starting !== null || this.ending !== null) {
      // The daemon sends one start per worker: a second one must not open the disk again (it
      // would fail as in use, and its failure end the role that runs).
      this.log("error", `ignoring a start message: ${this.starting ? "the worker has one" : "it is stopping"}`);
      return;
    }
    const config = message.config;
    if (this.syncRateBytesPerSecond !== null) config.syncRateBytesPerSecond = this.syncRateBytesPerSecond;
    this.config = config;
    this.log = this.host.makeLog(`${config.resource}/${message.role}`, message.debug);
    this.starting = (async () => {
      try {
        this.running = await this.host.start(message, this.log);
      } catch (error) {
        const exitCode = exitCodeOf(error);
        this.failed = true;
        this.host.send({ type: "failed", message: (error as Error).message, exitCode });
        setTimeout(() => this.host.exit(1), 50);
        return;
      }
      // A reload that arrived while it started (the daemon queues them, but not a role's).
      if (this.config !== config) this.applyConfig(this.running, this.config!);
      if (this.ending === null) this.host.send({ type: "ready", pid: process.pid });
    })();
    await this.starting;
  }

  /** What `hast status` shows of this worker: the role's status, or that it starts or stops. */
  private status(): unknown {
    if (this.running === null) {
      if (this.failed) return null;
      return { status: this.ending === null ? "starting" : "stopping" };
    }
    const status = statusOf(this.running, pipelineChangeOf(this.running, this.config!));
    return this.ending === null ? status : { ...(status as object), status: "stopping" };
  }

  private verify(bytesPerSecond: number): VerifyAnswer {
    if (this.ending !== null) return { refusal: "the resource is stopping", exitCode: EX_UNAVAILABLE };
    if (this.failed) return { refusal: "its worker failed to start", exitCode: EX_UNAVAILABLE };
    if (this.running === null) {
      return { refusal: "its worker is still starting; try again once it runs", exitCode: EX_TEMPFAIL };
    }
    if (!this.running.primary) return { refusal: "this node is not primary", exitCode: EX_UNAVAILABLE };
    return { refusal: this.running.primary.startVerify(bytesPerSecond), exitCode: EX_UNAVAILABLE };
  }

  private setSyncRate(bytesPerSecond: number): void {
    // Also into the settings a start under way passes to its primary, which reads the rate there.
    if (this.config === null) this.syncRateBytesPerSecond = bytesPerSecond;
    else this.config.syncRateBytesPerSecond = bytesPerSecond;
    this.running?.primary?.setSyncRate(bytesPerSecond);
  }

  private async reconfigure(next: ResourceConfig): Promise<void> {
    if (this.running === null) {
      // Applied once the start finished; before the start, the start brings the daemon's settings.
      if (this.config !== null) this.config = next;
      return;
    }
    this.applyConfig(this.running, next);
  }

  private applyConfig(running: Running, next: ResourceConfig): void {
    this.config = next;
    running.primary?.reconfigure(next);
    running.secondary?.reconfigure(next);
    const change = pipelineChangeOf(running, next);
    if (change !== null) this.log("info", `pipeline: ${change}`);
  }

  /** A primary's connection: handed to the secondary once the worker runs, else closed. */
  private async peer(hello: Hello, handle?: Socket): Promise<void> {
    await this.starting;
    const secondary = this.running?.secondary;
    if (secondary && handle && this.ending === null) {
      await this.host.attach(secondary, handle, hello);
    } else {
      handle?.destroy();
    }
  }
}

/** How the codec threads change at the next start: the settings want them and none run, or the reverse. */
export function pipelineChangeOf(running: Running, config: ResourceConfig): string | null {
  const wanted = pipelineWanted(config);
  if (wanted === (running.pipeline !== null)) return null;
  return wanted
    ? "the codec threads start at the next role change or restart (none run now)"
    : "the codec threads stop at the next role change or restart (connections made from now on encode inline)";
}

/** Whether a worker started with `config` runs codec threads: only where there is codec work to move off. */
export function pipelineWanted(config: ResourceConfig): boolean {
  return config.pipeline && (config.checksum !== "none" || config.compression === "lz4");
}

/** Entry point of `hast __worker`. */
export function runWorker(): void {
  const session = new WorkerSession({
    send,
    exit: (code) => process.exit(code),
    start: startResource,
    attach: async (secondary, handle, hello) => {
      const conn = socketConnection(handle, secondary.receivePool, { pauseWhileFull: true });
      await secondary.attach(conn, hello);
    },
    makeLog: makeLogger,
  });
  const crash = (what: string) => (error: unknown) => {
    session.logger("error", `${what}: ${(error as Error).stack ?? error}`);
    process.exit(EX_SOFTWARE);
  };
  process.on("message", (message: ToWorker, handle?: Socket) => {
    session.handle(message, handle).catch(crash("worker failure"));
  });
  // The daemon is gone: stop serving rather than run unsupervised.
  process.on("disconnect", () => void session.end().catch(crash("stop after the daemon went away")));
}

class StartError extends Error {
  constructor(message: string, readonly exitCode: number) {
    super(message);
  }
}

/**
 * Opens the resource's provider and starts it in the role `message` asks for (the worker's
 * "start" message; exported for tests of a restart).
 * @returns the running role, with its stop()
 * @throws StartError (exit code 65) when a stale copy is to become primary without --force,
 *   or what opening, loading or writing the provider throws
 */
export async function startResource(message: Extract<ToWorker, { type: "start" }>, log: Logger): Promise<Running> {
  const { config, role } = message;
  const provider = Provider.open(config.local, { exclusive: true });
  try {
    const meta = await MetadataStore.load(provider, { resource: config.resource, log });
    await flushAtStart(provider, meta, log);
    const m = meta.metadata;
    const stale = stalenessOf(m);
    if (role === "primary" && stale !== null && !message.force) {
      throw new StartError(
        `Cannot become primary: the local data of "${config.resource}" is stale (${stale}); ` +
          `use "hast role --force primary ${config.resource}" to promote it anyway`,
        65,
      );
    }
    if (role === "primary" && stale !== null) {
      // The operator chose this copy: it is current from now on, also for a worker restart.
      log("warn", `promoted with --force although the local data was stale (${stale})`);
      await meta.write({ prevrole: role, syncTarget: false, discardPending: false, localWritesLost: false });
    } else {
      await meta.write({ prevrole: role }, { flush: config.metaflush });
    }
    const data = providerDataStore(provider, m.dataOffsetBytes, m.datasizeBytes);
    const hooks = execHooks(() => config.exec, config.resource, log); // reconfigure updates config
    // The primary's request slots: its codec threads read large writes where they were received.
    const requestSlots = role === "primary"
      ? new RequestSlots(REQUEST_SLOTS, MAX_IO_BYTES, REQUEST_SLOT_MIN_BYTES)
      : null;
    const pipeline = pipelineWanted(config) ? CodecPipeline.start({ inputs: requestSlots }) : null;
    if (role === "secondary") {
      const secondary = new Secondary({ config, data, meta, hooks, log, pipeline });
      return { role, provider, meta, secondary, pipeline, stop: async () => {
        await secondary.stop();
        await pipeline?.close();
        // The secondary records its own sessions' flush failures (cleared by a completed sync).
        await flushAtStop(provider, meta, log, null);
        provider.close();
      } };
    }
    return await startPrimary(config, provider, meta, log, hooks, pipeline, requestSlots!);
  } catch (error) {
    provider.close();
    throw error;
  }
}

async function startPrimary(
  config: ResourceConfig, provider: Provider, meta: MetadataStore, log: Logger,
  hooks: ReturnType<typeof execHooks>, pipeline: CodecPipeline | null, requestSlots: RequestSlots,
): Promise<Running> {
  const m = meta.metadata;
  const onDisk = await meta.readMap();
  const activemap = new ActiveMap({
    extentCount: Math.ceil(m.datasizeBytes / m.extentsizeBytes),
    extentsizeBytes: m.extentsizeBytes,
    datasizeBytes: m.datasizeBytes,
    keepdirty: m.keepdirty,
    onDisk,
  });
  if (activemap.syncExtentCount() > 0) {
    log("info", `${activemap.syncExtentCount()} extents dirty on disk: they will be synchronised`);
  }
  const data = providerDataStore(provider, m.dataOffsetBytes, m.datasizeBytes);
  const primary = new Primary({
    config, data, meta, activemap, network: tcpNetwork, clock: systemClock, hooks, log, pipeline, requestSlots,
  });
  const nbd = new NbdServer(primary, {
    exportName: config.name,
    description: `hast resource ${config.resource}`,
    maxRequestBytes: NBD_MAX_REQUEST_BYTES,
    minBlockBytes: NBD_MIN_BLOCK_BYTES,
    maxInFlight: NBD_MAX_IN_FLIGHT,
    maxInFlightBytes: NBD_MAX_IN_FLIGHT_BYTES,
    maxClients: NBD_MAX_CLIENTS,
    log: (level, text) => log(level, `nbd: ${text}`),
  });
  if (config.export.kind === "unix") mkdirSync(dirname(config.export.path), { recursive: true });
  await nbd.listen(config.export);
  primary.start();
  return {
    role: "primary", provider, meta, primary, nbd, pipeline,
    stop: async () => {
      await nbd.close();
      await primary.stop();
      await pipeline?.close();
      await flushAtStop(provider, meta, log, primary.status().localFlushFailure);
      provider.close();
    },
  };
}

/**
 * Flushes the provider before anything writes to it, and records metadata.localWritesLost when
 * that fails. Linux reports a lost cached write (writeback EIO) to one fdatasync per open file
 * description, and a descriptor opened after the loss still gets it if no one has yet: a worker
 * that crashed or stopped without flushing leaves the report to this start. Taken for a
 * transient error it would fail this start only, and the daemon's retry a second later would
 * start with nothing recorded (and, as primary, resync the lost copy over the peer's).
 * @returns the flush error, or null when the flush succeeded
 * @throws what the metadata write throws (the start then fails)
 */
export async function flushAtStart(provider: Provider, meta: MetaStore, log: Logger): Promise<string | null> {
  try {
    await provider.flush();
    return null;
  } catch (error) {
    log("error", `the first flush of the local disk failed, so writes of an earlier run may be lost: ${error}`);
    await recordLocalWritesLost(meta, log, "needs --force until a sync from the peer completes");
    return String(error);
  }
}

/**
 * Flushes the data before the provider closes, so that a loss is reported to this run, which
 * records it (metadata.localWritesLost), rather than to the next start's flush. `knownFailure`
 * is a flush failure the role already saw (the primary's sticky one): a later flush would no
 * longer report it, so it is recorded too, in case the role's own attempt failed.
 * @returns the flush error or `knownFailure`, or null
 */
export async function flushAtStop(
  provider: Provider, meta: MetaStore, log: Logger, knownFailure: string | null,
): Promise<string | null> {
  let failure = knownFailure;
  try {
    await provider.flush();
  } catch (error) {
    log("error", `the last flush of the local disk failed, so cached writes may be lost: ${error}`);
    failure ??= String(error);
  }
  if (failure === null) return null;
  try {
    await recordLocalWritesLost(meta, log, "again needs --force");
  } catch (error) {
    log("error", `cannot record in the metadata that the local disk may have lost writes: ${error}`);
  }
  return failure;
}

/**
 * The worker's memory: its RSS, the JavaScript objects on the collected heap, the memory the
 * collector counts beside them (ArrayBuffers: the buffer pools and payloads in flight), and
 * what the allocator has committed. Cheap (about 30 µs): bun:jsc's heapStats() would walk the
 * heap: it took 7–9% of a loaded primary's profile while the bench's set-up polled `hast list`
 * every 100 ms.
 */
function memoryOf(): Record<string, number> {
  const usage = process.memoryUsage();
  return {
    rssBytes: usage.rss,
    jsHeapBytes: jsHeapBytesOf(usage),
    extraMemoryBytes: usage.external,
    allocatorCommittedBytes: allocatorUsage().currentCommit,
  };
}

/**
 * The JavaScript heap without the memory the collector counts beside it. Bun's heapUsed includes
 * `external` for ordinary ArrayBuffers, but not always all of it: a fresh 34 MiB
 * SharedArrayBuffer (the codec pipeline's slot pool is one) showed in external (35.6 MB) and not
 * in heapUsed (0.5 MB), so heapUsed − external came out negative and, clamped, read 0 (a
 * replication_test run with `pipeline on` failed on it once). When external exceeds heapUsed,
 * it is evidently not (all) included, and heapUsed is the better estimate of the heap.
 */
export function jsHeapBytesOf(usage: { heapUsed: number; external: number }): number {
  return usage.external < usage.heapUsed ? usage.heapUsed - usage.external : usage.heapUsed;
}

function statusOf(running: Running, pipelineChange: string | null): unknown {
  const m = running.meta.metadata;
  const metadata = {
    datasizeBytes: m.datasizeBytes, extentsizeBytes: m.extentsizeBytes, keepdirty: m.keepdirty,
    resuid: String(m.resuid), localcnt: String(m.localcnt), remotecnt: String(m.remotecnt),
    syncTarget: m.syncTarget, discardPending: m.discardPending, localWritesLost: m.localWritesLost,
  };
  const local = {
    blockingWrites: running.provider.blockingWrites,
    slowBlockingWrites: running.provider.slowBlockingWrites,
    preemptedBlockingWrites: running.provider.preemptedBlockingWrites,
    blockingPauses: running.provider.blockingPauses,
    flushUnsupported: running.provider.flushUnsupported,
  };
  if (running.primary) {
    return {
      role: "primary",
      metadata,
      local,
      ...running.primary.status(),
      nbd: running.nbd?.stats() ?? null,
      nbdLimits: running.nbd?.limits ?? null,
      pipeline: running.pipeline?.stats() ?? null,
      pipelineChange,
      memory: memoryOf(),
    };
  }
  return {
    role: "secondary", metadata, local, ...running.secondary!.status(),
    pipeline: running.pipeline?.stats() ?? null,
    pipelineChange,
    memory: memoryOf(),
  };
}
