// Proves the activemap's contract: the on-disk map holds (in flight ∪ keepdirty LRU
// ∪ sync-needed) at all times, sets bits only when that set grows, clears clean
// extents only in a clear round (or at dropKeepdirty), never one
// written since the round began; crash maps and failed writes land in the sync
// map, and a sync never clears an extent re-marked while it was syncing. Scenario
// tests pin single behaviours; a seeded random run compares every call against a
// small, obviously-correct model.
import { describe, expect, test } from "bun:test";
import { ActiveMap } from "./activemap.ts";

const KiB = 1024;
const EXT = 64 * KiB;

function makeMap(n: number, keepdirty: number, lastExtentBytes = EXT, onDisk?: Uint8Array) {
  const extentCount = n;
  const datasizeBytes = (n - 1) * EXT + lastExtentBytes;
  return new ActiveMap({ extentCount, extentsizeBytes: EXT, datasizeBytes, keepdirty, onDisk });
}

/** Extents whose bit is set in a LSB-first bitmap. */
function bits(map: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < map.length * 8; i++) if (map[i >> 3]! & (1 << (i & 7))) out.push(i);
  return out;
}

describe("scenarios", () => {
  test("a hot extent costs one map write for many writes", () => {
    const am = makeMap(16, 4);
    expect(am.writeStart(3 * EXT + 100, 4096)).toBe(true);
    am.writeComplete(3 * EXT + 100, 4096, { synced: true });
    for (let i = 0; i < 1000; i++) {
      expect(am.writeStart(3 * EXT + (i % 16) * 4096, 4096)).toBe(false);
      am.writeComplete(3 * EXT + (i % 16) * 4096, 4096, { synced: true });
    }
    expect(bits(am.diskMap())).toEqual([3]);
    const stats = {
      updates: 1, inFlightExtents: 0, keepdirtyExtents: 1, syncExtents: 0, clearPendingExtents: 0,
    };
    expect(am.stats()).toEqual(stats);
  });

  test("inStep: no write in flight and nothing to sync in any extent of the range; anySyncNeeded", () => {
    const am = makeMap(8, 2);
    expect(am.inStep(0, 8 * EXT)).toBe(true);
    am.writeStart(EXT, 4096);
    expect(am.inStep(EXT + 8192, 4096)).toBe(false); // same extent, another block
    expect(am.inStep(0, EXT)).toBe(true);
    am.writeComplete(EXT, 4096, { synced: true });
    expect(am.inStep(0, 2 * EXT)).toBe(true); // keepdirty alone: both copies written
    am.writeStart(3 * EXT, 4096);
    am.writeComplete(3 * EXT, 4096, { synced: false });
    expect(am.inStep(2 * EXT, 2 * EXT)).toBe(false);
    expect(am.inStep(4 * EXT, 4 * EXT)).toBe(true);
    expect(am.anySyncNeeded(0, 3 * EXT + 1)).toBe(true);
    expect(am.anySyncNeeded(0, 3 * EXT)).toBe(false);
  });

  test("keepdirty evicts the least recently used idle extent", () => {
    const am = makeMap(16, 2);
    const write = (e: number) => {
      const changed = am.writeStart(e * EXT, 10);
      am.writeComplete(e * EXT, 10, { synced: true });
      return changed;
    };
    expect(write(0)).toBe(true);
    expect(write(1)).toBe(true);
    expect(write(0)).toBe(false); // 0 is now the newest; 1 the oldest
    expect(write(2)).toBe(true); // evicts 1: clean, but set until a clear round
    expect(bits(am.diskMap())).toEqual([0, 1, 2]);
    expect(am.stats().clearPendingExtents).toBe(1);
    expect(write(1)).toBe(false); // still set: no map write to touch it again (evicts 0)
    expect(am.beginClear()).toBe(1); // 0
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([1, 2]);
    // An extent evicted while in flight stays dirty until its write completes.
    expect(am.writeStart(2 * EXT, 10)).toBe(false);
    expect(am.writeStart(5 * EXT, 10)).toBe(true); // evicts 1
    expect(am.writeStart(6 * EXT, 10)).toBe(true); // evicts 2, still in flight
    expect(am.stats().clearPendingExtents).toBe(1); // 1 only
    am.writeComplete(2 * EXT, 10, { synced: true });
    expect(am.stats().clearPendingExtents).toBe(2);
    expect(bits(am.diskMap())).toEqual([1, 2, 5, 6]);
    expect(am.beginClear()).toBe(2);
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([5, 6]);
    expect(am.stats().keepdirtyExtents).toBe(2);
  });

  test("a clear round keeps what is written or marked during it; abort keeps everything", () => {
    const am = makeMap(8, 0);
    for (const e of [0, 1, 2, 3]) {
      expect(am.writeStart(e * EXT, 10)).toBe(true);
      am.writeComplete(e * EXT, 10, { synced: true });
    }
    expect(am.beginClear()).toBe(4);
    expect(() => am.beginClear()).toThrow(); // one round at a time
    // While the round flushes: a write to 0 starts and completes (its data may
    // be after the flush), a write to 1 is still in flight, 2 is marked.
    expect(am.writeStart(0, 10)).toBe(false);
    am.writeComplete(0, 10, { synced: true });
    expect(am.writeStart(EXT, 10)).toBe(false);
    expect(am.markNeedsSync(2 * EXT, 1)).toBe(false);
    expect(am.stats().clearPendingExtents).toBe(2); // 0 for the next round, 3 in this one
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([0, 1, 2]);
    am.writeComplete(EXT, 10, { synced: true });
    expect(am.beginClear()).toBe(2); // 0 and 1
    am.abortClear();
    expect(bits(am.diskMap())).toEqual([0, 1, 2]);
    expect(am.beginClear()).toBe(2);
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([2]);
    expect(am.beginClear()).toBe(0);
    expect(am.finishClear()).toBe(false);
    expect(() => am.finishClear()).toThrow(); // no round
  });

  test("keepdirty 0: an extent is cleared by the first round after its last write completes", () => {
    const am = makeMap(4, 0);
    expect(am.writeStart(0, 2 * EXT)).toBe(true);
    expect(am.writeStart(EXT, 10)).toBe(false);
    am.writeComplete(0, 2 * EXT, { synced: true }); // extent 0 clean
    expect(am.beginClear()).toBe(1);
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([1]);
    am.writeComplete(EXT, 10, { synced: true });
    expect(bits(am.diskMap())).toEqual([1]);
    am.beginClear();
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([]);
  });

  test("dropKeepdirty clears every clean extent at once", () => {
    const am = makeMap(8, 2);
    for (const e of [0, 1, 2, 3]) am.writeStart(e * EXT, 10);
    for (const e of [0, 1, 2]) am.writeComplete(e * EXT, 10, { synced: true });
    expect(bits(am.diskMap())).toEqual([0, 1, 2, 3]); // 2 in keepdirty, 0 and 1 pending
    expect(am.dropKeepdirty()).toBe(true);
    expect(bits(am.diskMap())).toEqual([3]); // in flight
    expect(am.stats().clearPendingExtents).toBe(0);
  });

  test("a dirty map found at start (crash) becomes the sync map", () => {
    const onDisk = new Uint8Array(4096); // as read from disk: longer than needed
    onDisk[0] = 0b0000_0101;
    onDisk[1] = 0b1111_1110; // extent 9 is the last; bits 10+ are padding
    const am = makeMap(10, 4, 4096, onDisk);
    expect(bits(am.diskMap())).toEqual([0, 2, 9]);
    expect([0, 1, 2, 9].map((e) => am.isSyncNeeded(e))).toEqual([true, false, true, true]);
    expect(am.syncExtentCount()).toBe(3);
    expect(am.dirtyBytes()).toBe(2 * EXT + 4096);
    expect(am.stats().updates).toBe(0);
    expect(am.nextSyncExtent(0)).toBe(0);
    expect(am.nextSyncExtent(1)).toBe(2);
    expect(am.nextSyncExtent(3)).toBe(9);
    expect(am.nextSyncExtent(10)).toBe(-1);
  });

  test("failed writes stay dirty through keepdirty eviction until synced", () => {
    const am = makeMap(8, 1);
    am.writeStart(2 * EXT, 10);
    am.writeComplete(2 * EXT, 10, { synced: false });
    am.writeStart(3 * EXT, 10); // evicts 2 from keepdirty, but it needs sync
    expect(bits(am.diskMap())).toEqual([2, 3]);
    am.syncStart(2);
    am.syncDone(2);
    expect(am.nextSyncExtent(0)).toBe(-1);
    expect(bits(am.diskMap())).toEqual([2, 3]); // clean now; cleared by the next round
    am.beginClear();
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([3]);
  });

  test("a re-mark during sync keeps the extent for another pass; abort keeps it", () => {
    const am = makeMap(8, 0);
    expect(am.markNeedsSync(4 * EXT, EXT)).toBe(true);
    am.syncStart(4);
    // A write to the extent fails remotely while its chunks are being copied.
    am.writeStart(4 * EXT + 4096, 4096);
    am.writeComplete(4 * EXT + 4096, 4096, { synced: false });
    am.syncDone(4);
    expect(am.isSyncNeeded(4)).toBe(true);
    am.syncStart(4);
    am.markNeedsSync(4 * EXT, 1);
    am.syncAbort(4);
    expect(am.isSyncNeeded(4)).toBe(true);
    am.syncStart(4);
    am.syncDone(4);
    expect(am.isSyncNeeded(4)).toBe(false);
    expect(am.stats().clearPendingExtents).toBe(1);
    am.beginClear();
    expect(am.finishClear()).toBe(true);
    expect(bits(am.diskMap())).toEqual([]);
    expect(() => am.syncDone(4)).toThrow(); // not syncing
    expect(() => am.syncStart(4)).toThrow(); // not sync-needed
  });

  test("merge, full sync, ranges and clamping", () => {
    const am = makeMap(20, 2, 1000 * 4); // last extent 4000 bytes
    expect(am.extentRange(19)).toEqual({ offset: 19 * EXT, length: 4000 });
    expect(am.extentOf(19 * EXT + 3999)).toBe(19);
    expect(am.mergeSyncMap(new Uint8Array([0, 0x80, 0]))).toBe(true);
    expect(am.mergeSyncMap(new Uint8Array([0, 0x80, 0]))).toBe(false);
    expect(am.nextSyncExtent(0)).toBe(15);
    expect(am.markAllNeedsSync()).toBe(true);
    expect(am.syncExtentCount()).toBe(20);
    expect(am.dirtyBytes()).toBe(19 * EXT + 4000);
    expect(am.markAllNeedsSync()).toBe(false);
    expect(() => am.writeStart(19 * EXT, 4001)).toThrow();
    expect(() => am.writeStart(0, 0)).toThrow();
    expect(() => am.writeComplete(0, 1, { synced: true })).toThrow(); // never started
  });
});

