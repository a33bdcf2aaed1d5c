/**
 * The secondary: accepts the primary's connection (handed over by the daemon
 * after it read the Hello), answers the handshake, and applies requests to
 * the local disk: in memsync and async strictly in arrival order, so its image
 * is always a state the primary had (spec §2, §7); in fullsync disjoint writes
 * in parallel (see applyConcurrently).
 */
import { createHash } from "node:crypto";
import { authenticateAsSecondary, signHelloReply } from "./auth.ts";
import type { ResourceConfig } from "./config.ts";
import { handshakeAsSecondary, type Hello } from "./handshake.ts";
import type { HookRunner } from "./hooks.ts";
import { recordLocalWritesLost, stickyFlushFailure, type DataStore, type MetaStore } from "./storage.ts";
import { linkErrorText, type Connection } from "./transport.ts";
import { CodecPipeline } from "./codec_pipeline.ts";
import { BufferPool, type BufferPoolStats } from "./buffer_pool.ts";
import { REFUSAL_LOG_INTERVAL_MS, RepeatLimiter } from "./log.ts";
import { RangeLock } from "./range_lock.ts";
import { decodePayload, encodePayload } from "./payload_codec.ts";
import {
  decodeJson, encodeFrame, encodeJson, Errno, FrameFlag, MAX_IO_BYTES, MAX_PAYLOAD_BYTES, MAX_REMOTE_IN_FLIGHT,
  MAX_REMOTE_IN_FLIGHT_BYTES, MessageType, ProtocolError, isRangeRequest, windowBytes, type Frame,
} from "./wire.ts";

/** Requests must be aligned to this (spec §7). */
export const SECTOR_BYTES = 512;
/**
 * Receive buffers kept for reuse: the primary has at most 64 MiB of writes in flight
 * (MAX_REMOTE_IN_FLIGHT_BYTES), so 72 of 1 MiB cover a full window and a few frames more.
 */
export const RECEIVE_POOL_BUFFERS = 72;
/** Payloads from this size on are received into pooled buffers. */
export const RECEIVE_POOL_MIN_BYTES = 64 * 1024;
/**
 * Connections a secondary takes through authentication and the handshake at once; one more is
 * refused and closed at once. Each may wait the resource's timeout for the peer's Auth, holding
 * a frame of up to MAX_PAYLOAD_BYTES meanwhile (found by review: they were unbounded). A primary
 * makes one connection at a time; the rest leave room for it to reconnect before an attempt
 * that it gave up on has timed out here.
 */
export const MAX_ATTACH_HANDSHAKES = 4;
/** Pause between attempts to record a loss (metadata.localWritesLost) whose record failed. */
export const LOSS_RECORD_RETRY_MS = 1000;
/**
 * Ranges of failed answered writes a session keeps apart (see lostRanges); past this they are
 * merged into one range from the first to the last, which only asks more of the sync.
 */
export const MAX_LOST_RANGES = 64;

export interface SecondaryOptions {
  config: ResourceConfig;
  data: DataStore;
  meta: MetaStore;
  hooks: HookRunner;
  /** Codec threads for large payloads (used when the resource's `pipeline` is on). */
  pipeline?: CodecPipeline | null;
  log: (level: "info" | "warn" | "error" | "debug", message: string) => void;
}

/**
 * What the secondary tracks per connection: its data requests not yet answered and their bytes
 * (see MAX_REMOTE_IN_FLIGHT), how many frames arrived, and the arrival number of the first frame
 * refused for bad data or a protocol violation.
 */
interface Inbound {
  requests: number;
  bytes: number;
  arrived: number;
  /**
   * memsync: the early acknowledgements not sent yet, in arrival order (null when none waits).
   * A frame's receipt is acknowledged only after every earlier one's, and only if it and all
   * frames before it were intact: the primary answers the application on it.
   */
  receipts: Promise<void> | null;
  /**
   * Frames that arrived after this one are never applied: the stream has a gap there, and our
   * image must stay a prefix of the primary's history (a later write without an earlier one
   * would be a state the primary never had). Frames before it still are (memsync may have
   * acknowledged their receipt). Infinity while the stream is whole.
   */
  brokenAt: number;
}

export type SecondaryLink = "waiting" | "connected" | "split-brain" | "refused";

