/**
 * Framed connections between primary and secondary over TCP (spec §7), and
 * the `Network` interface through which the replication logic reaches them,
 * so tests can inject their own (lossy, corrupting, slow) transports.
 */
import assert from "node:assert/strict";
import net from "node:net";
import type { BufferPool } from "./buffer_pool.ts";
import { type LinkKeys, Opener, RECORD_MAX_BYTES, Sealer } from "./link_crypto.ts";
import { decodeJson, encodeFrame, encodeJson, FrameParser, MessageType, ProtocolError, type Frame } from "./wire.ts";

/**
 * Why a link is not up, as `linkError` in status shows it on both sides: the last connection
 * attempt's error or refusal, then `link lost: REASON` for what ended the last connection.
 */
export function linkErrorText(lastError: string, lostReason: string): string {
  if (lostReason === "") return lastError;
  const lost = `link lost: ${lostReason}`;
  return lastError === "" ? lost : `${lastError}; ${lost}`;
}

/** A bidirectional stream of frames. */
export interface Connection {
  /** Queues a frame (header + payload pieces). Returns false once the socket buffer is full. */
  send(pieces: Uint8Array[]): boolean;
  /** Resolves when queued bytes have drained below the high-water mark. */
  drained(): Promise<void>;
  /** Closes the connection; `onClose` fires once with the reason. */
  close(reason: string): void;
  /** Set by the user: called for each received frame. */
  onFrame: (frame: Frame) => void;
  /** Set by the user: called once when the connection ends, with why. */
  onClose: (reason: string) => void;
  readonly remoteAddress: string;
  readonly closed: boolean;
  /**
   * Resolves once the connection holds none of the bytes given to send() any more: after
   * close, when its socket is gone (queued bytes may leave during a linger).
   */
  readonly finished: Promise<void>;
  /**
   * Seals everything sent from now on and opens everything received (link_crypto.ts); what
   * send() was given before leaves as it was. Called by each side at the point of the
   * exchange where its peer switches too (auth.ts). Throws ProtocolError when part of a frame
   * has already arrived: the peer sent bytes that it must not send before the switch.
   */
  secure(keys: LinkKeys): void;
  /** True once secure() was called. */
  readonly encrypted: boolean;
}

/** How the primary reaches its secondary. */
export interface Network {
  connect(options: ConnectOptions): Promise<Connection>;
}

export interface ConnectOptions {
  host: string;
  port: number;
  sourceHost?: string;
  timeoutMs: number;
}

/**
 * Queued pieces smaller than this are copied together into one buffer per run; larger ones
 * (payloads) are written as they are. Bun's cork()/uncork() is not used: sending 1 MiB frames
 * corked as header + payload cost twice the sender CPU of two plain writes (bench: 540 vs
 * 290 ms per GiB on this machine), and copying the payload into one buffer cost 1.5×.
 */
const COALESCE_PIECE_MAX = 16 * 1024;
/** A sealed record of coalesced small pieces holds at most this much. */
const SEALED_RUN_MAX_BYTES = 256 * 1024;
/** After close(), queued bytes get this long to leave before the socket is destroyed. */
const CLOSE_LINGER_MS = 2_000;
/** The reason a Goodbye carries is cut to this many characters. */
const GOODBYE_REASON_MAX = 1000;

/**
 * Hands `pieces` to `write` in order, one unit at a time: a run of consecutive small pieces
 * copied into one buffer (at most `runMaxBytes` of them), a large piece (a payload) as it is.
 * Stops after a unit that `write` reports the socket's buffer full with, unless `force`; returns
 * how many pieces it handed over.
 */
function writeRuns(
  pieces: readonly Uint8Array[], runMaxBytes: number, write: (unit: Uint8Array) => boolean, force: boolean,
): number {
  let at = 0;
  while (at < pieces.length) {
    let end = at + 1;
    let bytes = pieces[at]!.byteLength;
    if (bytes < COALESCE_PIECE_MAX) {
      while (end < pieces.length && pieces[end]!.byteLength < COALESCE_PIECE_MAX &&
        bytes + pieces[end]!.byteLength <= runMaxBytes) {
        bytes += pieces[end++]!.byteLength;
      }
    }
    const ok = write(end - at === 1 ? pieces[at]! : Buffer.concat(pieces.slice(at, end), bytes));
    at = end;
    if (!ok && !force) return at;
  }
  return pieces.length;
}

