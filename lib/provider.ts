/**
 * The local provider: the regular file or block device that holds a resource's
 * metadata, activemap and data (spec §3). It owns the file descriptor, the
 * exclusive lock and the choice of I/O primitives, so nothing else in hast
 * needs to know how bytes reach the disk.
 *
 * I/O choice (measured with Bun 1.4.5 on a page-cached ext4 file, 2 cores):
 *
 * | 4 KiB op                    | µs/op | note                                 |
 * |-----------------------------|-------|--------------------------------------|
 * | readSync / writeSync        | 0.8/4 | blocks the event loop on a miss      |
 * | fs.read / fs.write, QD1     | 26/23 | thread-pool hand-off                 |
 * | fs.read / fs.write, QD8     | 2.5/8 | per op, throughput of the pool       |
 * | preadv2(RWF_NOWAIT) via ffi | 0.8   | EAGAIN instead of waiting for a disk |
 *
 * writeSync stalled the event loop for up to 214 ms once the kernel started
 * throttling dirty pages (6 GiB sequential write, p99.9 25 ms), and a write that
 * covers part of a page may have to read that page from the device first. So a
 * write takes the blocking path only when it is small (≤ 128 KiB), whole pages
 * (4 KiB aligned), and blocking writes have not stalled the event loop for long
 * lately (see StallBudget: 20 ms of writes over 2 ms each within a second pause
 * the blocking path for 1 s); everything else goes through the asynchronous
 * fs.write. The blocking path saves the two thread hand-offs of fs.write, about
 * 20 µs of every 4 KiB write at queue depth 1.
 * Reads first try preadv2 with RWF_NOWAIT, which copies from the page cache
 * without ever waiting for the device, and fall back to the asynchronous
 * fs.read for what is not cached. Buffered pwritev2(RWF_NOWAIT) is not
 * supported on ext4 (EOPNOTSUPP), so writes have no such guarantee.
 *
 * libc is reached through bun:ffi (flock, ioctl, fallocate, preadv2); this
 * also works inside a `bun build --compile` binary.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import { dlopen, FFIType, ptr, read as ffiRead } from "bun:ffi";

/** Options for {@link Provider.open}. */
export interface ProviderOptions {
  /** Take an exclusive lock (flock, plus O_EXCL on block devices). Default true. */
  exclusive?: boolean;
  /** Open read-only; write, zero and flush are then programmer errors. */
  readOnly?: boolean;
  /** A blocking write slower than this (ms) is slow. Default 2. */
  blockingWriteSlowMs?: number;
  /**
   * When slow blocking writes add up to this much (ms) within a second, every write goes
   * through the thread pool for the next second. Default 20.
   */
  blockingStallBudgetMs?: number;
}

/** An operating error on a provider; `code` is an errno name ("EBUSY", "EIO"). */
export class ProviderError extends Error {
  /** errno name, e.g. "EBUSY", "ENOENT", "EACCES", "EIO". */
  readonly code: string;

  /** Creates an error with an errno name and a "Cannot …" message. */
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "ProviderError";
    this.code = code;
  }
}

const LOCK_EX = 2;
const LOCK_NB = 4;
const RWF_NOWAIT = 8;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const BLKGETSIZE64 = 0x80081272; // _IOR(0x12, 114, size_t)
const BLKSSZGET = 0x1268; // _IO(0x12, 104): logical sector size
const BLKZEROOUT = 0x127f; // _IO(0x12, 127)
/** Largest write that may take the blocking path (see the table above). */
const BLOCKING_WRITE_MAX_BYTES = 128 * 1024;
/** Blocking writes must cover whole pages: a partial page may need a read first. */
const BLOCKING_WRITE_ALIGN_BYTES = 4096;
/** A blocking write slower than this stalled the event loop (ms)... */
const BLOCKING_WRITE_SLOW_MS = 2;
/** ...and when such stalls add up to this much within BLOCKING_STALL_WINDOW_MS... */
const BLOCKING_STALL_BUDGET_MS = 20;
const BLOCKING_STALL_WINDOW_MS = 1000;
/** For this long after a slow write, each blocking write notes whether its thread slept (ms). */
const BLOCKING_STALL_WATCH_MS = 2000;
/** ...every write goes through the thread pool for this long (ms). */
const BLOCKING_WRITE_BACKOFF_MS = 1000;

