/**
 * When the primary's request slots and the pooled buffers go back for reuse, driven through the
 * real Primary and Secondary (test/sim.ts; the secondary's side of the sim receives into its
 * pool as socketConnection does). A buffer given back while something still reads it would be
 * refilled by the next request: the secondary, or the local disk, would get another write's data.
 * - primary: a request slot only after its local write ended *and* the secondary replied to the
 *   frame sent from it, also in async and memsync, where the application was answered earlier;
 * - primary: when the link dropped before the reply, only once the connection is gone (the
 *   frame may still sit in the socket's buffer; lib/remote_link_test.ts covers the wait);
 * - primary: a slot taken for a write that is refused before anything read it;
 * - secondary: only once the write received into it was applied;
 * - sync: a chunk's request slot only after the secondary's reply, or once a dropped link's
 *   connection is gone.
 */
import { afterEach, expect, test } from "bun:test";
import { waitFor } from "./harness.ts";
import { Sim } from "./sim.ts";
import type { MemoryDisk } from "./sim.ts";

const KIB = 1024;

let sim: Sim | null = null;
afterEach(async () => {
  await sim?.stop();
  sim = null;
});

async function connected(mode: "fullsync" | "memsync" | "async"): Promise<Sim> {
  const s = new Sim({ replication: mode });
  sim = s;
  s.start();
  await waitFor("connected", () => s.primary.status().status === "complete" || undefined,
    { timeoutMs: 5000, intervalMs: 10 });
  return s;
}

/** Holds the disk's writes until open() is called. */
function hold(disk: MemoryDisk): { open: () => void; held: () => number } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  let held = 0;
  disk.beforeWrite = async () => {
    held++;
    await opened;
  };
  return { open, held: () => held };
}

/** A write of 128 KiB in one of the primary's request slots, filled with `byte`. */
function pooledWrite(s: Sim, byte: number): Uint8Array {
  const buffer = s.primary.writeBuffers.take(128 * KIB);
  expect(buffer).not.toBeNull();
  return buffer!.fill(byte);
}

const settle = () => Bun.sleep(50);

for (const mode of ["async", "memsync"] as const) {
  test(`${mode}: the primary's buffer goes back only after the secondary replied`, async () => {
    const s = await connected(mode);
    const secondary = hold(s.secondaryDisk);
    await s.primary.write(0, pooledWrite(s, 1), false); // answered: the secondary still holds it
    await waitFor("secondary holds the write", () => secondary.held() === 1 || undefined);
    await settle();
    expect(s.primary.writeBuffers.stats().inUse).toBe(1);
    secondary.open();
    await waitFor("given back", () => s.primary.writeBuffers.stats().inUse === 0 || undefined);
    expect(s.primary.status().remoteInFlight).toBe(0);
    expect(s.secondaryDisk.bytes.subarray(0, 128 * KIB).every((b) => b === 1)).toBe(true);
  });
}

test("fullsync: the primary's buffer goes back only after its local write ended", async () => {
  const s = await connected("fullsync");
  const local = hold(s.primaryDisk);
  const write = s.primary.write(0, pooledWrite(s, 2), false);
  await waitFor("local write held", () => local.held() === 1 || undefined);
  await waitFor("secondary replied", () => s.primary.status().remoteInFlight === 0 || undefined);
  await settle();
  expect(s.primary.writeBuffers.stats().inUse).toBe(1);
  local.open();
  await write;
  await waitFor("given back", () => s.primary.writeBuffers.stats().inUse === 0 || undefined);
  expect(s.primaryDisk.bytes.subarray(0, 128 * KIB).every((b) => b === 2)).toBe(true);
});

test("a slot whose frame lost its link goes back once the connection is gone", async () => {
  const s = await connected("async");
  const secondary = hold(s.secondaryDisk);
  await s.primary.write(0, pooledWrite(s, 3), false);
  await waitFor("secondary holds the write", () => secondary.held() === 1 || undefined);
  expect(s.primary.writeBuffers.stats().inUse).toBe(1);
  expect(s.dropLink("test: link lost")).toBe(true);
  // The sim's connection copies what it sends, so it holds nothing once closed.
  await waitFor("primary saw the drop", () => s.primary.status().link !== "connected" || undefined);
  await waitFor("given back", () => s.primary.writeBuffers.stats().inUse === 0 || undefined);
  secondary.open();
  expect(s.primary.writeBuffers.stats().taken).toBe(1);
});

test("a slot goes back when its write is refused before anything read it", async () => {
  const s = await connected("fullsync");
  s.primaryMeta.beforeWriteMap = async () => {
    throw new Error("injected map write failure");
  };
  await expect(s.primary.write(0, pooledWrite(s, 5), false)).rejects.toThrow();
  expect(s.primary.writeBuffers.stats().inUse).toBe(0);
  expect(s.primaryDisk.bytes[0]).toBe(0); // never written
});

test("the secondary's receive buffer goes back once the write was applied", async () => {
  const s = await connected("fullsync");
  const secondary = hold(s.secondaryDisk);
  const data = new Uint8Array(128 * KIB);
  for (let i = 0; i < data.byteLength; i++) data[i] = (i * 7) & 0xff; // not a hole
  const write = s.primary.write(0, data, false);
  await waitFor("secondary holds the write", () => secondary.held() === 1 || undefined);
  expect(s.secondary.receivePool.stats()).toEqual({ free: 0, reused: 0, allocated: 1 });
  secondary.open();
  await write;
  await waitFor("given back", () => s.secondary.receivePool.stats().free === 1 || undefined);
  expect(Buffer.compare(s.secondaryDisk.bytes.subarray(0, data.byteLength), data)).toBe(0);
});

for (const drop of [false, true]) {
  test(`a sync chunk's slot goes back after the secondary's reply${drop ? ", or once a dropped link is gone" : ""}`,
    async () => {
      const s = await connected("fullsync");
      s.reachable = false;
      expect(s.dropLink("test: partition")).toBe(true);
      await waitFor("degraded", () => s.primary.status().status === "degraded" || undefined);
      await s.primary.write(0, new Uint8Array(2 * 1024 * KIB).fill(4), false); // two extents dirty
      const secondary = hold(s.secondaryDisk);
      s.reachable = true; // the primary connects within its retry interval and syncs both extents
      await waitFor("both sync chunks held", () => secondary.held() === 2 || undefined, { timeoutMs: 5000 });
      expect(s.primary.writeBuffers.stats()).toMatchObject({ inUse: 2, taken: 2 });
      if (drop) {
        s.reachable = false;
        expect(s.dropLink("test: link lost")).toBe(true);
      }
      secondary.open();
      if (drop) {
        await waitFor("primary saw the drop", () => s.primary.status().link !== "connected" || undefined);
        // The sim's connection copies what it sends, so it holds nothing once closed.
        await waitFor("given back", () => s.primary.writeBuffers.stats().inUse === 0 || undefined);
      } else {
        await waitFor("synced", () => s.primary.status().dirtyBytes === 0 || undefined, { timeoutMs: 5000 });
        expect(s.primary.writeBuffers.stats()).toMatchObject({ inUse: 0, taken: 2 });
        expect(Buffer.compare(s.secondaryDisk.bytes, s.primaryDisk.bytes)).toBe(0);
      }
    }, 15_000);
}
