/**
 * A bounded single-producer/single-consumer ring of u32 values (slot indices)
 * in a SharedArrayBuffer, for handing requests between two threads (spec §11:
 * bounded queues between the stages of a resource worker).
 *
 * Layout at `byteOffset` (64-byte aligned), one cache line per writer so that
 * the producer and the consumer never write to the same line:
 *
 *   line 0  magic, capacity                 written once by the initialiser
 *   line 1  head      (monotonic Int32)     written by the consumer only
 *   line 2  tail      (monotonic Int32)     written by the producer only
 *   line 3  sleeping  (0/1 announcement)    written by the consumer only
 *   then    capacity × u32 entries
 *
 * head and tail count pushes/pops and wrap at 2^32 (Int32 overflow); the
 * entry index is `counter & (capacity - 1)` and the size is `(tail - head) | 0`,
 * both correct across the wrap because capacity is a power of two < 2^31.
 *
 * Ordering: entries are written with plain stores, then published with
 * `Atomics.store(tail)`; the consumer reads `Atomics.load(tail)` before the
 * entries. JS atomics are sequentially consistent, so the store/load pair
 * orders the plain accesses around it (the same holds for head and reuse of
 * an entry by the producer).
 *
 * Wake-up: the consumer sleeps on the tail word itself with the tail it saw
 * (`Atomics.wait(tail, seen)`), after announcing `sleeping = 1` and checking
 * tail once more. The producer notifies only when it reads `sleeping == 1`.
 * This is Dekker's pattern under sequential consistency: either the
 * consumer's re-check sees the new tail, or the producer sees the
 * announcement and notifies; and a notify that comes before the wait starts
 * is harmless because the wait compares the tail word first and returns
 * "not-equal". So there is no lost wake-up and no notify syscall per push.
 *
 * Each thread constructs its own SpscRing over the same memory. Each object
 * caches the other side's counter (a lower bound on its progress, refreshed
 * only when the ring looks full or empty), so a push or pop normally touches
 * only its own cache line.
 */
import assert from "node:assert/strict";

const MAGIC = 0x52494e47; // "RING"
const LINE_INTS = 16; // 64 bytes
const HEADER_BYTES = 4 * 64;
const MAGIC_INDEX = 0;
const CAPACITY_INDEX = 1;
const HEAD_INDEX = 1 * LINE_INTS;
const TAIL_INDEX = 2 * LINE_INTS;
const SLEEPING_INDEX = 3 * LINE_INTS;
const CAPACITY_MAX = 1 << 30;

/** Options for {@linkcode SpscRing}. */
export interface SpscRingOptions {
  /** Zero the counters and write the header; exactly once, by the creator. */
  initialise?: boolean;
  /**
   * How many times the consumer re-checks for data (with `Atomics.pause`)
   * before it announces that it sleeps. 0 (default) sleeps at once. One
   * iteration takes ≈ 40–50 ns on an idle machine of ours (more under load),
   * so 2000 ≈ 100 µs. A spin turns a ~50 µs futex wake-up into ~1 µs when
   * data comes within it, but burns a core while it lasts; on two cores
   * shared with other work it can make things much worse. See
   * bench/ring_bench.ts.
   */
  spinCount?: number;
}

const RESOLVED: Promise<void> = Promise.resolve();

/** Bounded SPSC ring of u32 values in shared memory, usable across threads. */
export class SpscRing {
  /** Number of entries, a power of two. */
  readonly capacity: number;
  /** Consumer spin iterations before sleeping (see {@linkcode SpscRingOptions}). */
  readonly spinCount: number;
  private readonly mask: number;
  private readonly control: Int32Array;
  private readonly entries: Uint32Array;
  /** Producer's last seen head (lower bound of the real head). */
  private headCached = 0;
  /** Consumer's last seen tail (lower bound of the real tail). */
  private tailCached = 0;
  private readonly clearSleeping = (): void => {
    Atomics.store(this.control, SLEEPING_INDEX, 0);
  };

  /**
   * Bytes of SharedArrayBuffer needed for a ring of `capacity` entries (a
   * power of two), rounded up to 64 so that rings can be laid side by side.
   */
  static bytesFor(capacity: number): number {
    assertCapacity(capacity);
    return HEADER_BYTES + Math.ceil((capacity * 4) / 64) * 64;
  }

