/**
 * The per-resource worker process (spec §11): one per active resource, so a
 * crash in one resource cannot take down another. The daemon starts it as
 * `hast __worker`, talks to it over the Node IPC channel, and hands it the
 * primary's TCP connections (secondary role) after reading their Hello.
 *
 * Messages daemon → worker: start, peer (+ socket), status, syncrate, verify, reconfigure, stop.
 * The daemon sends a reconfigure only to a running worker (its role changes, reload restarts and
 * crash restarts of a resource run one at a time).
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
import { exitCodeOf } from "./exit_codes.ts";
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

/** Entry point of `hast __worker`. */
export function runWorker(): void {
  let running: Running | null = null;
  /**
   * The start under way, if any. A stop, or the daemon going away, waits for it and then stops
   * what it started (found by review: with the daemon killed while its worker started, `running`
   * was still null, so the worker did not stop, and ran on as an unsupervised primary serving NBD
   * and holding the disk's lock; a stop meanwhile exited before the start had finished).
   */
  let starting: Promise<void> | null = null;
  /** Set once a stop or the daemon's disconnect arrived: the worker only ends from then on. */
  let ending: Promise<never> | null = null;
  const end = (): Promise<never> => {
    ending ??= (async () => {
      await starting;
      await (running as Running | null)?.stop();
      process.exit(0);
    })();
    return ending;
  };
  let log: Logger = makeLogger("worker", 0);
  process.on("message", (message: ToWorker, handle?: Socket) => {
    void (async () => {
      switch (message.type) {
        case "start":
          log = makeLogger(`${message.config.resource}/${message.role}`, message.debug);
          starting = (async () => {
            try {
              running = await startResource(message, log);
              if (ending === null) send({ type: "ready", pid: process.pid });
            } catch (error) {
              const exitCode = exitCodeOf(error);
              send({ type: "failed", message: (error as Error).message, exitCode });
              setTimeout(() => process.exit(1), 50);
            }
          })();
          await starting;
          return;
        case "peer":
          if (running?.secondary && handle && ending === null) {
            const conn = socketConnection(handle, running.secondary.receivePool, { pauseWhileFull: true });
            await running.secondary.attach(conn, message.hello);
          } else {
            handle?.destroy();
          }
          return;
        case "status":
          send({ type: "reply", id: message.id, value: running ? statusOf(running) : null });
          return;
        case "syncrate":
          running?.primary?.setSyncRate(message.bytesPerSecond);
          send({ type: "reply", id: message.id, value: true });
          return;
        case "verify": {
          const refusal = running?.primary
            ? running.primary.startVerify(message.bytesPerSecond) : "this node is not primary";
          send({ type: "reply", id: message.id, value: { refusal } });
          return;
        }
        case "reconfigure":
          running?.primary?.reconfigure(message.config);
          running?.secondary?.reconfigure(message.config);
          return;
        case "stop":
          await end();
      }
    })().catch((error) => {
      log("error", `worker failure: ${(error as Error).stack ?? error}`);
      process.exit(70);
    });
  });
  process.on("disconnect", () => {
    // The daemon is gone: stop serving rather than run unsupervised.
    end().catch((error) => {
      log("error", `stop after the daemon went away: ${(error as Error).stack ?? error}`);
      process.exit(70);
    });
  });
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
    const meta = await MetadataStore.load(provider, { resource: config.resource });
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
    // Codec threads only where there is codec work to move off the event loop.
    const codecWork = config.checksum !== "none" || config.compression === "lz4";
    // The primary's request slots: its codec threads read large writes where they were received.
    const requestSlots = role === "primary"
      ? new RequestSlots(REQUEST_SLOTS, MAX_IO_BYTES, REQUEST_SLOT_MIN_BYTES)
      : null;
    const pipeline = config.pipeline && codecWork ? CodecPipeline.start({ inputs: requestSlots }) : null;
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

function statusOf(running: Running): unknown {
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
      memory: memoryOf(),
    };
  }
  return {
    role: "secondary", metadata, local, ...running.secondary!.status(),
    pipeline: running.pipeline?.stats() ?? null,
    memory: memoryOf(),
  };
}
