/**
 * The replication wire protocol between primary and secondary (spec §7).
 *
 * Our own framing, not FreeBSD's: every message is a fixed 32-byte header
 * followed by `payloadBytes` of payload. All integers are big-endian.
 *
 *   offset size field
 *        0    4 magic          0x48415354 ("HAST")
 *        4    1 version        WIRE_VERSION
 *        5    1 type           MessageType
 *        6    2 flags          FrameFlag bits
 *        8    4 payloadBytes   bytes following the header (≤ MAX_PAYLOAD_BYTES)
 *       12    4 seq            request sequence number, echoed in the reply
 *       16    8 offset         byte offset in the data area (or in the bitmap for MAP)
 *       24    4 length         logical I/O length in bytes
 *       28    4 error          errno-style code in replies, 0 = success
 *
 * The payload length is checked against MAX_PAYLOAD_BYTES before anything is
 * allocated, so a hostile or corrupt peer cannot make us allocate at will.
 */
import assert from "node:assert/strict";
import type { BufferPool } from "./buffer_pool.ts";

export const WIRE_MAGIC = 0x48415354;
export const WIRE_VERSION = 1;
export const HEADER_BYTES = 32;
/** Largest READ/WRITE on the wire; larger application requests are split. */
export const MAX_IO_BYTES = 1024 * 1024;
/** Largest payload: one I/O plus room for a checksum trailer. */
export const MAX_PAYLOAD_BYTES = MAX_IO_BYTES + 64;
/** Largest JSON handshake document. */
export const MAX_JSON_BYTES = 64 * 1024;
/**
 * The replication window: READ, WRITE and DELETE requests a primary may have outstanding, and
 * their data bytes (a write's payload, a read's length; one request alone may exceed it). The
 * primary sends within it (RemoteLink.callWhenRoom); the secondary drops a connection that
 * exceeds it (a peer that ignores it could make the secondary hold unbounded data). In async
 * mode the application is answered before the secondary replies, so the window, not the
 * application, bounds the memory held for replication: 256 requests of 1 MiB let the worker's
 * peak RSS reach 648 MiB.
 */
export const MAX_REMOTE_IN_FLIGHT = 256;
export const MAX_REMOTE_IN_FLIGHT_BYTES = 64 * 1024 * 1024;

export const enum MessageType {
  /** primary → secondary: JSON Hello. First frame on a connection. */
  Hello = 1,
  /** secondary → primary: JSON HelloReply; followed by Map frames when accepted. */
  HelloReply = 2,
  Read = 3,
  Write = 4,
  /** Trim / write zeroes: the range reads back as zeros afterwards on both sides. */
  Delete = 5,
  Flush = 6,
  /** Sent by an idle primary; no reply. */
  Keepalive = 7,
  /** secondary → primary: answer to Read/Write/Delete/Flush/SyncDone (by seq). */
  Reply = 8,
  /** primary → secondary: JSON SyncDone; the sync finished, commit counters. */
  SyncDone = 9,
  /** secondary → primary: a piece of the secondary's dirty bitmap (offset = byte offset). */
  Map = 10,
  /** Either side: JSON {reason}; the sender closes the connection after it. */
  Goodbye = 11,
  /**
   * primary → secondary: online verify (lib/verifier.ts). The secondary reads the range (in
   * arrival order with writes to it, like Read) and replies with the sha256 of it as payload.
   * Sent only to a secondary whose HelloReply says `verify: true` (an older one would drop the
   * connection on an unknown type).
   */
  Verify = 12,
  /** secondary → primary: JSON {nonce, proof}; its half of the authkey exchange (auth.ts). */
  AuthChallenge = 13,
  /** primary → secondary: JSON {proof}; the primary's half (auth.ts). */
  Auth = 14,
}

/**
 * Requests on a range of the data area: the secondary validates their range, orders them by
 * range lock and counts them in the replication window.
 */
export function isRangeRequest(type: MessageType): boolean {
  return type === MessageType.Read || type === MessageType.Write || type === MessageType.Delete ||
    type === MessageType.Verify;
}

/**
 * Data bytes a request holds in the replication window (MAX_REMOTE_IN_FLIGHT_BYTES): a write's,
 * a read's or a verify's length (the secondary reads that much), nothing for other requests.
 * The primary counts with it what it sends and the secondary what it receives, so both sides
 * agree on the window.
 */
export function windowBytes(type: MessageType, length: number): number {
  return type === MessageType.Write || type === MessageType.Read || type === MessageType.Verify ? length : 0;
}

export const enum FrameFlag {
  /** Write: force unit access (flush after writing). */
  Fua = 1,
  /** Reply: early "received" acknowledgement (memsync); a final reply follows. */
  Received = 2,
  /** Write payload omitted: the data is all zeros (compression "hole"). */
  Hole = 4,
  /** Write/Reply payload is lz4-compressed. */
  Lz4 = 8,
  /** Payload ends with a 4-byte crc32 of the bytes before it. */
  Crc32 = 16,
  /** Payload ends with a 32-byte sha256 of the bytes before it. */
  Sha256 = 32,
  /** Map: this is the last piece of the bitmap. */
  Last = 64,
  /**
   * Write: a sync copy (spec §6), not an application write. The target's image is no
   * consistent state until the sync ends (it is marked stale), so the secondary applies these
   * concurrently with other writes to disjoint ranges, in every mode, and sends no early ack.
   */
  Sync = 128,
}

