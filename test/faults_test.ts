/**
 * Link and disk faults the kernel does not report at once, driven in-process
 * through the real Primary/Secondary (test/sim.ts):
 * - a silent partition (no FIN, no RST: a pulled cable) is noticed by both
 *   sides within `timeout`; writes made meanwhile resync after the heal;
 * - a secondary whose flush fails (its cached writes may be gone) leaves the
 *   extents written since its last good flush dirty until they are resynced;
 * - sync marks an extent clean only after a flush of the secondary covers it: a
 *   link lost while the flush is outstanding, or before one was issued, leaves
 *   the copied extents dirty, and the next sync copies them;
 * - a write that fails on the primary's disk is an I/O error in every mode (the
 *   secondary's copy is resynced from the primary's), and a local read error
 *   falls back to the secondary only where both copies are in step;
 * - a primary found behind the secondary (it syncs from it) answers reads of its
 *   older extents with an error once the link is lost, never with older data;
 * - the sync of a new connection starts only after the previous one stopped
 *   (a rate-limited sync notices a lost link at once);
 * - after one failed flush of the primary's disk every later flush fails (the
 *   kernel reports a lost cached write once), so nothing is cleared again, and
 *   the metadata records that the local copy may have lost writes; a failed record is retried
 *   without waiting for another flush (by the clear rounds, and by a stop);
 * - a primary that exceeds the replication window (requests or bytes) is a protocol
 *   violation: the secondary drops the connection, and the pair reconnects;
 * - a write the secondary lacks is counted (localcnt) before the application hears success, and
 *   again after a resync made the counters equal, so a later promotion of the secondary is seen
 *   as split-brain, never as "in step";
 * - while the primary syncs from the secondary, a write the secondary fails is never overwritten
 *   by the secondary's older copy: an I/O error when the answer waits for the secondary, a
 *   dropped link and split-brain when it did not;
 * - a change of replication mode by SIGHUP reconnects, so the secondary orders writes by it;
 * - a secondary whose copy is the newer one but whose disk lost cached writes is never a sync
 *   source: the connection is refused with what the operator can do.
 */
import { expect, test } from "bun:test";
import { waitFor } from "./harness.ts";
import { eio, inSync, makeNewer, MemoryDisk, MemoryMeta, pairPerTest, pattern, Sim } from "./sim.ts";
import { ActiveMap } from "../lib/activemap.ts";
import { Primary } from "../lib/primary.ts";
import { systemClock } from "../lib/remote_link.ts";
import type { Connection } from "../lib/transport.ts";
import { MAX_REMOTE_IN_FLIGHT, MAX_REMOTE_IN_FLIGHT_BYTES, MessageType } from "../lib/wire.ts";

const MIB = 1024 * 1024;
/** A pair per test, stopped after it; startPair waits for the first sync. */
const { startPair, track } = pairPerTest();

test("a silent partition is noticed by both sides within the timeout and resyncs after the heal", async () => {
  const sim = await startPair({ replication: "fullsync", timeoutSeconds: 1, keepdirty: 0 });
  await sim.primary.write(0, pattern(4096, 3), false);
  const started = performance.now();
  sim.silent = true;
  sim.reachable = false;
  await waitFor("secondary notices", () => sim.secondary.status().link === "waiting" || undefined,
    { timeoutMs: 5_000, intervalMs: 20 });
  const secondaryMs = performance.now() - started;
  expect(sim.logs.some((l) => l.startsWith("secondary warn") && l.includes("nothing received"))).toBe(true);
  expect(sim.events).toContain("secondary disconnect");
  // The primary's outstanding requests time out as well, and it keeps serving, degraded.
  await waitFor("primary notices", () => sim.primary.status().status === "degraded" || undefined,
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
  const sim = await startPair({ replication: "fullsync", keepdirty: 0 });
  await sim.primary.write(2 * MIB, pattern(65536, 7), false);
  await sim.primary.flush(); // succeeds on both: nothing is left to doubt
  await sim.primary.write(7 * MIB, pattern(4096, 9), false);
  await sim.primary.write(9 * MIB + 4096, pattern(4096, 13), false);
  expect(sim.primary.status().dirtyBytes).toBe(0);
  sim.secondaryDisk.flushError = eio("fdatasync");
  // The application's flush succeeds: the primary's own copy is durable (spec §2).
  await sim.primary.flush();
  await waitFor("extents marked dirty", () => sim.primary.status().dirtyBytes === 2 * MIB || undefined,
    { timeoutMs: 2_000, intervalMs: 10 });
  expect(sim.logs.some((l) => l.includes("remote flush failed"))).toBe(true);
  // The secondary's copy may lack those writes: recorded, so it is not promoted before a resync.
  expect(sim.secondaryMeta.metadata.localWritesLost).toBe(true);
  // While the secondary cannot flush, a sync cannot finish either: the extents stay dirty.
  await Bun.sleep(4_000);
  expect(sim.primary.status().dirtyBytes).toBe(2 * MIB);
  sim.secondaryDisk.flushError = null;
  await inSync(sim, "resynced once the secondary flushes again");
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
  await waitFor("record cleared by the sync", () => !sim.secondaryMeta.metadata.localWritesLost || undefined,
    { timeoutMs: 5_000, intervalMs: 10 });
});

test("a link lost while copied extents wait for the secondary's flush leaves them dirty; the next sync copies them",
  async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 1 });
  const cut = async (what: string) => {
    sim.silent = true; // no FIN: the primary gives up after `timeout`
    sim.reachable = false;
    await waitFor(what, () => sim.primary.status().status === "degraded" || undefined,
      { timeoutMs: 5_000, intervalMs: 20 });
    sim.silent = false;
  };
  await cut("first partition noticed");
  const extents = [1, 4, 6, 11];
  for (const e of extents) await sim.primary.write(e * MIB, pattern(MIB, e + 3), false);
  await waitFor("extents dirty", () => sim.primary.status().dirtyBytes === extents.length * MIB || undefined,
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
  const sim = await startPair({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 1 });
  sim.silent = true;
  sim.reachable = false;
  await waitFor("first partition noticed", () => sim.primary.status().status === "degraded" || undefined,
    { timeoutMs: 5_000, intervalMs: 20 });
  sim.silent = false;
  const extents = [0, 2, 3, 5, 7, 8, 10, 12];
  for (const e of extents) await sim.primary.write(e * MIB, pattern(MIB, e + 5), false);
  await waitFor("extents dirty", () => sim.primary.status().dirtyBytes === extents.length * MIB || undefined,
    { timeoutMs: 2_000, intervalMs: 10 });
  // 4 MiB/s: two extents are copied within half a second, long before the first flush is due.
  sim.primary.setSyncRate(4 * MIB);
  const flushesBefore = sim.secondaryDisk.flushes;
  sim.reachable = true;
  await waitFor("two extents copied", () => (sim.primary.status().sync?.doneBytes ?? 0) >= 2 * MIB || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  expect(sim.secondaryDisk.flushes).toBe(flushesBefore);
  sim.silent = true;
  sim.reachable = false;
  await waitFor("second partition noticed", () => sim.primary.status().status === "degraded" || undefined,
    { timeoutMs: 5_000, intervalMs: 20 });
  expect(sim.primary.status().dirtyBytes).toBe(extents.length * MIB);
  sim.silent = false;
  sim.primary.setSyncRate(0);
  sim.reachable = true;
  await inSync(sim, "resynced after the heal");
  expect(sim.logs.filter((l) => l.includes("sync failed"))).toEqual([]);
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
}, 30_000);