export class Secondary {
  private conn: Connection | null = null;
  private linkState: SecondaryLink = "waiting";
  private lastRefusal = "";
  /** What ended the last adopted connection; "" while connected and before the first one. */
  private linkLostReason = "";
  private chain: Promise<void> = Promise.resolve();
  /** fullsync: requests being applied in parallel, and the lock that orders overlapping ones. */
  private readonly applying = new Set<Promise<void>>();
  private readonly lock = new RangeLock();
  private queued = 0;
  private replication = "fullsync";
  /**
   * The primary syncs from our copy (it is behind) until its SyncDone: meanwhile it answers
   * every write only after our reply, in every mode.
   */
  private syncingFromHere = false;
  /**
   * The data, per session: a failed flush means a cached write of this session may be lost,
   * and the kernel reports that to one fdatasync only, so every later flush of the session
   * fails too and the link drops (see applyAndReplyOrThrow); the primary then resyncs all it
   * wrote since the last good flush, in a new session.
   */
  private data: ReturnType<typeof stickyFlushFailure>;
  private metaflush: boolean;
  readonly counters = { reads: 0, writes: 0, deletes: 0, flushes: 0, verifies: 0, localErrors: 0, invalid: 0 };
  /**
   * Buffers the connection receives large payloads into (pass it to socketConnection); each is
   * given back once its request was applied (see BufferPool for why).
   */
  readonly receivePool = new BufferPool(MAX_PAYLOAD_BYTES, RECEIVE_POOL_BUFFERS, RECEIVE_POOL_MIN_BYTES);
  /** Refusals of a primary that keeps retrying: one line per peer host and reason per minute. */
  private readonly refusals = new RepeatLimiter(REFUSAL_LOG_INTERVAL_MS);
  /** Calls of attach() under way: at most MAX_ATTACH_HANDSHAKES. */
  private attaching = 0;
  /** Counts reloads that drop the link; a handshake that saw one begin under it is refused. */
  private configGeneration = 0;
  /** Repeated failures to record a loss: one line per minute. */
  private readonly repeats = new RepeatLimiter(REFUSAL_LOG_INTERVAL_MS);
  /**
   * A loss (a failed flush, or a failed write the primary may have answered) is not yet in the
   * metadata: retried every LOSS_RECORD_RETRY_MS (lossRetry) and at stop until it lands.
   */
  private lossUnrecorded = false;
  private lossRecording: Promise<void> | null = null;
  private lossRetry: ReturnType<typeof setInterval> | null = null;
  /** Counts losses, so that a SyncDone sees one that came while it cleared the record. */
  private losses = 0;
  private stopping = false;
  /**
   * This session's ranges of failed writes the primary may have answered, [start, end), sorted
   * and disjoint, less what a sync copy rewrote after the failure. The primary sends SyncDone
   * when its sync map is empty, which it may be while such a write is still in flight here (its
   * failure reaches the primary after the SyncDone): that SyncDone does not cover the write, so
   * it must not clear localWritesLost while a range is left (found by review). A new session
   * starts empty: the primary resyncs everything a lost link may have left behind before its
   * first SyncDone.
   */
  private lostRanges: Array<[number, number]> = [];

  constructor(private readonly o: SecondaryOptions) {
    this.metaflush = o.config.metaflush;
    this.data = stickyFlushFailure(o.data);
  }

  /**
   * Takes over a connection whose Hello was already read; replaces an older one. With
   * MAX_ATTACH_HANDSHAKES under way, refuses it at once.
   */
  async attach(conn: Connection, hello: Hello): Promise<void> {
    if (this.attaching >= MAX_ATTACH_HANDSHAKES) {
      const reason = `${MAX_ATTACH_HANDSHAKES} connections are already in their handshake here; try again`;
      conn.send(encodeJson(MessageType.HelloReply, { accepted: false, reason }));
      // Not this.refuse(): it would show the refusal in the status of the link, which this
      // connection may have nothing to do with, and hold the connection open a while.
      const line = this.refusals.pass("too many handshakes", `refused primary from ${conn.remoteAddress}: ${reason}`);
      if (line !== null) this.o.log("warn", line);
      conn.close(`refused: ${reason}`);
      return;
    }
    this.attaching++;
    try {
      await this.attachCounted(conn, hello);
    } finally {
      this.attaching--;
    }
  }

