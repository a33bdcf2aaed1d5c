// Proves that metadata round-trips through its checksummed slots on a real file,
// survives a torn or corrupt newest slot by falling back to the previous
// generation, refuses to run without valid metadata, and that the layout math
// and `create` refuse bad sizes and existing metadata, by writing and damaging
// provider files directly.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { execSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {
  computeLayout,
  createMetadata,
  decodeMetadata,
  encodeMetadata,
  METADATA_AREA_BYTES,
  METADATA_SLOT_BYTES,
  MetadataError,
  type MetadataErrorCode,
  MetadataStore,
  type Metadata,
} from "./metadata.ts";
import { Provider, ProviderError } from "./provider.ts";
import { failFdatasync } from "../test/fs_faults.ts";

const MiB = 1024 * 1024;
let dir = "";
let fileCount = 0;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "hast-metadata-"));
});

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Runs `fn` on a fresh provider file of `sizeBytes`, closing it afterwards. */
async function withProvider<T>(sizeBytes: number, fn: (p: Provider) => Promise<T>): Promise<T> {
  const file = path.join(dir, `p${fileCount++}.img`);
  fs.writeFileSync(file, new Uint8Array(0));
  fs.truncateSync(file, sizeBytes);
  const p = Provider.open(file);
  try {
    return await fn(p);
  } finally {
    p.close();
  }
}

async function expectMetadataError(fn: () => Promise<unknown>, code: MetadataErrorCode) {
  try {
    await fn();
  } catch (error) {
    expect(error).toBeInstanceOf(MetadataError);
    expect((error as MetadataError).code).toBe(code);
    return error as MetadataError;
  }
  throw new Error(`expected MetadataError ${code}`);
}

function sample(): Metadata {
  return {
    resource: "shared-ü",
    datasizeBytes: 64 * MiB,
    extentsizeBytes: 2 * MiB,
    keepdirty: 64,
    mapOffsetBytes: 8192,
    mapSizeBytes: 4096,
    dataOffsetBytes: 12288,
    resuid: 0xfedcba9876543210n,
    localcnt: 7n,
    remotecnt: 2n ** 64n - 1n,
    prevrole: "secondary",
    syncTarget: true,
    discardPending: true,
    localWritesLost: true,
    generation: 42n,
  };
}

describe("codec", () => {
  test("encode/decode round trip; any flipped byte makes the slot invalid", () => {
    const m = sample();
    const slot = encodeMetadata(m);
    expect(slot.length).toBe(METADATA_SLOT_BYTES);
    expect(decodeMetadata(slot)).toEqual(m);
    for (const at of [0, 9, 20, 100, 2000, 4095]) {
      const bad = slot.slice();
      bad[at]! ^= 0x01;
      expect(decodeMetadata(bad)).toBeNull();
    }
    expect(decodeMetadata(new Uint8Array(METADATA_SLOT_BYTES))).toBeNull();
  });

  test("a newer format version is refused loudly, not ignored", () => {
    const slot = encodeMetadata(sample());
    const view = new DataView(slot.buffer);
    view.setUint32(8, 2, true);
    view.setUint32(4092, Bun.hash.crc32(slot.subarray(0, 4092)), true);
    expect(() => decodeMetadata(slot)).toThrow(/version "2" is newer/);
  });

  test("each flag round-trips alone; an unknown flag is refused, not dropped", () => {
    const none = { ...sample(), syncTarget: false, discardPending: false, localWritesLost: false };
    for (const flag of ["syncTarget", "discardPending", "localWritesLost"] as const) {
      const m = { ...none, [flag]: true };
      expect(decodeMetadata(encodeMetadata(m))).toEqual(m);
    }
    const slot = encodeMetadata(none);
    slot[93] = 8; // a flag this version does not know (a newer binary's): the record is not understood
    new DataView(slot.buffer).setUint32(4092, Bun.hash.crc32(slot.subarray(0, 4092)), true);
    expect(() => decodeMetadata(slot)).toThrow(/unknown flags "8"/);
  });

  test("encode refuses inconsistent records", () => {
    expect(() => encodeMetadata({ ...sample(), resource: "" })).toThrow();
    expect(() => encodeMetadata({ ...sample(), resource: "x".repeat(256) })).toThrow();
    expect(() => encodeMetadata({ ...sample(), mapSizeBytes: 8192 })).toThrow();
    expect(() => encodeMetadata({ ...sample(), extentsizeBytes: 3 * 4096 })).toThrow();
  });
});

