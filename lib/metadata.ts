/**
 * Resource metadata and the on-disk layout of a provider (spec §3).
 *
 * Layout, in bytes from the start of the provider:
 *
 *     0      metadata slot 0 (4096)
 *     4096   metadata slot 1 (4096)
 *     8192   activemap bitmap: one bit per extent, LSB-first, rounded up to 4096
 *     8192+m data area (datasize bytes, the size of the exported device)
 *
 * HAST writes one unchecksummed record in place. We keep two slots: each write
 * goes to the slot that does NOT hold the newest valid record, with the next
 * generation, and is made durable. A torn or corrupt slot fails its CRC and the
 * other slot (the previous generation) is read instead.
 *
 * Records and map pages are made durable through the provider's O_DSYNC
 * descriptor (Provider.writeDurable), never by an fdatasync of the data's
 * descriptor: Linux reports a lost cached write (writeback EIO) to one
 * fdatasync per open file description only, and a metadata write that took
 * that report would leave the data's next flush succeeding over the loss
 * (it is that flush that records localWritesLost and fails the application's
 * flush, see storage.ts stickyFlushFailure).
 *
 * Slot format (little-endian), crc32 over bytes [0, 4092). Magic, version and
 * the crc32 position form the envelope that every future version keeps:
 *
 *     0  magic "HASTMETA"        8  format version u32    12 reserved u32 (0)
 *     16 generation u64          24 datasize u64          32 extentsize u64
 *     40 map offset u64          48 map size u64          56 data offset u64
 *     64 resuid u64              72 localcnt u64          80 remotecnt u64
 *     88 keepdirty u32           92 prevrole u8           93 flags u8 (see FLAG_*)
 *     94 resource length u16     96 resource (utf8, ≤ 255 bytes), zeros up to 4092
 *     4092 crc32 u32
 */
import assert from "node:assert/strict";
import type { Logger } from "./log.ts";
import { type Provider, ProviderError } from "./provider.ts";

/** Bytes reserved at offset 0 for the two metadata slots. */
export const METADATA_AREA_BYTES = 8192;
/** Bytes of one metadata slot. */
export const METADATA_SLOT_BYTES = 4096;
/** Alignment of the map size and of the data size. */
export const LAYOUT_ALIGN_BYTES = 4096;
/** Format version written by this code. */
export const METADATA_VERSION = 1;
/** Longest resource name, in utf8 bytes. */
export const RESOURCE_NAME_BYTES_MAX = 255;
/** Default extent size of `hast create`. */
export const EXTENTSIZE_BYTES_DEFAULT = 2 * 1024 * 1024;
/** Default keepdirty of `hast create`. */
export const KEEPDIRTY_DEFAULT = 64;

const MAGIC = new TextEncoder().encode("HASTMETA");
const CRC_OFFSET = METADATA_SLOT_BYTES - 4;
const NAME_OFFSET = 96;
const ROLES = ["init", "primary", "secondary"] as const;
const FLAG_SYNC_TARGET = 1;
const FLAG_DISCARD_PENDING = 2;
const FLAG_LOCAL_WRITES_LOST = 4;
const FLAGS_KNOWN = FLAG_SYNC_TARGET | FLAG_DISCARD_PENDING | FLAG_LOCAL_WRITES_LOST;

/** The role a node had when it last ran. */
export type Role = (typeof ROLES)[number];

/** The metadata record of one resource on one node. */
export interface Metadata {
  /** Resource name (≤ 255 bytes utf8). */
  resource: string;
  datasizeBytes: number;
  extentsizeBytes: number;
  keepdirty: number;
  mapOffsetBytes: number;
  mapSizeBytes: number;
  dataOffsetBytes: number;
  /** Random resource id; 0n until the first connect. */
  resuid: bigint;
  localcnt: bigint;
  remotecnt: bigint;
  prevrole: Role;
  /** True while this node is the target of an unfinished sync (its data is stale). */
  syncTarget: boolean;
  /**
   * True after an operator discarded this node's data (`hast discard`, e.g. to
   * resolve a split-brain): the next connect syncs everything from the peer.
   * Cleared when that sync completes.
   */
  discardPending: boolean;
  /**
   * True after a flush of this node's data failed (as primary or secondary):
   * the kernel may have dropped cached writes, so this copy may hold older data
   * than the application was told was written (the peer's copy has it).
   * Promotion is refused without `--force`; cleared when a sync with the peer
   * completes here as secondary, or by a forced promotion.
   */
  localWritesLost: boolean;
  /** Slot generation, managed by the store. */
  generation: bigint;
}

