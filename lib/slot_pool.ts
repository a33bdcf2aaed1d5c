/**
 * A fixed pool of request slots in a SharedArrayBuffer, allocated once
 * (spec §11: 256 preallocated request buffers). A slot is a data buffer plus
 * one 64-byte metadata line: pool words (state, countdown, generation) and
 * twelve caller words (see {@linkcode SlotMeta}). Threads pass slot indices
 * through {@linkcode SpscRing}s; the slot's memory never moves or is copied.
 *
 * Ownership: one thread (the owner, the one that initialised the pool or
 * attached with `owner: true`) allocates and frees. Any thread may
 * transition states and count down. The free list is a stack in shared
 * memory touched only by the owner; its length is published atomically so
 * any thread can read {@linkcode SlotPool.stats}.
 *
 * State machine (every transition is a compare-and-exchange, so a slot
 * handled twice or out of order throws instead of corrupting a request):
 *
 *   Free ──allocate()──▶ Filled ──▶ Encoding ──▶ Encoded ──▶ Sending ──▶ InFlight
 *                          ├───────────── (no encoding) ──────────▲           ▲
 *                          └──────── (handed to several paths at once) ───────┘
 *   Filled, Encoding, Encoded, Sending, InFlight ──▶ Done ──free()──▶ Free
 *   (transition() with the known state, or finish() from whichever it is)
 *
 * - Filled: allocated; the owner fills data and meta, then hands it on.
 * - Encoding/Encoded: a codec stage compresses/checksums into the slot.
 * - Sending: a sender is writing it to the peer; InFlight: written, awaiting
 *   the peer's reply, or handed to several paths at once under a countdown
 *   (lib/request_slots.ts: the local write and the replication link).
 * - Done: completed (the countdown reached zero) or aborted from any state;
 *   the owner replies to the client and frees it.
 *
 * Fan-out: before handing a slot to both the local and the remote path, set
 * its countdown to 2; each path calls {@linkcode SlotPool.countDown} once
 * when finished, and only the call that returns true (the last) moves the
 * slot to Done. A path must not touch the slot after its countDown.
 *
 * Layout at `byteOffset` (a multiple of 4096):
 *   64 B header | free stack (Int32 × slotCount, rounded to 64 B)
 *   | metadata (64 B × slotCount) | data (stride × slotCount)
 * The data region and every slot's data start at a multiple of 4096 from the
 * start of the buffer (stride = slotDataBytes rounded up to 4096), so the
 * buffers suit O_DIRECT when the runtime page-aligns the SharedArrayBuffer.
 */
import assert from "node:assert/strict";
import { threadId } from "node:worker_threads";

/** States of a slot; see the module comment for the allowed transitions. */
export const enum SlotState {
  Free = 0,
  Filled = 1,
  Encoding = 2,
  Encoded = 3,
  Sending = 4,
  InFlight = 5,
  Done = 6,
}

/** Indices of the caller words in {@linkcode SlotPool.meta} (Int32 each). */
export const enum SlotMeta {
  /** Request kind (the caller's opcode). */
  Command = 0,
  Flags = 1,
  /** Device offset in bytes, low and high 32 bits; see {@linkcode writeMetaOffset}. */
  OffsetLo = 2,
  OffsetHi = 3,
  /** Bytes of request payload in data(). */
  Length = 4,
  /** Bytes of encoded output in data() (after a codec stage). */
  OutLength = 5,
  /** 0 or an errno-like code set by the stage that failed. */
  Error = 6,
  /** The client's request handle (e.g. NBD cookie), low and high 32 bits. */
  CookieLo = 7,
  CookieHi = 8,
  User0 = 9,
  User1 = 10,
  User2 = 11,
}

/** Number of caller words in a slot's metadata view. */
export const SLOT_META_WORDS = 12;
/** Alignment of every slot's data buffer within the SharedArrayBuffer. */
export const SLOT_DATA_ALIGN_BYTES = 4096;

