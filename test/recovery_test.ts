/**
 * Recovery scenarios (spec §4–§6, §10) on two hosts made of network namespaces joined by a veth
 * pair, with real daemons, real NBD clients (qemu-io, fio, nbdfuse + loop + ext4) and real
 * faults: a partition (veth down), SIGKILL of the primary's whole process group, SIGKILL of the
 * secondary's during 1 MiB writes, split-brain, a sync cut half-way, and a secondary whose disk
 * fails writes (nbdkit's error filter behind
 * nbdfuse + losetup). Each test proves that hast keeps serving, resyncs only what may differ,
 * and ends with byte-identical data areas.
 *
 * Devices are 64 MiB with 1 MiB extents and keepdirty 4, so a resync of "only what differs" is
 * easy to tell from a full one (64 extents). On failure the daemons' logs are quoted.
 */
import { expect, test } from "bun:test";
import { chmodSync, closeSync, existsSync, openSync, readFileSync, readSync } from "node:fs";
import { rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ACTIVEMAP_CLEAR_INTERVAL_MS } from "../lib/primary.ts";
import { SYNC_FLUSH_INTERVAL_MS, SYNC_WORKERS } from "../lib/synchronizer.ts";
import { type Cluster, type ClusterOptions, createCluster, type NodeName } from "./cluster.ts";
import {
  attachLoop, Cleanup, diskThatLosesWrites, expandRanges, fsckClean, hashTree, makeTempDir, mountFs, nbdfuseMount, run,
  spawnProcess, waitFor, writeTree,
} from "./harness.ts";
import { eio, inSync, makeNewer, pairPerTest, pattern, Sim } from "./sim.ts";

const MIB = 1024 * 1024;
const EXTENT_BYTES = MIB;
const KEEPDIRTY = 4;
const CREATE_ARGS = ["-e", "1M", "-k", String(KEEPDIRTY)];
const DEVICE_BYTES = 64 * MIB;
/** How much of each daemon log a failure message quotes. */
const LOG_TAIL_CHARS = 8_000;

type Status = Record<string, any>;

// ---------------------------------------------------------------------------------------------
// Helpers

/**
 * Runs one scenario with a fresh Cleanup; when it fails, the error message gets the tail of
 * every daemon log of the clusters it registered (they live in temp dirs removed on cleanup).
 */
async function scenario(body: (cleanup: Cleanup, clusters: Cluster[]) => Promise<void>) {
  const cleanup = new Cleanup();
  const clusters: Cluster[] = [];
  try {
    await body(cleanup, clusters);
  } catch (error) {
    const logs = clusters.flatMap((c) => Object.values(c.nodes).map((node) => {
      const text = existsSync(node.log) ? readFileSync(node.log, "utf8") : "(no log)";
      return `--- log of ${node.name} ---\n${text.slice(-LOG_TAIL_CHARS)}`;
    }));
    if (error instanceof Error) error.message += `\n${logs.join("\n")}`;
    throw error;
  } finally {
    await cleanup.run();
  }
}

/**
 * A netns cluster, created on both nodes, daemons running, b secondary and a primary, waited
 * until a reports the pair complete.
 */
async function startPair(
  cleanup: Cleanup, clusters: Cluster[], options: ClusterOptions = {},
): Promise<Cluster> {
  const c = await createCluster(cleanup, { netns: true, createArgs: CREATE_ARGS, ...options });
  clusters.push(c);
  await c.startPair();
  return c;
}

/**
 * Writes whole extents through a node's NBD export with qemu-io (one `write -P` per extent),
 * then flushes. Every write must succeed: qemu-io exits non-zero otherwise.
 */
async function writeExtents(c: Cluster, node: NodeName, extents: number[], pattern: number) {
  const commands = extents.flatMap((e) => ["-c", `write -P ${pattern} ${e * EXTENT_BYTES} 1M`]);
  await run(["qemu-io", "-f", "raw", c.uri(node), ...commands, "-c", "flush"], {
    timeoutMs: 60_000,
  });
}

/** True if every byte of extent `extent` of `data` equals `pattern`. */
function extentHolds(data: Uint8Array, extent: number, pattern: number): boolean {
  const slice = data.subarray(extent * EXTENT_BYTES, (extent + 1) * EXTENT_BYTES);
  return slice.every((byte) => byte === pattern);
}

/** Extents in which two data areas differ. */
function differingExtents(left: Uint8Array, right: Uint8Array): number[] {
  expect(left.byteLength).toBe(right.byteLength);
  const out: number[] = [];
  for (let at = 0; at < left.byteLength; at += EXTENT_BYTES) {
    const end = Math.min(left.byteLength, at + EXTENT_BYTES);
    if (Buffer.compare(left.subarray(at, end), right.subarray(at, end)) !== 0) {
      out.push(at / EXTENT_BYTES);
    }
  }
  return out;
}

/** Asserts both data areas are byte-identical (reporting the extents that differ if not). */
async function expectIdentical(c: Cluster): Promise<Uint8Array> {
  const onA = await c.readData("a");
  const onB = await c.readData("b");
  expect(differingExtents(onA, onB)).toEqual([]);
  return onA;
}

/** Waits until the primary on `node` is complete with nothing dirty; returns that status. */
function waitClean(c: Cluster, node: NodeName = "a", timeoutMs = 60_000): Promise<Status> {
  return c.waitStatus(node, "complete and clean",
    (s) => s.status === "complete" && s.dirtyBytes === 0 && s.sync?.state === "done", timeoutMs);
}

