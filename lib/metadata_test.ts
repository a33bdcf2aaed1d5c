// Proves that metadata round-trips through its checksummed slots on a real file,
// survives a torn or corrupt newest slot by falling back to the previous
// generation, refuses to run without valid metadata, and that the layout math
// and `create` refuse bad sizes and existing metadata, by writing and damaging
// provider files directly.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
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
import { Provider } from "./provider.ts";

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