/**
 * Writes `pieces` in order (runs of small ones copied into one buffer, large ones as they are)
 * until a write reports the socket's buffer full, unless `force` (close() hands everything
 * over); returns how many pieces it wrote. The caller keeps the rest until 'drain': a socket
 * that accepts more than its kernel buffer holds copies it into a user-space buffer, which in
 * async mode grew to tens of MiB of copied payloads.
 */
export function writePieces(socket: net.Socket, pieces: readonly Uint8Array[], force = false): number {
  return writeRuns(pieces, Infinity, (unit) => socket.write(unit), force);
}

/**
 * writePieces for a sealed connection: the same runs, those of small pieces up to
 * SEALED_RUN_MAX_BYTES, each sealed into records of at most RECORD_MAX_BYTES. Same contract.
 */
export function writeSealed(
  socket: net.Socket, sealer: Sealer, pieces: readonly Uint8Array[], force = false,
): number {
  return writeRuns(pieces, SEALED_RUN_MAX_BYTES, (plaintext) => {
    let ok = true;
    for (let from = 0; from < plaintext.byteLength; from += RECORD_MAX_BYTES) {
      const record = sealer.seal(plaintext.subarray(from, Math.min(plaintext.byteLength, from + RECORD_MAX_BYTES)));
      if (record[1]!.byteLength < COALESCE_PIECE_MAX) {
        ok = socket.write(Buffer.concat(record));
      } else {
        for (const part of record) ok = socket.write(part);
      }
    }
    return ok;
  }, force);
}

/**
 * Wraps a connected socket in a framed Connection. Parsing starts immediately. With `pool`,
 * large payloads are received into its buffers (see BufferPool: the receiver gives them back).
 * With `pauseWhileFull` (the secondary's side), it stops reading while what it sends waits for
 * the peer to read: a peer that sends requests but reads no replies cannot make it queue replies
 * without bound (found by review). Only one side may do this, or both could wait on each other;
 * the primary always reads.
 */
