/**
 * The primary: serves the device to applications (as an NBD BlockDevice),
 * writes locally and replicates to the secondary, keeps the activemap, and
 * drives connection, handshake and synchronisation (spec §2, §4–§6).
 *
 * Storage, network and clock come in as interfaces (DataStore, MetaStore,
 * Network, Clock) so the logic runs in tests with injected faults.
 */
import assert from "node:assert/strict";
import type { ActiveMap } from "./activemap.ts";
import type { CodecPipeline } from "./codec_pipeline.ts";
import type { ReplicationMode, ResourceConfig } from "./config.ts";
import type { HookRunner } from "./hooks.ts";
import { RangeLock } from "./range_lock.ts";
import { LinkDownError, RemoteLink, type Clock, type RemoteCall } from "./remote_link.ts";
import { recordLocalWritesLost, stickyFlushFailure, type DataStore, type MetaStore } from "./storage.ts";
import { Synchronizer, type SyncProgress } from "./synchronizer.ts";
import { Verifier, type VerifyProgress } from "./verifier.ts";
import { linkErrorText, type Network } from "./transport.ts";
import { handshakeAsPrimary, primaryAuthKey, type HandshakeResult } from "./handshake.ts";
import { RequestSlots, type RequestSlotStats } from "./request_slots.ts";
import { REFUSAL_LOG_INTERVAL_MS, RepeatLimiter } from "./log.ts";
import {
  Errno, FrameFlag, MAX_IO_BYTES, MAX_REMOTE_IN_FLIGHT, MAX_REMOTE_IN_FLIGHT_BYTES, MessageType, errnoName, type Frame,
} from "./wire.ts";

/**
 * Pause between connection attempts. A refused attempt costs the secondary a TCP handshake and a
 * Hello, and it logs a refusal once a minute (lib/daemon.ts), so a short pause is cheap; it is
 * the wait after the peer becomes secondary before replication resumes (HAST's is 10 s). At 2 s
 * it was 1.1–1.8 s of every 1 GiB resync in the bench.
 */
export const RECONNECT_INTERVAL_MS = 500;
/** Pause before another sync pass when extents are dirty while connected. */
export const RESYNC_RETRY_MS = 3000;
export const KEEPALIVE_MS = 10_000;
/** A zeroing or trim travels in Delete frames of at most this many bytes. */
export const DELETE_FRAME_MAX_BYTES = 1 << 30;
export { MAX_REMOTE_IN_FLIGHT, MAX_REMOTE_IN_FLIGHT_BYTES };
/**
 * Request slots for large writes (see RequestSlots), allocated at start. A slot is in use until
 * its local write ended and the link released its frame: in fullsync and memsync about the
 * application's queue depth of 1 MiB writes, in async up to a replication window
 * (MAX_REMOTE_IN_FLIGHT_BYTES); beyond, writes are received into fresh buffers. Not 64+: memory
 * outside the JS heap costs this Bun page faults on every small request, used or not (an idle
 * 80 MiB SharedArrayBuffer cost 10–25% of 4 KiB QD32 IOPS; README, "Design").
 */
export const REQUEST_SLOTS = 32;
/** Writes from this size on are received into request slots (smaller ones are copied). */
export const REQUEST_SLOT_MIN_BYTES = 64 * 1024;
/**
 * How often extents that became clean are cleared from the on-disk activemap
 * (one flush of each copy and one map write per round). An extent therefore stays
 * dirty on disk for up to two intervals after its last write, beyond the
 * keepdirty most recently written ones; in exchange, writes that move across
 * more extents than keepdirty do not each wait for a map write and a flush.
 */
export const ACTIVEMAP_CLEAR_INTERVAL_MS = 1000;

export type LinkState = "disconnected" | "connecting" | "connected" | "split-brain" | "refused";

export interface PrimaryOptions {
  config: ResourceConfig;
  data: DataStore;
  meta: MetaStore;
  activemap: ActiveMap;
  network: Network;
  clock: Clock;
  hooks: HookRunner;
  log: (level: "info" | "warn" | "error" | "debug", message: string) => void;
  /** Codec threads for large payloads (used when the resource's `pipeline` is on). */
  pipeline?: CodecPipeline | null;
  /** Slots for large writes, shared with `pipeline`'s threads (default: a pool of its own). */
  requestSlots?: RequestSlots;
}

/** An error carrying an NBD-mappable errno name. */
export class IoError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

/** What the secondary learns from our Hello and keeps for the connection, as one string. */
function linkSettings(c: ResourceConfig): string {
  // timeoutSeconds too: the link's timeout and keepalive are set when it connects (found by
  // review: a reloaded timeout did not reach the open link).
  return JSON.stringify([c.remote, c.source, c.checksum, c.compression, c.replication, c.authkey, c.encryption,
    c.timeoutSeconds]);
}

