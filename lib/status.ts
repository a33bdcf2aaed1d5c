/**
 * What `hast status` and `hast list` report for one resource, assembled from
 * the configuration, the daemon's view (role, worker pid) and the worker's
 * own status, and how it is printed as text.
 */
import { AUTHKEY_MIN_BYTES } from "./auth.ts";
import { RECORD_MAX_BYTES } from "./link_crypto.ts";
import {
  PIPELINE_MIN_BYTES, PIPELINE_REGION_BYTES, PIPELINE_SLOTS, PIPELINE_THREADS,
} from "./codec_pipeline.ts";
import { formatAddress, type ResourceConfig } from "./config.ts";
import { CONTROL_TIMEOUT_MS, MAX_CONTROL_BYTES, MAX_CONTROL_CONNECTIONS } from "./control.ts";
import { MAX_RUNNING_HOOKS } from "./hooks.ts";
import {
  ACTIVEMAP_CLEAR_INTERVAL_MS, MAX_REMOTE_IN_FLIGHT, MAX_REMOTE_IN_FLIGHT_BYTES, REQUEST_SLOTS,
  REQUEST_SLOT_MIN_BYTES,
} from "./primary.ts";
import {
  NBD_MAX_CLIENTS, NBD_MAX_IN_FLIGHT, NBD_MAX_IN_FLIGHT_BYTES, NBD_MAX_REQUEST_BYTES, NBD_MIN_BLOCK_BYTES,
} from "./resource_worker.ts";
import { RECEIVE_POOL_BUFFERS, RECEIVE_POOL_MIN_BYTES } from "./secondary.ts";
import { SYNC_CHUNK_BYTES, SYNC_FLUSH_BYTES, SYNC_FLUSH_INTERVAL_MS, SYNC_WORKERS } from "./synchronizer.ts";
import { NBD_TCP_KEEPALIVE_IDLE_MS } from "./nbd_server.ts";
import { formatSizeBytes } from "./units.ts";
import { VERIFY_CHUNK_BYTES, VERIFY_LIST_MAX, VERIFY_WORKERS } from "./verifier.ts";
import { MAX_IO_BYTES, MAX_PAYLOAD_BYTES } from "./wire.ts";

/** Every fixed limit, as `hast list` shows it. */
export const LIMITS = {
  nbdMaxRequestBytes: NBD_MAX_REQUEST_BYTES,
  nbdMinBlockBytes: NBD_MIN_BLOCK_BYTES,
  nbdMaxInFlightPerClient: NBD_MAX_IN_FLIGHT,
  nbdMaxInFlightBytesPerClient: NBD_MAX_IN_FLIGHT_BYTES,
  nbdMaxClients: NBD_MAX_CLIENTS,
  nbdTcpKeepaliveIdleMs: NBD_TCP_KEEPALIVE_IDLE_MS,
  replicationMaxIoBytes: MAX_IO_BYTES,
  replicationMaxFramePayloadBytes: MAX_PAYLOAD_BYTES,
  replicationMaxInFlight: MAX_REMOTE_IN_FLIGHT,
  replicationMaxInFlightBytes: MAX_REMOTE_IN_FLIGHT_BYTES,
  primaryRequestSlots: REQUEST_SLOTS,
  primaryRequestSlotBytes: MAX_IO_BYTES,
  primaryRequestSlotMinPayloadBytes: REQUEST_SLOT_MIN_BYTES,
  secondaryReceiveBuffersKept: RECEIVE_POOL_BUFFERS,
  secondaryReceiveBufferBytes: MAX_PAYLOAD_BYTES,
  secondaryReceiveBufferMinPayloadBytes: RECEIVE_POOL_MIN_BYTES,
  syncChunkBytes: SYNC_CHUNK_BYTES,
  pipelineThreads: PIPELINE_THREADS,
  pipelineSlots: PIPELINE_SLOTS,
  pipelineSlotBytes: 2 * PIPELINE_REGION_BYTES,
  pipelineMinPayloadBytes: PIPELINE_MIN_BYTES,
  syncParallelExtents: SYNC_WORKERS,
  verifyChunkBytes: VERIFY_CHUNK_BYTES,
  verifyParallelChunks: VERIFY_WORKERS,
  verifyListedExtentsMax: VERIFY_LIST_MAX,
  authkeyMinBytes: AUTHKEY_MIN_BYTES,
  encryptionRecordMaxBytes: RECORD_MAX_BYTES,
  syncFlushBytes: SYNC_FLUSH_BYTES,
  syncFlushIntervalMs: SYNC_FLUSH_INTERVAL_MS,
  activemapClearIntervalMs: ACTIVEMAP_CLEAR_INTERVAL_MS,
  controlMaxBytes: MAX_CONTROL_BYTES,
  controlMaxConnections: MAX_CONTROL_CONNECTIONS,
  controlRequestTimeoutMs: CONTROL_TIMEOUT_MS,
  hooksMaxRunning: MAX_RUNNING_HOOKS,
};

/** The `nbd` URI of an export (libnbd style). */
export function nbdUri(config: ResourceConfig): string {
  const e = config.export;
  if (e.kind === "unix") return `nbd+unix:///?socket=${e.path}`;
  const host = e.host.includes(":") ? `[${e.host}]` : e.host;
  return `nbd://${host}:${e.port}/`;
}