for (const mode of ["fullsync", "memsync", "async"] as const) {
  test(`${mode}: a write that fails on the primary's disk is an I/O error even though the secondary took it`,
    async () => {
    const sim = await startPair({ replication: mode, keepdirty: 0 });
    await sim.primary.write(3 * MIB, pattern(8192, 3), false);
    sim.primaryDisk.beforeWrite = async () => {
      throw eio("write");
    };
    const failed = await sim.primary.write(3 * MIB, pattern(8192, 5), false).then(() => null, (e: Error) => e);
    sim.primaryDisk.beforeWrite = async () => {};
    // Success here would be a lie: reads come from the local copy, which still holds the old data.
    expect(failed?.message).toContain("local write failed");
    expect(await sim.primary.read(3 * MIB, 8192)).toEqual(pattern(8192, 3));
    // The secondary's copy differs: the extent resyncs from the primary, so both hold one version.
    await waitFor("extent marked dirty", () => sim.primary.status().dirtyBytes === MIB || undefined,
      { timeoutMs: 5_000, intervalMs: 5 });
    await inSync(sim, "resynced");
    expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
    await sim.primary.write(3 * MIB, pattern(8192, 7), false);
    await waitFor("replicated", () => sim.primary.status().remoteInFlight === 0 || undefined,
      { timeoutMs: 5_000, intervalMs: 5 });
    expect(sim.secondaryDisk.bytes.subarray(3 * MIB, 3 * MIB + 8192)).toEqual(pattern(8192, 7));
  });
}

test("a local read error falls back to the secondary only where both copies are in step", async () => {
  const sim = await startPair({ replication: "memsync", keepdirty: 0 });
  await sim.primary.write(1 * MIB, pattern(4096, 3), false);
  await sim.primary.write(2 * MIB, pattern(4096, 5), false);
  let release = () => {};
  const held = new Promise<void>((resolve) => (release = resolve));
  sim.secondaryDisk.beforeWrite = (offset) => (offset === 2 * MIB ? held : Promise.resolve());
  try {
    // Answered after the early ack; the secondary has not written it yet.
    await sim.primary.write(2 * MIB, pattern(4096, 9), false);
    sim.primaryDisk.readError = eio("read");
    expect(await sim.primary.read(1 * MIB, 4096)).toEqual(pattern(4096, 3));
    // The secondary's copy of extent 2 is not current: no older data, an error.
    const error = await sim.primary.read(2 * MIB, 4096).then(() => null, (e: Error) => e);
    expect(error?.message).toContain("local read failed");
  } finally {
    release();
    sim.primaryDisk.readError = null;
    sim.secondaryDisk.beforeWrite = async () => {};
  }
  await waitFor("written on the secondary", () => sim.primary.status().remoteInFlight === 0 || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  sim.primaryDisk.readError = eio("read");
  try {
    expect(await sim.primary.read(2 * MIB, 4096)).toEqual(pattern(4096, 9));
  } finally {
    sim.primaryDisk.readError = null;
  }
});

test("a primary behind the secondary never serves its older extents, also after the link is lost", async () => {
  const sim = track(new Sim({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 1 }));
  // The secondary was primary meanwhile and wrote extents 2 and 3 (the counters say so).
  makeNewer(sim, "secondary");
  sim.secondaryMeta.map[0] = 0b1100;
  sim.secondaryDisk.bytes.fill(9, 2 * MIB, 4 * MIB);
  sim.primaryDisk.bytes.fill(1, 2 * MIB, 4 * MIB);
  sim.primaryDisk.bytes.fill(5, 6 * MIB, 7 * MIB);
  sim.secondaryDisk.bytes.fill(5, 6 * MIB, 7 * MIB);
  sim.start();
  sim.primary.setSyncRate(64 * 1024); // the sync of extent 2 alone takes 16 s
  await waitFor("syncing from the secondary", () => sim.primary.status().syncSource === "secondary" || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  expect(sim.primaryMeta.metadata.syncTarget).toBe(true);
  expect(await sim.primary.read(3 * MIB, 4096)).toEqual(new Uint8Array(4096).fill(9)); // from the secondary
  sim.reachable = false;
  expect(sim.dropLink("test: link lost")).toBe(true);
  await waitFor("disconnected", () => sim.primary.status().status === "degraded" || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  // Its own copy of extent 3 is older: an error, not the old data. Extents in step still read.
  const error = await sim.primary.read(3 * MIB, 4096).then(() => null, (e: Error) => e);
  expect(error?.message).toContain("older than the secondary's");
  expect(await sim.primary.read(6 * MIB, 4096)).toEqual(new Uint8Array(4096).fill(5));
  // Back in touch, the sync finishes and the local copy is current again.
  sim.primary.setSyncRate(0);
  sim.reachable = true;
  await inSync(sim, "synced from the secondary");
  sim.dropLink("test: link lost again");
  expect(await sim.primary.read(3 * MIB, 4096)).toEqual(new Uint8Array(4096).fill(9));
  expect(sim.primaryMeta.metadata.syncTarget).toBe(false);
}, 30_000);

test("a sync of a lost connection that has not stopped yet holds off the next connection's sync", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 1 });
  sim.reachable = false;
  sim.dropLink("test: partition");
  for (const e of [1, 2]) await sim.primary.write(e * MIB, pattern(MIB, e), false);
  // The sync's first reads of the local copy hang until released.
  let release = () => {};
  const held = new Promise<void>((resolve) => (release = resolve));
  let readsHeld = 0;
  sim.primaryDisk.beforeRead = () => (readsHeld++, held);
  try {
    sim.reachable = true;
    await waitFor("sync reading", () => readsHeld > 0 || undefined, { timeoutMs: 5_000, intervalMs: 5 });
    sim.primaryDisk.beforeRead = async () => {};
    expect(sim.dropLink("test: link lost mid-sync")).toBe(true);
    // The primary reconnects within 2 s while the old sync still holds its extents.
    await waitFor("reconnected", () => sim.primary.status().link === "connected" || undefined,
      { timeoutMs: 5_000, intervalMs: 5 });
    await Bun.sleep(200);
  } finally {
    release();
  }
  await inSync(sim, "resynced");
  expect(sim.logs.filter((l) => l.includes("sync failed"))).toEqual([]);
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
});