export class Primary {
  readonly sizeBytes: number;
  /** The local data; once a flush of it failed, every later flush fails (see stickyFlushFailure). */
  private readonly data: ReturnType<typeof stickyFlushFailure>;
  private readonly lock = new RangeLock();
  private link: RemoteLink | null = null;
  private linkState: LinkState = "disconnected";
  /** Why the last connection attempt failed or was refused ("" once connected). */
  private lastLinkError = "";
  /** Why the last connection ended ("" while connected, or before the first one). */
  private linkLostReason = "";
  /** Log lines that would repeat every attempt: refusals of the peer, retried metadata writes. */
  private readonly repeats = new RepeatLimiter(REFUSAL_LOG_INTERVAL_MS);
  private stopped = false;
  private bumpedSinceDisconnect = false;
  /**
   * An answered write the secondary lacks could not be counted (a failed metadata write): the
   * next connection attempt counts it first, or fails, so that the reconnect cannot take the
   * pair for "in step" or "primary behind" and overwrite it.
   */
  private generationUnrecorded = false;
  /** The link settings our last Hello carried (the secondary orders writes by the mode). */
  private helloSettings = "";
  /** Extents sent to the secondary since its last successful flush began: its page cache may
   *  still lose them (a failing disk, a crash), so a failed flush or a lost link resyncs them. */
  private remoteUnflushed = new Set<number>();
  private bumping: Promise<void> | null = null;
  /** Application writes and zeroings started so far (the last one's number). */
  private writesStarted = 0;
  /**
   * Numbers of those whose outcome is not in the activemap yet (afterWrite has not ended): a Set
   * iterates in insertion order, so its first is the oldest. See writesAccounted.
   */
  private readonly writesUnaccounted = new Set<number>();
  private mapPending: Promise<void> | null = null;
  private mapChain: Promise<void> = Promise.resolve();
  /** The last map write requested, until it settles (map writes settle in order). */
  private mapLatest: Promise<void> | null = null;
  /** The last map write failed: the on-disk map may lack bits set in memory. */
  private mapFailed = false;
  private clearTimer: { stop(): void } | null = null;
  private clearRun: Promise<void> | null = null;
  private metaflush: boolean;
  private syncer: Synchronizer | null = null;
  /** The running or last online verify (`hast verify`). */
  private verifier: Verifier | null = null;
  private peerCanVerify = false;
  private syncSource: "primary" | "secondary" = "primary";
  /**
   * This run found the local copy behind the secondary's (sync from the
   * secondary, unfinished): its sync-needed extents hold older data and are
   * never served from the local disk, also after the link is lost.
   */
  private localBehind = false;
  /** Recording that the local disk lost cached writes (metadata.localWritesLost), once. */
  private recordingLoss: Promise<void> | null = null;
  private peerCounters: { localcnt: bigint; remotecnt: bigint } | null = null;
  private stopLoop: () => void = () => {};
  readonly counters = {
    reads: 0, writes: 0, deletes: 0, flushes: 0, activemapUpdates: 0,
    localErrors: 0, remoteErrors: 0, remoteReads: 0,
  };

  /**
   * The request slots the NBD server receives large writes into, and the sync reads its chunks
   * into (lib/request_slots.ts); the codec threads read them where they lie. A slot goes back
   * once nothing reads it: its local write ended and the link released its frame (see mutate).
   */
  readonly writeBuffers: RequestSlots;

  constructor(private readonly o: PrimaryOptions) {
    this.sizeBytes = o.data.sizeBytes;
    this.data = stickyFlushFailure(o.data);
    this.metaflush = o.config.metaflush;
    this.writeBuffers = o.requestSlots ?? new RequestSlots(REQUEST_SLOTS, MAX_IO_BYTES, REQUEST_SLOT_MIN_BYTES);
    assert.equal(o.meta.metadata.datasizeBytes, o.data.sizeBytes);
  }

  get mode(): ReplicationMode {
    return this.o.config.replication;
  }

  /** Starts the connect loop (does nothing when `remote none`). */
  start(): void {
    this.clearTimer = this.o.clock.setInterval(() => void this.clearRound(), ACTIVEMAP_CLEAR_INTERVAL_MS);
    void this.connectLoop();
  }

  /**
   * Stops reconnecting, closes the link and waits for the sync to stop. Call
   * after the NBD server stopped taking requests. When both copies are known
   * identical (connected, nothing in flight or to sync, both flushed), the
   * keepdirty extents are cleared on disk so the next start syncs nothing.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    this.stopLoop();
    this.clearTimer?.stop();
    void this.verifier?.stop("resource stopping");
    await this.clearRun;
    await this.lock.acquire(0, this.sizeBytes).then((release) => this.cleanShutdown().finally(release));
    this.link?.close("resource stopping");
    await this.syncer?.stopped();
    await this.verifier?.done();
    await this.mapChain;
    // A failed map write is tried once more (the clear rounds that retried it have stopped):
    // extents set in memory since the last one that landed would not be resynced after a restart.
    if (this.mapFailed) {
      await this.persistMap().catch((error) => this.o.log("error", `activemap not written at stop: extents ` +
        `marked for sync since the last map write that landed will not be resynced: ${error}`));
    }
    this.retryLossRecord();
    await this.recordingLoss; // never rejects
  }

  private async cleanShutdown(): Promise<void> {
    const am = this.o.activemap;
    const link = this.link;
    if (!link?.isUp || am.syncExtentCount() > 0 || am.stats().inFlightExtents > 0) return;
    try {
      const { localOk, remoteOk } = await this.flushBoth(true);
      if (!localOk || !remoteOk || !link.isUp || am.syncExtentCount() > 0) return;
      if (am.dropKeepdirty()) await this.persistMap();
      this.o.log("info", "clean shutdown: both copies identical, activemap cleared");
    } catch (error) {
      this.o.log("warn", `clean shutdown incomplete (extents stay dirty): ${error}`);
    }
  }

  // ---- BlockDevice (NBD) -------------------------------------------------

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.counters.reads++;
    if (this.readsFromSecondary(offset, length)) return this.remoteRead(offset, length);
    if (this.localBehind && this.o.activemap.anySyncNeeded(offset, length)) {
      throw new IoError("the local copy of this range is older than the secondary's, which is not connected", "EIO");
    }
    try {
      return await this.data.read(offset, length);
    } catch (error) {
      this.counters.localErrors++;
      this.o.log("error", `local read at ${offset}+${length} failed: ${error}`);
      // The secondary's copy answers only where it is known to be current:
      // a dirty extent there may hold older data than the application wrote.
      if (this.link?.isUp && this.o.activemap.inStep(offset, length)) return this.remoteRead(offset, length);
      throw new IoError(`local read failed: ${error}`, "EIO");
    }
  }

  write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    this.counters.writes++;
    return this.mutate(offset, data.byteLength, data, fua);
  }

  trim(offset: number, length: number): Promise<void> {
    this.counters.deletes++;
    return this.mutate(offset, length, null, false);
  }

  writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    this.counters.deletes++;
    return this.mutate(offset, length, null, fua);
  }

  async flush(): Promise<void> {
    this.counters.flushes++;
    // While this node syncs from the secondary, the secondary's copy is the one the sync keeps
    // (see mutate): the writes answered since its last flush are durable only once it flushed
    // them, in every mode. Found by review: in async a FLUSH did not wait, and when the
    // secondary's host then crashed, the reconnect's sync (from the secondary again) pulled its
    // older data over writes the application was told are flushed; in every mode a Flush lost
    // with the link was answered success, with the same end. Taken now: a lost link resets it.
    const fromSecondary = this.syncSource === "secondary";
    const { localOk, remoteOk } = await this.flushBoth(this.mode !== "async" || fromSecondary);
    if (!localOk) throw new IoError("local flush failed", "EIO");
    if (fromSecondary && remoteOk === false) {
      throw new IoError("the secondary, whose copy this node is syncing from, did not flush", "EIO");
    }
  }

  /**
   * Flushes the local disk and, when connected, the secondary's. Waits for
   * the secondary only when `waitRemote` (async mode does not); `remoteOk` is
   * null when not connected (or not waited for).
   */
  private async flushBoth(waitRemote: boolean): Promise<{ localOk: boolean; remoteOk: boolean | null }> {
    const link = this.link?.isUp ? this.link : null;
    let remote: Promise<boolean> | null = null;
    if (link) {
      // Taken now: the flush, sent once the window has room, covers at least these (writes noted
      // meanwhile are left to the next flush, which is safe).
      const covered = this.remoteUnflushed;
      this.remoteUnflushed = new Set();
      // Within the window: the secondary counts a Flush as a request.
      remote = link.callWhenRoom({ type: MessageType.Flush }).then((call) => call.done).then(
        (reply) => reply.error === 0 || this.remoteFlushFailed(covered, errnoName(reply.error)),
        (error: unknown) => {
          // Anything but a lost link is a bug of ours: not hidden as a failed flush (found by review).
          if (!(error instanceof LinkDownError)) void this.linkBroken(link, error, "a Flush");
          return this.remoteFlushFailed(covered, error instanceof Error ? error.message : String(error));
        },
      );
    }
    const localOk = await this.localFlush();
    if (!remote || !waitRemote) return { localOk, remoteOk: null };
    return { localOk, remoteOk: await remote };
  }

