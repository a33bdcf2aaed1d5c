/**
 * Link and disk faults the kernel does not report at once, driven in-process
 * through the real Primary/Secondary (test/sim.ts):
 * - a silent partition (no FIN, no RST: a pulled cable) is noticed by both
 *   sides within `timeout`; writes made meanwhile resync after the heal;
 * - a secondary whose flush fails (its cached writes may be gone) leaves the
 *   extents written since its last good flush dirty until they are resynced;
 * - sync marks an extent clean only after a flush of the secondary covers it: a
 *   link lost while the flush is outstanding, or before one was issued, leaves
 *   the copied extents dirty, and the next sync copies them.
 */
import { afterEach, expect, test } from "bun:test";
import { waitFor } from "./harness.ts";
import { Sim } from "./sim.ts";

const MIB = 1024 * 1024;
let sim: Sim | null = null;
afterEach(async () => {
  await sim?.stop();
  sim = null;
});

async function inSync(s: Sim, what: string, timeoutMs = 10_000): Promise<void> {
  await waitFor(what, () => {
    const st = s.primary.status();
    return st.status === "complete" && st.dirtyBytes === 0 ? true : undefined;
  }, { timeoutMs, intervalMs: 10 });
}

const pattern = (bytes: number, seed: number) => new Uint8Array(bytes).map((_, i) => (i * seed + 11) & 0xff);

test("a silent partition is noticed by both sides within the timeout and resyncs after the heal", async () => {
  sim = new Sim({ replication: "fullsync", timeoutSeconds: 1, keepdirty: 0 });
  sim.start();
  await inSync(sim, "first connect");
  await sim.primary.write(0, pattern(4096, 3), false);
  const started = performance.now();
  sim.silent = true;
  sim.reachable = false;
  await waitFor("secondary notices", () => sim!.secondary.status().link === "waiting" || undefined,
    { timeoutMs: 5_000, intervalMs: 20 });
  const secondaryMs = performance.now() - started;
  expect(sim.logs.some((l) => l.startsWith("secondary warn") && l.includes("nothing received"))).toBe(true);
  expect(sim.events).toContain("secondary disconnect");
  // The primary's outstanding requests time out as well, and it keeps serving, degraded.
  await waitFor("primary notices", () => sim!.primary.status().status === "degraded" || undefined,
    { timeoutMs: 5_000, intervalMs: 20 });
  expect(secondaryMs).toBeGreaterThanOrEqual(1_000);
  await sim.primary.write(5 * MIB, pattern(8192, 5), false);
  expect(sim.primary.status().dirtyBytes).toBeGreaterThan(0);
  sim.silent = false;
  sim.reachable = true;
  await inSync(sim, "resynced after the heal");
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
});

test("a failed flush on the secondary leaves what it wrote since its last good flush dirty", async () => {
  sim = new Sim({ replication: "fullsync", keepdirty: 0 });
  sim.start();
  await inSync(sim, "first connect");
  await sim.primary.write(2 * MIB, pattern(65536, 7), false);
  await sim.primary.flush(); // succeeds on both: nothing is left to doubt
  await sim.primary.write(7 * MIB, pattern(4096, 9), false);
  await sim.primary.write(9 * MIB + 4096, pattern(4096, 13), false);
  expect(sim.primary.status().dirtyBytes).toBe(0);
  sim.secondaryDisk.flushError = Object.assign(new Error("EIO: i/o error, fdatasync"), { code: "EIO" });
  // The application's flush succeeds: the primary's own copy is durable (spec §2).
  await sim.primary.flush();
  await waitFor("extents marked dirty", () => sim!.primary.status().dirtyBytes === 2 * MIB || undefined,
    { timeoutMs: 2_000, intervalMs: 10 });
  expect(sim.logs.some((l) => l.includes("remote flush failed"))).toBe(true);
  // While the secondary cannot flush, a sync cannot finish either: the extents stay dirty.
  await Bun.sleep(4_000);
  expect(sim.primary.status().dirtyBytes).toBe(2 * MIB);
  sim.secondaryDisk.flushError = null;
  await inSync(sim, "resynced once the secondary flushes again");
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
});