/** `hast list --json` of the resource on a node. */
async function list(c: Cluster, node: NodeName): Promise<Status> {
  return JSON.parse((await c.hast(node, ["list", "--json"])).stdout).resources[0];
}

/** SIGKILLs a node's daemon and its workers (one process group) and waits for both to go. */
async function killGroup(c: Cluster, node: NodeName): Promise<void> {
  const daemon = c.nodes[node].daemon;
  expect(daemon).not.toBeNull();
  const workerPid = (await list(c, node)).workerPid as number;
  expect(workerPid).toBeGreaterThan(0);
  // The worker keeps freed memory for reuse (lib/daemon.ts, WORKER_MIMALLOC_PURGE_DELAY).
  const environ = readFileSync(`/proc/${workerPid}/environ`, "utf8").split("\0");
  expect(environ).toContain("MIMALLOC_PURGE_DELAY=-1");
  daemon!.killGroup("SIGKILL");
  await daemon!.exited;
  c.nodes[node].daemon = null;
  await waitFor(`worker ${workerPid} gone`, () => !processAlive(workerPid), { timeoutMs: 10_000 });
}

/** True while `pid` exists and is not a zombie. */
function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

/**
 * Connections a node has opened so far: the kernel's TcpActiveOpens of its namespace. Only the
 * daemon's replication link opens TCP connections there (control, NBD and the CLI use Unix
 * sockets), so this counts the primary's connection attempts, refused ones included (both sides
 * log a refusal once a minute only).
 */
async function connectsFrom(c: Cluster, node: NodeName): Promise<number> {
  const snmp = (await run(["ip", "netns", "exec", c.nodes[node].ns!, "cat", "/proc/net/snmp"])).stdout;
  const [names, values] = snmp.split("\n").filter((l) => l.startsWith("Tcp:")).map((l) => l.trim().split(/\s+/));
  const at = names!.indexOf("ActiveOpens");
  expect(at).toBeGreaterThan(0);
  return Number(values![at]);
}

/**
 * Times a has tried to bring b up to date so far: connections it opened, plus sync passes of a
 * live link that ended interrupted. Each attempt starts only after the previous one ended, so
 * `count` more than a baseline means at least `count - 1` ended without success meanwhile.
 */
async function attemptsOfA(c: Cluster): Promise<number> {
  const interrupted = readFileSync(c.nodes.a.log, "utf8").split("\n").filter((l) => l.includes("sync interrupted"));
  return (await connectsFrom(c, "a")) + interrupted.length;
}

/** Waits (20 s at most) until attemptsOfA is `count` past `from`. */
async function waitForAttempts(c: Cluster, from: number, count: number, what: string): Promise<void> {
  await waitFor(`${count} more attempts of a (${what})`, async () => (await attemptsOfA(c)) >= from + count,
    { timeoutMs: 20_000 });
}