  private noteRemoteWritten(offset: number, length: number): void {
    const am = this.o.activemap;
    const last = am.extentOf(offset + length - 1);
    for (let extent = am.extentOf(offset); extent <= last; extent++) this.remoteUnflushed.add(extent);
  }

  /** The secondary could not make its writes durable: they are resynced, never assumed. */
  private remoteFlushFailed(extents: Set<number>, why: string): false {
    this.counters.remoteErrors++;
    this.o.log("warn", `remote flush failed (${why}): ${extents.size} extents stay dirty until resynced`);
    this.markForSync(extents);
    return false;
  }

  private markForSync(extents: Set<number>): void {
    const am = this.o.activemap;
    let changed = false;
    for (const extent of extents) {
      const { offset, length } = am.extentRange(extent);
      if (am.markNeedsSync(offset, length)) changed = true;
    }
    // A failed write is retried by the clear rounds and the next application write (mapFailed).
    if (changed) this.persistMap().catch((error) => this.logMapFailure(error));
  }

  // ---- write path ---------------------------------------------------------

  /**
   * One application write or zeroing: under the range lock, mark the extents
   * dirty (persisting the map first when it changes), then write locally and
   * remotely at once, and answer when the replication mode says so (spec §2).
   * The extents are cleared in the activemap only when both sides finished.
   */
  private async mutate(offset: number, length: number, data: Uint8Array | null, fua: boolean) {
    const release = await this.lock.acquire(offset, length);
    let remoteDone: Promise<boolean> = Promise.resolve(false);
    let localResult: Promise<boolean> = Promise.resolve(false);
    let started = false;
    /** This write's number (see writesUnaccounted), once started. */
    let id = 0;
    /** The request slot `data` was received into (see RequestSlots), or -1. */
    const slot = data ? this.writeBuffers.slotOf(data) : -1;
    let dispatched = false;
    /** Resolves once the link no longer reads `data` (at once when nothing was sent). */
    let remoteReleased = () => Promise.resolve();
    /** The application is answered success. */
    let acknowledged = false;
    try {
      started = true; // from here on, afterWrite completes the activemap's writeStart
      id = ++this.writesStarted;
      this.writesUnaccounted.add(id);
      await this.beforeWrite(offset, length);
      const link = this.link?.isUp ? this.link : null;
      // A write the secondary will lack: counted on disk before it is done (spec §5).
      if (!link && !this.bumpedSinceDisconnect) await this.bumpLocalcnt();
      // Two parties, the local write and the link, each count down once done with the slot;
      // armed before either sees it (spec §11).
      if (slot >= 0) {
        this.writeBuffers.dispatch(slot, 2);
        dispatched = true;
      }
      const remote = link ? await this.sendRemote(link, offset, length, data, fua) : null;
      if (remote) remoteReleased = remote.released;
      localResult = this.localMutate(offset, length, data, fua);
      remoteDone = remote ? remote.done : remoteDone;
      // When to answer the application (spec §2): fullsync after both
      // writes, memsync after the local write and the early "received"
      // acknowledgement (a FUA write: after both), async after the local
      // write (the frame is queued).
      // A failed remote write only leaves the extents dirty. A failed local
      // write fails the request even when the secondary has the data: reads
      // are served and syncs are sourced from the local copy, so answering
      // success would hand back, and later resync, the old data.
      const localOk = await localResult;
      // A FUA write is a write and a flush of it: in memsync, as a FLUSH, it waits for both disks.
      // While this node syncs from the secondary, every mode waits as fullsync does: the
      // secondary's copy is the one the sync keeps, so a write is answered only once it has it
      // (else EIO, below), and the range lock held until then keeps the sync from pulling the
      // extent's older data over an answered write (found by review: memsync and async lost it).
      const waitDone = this.mode === "fullsync" || (fua && this.mode === "memsync") ||
        this.syncSource === "secondary";
      const remoteOk = remote ? await (waitDone ? remote.done : remote.received) : null;
      if (!localOk) throw new IoError("local write failed", "EIO");
      if (remoteOk === false) {
        // While this node syncs from the secondary, the secondary's copy is the one the sync
        // keeps: a write it lacks would be overwritten by its older data. Fail it instead.
        if (this.syncSource === "secondary") {
          throw new IoError("the secondary, whose copy this node is syncing from, failed the write", "EIO");
        }
        // The secondary lacks a write we are about to answer: the generation is on disk first,
        // so that a crash now cannot let a later promotion of the secondary look "in step".
        if (!this.bumpedSinceDisconnect) await this.bumpLocalcnt();
      }
      acknowledged = true;
    } finally {
      release();
      if (started) {
        void this.afterWrite(id, offset, length, localResult, remoteDone, acknowledged);
      }
      if (dispatched) {
        const partyDone = () => this.writeBuffers.partyDone(slot);
        void localResult.then(partyDone, partyDone);
        void remoteReleased().then(partyDone, partyDone);
      } else if (slot >= 0) {
        this.writeBuffers.give(data!); // refused before anything read it
      }
    }
  }

