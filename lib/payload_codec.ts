/**
 * The data stage table of spec §7: on send, compression then checksum (the
 * checksum covers the compressed bytes); on receive, verify then decompress.
 *
 * - compression "hole": all-zero data travels as its length only.
 * - compression "lz4" (lib/lz4.ts, the LZ4 block format): hole first; lz4 only
 *   for data over 1 KiB, and only if it saves at least 1 KiB (compression is
 *   abandoned as soon as the output grows past that); payloads over 128 KiB
 *   only if their first 64 KiB shrink by 1/8 (see worthCompressing).
 * - checksum "crc32" (Bun's native crc32) or "sha256" (node:crypto, native;
 *   hash-wasm's is 10× slower per platform.md): a trailer after the payload.
 *
 * The implementations are chosen here and nowhere else.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { ChecksumKind, CompressionKind } from "./config.ts";
import { compressBlock, decompressBlock } from "./lz4.ts";
import { FrameFlag, MAX_IO_BYTES, ProtocolError } from "./wire.ts";

export interface CodecOptions {
  compression: CompressionKind;
  checksum: ChecksumKind;
}

/** lz4 is tried only above this size, and must save at least this much. */
export const LZ4_MIN_BYTES = 1024;

const ZEROS = new Uint8Array(MAX_IO_BYTES);
/** Compression output, per thread (encodePayload is synchronous). */
const scratch = new Uint8Array(MAX_IO_BYTES);

/** True when every byte of `data` is zero (memcmp against a zero page). */
export function isAllZero(data: Uint8Array): boolean {
  for (let at = 0; at < data.byteLength; at += ZEROS.byteLength) {
    const piece = data.subarray(at, Math.min(data.byteLength, at + ZEROS.byteLength));
    if (Buffer.compare(piece, ZEROS.subarray(0, piece.byteLength)) !== 0) return false;
  }
  return true;
}

/**
 * Data larger than this is compressed only if its first LZ4_SAMPLE_BYTES shrink by at least
 * 1/LZ4_SAMPLE_MIN_SAVING. Barely compressible data (fio's buffers save 3%) costs the most:
 * every short match resets LZ4's skip acceleration (measured: 5–7 ms per MiB instead of
 * 0.3–0.8 ms), and saves almost nothing on the wire.
 */
export const LZ4_SAMPLE_BYTES = 64 * 1024;
const LZ4_SAMPLE_MIN_SAVING = 8;

function worthCompressing(data: Uint8Array): boolean {
  if (data.byteLength <= 2 * LZ4_SAMPLE_BYTES) return true;
  const sample = data.subarray(0, LZ4_SAMPLE_BYTES);
  const limit = LZ4_SAMPLE_BYTES - LZ4_SAMPLE_BYTES / LZ4_SAMPLE_MIN_SAVING;
  return compressBlock(sample, scratch.subarray(0, limit)) >= 0;
}

function checksumOf(kind: ChecksumKind, bytes: Uint8Array): Uint8Array {
  if (kind === "crc32") {
    const out = new Uint8Array(4);
    new DataView(out.buffer).setUint32(0, Bun.hash.crc32(bytes) >>> 0);
    return out;
  }
  return createHash("sha256").update(bytes).digest();
}

const TRAILER_BYTES: Record<ChecksumKind, number> = { none: 0, crc32: 4, sha256: 32 };
const CHECKSUM_FLAG: Record<ChecksumKind, number> = { none: 0, crc32: FrameFlag.Crc32, sha256: FrameFlag.Sha256 };

/**
 * Encodes data for the wire. Returns the flags to set and the payload pieces
 * (body, then the checksum trailer if any), without copying the body when it
 * is sent as is.
 *
 * Compressed bytes go into `into` when given (the body is then a view of its start; it must not
 * overlap `data`), otherwise into a fresh buffer: the caller of a codec thread gets no garbage
 * per payload, the event loop's frame owns its bytes.
 */
export function encodePayload(
  data: Uint8Array, options: CodecOptions, into?: Uint8Array,
): { flags: number; pieces: Uint8Array[] } {
  let flags = 0;
  let body = data;
  if (options.compression !== "none" && isAllZero(data)) {
    flags |= FrameFlag.Hole;
    body = new Uint8Array(0);
  } else if (options.compression === "lz4" && data.byteLength > LZ4_MIN_BYTES && worthCompressing(data)) {
    const dst = into ?? scratch;
    const size = compressBlock(data, dst.subarray(0, data.byteLength - LZ4_MIN_BYTES));
    if (size >= 0) {
      flags |= FrameFlag.Lz4;
      body = into ? into.subarray(0, size) : scratch.slice(0, size); // the scratch is reused by the next call
    }
  }
  if (options.checksum === "none") return { flags, pieces: body.byteLength ? [body] : [] };
  flags |= CHECKSUM_FLAG[options.checksum];
  const trailer = checksumOf(options.checksum, body);
  return { flags, pieces: body.byteLength ? [body, trailer] : [trailer] };
}

/**
 * Decodes a received payload of logical size `length`: verifies the checksum
 * the flags announce, then expands holes and lz4. Throws ProtocolError on a
 * mismatch or malformed data (the caller drops the connection). Expanded data goes into the
 * start of `into` when given (at least `length` bytes, not overlapping `payload`), otherwise
 * into a fresh buffer; a body sent as is is returned as a view of `payload`.
 */
export function decodePayload(
  flags: number, payload: Uint8Array, length: number, expected: ChecksumKind, into?: Uint8Array,
): Uint8Array {
  if (length > MAX_IO_BYTES) throw new ProtocolError(`Cannot accept data: length ${length} > ${MAX_IO_BYTES}`);
  assert.ok(into === undefined || into.byteLength >= length, "Cannot decode: the output buffer is too small");
  const kind: ChecksumKind = flags & FrameFlag.Sha256 ? "sha256" : flags & FrameFlag.Crc32 ? "crc32" : "none";
  if (kind !== expected) {
    throw new ProtocolError(`Cannot accept data: checksum "${kind}" but "${expected}" was agreed`);
  }
  const trailerBytes = TRAILER_BYTES[kind];
  if (payload.byteLength < trailerBytes) {
    throw new ProtocolError(`Cannot accept data: payload shorter than its checksum`);
  }
  const body = payload.subarray(0, payload.byteLength - trailerBytes);
  if (kind !== "none") {
    const got = payload.subarray(payload.byteLength - trailerBytes);
    if (Buffer.compare(checksumOf(kind, body), got) !== 0) {
      throw new ProtocolError(`Cannot accept data: ${kind} mismatch (${length} bytes)`);
    }
  }
  if (flags & FrameFlag.Hole) {
    if (body.byteLength !== 0) throw new ProtocolError("Cannot accept data: hole with a body");
    return into ? into.fill(0, 0, length).subarray(0, length) : new Uint8Array(length);
  }
  if (flags & FrameFlag.Lz4) {
    const out = into ? into.subarray(0, length) : new Uint8Array(length);
    let size: number;
    try {
      size = decompressBlock(body, out);
    } catch (error) {
      throw new ProtocolError(`Cannot accept data: lz4 data is corrupt (${(error as Error).message})`);
    }
    if (size !== length) {
      throw new ProtocolError(`Cannot accept data: lz4 expanded to ${size} bytes, expected ${length}`);
    }
    return out;
  }
  if (body.byteLength !== length) {
    throw new ProtocolError(`Cannot accept data: ${body.byteLength} bytes, expected ${length}`);
  }
  return body;
}
