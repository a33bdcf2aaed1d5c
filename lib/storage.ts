/**
 * The storage interfaces the replication logic is written against, so tests
 * can inject slow or failing disks, and their implementation over a Provider.
 */
import type { Metadata } from "./metadata.ts";
import type { Provider } from "./provider.ts";

/** The data area of a local provider (offsets relative to the data area). */
export interface DataStore {
  readonly sizeBytes: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Fills `buf` from `offset` (a read into a buffer the caller reuses). */
  readInto(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Afterwards the range reads back as zeros. */
  zero(offset: number, length: number): Promise<void>;
  /** Returns false when the device does not support flushing. */
  flush(): Promise<boolean>;
}

/** Metadata and on-disk activemap persistence. */
export interface MetaStore {
  readonly metadata: Metadata;
  write(update: Partial<Omit<Metadata, "generation">>, options?: { flush?: boolean }): Promise<void>;
  readMap(): Promise<Uint8Array>;
  writeMap(bitmap: Uint8Array, options?: { flush?: boolean }): Promise<void>;
}

/** The data area of `provider` starting at `dataOffsetBytes`. */
export function providerDataStore(
  provider: Provider,
  dataOffsetBytes: number,
  sizeBytes: number,
): DataStore {
  return {
    sizeBytes,
    read: (offset, length) => provider.read(dataOffsetBytes + offset, length),
    readInto: (offset, buf) => provider.readInto(dataOffsetBytes + offset, buf),
    write: (offset, data) => provider.write(dataOffsetBytes + offset, data),
    zero: (offset, length) => provider.zero(dataOffsetBytes + offset, length),
    flush: () => provider.flush(),
  };
}

/**
 * Wraps `data` so that after one failed flush every later flush fails too.
 * A failed fdatasync means cached writes may never reach the disk, and Linux
 * reports that to one fdatasync of a descriptor only: the next would succeed
 * over the loss, and a clear round (or a sync) would then mark extents clean
 * whose data is not on disk, or an application's flush would report success.
 * `failure()` is the first flush error, or null. The guard sees every report
 * only because nothing else fdatasyncs the data's descriptor while it runs:
 * metadata is made durable through a second descriptor (metadata.ts), and the
 * worker flushes before a role starts and after it stopped (resource_worker.ts).
 */
export function stickyFlushFailure(data: DataStore): DataStore & { failure(): string | null } {
  let failure: string | null = null;
  return {
    sizeBytes: data.sizeBytes,
    read: (offset, length) => data.read(offset, length),
    readInto: (offset, buf) => data.readInto(offset, buf),
    write: (offset, bytes) => data.write(offset, bytes),
    zero: (offset, length) => data.zero(offset, length),
    async flush() {
      if (failure !== null) throw new Error(`an earlier flush failed (${failure}); cached writes may be lost`);
      try {
        return await data.flush();
      } catch (error) {
        failure = String(error);
        throw error;
      }
    },
    failure: () => failure,
  };
}

/**
 * Records metadata.localWritesLost, flushed: the local disk may have dropped cached writes, so
 * this copy must not be promoted without --force until a sync from the peer completes. When it
 * wrote the record now, logs so, ending with `promotion` (what promoting this node then needs).
 * @returns true when it wrote the record now, false when it was already there
 * @throws what the metadata write throws
 */
export async function recordLocalWritesLost(
  meta: MetaStore, log: (level: "error", message: string) => void, promotion: string,
): Promise<boolean> {
  if (meta.metadata.localWritesLost) return false;
  await meta.write({ localWritesLost: true }, { flush: true });
  log("error", `recorded in the metadata: the local disk may have lost writes; promoting this node ${promotion}`);
  return true;
}