const MAGIC = 0x534c4f54; // "SLOT"
const SLOT_COUNT_MAX = 1 << 16;
const HEADER_INTS = 16;
const H_MAGIC = 0;
const H_SLOT_COUNT = 1;
const H_SLOT_DATA_BYTES = 2;
const H_FREE_COUNT = 3;
const H_OWNER_THREAD = 4;
const LINE_INTS = 16; // one 64-byte metadata line per slot
const M_STATE = 0;
const M_COUNTDOWN = 1;
const M_GENERATION = 2;
const M_USER = 4; // words 4..15 are the caller's (SLOT_META_WORDS)
const STATE_COUNT = 7;

/** Bit `to` of EDGES[from] is set when from → to is allowed by transition(). */
const EDGES: readonly number[] = (() => {
  const edges = new Array<number>(STATE_COUNT).fill(0);
  const allow = (from: SlotState, to: SlotState) => (edges[from]! |= 1 << to);
  allow(SlotState.Filled, SlotState.Encoding);
  allow(SlotState.Filled, SlotState.Sending);
  allow(SlotState.Filled, SlotState.InFlight);
  allow(SlotState.Encoding, SlotState.Encoded);
  allow(SlotState.Encoded, SlotState.Sending);
  allow(SlotState.Sending, SlotState.InFlight);
  for (const from of [1, 2, 3, 4, 5]) allow(from, SlotState.Done);
  return edges;
})();

/** Options for {@linkcode SlotPool}. */
export interface SlotPoolOptions {
  slotCount: number;
  /** Bytes of each slot's data buffer. */
  slotDataBytes: number;
  /** Where the pool starts in the buffer, a multiple of 4096 (default 0). */
  byteOffset?: number;
  /** Write the header and free every slot; once, by the creator (who becomes owner). */
  initialise?: boolean;
  /** Attach as the owner: from now on only this thread allocates and frees. */
  owner?: boolean;
}

/** Fixed pool of preallocated request slots shared between threads. */
export class SlotPool {
  /** Number of slots. */
  readonly slotCount: number;
  /** Bytes of each slot's data buffer. */
  readonly slotDataBytes: number;
  private readonly header: Int32Array;
  private readonly freeStack: Int32Array;
  private readonly lines: Int32Array;
  private readonly dataViews: Uint8Array[];
  private readonly metaViews: Int32Array[];
  private readonly sab: SharedArrayBuffer;
  /** Where slot 0's data starts in `sab`, and the distance from one slot's data to the next. */
  private readonly dataStart: number;
  private readonly strideBytes: number;

  /** Bytes of SharedArrayBuffer needed for the pool (a multiple of 4096). */
  static bytesFor(slotCount: number, slotDataBytes: number): number {
    return layoutOf(slotCount, slotDataBytes).totalBytes;
  }

  /**
   * Creates a view of the pool in `sab`. The creator passes
   * `initialise: true` once, before sharing `sab`; other threads attach with
   * the same slotCount and slotDataBytes, which are checked.
   */
  constructor(sab: SharedArrayBuffer, options: SlotPoolOptions) {
    const { slotCount, slotDataBytes } = options;
    const layout = layoutOf(slotCount, slotDataBytes);
    const base = options.byteOffset ?? 0;
    assert.ok(
      Number.isInteger(base) && base >= 0 && base % SLOT_DATA_ALIGN_BYTES === 0,
      `Cannot create slot pool: byteOffset '${base}' is not a multiple of 4096`,
    );
    assert.ok(
      base + layout.totalBytes <= sab.byteLength,
      `Cannot create slot pool: needs ${layout.totalBytes} bytes at ${base}, ` +
        `buffer has '${sab.byteLength}'`,
    );
    this.slotCount = slotCount;
    this.slotDataBytes = slotDataBytes;
    this.sab = sab;
    this.dataStart = base + layout.dataOffset;
    this.strideBytes = layout.strideBytes;
    this.header = new Int32Array(sab, base, HEADER_INTS);
    this.freeStack = new Int32Array(sab, base + layout.freeStackOffset, slotCount);
    this.lines = new Int32Array(sab, base + layout.metaOffset, slotCount * LINE_INTS);
    this.dataViews = [];
    this.metaViews = [];
    for (let slot = 0; slot < slotCount; slot++) {
      const dataOffset = this.dataStart + slot * this.strideBytes;
      this.dataViews.push(new Uint8Array(sab, dataOffset, slotDataBytes));
      this.metaViews.push(this.lines.subarray(slot * LINE_INTS + M_USER, (slot + 1) * LINE_INTS));
    }
    if (options.initialise === true) this.initialise();
    this.checkHeader();
    if (options.owner === true) Atomics.store(this.header, H_OWNER_THREAD, threadId);
  }