describe("computeLayout", () => {
  test("spec formula on exact and awkward sizes", () => {
    // 1 GiB, 2 MiB extents: 512 bits → 64 bytes → one 4096-byte map page.
    const a = computeLayout(1024 * MiB, 2 * MiB);
    expect(a).toEqual({
      extentCount: 512,
      mapOffsetBytes: 8192,
      mapSizeBytes: 4096,
      dataOffsetBytes: 12288,
      datasizeBytes: 1024 * MiB - 12288,
    });
    // 1 TiB with 4 KiB extents: 2^28 bits = 32 MiB of map.
    const b = computeLayout(2 ** 40, 4096);
    expect(b.mapSizeBytes).toBe(32 * MiB);
    expect(b.datasizeBytes).toBe(2 ** 40 - 8192 - 32 * MiB);
    expect(b.extentCount).toBe(b.datasizeBytes / 4096);
    // Odd media size: datasize rounds down to 4096, last extent partial.
    const c = computeLayout(10 * MiB + 5000, MiB);
    expect(c.datasizeBytes % 4096).toBe(0);
    expect(c.datasizeBytes).toBe(Math.floor((10 * MiB + 5000 - 12288) / 4096) * 4096);
    expect(c.extentCount).toBe(Math.ceil(c.datasizeBytes / MiB));
    // Map larger than one page: 4096*8+1 extents need two pages.
    expect(computeLayout((4096 * 8 + 1) * 4096, 4096).mapSizeBytes).toBe(8192);
    expect(computeLayout(4096 * 8 * 4096, 4096).mapSizeBytes).toBe(4096);
  });

  test("smallest provider holds exactly one extent of data", () => {
    expect(computeLayout(12288 + 4096, 4096).datasizeBytes).toBe(4096);
    expect(() => computeLayout(12288 + 4095, 4096)).toThrow(RangeError);
    expect(() => computeLayout(2 * MiB + 12287, 2 * MiB)).toThrow(/too small/);
    expect(computeLayout(2 * MiB + 12288, 2 * MiB).extentCount).toBe(1);
  });

  test("bad extent sizes are RangeErrors", () => {
    for (const bad of [0, 2048, 4096 * 3, 6 * MiB, 1.5, -4096, Number.NaN]) {
      expect(() => computeLayout(64 * MiB, bad)).toThrow(RangeError);
    }
  });
});