test("a link lost while copied extents wait for the secondary's flush leaves them dirty; the next sync copies them",
  async () => {
  sim = new Sim({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 1 });
  sim.start();
  await inSync(sim, "first connect");
  const cut = async (what: string) => {
    sim!.silent = true; // no FIN: the primary gives up after `timeout`
    sim!.reachable = false;
    await waitFor(what, () => sim!.primary.status().status === "degraded" || undefined,
      { timeoutMs: 5_000, intervalMs: 20 });
    sim!.silent = false;
  };
  await cut("first partition noticed");
  const extents = [1, 4, 6, 11];
  for (const e of extents) await sim.primary.write(e * MIB, pattern(MIB, e + 3), false);
  await waitFor("extents dirty", () => sim!.primary.status().dirtyBytes === extents.length * MIB || undefined,
    { timeoutMs: 2_000, intervalMs: 10 });
  // The secondary takes every chunk, but its flush does not return: nothing copied is durable.
  const disk = sim.secondaryDisk;
  const flushOnce = disk.flush.bind(disk);
  let releaseFlush = (_ok: boolean) => {};
  disk.flush = () => new Promise<boolean>((resolve) => (releaseFlush = resolve));
  try {
    const writesBefore = disk.writes;
    sim.reachable = true;
    await waitFor("sync copied everything and waits for the flush",
      () => disk.writes - writesBefore >= extents.length || undefined, { timeoutMs: 10_000, intervalMs: 10 });
    await cut("second partition noticed");
    expect(sim.primary.status().dirtyBytes).toBe(extents.length * MIB);
  } finally {
    disk.flush = flushOnce;
    releaseFlush(true);
  }
  sim.reachable = true;
  await inSync(sim, "resynced after the heal");
  expect(sim.logs.filter((l) => l.includes("sync failed"))).toEqual([]);
  expect(Buffer.compare(disk.bytes, sim.primaryDisk.bytes)).toBe(0);
}, 30_000);

test("a link lost before any flush covered the copied extents leaves them dirty; the next sync copies them",
  async () => {
  sim = new Sim({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 1 });
  sim.start();
  await inSync(sim, "first connect");
  sim.silent = true;
  sim.reachable = false;
  await waitFor("first partition noticed", () => sim!.primary.status().status === "degraded" || undefined,
    { timeoutMs: 5_000, intervalMs: 20 });
  sim.silent = false;
  const extents = [0, 2, 3, 5, 7, 8, 10, 12];
  for (const e of extents) await sim.primary.write(e * MIB, pattern(MIB, e + 5), false);
  await waitFor("extents dirty", () => sim!.primary.status().dirtyBytes === extents.length * MIB || undefined,
    { timeoutMs: 2_000, intervalMs: 10 });
  // 4 MiB/s: two extents are copied within half a second, long before the first flush is due.
  sim.primary.setSyncRate(4 * MIB);
  const flushesBefore = sim.secondaryDisk.flushes;
  sim.reachable = true;
  await waitFor("two extents copied", () => (sim!.primary.status().sync?.doneBytes ?? 0) >= 2 * MIB || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  expect(sim.secondaryDisk.flushes).toBe(flushesBefore);
  sim.silent = true;
  sim.reachable = false;
  await waitFor("second partition noticed", () => sim!.primary.status().status === "degraded" || undefined,
    { timeoutMs: 5_000, intervalMs: 20 });
  expect(sim.primary.status().dirtyBytes).toBe(extents.length * MIB);
  sim.silent = false;
  sim.primary.setSyncRate(0);
  sim.reachable = true;
  await inSync(sim, "resynced after the heal");
  expect(sim.logs.filter((l) => l.includes("sync failed"))).toEqual([]);
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
}, 30_000);