export interface Frame {
  type: MessageType;
  flags: number;
  seq: number;
  offset: number;
  length: number;
  error: number;
  payload: Uint8Array;
}

/** Thrown for any violation of the framing by the peer; the connection is closed. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

const EMPTY = new Uint8Array(0);

/** Flags that describe how a data payload is encoded (payload_codec.ts). */
export const DATA_FLAGS = FrameFlag.Hole | FrameFlag.Lz4 | FrameFlag.Crc32 | FrameFlag.Sha256;

/** Encodes the 32-byte header of a frame whose payload is `payloadBytes` long. */
export function encodeHeader(
  frame: Omit<Frame, "payload">,
  payloadBytes: number,
): Uint8Array {
  assert.ok(payloadBytes >= 0 && payloadBytes <= MAX_PAYLOAD_BYTES, "payload too large");
  assert.ok(Number.isSafeInteger(frame.offset) && frame.offset >= 0, "bad offset");
  const header = new Uint8Array(HEADER_BYTES);
  const view = new DataView(header.buffer);
  view.setUint32(0, WIRE_MAGIC);
  view.setUint8(4, WIRE_VERSION);
  view.setUint8(5, frame.type);
  view.setUint16(6, frame.flags);
  view.setUint32(8, payloadBytes);
  view.setUint32(12, frame.seq >>> 0);
  view.setBigUint64(16, BigInt(frame.offset));
  view.setUint32(24, frame.length >>> 0);
  view.setInt32(28, frame.error | 0);
  return header;
}

/**
 * Encodes a whole frame as [header, ...payload pieces] (no concatenation of
 * large payloads). `pieces`, when given, is the payload in several parts.
 */
export function encodeFrame(
  frame: Partial<Frame> & { type: MessageType; pieces?: Uint8Array[] },
): Uint8Array[] {
  const pieces = frame.pieces ?? (frame.payload && frame.payload.byteLength ? [frame.payload] : []);
  let payloadBytes = 0;
  for (const piece of pieces) payloadBytes += piece.byteLength;
  const full = {
    type: frame.type,
    flags: frame.flags ?? 0,
    seq: frame.seq ?? 0,
    offset: frame.offset ?? 0,
    length: frame.length ?? 0,
    error: frame.error ?? 0,
  };
  return [encodeHeader(full, payloadBytes), ...pieces];
}

/** Encodes a JSON message frame (Hello, HelloReply, SyncDone, Goodbye). */
export function encodeJson(type: MessageType, value: unknown, seq = 0): Uint8Array[] {
  const payload = new TextEncoder().encode(JSON.stringify(value));
  assert.ok(payload.byteLength <= MAX_JSON_BYTES, "JSON message too large");
  return encodeFrame({ type, seq, payload });
}

/** Decodes a JSON payload, throwing ProtocolError when it is not a JSON object. */
export function decodeJson(frame: Frame): Record<string, unknown> {
  if (frame.payload.byteLength > MAX_JSON_BYTES) {
    throw new ProtocolError(`Cannot decode message: JSON of ${frame.payload.byteLength} bytes`);
  }
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder().decode(frame.payload));
  } catch {
    throw new ProtocolError(`Cannot decode message type ${frame.type}: payload is not JSON`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError(`Cannot decode message type ${frame.type}: not a JSON object`);
  }
  return value as Record<string, unknown>;
}

/**
 * Per message type: the largest payload it may carry and the flags it may have. Checked at the
 * header, before the payload is allocated: a peer that sends a megabyte with a Keepalive, a
 * payload with a Read, Delete or Flush, or flags nobody checks, breaks the protocol (found by
 * review: any type could carry MAX_PAYLOAD_BYTES and any flags). The receivers check the rest
 * (a write's payload against its length, a reply against its request).
 */
const FRAME_RULES: ReadonlyMap<number, { payloadMaxBytes: number; flags: number }> = new Map([
  [MessageType.Hello, { payloadMaxBytes: MAX_JSON_BYTES, flags: 0 }],
  [MessageType.HelloReply, { payloadMaxBytes: MAX_JSON_BYTES, flags: 0 }],
  [MessageType.Read, { payloadMaxBytes: 0, flags: 0 }],
  [MessageType.Write, { payloadMaxBytes: MAX_PAYLOAD_BYTES, flags: FrameFlag.Fua | FrameFlag.Sync | DATA_FLAGS }],
  [MessageType.Delete, { payloadMaxBytes: 0, flags: FrameFlag.Fua }],
  [MessageType.Flush, { payloadMaxBytes: 0, flags: 0 }],
  [MessageType.Keepalive, { payloadMaxBytes: 0, flags: 0 }],
  [MessageType.Reply, { payloadMaxBytes: MAX_PAYLOAD_BYTES, flags: FrameFlag.Received | DATA_FLAGS }],
  [MessageType.SyncDone, { payloadMaxBytes: MAX_JSON_BYTES, flags: 0 }],
  [MessageType.Map, { payloadMaxBytes: MAX_IO_BYTES, flags: FrameFlag.Last }], // handshake.ts sends ≤ MAX_IO_BYTES
  [MessageType.Goodbye, { payloadMaxBytes: MAX_JSON_BYTES, flags: 0 }],
  [MessageType.Verify, { payloadMaxBytes: 0, flags: 0 }],
  [MessageType.AuthChallenge, { payloadMaxBytes: MAX_JSON_BYTES, flags: 0 }],
  [MessageType.Auth, { payloadMaxBytes: MAX_JSON_BYTES, flags: 0 }],
]);