describe("MetadataStore", () => {
  test("create, load, write across generations, map round trip", async () => {
    await withProvider(64 * MiB, async (p) => {
      const created = await createMetadata(p, { resource: "r0", extentsizeBytes: MiB });
      expect(created.generation).toBe(2n);
      expect(created.prevrole).toBe("init");
      expect(created.resuid).toBe(0n);
      const store = await MetadataStore.load(p, { resource: "r0" });
      await store.write({ resuid: 99n, localcnt: 1n, prevrole: "primary" });
      await store.write({ remotecnt: 5n, syncTarget: true }, { flush: false });
      await store.write({ discardPending: true });
      await store.write({ discardPending: false, syncTarget: true, localWritesLost: true });
      const again = (await MetadataStore.load(p)).metadata;
      expect(again).toEqual({
        ...created,
        resuid: 99n,
        localcnt: 1n,
        remotecnt: 5n,
        prevrole: "primary",
        syncTarget: true,
        localWritesLost: true,
        generation: 6n,
      });
      const map = new Uint8Array(8);
      map[0] = 0b1000_0001;
      map[7] = 0x80;
      await store.writeMap(map);
      const back = await store.readMap();
      expect(back.length).toBe(created.mapSizeBytes);
      expect(back.subarray(0, 8)).toEqual(map);
      expect(back.subarray(8).every((b) => b === 0)).toBe(true);
      await expect(store.write({ datasizeBytes: 4096 })).rejects.toThrow("layout field");
    });
  });

  // Linux reports a lost cached write to one fdatasync per open file description: a metadata
  // write must not fdatasync the data's descriptor and take that report from the data's flush
  // (test/flush_error_test.ts shows it with a real writeback error). Counted with a spy.
  test("durable metadata and map writes never fdatasync the data's descriptor", async () => {
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "sync", extentsizeBytes: MiB });
      const store = await MetadataStore.load(p);
      let flushes = 0;
      let durable = 0;
      const writeDurable = p.writeDurable.bind(p);
      Object.assign(p, {
        flush: () => Promise.resolve(++flushes > 0),
        writeDurable: (offset: number, data: Uint8Array) => (durable++, writeDurable(offset, data)),
      });
      await store.write({ localcnt: 1n });
      await store.write({ localWritesLost: true }, { flush: true });
      await store.writeMap(new Uint8Array([1]));
      expect([flushes, durable]).toEqual([0, 3]);
      expect((await MetadataStore.load(p)).metadata.localWritesLost).toBe(true);
    });
  });

  test("a torn newest slot leaves the previous generation readable", async () => {
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "torn", extentsizeBytes: MiB });
      const store = await MetadataStore.load(p);
      await store.write({ localcnt: 10n }); // generation 3 → slot 0
      await store.write({ localcnt: 11n }); // generation 4 → slot 1
      // Tear generation 4: its second half never reached the disk.
      const slot1 = await p.read(METADATA_SLOT_BYTES, METADATA_SLOT_BYTES);
      slot1.fill(0xee, 2048);
      await p.write(METADATA_SLOT_BYTES, slot1);
      const loaded = await MetadataStore.load(p);
      expect(loaded.metadata.generation).toBe(3n);
      expect(loaded.metadata.localcnt).toBe(10n);
      // The next write must go to the torn slot, keeping generation 3 intact.
      await loaded.write({ localcnt: 12n });
      const slot0 = decodeMetadata(await p.read(0, METADATA_SLOT_BYTES));
      expect(slot0?.generation).toBe(3n);
      expect((await MetadataStore.load(p)).metadata.localcnt).toBe(12n);
    });
  });

  test("both slots corrupt: no valid metadata", async () => {
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "gone", extentsizeBytes: MiB });
      await p.write(100, new Uint8Array([1, 2, 3]));
      const crcByte = await p.read(METADATA_SLOT_BYTES + 4092, 1);
      await p.write(METADATA_SLOT_BYTES + 4092, new Uint8Array([crcByte[0]! ^ 0x40]));
      const e = await expectMetadataError(() => MetadataStore.load(p), "ENOMETA");
      expect(e.message).toContain("no valid metadata");
    });
    await withProvider(MiB, async (p) => {
      await expectMetadataError(() => MetadataStore.load(p), "ENOMETA");
    });
  });

  test("metadata of another resource or larger than the provider is refused", async () => {
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "mine", extentsizeBytes: MiB });
      const e = await expectMetadataError(
        () => MetadataStore.load(p, { resource: "yours" }),
        "ERESOURCE",
      );
      expect(e.message).toContain('"mine"');
    });
    const file = path.join(dir, "shrunk.img");
    fs.writeFileSync(file, new Uint8Array(0));
    fs.truncateSync(file, 16 * MiB);
    const p = Provider.open(file);
    await createMetadata(p, { resource: "shrunk", extentsizeBytes: MiB });
    p.close();
    fs.truncateSync(file, 8 * MiB);
    const small = Provider.open(file);
    try {
      await expectMetadataError(() => MetadataStore.load(small), "ECORRUPT");
    } finally {
      small.close();
    }
  });

  test("coalesced concurrent map writes end with the latest bitmap on disk", async () => {
    await withProvider(256 * MiB, async (p) => {
      await createMetadata(p, { resource: "maps", extentsizeBytes: 4096 });
      const store = await MetadataStore.load(p);
      expect(store.metadata.mapSizeBytes).toBe(8192);
      const writes: Promise<void>[] = [];
      let last = new Uint8Array(0);
      for (let i = 0; i < 50; i++) {
        last = new Uint8Array(2000);
        last[i * 40] = i + 1;
        writes.push(store.writeMap(last));
      }
      await Promise.all(writes);
      const back = await store.readMap();
      expect(back.subarray(0, 2000)).toEqual(last);
      expect(back.subarray(2000).every((b) => b === 0)).toBe(true);
      // A change in the second page only: the first page stays as written.
      const wide = new Uint8Array(8192);
      wide[5000] = 0xff;
      await store.writeMap(wide);
      expect(await store.readMap()).toEqual(wide);
    });
  });
});