  /** Sends the write in ≤ MAX_IO_BYTES frames; resolves once they are queued. */
  private async sendRemote(
    link: RemoteLink, offset: number, length: number, data: Uint8Array | null, fua: boolean,
  ): Promise<{ received: Promise<boolean>; done: Promise<boolean>; released: () => Promise<void> }> {
    const calls: RemoteCall[] = [];
    /** Once the connection lets go of a piece that failed for a bug of ours, or null. */
    let broken: Promise<void> | null = null;
    const pieceMax = data ? MAX_IO_BYTES : DELETE_FRAME_MAX_BYTES;
    for (let at = 0; at < length; ) {
      const pieceBytes = Math.min(pieceMax, length - at);
      try {
        calls.push(await link.callWhenRoom({
          type: data ? MessageType.Write : MessageType.Delete,
          flags: fua ? FrameFlag.Fua : 0,
          offset: offset + at,
          length: pieceBytes,
          payload: data ? data.subarray(at, at + pieceBytes) : undefined,
        }));
      } catch (error) {
        // Anything but a lost link is a bug of ours (an assertion, a TypeError): not hidden as one.
        if (!(error instanceof LinkDownError)) {
          broken = this.linkBroken(link, error, `a request at ${offset + at}+${pieceBytes}`);
        }
        break; // the extents stay dirty
      }
      // Noted as sent, not at the reply: a reply read together with the link's close (the
      // secondary answers, then drops the link, in one write) is seen only after the close
      // marked the unflushed extents, and its extent was then cleared undurable (found by review).
      this.noteRemoteWritten(offset + at, pieceBytes);
      at += pieceBytes;
    }
    // Complete only if every piece went out: a zeroing of more than one frame that lost its link
    // after the first must leave the rest of its extents dirty.
    const complete = calls.length > 0 && calls.length === Math.ceil(length / pieceMax);
    const settle = (which: "received" | "done") =>
      Promise.all(calls.map((c) => which === "done"
        ? c.done.then((reply: Frame) => reply.error === 0)
        : c.received.then(() => true)))
        .then((oks) => complete && oks.every(Boolean))
        .catch(() => false);
    if (this.mode === "async") await link.drained();
    return {
      received: this.mode === "async" ? Promise.resolve(complete) : settle("received"),
      done: settle("done"),
      released: () => Promise.all([...calls.map((c) => c.released()), broken]).then(() => {}),
    };
  }

  /**
   * Sending `request` (e.g. "a Flush") failed for a bug of ours, not a lost link: logged with its
   * stack, and the link closed, as its state is unknown (the request may be registered and never
   * sent), so the caller goes on as with a lost link (a write's extents stay dirty and resync).
   * Returns when the connection lets go of what it was given (the failed request holds no
   * RemoteCall to say so).
   */
  private linkBroken(link: RemoteLink, error: unknown, request: string): Promise<void> {
    const what = error instanceof Error ? error.stack ?? String(error) : String(error);
    this.o.log("error", `internal error sending ${request} to the secondary (dropping the link): ${what}`);
    link.close(`internal error: ${error}`);
    return link.finished;
  }

  private async localMutate(
    offset: number, length: number, data: Uint8Array | null, fua: boolean,
  ): Promise<boolean> {
    try {
      if (data) await this.data.write(offset, data);
      else await this.data.zero(offset, length);
      if (fua && !(await this.localFlush())) return false;
      return true;
    } catch (error) {
      this.counters.localErrors++;
      this.o.log("error", `local write at ${offset}+${length} failed: ${error}`);
      return false;
    }
  }

  private async localFlush(): Promise<boolean> {
    try {
      await this.data.flush();
      return true;
    } catch (error) {
      this.counters.localErrors++;
      this.o.log("error", `local flush failed: ${error}`);
      this.recordingLoss ??= this.recordLocalWritesLost();
      await this.recordingLoss;
      return false;
    }
  }

  /**
   * The kernel may have dropped cached writes of the local disk, so its copy of the extents set
   * in the map may be older than what applications were told is written. Recorded on disk before
   * the failure is answered, so that no restart resyncs this copy over the secondary's (which
   * has those writes in fullsync and memsync) without an operator's `--force`.
   */
  private async recordLocalWritesLost(): Promise<void> {
    try {
      await recordLocalWritesLost(this.o.meta, this.o.log,
        "again needs --force (fail over to the secondary to keep its copy)");
    } catch (error) {
      // Every later flush fails too (stickyFlushFailure) and tries again, and so does every clear
      // round and a stop (retryLossRecord); metadata written meanwhile may lack the record.
      this.recordingLoss = null;
      const line = this.repeats.pass("record localWritesLost",
        `cannot record in the metadata that the local disk may have lost writes (retrying): ${error}`);
      if (line !== null) this.o.log("error", line);
    }
  }

  /**
   * A flush of the local disk failed and its record failed too: tries again, also when no flush
   * comes (found by review: only the next flush did, and an idle primary, or one with `metaflush
   * off` whose rounds flush nothing, could restart without the record and sync its copy over the
   * secondary's).
   */
  private retryLossRecord(): void {
    if (this.data.failure() === null || this.recordingLoss !== null || this.o.meta.metadata.localWritesLost) return;
    this.recordingLoss = this.recordLocalWritesLost();
  }