  private async attachCounted(conn: Connection, hello: Hello): Promise<void> {
    const generation = this.configGeneration;
    // Before anything else: an unauthenticated peer must not even drop the current primary's link.
    const unauthenticated = await authenticateAsSecondary(conn, hello, {
      keyPath: this.o.config.authkey, timeoutMs: this.o.config.timeoutSeconds * 1000,
      encryption: this.o.config.encryption,
    });
    if (unauthenticated !== null) {
      conn.send(encodeJson(MessageType.HelloReply, { accepted: false, reason: unauthenticated }));
      this.refuse(conn, false, unauthenticated);
      return;
    }
    this.conn?.close("replaced by a new connection from the primary");
    // Also when the last connection ended by itself (found by review: only a replaced one was
    // waited for): its requests still being applied were sent in its session's mode, and one
    // that fails is judged by it (answeredBeforeApplied), not by this one's; and the handshake
    // must see the loss such a failure records (it makes this copy unfit as a sync source).
    await this.settled();
    // Found by review: adopted after stop(), a connection went on writing to a provider being closed.
    const notNow = this.stopping ? "the resource is stopping here" : await this.lossStillUnrecorded();
    if (notNow !== null) {
      // A HelloReply, so that the primary logs why (a closed socket says nothing).
      this.sendRefusal(conn, notNow);
      this.refuse(conn, false, notNow);
      return;
    }
    const decision = await this.handshakeOrRefuse(conn, hello);
    if (decision === null) return;
    if (decision.kind !== "virgin" && decision.kind !== "sync") {
      const reason = decision.kind === "mismatch" ? decision.reason : decision.kind;
      this.refuse(conn, decision.kind === "split-brain", reason);
      return;
    }
    if (this.configGeneration !== generation) {
      // Reloaded during the handshake (found by review): it was checked against the old settings,
      // and a changed remote must not go on writing here; the primary connects again.
      this.refuse(conn, false, "the configuration changed during the handshake; connect again");
      return;
    }
    if (conn.closed) {
      // It ended during the handshake (its onClose was not ours yet): nothing to adopt.
      this.refuse(conn, false, "the connection closed during the handshake");
      return;
    }
    this.conn = conn;
    this.data = stickyFlushFailure(this.o.data);
    this.linkState = "connected";
    this.lastRefusal = "";
    this.linkLostReason = "";
    this.lostRanges = [];
    this.replication = hello.replication;
    this.syncingFromHere = decision.kind === "sync" && decision.source === "secondary";
    const how = decision.kind === "sync" ? `${decision.reason}, sync from ${decision.source}` : "both fresh";
    this.o.log("info", `primary connected from ${conn.remoteAddress} (${how})`);
    this.o.hooks.run("connect", []);
    let lastRxMs = Date.now();
    const inbound: Inbound = { requests: 0, bytes: 0, arrived: 0, receipts: null, brokenAt: Infinity };
    conn.onFrame = (frame) => {
      lastRxMs = Date.now();
      this.onFrame(conn, frame, inbound);
    };
    // A primary sends something at least every timeout/2 (a keepalive when idle); silence for
    // the whole timeout means the link or the primary is gone, even if TCP has not noticed.
    const timeoutMs = this.o.config.timeoutSeconds * 1000;
    const watchdog = setInterval(() => {
      const silentMs = Date.now() - lastRxMs;
      // The current setting: a reload may have changed it (the tick stays as it was).
      if (silentMs > this.o.config.timeoutSeconds * 1000) {
        conn.close(`nothing received for ${Math.round(silentMs)} ms (timeout)`);
      }
    }, Math.max(50, Math.min(1000, timeoutMs / 4)));
    watchdog.unref?.();
    conn.onClose = (reason) => {
      clearInterval(watchdog);
      if (this.conn !== conn) return;
      this.conn = null;
      this.linkState = "waiting";
      // Refusals from before the loss are older news than it (see linkErrorText in transport.ts).
      this.lastRefusal = "";
      this.linkLostReason = reason;
      this.o.log("warn", `primary disconnected: ${reason}`);
      this.o.hooks.run("disconnect", []);
    };
  }

  /**
   * Why no handshake may run yet, or null: a loss whose record (localWritesLost) has not landed,
   * after one more attempt now. The handshake reads the metadata, which then lacks the record:
   * this copy could be chosen as the sync source, or synced without the full sync its loss may
   * need (found by review). The primary retries; the record is tried every LOSS_RECORD_RETRY_MS.
   */
  private async lossStillUnrecorded(): Promise<string | null> {
    if (this.lossUnrecorded) await this.tryRecordLoss();
    if (!this.lossUnrecorded) return null;
    return "this node's disk may lack writes and the record of it (localWritesLost) cannot be written yet " +
      `(retried every ${LOSS_RECORD_RETRY_MS} ms); connect again once it is`;
  }

  /**
   * Runs the handshake; when it throws, refuses the connection and returns null (e.g. the
   * metadata cannot be read: this attempt only; the primary keeps its extents dirty and tries
   * again). The refusal goes out as a HelloReply, so that the primary logs and shows it as the
   * secondary's refusal, unless the handshake had sent its reply already (it threw while
   * sending the map): a connection gets one HelloReply.
   */
  private async handshakeOrRefuse(
    conn: Connection, hello: Hello,
  ): Promise<Awaited<ReturnType<typeof handshakeAsSecondary>> | null> {
    // handshakeAsSecondary sends nothing before its HelloReply, so a send that returned means
    // the reply was queued. Noted on the connection itself, not on a wrapper around it: the
    // authkey's session that signs the reply is kept by connection (auth.ts replySessions).
    const send = conn.send;
    let replied = false;
    conn.send = (pieces) => {
      const queued = send.call(conn, pieces);
      replied = true;
      return queued;
    };
    try {
      return await handshakeAsSecondary(conn, hello, {
        meta: this.o.meta, config: this.o.config, metaflush: this.metaflush,
      });
    } catch (error) {
      const reason = `handshake failed: ${error instanceof Error ? error.message : error}`;
      if (!replied) this.sendRefusal(conn, reason);
      this.refuse(conn, false, reason);
      return null;
    } finally {
      conn.send = send;
    }
  }