  /**
   * Creates a view of the ring stored in `sab` at `byteOffset` (a multiple of
   * 64). The creator passes `initialise: true` once, before sharing `sab`;
   * other threads attach with the same capacity, which is checked.
   */
  constructor(
    sab: SharedArrayBuffer,
    byteOffset: number,
    capacity: number,
    options: SpscRingOptions = {},
  ) {
    assertCapacity(capacity);
    assert.ok(
      Number.isInteger(byteOffset) && byteOffset >= 0 && byteOffset % 64 === 0,
      `Cannot create ring: byteOffset '${byteOffset}' is not a multiple of 64`,
    );
    assert.ok(
      byteOffset + SpscRing.bytesFor(capacity) <= sab.byteLength,
      `Cannot create ring: '${capacity}' entries at ${byteOffset} exceed ${sab.byteLength} bytes`,
    );
    const spinCount = options.spinCount ?? 0;
    assert.ok(
      Number.isInteger(spinCount) && spinCount >= 0,
      `Cannot create ring: spinCount '${spinCount}' is not a count`,
    );
    this.capacity = capacity;
    this.spinCount = spinCount;
    this.mask = capacity - 1;
    this.control = new Int32Array(sab, byteOffset, HEADER_BYTES / 4);
    this.entries = new Uint32Array(sab, byteOffset + HEADER_BYTES, capacity);
    if (options.initialise === true) this.initialise();
    const magic = Atomics.load(this.control, MAGIC_INDEX);
    assert.equal(magic, MAGIC, "Cannot attach ring: not initialised");
    assert.equal(
      Atomics.load(this.control, CAPACITY_INDEX),
      capacity,
      `Cannot attach ring: capacity '${capacity}' differs from the initialised one`,
    );
    this.headCached = Atomics.load(this.control, HEAD_INDEX);
    this.tailCached = Atomics.load(this.control, TAIL_INDEX);
  }

  private initialise(): void {
    Atomics.store(this.control, HEAD_INDEX, 0);
    Atomics.store(this.control, TAIL_INDEX, 0);
    Atomics.store(this.control, SLEEPING_INDEX, 0);
    Atomics.store(this.control, CAPACITY_INDEX, this.capacity);
    Atomics.store(this.control, MAGIC_INDEX, MAGIC);
  }

  /**
   * Producer: appends `value` (an integer in [0, 2^32)) unless the ring is
   * full. Returns false when full: backpressure, an operating condition.
   * Call {@linkcode notifyConsumer} after a batch of pushes.
   */
  tryPush(value: number): boolean {
    assert.ok(value >>> 0 === value, "Cannot push: value is not a u32");
    const tail = this.control[TAIL_INDEX]!; // only this thread writes tail
    if (((tail - this.headCached) | 0) === this.capacity) {
      this.headCached = Atomics.load(this.control, HEAD_INDEX);
      if (((tail - this.headCached) | 0) === this.capacity) return false;
    }
    this.entries[tail & this.mask] = value;
    Atomics.store(this.control, TAIL_INDEX, (tail + 1) | 0);
    return true;
  }

  /**
   * Producer: appends `value`; the caller guarantees room (for example the
   * ring holds at least as many entries as there are slots). A full ring is a
   * programmer error and throws an AssertionError.
   */
  push(value: number): void {
    assert.ok(this.tryPush(value), "Cannot push: ring is full");
  }

  /** Consumer: removes and returns the oldest value, or -1 when empty. */
  pop(): number {
    const head = this.control[HEAD_INDEX]!; // only this thread writes head
    if (head === this.tailCached) {
      this.tailCached = Atomics.load(this.control, TAIL_INDEX);
      if (head === this.tailCached) return -1;
    }
    const value = this.entries[head & this.mask]!;
    Atomics.store(this.control, HEAD_INDEX, (head + 1) | 0);
    return value;
  }