  /**
   * Marks the extents dirty, on disk before the data is written. On failure
   * the caller's afterWrite still completes the writeStart (as not synced).
   */
  private async beforeWrite(offset: number, length: number): Promise<void> {
    // The extents must be dirty on disk before the data is written. When the
    // map did not change, another write may have set their bits and still be
    // writing the map: wait for that too (the latest write covers all before it).
    // After a failed map write the disk may lack bits the memory map has set.
    const changed = this.o.activemap.writeStart(offset, length);
    const wait = changed || this.mapFailed ? this.persistMap() : this.mapLatest;
    if (!wait) return;
    try {
      await wait;
    } catch (error) {
      throw new IoError(`cannot write activemap: ${error}`, "EIO");
    }
  }

  private bumpLocalcnt(): Promise<void> {
    if (this.bumping) return this.bumping;
    this.bumping = (async () => {
      const localcnt = this.o.meta.metadata.localcnt + 1n;
      await this.o.meta.write({ localcnt }, { flush: this.metaflush });
      this.bumpedSinceDisconnect = true;
      this.o.log("info", `first write the secondary lacks: localcnt now ${localcnt}`);
    })().finally(() => {
      this.bumping = null;
    });
    return this.bumping;
  }

  /** Records write `id`'s outcome, then takes it out of writesUnaccounted. */
  private async afterWrite(
    id: number, offset: number, length: number, local: Promise<boolean>, remote: Promise<boolean>,
    acknowledged: boolean,
  ): Promise<void> {
    try {
      await this.recordWriteOutcome(offset, length, local, remote, acknowledged);
    } finally {
      this.writesUnaccounted.delete(id);
    }
  }

  private async recordWriteOutcome(
    offset: number, length: number, local: Promise<boolean>, remote: Promise<boolean>, acknowledged: boolean,
  ): Promise<void> {
    const [localOk, remoteOk] = await Promise.all([local, remote]);
    if (!remoteOk && this.link?.isUp) this.counters.remoteErrors++;

    // A write the application was told succeeded and the secondary lacks is a generation of
    // ours it has not seen, even if the link was up when it started: count it, so a later
    // promotion of the secondary cannot look "in step" (spec §5). (A write answered with an
    // error may hold either copy's data: the sync decides.)
    if (acknowledged && localOk && !remoteOk) {
      if (!this.bumpedSinceDisconnect) {
        await this.bumpLocalcnt().catch((error) => {
          // Uncounted, a later promotion of the secondary would look "in step" and its older
          // copy would be synced over this write: no connection until it is counted.
          this.o.log("error", `cannot bump localcnt: ${error}; dropping the link until it is recorded`);
          this.generationUnrecorded = true;
          this.link?.close("cannot record a write the secondary lacks");
        });
      }
      // Answered before the secondary's outcome was known (memsync, async): the secondary's
      // copy, which this node syncs from, lacks it, and ours lacks what the sync has not copied
      // yet. Neither may overwrite the other: the reconnect finds both changed (split-brain).
      if (this.syncSource === "secondary" && this.link?.isUp) {
        this.o.log("error", `a write at ${offset}+${length} answered to the application failed on the ` +
          "secondary while this node syncs from it: dropping the link");
        // The split-brain needs that generation on disk: until it is, no new connection.
        if (!this.bumpedSinceDisconnect) this.generationUnrecorded = true;
        this.link.close("a write failed on the secondary while syncing from it");
      }
    }
    // A failed local write (answered EIO) leaves the copies differing; it is
    // resynced like a remote failure, from the sync source. The map does not
    // change here: clean extents wait for the next clear round.
    this.o.activemap.writeComplete(offset, length, { synced: localOk && remoteOk });
  }

  /**
   * One clear round (every ACTIVEMAP_CLEAR_INTERVAL_MS): flushes both copies,
   * so the last writes to the extents that became clean are on both disks
   * (a power loss of both hosts must not leave a clean extent that differs),
   * then clears those extents in the on-disk map. Without a link only the
   * local copy is flushed: what the secondary had not flushed when the link
   * was lost was marked for sync then. A round also retries a map write that
   * failed, and, when it does not flush, the record of a failed local flush
   * (a restart must not forget either). Public for tests.
   */
  clearRound(): Promise<void> {
    if (this.clearRun) return this.clearRun;
    const am = this.o.activemap;
    const clearing = am.stats().clearPendingExtents > 0;
    // A round that flushes retries a failed record of a failed flush itself (localFlush).
    if (!clearing || !this.metaflush) this.retryLossRecord();
    if (!clearing && !this.mapFailed) return Promise.resolve();
    this.clearRun = (async () => {
      const cleared = clearing && (await this.clearExtents());
      // A failed map write is retried here too, not only by the next application write: the
      // extents a lost link marked for sync are set in memory only, and a restart before that
      // write came would not resync them (found by review).
      if (cleared || this.mapFailed) await this.persistMap();
    })()
      .catch((error) => this.logMapFailure(error))
      .finally(() => {
        this.clearRun = null;
      });
    return this.clearRun;
  }

  /** Flushes both copies, then clears the round's extents in memory; true if the on-disk map changed. */
  private async clearExtents(): Promise<boolean> {
    const am = this.o.activemap;
    am.beginClear();
    if (this.metaflush) {
      const { localOk, remoteOk } = await this.flushBoth(true);
      if (!localOk || remoteOk === false) {
        am.abortClear();
        return false;
      }
    }
    return am.finishClear();
  }

  /** A failed map write, retried every clear round while it fails: logged once a minute. */
  private logMapFailure(error: unknown): void {
    const line = this.repeats.pass("activemap write",
      `activemap write failed (retried every ${ACTIVEMAP_CLEAR_INTERVAL_MS} ms): ${error}`);
    if (line !== null) this.o.log("error", line);
  }

  /**
   * Writes the on-disk activemap. Calls coalesce: a write that has not started
   * yet is shared; its snapshot is taken when it starts, so every caller's
   * change is on disk when its promise resolves.
   */
  persistMap(): Promise<void> {
    if (this.mapPending) return this.mapPending;
    const pending = this.mapChain.then(async () => {
      this.mapPending = null;
      this.counters.activemapUpdates++;
      try {
        await this.o.meta.writeMap(this.o.activemap.diskMap(), { flush: this.metaflush });
        this.mapFailed = false; // a whole snapshot landed
      } catch (error) {
        this.mapFailed = true;
        throw error;
      }
    });
    this.mapPending = pending;
    this.mapLatest = pending;
    this.mapChain = pending.catch(() => {}).finally(() => {
      if (this.mapLatest === pending) this.mapLatest = null;
    });
    return pending;
  }