  /** Sends the HelloReply of a refusal (signed when the connection passed the authkey exchange). */
  private sendRefusal(conn: Connection, reason: string): void {
    conn.send(encodeJson(MessageType.HelloReply, signHelloReply(conn, { accepted: false, reason }, null)));
  }

  private refuse(conn: Connection, splitBrain: boolean, reason: string): void {
    if (splitBrain) {
      if (this.linkState !== "split-brain") {
        this.o.log("error", `split-brain detected; refusing the primary until "hast discard" is run on one side`);
        this.o.hooks.run("split-brain", []);
      }
      this.linkState = "split-brain";
    } else {
      // Keyed on the host: a primary that retries comes from a new port each time.
      const line = this.refusals.pass(`${hostOf(conn.remoteAddress)} ${reason}`,
        `refused primary from ${conn.remoteAddress}: ${reason}`);
      if (line !== null) this.o.log("error", line);
      if (this.linkState !== "connected") this.linkState = "refused";
    }
    this.lastRefusal = reason;
    setTimeout(() => conn.close(`refused: ${reason}`), 100);
  }

  /** SIGHUP: swaps settings in place; a change of wire format drops the link. */
  reconfigure(next: ResourceConfig): void {
    const config = this.o.config;
    // A changed remote too: the old primary must not go on writing here (found by review).
    const reconnect = config.checksum !== next.checksum || config.compression !== next.compression ||
      config.authkey !== next.authkey || config.encryption !== next.encryption ||
      JSON.stringify(config.remote) !== JSON.stringify(next.remote);
    Object.assign(config, next);
    this.metaflush = next.metaflush;
    if (reconnect) {
      this.configGeneration++;
      this.conn?.close("configuration changed");
    }
  }

  /** Closes the connection (role change). */
  async stop(): Promise<void> {
    this.stopping = true;
    this.conn?.close("resource stopping");
    await this.settled();
    this.stopLossRetry();
    // Once more (the timer's tries have stopped): the worker does not know of the loss.
    if (this.lossUnrecorded) await this.tryRecordLoss();
    await this.lossRecording;
  }

  /** Resolves once every request received so far has been applied. */
  private async settled(): Promise<void> {
    await this.chain;
    await Promise.all([...this.applying]);
  }

  private onFrame(conn: Connection, frame: Frame, inbound: Inbound): void {
    // The received payload: decoding may replace frame.payload, and a pooled buffer goes back
    // only when nothing reads it any more (its write was applied, or it was refused).
    const received = frame.payload;
    const pooled = this.receivePool.owns(received);
    if (conn.closed) {
      // The rest of a chunk whose earlier frame made us close: nothing after that is applied.
      if (pooled) this.receivePool.give(received);
      return;
    }
    if (frame.type === MessageType.Keepalive) {
      conn.send(encodeFrame({ type: MessageType.Keepalive }));
      return;
    }
    const arrival = ++inbound.arrived;
    const leave = this.enterWindow(conn, frame, inbound, arrival);
    const admitted = leave !== null && this.decodeAndAdmit(conn, frame, inbound, arrival);
    const receipt = frame.type === MessageType.Write && this.replication === "memsync" &&
      !(frame.flags & FrameFlag.Sync) ? this.acknowledgeReceipt(conn, frame, admitted, inbound, arrival) : null;
    if (admitted === false) {
      leave?.();
      if (pooled) this.receivePool.give(received);
      return;
    }
    this.queued++;
    const ordered = this.replication !== "fullsync" && (frame.flags & FrameFlag.Sync) === 0 &&
      frame.type !== MessageType.Read && frame.type !== MessageType.Verify;
    const { applied, task } = this.schedule(conn, frame, admitted, ordered ? this.chain : null,
      () => arrival < inbound.brokenAt, receipt);
    void task.finally(() => {
      leave!();
      if (pooled) this.receivePool.give(received);
    });
    // A flush waits for the writes before it; the writes after it need not wait for the flush
    // (an fdatasync of a lot of dirty data would stall them, and the primary flushes every second),
    // nor for the flush of a FUA write: only for its data.
    if (ordered && frame.type !== MessageType.Flush) this.chain = applied;
  }