/**
 * Decides when blocking writes stalled the event loop too much. One slow write is not enough:
 * on this 2-core VM, 2–5 ms blocking writes came every second or so under 4 KiB QD32 load,
 * and pausing the blocking path for a second after each sent ~40–80% of all writes through the
 * thread pool, ~10% fewer IOPS (bench/RESULTS.md). Most were a thread preempted in the
 * syscall by another busy thread: no fault of the disk, and the thread pool would not avoid it.
 * So within WATCH_MS of a slow write, each blocking write notes whether its thread slept in the
 * kernel (a voluntary context switch: waiting for the device, dirty-page throttling, a lock),
 * and a slow write that did not is not counted. The first slow write after a quiet spell is
 * counted (nothing was noted before it). Dirty-page throttling stalls a write for 10–200 ms, and
 * does so again and again: one such stall, or a few, exhaust the budget.
 */
export class StallBudget {
  readonly #slowMs: number;
  readonly #budgetMs: number;
  #windowStartMs = -Infinity;
  #stalledMs = 0;
  #lastSlowMs = -Infinity;

  constructor(slowMs = BLOCKING_WRITE_SLOW_MS, budgetMs = BLOCKING_STALL_BUDGET_MS) {
    this.#slowMs = slowMs;
    this.#budgetMs = budgetMs;
  }

  /** True when a write of `tookMs` is slow (it counts against the budget). */
  isSlow(tookMs: number): boolean {
    return tookMs >= this.#slowMs;
  }

  /** True when a write starting now should note whether its thread slept (see the class). */
  watching(nowMs: number): boolean {
    return nowMs - this.#lastSlowMs <= BLOCKING_STALL_WATCH_MS;
  }

  /**
   * Notes a write that ended at `endedMs` after `tookMs`; `slept` tells whether its thread slept
   * in the kernel meanwhile (null: not noted). True when the stalls within the current window
   * now exceed the budget (the window then starts over).
   */
  exceeded(endedMs: number, tookMs: number, slept: boolean | null = null): boolean {
    if (!this.isSlow(tookMs)) return false;
    this.#lastSlowMs = endedMs;
    if (slept === false) return false; // preempted: the disk did not hold it up
    if (endedMs - this.#windowStartMs > BLOCKING_STALL_WINDOW_MS) {
      this.#windowStartMs = endedMs - tookMs;
      this.#stalledMs = 0;
    }
    this.#stalledMs += tookMs;
    if (this.#stalledMs < this.#budgetMs) return false;
    this.#windowStartMs = -Infinity;
    this.#stalledMs = 0;
    return true;
  }
}
/** Largest buffer of zeros written when the device cannot zero by itself. */
const ZERO_WRITE_CHUNK_BYTES = 1 << 20;
/** Largest range given to one fallocate/ioctl, so the event loop runs in between. */
const ZERO_CALL_CHUNK_BYTES = 64 << 20;

const errnoNames = new Map<number, string>(
  Object.entries(os.constants.errno).map(([name, value]) => [value, name]),
);

function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `errno ${errno}`;
}

function openLibc() {
  return dlopen("libc.so.6", {
    flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    ioctl: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
    fallocate: {
      args: [FFIType.i32, FFIType.i32, FFIType.i64, FFIType.i64],
      returns: FFIType.i32,
    },
    preadv2: {
      args: [FFIType.i32, FFIType.ptr, FFIType.i32, FFIType.i64, FFIType.i32],
      returns: FFIType.i64_fast,
    },
    __errno_location: { args: [], returns: FFIType.ptr },
    getrusage: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
  }).symbols;
}