/** One resource's status object (the `--json` shape). */
export function describeResource(
  config: ResourceConfig,
  role: string,
  worker: Record<string, unknown> | null,
  options: { full: boolean; pid: number | null; lastError: string; lastErrorAt?: string },
): Record<string, unknown> {
  // A worker that is starting (or stopping before its start finished) reports that alone.
  const running = worker !== null && typeof worker.role === "string";
  const base: Record<string, unknown> = {
    name: config.resource,
    role,
    status: role === "init" ? "stopped" : worker !== null ? worker.status : "failed",
    local: config.local,
    remote: config.remote ? formatAddress(config.remote) : "none",
    nbd: role === "primary" && running ? nbdUri(config) : null,
    dirtyBytes: running && typeof worker.dirtyBytes === "number" ? worker.dirtyBytes : null,
    sync: running ? syncOf(worker) : null,
    verify: running ? worker.verify ?? null : null,
    link: running ? worker.link : null,
    linkEncrypted: running ? worker.linkEncrypted === true : null,
    linkError: (running ? worker.linkError : config ? options.lastError : "") || null,
    localError: running && typeof worker.localFlushFailure === "string"
      ? `a flush of the local disk failed (${worker.localFlushFailure}); it may have lost writes: ` +
        `fail over to the peer`
      : null,
  };
  if (!options.full) return base;
  return {
    ...base,
    provider: config.name,
    source: config.source ? formatAddress(config.source) : null,
    export: formatAddress(config.export),
    replication: config.replication,
    checksum: config.checksum,
    compression: config.compression,
    pipeline: config.pipeline,
    // A reloaded `pipeline` (or codec) that changes whether codec threads run waits for the next start.
    pipelinePending: running && typeof worker.pipelineChange === "string" ? worker.pipelineChange : null,
    timeoutSeconds: config.timeoutSeconds,
    // Off in effect when the provider cannot flush (metadata.ts turns it off and logs it once).
    metaflush: config.metaflush && !(running && (worker.local as { flushUnsupported?: boolean } | undefined)
      ?.flushUnsupported === true),
    syncRateBytesPerSecond: config.syncRateBytesPerSecond,
    authkey: config.authkey, // the path; the key itself is never shown
    encryption: config.encryption,
    exec: config.exec,
    workerPid: options.pid,
    lastError: options.lastError || null,
    lastErrorAt: options.lastErrorAt || null,
    limits: LIMITS,
    worker: worker ?? null,
  };
}

function syncOf(worker: Record<string, unknown>): unknown {
  const sync = worker.sync as Record<string, unknown> | null | undefined;
  if (!sync) return null;
  return {
    state: sync.state,
    source: sync.source,
    doneBytes: sync.doneBytes,
    totalBytes: sync.totalBytes,
    bytesPerSecond: sync.bytesPerSecond,
    etaSeconds: sync.etaSeconds,
    // The first failure of the sync (a chunk, a flush, the link), null once it is done.
    error: sync.error ?? null,
  };
}

/** `hast status` as text: one row per resource (hastctl's columns plus dirty and sync). */
export function formatStatusTable(rows: Record<string, unknown>[]): string {
  const header = ["Name", "Status", "Role", "Components", "Dirty", "Sync", "Verify"];
  const lines = rows.map((r) => [
    String(r.name),
    String(r.status),
    String(r.role),
    `${r.local} ${r.remote}`,
    typeof r.dirtyBytes === "number" ? formatSizeBytes(r.dirtyBytes) : "-",
    formatSync(r.sync as Record<string, number | string | null> | null),
    formatVerify(r.verify as Record<string, unknown> | null | undefined),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  return [header, ...lines]
    .map((cols) => cols.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd())
    .join("\n");
}

/** The parts a sync or a verify in progress shows: percent done, rate, time left. */
function progressParts(
  doneBytes: number, totalBytes: number, bytesPerSecond: unknown, etaSeconds: unknown,
): { percent: string; rate: string; eta: string } {
  return {
    percent: totalBytes > 0 ? ((doneBytes * 100) / totalBytes).toFixed(1) : "100.0",
    rate: `${formatSizeBytes(Math.round(Number(bytesPerSecond)))}/s`,
    eta: etaSeconds === null ? "-" : `${etaSeconds}s`,
  };
}

function formatSync(sync: Record<string, number | string | null> | null): string {
  if (!sync) return "-";
  const done = Number(sync.doneBytes);
  const total = Number(sync.totalBytes);
  const { percent, rate, eta } = progressParts(done, total, sync.bytesPerSecond, sync.etaSeconds);
  return `${sync.state} ${formatSizeBytes(done)}/${formatSizeBytes(total)} (${percent}%) ${rate} eta ${eta}`;
}

/** The last verify of a running primary: progress, or its result. */
export function formatVerify(verify: Record<string, unknown> | null | undefined): string {
  if (!verify) return "-";
  const checked = Number(verify.checkedBytes) + Number(verify.skippedBytes);
  const total = Number(verify.totalBytes);
  const differing = Number(verify.differingExtents);
  const found = differing > 0 ? `, ${differing} extents differed (resynced)` : "";
  if (verify.state === "running") {
    const { percent, rate, eta } = progressParts(checked, total, verify.bytesPerSecond, verify.etaSeconds);
    return `running ${percent}% ${rate} eta ${eta}${found}`;
  }
  if (verify.state === "failed") return `failed at ${formatSizeBytes(checked)}: ${verify.error}${found}`;
  return differing > 0 ? `done${found}` : "done, identical";
}

/** `hast list` as text: every field, one resource per block. */
export function formatList(rows: Record<string, unknown>[]): string {
  return rows.map((r) => {
    const lines = [`${r.name}:`];
    for (const [key, value] of Object.entries(r)) {
      if (key === "name") continue;
      lines.push(...formatField(key, value, "  "));
    }
    return lines.join("\n");
  }).join("\n");
}

function formatField(key: string, value: unknown, indent: string): string[] {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    const lines = [`${indent}${key}:`];
    for (const [k, v] of Object.entries(value)) lines.push(...formatField(k, v, indent + "  "));
    return lines;
  }
  return [`${indent}${key}: ${value === null ? "-" : String(value)}`];
}