test("after a failed flush of the primary's disk every later flush fails, and nothing is cleared again", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0 });
  await sim.primary.write(4 * MIB, pattern(4096, 3), false);
  await waitFor("settled", () => sim.primary.status().activemap.inFlightExtents === 0 || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  // One fdatasync fails (cached writes may be lost); the disk's next one would succeed. The
  // first two attempts to record that in the metadata fail as well.
  let metaFailures = 2;
  sim.primaryMeta.beforeWrite = async (update) => {
    if (update.localWritesLost && metaFailures-- > 0) throw eio("metadata write");
  };
  sim.primaryDisk.flushError = eio("fdatasync");
  await sim.primary.clearRound();
  sim.primaryDisk.flushError = null;
  expect(sim.primary.status().localFlushFailure).toContain("EIO");
  expect(sim.primaryMeta.metadata.localWritesLost).toBe(false);
  // Each later failing flush tries again, until the record is on disk: a restart will then not
  // promote this copy without --force.
  await sim.primary.clearRound();
  expect(sim.primaryMeta.metadata.localWritesLost).toBe(false);
  await sim.primary.clearRound();
  expect(sim.primaryMeta.metadata.localWritesLost).toBe(true);
  expect(sim.logs.filter((l) => l.includes("cannot record in the metadata")).length).toBe(1);
  expect(sim.primary.status().status).toBe("degraded");
  // The application learns of it at its next flush, and keeps learning: no flush succeeds again.
  for (let i = 0; i < 2; i++) {
    const error = await sim.primary.flush().then(() => null, (e: Error) => e);
    expect(error?.message).toContain("local flush failed");
  }
  // Extent 4 may lack its write on disk: it stays set, so a restart resyncs it.
  await sim.primary.clearRound();
  const map = sim.primaryMeta.map;
  expect(map[0]! & (1 << 4)).not.toBe(0);
  // A sync could never mark anything clean: after a reconnect none starts.
  const syncsBefore = sim.events.filter((e) => e === "primary syncstart").length;
  sim.dropLink("test: reconnect");
  await waitFor("reconnected, not syncing", () => sim.logs.some((l) => l.includes("not syncing")) || undefined,
    { timeoutMs: 5_000, intervalMs: 10 });
  expect(sim.events.filter((e) => e === "primary syncstart").length).toBe(syncsBefore);
});

/**
 * An application flush fails and so does the record of it (localWritesLost), on a primary with
 * nothing for a clear round to flush (the written extent is kept dirty). Returns once the record
 * failed; `heal()` lets metadata writes land again.
 */
async function lossRecordFailed(sim: Sim): Promise<() => void> {
  await sim.primary.write(4 * MIB, pattern(4096, 3), false);
  await waitFor("nothing for a round to clear", () =>
    sim.primary.status().activemap.clearPendingExtents === 0 || undefined, { timeoutMs: 5_000, intervalMs: 5 });
  let metaFails = true;
  sim.primaryMeta.beforeWrite = async (update) => {
    if (update.localWritesLost && metaFails) throw eio("metadata write");
  };
  sim.primaryDisk.flushError = eio("fdatasync");
  const error = await sim.primary.flush().then(() => null, (e: Error) => e);
  sim.primaryDisk.flushError = null; // the kernel reports it once; only the sticky failure remains
  expect(error?.message).toContain("local flush failed");
  expect(sim.logs.some((l) => l.includes("cannot record in the metadata"))).toBe(true);
  expect(sim.primaryMeta.metadata.localWritesLost).toBe(false);
  expect(sim.primary.status().activemap.clearPendingExtents).toBe(0);
  return () => (metaFails = false);
}

// Found by review: only the next flush retried the record, and rounds with nothing to clear
// flush nothing: an idle primary restarted without it, and would sync its copy, which may lack
// writes, over the secondary's.
test("a failed record of a failed flush is retried by an idle primary, with no flush to come", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 4 });
  const heal = await lossRecordFailed(sim);
  heal();
  await waitFor("recorded", () => sim.primaryMeta.metadata.localWritesLost || undefined,
    { timeoutMs: 5_000, intervalMs: 10 });
});

test("a failed record of a failed flush is retried by a stop without a link", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 4 });
  const heal = await lossRecordFailed(sim);
  sim.reachable = false;
  sim.dropLink("test: link lost"); // a stop with the link up flushes, which retries it anyway
  heal();
  await sim.restartPrimary(); // at once: no clear round retried it meanwhile
  expect(sim.primaryMeta.metadata.localWritesLost).toBe(true);
});