let libcSymbols: ReturnType<typeof openLibc> | null = null;

/** libc, opened on first use so that importing this module has no side effects. */
function libc(): ReturnType<typeof openLibc> {
  libcSymbols ??= openLibc();
  return libcSymbols;
}

/** errno of the last failed libc call on this thread. */
function lastErrno(): number {
  const location = libc().__errno_location();
  assert(location !== null);
  return ffiRead.i32(location, 0);
}

const RUSAGE_THREAD = 1;
/** struct rusage on x86_64 and aarch64 Linux: 2 timevals, then 14 longs; ru_nvcsw is the 15th field. */
const rusage = new BigInt64Array(18);
const RU_NVCSW = 16;

/**
 * How many times this thread has slept in the kernel (voluntary context switches; a thread
 * preempted while runnable counts as involuntary), or -1 if getrusage failed. ~1.7 µs.
 */
export function threadSleeps(): number {
  if (libc().getrusage(RUSAGE_THREAD, ptr(rusage)) !== 0) return -1;
  return Number(rusage[RU_NVCSW]);
}

/** One iovec for preadv2, reused: JavaScript runs one call at a time per thread. */
const iovec = new BigUint64Array(2);

/** Shared source of zeros for writes; never written to. */
let zeroChunk: Uint8Array | null = null;

/** True for the errno names with which fdatasync (or an O_DSYNC write) says it cannot flush. */
function flushUnsupportedCode(code: string): boolean {
  return code === "EINVAL" || code === "ENOTSUP" || code === "EOPNOTSUPP";
}

/** Wraps a Node error (or errno name) from an I/O call into a ProviderError. */
function ioError(action: string, path: string, error: unknown): ProviderError {
  const code = (error as NodeJS.ErrnoException)?.code ?? "EIO";
  const detail = error instanceof Error ? error.message : String(error);
  return new ProviderError(code, `Cannot ${action} provider "${path}": ${detail}`, {
    cause: error,
  });
}

function fsRead(fd: number, buf: Uint8Array, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, 0, buf.length, position, (error, bytesRead) => {
      if (error) reject(error);
      else resolve(bytesRead);
    });
  });
}

function fsWrite(fd: number, buf: Uint8Array, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, 0, buf.length, position, (error, bytesWritten) => {
      if (error) reject(error);
      else resolve(bytesWritten);
    });
  });
}

function fsFdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.fdatasync(fd, (error) => (error ? reject(error) : resolve()));
  });
}

function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Opens the path, mapping Node's errors to ProviderError with a clear message. */
function openFd(path: string, readOnly: boolean, exclusiveDevice: boolean): number {
  const C = fs.constants;
  const flags = (readOnly ? C.O_RDONLY : C.O_RDWR) | (exclusiveDevice ? C.O_EXCL : 0);
  try {
    return fs.openSync(path, flags);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? "EIO";
    if (code === "EBUSY") {
      throw new ProviderError(
        code,
        `Cannot open provider "${path}": in use (mounted or opened exclusively)`,
        { cause: error },
      );
    }
    throw ioError("open", path, error);
  }
}

/** Takes flock(LOCK_EX|LOCK_NB); throws EBUSY if another open file description holds it. */
function lockFd(fd: number, path: string): void {
  if (libc().flock(fd, LOCK_EX | LOCK_NB) === 0) return;
  const errno = errnoName(lastErrno());
  if (errno === "EWOULDBLOCK" || errno === "EAGAIN") {
    throw new ProviderError(
      "EBUSY",
      `Cannot open provider "${path}": in use by another process (locked)`,
    );
  }
  throw new ProviderError(errno, `Cannot lock provider "${path}": ${errno}`);
}

function notFileOrDevice(path: string): ProviderError {
  return new ProviderError(
    "EINVAL",
    `Cannot open provider "${path}": not a regular file or block device`,
  );
}

