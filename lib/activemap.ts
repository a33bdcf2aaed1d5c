/**
 * The activemap (spec §4): which extents may differ between the two copies.
 *
 * A pure data structure, like hastd's activemap.c: it never does I/O. Every
 * mutating call returns true when the on-disk bitmap changed; the caller then
 * writes {@link ActiveMap.diskMap} (before dispatching the data write, for
 * writeStart) and carries on.
 *
 * An extent is dirty on disk while any of these holds:
 * - in flight: a write or trim to it has started and not completed on both sides;
 * - keepdirty: it is one of the `keepdirty` most recently written extents, kept
 *   dirty while idle so a hot extent does not cost two map writes per write;
 * - sync-needed: the copies may differ (remote write failed, peer absent, crash,
 *   peer's map merged) until a sync of the whole extent completes.
 * The on-disk map is rewritten only when that set changes.
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
   * @returns true when the on-disk map changed and should be written
   */
  writeComplete(offset: number, length: number, result: { synced: boolean }): boolean {
    const [first, last] = this.#extents(offset, length);
    let changed = false;
    for (let e = first; e <= last; e++) {
      assert(this.#inflight[e]! > 0, `extent ${e}: completion without start`);
      if (--this.#inflight[e]! === 0) this.#inflightExtents--;
      if (!result.synced) this.#markSync(e);
      changed = this.#refresh(e) || changed;
    }
    return this.#counted(changed);
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
   * All chunks of a syncing extent were copied: clears it from the sync map,
   * unless it was marked again while syncing (then it stays for another pass).
   * @returns true when the on-disk map changed and should be written
   */
  syncDone(extent: number): boolean {
    this.#assertExtent(extent);
    const redirty = this.#syncing.get(extent);
    assert(redirty !== undefined, `extent ${extent} is not syncing`);
    this.#syncing.delete(extent);
    if (redirty) return false;
    assert(bitGet(this.#sync, extent));
    bitClear(this.#sync, extent);
    this.#syncCount--;
    return this.#counted(this.#refresh(extent));
  }

  /** The sync of an extent was interrupted (e.g. disconnect): it stays sync-needed. */
  syncAbort(extent: number): void {
    this.#assertExtent(extent);
    assert(this.#syncing.delete(extent), `extent ${extent} is not syncing`);
  }

  /**
   * Forgets the keepdirty set: used on a clean shutdown when both copies are
   * known identical, so the next start does not resync idle extents.
   * @returns true when the on-disk map changed and should be written
   */
  dropKeepdirty(): boolean {
    const extents = [...this.#lru.keys()];
    this.#lru.clear();
    this.#lruNewest = -1;
    let changed = false;
    for (const e of extents) changed = this.#refresh(e) || changed;
    return this.#counted(changed);
  }

  /** True if the extent is in the sync map. */
  isSyncNeeded(extent: number): boolean {
    this.#assertExtent(extent);
    return bitGet(this.#sync, extent);
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

  /** Recomputes the disk bit of `e`; true if it changed. */
  #refresh(e: number): boolean {
    const dirty = this.#inflight[e]! > 0 || this.#lru.has(e) || bitGet(this.#sync, e);
    if (dirty === bitGet(this.#disk, e)) return false;
    if (dirty) bitSet(this.#disk, e);
    else bitClear(this.#disk, e);
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