/** Why a node with this metadata must not be promoted without --force, or null. */
export function stalenessOf(m: Metadata): string | null {
  if (m.discardPending) return `discarded by "hast discard"`;
  if (m.localWritesLost) {
    return "a write or flush of its disk failed, so it may lack writes; the peer's copy has them: " +
      "keep or make the peer primary, and this node resyncs from it as secondary";
  }
  if (m.syncTarget) return "it was the target of an unfinished sync";
  return null;
}

/** Where the map and the data live on a provider of a given size. */
export interface Layout {
  extentCount: number;
  mapOffsetBytes: number;
  mapSizeBytes: number;
  dataOffsetBytes: number;
  datasizeBytes: number;
}

/** Error codes of {@link MetadataError}. */
export type MetadataErrorCode =
  | "ENOMETA" // no valid slot
  | "EEXIST" // create refused: valid metadata present
  | "EVERSION" // written by a newer format version
  | "ECORRUPT" // checksum valid but contents inconsistent or beyond the provider
  | "ERESOURCE"; // metadata names a different resource

/** An operating error about metadata, for callers that catch it. */
export class MetadataError extends Error {
  /** What went wrong, see {@link MetadataErrorCode}. */
  readonly code: MetadataErrorCode;

  /** Creates an error with a code and a "Cannot …" message. */
  constructor(code: MetadataErrorCode, message: string) {
    super(message);
    this.name = "MetadataError";
    this.code = code;
  }
}

function roundUp(value: number, align: number): number {
  return Math.ceil(value / align) * align;
}

function isPowerOfTwo(value: number): boolean {
  if (!Number.isSafeInteger(value) || value < 1) return false;
  let v = value;
  while (v % 2 === 0) v /= 2;
  return v === 1;
}

/**
 * Computes the layout of a provider. The map holds one bit per extent of the
 * whole medium (an upper bound), rounded up to 4096 bytes; datasize =
 * mediasize − 8192 − mapsize, rounded down to 4096.
 * @param mediasizeBytes usable size of the provider
 * @param extentsizeBytes a power of two, multiple of 4096
 * @throws RangeError on a bad extent size or a provider smaller than one extent of data
 */
export function computeLayout(mediasizeBytes: number, extentsizeBytes: number): Layout {
  if (!isPowerOfTwo(extentsizeBytes) || extentsizeBytes < LAYOUT_ALIGN_BYTES) {
    throw new RangeError(
      `Cannot compute layout: extent size "${extentsizeBytes}" is not a power of two ` +
        `multiple of ${LAYOUT_ALIGN_BYTES}`,
    );
  }
  if (!Number.isSafeInteger(mediasizeBytes) || mediasizeBytes < 0) {
    throw new RangeError(`Cannot compute layout: bad media size "${mediasizeBytes}"`);
  }
  const mapBits = Math.ceil(mediasizeBytes / extentsizeBytes);
  const mapSizeBytes = Math.max(LAYOUT_ALIGN_BYTES, roundUp(Math.ceil(mapBits / 8), 4096));
  const dataOffsetBytes = METADATA_AREA_BYTES + mapSizeBytes;
  const datasizeBytes =
    Math.floor((mediasizeBytes - dataOffsetBytes) / LAYOUT_ALIGN_BYTES) * LAYOUT_ALIGN_BYTES;
  if (datasizeBytes < extentsizeBytes) {
    throw new RangeError(
      `Cannot compute layout: provider of "${mediasizeBytes}" bytes is too small for ` +
        `one extent of "${extentsizeBytes}" bytes after metadata and map`,
    );
  }
  const extentCount = Math.ceil(datasizeBytes / extentsizeBytes);
  assert(extentCount <= mapSizeBytes * 8);
  return {
    extentCount,
    mapOffsetBytes: METADATA_AREA_BYTES,
    mapSizeBytes,
    dataOffsetBytes,
    datasizeBytes,
  };
}