function sh(cmd: string[]): string {
  const r = Bun.spawnSync(cmd);
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")}: ${r.stderr.toString()}`);
  return r.stdout.toString().trim();
}


/**
 * Follows which metadata slots and map pages hold writes not yet durable (plain writes since
 * the last good flush started), and `crash()` tears them, as a power loss may: it overwrites
 * them through the file, past the provider.
 */
function crashModel(p: Provider, file: string) {
  const undurable = new Set<number>(); // 4096-byte page numbers of the provider
  const pagesOf = (offset: number, length: number) =>
    Array.from({ length: Math.ceil(length / 4096) }, (_, i) => Math.floor(offset / 4096) + i);
  const write = p.write.bind(p);
  const writeDurable = p.writeDurable.bind(p);
  const flush = p.flush.bind(p);
  let durableWrites = 0;
  let lost = false;
  Object.assign(p, {
    write: async (offset: number, data: Uint8Array) => {
      await write(offset, data);
      for (const page of pagesOf(offset, data.length)) undurable.add(page);
    },
    writeDurable: async (offset: number, data: Uint8Array) => {
      const durable = await writeDurable(offset, data);
      durableWrites++;
      for (const page of pagesOf(offset, data.length)) (durable ? undurable.delete(page) : undurable.add(page));
      return durable;
    },
    flush: async () => {
      const covered = [...undurable];
      let ok = false;
      try {
        ok = await flush();
      } finally {
        // After a failed flush the lost writes stay lost: no later flush writes them.
        lost ||= !ok;
      }
      if (!lost) for (const page of covered) undurable.delete(page);
      return ok;
    },
  });
  return {
    undurable,
    durableWrites: () => durableWrites,
    crash(): void {
      const fd = fs.openSync(file, "r+");
      try {
        for (const page of undurable) fs.writeSync(fd, new Uint8Array(4096).fill(0xee), 0, 4096, page * 4096);
      } finally {
        fs.closeSync(fd);
      }
    },
  };
}

/** Like withProvider, with the file's path. */
async function withProviderFile<T>(sizeBytes: number, fn: (p: Provider, file: string) => Promise<T>): Promise<T> {
  const file = path.join(dir, `p${fileCount++}.img`);
  fs.writeFileSync(file, new Uint8Array(0));
  fs.truncateSync(file, sizeBytes);
  const p = Provider.open(file);
  try {
    return await fn(p, file);
  } finally {
    p.close();
  }
}