/** Deterministic PRNG (mulberry32) so a failure replays from its seed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The obvious model: plain arrays and sets. */
class Model {
  inflight: number[];
  lru: number[] = []; // oldest first
  sync = new Set<number>();
  syncing = new Map<number, boolean>();
  onDisk = new Set<number>();
  /** The clear round's candidates, or null. */
  clearing: Set<number> | null = null;
  constructor(readonly n: number, readonly keepdirty: number) {
    this.inflight = new Array(n).fill(0);
  }
  dirty(e: number): boolean {
    return this.inflight[e]! > 0 || this.lru.includes(e) || this.sync.has(e);
  }
  disk(): number[] {
    return [...this.onDisk].sort((a, b) => a - b);
  }
  /** Clean extents set on disk. */
  clearable(): number[] {
    return this.disk().filter((e) => !this.dirty(e));
  }
  start(first: number, last: number) {
    for (let e = first; e <= last; e++) {
      this.inflight[e]!++;
      this.onDisk.add(e);
      this.clearing?.delete(e);
      if (this.keepdirty === 0) continue;
      this.lru = this.lru.filter((x) => x !== e);
      this.lru.push(e);
      if (this.lru.length > this.keepdirty) this.lru.shift();
    }
  }
  mark(e: number) {
    this.sync.add(e);
    this.onDisk.add(e);
    this.clearing?.delete(e);
    if (this.syncing.has(e)) this.syncing.set(e, true);
  }
  clearIfClean(e: number) {
    if (!this.dirty(e)) this.onDisk.delete(e);
  }
}

