// Proves that Provider reads and writes real files and block devices (a loop
// device set up by the test), locks them exclusively, zeroes ranges so they read
// back as zeros, and reports operating errors as ProviderError with errno names.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { dlopen, FFIType } from "bun:ffi";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Provider, ProviderError, StallBudget, threadSleeps } from "./provider.ts";
import { failFdatasync } from "../test/fs_faults.ts";

const MiB = 1024 * 1024;
let dir = "";

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "hast-provider-"));
});

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

/** The file's bytes as seen through the file system, not through the provider. */
function fileBytes(file: string): Uint8Array {
  return new Uint8Array(fs.readFileSync(file));
}

function makeFile(name: string, sizeBytes: number): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, new Uint8Array(0));
  fs.truncateSync(file, sizeBytes);
  return file;
}


async function expectProviderError(fn: () => unknown, code: string): Promise<ProviderError> {
  try {
    await fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ProviderError);
    expect((error as ProviderError).code).toBe(code);
    return error as ProviderError;
  }
  throw new Error(`expected ProviderError ${code}`);
}

/** Drops a file's clean pages from the page cache, so reads take the slow path. */
function evictFromCache(file: string): void {
  const libc = dlopen("libc.so.6", {
    posix_fadvise: {
      args: [FFIType.i32, FFIType.i64, FFIType.i64, FFIType.i32],
      returns: FFIType.i32,
    },
  });
  const fd = fs.openSync(file, "r");
  try {
    fs.fdatasyncSync(fd);
    const POSIX_FADV_DONTNEED = 4;
    expect(libc.symbols.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)).toBe(0);
  } finally {
    fs.closeSync(fd);
    libc.close();
  }
}