/** Why a record is inconsistent, or null if it is fine. Shared by encode and decode. */
function metadataProblem(m: Metadata): string | null {
  const nameBytes = new TextEncoder().encode(m.resource).length;
  if (nameBytes === 0 || nameBytes > RESOURCE_NAME_BYTES_MAX) {
    return `resource name "${m.resource}" must have 1 to ${RESOURCE_NAME_BYTES_MAX} bytes`;
  }
  if (m.resource.includes("\0")) return `resource name "${m.resource}" contains NUL`;
  if (!isPowerOfTwo(m.extentsizeBytes) || m.extentsizeBytes < LAYOUT_ALIGN_BYTES) {
    return `extent size "${m.extentsizeBytes}" is not a power of two multiple of 4096`;
  }
  const sizes = [m.datasizeBytes, m.mapSizeBytes, m.dataOffsetBytes, m.keepdirty];
  if (!sizes.every((v) => Number.isSafeInteger(v) && v >= 0)) return "bad size field";
  if (m.keepdirty > 0xffffffff) return `keepdirty "${m.keepdirty}" too large`;
  if (m.datasizeBytes < m.extentsizeBytes || m.datasizeBytes % LAYOUT_ALIGN_BYTES !== 0) {
    return `datasize "${m.datasizeBytes}" is not a multiple of 4096 of at least one extent`;
  }
  const extentCount = Math.ceil(m.datasizeBytes / m.extentsizeBytes);
  if (
    m.mapOffsetBytes !== METADATA_AREA_BYTES ||
    m.mapSizeBytes % LAYOUT_ALIGN_BYTES !== 0 ||
    m.mapSizeBytes * 8 < extentCount ||
    m.dataOffsetBytes !== m.mapOffsetBytes + m.mapSizeBytes
  ) {
    return `map at "${m.mapOffsetBytes}" size "${m.mapSizeBytes}" data at ` +
      `"${m.dataOffsetBytes}" do not fit ${extentCount} extents`;
  }
  const counters = [m.resuid, m.localcnt, m.remotecnt, m.generation];
  if (!counters.every((v) => v >= 0n && v < 1n << 64n)) return "counter out of u64 range";
  if (!ROLES.includes(m.prevrole)) return `unknown role "${m.prevrole}"`;
  return null;
}

function crc32(bytes: Uint8Array): number {
  return Bun.hash.crc32(bytes) >>> 0;
}

/**
 * Encodes a record into one 4096-byte slot with magic, version and crc32.
 * An inconsistent record is a programmer error (asserted).
 */
export function encodeMetadata(m: Metadata): Uint8Array {
  const problem = metadataProblem(m);
  assert(problem === null, `Cannot encode metadata: ${problem}`);
  const slot = new Uint8Array(METADATA_SLOT_BYTES);
  const view = new DataView(slot.buffer);
  slot.set(MAGIC, 0);
  view.setUint32(8, METADATA_VERSION, true);
  view.setUint32(12, 0, true);
  view.setBigUint64(16, m.generation, true);
  view.setBigUint64(24, BigInt(m.datasizeBytes), true);
  view.setBigUint64(32, BigInt(m.extentsizeBytes), true);
  view.setBigUint64(40, BigInt(m.mapOffsetBytes), true);
  view.setBigUint64(48, BigInt(m.mapSizeBytes), true);
  view.setBigUint64(56, BigInt(m.dataOffsetBytes), true);
  view.setBigUint64(64, m.resuid, true);
  view.setBigUint64(72, m.localcnt, true);
  view.setBigUint64(80, m.remotecnt, true);
  view.setUint32(88, m.keepdirty, true);
  view.setUint8(92, ROLES.indexOf(m.prevrole));
  const flags = (m.syncTarget ? FLAG_SYNC_TARGET : 0) |
    (m.discardPending ? FLAG_DISCARD_PENDING : 0) |
    (m.localWritesLost ? FLAG_LOCAL_WRITES_LOST : 0);
  view.setUint8(93, flags);
  const name = new TextEncoder().encode(m.resource);
  view.setUint16(94, name.length, true);
  slot.set(name, NAME_OFFSET);
  view.setUint32(CRC_OFFSET, crc32(slot.subarray(0, CRC_OFFSET)), true);
  return slot;
}

function u64(view: DataView, offset: number): number {
  const value = view.getBigUint64(offset, true);
  // Beyond 2^53 no valid record can hold it; NaN makes metadataProblem refuse it.
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : Number.NaN;
}

/**
 * Decodes one slot.
 * @returns the record, or null if the magic or the crc32 is wrong (torn, never written)
 * @throws MetadataError "EVERSION" for a newer format version; "ECORRUPT" if the
 *   checksum holds but the contents are inconsistent
 */
