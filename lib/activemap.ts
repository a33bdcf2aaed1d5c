/**
 * The activemap (spec §4): which extents may differ between the two copies.
 *
 * A pure data structure, like hastd's activemap.c: it never does I/O. Every
 * mutating call that can change the on-disk bitmap returns true when it did;
 * the caller then writes {@link ActiveMap.diskMap} (before dispatching the data
 * write, for writeStart) and carries on.
 *
 * An extent is dirty on disk while any of these holds:
 * - in flight: a write or trim to it has started and not completed on both sides;
 * - keepdirty: it is one of the `keepdirty` most recently written extents, kept
 *   dirty while idle so a hot extent does not cost two map writes per write;
 * - sync-needed: the copies may differ (remote write failed, peer absent, crash,
 *   peer's map merged) until a sync of the whole extent completes.
 *
 * Setting a bit is urgent (the write waits for it); clearing one is not. An
 * extent that becomes clean keeps its disk bit until the next clear round
 * (beginClear … finishClear, which the primary runs about once a second after
 * flushing its data), so a burst of writes over more extents than keepdirty
 * costs one map write per extent first touched, not one per LRU miss (in
 * HAST, each miss waits for a map write and a flush). Extents a sync made
 * clean wait for the round too (a write may have landed after the sync's
 * flush); only dropKeepdirty, on a clean shutdown after flushing both copies,
 * clears at once. The on-disk map is therefore always a superset of the dirty
 * set, and is rewritten only when a bit must be set or a round (or
 * dropKeepdirty) clears one.
 *
 * Sync versus concurrent failures: a write that fails remotely while its extent
 * is being synced would be lost if syncDone then cleared the extent. So
 * syncStart marks the extent as syncing, any re-marking while syncing sets a
 * `redirty` flag, and syncDone keeps the extent sync-needed when that flag is
 * set (the next pass copies it again).
 */
import assert from "node:assert/strict";

/** Most writes in flight on one extent (Uint16Array counters). */
const INFLIGHT_PER_EXTENT_MAX = 0xffff;

/** Options for {@link ActiveMap}. */
export interface ActiveMapOptions {
  extentCount: number;
  extentsizeBytes: number;
  datasizeBytes: number;
  /** How many idle, recently written extents stay dirty on disk. */
  keepdirty: number;
  /** The map read at start: its extents may differ (crash), they go to the sync map. */
  onDisk?: Uint8Array;
}

/** Counters for monitoring and tests. */
export interface ActiveMapStats {
  /** Times the on-disk map changed (each one a map write by the caller). */
  updates: number;
  inFlightExtents: number;
  keepdirtyExtents: number;
  syncExtents: number;
  /** Clean extents whose disk bit waits for the next clear round. */
  clearPendingExtents: number;
}

function bitGet(bits: Uint8Array, i: number): boolean {
  return (bits[i >>> 3]! & (1 << (i & 7))) !== 0;
}

function bitSet(bits: Uint8Array, i: number): void {
  bits[i >>> 3]! |= 1 << (i & 7);
}

function bitClear(bits: Uint8Array, i: number): void {
  bits[i >>> 3]! &= ~(1 << (i & 7));
}

/** Tracks in-flight, keepdirty and sync-needed extents; see the module comment. */
export class ActiveMap {
  readonly extentCount: number;
  readonly extentsizeBytes: number;
  readonly datasizeBytes: number;
  readonly keepdirty: number;
  readonly #inflight: Uint16Array;
  readonly #sync: Uint8Array;
  readonly #disk: Uint8Array;
  /** keepdirty LRU: a Map iterates in insertion order, so the first key is the oldest. */
  readonly #lru = new Map<number, true>();
  #lruNewest = -1;
  /** Extents being synced → redirty (re-marked while syncing). */
  readonly #syncing = new Map<number, boolean>();
  #syncCount = 0;
  /** Clean extents still set on disk, for the next clear round. */
  #clearable = new Set<number>();
  /** The clear round in progress (beginClear … finishClear), or null. */
  #clearing: Set<number> | null = null;
  #inflightExtents = 0;
  #updates = 0;