describe("durability", () => {
  // A durable write (O_DSYNC) reports any writeback error of the provider, also a lost cached
  // write of the data. Proves, by failing writeDurable once, that the store records
  // localWritesLost durably before it reports a failed map or metadata write, and not for a
  // write without flush (which cannot take such a report).
  test("a failed durable map or metadata write records localWritesLost before it fails", async () => {
    for (const what of ["map", "metadata"] as const) {
      await withProvider(16 * MiB, async (p) => {
        await createMetadata(p, { resource: "lost", extentsizeBytes: MiB });
        const said: string[] = [];
        const store = await MetadataStore.load(p, { log: (level, message) => said.push(`${level}: ${message}`) });
        const writeDurable = p.writeDurable.bind(p);
        let failures = 1;
        Object.assign(p, {
          writeDurable: (offset: number, data: Uint8Array) => failures-- > 0
            ? Promise.reject(new ProviderError("EIO", `Cannot write provider "${p.path}": EIO`))
            : writeDurable(offset, data),
        });
        const failed = what === "map" ? store.writeMap(new Uint8Array([1])) : store.write({ localcnt: 5n });
        await expect(failed).rejects.toThrow(/EIO.*recorded in the metadata that the local disk may have lost/);
        expect(store.metadata.localWritesLost).toBe(true);
        expect(said).toEqual([expect.stringMatching(/^error: a durable metadata write failed .*EIO.*: recorded/)]);
        const again = (await MetadataStore.load(p)).metadata;
        expect([again.localWritesLost, again.localcnt]).toEqual([true, 0n]);
      });
    }
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "plain", extentsizeBytes: MiB });
      const store = await MetadataStore.load(p);
      Object.assign(p, { write: () => Promise.reject(new ProviderError("EIO", "Cannot write provider: EIO")) });
      await expect(store.writeMap(new Uint8Array([1]), { flush: false })).rejects.toThrow("EIO");
      await expect(store.write({ localcnt: 1n }, { flush: false })).rejects.toThrow("EIO");
      expect(store.metadata.localWritesLost).toBe(false);
    });
  });

  // Proves the same with the kernel's own report: a loop device over a sparse file on a tmpfs
  // that a filler file makes full loses a cached data write at writeback; the next durable map
  // write gets the report (an O_DSYNC write reports any writeback error of the device), and the
  // data's descriptor, which would get it too, is closed without a flush (a crash). A reopened
  // descriptor's flush no longer reports it, so only the record tells. Runs as root.
  test("a map write that gets the kernel's report of a lost data write records it", async () => {
    const tmpfs = fs.mkdtempSync(path.join(dir, "tmpfs-"));
    sh(["mount", "-t", "tmpfs", "-o", `size=${8 * MiB}`, "none", tmpfs]);
    let dev = "";
    try {
      sh(["truncate", "-s", String(32 * MiB), path.join(tmpfs, "disk.img")]);
      dev = sh(["losetup", "-f", "--show", "--direct-io=off", path.join(tmpfs, "disk.img")]);
      let p = Provider.open(dev);
      try {
        await createMetadata(p, { resource: "lost", extentsizeBytes: MiB, mediasizeBytes: 16 * MiB });
        const store = await MetadataStore.load(p);
        try {
          execSync(`dd if=/dev/zero of=${path.join(tmpfs, "filler")} bs=1M 2>/dev/null`);
        } catch {
          // dd ends with ENOSPC: the tmpfs is full, as wanted.
        }
        await p.write(store.metadata.dataOffsetBytes + 3 * MiB, new Uint8Array(64 * 1024).fill(7));
        try {
          execSync("sync"); // the writeback of that write fails
        } catch {
          // sync may report it itself; the descriptors still have theirs.
        }
        fs.rmSync(path.join(tmpfs, "filler"));
        await expect(store.writeMap(new Uint8Array([1]))).rejects.toThrow(/EIO.*recorded in the metadata/);
      } finally {
        p.close(); // no flush of the data's descriptor
      }
      p = Provider.open(dev);
      try {
        expect(await p.flush()).toBe(true); // the report is gone
        expect((await MetadataStore.load(p)).metadata.localWritesLost).toBe(true);
      } finally {
        p.close();
      }
    } finally {
      if (dev !== "") sh(["losetup", "-d", dev]);
      sh(["umount", tmpfs]);
    }
  });

  // A crash may tear any write that no flush has covered yet. Proves, by tearing exactly those
  // (crashModel), that writes without flush between flushes all go to the slot that does not
  // hold the newest durable record, that they alternate again once a flush covered them, and
  // that after a failed flush nothing is taken for durable any more.
  test("writes between flushes never overwrite the newest durable record", async () => {
    await withProviderFile(16 * MiB, async (p, file) => {
      await createMetadata(p, { resource: "slots", extentsizeBytes: MiB });
      const model = crashModel(p, file);
      const store = await MetadataStore.load(p);
      await store.write({ localWritesLost: true }); // durable
      await store.write({ localcnt: 1n }, { flush: false });
      await store.write({ localcnt: 2n }, { flush: false });
      const loaded = async () => {
        model.crash();
        return (await MetadataStore.load(p)).metadata;
      };
      expect(await loaded()).toMatchObject({ localWritesLost: true, localcnt: 0n });

      const second = await MetadataStore.load(p);
      await second.write({ localcnt: 3n }, { flush: false });
      expect(await p.flush()).toBe(true); // localcnt 3 is durable now
      await second.write({ localcnt: 4n }, { flush: false });
      await second.write({ localcnt: 5n }, { flush: false });
      expect(await loaded()).toMatchObject({ localWritesLost: true, localcnt: 3n });

      const third = await MetadataStore.load(p);
      await third.write({ localcnt: 6n }, { flush: false });
      const failing = failFdatasync("EIO");
      try {
        await expect(p.flush()).rejects.toThrow("EIO");
      } finally {
        failing.restore();
      }
      // The kernel reports a lost write once: this flush succeeds, and proves nothing.
      expect(await p.flush()).toBe(true);
      await third.write({ localcnt: 7n }, { flush: false });
      await third.write({ localcnt: 8n }, { flush: false });
      expect(await loaded()).toMatchObject({ localWritesLost: true, localcnt: 3n });
    });
  });

  // Proves that a durable map write also writes the pages written without a flush since (a
  // crash would lose them), except those a good flush covered, by counting durable writes.
  test("a durable map write rewrites the pages no flush has covered", async () => {
    await withProviderFile(16 * MiB, async (p, file) => {
      await createMetadata(p, { resource: "pages", extentsizeBytes: MiB });
      const model = crashModel(p, file);
      const store = await MetadataStore.load(p);
      expect((await store.readMap()).every((b) => b === 0)).toBe(true); // durable since create's flush
      await store.writeMap(new Uint8Array([0b101]), { flush: false });
      await store.writeMap(new Uint8Array([0b101]));
      expect(model.durableWrites()).toBe(1);
      model.crash();
      expect((await store.readMap())[0]).toBe(0b101);

      await store.writeMap(new Uint8Array([0b111]), { flush: false });
      expect(await p.flush()).toBe(true);
      await store.writeMap(new Uint8Array([0b111]));
      expect(model.durableWrites()).toBe(1); // covered by the flush: nothing to write

      await store.writeMap(new Uint8Array([0b1111]), { flush: false });
      const failing = failFdatasync("EIO");
      try {
        await expect(p.flush()).rejects.toThrow("EIO");
      } finally {
        failing.restore();
      }
      await store.writeMap(new Uint8Array([0b1111]));
      expect(model.durableWrites()).toBe(2);
      model.crash();
      expect((await store.readMap())[0]).toBe(0b1111);
    });
  });

  // A map read that overlapped a map write returns what the disk held before that write. Proves
  // that the store does not take such a read for the disk's content (it would then skip a page
  // that differs from the disk), by holding a read back while a write clears a bit.
  test("a map read that overlapped a write does not hide a page the next write must set", async () => {
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "overlap", extentsizeBytes: MiB });
      const store = await MetadataStore.load(p);
      await store.writeMap(new Uint8Array([1]));
      const read = p.read.bind(p);
      let release = () => {};
      const held = new Promise<void>((resolve) => (release = resolve));
      Object.assign(p, {
        read: async (offset: number, length: number) => {
          const bytes = await read(offset, length); // the disk before the write below
          await held;
          return bytes;
        },
      });
      const reading = store.readMap();
      await store.writeMap(new Uint8Array([0]));
      release();
      expect((await reading)[0]).toBe(1);
      Object.assign(p, { read });
      await store.writeMap(new Uint8Array([1]));
      expect((await p.read(METADATA_AREA_BYTES, 1))[0]).toBe(1);
    });
  });

  // Spec §4: metaflush turns itself off if the disk does not support flush. Proves, with an
  // fdatasync that reports EOPNOTSUPP, that the store writes without flush from then on, says
  // so once, and still never overwrites the last durable record.
  test("a provider that cannot flush turns metaflush off, said once", async () => {
    await withProviderFile(16 * MiB, async (p, file) => {
      await createMetadata(p, { resource: "noflush", extentsizeBytes: MiB });
      const model = crashModel(p, file);
      const said: string[] = [];
      const store = await MetadataStore.load(p, { log: (level, message) => said.push(`${level}: ${message}`) });
      await store.write({ localcnt: 1n });
      const failing = failFdatasync("EOPNOTSUPP");
      try {
        expect(await p.flush()).toBe(false);
      } finally {
        failing.restore();
      }
      expect(p.flushUnsupported).toBe(true);
      await store.write({ localcnt: 2n });
      await store.writeMap(new Uint8Array([1]));
      const writes = model.durableWrites();
      await store.writeMap(new Uint8Array([1])); // no use rewriting what can never be durable
      expect(model.durableWrites()).toBe(writes);
      await store.write({ localcnt: 3n });
      expect(said.length).toBe(1);
      expect(said[0]).toMatch(/^warn: metaflush is off: provider ".*" cannot flush/);
      expect((await MetadataStore.load(p)).metadata.localcnt).toBe(3n);
      model.crash();
      expect((await MetadataStore.load(p)).metadata.localcnt).toBe(1n);
    });
  });
});