export function decodeMetadata(slot: Uint8Array): Metadata | null {
  assert(slot.length === METADATA_SLOT_BYTES, `slot of ${slot.length} bytes`);
  if (!MAGIC.every((byte, i) => slot[i] === byte)) return null;
  const view = new DataView(slot.buffer, slot.byteOffset, slot.byteLength);
  if (view.getUint32(CRC_OFFSET, true) !== crc32(slot.subarray(0, CRC_OFFSET))) return null;
  // The envelope (magic, version at 8, crc32 in the last 4 bytes) is the same in
  // every version, so a damaged version field fails the crc like any other byte.
  const version = view.getUint32(8, true);
  if (version > METADATA_VERSION) {
    throw new MetadataError(
      "EVERSION",
      `Cannot read metadata: format version "${version}" is newer than ${METADATA_VERSION}`,
    );
  }
  if (version !== METADATA_VERSION) {
    throw new MetadataError("ECORRUPT", `Cannot read metadata: format version "${version}"`);
  }
  const nameLength = view.getUint16(94, true);
  const roleIndex = view.getUint8(92);
  const flags = view.getUint8(93);
  const m: Metadata = {
    resource: new TextDecoder().decode(slot.subarray(NAME_OFFSET, NAME_OFFSET + nameLength)),
    datasizeBytes: u64(view, 24),
    extentsizeBytes: u64(view, 32),
    keepdirty: view.getUint32(88, true),
    mapOffsetBytes: u64(view, 40),
    mapSizeBytes: u64(view, 48),
    dataOffsetBytes: u64(view, 56),
    resuid: view.getBigUint64(64, true),
    localcnt: view.getBigUint64(72, true),
    remotecnt: view.getBigUint64(80, true),
    prevrole: ROLES[roleIndex] ?? ("?" as Role),
    syncTarget: (flags & FLAG_SYNC_TARGET) !== 0,
    discardPending: (flags & FLAG_DISCARD_PENDING) !== 0,
    localWritesLost: (flags & FLAG_LOCAL_WRITES_LOST) !== 0,
    generation: view.getBigUint64(16, true),
  };
  const problem =
    metadataProblem(m) ??
    (view.getUint32(12, true) !== 0 ? "reserved field is not zero" : null) ??
    ((flags & ~FLAGS_KNOWN) !== 0 ? `unknown flags "${flags}"` : null) ??
    (nameLength > RESOURCE_NAME_BYTES_MAX ? `name length "${nameLength}"` : null);
  if (problem !== null) {
    throw new MetadataError("ECORRUPT", `Cannot read metadata: ${problem}`);
  }
  return m;
}

/** Fields fixed by `create`: a write that changes them is a programmer error. */
const LAYOUT_FIELDS = [
  "datasizeBytes",
  "extentsizeBytes",
  "mapOffsetBytes",
  "mapSizeBytes",
  "dataOffsetBytes",
] as const;

/** The records of both slots of a metadata area (null: torn, corrupt or never written). */
function decodeSlots(area: Uint8Array): [Metadata | null, Metadata | null] {
  const slot = (i: number) => decodeMetadata(area.subarray(i * METADATA_SLOT_BYTES, (i + 1) * METADATA_SLOT_BYTES));
  return [slot(0), slot(1)];
}

/** The newest valid slot of a metadata area, or null if neither is valid. */
function newestSlot(area: Uint8Array): { metadata: Metadata; slot: number } | null {
  return newestOf(decodeSlots(area));
}

function newestOf(slots: [Metadata | null, Metadata | null]): { metadata: Metadata; slot: number } | null {
  let best: { metadata: Metadata; slot: number } | null = null;
  for (const [slot, m] of slots.entries()) {
    if (m !== null && (best === null || m.generation > best.metadata.generation)) {
      best = { metadata: m, slot };
    }
  }
  return best;
}

/** Options for {@link MetadataStore.load}. */
export interface LoadOptions {
  /** Refuse (MetadataError "ERESOURCE") metadata that names another resource. */
  resource?: string;
  /**
   * Where the store says what it decided by itself: once, that metaflush is off because the
   * provider cannot flush (Provider.flushUnsupported, spec §4), and that it recorded
   * localWritesLost after a failed durable write. Default: nowhere.
   */
  log?: Logger;
}

/**
 * Reads and writes the metadata and the on-disk activemap of an open Provider.
 * Writes are serialised internally; concurrent map writes are coalesced (the
 * latest bitmap wins, every caller resolves once a write that started after
 * its call has reached the disk).
 *
 * Durability. A write with `flush: false` (metaflush off) lands in the page cache only, and
 * becomes durable once a flush of the provider that started after it succeeds
 * (Provider.nextFlushEpoch, Provider.flushed). The store tracks that for both slots and for
 * every map page, because:
 * - a write never goes to the slot holding the newest durable record, so that a crash, which
 *   may tear any write not yet durable, always leaves that record readable. Writes between
 *   flushes therefore all go to the other slot; after a flush covered them, they alternate.
 * - a durable map write also writes every page written without a flush since (it cannot know
 *   those are on the disk).
 * - when a durable write fails, the kernel may have reported to it a lost cached write of the
 *   data (an O_DSYNC write reports any writeback error of the provider, see Provider
 *   writeDurable). Before the failure is reported, localWritesLost is recorded durably, so that
 *   a crash before the data's next flush (which also gets the report) cannot lose it.
 */