  /**
   * Applies a request once the requests it must follow are done. Every request takes the
   * range lock of its range on arrival (granted in FIFO order), so overlapping requests keep
   * their arrival order; Flush and SyncDone wait for everything that arrived before them.
   * fullsync: the primary answers the application only after our write, so writes to disjoint
   * ranges carry no order between them and run in parallel; so do sync copies (FrameFlag.Sync)
   * in every mode, since the image is not consistent before the sync ends anyway, and reads
   * (the range lock orders them after the writes they overlap). memsync and async writes, and
   * their flushes, also wait for the previous write of the chain (`after`): there the application
   * may have been answered before we wrote, so our image must always be a prefix of the
   * primary's history (also if this process dies: its page cache then holds a prefix).
   */
  private schedule(
    conn: Connection, frame: Frame, admitted: boolean | Promise<boolean>, after: Promise<void> | null,
    stillWhole: () => boolean, receipt: Promise<void> | null,
  ): { applied: Promise<void>; task: Promise<void> } {
    const ranged = isRangeRequest(frame.type);
    const locked = ranged && frame.length > 0 ? this.lock.acquire(frame.offset, frame.length) : null;
    const before = ranged ? [] : [...this.applying];
    let markApplied = () => {};
    const applied = new Promise<void>((resolve) => (markApplied = resolve));
    const task = (async () => {
      const release = locked ? await locked : null;
      try {
        await after;
        await Promise.all(before);
        // memsync: the early acknowledgement leaves before the write starts (and so before the
        // final reply), also when it waited for an earlier frame's check.
        await receipt;
        // Asked when its turn comes: a frame before it may have failed its decoding meanwhile.
        await this.applyAndReply(conn, frame, stillWhole() ? admitted : false, markApplied);
      } finally {
        release?.();
        markApplied();
      }
    })();
    this.applying.add(task);
    void task.finally(() => this.applying.delete(task));
    return { applied, task };
  }

  /**
   * Never rejects (the chain would stop): an unexpected failure drops the connection.
   * `applied` is called once the request's data landed (before a FUA write's flush).
   */
  private async applyAndReply(
    conn: Connection, frame: Frame, admitted: boolean | Promise<boolean>, applied: () => void,
  ) {
    try {
      await this.applyAndReplyOrThrow(conn, frame, admitted, applied);
    } catch (error) {
      this.o.log("error", `request ${frame.type} at ${frame.offset}+${frame.length} failed: ${error}`);
      conn.close(`internal error: ${error}`);
    }
  }

  private async applyAndReplyOrThrow(
    conn: Connection, frame: Frame, admitted: boolean | Promise<boolean>, applied: () => void,
  ) {
    if (!(await admitted)) {
      this.queued--;
      return;
    }
    const reply = await this.apply(frame, applied);
    this.queued--;
    // Recorded also when the link closed meanwhile (found by review: it returned first, yet a
    // primary that died is why a link closes, and this node is then the one to be promoted).
    const flushFailure = this.data.failure();
    if (flushFailure !== null) {
      // Our copy may now lack writes the application was told are done: durable before anyone
      // hears of it, so that this node is not promoted without --force before a resync.
      await this.recordLocalWritesLost();
      if (conn.closed) return;
      // Answer first, so the primary sees the error for this request, then drop the link.
      if (!reply.payload) conn.send(encodeFrame({ type: MessageType.Reply, seq: frame.seq, ...reply }));
      conn.close(`flush failed: ${flushFailure}`);
      return;
    }
    if (reply.error !== undefined && this.answeredBeforeApplied(frame)) {
      // memsync and async: the primary may have answered the application already, so our copy
      // lacks a write it was told is done (and, in order, no longer is a state the primary had).
      // Durable before the primary hears of it: should the primary fail before it records its
      // side (localcnt), this node must not be promoted without --force.
      this.lostRanges = addRange(this.lostRanges, frame.offset, frame.offset + frame.length);
      await this.recordLocalWritesLost();
    } else if (reply.error === undefined && frame.type === MessageType.Write && (frame.flags & FrameFlag.Sync)) {
      // A sync copy applied after a failed write over its range (the range lock keeps their
      // arrival order) holds the primary's data, that write's included.
      this.lostRanges = subtractRange(this.lostRanges, frame.offset, frame.offset + frame.length);
    }
    if (conn.closed) return;
    if (reply.payload) {
      const { flags, pieces } = encodePayload(reply.payload, this.o.config);
      // The reply's length is its data's (a read's range, a verify's digest).
      const length = reply.payload.byteLength;
      conn.send(encodeFrame({ type: MessageType.Reply, seq: frame.seq, length, flags, pieces }));
    } else {
      conn.send(encodeFrame({ type: MessageType.Reply, seq: frame.seq, ...reply }));
    }
  }