/** Reads an integer property of a block device through ioctl. */
function blockDeviceIoctl(fd: number, path: string, request: number, what: string): number {
  const out = new BigUint64Array(1);
  if (libc().ioctl(fd, request, out) !== 0) {
    const errno = errnoName(lastErrno());
    throw new ProviderError(errno, `Cannot read ${what} of provider "${path}": ${errno}`);
  }
  // BLKSSZGET writes an int: the low 32 bits on little-endian machines.
  const value = request === BLKSSZGET ? Number(out[0]! & 0xffffffffn) : Number(out[0]!);
  assert(Number.isSafeInteger(value) && value >= 0);
  return value;
}

/**
 * An open provider. Offsets and lengths are in bytes from the start of the
 * provider; every range must lie inside it (asserted: callers validate input).
 */
export class Provider {
  /** Path given to {@link Provider.open}. */
  readonly path: string;
  /** The open file descriptor (O_CLOEXEC). */
  readonly fd: number;
  /** Size of the file or device at open time. */
  readonly sizeBytes: number;
  /** True for a block device, false for a regular file. */
  readonly isBlockDevice: boolean;
  /** Logical sector size of a block device; 512 for a regular file. */
  readonly sectorSizeBytes: number;
  readonly #readOnly: boolean;
  #closed = false;
  #closePending = false;
  #pendingOps = 0;
  #nowaitReads = true;
  readonly #stalls: StallBudget;
  #blockingPausedUntilMs = 0;
  /** Writes that took the blocking path, and those of them slower than 2 ms. */
  blockingWrites = 0;
  slowBlockingWrites = 0;
  /** Slow blocking writes during which the thread did not sleep (preempted): not counted. */
  preemptedBlockingWrites = 0;
  /** How many times slow blocking writes sent every write through the thread pool for 1 s. */
  blockingPauses = 0;
  #canPunch = true;
  /** A second descriptor on the same inode, opened O_DSYNC on first use (see writeDurable). */
  #dsyncFd = -1;
  /** Flushes started so far; the n-th flush to start has epoch n (see nextFlushEpoch). */
  #flushesStarted = 0;
  /** Every flush of epoch 1 to #flushedEpoch succeeded. */
  #flushedEpoch = 0;
  /** Succeeded flushes beyond #flushedEpoch, waiting for an earlier one still running. */
  readonly #flushedAhead = new Set<number>();
  /** A flush failed or is unsupported: no later flush proves anything (see flushed). */
  #flushBroken = false;
  /** A write or zeroing ran since the last flush started (or since open: unknown before). */
  #writtenSinceFlush = true;
  #flushUnsupported = false;

  private constructor(args: {
    path: string;
    fd: number;
    sizeBytes: number;
    isBlockDevice: boolean;
    sectorSizeBytes: number;
    readOnly: boolean;
    stalls: StallBudget;
  }) {
    this.path = args.path;
    this.fd = args.fd;
    this.sizeBytes = args.sizeBytes;
    this.isBlockDevice = args.isBlockDevice;
    this.sectorSizeBytes = args.sectorSizeBytes;
    this.#readOnly = args.readOnly;
    this.#stalls = args.stalls;
  }