  // ---- reads from the secondary ------------------------------------------

  private readsFromSecondary(offset: number, length: number): boolean {
    if (this.link?.isUp !== true) return false;
    const am = this.o.activemap;
    if (this.syncSource === "secondary") return am.anySyncNeeded(offset, length);
    // After a failed flush the local disk may have dropped any write since the last good one:
    // those extents stay set in the on-disk map. Where the copies are in step (nothing to sync,
    // no write in flight), the secondary's has every write answered, so reads go there until a
    // failover. (Where it is behind, the local copy is the newer one; a write in flight is in
    // the local page cache.)
    return this.data.failure() !== null && am.anyDirtyOnDisk(offset, length) && am.inStep(offset, length);
  }

  /**
   * Reads a range from the secondary, in ≤ MAX_IO_BYTES pieces, each sent only when it fits in
   * the link's window (the data the secondary reads for us is held until we take it: without the
   * window, NBD clients' reads could make it hold gigabytes).
   */
  async remoteRead(offset: number, length: number): Promise<Uint8Array> {
    const link = this.link;
    if (!link?.isUp) throw new IoError("secondary not connected", "EIO");
    this.counters.remoteReads++;
    const out = new Uint8Array(length);
    const pieces: Promise<void>[] = [];
    for (let at = 0; at < length; at += MAX_IO_BYTES) {
      const pieceBytes = Math.min(MAX_IO_BYTES, length - at);
      let call: RemoteCall;
      try {
        call = await link.callWhenRoom({ type: MessageType.Read, offset: offset + at, length: pieceBytes });
      } catch (error) {
        pieces.push(Promise.reject(error));
        break;
      }
      const piece = call.done.then((reply) => {
        if (reply.error !== 0 || reply.payload.byteLength !== pieceBytes) {
          throw new IoError(`remote read failed: ${errnoName(reply.error)}`, "EIO");
        }
        out.set(reply.payload, at);
      });
      piece.catch(() => {}); // awaited below; it may fail while the next piece waits for room
      pieces.push(piece);
    }
    try {
      await Promise.all(pieces);
    } catch (error) {
      if (error instanceof LinkDownError) throw new IoError(`remote read: ${error.message}`, "EIO");
      throw error;
    }
    return out;
  }

  // ---- connection ---------------------------------------------------------