export class MetadataStore {
  readonly #provider: Provider;
  #metadata: Metadata;
  /** What each slot holds as far as this store knows (null: invalid, or a write of it failed). */
  readonly #slots: [Metadata | null, Metadata | null];
  /** The slot holding the newest record known durable: never written (see the class comment). */
  #durableSlot: number;
  /** The flush epoch that makes the other slot's record durable, or null when it has none. */
  #pendingEpoch: number | null;
  #queue: Promise<void> = Promise.resolve();
  readonly #map: MapWriter;
  readonly #log: Logger;
  #saidFlushUnsupported = false;

  private constructor(
    provider: Provider, slots: [Metadata | null, Metadata | null], newest: number, options: LoadOptions,
  ) {
    this.#provider = provider;
    this.#slots = slots;
    this.#metadata = slots[newest]!;
    // The newest record may still be in the page cache only (an earlier run that did not flush
    // it), the older one was durable when that run wrote the newest (it never overwrote it).
    // With one valid slot there is nothing else to keep.
    const older = slots[1 - newest] !== null;
    this.#durableSlot = older ? 1 - newest : newest;
    this.#pendingEpoch = older ? provider.nextFlushEpoch() : null;
    this.#log = options.log ?? (() => {});
    this.#map = new MapWriter(provider, this.#metadata, {
      writeDurable: (offset, bytes) => this.#writeDurable(offset, bytes),
      recordLoss: (error) => this.#enqueue(() => this.#recordLoss(error)),
    });
  }

  /**
   * Reads both slots and keeps the newest valid one.
   * @throws MetadataError "ENOMETA" when no slot is valid, "EVERSION",
   *   "ECORRUPT" (inconsistent, or larger than the provider), "ERESOURCE"
   */
  static async load(provider: Provider, options: LoadOptions = {}): Promise<MetadataStore> {
    if (provider.sizeBytes < METADATA_AREA_BYTES) {
      throw new MetadataError(
        "ENOMETA",
        `Cannot load metadata from "${provider.path}": provider of ` +
          `"${provider.sizeBytes}" bytes is smaller than the metadata area`,
      );
    }
    const slots = decodeSlots(await provider.read(0, METADATA_AREA_BYTES));
    const newest = newestOf(slots);
    if (newest === null) {
      throw new MetadataError(
        "ENOMETA",
        `Cannot load metadata from "${provider.path}": no valid metadata ` +
          `(both slots torn, corrupt or never written)`,
      );
    }
    const m = newest.metadata;
    const endBytes = m.dataOffsetBytes + m.datasizeBytes;
    if (endBytes > provider.sizeBytes) {
      throw new MetadataError(
        "ECORRUPT",
        `Cannot load metadata from "${provider.path}": data area ends at "${endBytes}", ` +
          `beyond the provider size "${provider.sizeBytes}"`,
      );
    }
    if (options.resource !== undefined && options.resource !== m.resource) {
      throw new MetadataError(
        "ERESOURCE",
        `Cannot load metadata from "${provider.path}": it belongs to resource ` +
          `"${m.resource}", not "${options.resource}"`,
      );
    }
    return new MetadataStore(provider, slots, newest.slot, options);
  }

  /** A copy of the current record. */
  get metadata(): Metadata {
    return { ...this.#metadata };
  }

  /**
   * Writes the record with `update` applied, as the next generation, into the
   * slot that does not hold the newest durable record, durably (unless `flush:
   * false`; see the file comment for why not with an fdatasync), and reads it
   * back. Layout fields cannot change. When a durable write fails, localWritesLost
   * is recorded first (see the class comment; the error says whether that worked).
   */
  write(
    update: Partial<Omit<Metadata, "generation">>,
    options: { flush?: boolean } = {},
  ): Promise<void> {
    const flush = options.flush ?? true;
    return this.#enqueue(async () => {
      try {
        await this.#writeSlot(update, flush);
      } catch (error) {
        throw flush ? await this.#recordLoss(error) : error;
      }
    });
  }

  #enqueue<T>(job: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(job);
    this.#queue = run.then(() => {}, () => {});
    return run;
  }

  /** A flush that covers the other slot's record succeeded: it is the newest durable one now. */
  #settle(): void {
    if (this.#pendingEpoch === null || !this.#provider.flushed(this.#pendingEpoch)) return;
    this.#durableSlot = 1 - this.#durableSlot;
    this.#pendingEpoch = null;
  }

  async #writeSlot(update: Partial<Omit<Metadata, "generation">>, flush: boolean) {
    for (const field of LAYOUT_FIELDS) {
      assert(
        update[field] === undefined || update[field] === this.#metadata[field],
        `Cannot change layout field "${field}" of existing metadata`,
      );
    }
    const next: Metadata = {
      ...this.#metadata,
      ...update,
      generation: this.#metadata.generation + 1n,
    };
    this.#settle();
    const slot = 1 - this.#durableSlot;
    const offset = slot * METADATA_SLOT_BYTES;
    const encoded = encodeMetadata(next);
    // From here until it succeeds the slot may be torn; the durable slot stays the newest valid
    // one on the disk, and a retry goes to the same slot.
    this.#slots[slot] = null;
    this.#pendingEpoch = null;
    let durable = false;
    if (flush) durable = await this.#writeDurable(offset, encoded);
    else await this.#provider.write(offset, encoded);
    const back = await this.#provider.read(offset, METADATA_SLOT_BYTES);
    assert.deepEqual(decodeMetadata(back), next, "metadata read back differs");
    assert(next.generation > this.#slots[this.#durableSlot]!.generation);
    this.#metadata = next;
    this.#slots[slot] = next;
    if (durable) this.#durableSlot = slot;
    else this.#pendingEpoch = this.#provider.nextFlushEpoch();
  }

  /** Provider.writeDurable; notes once when the provider cannot flush. */
  async #writeDurable(offset: number, bytes: Uint8Array): Promise<boolean> {
    if (await this.#provider.writeDurable(offset, bytes)) return true;
    if (!this.#saidFlushUnsupported) {
      this.#saidFlushUnsupported = true;
      this.#log("warn", `metaflush is off: provider "${this.#provider.path}" cannot flush, so ` +
        "metadata and activemap writes are not made durable (a crash may lose their latest changes)");
    }
    return false;
  }

  /**
   * After a durable write failed with `error`: records localWritesLost durably unless the newest
   * durable record has it. Runs in the write queue.
   * @returns the error to report: a ProviderError's message then says how the recording went
   */
  async #recordLoss(error: unknown): Promise<unknown> {
    if (!(error instanceof ProviderError)) return error; // a programmer error, not the disk's
    this.#settle();
    if (this.#slots[this.#durableSlot]?.localWritesLost === true) return error;
    let outcome = "recorded in the metadata that the local disk may have lost writes";
    try {
      await this.#writeSlot({ localWritesLost: true }, true);
    } catch (again) {
      outcome = `cannot record in the metadata that the local disk may have lost writes: ${again}`;
    }
    this.#log("error", `a durable metadata write failed (${error.message}): ${outcome}`);
    return new ProviderError(error.code, `${error.message}; ${outcome}`, { cause: error });
  }

  /** Reads the on-disk activemap (mapSizeBytes bytes). */
  readMap(): Promise<Uint8Array> {
    return this.#map.read();
  }

  /**
   * Writes the activemap (`bitmap` may be shorter than mapSizeBytes: the rest
   * is zero), only the 4096-byte pages that changed since the last write (and, when
   * durable, those not known durable), and unless `flush: false` returns once those
   * pages are durable. That makes the map durable, not the data: they are written
   * with Provider.writeDurable, so the data written since the last flush is not
   * written back first (a caller that needs it, like a clear round, flushes
   * before). Safe to call concurrently (coalesced). A durable write that fails
   * records localWritesLost first, as {@link write} does.
   */
  writeMap(bitmap: Uint8Array, options: { flush?: boolean } = {}): Promise<void> {
    return this.#map.write(bitmap, options.flush ?? true);
  }
}