// Proves that after a failed flush the primary never serves a write its disk dropped: the
// page cache loses a write (as when a page whose writeback failed is evicted), and reads of
// that extent come from the secondary while it is in step; once the link is gone, from the
// local copy, as the only one left.
test("after a failed flush of the primary's disk, reads of its dirty extents come from the secondary", async () => {
  const sim = await startPair({ replication: "memsync", keepdirty: 0 });
  await sim.primary.write(0, pattern(4096, 3), false); // extent 0: flushed and clean before the failure
  await waitFor("extent 0 clean on disk", async () => {
    await sim.primary.clearRound();
    return (sim.primaryMeta.map[0]! & 1) === 0 || undefined;
  }, { timeoutMs: 5_000, intervalMs: 10 });
  await sim.primary.write(6 * MIB, pattern(4096, 5), false); // extent 6: dirty when the flush fails
  await waitFor("settled", () => sim.primary.status().activemap.inFlightExtents === 0 || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  sim.primaryDisk.flushError = eio("fdatasync");
  await sim.primary.clearRound();
  sim.primaryDisk.flushError = null;
  sim.primaryDisk.bytes.fill(0, 6 * MIB, 6 * MIB + 4096); // the dropped write
  const remoteReadsBefore = sim.primary.counters.remoteReads;
  expect(await sim.primary.read(6 * MIB, 4096)).toEqual(pattern(4096, 5));
  expect(sim.primary.counters.remoteReads).toBe(remoteReadsBefore + 1);
  expect(await sim.primary.read(0, 4096)).toEqual(pattern(4096, 3)); // clean: local
  expect(sim.primary.counters.remoteReads).toBe(remoteReadsBefore + 1);
  sim.reachable = false;
  sim.dropLink("test: partition");
  expect(await sim.primary.read(6 * MIB, 4096)).toEqual(new Uint8Array(4096));
});

for (const exceeded of ["requests", "bytes"] as const) {
  test(`a primary that exceeds the window's ${exceeded} is dropped by the secondary, and reconnects`, async () => {
    const sim = await startPair({ replication: "fullsync", mediasizeBytes: 80 * MIB });
    let release = () => {};
    const held = new Promise<void>((resolve) => (release = resolve));
    sim.secondaryDisk.beforeWrite = () => held;
    // Writes the real primary would not send while its window is full, injected as if received
    // (zeros, as the primary's disk holds there, so the copies stay alike).
    const conn = (sim.secondary as unknown as { conn: Connection }).conn;
    const bytes = exceeded === "requests" ? 4096 : MIB;
    const fit = exceeded === "requests" ? MAX_REMOTE_IN_FLIGHT : MAX_REMOTE_IN_FLIGHT_BYTES / MIB;
    const inject = (i: number) => conn.onFrame({
      type: MessageType.Write, flags: 0, seq: 1_000_000 + i, offset: i * bytes, length: bytes, error: 0,
      payload: new Uint8Array(bytes),
    });
    for (let i = 0; i < fit; i++) inject(i);
    expect(conn.closed).toBe(false);
    inject(fit);
    expect(conn.closed).toBe(true);
    const violation = "secondary error: dropping connection: protocol violation: more than";
    expect(sim.logs.some((l) => l.includes(violation))).toBe(true);
    release();
    const connects = () => sim.events.filter((e) => e === "primary connect").length;
    expect(connects()).toBe(1);
    await waitFor("the primary reconnected", () => connects() === 2 || undefined, { timeoutMs: 10_000 });
    await inSync(sim, "in sync again");
    expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
  }, 30_000);
}

/** Fails the secondary's disk writes that start in [from, to) until `stop()`. */
function failSecondaryWrites(sim: Sim, from: number, to: number): { stop(): void } {
  sim.secondaryDisk.beforeWrite = async (offset) => {
    if (offset >= from && offset < to) throw eio("write");
  };
  return { stop: () => (sim.secondaryDisk.beforeWrite = async () => {}) };
}

test("a write the secondary fails is counted before it is answered, and again after a resync", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 1 });
  const start = sim.primaryMeta.metadata.localcnt;
  const failing = failSecondaryWrites(sim, MIB, 2 * MIB);
  await sim.primary.write(MIB, pattern(4096, 3), false);
  // Counted on disk by the time the application hears success (a crash now must not lose it).
  expect(sim.primaryMeta.metadata.localcnt).toBe(start + 1n);
  failing.stop();
  await inSync(sim, "resynced", 15_000);
  await waitFor("secondary confirmed the sync", () =>
    sim.secondaryMeta.metadata.remotecnt === sim.primaryMeta.metadata.localcnt || undefined,
  { timeoutMs: 5_000, intervalMs: 10 });
  // The counters are equal again: the next write the secondary lacks is a new generation.
  sim.reachable = false;
  sim.dropLink("test: partition");
  await waitFor("disconnected", () => sim.primary.status().status === "degraded" || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  await sim.primary.write(5 * MIB, pattern(4096, 7), false);
  expect(sim.primaryMeta.metadata.localcnt).toBe(start + 2n);
}, 40_000);

for (const replication of ["memsync", "async", "fullsync"] as const) {
  const answeredFirst = replication !== "fullsync";
  test(`${replication}: a write the secondary fails ${answeredFirst ? "after the answer is recorded on the secondary " +
    "before the primary hears of it" : "is not recorded on the secondary (the primary waits for it)"}`, async () => {
    // memsync answers on the receipt, async at once: should the primary die before it counts the
    // failure (localcnt), only the secondary's own record keeps it from being promoted with a copy
    // that lacks an answered write.
    const sim = await startPair({ replication, keepdirty: 0, timeoutSeconds: 1 });
    const recordedWhenCounted: boolean[] = [];
    sim.primaryMeta.beforeWrite = async (update) => {
      if (update.localcnt !== undefined) recordedWhenCounted.push(sim.secondaryMeta.metadata.localWritesLost);
    };
    const failing = failSecondaryWrites(sim, MIB, 2 * MIB);
    await sim.primary.write(MIB, pattern(4096, 3), false);
    await waitFor("the primary counted the failure", () => recordedWhenCounted.length > 0 || undefined,
      { timeoutMs: 5_000, intervalMs: 5 });
    expect(recordedWhenCounted).toEqual([answeredFirst]);
    expect(sim.secondaryMeta.metadata.localWritesLost).toBe(answeredFirst);
    failing.stop();
    await inSync(sim, "resynced", 15_000);
    expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
    await waitFor("record cleared by the sync", () => !sim.secondaryMeta.metadata.localWritesLost || undefined,
      { timeoutMs: 5_000, intervalMs: 10 });
  }, 40_000);
}