/**
 * Incremental frame parser: feed it chunks with arbitrary boundaries, it calls
 * `onFrame` for each complete frame. Leftover bytes are kept until the next
 * chunk. Throws ProtocolError on bad magic, version, type, flags or length; after
 * that the parser must not be used again (the caller closes the connection).
 */
export class FrameParser {
  private headerBuf = new Uint8Array(HEADER_BYTES);
  private headerFill = 0;
  private pending: Omit<Frame, "payload"> | null = null;
  private payload: Uint8Array = EMPTY;
  private payloadFill = 0;

  /** `pool`: large payloads are received into its buffers (the consumer gives them back). */
  constructor(private readonly onFrame: (frame: Frame) => void, private readonly pool: BufferPool | null = null) {}

  /** True when no part of a frame is held: the stream may end, or change form, here. */
  get idle(): boolean {
    return this.pending === null && this.headerFill === 0;
  }

  /** Consumes one chunk of the byte stream. */
  push(chunk: Uint8Array): void {
    let at = 0;
    while (at < chunk.byteLength) {
      if (this.pending === null) {
        const take = Math.min(HEADER_BYTES - this.headerFill, chunk.byteLength - at);
        this.headerBuf.set(chunk.subarray(at, at + take), this.headerFill);
        this.headerFill += take;
        at += take;
        if (this.headerFill < HEADER_BYTES) return;
        this.headerFill = 0;
        this.startFrame();
        if (this.payload.byteLength === 0) this.finishFrame();
        continue;
      }
      const take = Math.min(this.payload.byteLength - this.payloadFill, chunk.byteLength - at);
      this.payload.set(chunk.subarray(at, at + take), this.payloadFill);
      this.payloadFill += take;
      at += take;
      if (this.payloadFill === this.payload.byteLength) this.finishFrame();
    }
  }

  private startFrame(): void {
    const view = new DataView(this.headerBuf.buffer);
    const magic = view.getUint32(0);
    if (magic !== WIRE_MAGIC) {
      throw new ProtocolError(`Cannot parse frame: bad magic 0x${magic.toString(16)}`);
    }
    const version = view.getUint8(4);
    if (version !== WIRE_VERSION) {
      throw new ProtocolError(
        `Cannot parse frame: protocol version ${version}, expected ${WIRE_VERSION}`,
      );
    }
    const type = view.getUint8(5);
    const rules = FRAME_RULES.get(type);
    if (rules === undefined) throw new ProtocolError(`Cannot parse frame: unknown type ${type}`);
    const payloadBytes = view.getUint32(8);
    if (payloadBytes > rules.payloadMaxBytes) {
      throw new ProtocolError(rules.payloadMaxBytes === 0
        ? `Cannot parse frame: type ${type} carries no payload, got ${payloadBytes} bytes`
        : `Cannot parse frame: payload of ${payloadBytes} bytes exceeds ${rules.payloadMaxBytes} for type ${type}`);
    }
    const flags = view.getUint16(6);
    if ((flags & ~rules.flags) !== 0) {
      throw new ProtocolError(`Cannot parse frame: flags 0x${flags.toString(16)} not allowed on type ${type}`);
    }
    const offset = view.getBigUint64(16);
    if (offset > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ProtocolError(`Cannot parse frame: offset ${offset} out of range`);
    }
    this.pending = {
      type,
      flags,
      seq: view.getUint32(12),
      offset: Number(offset),
      length: view.getUint32(24),
      error: view.getInt32(28),
    };
    this.payload = payloadBytes === 0 ? EMPTY : this.pool?.take(payloadBytes) ?? new Uint8Array(payloadBytes);
    this.payloadFill = 0;
  }

  private finishFrame(): void {
    const pending = this.pending;
    assert.ok(pending !== null);
    const frame: Frame = { ...pending, payload: this.payload };
    this.pending = null;
    this.payload = EMPTY;
    this.payloadFill = 0;
    this.onFrame(frame);
  }
}

/** errno values used in replies (Linux numbering). */
export const Errno = {
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  ESHUTDOWN: 108,
} as const;

/** Name of an errno value for messages. */
export function errnoName(code: number): string {
  for (const [name, value] of Object.entries(Errno)) if (value === code) return name;
  return `errno ${code}`;
}