function randomStep(am: ActiveMap, model: Model, rnd: () => number, pending: number[][]) {
  const n = model.n;
  const r = rnd();
  if (r < 0.4 && pending.length < 64) {
    const first = Math.floor(rnd() * n);
    const last = Math.min(n - 1, first + (rnd() < 0.8 ? 0 : Math.floor(rnd() * 4)));
    const offset = first * EXT + Math.floor(rnd() * 100);
    const length = (last - first) * EXT + 1 + Math.floor(rnd() * 1000);
    model.start(first, last);
    pending.push([offset, length, first, last]);
    return am.writeStart(offset, length);
  }
  if (r < 0.75 && pending.length > 0) {
    const [offset, length, first, last] = pending.splice(Math.floor(rnd() * pending.length), 1)[0]!;
    const synced = rnd() < 0.9;
    for (let e = first!; e <= last!; e++) {
      model.inflight[e]!--;
      if (!synced) model.mark(e);
    }
    am.writeComplete(offset!, length!, { synced });
    return false;
  }
  if (r < 0.77) {
    if (model.clearing === null) {
      const candidates = model.clearable();
      model.clearing = new Set(candidates);
      expect(am.beginClear()).toBe(candidates.length);
      return false;
    }
    const clearing = model.clearing;
    model.clearing = null;
    if (rnd() < 0.2) {
      am.abortClear();
      return false;
    }
    for (const e of clearing) model.clearIfClean(e);
    return am.finishClear();
  }
  if (r < 0.8) {
    const e = Math.floor(rnd() * n);
    model.mark(e);
    return am.markNeedsSync(e * EXT, 1);
  }
  if (r < 0.82) {
    const map = new Uint8Array(Math.ceil(n / 8));
    const e = Math.floor(rnd() * n);
    map[e >> 3] = 1 << (e & 7);
    model.mark(e);
    return am.mergeSyncMap(map);
  }
  const e = am.nextSyncExtent(Math.floor(rnd() * n));
  if (e < 0) return false;
  if (!model.syncing.has(e)) {
    am.syncStart(e);
    model.syncing.set(e, false);
    return false;
  }
  const redirty = model.syncing.get(e)!;
  model.syncing.delete(e);
  if (rnd() < 0.2) {
    am.syncAbort(e);
    return false;
  }
  if (!redirty) model.sync.delete(e);
  am.syncDone(e);
  return false;
}