/**
 * A pair where the primary is behind: the secondary wrote extent 2 (and with `more`, extents
 * 8–15) while it was primary. The sync from it runs at `rate` bytes/s (64 KiB/s unless given; 0 is
 * unlimited) until the test lifts the limit.
 */
async function startBehind(
  replication: "fullsync" | "memsync" | "async", more = false, rate = 64 * 1024,
): Promise<Sim> {
  const sim = track(new Sim({ replication, keepdirty: 0, timeoutSeconds: 2 }));
  makeNewer(sim, "secondary");
  sim.secondaryMeta.map[0] = 0b0100;
  sim.secondaryDisk.bytes.fill(9, 2 * MIB, 3 * MIB);
  if (more) {
    sim.secondaryMeta.map[1] = 0xff;
    sim.secondaryDisk.bytes.fill(9, 8 * MIB, 16 * MIB);
  }
  sim.primaryDisk.bytes.fill(1, 2 * MIB, 3 * MIB);
  sim.start();
  sim.primary.setSyncRate(rate);
  await waitFor("syncing from the secondary", () => sim.primary.status().syncSource === "secondary" || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  return sim;
}

for (const replication of ["fullsync", "memsync", "async"] as const) {
  test(`syncing from the secondary, ${replication}: a write the secondary fails is an I/O error`, async () => {
    const sim = await startBehind(replication, true); // 9 extents: still syncing when the write comes
    const failing = failSecondaryWrites(sim, 6 * MIB, 7 * MIB);
    const error = await sim.primary.write(6 * MIB, pattern(4096, 5), false).then(() => null, (e: Error) => e);
    failing.stop();
    expect(error?.message).toContain("failed the write");
    // The sync then brings both copies in step (from the secondary, whose copy it keeps).
    sim.primary.setSyncRate(0);
    await inSync(sim, "synced from the secondary", 20_000);
    expect(Buffer.compare(sim.primaryDisk.bytes, sim.secondaryDisk.bytes)).toBe(0);
    expect(sim.primaryDisk.bytes.subarray(2 * MIB, 3 * MIB).every((b) => b === 9)).toBe(true);
  }, 40_000);
}

for (const replication of ["fullsync", "memsync", "async"] as const) {
  test(`syncing from the secondary, ${replication}: a write is answered only once the secondary has it, ` +
    "so the sync never pulls older data over an answered write", async () => {
    // Found by review: answered on the receipt (memsync) or at once (async), a write to an extent
    // still to be pulled was lost on both copies when the secondary then failed it, because the
    // sync pulled the secondary's older data over it while the localcnt bump was slow.
    const sim = await startBehind(replication, true, 0);
    let openReads = () => {};
    const readGate = new Promise<void>((resolve) => (openReads = resolve));
    sim.secondaryDisk.beforeRead = async (offset) => {
      if (offset < 12 * MIB) await readGate; // the sync's workers wait on extents 8–11
    };
    sim.primaryMeta.beforeWrite = async (update) => {
      if (update.localcnt !== undefined) await Bun.sleep(200);
    };
    const W = 12 * MIB; // still to be pulled
    const failing = failSecondaryWrites(sim, W, W + 4096);
    const answer = sim.primary.write(W, pattern(4096, 5), false).then(() => "ok", (e: Error) => e.message);
    await Bun.sleep(50);
    openReads();
    const outcome = await answer;
    failing.stop();
    await Bun.sleep(1_000);
    if (outcome === "ok") {
      // Answered success: the write must survive on at least one copy.
      const kept = [sim.primaryDisk, sim.secondaryDisk].some((d) =>
        Buffer.compare(d.bytes.subarray(W, W + 4096), pattern(4096, 5)) === 0);
      expect(kept).toBe(true);
    }
    expect(outcome).toContain("failed the write");
    await inSync(sim, "synced from the secondary", 8_000);
    expect(Buffer.compare(sim.primaryDisk.bytes, sim.secondaryDisk.bytes)).toBe(0);
  }, 40_000);
}

/**
 * The secondary's host with a page cache: `crash()` puts back what its disk held when its last
 * completed flush began (what the crash keeps), and drops the link as the dead host does. A
 * flush takes `flushMs`; while `hold` is set, flushes do not complete (the host dies in one).
 */
function secondaryHost(sim: Sim, flushMs: number) {
  let durable = sim.secondaryDisk.bytes.slice();
  let crashes = 0;
  const host = { hold: false, flushesStarted: 0, crash: (_reason: string) => {} };
  let unhold = () => {};
  const held = new Promise<void>((resolve) => (unhold = resolve));
  sim.secondaryDisk.beforeFlush = async () => {
    const era = crashes;
    const image = sim.secondaryDisk.bytes.slice();
    host.flushesStarted++;
    await Bun.sleep(flushMs);
    if (host.hold) await held;
    if (era === crashes) durable = image;
  };
  host.crash = (reason: string) => {
    crashes++;
    sim.secondaryDisk.bytes.set(durable);
    sim.dropLink(reason);
    host.hold = false;
    unhold();
  };
  return host;
}

test("syncing from the secondary, async: a flush waits for the secondary's, so a crash of its host loses " +
  "nothing the application was told is flushed", async () => {
  // Found by review: in async a FLUSH was answered after the local flush alone. The secondary's
  // host then crashed with the write in its page cache, and the reconnect (the secondary's copy
  // still the newer) pulled its older data over the extent the disconnect had marked for sync.
  const sim = await startBehind("async", true); // extents 8–15 to pull at 64 KiB/s: syncing throughout
  const host = secondaryHost(sim, 200);
  const W = 12 * MIB; // still to be pulled
  await sim.primary.write(W, pattern(4096, 5), false);
  await sim.primary.flush();
  host.crash("test: secondary host crashed");
  sim.primary.setSyncRate(0);
  await waitFor("reconnected", () => sim.events.filter((e) => e === "primary connect").length >= 2 || undefined,
    { timeoutMs: 10_000, intervalMs: 10 });
  await inSync(sim, "synced from the secondary again", 20_000);
  const verdicts = sim.logs.filter((l) => l.startsWith("primary info: connected to secondary"));
  expect(verdicts.map((l) => l.endsWith("sync from secondary)"))).toEqual([true, true]); // the same again
  expect(sim.primaryDisk.bytes.subarray(W, W + 4096)).toEqual(pattern(4096, 5));
  expect(Buffer.compare(sim.primaryDisk.bytes, sim.secondaryDisk.bytes)).toBe(0);
}, 40_000);

for (const replication of ["fullsync", "memsync", "async"] as const) {
  test(`syncing from the secondary, ${replication}: a flush lost with the secondary's host is an I/O error`,
    async () => {
      // Found by review: a Flush whose link was lost was answered success (only the local flush
      // counted), and the reconnect's sync from the secondary pulled its older data over the write.
      const sim = await startBehind(replication, true);
      const host = secondaryHost(sim, 50);
      const W = 12 * MIB; // still to be pulled
      await sim.primary.write(W, pattern(4096, 5), false);
      host.hold = true;
      const started = host.flushesStarted;
      const outcome = sim.primary.flush().then(() => "ok", (e: Error) => e.message);
      await waitFor("a flush of the secondary began", () => host.flushesStarted > started || undefined,
        { timeoutMs: 5_000, intervalMs: 5 });
      host.crash("test: secondary host crashed while flushing");
      const answer = await outcome;
      sim.primary.setSyncRate(0);
      await inSync(sim, "synced from the secondary again", 20_000);
      expect(Buffer.compare(sim.primaryDisk.bytes, sim.secondaryDisk.bytes)).toBe(0);
      // Answered success, the write would have to be on both copies now; it is lost (the sync
      // pulled the crashed secondary's copy), so the flush must have failed.
      const kept = Buffer.compare(sim.primaryDisk.bytes.subarray(W, W + 4096), pattern(4096, 5)) === 0;
      expect({ answer, kept }).toEqual({
        answer: "the secondary, whose copy this node is syncing from, did not flush", kept: false,
      });
    }, 40_000);
}

test("a change of replication mode by SIGHUP reconnects: the secondary then keeps async's order", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 5 });
  sim.primary.reconfigure({ ...sim.config(), replication: "async" });
  await waitFor("reconnected", () => sim.events.filter((e) => e === "primary connect").length >= 2 || undefined,
    { timeoutMs: 10_000, intervalMs: 10 });
  await inSync(sim, "in sync after the reconnect");
  let release = () => {};
  const gate = new Promise<void>((resolve) => (release = resolve));
  const order: number[] = [];
  sim.secondaryDisk.beforeWrite = async (offset) => {
    if (offset === MIB) await gate;
  };
  sim.secondaryDisk.onChange = (offset) => order.push(offset);
  try {
    await sim.primary.write(MIB, pattern(4096, 1), false); // answered at once (async)
    await sim.primary.write(5 * MIB, pattern(4096, 2), false);
    await Bun.sleep(200);
    expect(order).toEqual([]); // the second waits for the first, held at the secondary
  } finally {
    release();
  }
  await waitFor("both applied", () => order.length >= 2 || undefined, { timeoutMs: 5_000, intervalMs: 5 });
  expect(order.slice(0, 2)).toEqual([MIB, 5 * MIB]);
}, 30_000);

