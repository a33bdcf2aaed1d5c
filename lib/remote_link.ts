/**
 * The primary's side of one connection to the secondary: numbered requests,
 * replies matched by seq, the memsync early "received" acknowledgement,
 * request timeouts and keepalives (spec §7).
 *
 * A request is registered in the pending table *before* its frame is sent,
 * so a fast reply always finds it (spec §11).
 */
import assert from "node:assert/strict";
import type { Connection } from "./transport.ts";
import { CodecPipeline } from "./codec_pipeline.ts";
import { decodePayload, encodePayload, type CodecOptions } from "./payload_codec.ts";
import { VERIFY_DIGEST_BYTES } from "./verifier.ts";
import { DATA_FLAGS, encodeFrame, FrameFlag, MessageType, ProtocolError, windowBytes, type Frame } from "./wire.ts";

/** Injectable time source. */
export interface Clock {
  now(): number;
  sleep(ms: number): Promise<void>;
  setInterval(fn: () => void, ms: number): { stop(): void };
}

export const systemClock: Clock = {
  now: () => performance.now(),
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
  setInterval(fn, ms) {
    const timer = setInterval(fn, ms);
    timer.unref?.();
    return { stop: () => clearInterval(timer) };
  },
};

/** Thrown into pending requests when the link goes down. */
export class LinkDownError extends Error {
  override name = "LinkDownError";
}

interface Pending {
  /** What was asked: a reply must fit it (replyData). */
  type: MessageType;
  length: number;
  sentAtMs: number;
  /** Data bytes the request holds in memory until its reply (write payload or read length). */
  bytes: number;
  received: Deferred<void>;
  done: Deferred<Frame>;
  /** The payload's encoding on a codec thread, until it settles (the thread reads the payload). */
  encoding: Promise<unknown> | null;
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: Error) => void;
  settled: boolean;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (error: Error) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  const d: Deferred<T> = {
    promise,
    settled: false,
    resolve: (v) => {
      d.settled = true;
      resolve(v);
    },
    reject: (e) => {
      d.settled = true;
      reject(e);
    },
  };
  promise.catch(() => {}); // observed by whoever awaits; never an unhandled rejection
  return d;
}

export interface RemoteCall {
  /** Resolves when the secondary has the data (early ack) or at the final reply. */
  received: Promise<void>;
  /** Resolves with the final reply (check `error`); rejects if the link goes down. */
  done: Promise<Frame>;
  /**
   * Resolves once nothing reads the request's payload any more: at the final reply, or, if the
   * link went down first, once its connection is gone and no codec thread reads it. Never rejects.
   * (A function: most payloads are garbage-collected buffers that need no such promise.)
   */
  released(): Promise<void>;
}

export interface RemoteLinkOptions {
  timeoutMs: number;
  keepaliveMs: number;
  maxInFlight: number;
  /** Data bytes outstanding at most (a larger single request still goes alone). */
  maxInFlightBytes: number;
  clock: Clock;
  /** Compression and checksum agreed in the handshake. */
  codec: CodecOptions;
  /** Where large payloads are encoded off the event loop; null encodes everything inline. */
  pipeline?: CodecPipeline | null;
  onClose: (reason: string) => void;
  /** Frames that are not replies (e.g. none today) go here. */
  onOtherFrame?: (frame: Frame) => void;
}

export class RemoteLink {
  private readonly pending = new Map<number, Pending>();
  private pendingBytes = 0;
  private nextSeq = 1;
  private lastRxMs: number;
  private lastTxMs: number;
  private readonly ticker: { stop(): void };
  private readonly slotWaiters: (() => void)[] = [];
  private closedReason: string | null = null;
  /**
   * Frames in call order whose encoding is still running on the pipeline, with those behind
   * them: the secondary applies frames in arrival order, so none may overtake another.
   */
  private readonly sendQueue: { pieces: Uint8Array[] | null }[] = [];