  private initialise(): void {
    this.lines.fill(0); // every state Free, countdown 0, generation 0
    // Stack top is the end: slot 0 is allocated first.
    for (let i = 0; i < this.slotCount; i++) this.freeStack[i] = this.slotCount - 1 - i;
    Atomics.store(this.header, H_SLOT_COUNT, this.slotCount);
    Atomics.store(this.header, H_SLOT_DATA_BYTES, this.slotDataBytes);
    Atomics.store(this.header, H_FREE_COUNT, this.slotCount);
    Atomics.store(this.header, H_OWNER_THREAD, threadId);
    Atomics.store(this.header, H_MAGIC, MAGIC);
  }

  private checkHeader(): void {
    const magic = Atomics.load(this.header, H_MAGIC);
    assert.equal(magic, MAGIC, "Cannot attach slot pool: not initialised");
    const slotCount = Atomics.load(this.header, H_SLOT_COUNT);
    const slotDataBytes = Atomics.load(this.header, H_SLOT_DATA_BYTES);
    assert.ok(
      slotCount === this.slotCount && slotDataBytes === this.slotDataBytes,
      `Cannot attach slot pool: shape '${this.slotCount}×${this.slotDataBytes}' ` +
        `differs from the initialised ${slotCount}×${slotDataBytes}`,
    );
  }

  /**
   * Owner: takes a free slot, now in state Filled with a fresh generation,
   * countdown 0 and zeroed metadata. Returns -1 when none is free
   * (backpressure, an operating condition).
   */
  allocate(): number {
    this.assertOwner();
    const freeCount = Atomics.load(this.header, H_FREE_COUNT); // only the owner writes it
    if (freeCount === 0) return -1;
    const slot = this.freeStack[freeCount - 1]!;
    Atomics.store(this.header, H_FREE_COUNT, freeCount - 1);
    const line = slot * LINE_INTS;
    const previous = Atomics.compareExchange(
      this.lines,
      line + M_STATE,
      SlotState.Free,
      SlotState.Filled,
    );
    if (previous !== SlotState.Free) failState("allocate", slot, SlotState.Free, previous);
    const countdown = Atomics.load(this.lines, line + M_COUNTDOWN);
    assert.equal(countdown, 0, "Cannot allocate: countdown left over");
    this.metaViews[slot]!.fill(0);
    Atomics.add(this.lines, line + M_GENERATION, 1);
    return slot;
  }

  /** Owner: returns a slot in state Done (countdown finished) to the free list. */
  free(slot: number): void {
    this.assertOwner();
    this.assertSlot(slot);
    const line = slot * LINE_INTS;
    const countdown = Atomics.load(this.lines, line + M_COUNTDOWN);
    assert.equal(countdown, 0, "Cannot free: countdown not at 0");
    const previous = Atomics.compareExchange(
      this.lines,
      line + M_STATE,
      SlotState.Done,
      SlotState.Free,
    );
    if (previous !== SlotState.Done) failState("free", slot, SlotState.Done, previous);
    const freeCount = Atomics.load(this.header, H_FREE_COUNT);
    assert.ok(freeCount < this.slotCount, "Cannot free: free list is already full");
    this.freeStack[freeCount] = slot;
    Atomics.store(this.header, H_FREE_COUNT, freeCount + 1);
  }