test("a newer secondary whose disk lost cached writes is refused as the sync source", async () => {
  const sim = track(new Sim({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 2 }));
  const shared = { resuid: 77n, remotecnt: 1n };
  Object.assign(sim.primaryMeta.metadata, shared, { localcnt: 1n });
  Object.assign(sim.secondaryMeta.metadata, shared, { localcnt: 2n, localWritesLost: true });
  sim.secondaryMeta.map[0] = 0b0100;
  sim.secondaryDisk.bytes.fill(9, 2 * MIB, 3 * MIB);
  sim.primaryDisk.bytes.fill(1, 2 * MIB, 3 * MIB);
  sim.start();
  await waitFor("refused", () => sim.primary.status().link === "refused" || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  expect(sim.primary.status().linkError).toContain("disk may lack writes (a write or flush failed)");
  await Bun.sleep(300);
  expect(sim.primaryDisk.bytes.subarray(2 * MIB, 3 * MIB).every((b) => b === 1)).toBe(true);
  expect(sim.primary.status().syncSource).toBe("primary");
}, 20_000);

test("a change of replication mode while a connection is being set up reconnects too", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 5 });
  sim.dropLink("test: link lost");
  await waitFor("down", () => sim.primary.status().link !== "connected" || undefined,
    { timeoutMs: 3_000, intervalMs: 5 });
  sim.secondaryMeta.map[0] = 0b1000; // a dirty extent there: the next connect writes our map
  let open = () => {};
  const gate = new Promise<void>((resolve) => (open = resolve));
  let gated = false;
  sim.primaryMeta.beforeWriteMap = async () => {
    if (gated) return;
    gated = true;
    await gate;
  };
  await waitFor("connecting, map write held", () => gated || undefined, { timeoutMs: 5_000, intervalMs: 5 });
  sim.primary.reconfigure({ ...sim.config(), replication: "async" }); // SIGHUP now
  open();
  const secondaryMode = () => (sim.secondary as unknown as { replication: string }).replication;
  await waitFor("connected with the new mode", () =>
    sim.primary.status().link === "connected" && secondaryMode() === "async" ? true : undefined,
  { timeoutMs: 10_000, intervalMs: 10 });
}, 30_000);

/** Runs the node of `disk`/`meta` as a primary with no reachable peer, writes at `offset`, stops. */
async function writeAloneAsPrimary(sim: Sim, disk: MemoryDisk, meta: MemoryMeta, offset: number, seed: number) {
  const m = meta.metadata;
  const activemap = new ActiveMap({
    extentCount: Math.ceil(m.datasizeBytes / m.extentsizeBytes), extentsizeBytes: m.extentsizeBytes,
    datasizeBytes: m.datasizeBytes, keepdirty: m.keepdirty, onDisk: meta.map,
  });
  const alone = new Primary({
    config: { ...sim.config(), remote: null }, data: disk, meta, activemap,
    network: { connect: async () => { throw new Error("unreachable"); } },
    clock: systemClock, hooks: { run: () => {} }, log: () => {},
  });
  alone.start();
  await alone.write(offset, pattern(4096, seed), false);
  await alone.flush();
  await alone.stop();
}