  /** Creates an empty map, or one whose sync map holds the extents set in `onDisk`. */
  constructor(options: ActiveMapOptions) {
    const { extentCount, extentsizeBytes, datasizeBytes, keepdirty } = options;
    assert(Number.isSafeInteger(extentsizeBytes) && extentsizeBytes > 0);
    assert(Number.isSafeInteger(datasizeBytes) && datasizeBytes > 0);
    assert(extentCount === Math.ceil(datasizeBytes / extentsizeBytes), "extentCount mismatch");
    assert(extentCount <= 2 ** 31, `extentCount ${extentCount} too large`);
    assert(Number.isSafeInteger(keepdirty) && keepdirty >= 0);
    this.extentCount = extentCount;
    this.extentsizeBytes = extentsizeBytes;
    this.datasizeBytes = datasizeBytes;
    this.keepdirty = keepdirty;
    const mapBytes = Math.ceil(extentCount / 8);
    this.#inflight = new Uint16Array(extentCount);
    this.#sync = new Uint8Array(mapBytes);
    this.#disk = new Uint8Array(mapBytes);
    if (options.onDisk !== undefined) {
      assert(options.onDisk.length >= mapBytes, "onDisk map too short");
      this.mergeSyncMap(options.onDisk);
      this.#updates = 0;
    }
  }

  /** Extent holding byte `offset` of the data area. */
  extentOf(offset: number): number {
    assert(Number.isSafeInteger(offset) && offset >= 0 && offset < this.datasizeBytes);
    return Math.floor(offset / this.extentsizeBytes);
  }

  /** Byte range of an extent, the last one clamped to datasize. */
  extentRange(extent: number): { offset: number; length: number } {
    this.#assertExtent(extent);
    const offset = extent * this.extentsizeBytes;
    return { offset, length: Math.min(this.extentsizeBytes, this.datasizeBytes - offset) };
  }