  /**
   * Counts a data request into the connection's window; returns what takes it out again (call
   * it once the request is done, before its reply leaves), or null when the primary exceeded the
   * window: a protocol violation, the connection is dropped.
   */
  private enterWindow(conn: Connection, frame: Frame, inbound: Inbound, arrival: number): (() => void) | null {
    const { type } = frame;
    // Flush and SyncDone count as requests too (no bytes): each one waits for everything before
    // it and holds a task meanwhile, so uncounted, a primary could queue any number behind a slow
    // fdatasync (found by review). The primary sends them within its window.
    if (!isRangeRequest(type) && type !== MessageType.Flush && type !== MessageType.SyncDone) return () => {};
    const bytes = windowBytes(type, frame.length);
    const requests = inbound.requests + 1;
    const total = inbound.bytes + bytes;
    if (requests <= MAX_REMOTE_IN_FLIGHT && (requests === 1 || total <= MAX_REMOTE_IN_FLIGHT_BYTES)) {
      inbound.requests = requests;
      inbound.bytes = total;
      return () => {
        inbound.requests--;
        inbound.bytes -= bytes;
      };
    }
    this.breakStream(frame, inbound, arrival);
    this.counters.invalid++;
    const why = `protocol violation: more than ${MAX_REMOTE_IN_FLIGHT} requests or ` +
      `${MAX_REMOTE_IN_FLIGHT_BYTES} bytes in flight (${requests} requests, ${total} bytes)`;
    this.o.log("error", `dropping connection: ${why}`);
    conn.close(why);
    return null;
  }

  /**
   * Verifies and expands a write's payload (on the codec threads when it is large and the
   * codec has work), then admits the frame. False (or a promise of it) if it must not be
   * applied. Frames still go to the apply chain in arrival order, so a write decoded on a
   * thread is applied in its place, not when its decoding ends.
   */
  private decodeAndAdmit(
    conn: Connection, frame: Frame, inbound: Inbound, arrival: number,
  ): boolean | Promise<boolean> {
    if (frame.type !== MessageType.Write || frame.length > MAX_IO_BYTES) return this.admit(conn, frame);
    const config = this.o.config;
    const pipeline = config.pipeline ? this.o.pipeline : null;
    if (pipeline && CodecPipeline.wants(frame.payload.byteLength, config)) {
      return pipeline.decode(frame.flags, frame.payload, frame.length, config.checksum).then(
        (payload) => {
          frame.payload = payload;
          // Intact: applied even if the link closed meanwhile, like every frame that arrived
          // before the close. Found by review: refused here, it left a gap that later writes,
          // already admitted and waiting in the chain, were applied across (memsync and async:
          // an image the primary never had).
          return this.admit(conn, frame);
        },
        (error) => this.dropUndecoded(conn, frame, error, inbound, arrival),
      );
    }
    try {
      frame.payload = decodePayload(frame.flags, frame.payload, frame.length, config.checksum);
    } catch (error) {
      return this.dropUndecoded(conn, frame, error, inbound, arrival);
    }
    return this.admit(conn, frame);
  }

  /**
   * A write whose payload was not decoded is never applied, and nothing after it in the stream
   * (breakStream). A ProtocolError is the peer's bad data (dropForBadData). Anything else is
   * ours: the codec pipeline is closing (its jobs then fail with a plain Error) or a bug. Found
   * by review: that was counted and logged as the primary's bad data, also in a normal shutdown.
   * The link is dropped all the same, so the primary resyncs the extent.
   */
  private dropUndecoded(conn: Connection, frame: Frame, error: unknown, inbound: Inbound, arrival: number): false {
    if (error instanceof ProtocolError) return this.dropForBadData(conn, frame, error, inbound, arrival);
    this.breakStream(frame, inbound, arrival);
    const why = error instanceof Error ? error.message : String(error);
    const what = `write at ${frame.offset}+${frame.length} not applied, its payload could not be checked here: ${why}`;
    if (conn.closed || this.stopping) {
      this.o.log("debug", `${what} (the connection is closing)`);
    } else {
      this.o.log("error", `dropping connection: ${what}`);
    }
    conn.close(`cannot check data: ${why}`);
    return false;
  }

  /** Never write data that failed verification: drop the connection; the primary keeps the
   *  extent dirty and resyncs it (spec §7). */
  private dropForBadData(
    conn: Connection, frame: Frame, error: ProtocolError, inbound: Inbound, arrival: number,
  ): false {
    this.breakStream(frame, inbound, arrival);
    const why = error.message;
    this.counters.invalid++;
    this.o.log("error", `dropping connection: write at ${frame.offset}+${frame.length}: ${why}`);
    conn.close(`bad data: ${why}`);
    return false;
  }

  /**
   * A frame refused for bad data or a protocol violation: a gap in the application's writes if
   * it is one, and nothing after it is applied. A sync copy (FrameFlag.Sync) leaves no gap: the
   * primary keeps its range dirty, and writes after it (some already acknowledged as received)
   * are still applied.
   */
  private breakStream(frame: Frame, inbound: Inbound, arrival: number): void {
    if ((frame.flags & FrameFlag.Sync) !== 0) return;
    inbound.brokenAt = Math.min(inbound.brokenAt, arrival);
  }

  /** Validates a request (EINVAL reply if invalid). */
  private admit(conn: Connection, frame: Frame): boolean {
    const invalid = this.validate(frame);
    if (invalid) {
      this.counters.invalid++;
      this.o.log("warn", `invalid request from primary: ${invalid}`);
      conn.send(encodeFrame({ type: MessageType.Reply, seq: frame.seq, error: Errno.EINVAL }));
      return false;
    }
    return true;
  }