describe("randomized against a model", () => {
  for (const seed of [1, 2, 3, 42, 1234]) {
    test(`seed ${seed}: disk map ⊇ in-flight ∪ keepdirty ∪ sync, cleared only by rounds, after every call`, () => {
      const rnd = prng(seed);
      const n = 5 + Math.floor(rnd() * 60);
      const keepdirty = Math.floor(rnd() * 6);
      const am = makeMap(n, keepdirty, 4096 * (1 + Math.floor(rnd() * 16)));
      const model = new Model(n, keepdirty);
      const pending: number[][] = [];
      let before = model.disk();
      let updates = 0;
      for (let step = 0; step < 20_000; step++) {
        const changed = randomStep(am, model, rnd, pending);
        const after = model.disk();
        const disk = bits(am.diskMap());
        expect(disk).toEqual(after);
        expect(changed).toBe(after.join() !== before.join());
        if (changed) updates++;
        for (let e = 0; e < n; e++) {
          if (model.inflight[e]! > 0 || model.sync.has(e)) expect(disk).toContain(e);
        }
        expect(am.stats().keepdirtyExtents).toBeLessThanOrEqual(keepdirty);
        expect(am.stats().clearPendingExtents).toBe(model.clearable().length);
        expect(am.syncExtentCount()).toBe(model.sync.size);
        before = after;
      }
      expect(am.stats().updates).toBe(updates);
      expect(am.stats().inFlightExtents).toBe(model.inflight.filter((c) => c > 0).length);
    });
  }
});