  /**
   * Consumer: removes up to `out.length` values into `out` (oldest first)
   * with a single head update, and returns how many. 0 when empty.
   */
  popBatch(out: Uint32Array): number {
    const head = this.control[HEAD_INDEX]!;
    this.tailCached = Atomics.load(this.control, TAIL_INDEX);
    const available = (this.tailCached - head) | 0;
    const count = available < out.length ? available : out.length;
    for (let i = 0; i < count; i++) out[i] = this.entries[(head + i) & this.mask]!;
    if (count > 0) Atomics.store(this.control, HEAD_INDEX, (head + count) | 0);
    return count;
  }

  /**
   * Number of values in the ring: exact on the producer or consumer thread,
   * a snapshot (clamped to capacity) on any other thread.
   */
  size(): number {
    const head = Atomics.load(this.control, HEAD_INDEX);
    const size = (Atomics.load(this.control, TAIL_INDEX) - head) | 0;
    assert.ok(size >= 0, "Cannot size ring: tail is behind head");
    return size < this.capacity ? size : this.capacity;
  }

  /** True when the ring holds no value. */
  isEmpty(): boolean {
    return this.size() === 0;
  }

  /** True when the ring holds `capacity` values. */
  isFull(): boolean {
    return this.size() === this.capacity;
  }

  /**
   * Producer: wakes the consumer if it announced that it sleeps. Cheap when
   * it does not (one atomic load), so call it once after each batch of pushes.
   */
  notifyConsumer(): void {
    if (Atomics.load(this.control, SLEEPING_INDEX) !== 0) {
      Atomics.notify(this.control, TAIL_INDEX, 1);
    }
  }

  /**
   * Consumer on any thread (main included): resolves when the ring may hold
   * data, or after `timeoutMs` (Infinity allowed). It may resolve spuriously;
   * the caller pops and waits again. Spins `spinCount` times first
   * (synchronously, blocking this thread's event loop while it lasts).
   *
   * Bun 1.4 quirk: a pending `Atomics.waitAsync` makes the event loop
   * busy-poll (up to a full core) when nothing else keeps the loop alive (no
   * timer, socket or ref'd worker). In a daemon something always does; a
   * script that only waits should keep a timer or a ref'd worker.
   * `Atomics.waitAsync` allocates its promise: one allocation per sleep.
   */
  waitForData(timeoutMs: number): Promise<void> {
    const seen = this.prepareToSleep(timeoutMs);
    if (seen === null) return RESOLVED;
    const result = Atomics.waitAsync(this.control, TAIL_INDEX, seen, timeoutMs);
    if (!result.async) {
      this.clearSleeping();
      return RESOLVED;
    }
    return result.value.then(this.clearSleeping);
  }

  /**
   * Consumer in a worker: blocks until the ring may hold data, or after
   * `timeoutMs` (Infinity allowed). It may return spuriously. Spins
   * `spinCount` times first.
   */
  waitForDataSync(timeoutMs: number): void {
    const seen = this.prepareToSleep(timeoutMs);
    if (seen === null) return;
    Atomics.wait(this.control, TAIL_INDEX, seen, timeoutMs);
    this.clearSleeping();
  }

  /**
   * Spins, then announces sleeping and re-checks. Returns the tail value to
   * sleep on, or null when data is there (and the announcement is withdrawn).
   */
  private prepareToSleep(timeoutMs: number): number | null {
    assert.ok(timeoutMs >= 0, "Cannot wait for data: timeoutMs is negative");
    const head = this.control[HEAD_INDEX]!;
    for (let i = 0; i < this.spinCount; i++) {
      if (Atomics.load(this.control, TAIL_INDEX) !== head) return null;
      Atomics.pause();
    }
    Atomics.store(this.control, SLEEPING_INDEX, 1);
    const tail = Atomics.load(this.control, TAIL_INDEX);
    if (tail !== head) {
      Atomics.store(this.control, SLEEPING_INDEX, 0);
      return null;
    }
    return tail;
  }
}

function assertCapacity(capacity: number): void {
  assert.ok(
    Number.isInteger(capacity) && capacity >= 1 && capacity <= CAPACITY_MAX &&
      (capacity & (capacity - 1)) === 0,
    `Cannot size ring: capacity '${capacity}' is not a power of two in [1, 2^30]`,
  );
}