  /**
   * memsync: acknowledges the receipt of a write before writing it (spec §2), once it was found
   * intact and every earlier acknowledgement has left. A large write verified on a codec thread
   * can finish after a small one that arrived later: that one's acknowledgement waits, since we
   * never apply it if the earlier one turns out corrupt. Returns what settles once it has left
   * (or was withheld), which the write waits for; null when that happened at once.
   */
  private acknowledgeReceipt(
    conn: Connection, frame: Frame, admitted: boolean | Promise<boolean>, inbound: Inbound, arrival: number,
  ): Promise<void> | null {
    const send = (intact: boolean) => {
      if (!intact || arrival >= inbound.brokenAt || conn.closed) return;
      conn.send(encodeFrame({ type: MessageType.Reply, seq: frame.seq, flags: FrameFlag.Received }));
    };
    if (inbound.receipts === null && typeof admitted === "boolean") {
      send(admitted);
      return null;
    }
    const receipt = (inbound.receipts ?? Promise.resolve()).then(() => admitted).then(send);
    inbound.receipts = receipt;
    void receipt.finally(() => {
      if (inbound.receipts === receipt) inbound.receipts = null;
    });
    return receipt;
  }

  /** Returns why a request is invalid (→ EINVAL), or null. */
  private validate(frame: Frame): string | null {
    const size = this.o.meta.metadata.datasizeBytes;
    const { type, offset, length } = frame;
    if (type === MessageType.SyncDone || type === MessageType.Flush) return null;
    if (!isRangeRequest(type)) return `unexpected message type ${type}`;
    if (length === 0) return `zero length at offset ${offset}`;
    if (type !== MessageType.Delete && length > MAX_IO_BYTES) return `length ${length} > ${MAX_IO_BYTES}`;
    if (offset % SECTOR_BYTES !== 0 || length % SECTOR_BYTES !== 0) {
      return `offset ${offset} or length ${length} not ${SECTOR_BYTES}-byte aligned`;
    }
    if (offset + length > size) return `range ${offset}+${length} beyond datasize ${size}`;
    if (type === MessageType.Write && frame.payload.byteLength !== length) {
      return `write payload ${frame.payload.byteLength} bytes, length ${length}`;
    }
    return null;
  }

  /** Applies a request; calls `applied` once its data landed (before a FUA write's flush). */
  private async apply(frame: Frame, applied: () => void): Promise<Partial<Frame>> {
    try {
      switch (frame.type) {
        case MessageType.Read:
          this.counters.reads++;
          return { payload: await this.data.read(frame.offset, frame.length) };
        case MessageType.Verify: {
          this.counters.verifies++;
          const data = await this.data.read(frame.offset, frame.length);
          return { payload: createHash("sha256").update(data).digest() };
        }
        case MessageType.Write:
          this.counters.writes++;
          await this.data.write(frame.offset, frame.payload);
          applied();
          if (frame.flags & FrameFlag.Fua) await this.data.flush();
          return {};
        case MessageType.Delete:
          this.counters.deletes++;
          await this.data.zero(frame.offset, frame.length);
          applied();
          if (frame.flags & FrameFlag.Fua) await this.data.flush();
          return {};
        case MessageType.Flush:
          this.counters.flushes++;
          await this.data.flush();
          return {};
        case MessageType.SyncDone:
          await this.syncDone(frame);
          return {};
      }
    } catch (error) {
      this.counters.localErrors++;
      this.o.log("error", `local ${frame.type} at ${frame.offset}+${frame.length} failed: ${error}`);
      return { error: Errno.EIO };
    }
    return { error: Errno.EINVAL };
  }

  /**
   * True for an application write or zeroing the primary may answer before our reply: memsync
   * and async, not a sync copy (a sync target is marked as such until the sync completes), and
   * not while the primary syncs from us (it then waits for our reply, a failure is its EIO).
   */
  private answeredBeforeApplied(frame: Frame): boolean {
    return (frame.type === MessageType.Write || frame.type === MessageType.Delete) &&
      (frame.flags & FrameFlag.Sync) === 0 && this.replication !== "fullsync" && !this.syncingFromHere;
  }

  /**
   * Records metadata.localWritesLost (cleared by a completed sync, see syncDone). Never rejects:
   * a failed record is tried again every LOSS_RECORD_RETRY_MS and at stop, until it lands
   * (found by review: it was only logged and then forgotten, and this node could later be
   * promoted without --force with a copy that lacks an answered write).
   */
  private async recordLocalWritesLost(): Promise<void> {
    this.losses++;
    this.lossUnrecorded = true;
    await this.tryRecordLoss();
  }

  /** One attempt at a time; later losses are covered by the attempt under way (one flag). */
  private tryRecordLoss(): Promise<void> {
    this.lossRecording ??= this.writeLossRecord().finally(() => (this.lossRecording = null));
    return this.lossRecording;
  }