/** Reads `length` bytes at `offset` of a file or device. */
function readRange(path: string, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  const fd = openSync(path, "r");
  try {
    let done = 0;
    while (done < length) {
      const got = readSync(fd, out, done, length - done, offset + done);
      if (got === 0) throw new Error(`Cannot read "${path}": EOF at ${offset + done}`);
      done += got;
    }
  } finally {
    closeSync(fd);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Hooks

/** A hook script that appends "<netns> <args…>" to a log file, and a reader for that log. */
interface HookRecorder {
  program: string;
  /** Events recorded so far on a node, each as "event resource [args…]". */
  events(c: Cluster, node: NodeName): string[];
  /** Waits (default 20 s) until `node` recorded `line` at least `count` times. */
  waitFor(
    c: Cluster, node: NodeName, line: string, count?: number, timeoutMs?: number,
  ): Promise<void>;
}

/** Writes the hook script into a temp dir (removed on cleanup) and returns its recorder. */
async function hookRecorder(cleanup: Cleanup): Promise<HookRecorder> {
  const dir = await makeTempDir(cleanup, "hast-hook-");
  const program = join(dir, "hook.sh");
  const logPath = join(dir, "hooks.log");
  // exec is a resource setting shared by both nodes: the network namespace tells them apart.
  await writeFile(program, [
    "#!/bin/sh",
    "ns=$(ip netns identify $$ 2>/dev/null)",
    `printf '%s %s\\n' "$ns" "$*" >> ${logPath}`,
    "",
  ].join("\n"));
  chmodSync(program, 0o755);
  const events = (c: Cluster, node: NodeName): string[] => {
    if (!existsSync(logPath)) return [];
    const ns = c.nodes[node].ns!;
    return readFileSync(logPath, "utf8").split("\n")
      .filter((line) => line.startsWith(`${ns} `))
      .map((line) => line.slice(ns.length + 1));
  };
  return {
    program,
    events,
    waitFor: async (c, node, line, count = 1, timeoutMs = 20_000) => {
      try {
        await waitFor(`hook "${line}" ×${count} on ${node}`,
          () => events(c, node).filter((l) => l === line).length >= count, { timeoutMs });
      } catch (error) {
        throw new Error(`${(error as Error).message}; ${node} recorded ` +
          JSON.stringify(events(c, node)));
      }
    },
  };
}

/** Number of times `line` was recorded on a node. */
function countOf(recorder: HookRecorder, c: Cluster, node: NodeName, line: string): number {
  return recorder.events(c, node).filter((l) => l === line).length;
}

// ---------------------------------------------------------------------------------------------
// 1. Partition while a client writes

// Proves the primary keeps serving without its secondary and that the resync after the link
// heals copies only the extents written while apart: partition the veth, write 6 extents with
// qemu-io (which must succeed), check a reports degraded with those extents dirty, heal, and
// check the sync's total/done bytes stay within (6 + keepdirty) extents and the data areas end
// byte-identical.
test("partition: primary keeps serving, only dirty extents resync", async () => {
  await scenario(async (cleanup, clusters) => {
    const c = await startPair(cleanup, clusters);
    await writeExtents(c, "a", [0, 1, 2, 3], 0x11);
    await waitClean(c);
    await c.pair!.linkDown();
    const written = [3, 7, 8, 20, 41, 60];
    await writeExtents(c, "a", written, 0x5a);
    const apart = await c.status("a");
    expect(apart.status).toBe("degraded");
    expect(apart.dirtyBytes).toBeGreaterThanOrEqual(written.length * EXTENT_BYTES);
    // Nothing reached b while apart.
    const bApart = await c.readData("b");
    for (const e of written) expect(extentHolds(bApart, e, 0x5a)).toBe(false);
    await c.pair!.linkUp();
    const healed = await waitClean(c);
    const boundBytes = (written.length + KEEPDIRTY) * EXTENT_BYTES;
    expect(healed.sync.totalBytes).toBeGreaterThanOrEqual(written.length * EXTENT_BYTES);
    expect(healed.sync.totalBytes).toBeLessThanOrEqual(boundBytes);
    expect(healed.sync.doneBytes).toBeLessThanOrEqual(boundBytes);
    const data = await expectIdentical(c);
    for (const e of written) expect(extentHolds(data, e, 0x5a)).toBe(true);
    for (const e of [0, 1, 2]) expect(extentHolds(data, e, 0x11)).toBe(true);
  });
}, 90_000);

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL of the primary during writes

const FS_BYTES = 32 * MIB;
const FIO_DEPTH = 4;

/** Makes an ext4 file system in the first 32 MiB of a's export, fills it, and unmounts it. */
async function makeFileSystem(cleanup: Cleanup, c: Cluster): Promise<Map<string, string>> {
  const stage = cleanup.child("file system on a's export");
  const { file } = await nbdfuseMount(stage, c.uri("a"));
  const dev = await attachLoop(stage, file);
  await run(["mkfs.ext4", "-F", "-q", dev, `${FS_BYTES / 1024}k`], { timeoutMs: 120_000 });
  const mnt = await mountFs(stage, dev);
  const manifest = await writeTree(mnt, 0x5eed, { files: 30 });
  await stage.run();
  return manifest;
}

/** Mounts a's export afresh: e2fsck -n must be clean and the files must match `manifest`. */
async function checkFileSystem(cleanup: Cleanup, c: Cluster, manifest: Map<string, string>) {
  const stage = cleanup.child("check file system on a's export");
  const { file } = await nbdfuseMount(stage, c.uri("a"));
  const dev = await attachLoop(stage, file);
  await fsckClean(dev);
  const mnt = await mountFs(stage, dev, { readOnly: true });
  expect(await hashTree(mnt)).toEqual(manifest);
  await stage.run();
}

// Proves a crash of the primary (daemon and worker SIGKILLed as one process group while fio
// writes to the second half of the device) loses nothing: after a restart the extents set in
// the on-disk map are resynced, and they are all in fio's half (the file system's half, idle
// for more than two clear rounds, was cleared), the data areas end byte-identical, and an
// ext4 made and filled in the first half before the crash passes e2fsck -n and holds the same
// files.
test("SIGKILL of the primary's process group: crash-dirty extents resync", async () => {
  await scenario(async (cleanup, clusters) => {
    const c = await startPair(cleanup, clusters);
    const manifest = await makeFileSystem(cleanup, c);
    await waitClean(c);
    const fio = spawnProcess(cleanup, ["fio", "--name=crash", "--ioengine=nbd",
      `--uri=${c.uri("a")}`, "--rw=randwrite", "--bs=64k", `--offset=${FS_BYTES}`, `--size=${DEVICE_BYTES - FS_BYTES}`,
      `--iodepth=${FIO_DEPTH}`, "--time_based", "--runtime=60"]);
    const before = (await list(c, "a")).worker.counters.writes as number;
    const fioStarted = performance.now();
    await waitFor("fio writing for more than two clear rounds", async () => {
      if (fio.hasExited()) throw new Error(`fio exited early: ${await fio.readLog()}`);
      return (await list(c, "a")).worker.counters.writes > before + 200 &&
        performance.now() - fioStarted > 2 * ACTIVEMAP_CLEAR_INTERVAL_MS + 1000;
    }, { timeoutMs: 20_000 });
    await killGroup(c, "a");
    await waitFor("fio to fail", () => fio.hasExited(), { timeoutMs: 20_000 });
    const crashed = await c.dump("a");
    const dirty = expandRanges(crashed.dirtyExtentList);
    const fioExtents = { first: FS_BYTES / EXTENT_BYTES, count: (DEVICE_BYTES - FS_BYTES) / EXTENT_BYTES };
    expect(dirty.length).toBeGreaterThan(0);
    expect(dirty.length).toBe(crashed.dirtyExtents);
    expect(dirty.filter((e) => e < fioExtents.first)).toEqual([]);
    await c.startDaemon("a");
    await c.hast("a", ["role", "primary", "data"]);
    const healed = await waitClean(c);
    expect(healed.sync.totalBytes).toBeGreaterThan(0);
    expect(healed.sync.totalBytes).toBeLessThanOrEqual(dirty.length * EXTENT_BYTES);
    expect(healed.sync.doneBytes).toBeLessThanOrEqual(fioExtents.count * EXTENT_BYTES);
    await expectIdentical(c);
    await checkFileSystem(cleanup, c, manifest);
  });
}, 120_000);

// Proves the primary's request slots survive the secondary's death mid-stream: async mode with
// the codec threads on (so frames are queued in the socket, on a thread or awaiting replies when
// the peer dies), SIGKILL of b's daemon and worker while fio writes 1 MiB blocks. The
// application sees no error, every slot comes back once the dead connection is gone (a slot
// still counted in use would be one the link never released), and b resyncs to identical.
test("SIGKILL of the secondary during 1 MiB writes: no error, every request slot back, resync", async () => {
  await scenario(async (cleanup, clusters) => {
    const c = await startPair(cleanup, clusters, {
      replication: "async", resourceLines: ["compression lz4", "checksum sha256", "pipeline on"],
    });
    const fio = spawnProcess(cleanup, ["fio", "--name=peerdeath", "--ioengine=nbd", `--uri=${c.uri("a")}`,
      "--rw=write", "--bs=1m", "--iodepth=8", `--size=${DEVICE_BYTES}`, "--time_based", "--runtime=6"]);
    const before = (await list(c, "a")).worker.writeBuffers.taken as number;
    await waitFor("fio writing through request slots", async () => {
      if (fio.hasExited()) throw new Error(`fio exited early: ${await fio.readLog()}`);
      return (await list(c, "a")).worker.writeBuffers.taken > before + 100;
    }, { timeoutMs: 20_000 });
    await killGroup(c, "b");
    await c.waitStatus("a", "degraded", (s) => s.status === "degraded", 20_000);
    expect(await fio.exited).toBe(0); // every write succeeded, before and after b died
    const slots = await waitFor("every request slot back", async () => {
      const w = (await list(c, "a")).worker.writeBuffers;
      return w.inUse === 0 ? w : undefined;
    }, { timeoutMs: 10_000 });
    expect(slots.taken).toBeGreaterThan(slots.slots); // slots were reused, after b died as well
    expect((await list(c, "a")).worker.pipeline.encodedInPlace).toBeGreaterThan(0);
    await c.startDaemon("b");
    await c.hast("b", ["role", "secondary", "data"]);
    await waitClean(c);
    await expectIdentical(c);
  });
}, 90_000);

// ---------------------------------------------------------------------------------------------
// 3. Split-brain

// Proves split-brain is detected and healed only on the operator's word: partition, promote b
// too, write different extents on each side, demote b and heal; both sides must report
// split-brain (status and hook) and keep their own data; then `role init; discard; role
// secondary` on b makes a resync only the union of the extents written on either side (not the
// device) and b ends byte-identical to a, whose data is unchanged.
test("split-brain: detected on both sides, discard on b resyncs only what differs", async () => {
  await scenario(async (cleanup, clusters) => {
    const hooks = await hookRecorder(cleanup);
    const c = await startPair(cleanup, clusters, { resourceLines: [`exec ${hooks.program}`] });
    await writeExtents(c, "a", [0, 1, 2, 3], 0x11);
    await waitClean(c);
    await c.pair!.linkDown();
    const onA = [5, 6, 10];
    const onB = [10, 12, 13];
    await writeExtents(c, "a", onA, 0xaa);
    await c.hast("b", ["role", "primary", "data"]);
    await c.waitStatus("b", "b serving", (s) => s.role === "primary" && s.nbd !== null);
    await writeExtents(c, "b", onB, 0xbb);
    const beforeA = await c.readData("a");
    const beforeB = await c.readData("b");
    // The cluster manager demotes b before the link comes back; the peers then meet.
    await c.hast("b", ["role", "secondary", "data"]);
    await c.pair!.linkUp();
    await c.waitStatus("a", "split-brain on a", (s) => s.status === "split-brain", 30_000);
    await c.waitStatus("b", "split-brain on b", (s) => s.status === "split-brain", 30_000);
    await hooks.waitFor(c, "a", "split-brain data");
    await hooks.waitFor(c, "b", "split-brain data");
    // a keeps trying to connect (every RECONNECT_INTERVAL_MS): each attempt must end refused,
    // never in a sync. Three more attempts: at least two were refused after the first one.
    await waitForAttempts(c, await attemptsOfA(c), 3, "reconnecting while split-brain");
    expect((await c.status("a")).status).toBe("split-brain");
    expect(differingExtents(await c.readData("a"), beforeA)).toEqual([]);
    expect(differingExtents(await c.readData("b"), beforeB)).toEqual([]);
    expect(extentHolds(beforeB, 12, 0xbb) && extentHolds(beforeB, 5, 0x00)).toBe(true);
    // The documented recovery: discard b's changes.
    await c.hast("b", ["role", "init", "data"]);
    await c.hast("b", ["discard", "data"]);
    await c.hast("b", ["role", "secondary", "data"]);
    const healed = await waitClean(c);
    const union = new Set([...onA, ...onB]).size;
    expect(healed.sync.totalBytes).toBeGreaterThanOrEqual(union * EXTENT_BYTES);
    expect(healed.sync.totalBytes).toBeLessThanOrEqual((union + KEEPDIRTY) * EXTENT_BYTES);
    const data = await expectIdentical(c);
    expect(differingExtents(data, beforeA)).toEqual([]);
    await c.waitStatus("b", "b complete", (s) => s.status === "complete");
  });
}, 120_000);

// ---------------------------------------------------------------------------------------------
// 4. A sync cut half-way resumes

// Proves an interrupted sync resumes instead of starting over: 12 extents are written while
// apart, the sync runs at 2 MiB/s and is cut by a second partition once a few extents are done;
// after healing, the bytes synced by both runs together stay within the dirty set plus one
// extent per sync worker, the second run's total is smaller than the dirty set, and the data
// areas end byte-identical.
test("sync interrupted by a partition resumes without redoing finished extents", async () => {
  await scenario(async (cleanup, clusters) => {
    const c = await startPair(cleanup, clusters);
    await c.pair!.linkDown();
    const written = Array.from({ length: 12 }, (_, i) => 2 + i * 5);
    await writeExtents(c, "a", written, 0x77);
    const dirtyBytes = (await c.status("a")).dirtyBytes as number;
    expect(dirtyBytes).toBe(written.length * EXTENT_BYTES);
    const rateBytesPerSecond = 2 * MIB;
    await c.hast("a", ["syncrate", "2M", "data"]);
    await c.pair!.linkUp();
    // Extents are clean once a flush of the secondary covers them (at least once a second).
    await c.waitStatus("a", "first sync under way", (s) =>
      s.sync?.state === "running" && s.dirtyBytes <= dirtyBytes - 3 * EXTENT_BYTES, 30_000);
    await c.pair!.linkDown();
    const cut = await c.waitStatus("a", "first sync interrupted",
      (s) => s.sync?.state === "interrupted", 30_000);
    expect(cut.sync.totalBytes).toBe(dirtyBytes);
    expect(cut.sync.doneBytes).toBeLessThan(dirtyBytes);
    expect(cut.dirtyBytes).toBeLessThan(dirtyBytes);
    await c.hast("a", ["syncrate", "16M", "data"]);
    await c.pair!.linkUp();
    const healed = await waitClean(c);
    expect(healed.sync.totalBytes).toBeLessThanOrEqual(cut.dirtyBytes);
    expect(healed.sync.totalBytes).toBeLessThan(dirtyBytes);
    // Redone at most: the extents being copied at the cut, and those copied since the
    // last flush (one flush interval's worth at the rate limit).
    const unflushedBytes = Math.ceil(rateBytesPerSecond * SYNC_FLUSH_INTERVAL_MS / 1000 / EXTENT_BYTES) *
      EXTENT_BYTES;
    const syncedBytes = cut.sync.doneBytes + healed.sync.doneBytes;
    expect(syncedBytes).toBeLessThanOrEqual(dirtyBytes + SYNC_WORKERS * EXTENT_BYTES + unflushedBytes);
    const data = await expectIdentical(c);
    for (const e of written) expect(extentHolds(data, e, 0x77)).toBe(true);
  });
}, 120_000);

// ---------------------------------------------------------------------------------------------
// 5. The secondary's disk fails writes

/**
 * A 64 MiB file served by nbdkit with the error filter (every write and zero fails with EIO
 * while `trigger` exists), presented through nbdfuse and attached to a loop device.
 */
async function failingDisk(cleanup: Cleanup) {
  const dir = await makeTempDir(cleanup, "hast-errdisk-");
  const backing = join(dir, "disk.img");
  const socket = join(dir, "nbdkit.sock");
  const trigger = join(dir, "fail");
  await run(["truncate", "-s", String(DEVICE_BYTES), backing]);
  const nbdkit = spawnProcess(cleanup, ["nbdkit", "-f", "-U", socket, "--filter=error", "file",
    `file=${backing}`, "error=EIO",
    "error-pwrite-rate=1", `error-pwrite-file=${trigger}`,
    "error-zero-rate=1", `error-zero-file=${trigger}`,
    "error-trim-rate=1", `error-trim-file=${trigger}`]);
  await waitFor("nbdkit socket", async () => {
    if (nbdkit.hasExited()) throw new Error(`nbdkit exited: ${await nbdkit.readLog()}`);
    return existsSync(socket);
  });
  const { file } = await nbdfuseMount(cleanup, `nbd+unix:///?socket=${socket}`);
  const dev = await attachLoop(cleanup, file);
  return { backing, dev, trigger };
}

// Proves a secondary whose disk fails writes costs no data: with nbdkit's error filter under
// b's loop device, errors are switched on while a client writes and flushes through a; a keeps
// serving, the extents stay dirty and status is not complete (also across a's periodic sync
// retries); once errors are switched off the pair recovers and the backing file behind b's loop
// device (not b's page cache, which may hold data the disk refused) holds exactly a's data.
// (a's retries are counted, not slept through: see attemptsOfA.)
// Mid-test findings are collected so that the final comparison is reported too.
test("secondary disk fails writes: extents stay dirty, recovery after the disk heals", async () => {
  await scenario(async (cleanup, clusters) => {
    const problems: string[] = [];
    const disk = await failingDisk(cleanup);
    const c = await startPair(cleanup, clusters, { localOverride: { b: disk.dev } });
    await writeExtents(c, "a", [0, 1], 0x11);
    await waitClean(c);
    await writeFile(disk.trigger, "");
    const written = [4, 9, 30];
    await writeExtents(c, "a", written, 0xe0);
    const failing = await c.waitStatus("a", "extents dirty while b's disk fails",
      (s) => s.dirtyBytes > 0, 20_000);
    expect(failing.status).not.toBe("complete");
    // a keeps trying: b drops the link once its flush fails and then refuses it while it cannot
    // write its metadata (or, with the link up, a's sync passes fail every RESYNC_RETRY_MS).
    // Three more attempts: at least two failed after the first one, and the extents stay dirty.
    await waitForAttempts(c, await attemptsOfA(c), 3, "while b's disk fails");
    const still = await c.status("a");
    if (still.dirtyBytes < written.length * EXTENT_BYTES || still.status === "complete") {
      problems.push(`while b's disk fails: status ${still.status}, dirtyBytes ` +
        `${still.dirtyBytes} (expected >= ${written.length * EXTENT_BYTES})`);
    }
    await rm(disk.trigger);
    await waitClean(c, "a", 60_000);
    await writeExtents(c, "a", [50], 0x22); // ends with a flush through to nbdkit
    await waitClean(c);
    const dump = await c.dump("b");
    const onA = await c.readData("a");
    const onDisk = readRange(disk.backing, dump.dataOffsetBytes, dump.datasizeBytes);
    const differing = differingExtents(onA, onDisk);
    if (differing.length > 0) {
      const cached = differingExtents(onA, await c.readData("b"));
      problems.push(`after recovery (a complete, clean) b's disk differs from a in extents ` +
        `${JSON.stringify(differing)}; read through b's loop device: ${JSON.stringify(cached)}`);
    }
    expect(problems).toEqual([]);
    for (const e of written) expect(extentHolds(onDisk, e, 0xe0)).toBe(true);
  });
}, 120_000);

// ---------------------------------------------------------------------------------------------
// 5b. The primary's disk loses cached writes

// Proves a primary whose disk drops cached writes never spreads its older data: a's disk is a
// loop device over a sparse file on a 4 MiB tmpfs, so once the tmpfs is full its writeback fails
// and fdatasync reports EIO, as a failing disk does. The client's flush fails; a records in its
// metadata that writes may be lost; a restart as primary is refused (it would resync a's older
// data over b's). Failing over instead (b primary, a secondary, once a's disk has room again)
// resyncs a from b, clears the record, and both copies hold what the client wrote.
test("primary disk loses cached writes: promotion refused, failover resyncs it from the peer", async () => {
  await scenario(async (cleanup, clusters) => {
    // Room for the metadata and one extent: a's disk then fails the writeback of any 1 MiB more.
    const disk = await diskThatLosesWrites(cleanup, DEVICE_BYTES, 2 * MIB);
    const dev = disk.dev;
    const c = await startPair(cleanup, clusters, { replication: "fullsync", localOverride: { a: dev } });
    await writeExtents(c, "a", [0], 0x11);
    await waitClean(c);
    const written = [10, 11, 12, 13, 14, 15];
    const commands = written.flatMap((e) => ["-c", `write -P 0x5a ${e * EXTENT_BYTES} 1M`]);
    const client = await run(["qemu-io", "-f", "raw", c.uri("a"), ...commands, "-c", "flush"],
      { timeoutMs: 60_000, allowFailure: true });
    expect(`${client.stdout}${client.stderr}`).toMatch(/flush failed|Input\/output error/i);
    // Writes answered with success; the others failed (EIO) and may hold either data.
    const acknowledged = [...client.stdout.matchAll(/wrote 1048576\/1048576 bytes at offset (\d+)/g)]
      .map((m) => Number(m[1]) / EXTENT_BYTES);
    expect(acknowledged.length).toBeGreaterThan(0);
    const failed = await list(c, "a");
    expect(String(failed.worker?.localFlushFailure ?? "")).toContain("EIO");
    expect((await c.dump("a")).localWritesLost).toBe(true);
    const shown = await c.status("a");
    expect(shown.status).toBe("degraded");
    expect(shown.localError).toMatch(/flush of the local disk failed .*fail over/);
    // A cluster manager's health check says so too (README, keepalived).
    const check = await c.hast("a", ["promotable", "data"], { allowFailure: true });
    expect([check.code, check.stdout]).toEqual([1, expect.stringMatching(/^data: not promotable: a flush/)]);

    await c.hast("a", ["role", "init", "data"]);
    // The premise: a's disk really lacks some of what the client wrote (read past the cache).
    await run(["blockdev", "--flushbufs", dev]);
    const onDisk = await c.readData("a");
    expect(acknowledged.filter((e) => !extentHolds(onDisk, e, 0x5a)).length).toBeGreaterThan(0);
    const refused = await c.hast("a", ["role", "primary", "data"], { allowFailure: true });
    expect(refused.code).toBe(65);
    expect(refused.stderr).toMatch(/write or flush of its disk failed/);
    expect(refused.stderr).toMatch(/--force/);
    expect((await c.status("a")).role).toBe("init");

    await disk.resize(2 * DEVICE_BYTES); // the disk is replaced or has room again
    await c.hast("b", ["role", "primary", "data"]);
    // Writeback of a's last writes may have failed after its last flush. The kernel reports such
    // an error to the next flush of whoever opens the disk, so a's first start may fail on it;
    // an operator (or a cluster manager) repeats the command, as for any I/O error.
    const first = await c.hast("a", ["role", "secondary", "data"], { allowFailure: true });
    if (first.code !== 0) {
      expect(first.stderr).toMatch(/Cannot flush provider .*EIO/);
      await c.hast("a", ["role", "secondary", "data"]);
    }
    await waitClean(c, "b");
    const dump = await c.dump("a");
    expect(dump.localWritesLost).toBe(false);
    expect(dump.syncTarget).toBe(false);
    const data = await expectIdentical(c);
    for (const e of acknowledged) expect(extentHolds(data, e, 0x5a)).toBe(true);
    expect(extentHolds(data, 0, 0x11)).toBe(true);
  });
}, 120_000);

// ---------------------------------------------------------------------------------------------
// 6. Hooks

/** Time the secondary may take to notice a dead link: `timeout 5`, plus keepalive slack. */
const SECONDARY_LINK_TIMEOUT_MS = 12_000;

/**
 * After a partition: b must notice the dead link by itself (no traffic reaches it), fire
 * `disconnect` once more than `before`, and stop reporting itself complete. Failures are
 * collected in `late` so the rest of the scenario still runs.
 */
async function expectSecondaryNoticesPartition(
  c: Cluster, hooks: HookRecorder, before: number, late: string[],
): Promise<void> {
  try {
    await hooks.waitFor(c, "b", "disconnect data", before + 1, SECONDARY_LINK_TIMEOUT_MS);
    expect((await c.status("b")).status).toBe("degraded");
  } catch (error) {
    late.push((error as Error).message);
  }
}

// Proves every hook event arrives, on the right node, with the right arguments: role changes on
// both nodes, connect and disconnect on both sides of a partition (b, which gets no traffic, must
// notice by its own timeout), syncstart + syncintr when a sync is cut by a second partition,
// syncstart + syncdone when it completes, and no sync events for the first connect of two fresh
// nodes (nothing to sync). split-brain is covered above.
test("hooks: role, connect, disconnect, syncstart, syncintr, syncdone", async () => {
  await scenario(async (cleanup, clusters) => {
    const hooks = await hookRecorder(cleanup);
    const late: string[] = [];
    const c = await startPair(cleanup, clusters, { resourceLines: [`exec ${hooks.program}`] });
    await hooks.waitFor(c, "b", "role data init secondary");
    await hooks.waitFor(c, "a", "role data init primary");
    await hooks.waitFor(c, "a", "connect data");
    await hooks.waitFor(c, "b", "connect data");
    expect(countOf(hooks, c, "a", "syncstart data")).toBe(0);
    expect(countOf(hooks, c, "a", "syncdone data")).toBe(0);
    await c.pair!.linkDown();
    let bDisconnects = countOf(hooks, c, "b", "disconnect data");
    await writeExtents(c, "a", [3, 9, 15, 21, 27, 33], 0x44);
    await hooks.waitFor(c, "a", "disconnect data");
    await expectSecondaryNoticesPartition(c, hooks, bDisconnects, late);
    await c.hast("a", ["syncrate", "1M", "data"]);
    await c.pair!.linkUp();
    await hooks.waitFor(c, "a", "connect data", 2);
    await hooks.waitFor(c, "b", "connect data", 2);
    await hooks.waitFor(c, "a", "syncstart data");
    await c.waitStatus("a", "sync under way", (s) =>
      s.sync?.state === "running" && s.sync.doneBytes >= EXTENT_BYTES, 30_000);
    bDisconnects = countOf(hooks, c, "b", "disconnect data");
    await c.pair!.linkDown();
    await hooks.waitFor(c, "a", "syncintr data");
    await hooks.waitFor(c, "a", "disconnect data", 2);
    await expectSecondaryNoticesPartition(c, hooks, bDisconnects, late);
    expect(countOf(hooks, c, "a", "syncdone data")).toBe(0);
    await c.hast("a", ["syncrate", "0", "data"]);
    await c.pair!.linkUp();
    await waitClean(c);
    await hooks.waitFor(c, "a", "syncstart data", 2);
    await hooks.waitFor(c, "a", "syncdone data");
    await hooks.waitFor(c, "a", "connect data", 3);
    await hooks.waitFor(c, "b", "connect data", 3);
    await c.hast("a", ["role", "init", "data"]);
    await c.hast("b", ["role", "init", "data"]);
    await hooks.waitFor(c, "a", "role data primary init");
    await hooks.waitFor(c, "b", "role data secondary init");
    // Sync events come from the primary only.
    for (const e of ["syncstart data", "syncdone data", "syncintr data"]) {
      expect(countOf(hooks, c, "b", e)).toBe(0);
    }
    await expectIdentical(c);
    expect(late).toEqual([]);
  });
}, 120_000);

// ---------------------------------------------------------------------------------------------
// 7. A disk error on the primary during a sync (in process, test/sim.ts)

/** A pair per test of this section, stopped after it (the sections above use none). */
const sims = pairPerTest();

/** Waits until the primary's current sync has stopped in `state`, and returns its progress. */
function syncEnded(sim: Sim, state: "done" | "interrupted", timeoutMs = 10_000) {
  return waitFor(`sync ${state}`, () => {
    const sync = sim.primary.status().sync;
    return sync?.state === state ? sync : undefined;
  }, { timeoutMs, intervalMs: 5 });
}

/** The primary's sync hook events, in order. */
const syncEvents = (sim: Sim) => sim.events.filter((e) => e.startsWith("primary sync"));

// Found by review: a read error on the sync source (here the primary's disk) failed the whole
// sync: "sync failed" in the log, state "interrupted" with no reason, and syncstart never followed
// by syncintr. Proves it now counts as a failed chunk: two extents are written while apart, the
// primary's disk fails reads when the link comes back; the extents stay dirty, the status says
// which read failed, syncintr follows syncstart; once the disk reads again the periodic retry
// completes the sync (syncdone) and the copies are identical.
test("a read error on the sync source: extents stay dirty, syncintr, the status says why, then resync", async () => {
  const sim = await sims.startPair({ replication: "fullsync", keepdirty: 0 });
  sim.reachable = false;
  sim.dropLink("test: partition");
  for (const e of [2, 5]) await sim.primary.write(e * MIB, pattern(MIB, e), false);
  sim.primaryDisk.readError = eio("read");
  sim.reachable = true;
  const cut = await syncEnded(sim, "interrupted");
  expect(cut.error).toMatch(/^sync read at \d+\+\d+ failed on primary \(source\): EIO/);
  expect(cut.doneBytes).toBe(0);
  expect(sim.primary.status().dirtyBytes).toBe(2 * MIB);
  expect(syncEvents(sim)).toEqual(["primary syncstart", "primary syncintr"]);
  expect(sim.logs.filter((l) => l.includes("sync failed"))).toEqual([]);
  sim.primaryDisk.readError = null;
  await inSync(sim, "resynced after the disk healed", 15_000);
  expect(syncEvents(sim)).toEqual(["primary syncstart", "primary syncintr", "primary syncstart", "primary syncdone"]);
  expect(sim.primary.status().sync).toMatchObject({ state: "done", error: null, doneBytes: 2 * MIB });
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
}, 30_000);

// Found by review, as above, for a sync from the secondary: a failed write of the pulled data to
// the primary's disk (the sync target) failed the whole sync without syncintr or a reason. Proves
// the extents stay to be synced (and reads of them still come from the secondary), syncintr
// follows syncstart, the status names the failed write, and the retry completes the sync.
test("a write error on the sync target (sync from the secondary): extents stay behind, syncintr, resync", async () => {
  const sim = sims.track(new Sim({ replication: "fullsync", keepdirty: 0 }));
  // The secondary was primary meanwhile and wrote extents 2 and 3 (the counters say so).
  makeNewer(sim, "secondary");
  sim.secondaryMeta.map[0] = 0b1100;
  sim.secondaryDisk.bytes.fill(9, 2 * MIB, 4 * MIB);
  sim.primaryDisk.bytes.fill(1, 2 * MIB, 4 * MIB);
  sim.primaryDisk.beforeWrite = async () => {
    throw eio("write");
  };
  sim.start();
  const cut = await syncEnded(sim, "interrupted");
  expect(sim.primary.status().syncSource).toBe("secondary");
  expect(cut.error).toMatch(/^sync write at \d+\+\d+ failed on primary \(target\): EIO/);
  expect(sim.primary.status().dirtyBytes).toBe(2 * MIB);
  expect(syncEvents(sim)).toEqual(["primary syncstart", "primary syncintr"]);
  expect(await sim.primary.read(3 * MIB, 4096)).toEqual(new Uint8Array(4096).fill(9)); // from the secondary
  sim.primaryDisk.beforeWrite = async () => {};
  await inSync(sim, "synced from the secondary", 15_000);
  expect(syncEvents(sim).slice(-2)).toEqual(["primary syncstart", "primary syncdone"]);
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
}, 30_000);

// Found by review, as above: any other failure that ends a sync (here the metadata write that
// records its end fails as the link drops) left syncstart without syncintr. Proves syncintr
// follows, the status names the failure, and the next connection ends the sync (nothing is left
// to copy, so without sync hooks).
test("a sync that fails as it ends: syncintr follows syncstart, the next connection completes it", async () => {
  const sim = await sims.startPair({ replication: "fullsync", keepdirty: 0 });
  sim.reachable = false;
  sim.dropLink("test: partition");
  await sim.primary.write(3 * MIB, pattern(MIB, 3), false);
  sim.primaryMeta.beforeWrite = async (update) => {
    if (update.remotecnt === undefined) return;
    sim.primaryMeta.beforeWrite = async () => {};
    sim.dropLink("test: link lost as the sync ends");
    throw eio("write");
  };
  sim.reachable = true;
  const cut = await syncEnded(sim, "interrupted");
  expect(cut.error).toContain("EIO");
  expect(syncEvents(sim)).toEqual(["primary syncstart", "primary syncintr"]);
  await inSync(sim, "sync ended by the next connection", 15_000);
  expect(syncEvents(sim)).toEqual(["primary syncstart", "primary syncintr"]);
  expect(Buffer.compare(sim.secondaryDisk.bytes, sim.primaryDisk.bytes)).toBe(0);
}, 30_000);
