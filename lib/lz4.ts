/**
 * LZ4 block format (no frame, no size prefix: the wire header carries the
 * decompressed length), compressing into and decompressing into buffers the
 * caller provides, so a payload costs no allocation.
 *
 * Why not a library: lz4-napi leaks under Bun (measured 2026-11-24: RSS grew
 * by about twice the output size on every call that produced more than a few
 * KiB, and each 64 KiB call took ~300 µs); lz4-wasm-nodejs loads its .wasm
 * file by path and does not survive `bun build --compile`. This is the plain
 * greedy LZ4 compressor (4-byte hash, LZ4's skip acceleration over data that
 * does not match) and a bounds-checked decompressor.
 *
 * Block format: sequences of
 *   token (literal length:4 | match length − 4:4), literal length extension
 *   bytes (255… then the rest), literals, match offset (u16 LE, ≥ 1), match
 *   length extension bytes;
 * the last sequence has literals only; the last 5 bytes are always literals
 * and the last match starts at least 12 bytes before the end.
 */

const MIN_MATCH = 4;
const HASH_LOG = 16;
const MAX_OFFSET = 65535;
/** A match may not start in the last 12 bytes, nor extend into the last 5. */
const MF_LIMIT = 12;
const LAST_LITERALS = 5;
/** After 2^SKIP_TRIGGER misses in a row, the search step grows by one. */
const SKIP_TRIGGER = 6;

/** Reusable per thread: compress is synchronous, so one table serves every call. */
const table = new Int32Array(1 << HASH_LOG);

function read32(src: Uint8Array, at: number): number {
  return src[at]! | (src[at + 1]! << 8) | (src[at + 2]! << 16) | (src[at + 3]! << 24);
}

function hash(sequence: number): number {
  return Math.imul(sequence, 2654435761) >>> (32 - HASH_LOG);
}

/**
 * Compresses `src` into `dst`. Returns the compressed size, or -1 when it
 * does not fit in `dst` (give `dst` the size you would accept: a caller that
 * wants a saving of N bytes passes `src.length - N`, and incompressible data
 * is abandoned as soon as it overflows).
 */
export function compressBlock(src: Uint8Array, dst: Uint8Array): number {
  const n = src.byteLength;
  let op = 0;
  let anchor = 0;
  if (n >= MF_LIMIT + 1) {
    table.fill(-1);
    const mfLimit = n - MF_LIMIT;
    const matchLimit = n - LAST_LITERALS;
    let i = 0;
    for (;;) {
      // Find a match: a 4-byte sequence seen before within 64 KiB.
      let ref = -1;
      let attempts = 1 << SKIP_TRIGGER;
      while (i <= mfLimit) {
        const sequence = read32(src, i);
        const h = hash(sequence);
        ref = table[h]!;
        table[h] = i;
        if (ref >= 0 && i - ref <= MAX_OFFSET && read32(src, ref) === sequence) break;
        ref = -1;
        i += attempts++ >> SKIP_TRIGGER;
      }
      if (ref < 0) break;
      while (i > anchor && ref > 0 && src[i - 1] === src[ref - 1]) {
        i--;
        ref--;
      }
      let length = MIN_MATCH;
      while (i + length + 4 <= matchLimit && read32(src, i + length) === read32(src, ref + length)) length += 4;
      while (i + length < matchLimit && src[i + length] === src[ref + length]) length++;
      op = writeSequence(src, anchor, i - anchor, dst, op, i - ref, length);
      if (op < 0) return -1;
      i += length;
      anchor = i;
      if (i > mfLimit) break;
      const back = i - 2;
      table[hash(read32(src, back))] = back;
    }
  }
  return writeLastLiterals(src, anchor, n - anchor, dst, op);
}