describe("regular file", () => {
  test("writes and reads back at unaligned offsets, cached and uncached", async () => {
    const file = makeFile("rw.img", 8 * MiB);
    const p = Provider.open(file);
    try {
      expect(p.sizeBytes).toBe(8 * MiB);
      expect(p.isBlockDevice).toBe(false);
      const big = pattern(3 * MiB + 123, 7);
      await p.write(4097, big);
      await p.write(0, pattern(100, 1));
      expect(await p.read(4097, big.length)).toEqual(big);
      expect(await p.flush()).toBe(true);
      evictFromCache(file);
      const back: Uint8Array = new Uint8Array(big.length);
      await p.readInto(4097, back);
      expect(back).toEqual(big);
      expect(await p.read(0, 100)).toEqual(pattern(100, 1));
      // The file itself holds the bytes (not only some cache of ours).
      expect(fileBytes(file).subarray(4097, 4097 + big.length)).toEqual(big);
    } finally {
      p.close();
    }
  });

  test("small page-aligned writes take the blocking path; others and writes after a slow one do not", async () => {
    const file = makeFile("blocking.img", 4 * MiB);
    const p = Provider.open(file);
    try {
      // Whole pages up to 128 KiB: written before write() returns.
      const page = pattern(4096, 3);
      const pending = p.write(8192, page);
      expect(fileBytes(file).subarray(8192, 8192 + 4096)).toEqual(page);
      await pending;
      await p.write(0, pattern(128 * 1024, 4));
      expect([p.blockingWrites, p.slowBlockingWrites]).toEqual([2, 0]);
      // Unaligned, partial-page or large writes go through the thread pool.
      await p.write(512, pattern(4096, 5));
      await p.write(4096, pattern(512, 6));
      await p.write(0, pattern(128 * 1024 + 4096, 7));
      expect(p.blockingWrites).toBe(2);
      expect(await p.read(0, 128 * 1024 + 4096)).toEqual(pattern(128 * 1024 + 4096, 7));
    } finally {
      p.close();
    }
    // With a threshold of 0 ms every blocking write counts as slow, and with no budget one
    // such write pauses the blocking path: the next ones within a second go through the thread
    // pool, and still land.
    const q = Provider.open(file, { blockingWriteSlowMs: 0, blockingStallBudgetMs: 0 });
    try {
      await q.write(0, pattern(4096, 8));
      await q.write(4096, pattern(4096, 9));
      await q.write(8192, pattern(4096, 10));
      expect([q.blockingWrites, q.slowBlockingWrites, q.blockingPauses]).toEqual([1, 1, 1]);
      expect(await q.read(0, 3 * 4096)).toEqual(
        new Uint8Array([...pattern(4096, 8), ...pattern(4096, 9), ...pattern(4096, 10)]));
    } finally {
      q.close();
    }
  });

  test("slow blocking writes pause the blocking path only once their stalls add up", () => {
    const budget = new StallBudget(2, 20);
    // Preemption-sized stalls (2–5 ms) spread over seconds never exhaust it.
    for (let second = 0; second < 10; second++) {
      expect(budget.exceeded(second * 1000 + 100, 4)).toBe(false);
      expect(budget.exceeded(second * 1000 + 600, 5)).toBe(false);
    }
    // Fast writes do not count at all.
    expect(budget.exceeded(20_000, 1.9)).toBe(false);
    // Stalls adding up to 20 ms within a second do: 5 + 5 + 5 + 5.
    expect([30_000, 30_200, 30_400].map((at) => budget.exceeded(at, 5))).toEqual([false, false, false]);
    expect(budget.exceeded(30_600, 5)).toBe(true);
    // The window starts over after a pause...
    expect(budget.exceeded(30_700, 5)).toBe(false);
    // ...and after a second: 15 ms, then 15 ms more 1.1 s later, is not enough.
    expect(budget.exceeded(40_000, 15)).toBe(false);
    expect(budget.exceeded(41_100, 15)).toBe(false);
    // One long stall (dirty-page throttling) is enough on its own.
    expect(budget.exceeded(50_000, 25)).toBe(true);
    // Within 2 s of a slow write, writes note whether their thread slept in the kernel; a slow
    // one that did not (preempted by another thread) does not count, however long.
    expect([budget.watching(51_900), budget.watching(52_100)]).toEqual([true, false]);
    expect(budget.exceeded(60_000, 15)).toBe(false); // not noted: counted
    expect(budget.watching(60_500)).toBe(true);
    expect(budget.exceeded(60_500, 30, false)).toBe(false);
    expect(budget.exceeded(60_600, 30, false)).toBe(false);
    expect(budget.exceeded(60_700, 5, true)).toBe(true); // 15 + 5 ms of sleeping in the kernel
  });

  test("threadSleeps counts this thread's sleeps in the kernel, not time it spends running", () => {
    const before = threadSleeps();
    expect(before).toBeGreaterThanOrEqual(0);
    const until = performance.now() + 20;
    let spins = 0;
    while (performance.now() < until) spins++;
    expect(spins).toBeGreaterThan(0);
    const afterSpinning = threadSleeps();
    for (let i = 0; i < 20; i++) Bun.sleepSync(1);
    const afterSleeping = threadSleeps();
    // 20 ms of running: no sleep of its own (a wait for the collector's lock may add one or two,
    // seen once under load); 20 sleeps: at least 20.
    expect(afterSpinning - before).toBeLessThan(5);
    expect(afterSleeping - afterSpinning).toBeGreaterThanOrEqual(20);
  });

  test("a second exclusive open fails with EBUSY until the first closes", async () => {
    const file = makeFile("lock.img", MiB);
    const first = Provider.open(file);
    try {
      const error = await expectProviderError(() => Provider.open(file), "EBUSY");
      expect(error.message).toBe(
        `Cannot open provider "${file}": in use by another process (locked)`,
      );
      await expectProviderError(() => Provider.open(file, { readOnly: true }), "EBUSY");
      const shared = Provider.open(file, { exclusive: false, readOnly: true });
      shared.close();
    } finally {
      first.close();
    }
    Provider.open(file).close();
  });

  test("open errors carry errno names", async () => {
    await expectProviderError(() => Provider.open(path.join(dir, "missing")), "ENOENT");
    const e = await expectProviderError(() => Provider.open(dir, { readOnly: true }), "EINVAL");
    expect(e.message).toContain("not a regular file or block device");
    const fifo = path.join(dir, "fifo");
    Bun.spawnSync(["mkfifo", fifo]);
    await expectProviderError(() => Provider.open(fifo, { readOnly: true }), "EINVAL");
    const file = makeFile("ro.img", MiB);
    fs.chmodSync(file, 0o444);
    // Root ignores file modes, so use a read-only open to show readOnly works.
    const ro = Provider.open(file, { readOnly: true });
    try {
      await expect(ro.write(0, new Uint8Array(1))).rejects.toThrow("read-only");
    } finally {
      ro.close();
    }
  });

  test("zero reads back zeros, leaves the surroundings intact", async () => {
    const file = makeFile("zero.img", 8 * MiB);
    const p = Provider.open(file);
    try {
      const data = pattern(8 * MiB, 3);
      await p.write(0, data);
      const ranges = [[1, 10], [4096, 4096], [5000, 3 * MiB + 17], [8 * MiB - 100, 100]];
      for (const [offset, length] of ranges) await p.zero(offset!, length!);
      const expected = data.slice();
      for (const [offset, length] of ranges) expected.fill(0, offset!, offset! + length!);
      expect(await p.read(0, 8 * MiB)).toEqual(expected);
      evictFromCache(file);
      expect(await p.read(0, 8 * MiB)).toEqual(expected);
      expect(fs.statSync(file).size).toBe(8 * MiB);
    } finally {
      p.close();
    }
  });

  test("a read past a truncated end fails with EIO instead of returning short", async () => {
    const file = makeFile("short.img", MiB);
    const p = Provider.open(file);
    try {
      fs.truncateSync(file, 4096);
      const error = await expectProviderError(() => p.read(0, 8192), "EIO");
      expect(error.message).toContain("end of file");
    } finally {
      p.close();
    }
  });

  test("writeDurable writes through a second, O_DSYNC descriptor that close releases", async () => {
    const file = makeFile("durable.img", MiB);
    const fdsBefore = fs.readdirSync("/proc/self/fd").length;
    const p = Provider.open(file);
    await p.write(0, pattern(8192, 1));
    await p.writeDurable(4096, pattern(4096, 2));
    expect(await p.read(0, 8192)).toEqual(new Uint8Array([...pattern(4096, 1), ...pattern(4096, 2)]));
    // Two descriptors now; the second one is O_DSYNC (octal 010000 in fdinfo's flags).
    const mine = fs.readdirSync("/proc/self/fd").filter((fd) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`) === file;
      } catch {
        return false; // the directory's own descriptor, gone already
      }
    });
    expect(mine.length).toBe(2);
    const dsync = mine.filter((fd) => {
      const flags = /flags:\s+([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"))![1]!;
      return (parseInt(flags, 8) & fs.constants.O_DSYNC) !== 0;
    });
    expect(dsync.length).toBe(1);
    p.close();
    expect(fs.readdirSync("/proc/self/fd").length).toBe(fdsBefore);
    const ro = Provider.open(file, { readOnly: true, exclusive: false });
    try {
      await expect(ro.writeDurable(0, pattern(4096, 3))).rejects.toThrow("read-only");
    } finally {
      ro.close();
    }
  });

  // Proves the bookkeeping MetadataStore relies on to know what is durable: a write is durable
  // once a flush that started after it ended succeeded, and nothing is, from a failed flush on
  // (the kernel reports a lost write to one flush only, so a later one succeeds over it).
  test("flush epochs: durable after a later flush succeeded, never after a failed one", async () => {
    const p = Provider.open(makeFile("epochs.img", MiB));
    try {
      const atOpen = p.nextFlushEpoch(); // what was written before the open is unknown
      expect(p.flushed(atOpen)).toBe(false);
      expect(await p.flush()).toBe(true);
      expect(p.flushed(atOpen)).toBe(true);
      expect(p.flushed(p.nextFlushEpoch())).toBe(true); // nothing written since
      await p.write(0, pattern(4096, 1));
      const before = p.nextFlushEpoch();
      expect(p.flushed(before)).toBe(false);
      const flushing = p.flush();
      await p.write(4096, pattern(4096, 2)); // ends after that flush started
      const during = p.nextFlushEpoch();
      expect(await flushing).toBe(true);
      expect([p.flushed(before), p.flushed(during)]).toEqual([true, false]);
      const failing = failFdatasync("EIO");
      try {
        await expectProviderError(() => p.flush(), "EIO");
      } finally {
        failing.restore();
      }
      expect(await p.flush()).toBe(true);
      await p.writeDurable(8192, pattern(4096, 3));
      expect(await p.flush()).toBe(true);
      expect(p.flushed(during)).toBe(false);
      expect(p.flushUnsupported).toBe(false);
    } finally {
      p.close();
    }
  });

  // Spec §4: metaflush turns itself off if the disk does not support flush. Proves that an
  // fdatasync or an O_DSYNC write reporting so (EOPNOTSUPP, EINVAL) makes flush return false
  // and writeDurable write plainly and return false, with the data in place either way.
  test("a device that cannot flush: flush and writeDurable say so, the data is written", async () => {
    for (const via of ["fdatasync", "O_DSYNC write"] as const) {
      const file = makeFile(`noflush-${via.length}.img`, MiB);
      const p = Provider.open(file);
      const realWrite = fs.write;
      let dsyncWrites = 0;
      const failing = via === "fdatasync" ? failFdatasync("EOPNOTSUPP") : null;
      // An O_DSYNC write that cannot flush copies the data, then fails in its sync.
      Object.assign(fs, {
        write: (fd: number, buf: Uint8Array, o: number, l: number, at: number, cb: (...a: unknown[]) => void) =>
          fd === p.fd ? realWrite(fd, buf, o, l, at, cb) : realWrite(fd, buf, o, l, at, () => {
            dsyncWrites++;
            cb(Object.assign(new Error("EINVAL: invalid argument, write"), { code: "EINVAL" }));
          }),
      });
      try {
        if (via === "fdatasync") expect(await p.flush()).toBe(false);
        expect(await p.writeDurable(4096, pattern(8192, 4))).toBe(false);
        expect(await p.writeDurable(16384, pattern(4096, 5))).toBe(false);
        expect(p.flushUnsupported).toBe(true);
        expect(dsyncWrites).toBe(via === "fdatasync" ? 0 : 1); // then no longer tried
        expect(p.flushed(p.nextFlushEpoch())).toBe(false);
      } finally {
        Object.assign(fs, { write: realWrite });
        failing?.restore();
        p.close();
      }
      expect(fileBytes(file).subarray(4096, 20480)).toEqual(
        new Uint8Array([...pattern(8192, 4), ...new Uint8Array(4096), ...pattern(4096, 5)]));
    }
  });

  test("close during a write closes the descriptor only after the write", async () => {
    const file = makeFile("close.img", 4 * MiB);
    const p = Provider.open(file);
    const writing = p.write(0, pattern(4 * MiB, 9));
    p.close();
    p.close(); // idempotent
    await expect(p.read(0, 1)).rejects.toThrow("closed");
    await writing;
    expect(fileBytes(file)).toEqual(pattern(4 * MiB, 9));
    Provider.open(file).close(); // lock released
  });
});

function sh(cmd: string[]): string {
  const r = Bun.spawnSync(cmd);
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")}: ${r.stderr.toString()}`);
  return r.stdout.toString().trim();
}

describe("loop device", () => {
  test("size, exclusive open, I/O and zero on a real block device", async () => {
    const backing = makeFile("loop.img", 64 * MiB);
    const device = sh(["losetup", "-f", "--show", backing]);
    const alias = path.join(dir, "loop-alias");
    try {
      const p = Provider.open(device);
      try {
        expect(p.isBlockDevice).toBe(true);
        expect(p.sizeBytes).toBe(64 * MiB);
        expect([512, 4096]).toContain(p.sectorSizeBytes);
        const locked = await expectProviderError(() => Provider.open(device), "EBUSY");
        expect(locked.message).toContain("in use");
        // Another device node for the same device: flock does not see it, O_EXCL does.
        const { rdev } = fs.statSync(device);
        const major = (rdev >> 8) & 0xfff;
        const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
        sh(["mknod", alias, "b", String(major), String(minor)]);
        const claimed = await expectProviderError(() => Provider.open(alias), "EBUSY");
        expect(claimed.message).toContain("mounted or opened exclusively");

        const data = pattern(4 * MiB, 5);
        await p.write(MiB, data);
        expect(await p.read(MiB, data.length)).toEqual(data);
        const ranges = [[MiB + 100, 300], [MiB + 4096, MiB], [2 * MiB + 7, MiB + 4000]];
        for (const [offset, length] of ranges) await p.zero(offset!, length!);
        const expected = data.slice();
        for (const [o, l] of ranges) expected.fill(0, o! - MiB, o! - MiB + l!);
        expect(await p.read(MiB, data.length)).toEqual(expected);
        expect(await p.flush()).toBe(true);
        expect(fileBytes(backing).subarray(MiB, 5 * MiB)).toEqual(expected);
        // The O_DSYNC descriptor is a second, non-exclusive open of the claimed device.
        await p.writeDurable(0, pattern(8192, 6));
        expect(fileBytes(backing).subarray(0, 8192)).toEqual(pattern(8192, 6));
      } finally {
        p.close();
      }
      Provider.open(device).close();
    } finally {
      fs.rmSync(alias, { force: true });
      sh(["losetup", "-d", device]);
    }
  });
});