/** What the map writer needs of its store. */
interface MapWriterHooks {
  /** Provider.writeDurable, noting a provider that cannot flush. */
  writeDurable(offset: number, bytes: Uint8Array): Promise<boolean>;
  /** Records localWritesLost after a failed durable write; returns the error to report. */
  recordLoss(error: unknown): Promise<unknown>;
}

/**
 * Writes the on-disk map with group commit: calls arriving while a write is in
 * progress are merged into one next write of the latest bitmap. That is safe
 * because each bitmap is a snapshot of the activemap, and a later snapshot
 * holds every extent an earlier caller still waits to dispatch.
 */
class MapWriter {
  readonly #provider: Provider;
  readonly #hooks: MapWriterHooks;
  readonly #offsetBytes: number;
  /** Latest bitmap requested. */
  readonly #next: Uint8Array;
  /** Bitmap being written (stable while the write is in flight). */
  readonly #writing: Uint8Array;
  /** What the disk holds, or null when unknown (never read, or a write failed). */
  #onDisk: Uint8Array | null = null;
  /**
   * Per page of #onDisk: 0 when durable, else the flush epoch that makes it durable
   * (Provider.flushed). Float64: a u32 of flushes could wrap within weeks.
   */
  readonly #pageEpochs: Float64Array;
  #round: { promise: Promise<void>; resolve: () => void; reject: (e: unknown) => void } | null =
    null;
  #roundFlush = false;
  #running = false;
  /** Rounds started so far: a read that overlapped one does not know what the disk holds. */
  #roundsStarted = 0;