  private async writeLossRecord(): Promise<void> {
    try {
      await recordLocalWritesLost(this.o.meta, this.o.log, "needs --force until a sync from the primary completes");
      this.lossUnrecorded = false;
      this.stopLossRetry();
    } catch (error) {
      const line = this.repeats.pass("record localWritesLost",
        `cannot record in the metadata that the local disk may have lost writes (retrying): ${error}`);
      if (line !== null) this.o.log("error", line);
      if (this.lossRetry === null && this.lossUnrecorded && !this.stopping) {
        this.lossRetry = setInterval(() => {
          // A completed sync may have cleared it meanwhile (see syncDone).
          if (this.lossUnrecorded) void this.tryRecordLoss();
          else this.stopLossRetry();
        }, LOSS_RECORD_RETRY_MS);
        this.lossRetry.unref?.();
      }
    }
  }

  private stopLossRetry(): void {
    if (this.lossRetry !== null) clearInterval(this.lossRetry);
    this.lossRetry = null;
  }

  /** The primary finished the sync: our copy is complete; commit counters (spec §5). */
  private async syncDone(frame: Frame): Promise<void> {
    const body = decodeJson(frame);
    const remotecnt = BigInt(String(body.remotecnt));
    this.syncingFromHere = false; // the primary's writes after this may be answered before ours
    await this.data.flush();
    await this.o.meta.writeMap(new Uint8Array(this.o.meta.metadata.mapSizeBytes), { flush: this.metaflush });
    // A failed answered write this sync did not copy again keeps the record (see lostRanges).
    const complete = this.lostRanges.length === 0;
    const losses = this.losses;
    if (complete) {
      this.lossUnrecorded = false;
      this.stopLossRetry();
      await this.lossRecording; // an attempt under way must not land after the clear below
    }
    await this.o.meta.write(
      { remotecnt, syncTarget: false, discardPending: false, ...(complete ? { localWritesLost: false } : {}) },
      { flush: this.metaflush },
    ).catch((error: unknown) => {
      if (complete && losses > 0) void this.recordLocalWritesLost(); // keep what was there
      throw error;
    });
    // A loss that came while the record was cleared (a later request may fail meanwhile).
    if (complete && this.losses !== losses) void this.recordLocalWritesLost();
    this.o.log("info", `synchronised with primary (remotecnt now ${remotecnt})` +
      (complete ? "" : `; writes that failed here are still to be copied again, so it still needs --force`));
  }


  status(): SecondaryStatus {
    const m = this.o.meta.metadata;
    let status: SecondaryStatus["status"] = "degraded";
    if (this.linkState === "split-brain") status = "split-brain";
    else if (this.linkState === "connected") status = m.syncTarget ? "syncing" : "complete";
    return {
      status,
      link: this.linkState,
      linkEncrypted: this.linkState === "connected" && this.conn?.encrypted === true,
      linkError: linkErrorText(this.lastRefusal, this.linkLostReason),
      queued: this.queued,
      counters: { ...this.counters },
      receiveBuffers: this.receivePool.stats(),
    };
  }
}

export interface SecondaryStatus {
  status: "complete" | "degraded" | "syncing" | "split-brain";
  link: SecondaryLink;
  /** The connected link is sealed (`encryption aes-256-gcm`); false while not connected. */
  linkEncrypted: boolean;
  linkError: string;
  queued: number;
  counters: Secondary["counters"];
  receiveBuffers: BufferPoolStats;
}
void Errno;

/** `ranges` (sorted, disjoint [start, end)) with [start, end) added; at most MAX_LOST_RANGES. */
function addRange(ranges: Array<[number, number]>, start: number, end: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const range of [...ranges, [start, end] as [number, number]].sort((a, b) => a[0] - b[0])) {
    const last = out.at(-1);
    if (last !== undefined && range[0] <= last[1]) last[1] = Math.max(last[1], range[1]);
    else out.push([range[0], range[1]]);
  }
  return out.length <= MAX_LOST_RANGES ? out : [[out[0]![0], out.at(-1)![1]]];
}

/** `ranges` (sorted, disjoint [start, end)) less [start, end); at most MAX_LOST_RANGES. */
function subtractRange(ranges: Array<[number, number]>, start: number, end: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const [a, b] of ranges) {
    if (b <= start || a >= end) out.push([a, b]);
    else {
      if (a < start) out.push([a, start]);
      if (b > end) out.push([end, b]);
    }
  }
  return out.length <= MAX_LOST_RANGES ? out : [[out[0]![0], out.at(-1)![1]]];
}

/** The host of a Connection's remoteAddress ("host:port", the host possibly IPv6). */
function hostOf(remoteAddress: string): string {
  const colon = remoteAddress.lastIndexOf(":");
  return colon < 0 ? remoteAddress : remoteAddress.slice(0, colon);
}