  private async connectLoop(): Promise<void> {
    const remote = this.o.config.remote;
    if (remote === null) {
      this.o.log("info", "remote is 'none': not connecting");
      return;
    }
    while (!this.stopped) {
      this.linkState = this.linkState === "split-brain" ? "split-brain" : "connecting";
      const closed = await this.connectOnce().catch((error: Error) => {
        this.noteLinkError(error.message);
        return null;
      });
      if (closed) await closed;
      if (this.stopped) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, RECONNECT_INTERVAL_MS);
        this.stopLoop = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  private noteLinkError(message: string): void {
    if (message !== this.lastLinkError) this.o.log("warn", `cannot connect: ${message}`);
    this.lastLinkError = message;
    if (this.linkState === "connecting") this.linkState = "disconnected";
  }

  /** Connects, handshakes, starts the sync; resolves with a promise of the link's end. */
  private async connectOnce(): Promise<Promise<void> | null> {
    if (this.generationUnrecorded) {
      await this.bumpLocalcnt(); // throws: this attempt fails, the loop retries
      this.generationUnrecorded = false;
    }
    const remote = this.o.config.remote!;
    this.helloSettings = linkSettings(this.o.config);
    // Read before connecting, at every attempt (a new key applies at the next one): a missing or
    // unreadable key fails here, naming the file, instead of reaching the secondary as a Goodbye.
    const key = primaryAuthKey(this.o.config);
    const conn = await this.o.network.connect({
      host: remote.host,
      port: remote.port,
      sourceHost: this.o.config.source?.host,
      timeoutMs: this.o.config.timeoutSeconds * 1000,
    });
    let result: HandshakeResult;
    // What our Hello tells the secondary: handshakeAsPrimary takes the counters at once.
    const helloLocalcnt = this.o.meta.metadata.localcnt;
    try {
      result = await handshakeAsPrimary(conn, {
        meta: this.o.meta,
        config: this.o.config,
        timeoutMs: this.o.config.timeoutSeconds * 1000,
        metaflush: this.metaflush,
        key,
      });
    } catch (error) {
      conn.close(`handshake failed: ${error}`);
      throw error;
    }
    if (result.kind === "refused") {
      conn.close("refused");
      return this.onRefused(result.reason, result.splitBrain);
    }
    try {
      return await this.onConnected(conn, result, helloLocalcnt);
    } catch (error) {
      conn.close(`cannot start replication: ${error}`);
      throw error;
    }
  }

  private onRefused(reason: string, splitBrain: boolean): null {
    if (splitBrain) {
      if (this.linkState !== "split-brain") {
        this.o.log("error", `split-brain detected: ${reason}`);
        this.o.hooks.run("split-brain", []);
      }
      this.linkState = "split-brain";
    } else {
      // Each retry is refused again: one line per reason per minute (the loop marks every
      // attempt "connecting", so the previous state cannot tell a repeat).
      const line = this.repeats.pass(reason, `secondary refused the connection: ${reason}`);
      if (line !== null) this.o.log("error", line);
      this.linkState = "refused";
    }
    this.lastLinkError = reason;
    return null;
  }

  private async onConnected(
    conn: import("./transport.ts").Connection,
    result: Extract<HandshakeResult, { kind: "accepted" }>,
    helloLocalcnt: bigint,
  ): Promise<Promise<void>> {
    const am = this.o.activemap;
    let changed = false;
    if (result.full) changed = am.markAllNeedsSync();
    else if (result.secondaryMap.byteLength > 0) {
      if (result.secondaryMap.byteLength < Math.ceil(am.extentCount / 8)) {
        throw new Error(`secondary's dirty map has ${result.secondaryMap.byteLength} bytes, too short`);
      }
      changed = am.mergeSyncMap(result.secondaryMap);
    }
    this.syncSource = result.source;
    this.peerCanVerify = result.peerCanVerify;
    this.peerCounters = { localcnt: result.peer.localcnt, remotecnt: result.peer.remotecnt };
    // Behind only when syncing from the secondary; syncing from here makes our copy the one both hold.
    this.localBehind = result.source === "secondary" && am.syncExtentCount() > 0;
    // Until persistMap below lands, the disk lacks the merged bits, and a write to such an extent
    // finds its bit set in memory and would not write the map (found by review: a failed
    // syncTarget write skipped persistMap and left it so). Writes persist the map until one lands.
    if (changed) this.mapFailed = true;
    if (this.localBehind) await this.o.meta.write({ syncTarget: true }, { flush: this.metaflush });
    if (changed) await this.persistMap();
    // A write made without the link since our Hello was built counted a generation the verdict
    // above does not know (its bump was still being written, or began meanwhile): a sync from the
    // secondary would pull its older data over that write, answered already (found by review).
    // Connect again: the next Hello carries it, and the secondary decides again.
    if (this.bumping !== null || this.o.meta.metadata.localcnt !== helloLocalcnt) {
      this.syncSource = "primary";
      throw new Error("a write the secondary lacks was counted during the handshake; connecting again");
    }
    let onDown!: () => void;
    const down = new Promise<void>((resolve) => (onDown = resolve));
    this.link = new RemoteLink(conn, {
      timeoutMs: this.o.config.timeoutSeconds * 1000,
      keepaliveMs: Math.min(KEEPALIVE_MS, (this.o.config.timeoutSeconds * 1000) / 2),
      maxInFlight: MAX_REMOTE_IN_FLIGHT,
      maxInFlightBytes: MAX_REMOTE_IN_FLIGHT_BYTES,
      clock: this.o.clock,
      codec: { compression: this.o.config.compression, checksum: this.o.config.checksum },
      pipeline: this.o.config.pipeline ? this.o.pipeline ?? null : null,
      onClose: (reason) => {
        this.onDisconnected(reason);
        onDown();
      },
    });
    this.linkState = "connected";
    this.bumpedSinceDisconnect = false;
    this.lastLinkError = "";
    this.linkLostReason = "";
    if (conn.closed) {
      // Closed while the metadata and map were written above: its only close event went to
      // the handshake, so the link would look up until its timeout.
      this.link.close("connection closed while it was being set up");
      return down;
    }
    if (linkSettings(this.o.config) !== this.helloSettings) {
      // Reloaded (SIGHUP) while this connection was set up: reconfigure() closed the old link.
      this.link.close("configuration changed while connecting");
      return down;
    }
    this.o.log("info", `connected to ${conn.remoteAddress} (${result.reason}; sync from ${result.source})`);
    this.o.hooks.run("connect", []);
    this.startSync(this.link);
    return down;
  }

  private onDisconnected(reason: string): void {
    this.o.log("warn", `disconnected from secondary: ${reason}`);
    this.linkState = "disconnected";
    this.linkLostReason = reason;
    // The secondary may have gone down with these in its cache; resyncing them is cheap.
    this.markForSync(this.remoteUnflushed);
    this.remoteUnflushed = new Set();
    this.syncSource = "primary";
    this.o.hooks.run("disconnect", []);
  }

  private startSync(link: RemoteLink): void {
    // No sync can finish (it must flush this disk) until the resource restarts.
    if (this.data.failure() !== null) {
      this.o.log("warn", "not syncing: a flush of the local disk failed; restart the resource");
      return;
    }
    // Found by review: a failed metadata or map write records the loss without failing a data
    // flush (metadata.ts); this copy may then lack answered writes and must not overwrite the
    // secondary's. Syncing from the secondary is what heals it, and goes on.
    if (this.syncSource === "primary" && this.o.meta.metadata.localWritesLost) {
      this.o.log("warn", "not syncing to the secondary: this node's disk may have lost writes " +
        "(localWritesLost); fail over to the secondary (README, Recovery)");
      return;
    }
    const syncer = new Synchronizer({
      link,
      activemap: this.o.activemap,
      lock: this.lock,
      data: this.data,
      source: this.syncSource,
      clock: this.o.clock,
      rateBytesPerSecond: this.o.config.syncRateBytesPerSecond,
      hooks: this.o.hooks,
      log: this.o.log,
      onComplete: () => this.onSyncComplete(link),
      slots: this.writeBuffers,
    });
    const previous = this.syncer?.stopped();
    this.syncer = syncer;
    syncer.start(previous);
    void syncer.stopped().then(() => this.scheduleResync(link));
  }

  /**
   * While connected, extents can become dirty again after a sync ended (a
   * remote write failed, or the sync itself failed on the secondary's disk):
   * start another pass after a pause, for as long as the link is up.
   */
  private scheduleResync(link: RemoteLink): void {
    if (this.stopped || !link.isUp || this.link !== link) return;
    const timer = setTimeout(() => {
      if (this.stopped || !link.isUp || this.link !== link) return;
      if (this.o.activemap.syncExtentCount() > 0) this.startSync(link);
      else this.scheduleResync(link);
    }, RESYNC_RETRY_MS);
    timer.unref?.();
  }

  /**
   * Both copies are identical: adopt the peer's counters (spec §5) so the
   * next connect is "in step", and tell the secondary to do the same.
   */
  private async onSyncComplete(link: RemoteLink): Promise<void> {
    const peer = this.peerCounters;
    assert.ok(peer !== null);
    // The secondary will record this localcnt as seen: a write it lacks from now on (also one
    // failing during the awaits below) is a new generation again. Taken before any await, so
    // that such a write's bump is never reported as seen. (An extra generation is harmless.)
    const seen = this.o.meta.metadata.localcnt;
    this.bumpedSinceDisconnect = false;
    await this.o.meta.write({ remotecnt: peer.localcnt, syncTarget: false }, { flush: this.metaflush });
    this.syncSource = "primary";
    this.localBehind = false;
    const reply = await link.callWhenRoom({ // within the window: the secondary counts it
      type: MessageType.SyncDone,
      payload: new TextEncoder().encode(JSON.stringify({
        localcnt: String(peer.localcnt), remotecnt: String(seen),
      })),
    }).then((call) => call.done).catch((error: unknown) => {
      // Anything but a lost link is a bug of ours: logged with its stack, and the link dropped,
      // not retried over the same link as a refusal of the secondary (found by review).
      if (!(error instanceof LinkDownError)) void this.linkBroken(link, error, "a SyncDone");
      return error instanceof Error ? error : new Error(String(error));
    });
    if (reply instanceof Error || reply.error !== 0) {
      const why = reply instanceof Error ? reply.message : errnoName(reply.error);
      // With the link up, the Synchronizer tries again (SyncDone may be repeated): otherwise the
      // secondary stayed a sync target, not promotable, behind a pair reported complete (found by
      // review). With it down, the next connection's sync ends with a SyncDone of its own.
      if (link.isUp) throw new Error(`secondary did not confirm the end of sync: ${why}`);
      this.o.log("warn", `secondary did not confirm the end of sync: ${why}`);
    }
  }

  /**
   * SIGHUP: swaps settings in place (the config object is shared with the
   * link and sync). A change of peer, wire format or replication mode closes
   * the link; the connect loop reconnects with the new settings.
   */
  reconfigure(next: ResourceConfig): void {
    const config = this.o.config;
    const reconnect = linkSettings(config) !== linkSettings(next);
    Object.assign(config, next);
    this.metaflush = next.metaflush; // found by review: kept the value the worker started with
    this.syncer?.setRate(next.syncRateBytesPerSecond);
    if (reconnect) this.link?.close("configuration changed");
    this.o.log("info", `configuration reloaded${reconnect ? "; reconnecting" : ""}`);
  }

  /**
   * Starts an online verify of both copies (lib/verifier.ts); extents whose copies differ are
   * resynced from here. Returns why it cannot start, or null.
   */
  startVerify(rateBytesPerSecond = 0): string | null {
    const link = this.link;
    if (this.stopped) return "the resource is stopping";
    if (!link?.isUp) return "the secondary is not connected";
    if (!this.peerCanVerify) return "the secondary runs an older hast without verify";
    if (this.verifier?.progress().state === "running") return "a verify is already running";
    if (this.localBehind) return "this node is still syncing from its secondary (its copy is the older one)";
    // Found by review: after a connect that found the secondary's copy the newer one, syncSource
    // stays "secondary" until the end of that sync is recorded (longer while recording fails),
    // also with nothing to copy. A difference marked meanwhile was read from, and synced from,
    // the secondary's copy, not from this one as the verify reports.
    if (this.syncSource === "secondary") {
      return "this node is syncing from its secondary (the end of that sync is not recorded yet); try again";
    }
    // Found by review: its differences would be marked for sync from this copy, which may lack
    // writes the secondary has, and reads of those extents would then come from here.
    if (this.data.failure() !== null) {
      return "a flush of the local disk failed, so this copy may lack writes the secondary has: " +
        "fail over to the secondary (README, Recovery)";
    }
    this.verifier = new Verifier({
      link, activemap: this.o.activemap, lock: this.lock, data: this.data, log: this.o.log,
      clock: this.o.clock, rateBytesPerSecond,
      onDiffering: (extent) => this.markForSync(new Set([extent])),
      writeMark: () => this.writesStarted,
      writesAccounted: (mark) => this.writesAccounted(mark),
      localTrusted: () => this.data.failure() === null,
    });
    return null;
  }

  /**
   * True once every write numbered up to `mark` (see writesStarted) has its outcome in the
   * activemap: its extents clean, or marked for sync after it failed on either side.
   */
  private writesAccounted(mark: number): boolean {
    const oldest = this.writesUnaccounted.values().next();
    return oldest.done === true || oldest.value > mark;
  }

  /** Changes the sync rate limit at run time (0 = unlimited). */
  setSyncRate(bytesPerSecond: number): void {
    this.o.config.syncRateBytesPerSecond = bytesPerSecond;
    this.syncer?.setRate(bytesPerSecond);
  }

  // ---- status ---------------------------------------------------------------


  status(): PrimaryStatus {
    const am = this.o.activemap;
    const connected = this.linkState === "connected";
    const syncing = this.syncer?.progress().state === "running";
    const dirtyBytes = am.dirtyBytes();
    let status: PrimaryStatus["status"] = "complete";
    if (this.linkState === "split-brain") status = "split-brain";
    // The local disk may have lost writes: one copy is not trustworthy (README, Recovery).
    else if (!connected || this.data.failure() !== null) status = "degraded";
    else if (syncing || dirtyBytes > 0) status = "syncing";
    return {
      status,
      link: this.linkState,
      linkEncrypted: connected && this.link?.encrypted === true,
      linkError: linkErrorText(this.lastLinkError, this.linkLostReason),
      dirtyBytes,
      syncSource: this.syncSource,
      sync: this.syncer?.progress() ?? null,
      verify: this.verifier?.progress() ?? null,
      remoteInFlight: this.link?.inFlight ?? 0,
      remoteInFlightBytes: this.link?.inFlightBytes ?? 0,
      remoteSendQueue: this.link?.sendQueueDepth ?? 0,
      metaflush: this.metaflush,
      localFlushFailure: this.data.failure(),
      lock: this.lock.stats(),
      counters: { ...this.counters },
      activemap: am.stats(),
      writeBuffers: this.writeBuffers.stats(),
    };
  }
}

export interface PrimaryStatus {
  status: "complete" | "degraded" | "syncing" | "split-brain";
  link: LinkState;
  /** The connected link is sealed (`encryption aes-256-gcm`); false while not connected. */
  linkEncrypted: boolean;
  linkError: string;
  dirtyBytes: number;
  syncSource: "primary" | "secondary";
  sync: SyncProgress | null;
  verify: VerifyProgress | null;
  remoteInFlight: number;
  remoteInFlightBytes: number;
  /** Frames held behind a write still being encoded on the codec threads. */
  remoteSendQueue: number;
  metaflush: boolean;
  /** The first failed flush of the local disk (every later flush fails too), or null. */
  localFlushFailure: string | null;
  lock: { held: number; waiting: number };
  counters: Primary["counters"];
  activemap: ReturnType<ActiveMap["stats"]>;
  writeBuffers: RequestSlotStats;
}