/** Writes token, literals, offset and match length; -1 if `dst` is too small. */
function writeSequence(
  src: Uint8Array, from: number, literals: number, dst: Uint8Array, op: number, offset: number, match: number,
): number {
  // Worst case: token, literal length bytes, literals, offset, match length bytes.
  if (op + 1 + Math.ceil(literals / 255) + literals + 2 + Math.ceil(match / 255) > dst.byteLength) return -1;
  const tokenAt = op++;
  const matchCode = match - MIN_MATCH;
  let token = (matchCode >= 15 ? 15 : matchCode);
  if (literals >= 15) {
    token |= 15 << 4;
    op = writeLength(dst, op, literals - 15);
  } else {
    token |= literals << 4;
  }
  dst[tokenAt] = token;
  op = copyBytes(src, from, literals, dst, op);
  dst[op++] = offset & 0xff;
  dst[op++] = offset >>> 8;
  if (matchCode >= 15) op = writeLength(dst, op, matchCode - 15);
  return op;
}

function writeLastLiterals(src: Uint8Array, from: number, literals: number, dst: Uint8Array, op: number): number {
  if (op + 1 + Math.ceil(literals / 255) + literals > dst.byteLength) return -1;
  if (literals >= 15) {
    dst[op++] = 15 << 4;
    op = writeLength(dst, op, literals - 15);
  } else {
    dst[op++] = literals << 4;
  }
  return copyBytes(src, from, literals, dst, op);
}

function writeLength(dst: Uint8Array, op: number, rest: number): number {
  while (rest >= 255) {
    dst[op++] = 255;
    rest -= 255;
  }
  dst[op++] = rest;
  return op;
}

function copyBytes(src: Uint8Array, from: number, count: number, dst: Uint8Array, op: number): number {
  if (count > 32) {
    dst.set(src.subarray(from, from + count), op);
  } else {
    for (let k = 0; k < count; k++) dst[op + k] = src[from + k]!;
  }
  return op + count;
}

/**
 * Decompresses a block into `dst`; returns the decompressed size. Throws on
 * malformed input (truncated, an offset before the start, output overflow)
 * without writing outside `dst`.
 */
export function decompressBlock(src: Uint8Array, dst: Uint8Array): number {
  const end = src.byteLength;
  let ip = 0;
  let op = 0;
  while (ip < end) {
    const token = src[ip++]!;
    let literals = token >>> 4;
    if (literals === 15) [literals, ip] = readLength(src, ip, literals);
    if (ip + literals > end) throw new Error(`Cannot decompress lz4: literals run past the input at ${ip}`);
    if (op + literals > dst.byteLength) {
      throw new Error(`Cannot decompress lz4: output exceeds ${dst.byteLength} bytes`);
    }
    op = copyBytes(src, ip, literals, dst, op);
    ip += literals;
    if (ip === end) return op; // the last sequence has no match
    if (ip + 2 > end) throw new Error(`Cannot decompress lz4: truncated offset at ${ip}`);
    const offset = src[ip]! | (src[ip + 1]! << 8);
    ip += 2;
    if (offset === 0 || offset > op) throw new Error(`Cannot decompress lz4: offset ${offset} at output ${op}`);
    let match = token & 15;
    if (match === 15) [match, ip] = readLength(src, ip, match);
    match += MIN_MATCH;
    if (op + match > dst.byteLength) throw new Error(`Cannot decompress lz4: output exceeds ${dst.byteLength} bytes`);
    const from = op - offset;
    if (offset >= match) {
      dst.copyWithin(op, from, from + match);
    } else {
      // Overlapping: the match repeats the last `offset` bytes. [from, op + k) is periodic with
      // that period, so copying it whole to op + k (k a multiple of offset) doubles the run.
      for (let k = 0; k < match; ) {
        const run = Math.min(k + offset, match - k);
        dst.copyWithin(op + k, from, from + run);
        k += run;
      }
    }
    op += match;
  }
  throw new Error("Cannot decompress lz4: empty input");
}

function readLength(src: Uint8Array, ip: number, length: number): [number, number] {
  let byte: number;
  do {
    if (ip >= src.byteLength) throw new Error(`Cannot decompress lz4: truncated length at ${ip}`);
    byte = src[ip++]!;
    length += byte;
  } while (byte === 255);
  return [length, ip];
}