test("a node written as primary before the pair ever connected: its writes are synced from it", async () => {
  // Found by review: the pair said "both fresh" and complete while the copies differed.
  const sim = track(new Sim({ replication: "fullsync", keepdirty: 0 }));
  await writeAloneAsPrimary(sim, sim.secondaryDisk, sim.secondaryMeta, MIB, 3);
  sim.start();
  await inSync(sim, "synced from the secondary");
  expect(sim.logs.some((l) => l.includes("secondary written alone"))).toBe(true);
  expect(sim.primaryDisk.bytes.subarray(MIB, MIB + 4096)).toEqual(pattern(4096, 3));
  expect(Buffer.compare(sim.primaryDisk.bytes, sim.secondaryDisk.bytes)).toBe(0);
  // The pair goes on as any other: a write replicates, a reconnect finds it in step.
  await sim.primary.write(2 * MIB, pattern(4096, 4), false);
  await sim.restartPrimary();
  await inSync(sim, "reconnected");
  expect(sim.logs.filter((l) => l.includes("in step")).length).toBeGreaterThan(0);
  expect(Buffer.compare(sim.primaryDisk.bytes, sim.secondaryDisk.bytes)).toBe(0);
}, 30_000);

test("both nodes written as primary before the pair ever connected: split-brain, nothing overwritten", async () => {
  // Found by review: the secondary's writes were overwritten by a "fresh secondary" full sync.
  const sim = track(new Sim({ replication: "fullsync", keepdirty: 0 }));
  await writeAloneAsPrimary(sim, sim.secondaryDisk, sim.secondaryMeta, MIB, 3);
  await writeAloneAsPrimary(sim, sim.primaryDisk, sim.primaryMeta, 5 * MIB, 4);
  sim.start();
  await waitFor("split-brain", () => sim.primary.status().link === "split-brain" || undefined,
    { timeoutMs: 5_000, intervalMs: 10 });
  await Bun.sleep(200);
  expect(sim.secondaryDisk.bytes.subarray(MIB, MIB + 4096)).toEqual(pattern(4096, 3));
  expect(sim.primaryDisk.bytes.subarray(5 * MIB, 5 * MIB + 4096)).toEqual(pattern(4096, 4));
}, 30_000);

test("an answered write the secondary fails, whose count cannot be recorded, holds the link down till it is",
  async () => {
  // Found by review: the failed bump was only logged, the link stayed up, and a later promotion
  // of the secondary would have looked "in step" and synced its older copy over the write.
  const sim = await startPair({ replication: "memsync", keepdirty: 0, timeoutSeconds: 2 });
  const start = sim.primaryMeta.metadata.localcnt;
  let metaFails = true;
  sim.primaryMeta.beforeWrite = async (update) => {
    if (metaFails && update.localcnt !== undefined) throw eio("meta");
  };
  const failing = failSecondaryWrites(sim, 6 * MIB, 7 * MIB);
  await sim.primary.write(6 * MIB, pattern(4096, 5), false); // answered on the receipt
  await waitFor("link dropped", () => sim.logs.some((l) => l.includes("dropping the link until it is recorded")) ||
    undefined, { timeoutMs: 5_000, intervalMs: 5 });
  failing.stop();
  await Bun.sleep(1_500); // reconnect attempts fail while the generation cannot be counted
  expect(sim.primary.status().link).not.toBe("connected");
  metaFails = false;
  await inSync(sim, "counted, reconnected and resynced");
  expect(sim.primaryMeta.metadata.localcnt).toBe(start + 1n);
  expect(sim.secondaryDisk.bytes.subarray(6 * MIB, 6 * MIB + 4096)).toEqual(pattern(4096, 5));
}, 40_000);

test("a secondary whose copy is the target of an unfinished sync is refused as the sync source", async () => {
  const sim = track(new Sim({ replication: "fullsync", keepdirty: 0 }));
  const shared = { resuid: 77n, remotecnt: 1n };
  Object.assign(sim.primaryMeta.metadata, shared, { localcnt: 1n });
  // By the counters the primary is behind, but the secondary's copy is a stale sync target.
  Object.assign(sim.secondaryMeta.metadata, shared, { localcnt: 2n, syncTarget: true });
  sim.start();
  const error = await waitFor("refused", () => {
    const st = sim.primary.status();
    return st.linkError !== "" ? st.linkError : undefined;
  }, { timeoutMs: 5_000, intervalMs: 10 });
  expect(error).toContain("a sync to it never completed");
  expect(sim.primary.status().syncSource).toBe("primary");
}, 20_000);

// Found by review: Flush (and SyncDone) frames were outside the window, so behind a slow
// fdatasync a primary could queue any number on the secondary, each holding a task. The secondary
// now counts them, and the primary sends them within its window.
test("flushes are sent within the window: 300 behind a held flush never exceed it", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0 });
  let openFlushes = () => {};
  const held = new Promise<void>((resolve) => (openFlushes = resolve));
  sim.secondaryDisk.beforeFlush = () => held;
  const flushes = Array.from({ length: 300 }, () => sim.primary.flush());
  await Bun.sleep(300);
  const st = sim.primary.status();
  expect(st.link).toBe("connected");
  expect(st.remoteInFlight).toBeLessThanOrEqual(MAX_REMOTE_IN_FLIGHT);
  expect(st.remoteInFlight).toBeGreaterThan(MAX_REMOTE_IN_FLIGHT / 2);
  openFlushes();
  await Promise.all(flushes);
  expect(sim.logs.filter((l) => l.includes("protocol violation"))).toEqual([]);
  expect(sim.primary.status().link).toBe("connected");
}, 20_000);