  /**
   * Opens a regular file or block device.
   * @param path file or device path
   * @param options exclusive (default true): flock, plus O_EXCL for a block
   *   device (EBUSY when mounted or claimed); readOnly: O_RDONLY
   * @returns the open provider
   * @throws ProviderError with `code` "EBUSY" (locked or in use), "ENOENT",
   *   "EACCES", "EINVAL" (neither a regular file nor a block device), …
   */
  static open(path: string, options: ProviderOptions = {}): Provider {
    const exclusive = options.exclusive ?? true;
    const readOnly = options.readOnly ?? false;
    const kind = Provider.#statPath(path);
    const fd = openFd(path, readOnly, exclusive && kind === "block");
    try {
      const stat = fs.fstatSync(fd);
      if (!stat.isFile() && !stat.isBlockDevice()) throw notFileOrDevice(path);
      if (exclusive) lockFd(fd, path);
      const isBlockDevice = stat.isBlockDevice();
      const sizeBytes = isBlockDevice
        ? blockDeviceIoctl(fd, path, BLKGETSIZE64, "size")
        : stat.size;
      const sectorSizeBytes = isBlockDevice
        ? blockDeviceIoctl(fd, path, BLKSSZGET, "sector size")
        : 512;
      const stalls = new StallBudget(options.blockingWriteSlowMs, options.blockingStallBudgetMs);
      return new Provider({ path, fd, sizeBytes, isBlockDevice, sectorSizeBytes, readOnly, stalls });
    } catch (error) {
      fs.closeSync(fd);
      throw error;
    }
  }