  /** The slot's data buffer: a view of slotDataBytes into the shared memory. */
  data(slot: number): Uint8Array {
    this.assertSlot(slot);
    return this.dataViews[slot]!;
  }

  /**
   * The slot whose data buffer `view` lies in, or -1 for a view of other memory. A view of this
   * pool's buffer that is not within one slot's data is a programmer error and throws.
   */
  slotContaining(view: Uint8Array): number {
    if (view.buffer !== this.sab) return -1;
    const slot = Math.floor((view.byteOffset - this.dataStart) / this.strideBytes);
    const inside = slot >= 0 && slot < this.slotCount &&
      view.byteOffset + view.byteLength <= this.dataViews[slot]!.byteOffset + this.slotDataBytes;
    assert.ok(inside, `Cannot locate slot: ${view.byteLength} bytes at ${view.byteOffset} are not in one slot's data`);
    return slot;
  }

  /** The slot's caller metadata: SLOT_META_WORDS Int32 words, see {@linkcode SlotMeta}. */
  meta(slot: number): Int32Array {
    this.assertSlot(slot);
    return this.metaViews[slot]!;
  }

  /**
   * Moves `slot` from `from` to `to` atomically. Throws an AssertionError if
   * the edge is not allowed or the slot is not in `from` (a slot handled
   * twice, or by the wrong stage).
   */
  transition(slot: number, from: SlotState, to: SlotState): void {
    this.assertSlot(slot);
    if (((EDGES[from]! >> to) & 1) === 0) failEdge(slot, from, to);
    const previous = Atomics.compareExchange(this.lines, slot * LINE_INTS + M_STATE, from, to);
    if (previous !== from) failState("transition", slot, from, previous);
  }

  /**
   * Moves a live slot (any state but Free and Done) to Done and returns the
   * state it was in. For the last party of a countdown, which cannot know how
   * far the other parties got (e.g. the remote path failed while Encoding).
   */
  finish(slot: number): SlotState {
    this.assertSlot(slot);
    const index = slot * LINE_INTS + M_STATE;
    for (let attempt = 0; attempt < 1000; attempt++) {
      const state = Atomics.load(this.lines, index);
      if (state === SlotState.Free || state === SlotState.Done) {
        assert.fail(`Cannot finish slot ${slot}: state is '${stateName(state)}', not live`);
      }
      if (Atomics.compareExchange(this.lines, index, state, SlotState.Done) === state) return state;
    }
    // Each retry means another thread moved the slot on: a pipeline stage
    // still works on a slot whose countdown reached zero, a programmer error.
    assert.fail(`Cannot finish slot ${slot}: its state keeps changing`);
  }

  /** The slot's current state. */
  state(slot: number): SlotState {
    this.assertSlot(slot);
    return Atomics.load(this.lines, slot * LINE_INTS + M_STATE) as SlotState;
  }

  /** How many times the slot has been allocated; tells uses apart. */
  generation(slot: number): number {
    this.assertSlot(slot);
    return Atomics.load(this.lines, slot * LINE_INTS + M_GENERATION);
  }

  /**
   * Arms the fan-out countdown with `n` (≥ 1) parties, before the slot is
   * handed to any of them. The countdown must be idle (0).
   */
  setCountdown(slot: number, n: number): void {
    this.assertSlot(slot);
    assert.ok(Number.isInteger(n) && n >= 1 && n <= 0x7fffffff, "Cannot set countdown: bad count");
    const line = slot * LINE_INTS;
    const state = Atomics.load(this.lines, line + M_STATE);
    const live = state !== SlotState.Free && state !== SlotState.Done;
    assert.ok(live, "Cannot set countdown: slot is Free or Done");
    const previous = Atomics.compareExchange(this.lines, line + M_COUNTDOWN, 0, n);
    assert.equal(previous, 0, "Cannot set countdown: a countdown is running");
  }