describe("createMetadata", () => {
  test("refuses existing metadata without force, naming its resource", async () => {
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "first", extentsizeBytes: MiB });
      const e = await expectMetadataError(
        () => createMetadata(p, { resource: "second", extentsizeBytes: MiB }),
        "EEXIST",
      );
      expect(e.message).toContain('"first"');
      const store = await MetadataStore.load(p);
      // Push the old record to a high generation: force must still win.
      for (let i = 0; i < 5; i++) await store.write({ localcnt: BigInt(i) });
      await store.writeMap(new Uint8Array([0xff]));
      const m = await createMetadata(p, { resource: "second", force: true, keepdirty: 3 });
      expect(m.resource).toBe("second");
      expect(m.keepdirty).toBe(3);
      const loaded = await MetadataStore.load(p);
      expect(loaded.metadata).toEqual(m);
      expect((await loaded.readMap()).every((b) => b === 0)).toBe(true);
    });
  });

  test("one surviving slot still counts as existing metadata", async () => {
    await withProvider(16 * MiB, async (p) => {
      await createMetadata(p, { resource: "half", extentsizeBytes: MiB });
      await p.write(0, new Uint8Array(METADATA_SLOT_BYTES));
      await expectMetadataError(
        () => createMetadata(p, { resource: "x", extentsizeBytes: MiB }),
        "EEXIST",
      );
    });
  });

  test("bad extent size, too small provider, mediasize beyond provider", async () => {
    await withProvider(16 * MiB, async (p) => {
      const r = "r";
      await expect(createMetadata(p, { resource: r, extentsizeBytes: 5000 })).rejects.toThrow(
        RangeError,
      );
      await expect(createMetadata(p, { resource: r })).resolves.toBeDefined();
      await expect(
        createMetadata(p, { resource: r, mediasizeBytes: 17 * MiB, force: true }),
      ).rejects.toThrow(/exceeds/);
      await expect(
        createMetadata(p, { resource: r, extentsizeBytes: 16 * MiB, force: true }),
      ).rejects.toThrow(/too small/);
      await expect(createMetadata(p, { resource: "", force: true })).rejects.toThrow(RangeError);
      const m = await createMetadata(p, { resource: r, mediasizeBytes: 3 * MiB, force: true });
      expect(m.datasizeBytes + m.dataOffsetBytes).toBeLessThanOrEqual(3 * MiB);
    });
    await withProvider(METADATA_AREA_BYTES + 4096, async (p) => {
      await expect(createMetadata(p, { resource: "tiny" })).rejects.toThrow(/too small/);
    });
  });
});
