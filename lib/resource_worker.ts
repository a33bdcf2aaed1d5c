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
import { providerDataStore } from "./storage.ts";
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
export const NBD_MAX_CLIENTS = 16;

interface Running {
  role: WorkerRole;
  provider: Provider;
  meta: MetadataStore;
  primary?: Primary;
  nbd?: NbdServer;
  secondary?: Secondary;
  pipeline: CodecPipeline | null;
  stop(): Promise<void>;
}

function send(message: FromWorker): void {
  process.send?.(message);
}

/** Entry point of `hast __worker`. */
export function runWorker(): void {
  let running: Running | null = null;
  let log: Logger = makeLogger("worker", 0);
  process.on("message", (message: ToWorker, handle?: Socket) => {
    void (async () => {
      switch (message.type) {
        case "start":
          log = makeLogger(`${message.config.resource}/${message.role}`, message.debug);
          try {
            running = await start(message, log);
            send({ type: "ready", pid: process.pid });
          } catch (error) {
            const exitCode = exitCodeOf(error);
            send({ type: "failed", message: (error as Error).message, exitCode });
            setTimeout(() => process.exit(1), 50);
          }
          return;
        case "peer":
          if (running?.secondary && handle) {
            await running.secondary.attach(socketConnection(handle, running.secondary.receivePool), message.hello);
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
          await running?.stop();
          process.exit(0);
      }
    })().catch((error) => {
      log("error", `worker failure: ${(error as Error).stack ?? error}`);
      process.exit(70);
    });
  });
  process.on("disconnect", () => {
    // The daemon is gone: stop serving rather than run unsupervised.
    void (running as Running | null)?.stop().finally(() => process.exit(0));
  });
}

class StartError extends Error {
  constructor(message: string, readonly exitCode: number) {
    super(message);
  }
}

async function start(message: Extract<ToWorker, { type: "start" }>, log: Logger): Promise<Running> {
  const { config, role } = message;
  const provider = Provider.open(config.local, { exclusive: true });
  try {
    const meta = await MetadataStore.load(provider, { resource: config.resource });
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
    const hooks = execHooks(config.exec, config.resource, log);
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
      provider.close();
    },
  };
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