  /**
   * One party is finished; callable from any thread. Returns true for
   * exactly one call: the one that brings the countdown to zero.
   */
  countDown(slot: number): boolean {
    this.assertSlot(slot);
    const left = Atomics.sub(this.lines, slot * LINE_INTS + M_COUNTDOWN, 1) - 1;
    if (left < 0) {
      Atomics.add(this.lines, slot * LINE_INTS + M_COUNTDOWN, 1);
      assert.fail(`Cannot count down: slot '${slot}' countdown is not running`);
    }
    return left === 0;
  }

  /** Free and in-use slot counts (a snapshot on threads other than the owner). */
  stats(): { free: number; inUse: number } {
    const free = Atomics.load(this.header, H_FREE_COUNT);
    return { free, inUse: this.slotCount - free };
  }

  private assertSlot(slot: number): void {
    if (!(slot >>> 0 === slot && slot < this.slotCount)) {
      assert.fail(`Cannot use slot '${slot}': not in [0, ${this.slotCount})`);
    }
  }

  private assertOwner(): void {
    const owner = Atomics.load(this.header, H_OWNER_THREAD);
    if (owner !== threadId) {
      assert.fail(`Cannot allocate or free: thread '${threadId}' is not the owner ${owner}`);
    }
  }
}

/** Stores a byte offset (< 2^53) into meta's OffsetLo/OffsetHi words. */
export function writeMetaOffset(meta: Int32Array, offset: number): void {
  assert.ok(Number.isSafeInteger(offset) && offset >= 0, "Cannot write offset: not a safe integer");
  meta[SlotMeta.OffsetLo] = offset | 0; // low 32 bits, as Int32
  meta[SlotMeta.OffsetHi] = Math.floor(offset / 0x1_0000_0000);
}

/** Reads the byte offset written by {@linkcode writeMetaOffset}. */
export function readMetaOffset(meta: Int32Array): number {
  return meta[SlotMeta.OffsetHi]! * 0x1_0000_0000 + (meta[SlotMeta.OffsetLo]! >>> 0);
}

interface Layout {
  freeStackOffset: number;
  metaOffset: number;
  dataOffset: number;
  strideBytes: number;
  totalBytes: number;
}

function layoutOf(slotCount: number, slotDataBytes: number): Layout {
  assert.ok(
    Number.isInteger(slotCount) && slotCount >= 1 && slotCount <= SLOT_COUNT_MAX,
    `Cannot size slot pool: slotCount '${slotCount}' not in [1, ${SLOT_COUNT_MAX}]`,
  );
  assert.ok(
    Number.isInteger(slotDataBytes) && slotDataBytes >= 0 && slotDataBytes <= 0x4000_0000,
    `Cannot size slot pool: slotDataBytes '${slotDataBytes}' not in [0, 1 GiB]`,
  );
  const freeStackOffset = HEADER_INTS * 4;
  const metaOffset = freeStackOffset + roundUp(slotCount * 4, 64);
  const dataOffset = roundUp(metaOffset + slotCount * LINE_INTS * 4, SLOT_DATA_ALIGN_BYTES);
  const strideBytes = roundUp(slotDataBytes, SLOT_DATA_ALIGN_BYTES);
  const totalBytes = dataOffset + slotCount * strideBytes;
  assert.ok(Number.isSafeInteger(totalBytes), "Cannot size slot pool: too large");
  return { freeStackOffset, metaOffset, dataOffset, strideBytes, totalBytes };
}

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}

const STATE_NAMES = ["Free", "Filled", "Encoding", "Encoded", "Sending", "InFlight", "Done"];

function stateName(state: number): string {
  return STATE_NAMES[state] ?? `unknown(${state})`;
}

function failEdge(slot: number, from: SlotState, to: SlotState): never {
  const edge = `${stateName(from)} → ${stateName(to)}`;
  assert.fail(`Cannot transition slot ${slot}: '${edge}' is not allowed`);
}

function failState(action: string, slot: number, expected: SlotState, actual: number): never {
  const [state, wanted] = [stateName(actual), stateName(expected)];
  assert.fail(`Cannot ${action} slot ${slot}: state is '${state}', expected ${wanted}`);
}