export function socketConnection(
  socket: net.Socket, pool: BufferPool | null = null, options: { pauseWhileFull?: boolean } = {},
): Connection {
  const pauseWhileFull = options.pauseWhileFull === true;
  socket.setNoDelay(true);
  let closed = false;
  // Pieces not yet handed to the socket: frames queued in one turn of the event loop leave in
  // few writes (a syscall per 32-byte reply would cap small-request throughput; see
  // COALESCE_PIECE_MAX), and none is handed over while the socket's buffer is full.
  let outbox: Uint8Array[] = [];
  let flushScheduled = false;
  /** The socket's last write reported its buffer full; cleared by 'drain'. */
  let full = false;
  let drainWaiters: (() => void)[] = [];
  const gone = Promise.withResolvers<void>();
  let sealer: Sealer | null = null;
  let opener: Opener | null = null;
  const flushOutbox = (force = false) => {
    flushScheduled = false;
    if (outbox.length === 0 || socket.destroyed || (full && !force)) return;
    const written = sealer !== null ? writeSealed(socket, sealer, outbox, force) : writePieces(socket, outbox, force);
    outbox = written === outbox.length ? [] : outbox.slice(written);
    full = outbox.length > 0 || socket.writableNeedDrain;
    if (full && pauseWhileFull) socket.pause(); // until 'drain'
  };
  const wakeDrainWaiters = () => {
    const waiters = drainWaiters;
    drainWaiters = [];
    for (const wake of waiters) wake();
  };
  socket.on("drain", () => {
    full = false;
    flushOutbox();
    if (full) return;
    wakeDrainWaiters();
    if (pauseWhileFull && !closed) socket.resume();
  });
  const conn: Connection = {
    onFrame: () => {},
    onClose: () => {},
    remoteAddress: `${socket.remoteAddress ?? "?"}:${socket.remotePort ?? "?"}`,
    finished: gone.promise,
    get closed() {
      return closed;
    },
    get encrypted() {
      return sealer !== null;
    },
    secure(keys) {
      // A second Sealer would start its record counter at 0 again under the same key: GCM nonces
      // reused (found by review; no caller does it, this keeps it so).
      assert.ok(sealer === null, "Cannot encrypt the link: it is encrypted already");
      if (!parser.idle) {
        throw new ProtocolError("Cannot encrypt the link: the peer sent part of a frame before the switch");
      }
      flushOutbox(true); // what was sent before the switch leaves unsealed, as the peer expects
      sealer = new Sealer(keys.send);
      opener = new Opener(keys.receive, (plaintext) => parser.push(plaintext));
    },
    send(pieces) {
      if (closed) return false;
      for (const piece of pieces) {
        if (piece.byteLength === 0) continue;
        outbox.push(piece);
      }
      if (!flushScheduled && !full) {
        flushScheduled = true;
        setImmediate(flushOutbox);
      }
      return !full;
    },
    drained() {
      if (closed || !full) return Promise.resolve();
      return new Promise((resolve) => drainWaiters.push(resolve));
    },
    close(reason) {
      // The peer learns why (its log and status show it), after what was queued before.
      if (!closed) conn.send(encodeJson(MessageType.Goodbye, { reason: reason.slice(0, GOODBYE_REASON_MAX) }));
      flushOutbox(true); // e.g. the error reply that explains why we close
      finish(reason);
      endSocket();
    },
  };
  const endSocket = () => {
    socket.end();
    setTimeout(() => socket.destroy(), CLOSE_LINGER_MS).unref();
  };
  const finish = (reason: string) => {
    if (closed) return;
    closed = true;
    outbox = [];
    wakeDrainWaiters();
    conn.onClose(reason);
  };
  const parser = new FrameParser((frame) => {
    // The rest of a chunk whose earlier frame closed the connection (a Goodbye, or one the user
    // closed it on): nothing reaches onFrame after onClose (found by review).
    if (closed) {
      if (pool?.owns(frame.payload)) pool.give(frame.payload);
      return;
    }
    if (frame.type !== MessageType.Goodbye) return conn.onFrame(frame);
    const why = String(decodeJson(frame).reason ?? "").slice(0, GOODBYE_REASON_MAX);
    finish(`peer closed the connection: ${why}`);
    endSocket();
  }, pool);
  socket.on("data", (chunk: Buffer) => {
    if (closed) return;
    try {
      if (opener !== null) opener.push(chunk);
      else parser.push(chunk);
    } catch (error) {
      const why = error instanceof ProtocolError ? error.message : `handler failed: ${error}`;
      conn.close(`protocol violation from ${conn.remoteAddress}: ${why}`);
    }
  });
  socket.on("error", (error) => finish(`socket error: ${error.message}`));
  socket.on("end", () => finish(opener !== null && !opener.idle
    ? "peer closed the connection inside an encrypted record (cut on the way?)"
    : "peer closed the connection"));
  socket.on("close", () => {
    finish("connection closed");
    gone.resolve();
  });
  socket.resume();
  return conn;
}

/** Sends one frame-set on a Connection (convenience for encodeFrame). */
export function sendFrame(conn: Connection, frame: Partial<Frame> & { type: Frame["type"] }) {
  return conn.send(encodeFrame(frame));
}

/** The real network: TCP with TCP_NODELAY, optional source address, connect timeout. */
export const tcpNetwork: Network = {
  connect(options) {
    return new Promise((resolve, reject) => {
      const socket = net.connect({
        host: options.host,
        port: options.port,
        localAddress: options.sourceHost,
        noDelay: true,
      });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`Cannot connect to ${options.host}:${options.port}: timed out`));
      }, options.timeoutMs);
      socket.once("connect", () => {
        clearTimeout(timer);
        socket.removeAllListeners("error");
        resolve(socketConnection(socket));
      });
      socket.once("error", (error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(new Error(`Cannot connect to ${options.host}:${options.port}: ${error.message}`));
      });
    });
  },
};