  /**
   * Before dispatching a write or trim of [offset, offset+length): counts it
   * in flight and moves its extents to the head of the keepdirty LRU.
   * @returns true when the on-disk map changed and must be written first
   */
  writeStart(offset: number, length: number): boolean {
    const [first, last] = this.#extents(offset, length);
    let changed = false;
    for (let e = first; e <= last; e++) {
      assert(this.#inflight[e]! < INFLIGHT_PER_EXTENT_MAX, `extent ${e}: too many in flight`);
      if (this.#inflight[e]++ === 0) this.#inflightExtents++;
      changed = this.#touchKeepdirty(e) || changed;
      changed = this.#refresh(e) || changed;
    }
    return this.#counted(changed);
  }

  /**
   * A write or trim completed on both sides (`synced: true`), or on one side
   * only or without a peer (`synced: false`: its extents go to the sync map).
   * Never changes the on-disk map: the extents were set at writeStart, and an
   * extent that is now clean waits for the next clear round.
   */
  writeComplete(offset: number, length: number, result: { synced: boolean }): void {
    const [first, last] = this.#extents(offset, length);
    for (let e = first; e <= last; e++) {
      assert(this.#inflight[e]! > 0, `extent ${e}: completion without start`);
      if (--this.#inflight[e]! === 0) this.#inflightExtents--;
      if (!result.synced) this.#markSync(e);
      const set = this.#refresh(e);
      assert(!set, `extent ${e}: was not set on disk while in flight`);
    }
  }

  /** Marks a range as needing sync; it stays dirty on disk until syncDone. */
  markNeedsSync(offset: number, length: number): boolean {
    const [first, last] = this.#extents(offset, length);
    let changed = false;
    for (let e = first; e <= last; e++) {
      this.#markSync(e);
      changed = this.#refresh(e) || changed;
    }
    return this.#counted(changed);
  }

  /** ORs a peer's dirty bitmap (LSB-first; bits past extentCount ignored) into the sync map. */
  mergeSyncMap(bitmap: Uint8Array): boolean {
    assert(bitmap.length >= this.#sync.length, "bitmap too short");
    let changed = false;
    for (let byte = 0; byte < this.#sync.length; byte++) {
      if (bitmap[byte] === 0) continue;
      const end = Math.min(this.extentCount, (byte + 1) * 8);
      for (let e = byte * 8; e < end; e++) {
        if (!bitGet(bitmap, e)) continue;
        this.#markSync(e);
        changed = this.#refresh(e) || changed;
      }
    }
    return this.#counted(changed);
  }

  /** Marks every extent for sync (full sync). */
  markAllNeedsSync(): boolean {
    let changed = false;
    for (let e = 0; e < this.extentCount; e++) {
      this.#markSync(e);
      changed = this.#refresh(e) || changed;
    }
    return this.#counted(changed);
  }

  /** Next sync-needed extent at or after `fromExtent`, or -1 (no wrapping). */
  nextSyncExtent(fromExtent: number): number {
    assert(Number.isSafeInteger(fromExtent) && fromExtent >= 0);
    if (this.#syncCount === 0) return -1;
    for (let e = fromExtent; e < this.extentCount; ) {
      if ((e & 7) === 0 && this.#sync[e >>> 3] === 0) {
        e += 8;
        continue;
      }
      if (bitGet(this.#sync, e)) return e;
      e++;
    }
    return -1;
  }

  /** Starts copying a sync-needed extent; pair with syncDone or syncAbort. */
  syncStart(extent: number): void {
    this.#assertExtent(extent);
    assert(bitGet(this.#sync, extent), `extent ${extent} does not need sync`);
    assert(!this.#syncing.has(extent), `extent ${extent} already syncing`);
    this.#syncing.set(extent, false);
  }

  /**
   * All chunks of a syncing extent were copied and flushed: clears it from the
   * sync map, unless it was marked again while syncing (then it stays for
   * another pass). Its disk bit waits for the next clear round like any clean
   * extent's: an application write that landed after the sync's flush is only
   * durable once the round's flush covers it. Never changes the on-disk map.
   */
  syncDone(extent: number): void {
    this.#assertExtent(extent);
    const redirty = this.#syncing.get(extent);
    assert(redirty !== undefined, `extent ${extent} is not syncing`);
    this.#syncing.delete(extent);
    if (redirty) return;
    assert(bitGet(this.#sync, extent));
    bitClear(this.#sync, extent);
    this.#syncCount--;
    this.#refresh(extent);
  }

  /** The sync of an extent was interrupted (e.g. disconnect): it stays sync-needed. */
  syncAbort(extent: number): void {
    this.#assertExtent(extent);
    assert(this.#syncing.delete(extent), `extent ${extent} is not syncing`);
  }

  /**
   * Forgets the keepdirty set and clears every clean extent at once: used on a
   * clean shutdown when both copies are known identical (and flushed), so the
   * next start does not resync idle extents.
   * @returns true when the on-disk map changed and should be written
   */
  dropKeepdirty(): boolean {
    const extents = [...this.#lru.keys()];
    this.#lru.clear();
    this.#lruNewest = -1;
    for (const e of extents) this.#refresh(e);
    let changed = false;
    for (const e of [...this.#clearable]) changed = this.#clearNow(e) || changed;
    return this.#counted(changed);
  }

  /**
   * Starts a clear round: takes the clean extents still set on disk. The
   * caller then makes the local data durable (their last writes are in it)
   * and calls finishClear, or abortClear if that failed. A write that starts
   * on one of them meanwhile keeps it set.
   * @returns the number of extents taken
   */
  beginClear(): number {
    assert(this.#clearing === null, "clear round already running");
    this.#clearing = this.#clearable;
    this.#clearable = new Set();
    return this.#clearing.size;
  }

  /**
   * Clears the disk bits of the round's extents that were not written since
   * beginClear and are still clean.
   * @returns true when the on-disk map changed and should be written
   */
  finishClear(): boolean {
    const clearing = this.#clearing;
    assert(clearing !== null, "no clear round running");
    let changed = false;
    for (const e of clearing) changed = this.#clearNow(e) || changed;
    this.#clearing = null;
    return this.#counted(changed);
  }

  /** Ends a clear round without clearing: its extents wait for the next one. */
  abortClear(): void {
    const clearing = this.#clearing;
    assert(clearing !== null, "no clear round running");
    this.#clearing = null;
    for (const e of clearing) this.#refresh(e);
  }

  /** True if the extent is in the sync map. */
  isSyncNeeded(extent: number): boolean {
    this.#assertExtent(extent);
    return bitGet(this.#sync, extent);
  }

  /** True if any extent of [offset, offset+length) is in the sync map. */
  anySyncNeeded(offset: number, length: number): boolean {
    const [first, last] = this.#extents(offset, length);
    for (let e = first; e <= last; e++) if (bitGet(this.#sync, e)) return true;
    return false;
  }

  /** True if any extent of [offset, offset+length) is set in the on-disk map. */
  anyDirtyOnDisk(offset: number, length: number): boolean {
    const [first, last] = this.#extents(offset, length);
    for (let e = first; e <= last; e++) if (bitGet(this.#disk, e)) return true;
    return false;
  }

  /**
   * True when both copies of [offset, offset+length) are known to hold the
   * same data: no write in flight and nothing to sync in any of its extents.
   */
  inStep(offset: number, length: number): boolean {
    const [first, last] = this.#extents(offset, length);
    for (let e = first; e <= last; e++) if (this.#inflight[e]! > 0 || bitGet(this.#sync, e)) return false;
    return true;
  }

  /** Number of extents in the sync map. */
  syncExtentCount(): number {
    return this.#syncCount;
  }

  /** Bytes covered by the sync map (the last extent clamped to datasize). */
  dirtyBytes(): number {
    const last = this.extentCount - 1;
    const lastShortBytes = this.extentsizeBytes - this.extentRange(last).length;
    const correction = bitGet(this.#sync, last) ? lastShortBytes : 0;
    return this.#syncCount * this.extentsizeBytes - correction;
  }

  /** A copy of the on-disk bitmap, LSB-first, ceil(extentCount/8) bytes. */
  diskMap(): Uint8Array {
    return this.#disk.slice();
  }

  /** Counters; see {@link ActiveMapStats}. */
  stats(): ActiveMapStats {
    return {
      updates: this.#updates,
      inFlightExtents: this.#inflightExtents,
      keepdirtyExtents: this.#lru.size,
      syncExtents: this.#syncCount,
      clearPendingExtents: this.#clearable.size + (this.#clearing?.size ?? 0),
    };
  }

  #markSync(e: number): void {
    if (!bitGet(this.#sync, e)) {
      bitSet(this.#sync, e);
      this.#syncCount++;
    }
    if (this.#syncing.has(e)) this.#syncing.set(e, true);
  }

  /** Moves `e` to the newest end of the LRU; evicting the oldest may change the map. */
  #touchKeepdirty(e: number): boolean {
    if (this.keepdirty === 0 || this.#lruNewest === e) return false;
    this.#lruNewest = e;
    if (this.#lru.delete(e)) {
      this.#lru.set(e, true);
      return false;
    }
    this.#lru.set(e, true);
    if (this.#lru.size <= this.keepdirty) return false;
    const oldest: number = this.#lru.keys().next().value!;
    this.#lru.delete(oldest);
    return this.#refresh(oldest);
  }

  #isDirty(e: number): boolean {
    return this.#inflight[e]! > 0 || this.#lru.has(e) || bitGet(this.#sync, e);
  }

  /**
   * Brings the disk bit of `e` up to date, except that a clean extent only
   * joins the next clear round; true if the bit was set.
   */
  #refresh(e: number): boolean {
    const onDisk = bitGet(this.#disk, e);
    if (this.#isDirty(e)) {
      this.#clearable.delete(e);
      this.#clearing?.delete(e);
      if (onDisk) return false;
      bitSet(this.#disk, e);
      return true;
    }
    if (onDisk) this.#clearable.add(e);
    return false;
  }

  /** Clears the disk bit of a clean extent now; true if it was set. */
  #clearNow(e: number): boolean {
    if (this.#isDirty(e) || !bitGet(this.#disk, e)) return false;
    bitClear(this.#disk, e);
    this.#clearable.delete(e);
    this.#clearing?.delete(e);
    return true;
  }

  #counted(changed: boolean): boolean {
    if (changed) this.#updates++;
    return changed;
  }

  /** First and last extent of a non-empty range inside the data area. */
  #extents(offset: number, length: number): [number, number] {
    assert(Number.isSafeInteger(offset) && offset >= 0, `bad offset ${offset}`);
    assert(Number.isSafeInteger(length) && length > 0, `bad length ${length}`);
    assert(offset + length <= this.datasizeBytes, `range ${offset}+${length} beyond datasize`);
    return [this.extentOf(offset), this.extentOf(offset + length - 1)];
  }

  #assertExtent(extent: number): void {
    assert(Number.isSafeInteger(extent) && extent >= 0 && extent < this.extentCount);
  }
}