  /**
   * Kind of the path before opening: O_EXCL means something else on a regular
   * file, and opening a FIFO read-only would block.
   */
  static #statPath(path: string): "block" | "file" {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(path);
    } catch (error) {
      throw ioError("open", path, error);
    }
    if (stat.isBlockDevice()) return "block";
    if (stat.isFile()) return "file";
    throw notFileOrDevice(path);
  }

  /**
   * The epoch of the flush that makes durable what was written (write, zero) before this call:
   * pass it to {@link flushed} later. Flushes are numbered from 1 as they start; a write that
   * ended before flush n started is durable once flush n succeeded. Epochs only grow.
   */
  nextFlushEpoch(): number {
    return this.#writtenSinceFlush ? this.#flushesStarted + 1 : this.#flushesStarted;
  }

  /**
   * True when every flush up to `epoch` succeeded, so what was written before
   * nextFlushEpoch() returned `epoch` is durable. Never true again for a later epoch once a
   * flush failed: Linux reports a lost cached write to one fdatasync of a descriptor only, so a
   * flush after a failed one may succeed over the loss (and one that ran beside it may have
   * missed the report). Nor after a flush the device does not support.
   */
  flushed(epoch: number): boolean {
    assert(Number.isSafeInteger(epoch) && epoch >= 0, `bad flush epoch ${epoch}`);
    return epoch <= this.#flushedEpoch;
  }

  /**
   * True once the device reported that it cannot flush (EINVAL, ENOTSUP, EOPNOTSUPP from an
   * fdatasync or an O_DSYNC write): nothing written to it is ever known durable, and
   * writeDurable writes without O_DSYNC (spec §4: metaflush turns itself off).
   */
  get flushUnsupported(): boolean {
    return this.#flushUnsupported;
  }

  #flushSucceeded(epoch: number): void {
    if (this.#flushBroken) return;
    this.#flushedAhead.add(epoch);
    while (this.#flushedAhead.delete(this.#flushedEpoch + 1)) this.#flushedEpoch++;
  }

  #flushFailed(): void {
    this.#flushBroken = true;
    this.#flushedAhead.clear();
  }

  /** Reads exactly `length` bytes at `offset` into a new buffer. */
  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = new Uint8Array(length);
    await this.readInto(offset, buf);
    return buf;
  }

  /** Fills `buf` from `offset`; loops over short reads; EOF is an "EIO" error. */
  async readInto(offset: number, buf: Uint8Array): Promise<void> {
    this.#assertRange(offset, buf.length);
    let done = this.#readCached(offset, buf);
    if (done === buf.length) return;
    this.#pendingOps++;
    try {
      while (done < buf.length) {
        const part = buf.subarray(done);
        let bytesRead: number;
        try {
          bytesRead = await fsRead(this.fd, part, offset + done);
        } catch (error) {
          throw ioError("read", this.path, error);
        }
        if (bytesRead === 0) {
          throw new ProviderError(
            "EIO",
            `Cannot read provider "${this.path}": end of file at offset "${offset + done}"`,
          );
        }
        done += bytesRead;
      }
    } finally {
      this.#opDone();
    }
  }

  /**
   * Copies what the page cache holds, never waiting for the device
   * (preadv2 with RWF_NOWAIT). Returns the bytes copied, from 0 to buf.length.
   */
  #readCached(offset: number, buf: Uint8Array): number {
    if (!this.#nowaitReads || buf.length === 0) return 0;
    iovec[0] = BigInt(ptr(buf));
    iovec[1] = BigInt(buf.length);
    // i64_fast: a number whenever it fits, and a read length always fits.
    const result = Number(libc().preadv2(this.fd, iovec, 1, offset, RWF_NOWAIT));
    if (result >= 0) return result;
    const errno = errnoName(lastErrno());
    // Not supported here: stop trying. Other errors: the slow path reports them.
    if (errno === "EOPNOTSUPP" || errno === "ENOTSUP" || errno === "ENOSYS") {
      this.#nowaitReads = false;
    }
    return 0;
  }

  /**
   * Writes all of `data` at `offset`; loops over short writes. Small page-aligned
   * writes complete on this thread before the call returns (see the table above).
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    assert(!this.#readOnly, "write on a read-only provider");
    this.#assertRange(offset, data.length);
    this.#writtenSinceFlush = true;
    if (this.#mayBlock(offset, data.length)) {
      const startedMs = performance.now();
      const sleepsBefore = this.#stalls.watching(startedMs) ? threadSleeps() : -1;
      this.#writeBlocking(offset, data);
      const endedMs = performance.now();
      this.blockingWrites++;
      const tookMs = endedMs - startedMs;
      let slept: boolean | null = null;
      if (this.#stalls.isSlow(tookMs)) {
        this.slowBlockingWrites++;
        const sleepsAfter = sleepsBefore < 0 ? -1 : threadSleeps();
        if (sleepsAfter >= 0) slept = sleepsAfter > sleepsBefore;
        if (slept === false) this.preemptedBlockingWrites++;
      }
      if (this.#stalls.exceeded(endedMs, tookMs, slept)) {
        this.blockingPauses++;
        this.#blockingPausedUntilMs = endedMs + BLOCKING_WRITE_BACKOFF_MS;
      }
      return;
    }
    this.#pendingOps++;
    try {
      await this.#writeAll(offset, data);
    } finally {
      // Also at the end: a flush that started while it ran may not cover it.
      this.#writtenSinceFlush = true;
      this.#opDone();
    }
  }

  #mayBlock(offset: number, length: number): boolean {
    return length <= BLOCKING_WRITE_MAX_BYTES &&
      offset % BLOCKING_WRITE_ALIGN_BYTES === 0 && length % BLOCKING_WRITE_ALIGN_BYTES === 0 &&
      performance.now() >= this.#blockingPausedUntilMs;
  }

  /**
   * Writes all of `data` at `offset` on this thread, blocking it until the kernel took the
   * bytes (a page-cache copy, ~4 µs for 4 KiB, unless dirty-page throttling makes the kernel
   * wait). Only `write` calls it, after its own checks.
   */
  #writeBlocking(offset: number, data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      let bytesWritten: number;
      try {
        bytesWritten = fs.writeSync(this.fd, data, done, data.length - done, offset + done);
      } catch (error) {
        throw ioError("write", this.path, error);
      }
      if (bytesWritten === 0) {
        throw new ProviderError(
          "EIO",
          `Cannot write provider "${this.path}": no progress at offset "${offset + done}"`,
        );
      }
      done += bytesWritten;
    }
  }

  /**
   * Writes all of `data` at `offset` and returns once that range is durable. It goes through
   * an O_DSYNC descriptor, so the kernel writes back and flushes this range only; write +
   * flush would first write back every dirty page of the provider (the data written since
   * the last flush). For small metadata writes (the records, the activemap) whose durability
   * may not wait for the data's. A lost cached write of the data (writeback EIO) may fail it
   * too: the kernel reports that once to each open file description, so this descriptor's
   * report leaves the data descriptor's for its next flush.
   * @returns true when durable; false when the device cannot flush (see flushUnsupported):
   *   then `data` is written as by {@link write}, and never known durable
   */
  async writeDurable(offset: number, data: Uint8Array): Promise<boolean> {
    assert(!this.#readOnly, "write on a read-only provider");
    this.#assertRange(offset, data.length);
    if (this.#flushUnsupported) {
      await this.write(offset, data);
      return false;
    }
    if (this.#dsyncFd < 0) this.#dsyncFd = this.#openDsync();
    this.#pendingOps++;
    try {
      await this.#writeAll(offset, data, this.#dsyncFd);
      return true;
    } catch (error) {
      if (!(error instanceof ProviderError) || !flushUnsupportedCode(error.code)) throw error;
      this.#flushUnsupported = true;
      this.#flushFailed();
      // The sync of an O_DSYNC write runs after the copy into the page cache, so the data may
      // or may not be there: written again, plainly.
      this.#writtenSinceFlush = true;
      await this.#writeAll(offset, data);
      return false;
    } finally {
      this.#opDone();
    }
  }

  /** Opens the provider's path again with O_DSYNC (not exclusive) and checks it is the same inode. */
  #openDsync(): number {
    const C = fs.constants;
    let fd: number;
    try {
      fd = fs.openSync(this.path, C.O_RDWR | C.O_DSYNC);
    } catch (error) {
      throw ioError("open (O_DSYNC)", this.path, error);
    }
    const mine = fs.fstatSync(this.fd);
    const again = fs.fstatSync(fd);
    if (mine.dev !== again.dev || mine.ino !== again.ino || mine.rdev !== again.rdev) {
      fs.closeSync(fd);
      throw new ProviderError("EIO", `Cannot open provider "${this.path}" again: the path now names another file`);
    }
    return fd;
  }

  /** The write loop, for callers that already count as a pending operation. */
  async #writeAll(offset: number, data: Uint8Array, fd = this.fd): Promise<void> {
    let done = 0;
    while (done < data.length) {
      let bytesWritten: number;
      try {
        bytesWritten = await fsWrite(fd, data.subarray(done), offset + done);
      } catch (error) {
        throw ioError("write", this.path, error);
      }
      if (bytesWritten === 0) {
        throw new ProviderError(
          "EIO",
          `Cannot write provider "${this.path}": no progress at offset "${offset + done}"`,
        );
      }
      done += bytesWritten;
    }
  }

  /**
   * fdatasync. Returns false when the device does not support flushing
   * (EINVAL, ENOTSUP, EOPNOTSUPP).
   *
   * Linux reports a lost cached write (writeback EIO) to one fdatasync of this
   * descriptor only, so only the data's flush path (whose failure is recorded,
   * see storage.ts stickyFlushFailure) and the worker's start and stop (which
   * record it themselves) call this; metadata uses writeDurable. Each call is
   * one flush epoch: when it succeeds (and every earlier one did), what was
   * written before it started is durable (see nextFlushEpoch, flushed).
   */
  async flush(): Promise<boolean> {
    this.#assertOpen();
    const epoch = ++this.#flushesStarted;
    this.#writtenSinceFlush = false;
    this.#pendingOps++;
    try {
      await fsFdatasync(this.fd);
      this.#flushSucceeded(epoch);
      return true;
    } catch (error) {
      this.#flushFailed();
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== undefined && flushUnsupportedCode(code)) {
        this.#flushUnsupported = true;
        return false;
      }
      throw ioError("flush", this.path, error);
    } finally {
      this.#opDone();
    }
  }

  /**
   * Makes [offset, offset+length) read back as zeros: punches a hole in a
   * file, BLKZEROOUT on a block device (sector-aligned middle part), and
   * writes zeros in chunks of at most 1 MiB where neither is possible.
   */
  async zero(offset: number, length: number): Promise<void> {
    assert(!this.#readOnly, "zero on a read-only provider");
    this.#assertRange(offset, length);
    this.#writtenSinceFlush = true;
    this.#pendingOps++;
    try {
      if (this.isBlockDevice) await this.#zeroDevice(offset, length);
      else await this.#zeroFile(offset, length);
    } finally {
      this.#writtenSinceFlush = true; // see write
      this.#opDone();
    }
  }

  async #zeroFile(offset: number, length: number): Promise<void> {
    let done = 0;
    while (this.#canPunch && done < length) {
      const part = Math.min(length - done, ZERO_CALL_CHUNK_BYTES);
      const mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
      if (libc().fallocate(this.fd, mode, offset + done, part) !== 0) {
        const errno = errnoName(lastErrno());
        if (errno !== "EOPNOTSUPP" && errno !== "ENOTSUP" && errno !== "ENOSYS") {
          throw new ProviderError(errno, `Cannot zero provider "${this.path}": ${errno}`);
        }
        this.#canPunch = false;
        break;
      }
      done += part;
      if (done < length) await yieldToEventLoop();
    }
    await this.#writeZeros(offset + done, length - done);
  }

  async #zeroDevice(offset: number, length: number): Promise<void> {
    const sector = this.sectorSizeBytes;
    const start = Math.min(offset + length, Math.ceil(offset / sector) * sector);
    const end = Math.max(start, Math.floor((offset + length) / sector) * sector);
    await this.#writeZeros(offset, start - offset);
    await this.#writeZeros(end, offset + length - end);
    const range = new BigUint64Array(2);
    for (let at = start; at < end; ) {
      const part = Math.min(end - at, ZERO_CALL_CHUNK_BYTES);
      range[0] = BigInt(at);
      range[1] = BigInt(part);
      if (libc().ioctl(this.fd, BLKZEROOUT, range) !== 0) {
        const errno = errnoName(lastErrno());
        if (errno !== "EOPNOTSUPP" && errno !== "ENOTSUP" && errno !== "ENOTTY") {
          throw new ProviderError(errno, `Cannot zero provider "${this.path}": ${errno}`);
        }
        await this.#writeZeros(at, end - at);
        return;
      }
      at += part;
      if (at < end) await yieldToEventLoop();
    }
  }

  async #writeZeros(offset: number, length: number): Promise<void> {
    zeroChunk ??= new Uint8Array(ZERO_WRITE_CHUNK_BYTES);
    for (let done = 0; done < length; ) {
      const part = Math.min(length - done, zeroChunk.length);
      await this.#writeAll(offset + done, zeroChunk.subarray(0, part));
      done += part;
    }
  }

  /**
   * Closes the descriptor (which releases the lock). Idempotent. If I/O is
   * still in flight the descriptor is closed when it finishes, so a reused
   * descriptor number can never receive a late write.
   */
  close(): void {
    if (this.#closed || this.#closePending) return;
    this.#closePending = true;
    if (this.#pendingOps === 0) this.#closeNow();
  }

  #closeNow(): void {
    this.#closed = true;
    if (this.#dsyncFd >= 0) fs.closeSync(this.#dsyncFd);
    fs.closeSync(this.fd);
  }

  #opDone(): void {
    this.#pendingOps--;
    assert(this.#pendingOps >= 0);
    if (this.#closePending && !this.#closed && this.#pendingOps === 0) this.#closeNow();
  }

  #assertOpen(): void {
    assert(!this.#closePending, `provider "${this.path}" is closed`);
  }

  #assertRange(offset: number, length: number): void {
    this.#assertOpen();
    assert(Number.isSafeInteger(offset) && offset >= 0, `bad offset ${offset}`);
    assert(Number.isSafeInteger(length) && length >= 0, `bad length ${length}`);
    assert(
      offset + length <= this.sizeBytes,
      `range ${offset}+${length} beyond provider size ${this.sizeBytes}`,
    );
  }
}