  constructor(
    private readonly conn: Connection,
    private readonly options: RemoteLinkOptions,
  ) {
    this.lastRxMs = this.lastTxMs = options.clock.now();
    conn.onFrame = (frame) => this.onFrame(frame);
    conn.onClose = (reason) => this.shutdown(reason);
    const tickMs = Math.max(50, Math.min(1000, options.keepaliveMs / 4));
    this.ticker = options.clock.setInterval(() => this.tick(), tickMs);
  }

  get isUp(): boolean {
    return this.closedReason === null;
  }

  /** The connection is sealed (`encryption aes-256-gcm`). */
  get encrypted(): boolean {
    return this.conn.encrypted;
  }

  get inFlight(): number {
    return this.pending.size;
  }

  /** Data bytes of the outstanding requests. */
  get inFlightBytes(): number {
    return this.pendingBytes;
  }

  /**
   * Resolves once the connection holds nothing it was given (its socket is gone): what a request
   * that failed for a bug of ours, and so has no RemoteCall, waits for before its payload is
   * reused. Never rejects.
   */
  get finished(): Promise<void> {
    return this.conn.finished;
  }

  /**
   * Sends a request once it fits in the window: fewer than maxInFlight requests outstanding and
   * its data bytes under maxInFlightBytes (backpressure: in async mode this is what bounds the
   * memory). The check and the send are one step, so the waiters one reply wakes cannot all pass
   * on the same freed room. Rejects with LinkDownError if the link goes down first.
   */
  async callWhenRoom(frame: Partial<Frame> & { type: MessageType }): Promise<RemoteCall> {
    const bytes = windowBytes(frame.type, frame.length ?? 0);
    while (this.isUp && (this.pending.size >= this.options.maxInFlight ||
      (this.pendingBytes > 0 && this.pendingBytes + bytes > this.options.maxInFlightBytes))) {
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
    if (!this.isUp) throw new LinkDownError(this.closedReason ?? "link down");
    return this.call(frame);
  }

  /** Sends a request; the seq is assigned here. */
  call(frame: Partial<Frame> & { type: MessageType }): RemoteCall {
    if (!this.isUp) {
      const error = new LinkDownError(this.closedReason ?? "link down");
      const failed = Promise.reject(error);
      failed.catch(() => {});
      return { received: failed as Promise<never>, done: failed as Promise<never>, released: () => Promise.resolve() };
    }
    const seq = this.nextSeq;
    this.nextSeq = this.nextSeq >= 0xffffffff ? 1 : this.nextSeq + 1;
    assert.ok(!this.pending.has(seq), "seq reused while pending");
    const bytes = windowBytes(frame.type, frame.length ?? 0);
    const entry: Pending = {
      type: frame.type,
      length: frame.length ?? 0,
      sentAtMs: this.options.clock.now(),
      bytes,
      received: deferred<void>(),
      done: deferred<Frame>(),
      encoding: null,
    };
    this.pending.set(seq, entry);
    this.pendingBytes += bytes;
    this.lastTxMs = entry.sentAtMs;
    try {
      this.encodeAndSend(frame, seq, entry);
    } catch (error) {
      // A bug of ours (encoding or sending threw): the request was registered but never sent.
      // Closing settles it with every other pending request; the caller sees the error.
      this.close(`internal error while sending seq ${seq}: ${error}`);
      throw error;
    }
    // `done` rejects only once the link is down (a bad reply closes it at once): the frame may
    // then still sit in the socket's buffer, or be read by a codec thread.
    const released = () => entry.done.promise.then(
      () => {},
      () => Promise.allSettled([this.conn.finished, entry.encoding]).then(() => {}),
    );
    return { received: entry.received.promise, done: entry.done.promise, released };
  }

  /** Encodes a registered request (on a codec thread when it pays) and sends or queues it. */
  private encodeAndSend(frame: Partial<Frame> & { type: MessageType }, seq: number, entry: Pending): void {
    const pipeline = this.options.pipeline;
    const payload = frame.type === MessageType.Write ? frame.payload : undefined;
    if (payload && pipeline && CodecPipeline.wants(payload.byteLength, this.options.codec)) {
      const queued: { pieces: Uint8Array[] | null } = { pieces: null };
      this.sendQueue.push(queued);
      entry.encoding = pipeline.encode(payload, this.options.codec).then(({ flags, pieces }) => {
        queued.pieces = encodeFrame({ ...frame, payload: undefined, pieces, flags: (frame.flags ?? 0) | flags, seq });
        this.sendReady();
      }, (error: Error) => this.close(`cannot encode a write: ${error.message}`));
    } else if (payload) {
      const { flags, pieces } = encodePayload(payload, this.options.codec);
      this.transmit(encodeFrame({ ...frame, payload: undefined, pieces, flags: (frame.flags ?? 0) | flags, seq }));
    } else {
      this.transmit(encodeFrame({ ...frame, seq }));
    }
  }

  /** Sends a frame that expects no reply. */
  post(frame: Partial<Frame> & { type: MessageType }): void {
    if (!this.isUp) return;
    this.lastTxMs = this.options.clock.now();
    this.transmit(encodeFrame(frame));
  }

  /** Sends at once unless frames still being encoded are ahead. */
  private transmit(pieces: Uint8Array[]): void {
    if (this.sendQueue.length === 0) this.conn.send(pieces);
    else this.sendQueue.push({ pieces });
  }

  /** Sends the queued frames whose encoding finished, up to the first that has not. */
  private sendReady(): void {
    if (!this.isUp) return;
    while (this.sendQueue.length > 0 && this.sendQueue[0]!.pieces !== null) {
      this.conn.send(this.sendQueue.shift()!.pieces!);
    }
  }

  /** Frames waiting behind an encoding (shown in `hast list`). */
  get sendQueueDepth(): number {
    return this.sendQueue.length;
  }

  /** Resolves when the socket's send buffer has drained (socket backpressure). */
  drained(): Promise<void> {
    return this.conn.drained();
  }

  close(reason: string): void {
    this.conn.close(reason);
    this.shutdown(reason);
  }

  private onFrame(frame: Frame): void {
    this.lastRxMs = this.options.clock.now();
    if (frame.type === MessageType.Keepalive) return;
    if (frame.type !== MessageType.Reply) {
      if (this.options.onOtherFrame) return this.options.onOtherFrame(frame);
      this.close(`unexpected message type ${frame.type} from secondary`);
      return;
    }
    const entry = this.pending.get(frame.seq);
    if (entry === undefined) {
      this.close(`reply for unknown request seq ${frame.seq}`);
      return;
    }
    if (frame.flags & FrameFlag.Received) {
      const misfit = receiptError(frame, entry);
      if (misfit !== null) return this.close(`protocol violation from secondary: ${misfit}`);
      entry.received.resolve();
      return;
    }
    let data: Uint8Array;
    try {
      data = replyData(frame, entry, this.options.codec);
    } catch (error) {
      // Found by review: the entry left the table before this check, so the close below did
      // not settle its `received` and a memsync write waiting for it hung. It stays in the
      // table now: the close rejects both of its promises, like those of every other request.
      const why = error instanceof ProtocolError ? error.message : String(error);
      this.close(`bad data from secondary: ${why}`);
      return;
    }
    this.pending.delete(frame.seq);
    this.pendingBytes -= entry.bytes;
    frame.payload = data;
    if (!entry.received.settled) entry.received.resolve();
    entry.done.resolve(frame); // the secondary has all of the frame: the socket no longer holds it
    this.wakeSlot();
  }

  /** Every waiter checks again (a freed request may or may not leave room for its bytes). */
  private wakeSlot(): void {
    for (const waiter of this.slotWaiters.splice(0)) waiter();
  }

  private tick(): void {
    const now = this.options.clock.now();
    for (const entry of this.pending.values()) {
      if (now - entry.sentAtMs > this.options.timeoutMs) {
        this.close(`request unanswered for ${Math.round(now - entry.sentAtMs)} ms (timeout)`);
        return;
      }
      break; // Map iterates in insertion order: the first entry is the oldest
    }
    if (now - this.lastRxMs > this.options.timeoutMs) {
      this.close(`nothing received for ${Math.round(now - this.lastRxMs)} ms (timeout)`);
      return;
    }
    if (now - this.lastTxMs >= this.options.keepaliveMs) this.post({ type: MessageType.Keepalive });
  }

  private shutdown(reason: string): void {
    if (this.closedReason !== null) return;
    this.closedReason = reason;
    this.ticker.stop();
    const error = new LinkDownError(reason);
    for (const entry of this.pending.values()) {
      entry.received.reject(error);
      entry.done.reject(error);
    }
    this.pending.clear();
    this.pendingBytes = 0;
    this.sendQueue.length = 0;
    for (const waiter of this.slotWaiters.splice(0)) waiter();
    this.options.onClose(reason);
  }
}

/** Names of the requests a reply can answer, for messages. */
const REQUEST_NAMES: ReadonlyMap<MessageType, string> = new Map([
  [MessageType.Read, "Read"], [MessageType.Write, "Write"], [MessageType.Delete, "Delete"],
  [MessageType.Flush, "Flush"], [MessageType.SyncDone, "SyncDone"], [MessageType.Verify, "Verify"],
]);

function requestName(entry: Pending, seq: number): string {
  return `${REQUEST_NAMES.get(entry.type) ?? `type ${entry.type}`} (seq ${seq})`;
}

/**
 * Why an early "received" acknowledgement (memsync) does not fit its request, or null: only a
 * write has one, once, without error or data (secondary.ts acknowledgeReceipt).
 */
function receiptError(frame: Frame, entry: Pending): string | null {
  if (entry.type !== MessageType.Write) return `receipt acknowledged for a ${requestName(entry, frame.seq)}`;
  if (entry.received.settled) return `second receipt for ${requestName(entry, frame.seq)}`;
  if (frame.error !== 0 || frame.payload.byteLength > 0 || (frame.flags & DATA_FLAGS) !== 0) {
    return `receipt for ${requestName(entry, frame.seq)} carries an error or data`;
  }
  return null;
}

/**
 * The data of a final reply, decoded; throws ProtocolError when the reply does not fit its
 * request: a successful Read carries exactly the length asked, a Verify a sha256 digest, and
 * every other reply, and every error reply, carries no data. (Matched by seq alone, a short
 * read reply reached the caller as an EIO with "errno 0" and the link stayed up; a write's
 * reply could carry a megabyte nobody reads.)
 */
function replyData(frame: Frame, entry: Pending, codec: CodecOptions): Uint8Array {
  const carries = frame.payload.byteLength > 0 || (frame.flags & DATA_FLAGS) !== 0;
  const expected = frame.error !== 0 ? null
    : entry.type === MessageType.Read ? entry.length
    : entry.type === MessageType.Verify ? VERIFY_DIGEST_BYTES
    : null;
  if (expected === null) {
    if (!carries) return frame.payload;
    const what = frame.error !== 0 ? "error reply to" : "reply to";
    throw new ProtocolError(`${what} ${requestName(entry, frame.seq)} carries data`);
  }
  const of = `${requestName(entry, frame.seq)} of ${entry.length} bytes`;
  // The length is checked before decoding: a hole would otherwise allocate what it announces.
  if (frame.length !== expected) throw new ProtocolError(`reply to ${of} carries ${frame.length}`);
  const data = decodePayload(frame.flags, frame.payload, frame.length, codec.checksum);
  assert.equal(data.byteLength, expected, "decodePayload returns the length it was given");
  return data;
}