test("the secondary's map merged at connect is on disk before a write lands, even when the connect fails", async () => {
  // Found by review: the merge set the bits in memory, the syncTarget write after it failed, and
  // persistMap after that was skipped. A write to a merged extent then found its bit set and wrote
  // no map: its data landed with the bit clear on disk, so a crash would forget the extent.
  const sim = track(new Sim({ replication: "fullsync", keepdirty: 0, timeoutSeconds: 2 }));
  makeNewer(sim, "secondary");
  sim.secondaryMeta.map[0] = 0b0100; // the secondary wrote extent 2 while it was primary
  let failed = false;
  sim.primaryMeta.beforeWrite = async (update) => {
    if (update.syncTarget !== true || failed) return;
    failed = true;
    sim.reachable = false; // no new connection until the write below is done
    throw eio("metadata write (injected)");
  };
  sim.start();
  await waitFor("the connect to fail after the merge", () => failed || undefined, { timeoutMs: 5_000, intervalMs: 5 });
  await waitFor("the link down", () => sim.primary.status().link !== "connected" || undefined,
    { timeoutMs: 5_000, intervalMs: 5 });
  const seen: { bitOnDiskAtWrite: boolean | null } = { bitOnDiskAtWrite: null };
  sim.primaryDisk.beforeWrite = async (offset) => {
    if (offset >= 2 * MIB && offset < 3 * MIB) seen.bitOnDiskAtWrite = (sim.primaryMeta.map[0]! & 0b0100) !== 0;
  };
  await sim.primary.write(2 * MIB, pattern(4096, 3), false).catch(() => {});
  expect(seen.bitOnDiskAtWrite).toBe(true);
});

// Found by review: after a connect that found the secondary's copy the newer one, the primary
// syncs from it until the end of that sync is recorded, also with nothing to copy. A verify
// started meanwhile marked its differences for a sync from the secondary (and reads of them came
// from there), while it logged "resyncing from this node".
test("a verify is refused until the end of a sync from the secondary is recorded; then it keeps this copy",
  async () => {
    const sim = track(new Sim({ replication: "fullsync", keepdirty: 0 }));
    // Newer counters on the secondary, an empty map: the sync from it has nothing to copy.
    makeNewer(sim, "secondary");
    sim.primaryDisk.bytes.fill(1, 5 * MIB, 6 * MIB);
    sim.secondaryDisk.bytes.fill(1, 5 * MIB, 6 * MIB);
    sim.secondaryDisk.bytes[5 * MIB + 7] = 0x55; // changed behind hast's back
    let recording = false;
    let recordEnd = () => {};
    const endGate = new Promise<void>((resolve) => (recordEnd = resolve));
    sim.primaryMeta.beforeWrite = async (update) => {
      if (update.syncTarget !== false) return;
      recording = true;
      await endGate;
    };
    try {
      sim.start();
      await waitFor("the end of the sync being recorded", () => recording || undefined,
        { timeoutMs: 5_000, intervalMs: 5 });
      expect(sim.primary.status().syncSource).toBe("secondary");
      expect(sim.primary.startVerify() ?? "started").toContain("syncing from its secondary");
    } finally {
      recordEnd();
    }
    await waitFor("the end recorded", () => sim.primary.status().syncSource === "primary" || undefined,
      { timeoutMs: 5_000, intervalMs: 5 });
    expect(sim.primary.startVerify()).toBeNull();
    const result = await waitFor("verify finished", () => {
      const v = sim.primary.status().verify;
      return v && v.state !== "running" ? v : undefined;
    }, { timeoutMs: 20_000, intervalMs: 10 });
    expect(result.differingExtentList).toEqual([5]);
    await inSync(sim, "resynced", 15_000);
    expect(sim.primaryDisk.bytes[5 * MIB + 7]).toBe(1); // this copy, which applications read, is kept
    expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
  }, 40_000);

// Found by review: a chunk that differed while writes to it were in flight was compared again at
// most 3 times, each after waiting at most 2 s for them to settle. A write the secondary failed
// after memsync answered it is marked for sync only once its generation is recorded: when that
// took more than 6 s, the verify reported the tracked failure as a silent difference.
test("memsync: a write the secondary fails is no verify difference, however long its count takes to record",
  async () => {
    const sim = await startPair({ replication: "memsync", keepdirty: 0 });
    let recordCount = () => {};
    const countGate = new Promise<void>((resolve) => (recordCount = resolve));
    sim.primaryMeta.beforeWrite = async (update) => {
      if (update.localcnt !== undefined) await countGate;
    };
    let failNext = true;
    sim.secondaryDisk.beforeWrite = async (offset) => {
      if (!failNext || offset !== 0) return;
      failNext = false;
      throw eio("write");
    };
    const finished = () => {
      const v = sim.primary.status().verify;
      return v && v.state !== "running" ? v : undefined;
    };
    try {
      await sim.primary.write(0, pattern(4096, 9), false); // answered on the receipt
      expect(sim.primary.startVerify()).toBeNull();
      // Held past the old limit (3 × 2 s): no verdict on extent 0 can come while it is unaccounted.
      const early = await waitFor("verify finished", finished, { timeoutMs: 8_000, intervalMs: 10 }).catch(() => null);
      expect(early).toBeNull();
    } finally {
      recordCount();
    }
    const result = await waitFor("verify finished", finished, { timeoutMs: 20_000, intervalMs: 10 });
    expect(result).toMatchObject({ state: "done", differingExtents: 0, skippedBytes: MIB });
    expect(sim.logs.filter((l) => l.includes("verify: extent"))).toEqual([]);
    await inSync(sim, "resynced", 15_000);
    expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
  }, 60_000);

// Found by review: a primary whose metadata says localWritesLost (a failed metadata or map write
// records it without failing a data flush) pushed its possibly older copy over the secondary's.
test("a primary whose disk may have lost writes does not sync its copy to the secondary", async () => {
  const sim = await startPair({ replication: "fullsync", keepdirty: 0 });
  await sim.primary.write(0, pattern(4096, 3), false);
  sim.reachable = false;
  expect(sim.dropLink("test: link reset")).toBe(true);
  await sim.primary.write(3 * MIB, pattern(4096, 5), false);
  expect(sim.primary.status().dirtyBytes).toBeGreaterThan(0);
  sim.primaryMeta.metadata = { ...sim.primaryMeta.metadata, localWritesLost: true };
  const before = Buffer.from(sim.secondaryDisk.bytes);
  sim.reachable = true;
  await waitFor("refused to sync", () => sim.logs.some((l) => l.includes("not syncing to the secondary")) || undefined,
    { timeoutMs: 10_000, intervalMs: 10 });
  expect(sim.primary.status().link).toBe("connected");
  expect(sim.primary.status().dirtyBytes).toBeGreaterThan(0);
  expect(Buffer.compare(sim.secondaryDisk.bytes, before)).toBe(0);
});