  constructor(provider: Provider, m: Metadata, hooks: MapWriterHooks) {
    this.#provider = provider;
    this.#hooks = hooks;
    this.#offsetBytes = m.mapOffsetBytes;
    this.#next = new Uint8Array(m.mapSizeBytes);
    this.#writing = new Uint8Array(m.mapSizeBytes);
    this.#pageEpochs = new Float64Array(m.mapSizeBytes / LAYOUT_ALIGN_BYTES);
  }

  async read(): Promise<Uint8Array> {
    const rounds = this.#roundsStarted;
    const map = await this.#provider.read(this.#offsetBytes, this.#next.length);
    if (!this.#running && this.#round === null && rounds === this.#roundsStarted) {
      this.#onDisk = map.slice();
      // Read from the page cache: durable only once a flush covers what was written before.
      this.#pageEpochs.fill(this.#provider.nextFlushEpoch());
    }
    return map;
  }

  write(bitmap: Uint8Array, flush: boolean): Promise<void> {
    assert(bitmap.length <= this.#next.length, `bitmap of ${bitmap.length} bytes too long`);
    this.#next.set(bitmap);
    this.#next.fill(0, bitmap.length);
    if (this.#round === null) {
      let resolve!: () => void;
      let reject!: (e: unknown) => void;
      const promise = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this.#round = { promise, resolve, reject };
      this.#roundFlush = false;
    }
    this.#roundFlush ||= flush;
    const { promise } = this.#round;
    if (!this.#running) void this.#run();
    return promise;
  }

  async #run(): Promise<void> {
    this.#running = true;
    while (this.#round !== null) {
      const round = this.#round;
      const flush = this.#roundFlush;
      this.#round = null;
      this.#roundsStarted++;
      this.#writing.set(this.#next);
      try {
        await this.#writeChangedPages(flush);
        this.#onDisk ??= new Uint8Array(this.#writing.length);
        this.#onDisk.set(this.#writing);
        round.resolve();
      } catch (error) {
        this.#onDisk = null;
        round.reject(flush ? await this.#hooks.recordLoss(error) : error);
      }
    }
    this.#running = false;
  }

  /**
   * Writes the runs of 4096-byte pages where #writing differs from #onDisk, and when
   * `durable` also those not known durable.
   */
  async #writeChangedPages(durable: boolean): Promise<void> {
    const page = LAYOUT_ALIGN_BYTES;
    const pages = this.#writing.length / page;
    let runStart = -1;
    for (let p = 0; p <= pages; p++) {
      const write = p < pages && (this.#pageChanged(p) || (durable && !this.#pageDurable(p)));
      if (write && runStart < 0) runStart = p;
      if (!write && runStart >= 0) {
        const bytes = this.#writing.subarray(runStart * page, p * page);
        const offset = this.#offsetBytes + runStart * page;
        let madeDurable = false;
        if (durable) madeDurable = await this.#hooks.writeDurable(offset, bytes);
        else await this.#provider.write(offset, bytes);
        this.#pageEpochs.fill(madeDurable ? 0 : this.#provider.nextFlushEpoch(), runStart, p);
        runStart = -1;
      }
    }
  }

  #pageChanged(p: number): boolean {
    if (this.#onDisk === null) return true;
    const start = p * LAYOUT_ALIGN_BYTES;
    for (let i = start; i < start + LAYOUT_ALIGN_BYTES; i++) {
      if (this.#writing[i] !== this.#onDisk[i]) return true;
    }
    return false;
  }

  /** True when page `p` is durable, or never can be (then rewriting it is no use). */
  #pageDurable(p: number): boolean {
    const epoch = this.#pageEpochs[p]!;
    if (epoch === 0 || this.#provider.flushUnsupported) return true;
    if (!this.#provider.flushed(epoch)) return false;
    this.#pageEpochs[p] = 0;
    return true;
  }
}

/** Options for {@link createMetadata}. */
export interface CreateOptions {
  resource: string;
  /** Default 2 MiB. */
  extentsizeBytes?: number;
  /** Default 64. */
  keepdirty?: number;
  /** Default: the whole provider; must not exceed it. */
  mediasizeBytes?: number;
  /** Overwrite existing valid metadata. */
  force?: boolean;
}

/**
 * `hast create`: writes fresh metadata (resuid 0, counters 0, prevrole init)
 * into both slots (generations 1 and 2) and a zeroed activemap, then reads
 * everything back and asserts it.
 * @returns the record as loaded afterwards (generation 2)
 * @throws MetadataError "EEXIST" when valid metadata is present and not `force`;
 *   RangeError on a bad extent size, mediasize, or a provider too small
 */
export async function createMetadata(
  provider: Provider,
  options: CreateOptions,
): Promise<Metadata> {
  const mediasizeBytes = options.mediasizeBytes ?? provider.sizeBytes;
  if (mediasizeBytes > provider.sizeBytes) {
    throw new RangeError(
      `Cannot create metadata: mediasize "${mediasizeBytes}" exceeds the size ` +
        `"${provider.sizeBytes}" of provider "${provider.path}"`,
    );
  }
  const layout = computeLayout(mediasizeBytes, options.extentsizeBytes ?? EXTENTSIZE_BYTES_DEFAULT);
  const m: Metadata = {
    resource: options.resource,
    datasizeBytes: layout.datasizeBytes,
    extentsizeBytes: options.extentsizeBytes ?? EXTENTSIZE_BYTES_DEFAULT,
    keepdirty: options.keepdirty ?? KEEPDIRTY_DEFAULT,
    mapOffsetBytes: layout.mapOffsetBytes,
    mapSizeBytes: layout.mapSizeBytes,
    dataOffsetBytes: layout.dataOffsetBytes,
    resuid: 0n,
    localcnt: 0n,
    remotecnt: 0n,
    prevrole: "init",
    syncTarget: false,
    discardPending: false,
    localWritesLost: false,
    generation: 1n,
  };
  const problem = metadataProblem(m);
  if (problem !== null) throw new RangeError(`Cannot create metadata: ${problem}`);
  if (!options.force) await refuseExisting(provider);
  await writeFresh(provider, m);
  const store = await MetadataStore.load(provider);
  const loaded = store.metadata;
  assert.deepEqual(loaded, { ...m, generation: 2n }, "created metadata read back differs");
  const map = await store.readMap();
  assert(map.every((byte) => byte === 0), "created map read back is not zero");
  return loaded;
}

async function refuseExisting(provider: Provider): Promise<void> {
  if (provider.sizeBytes < METADATA_AREA_BYTES) return;
  let existing: { metadata: Metadata } | null;
  try {
    existing = newestSlot(await provider.read(0, METADATA_AREA_BYTES));
  } catch (error) {
    if (!(error instanceof MetadataError)) throw error;
    throw new MetadataError(
      "EEXIST",
      `Cannot create metadata on "${provider.path}": it holds metadata that cannot be ` +
        `read (${error.message}); use force to overwrite`,
    );
  }
  if (existing !== null) {
    throw new MetadataError(
      "EEXIST",
      `Cannot create metadata on "${provider.path}": it already holds metadata of ` +
        `resource "${existing.metadata.resource}"; use force to overwrite`,
    );
  }
}

/**
 * Invalidates both slots first, so a crash half-way can never leave an old
 * slot with a higher generation next to the new one; then the zeroed map;
 * then both slots in one write.
 */
async function writeFresh(provider: Provider, m: Metadata): Promise<void> {
  await provider.write(0, new Uint8Array(METADATA_AREA_BYTES));
  await provider.flush();
  await provider.write(m.mapOffsetBytes, new Uint8Array(m.mapSizeBytes));
  const area = new Uint8Array(METADATA_AREA_BYTES);
  area.set(encodeMetadata(m), 0);
  area.set(encodeMetadata({ ...m, generation: 2n }), METADATA_SLOT_BYTES);
  await provider.write(0, area);
  await provider.flush();
}
