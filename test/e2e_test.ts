/**
 * The HAST quick start, end to end, on two hosts made of network namespaces joined by a veth
 * pair: create, serve, secondary on b, primary on a; an ext4 file system made and filled through
 * a's NBD export (nbdfuse → loop → mkfs → mount); then the roles switch (a demoted first, then b
 * promoted) and b's export must hold a clean file system (e2fsck -n) with exactly the files
 * written, while both data areas are byte-identical. It proves this by running the whole story
 * twice: from source (`bun main.ts`) and with the binary compiled as package.json's build
 * script compiles it (HAST_BIN). Every process, mount, loop device and namespace is torn down in
 * `finally`, whether the story passes or not.
 */
import { expect, test } from "bun:test";
import { buildHastBinary, type Cluster, createCluster, type NodeName } from "./cluster.ts";
import {
  attachLoop, Cleanup, fsckClean, hashTree, makeTempDir, mkfsExt4, mountFs, nbdfuseMount, run,
  waitFor, writeTree,
} from "./harness.ts";

const MIB = 1024 * 1024;
/** Provider size per node: room for ext4 and the tree (about 4 MiB of files). */
const PROVIDER_BYTES = 96 * MIB;
const TREE_SEED = 0x4a57;
const TREE_FILES = 40;
/** One run of the story, including the build for the compiled run. */
const SCENARIO_TIMEOUT_MS = 110_000;
/** How much of each daemon log a failure message quotes. */
const LOG_TAIL_CHARS = 6_000;

test("quick start on two netns hosts, failover to b (from source)", async () => {
  await withHastBin(undefined, (cleanup) => quickStart(cleanup));
}, SCENARIO_TIMEOUT_MS);

test("quick start on two netns hosts, failover to b (compiled binary)", async () => {
  const cleanup = new Cleanup();
  try {
    const bin = await buildHastBinary(cleanup);
    await withHastBin(bin, (inner) => quickStart(inner));
  } finally {
    await cleanup.run();
  }
}, SCENARIO_TIMEOUT_MS);

/** Runs `body` with HAST_BIN set to `bin` (or unset), and a fresh Cleanup run afterwards. */
async function withHastBin(
  bin: string | undefined,
  body: (cleanup: Cleanup) => Promise<void>,
): Promise<void> {
  const saved = process.env.HAST_BIN;
  if (bin === undefined) delete process.env.HAST_BIN;
  else process.env.HAST_BIN = bin;
  const cleanup = new Cleanup();
  try {
    await body(cleanup);
  } finally {
    try {
      await cleanup.run();
    } finally {
      if (saved === undefined) delete process.env.HAST_BIN;
      else process.env.HAST_BIN = saved;
    }
  }
}

/** The story itself; everything it creates is registered with `cleanup`. */
async function quickStart(cleanup: Cleanup): Promise<void> {
  const c = await createCluster(cleanup, { netns: true, sizeBytes: PROVIDER_BYTES });
  try {
    await c.createBoth();
    await c.startDaemon("a");
    await c.startDaemon("b");
    await c.hast("b", ["role", "secondary", "data"]);
    await c.hast("a", ["role", "primary", "data"]);
    await waitReplicated(c, "a");

    const manifest = await fillFileSystem(cleanup, c);
    expect(manifest.size).toBe(TREE_FILES);
    await waitReplicated(c, "a");

    // HAST order for a switch-over: demote the old primary, then promote the new one.
    await c.hast("a", ["role", "secondary", "data"]);
    await c.hast("b", ["role", "primary", "data"]);
    const status = await waitReplicated(c, "b");
    expect(status.role).toBe("primary");
    expect(status.nbd).toBe(c.uri("b"));
    expect((await c.status("a")).role).toBe("secondary");
    await expectSameData(c);

    await checkFileSystem(cleanup, c, manifest);
    // Mounting on b wrote (superblock, journal): that must have reached a as well.
    await waitReplicated(c, "b");
    await expectSameData(c);
  } catch (error) {
    throw await withDaemonLogs(c, error);
  }
}

/**
 * On the primary `node`'s export: nbdfuse → loop → mkfs.ext4 → mount, write the tree, then tear
 * the whole stack down (umount flushes through loop and FUSE to NBD).
 * @returns the tree's manifest (path → sha256).
 */
async function fillFileSystem(cleanup: Cleanup, c: Cluster): Promise<Map<string, string>> {
  const stage = cleanup.child("file system stack on a");
  const { file } = await nbdfuseMount(stage, c.uri("a"));
  const dev = await attachLoop(stage, file);
  await mkfsExt4(dev);
  const mnt = await mountFs(stage, dev);
  const manifest = await writeTree(mnt, TREE_SEED, { files: TREE_FILES });
  await run(["sync", "-f", mnt]);
  await stage.run();
  return manifest;
}

/** On b's export, attached afresh: e2fsck -n clean, then mounted, the tree as written. */
async function checkFileSystem(
  cleanup: Cleanup, c: Cluster, manifest: Map<string, string>,
): Promise<void> {
  const stage = cleanup.child("file system stack on b");
  const { file } = await nbdfuseMount(stage, c.uri("b"));
  const dev = await attachLoop(stage, file);
  await fsckClean(dev);
  const mnt = await mountFs(stage, dev);
  expect([...(await hashTree(mnt))]).toEqual([...manifest]);
  await stage.run();
}

/** Waits until `node` (primary) is complete, has no dirty bytes and nothing in flight. */
async function waitReplicated(c: Cluster, node: NodeName): Promise<Record<string, any>> {
  const status = await c.waitStatus(node, `${node} complete and clean`,
    (s) => s.role === "primary" && s.status === "complete" && s.dirtyBytes === 0, 60_000);
  await waitFor(`no remote writes in flight on ${node}`, async () => {
    const list = JSON.parse((await c.hast(node, ["list", "--json"])).stdout).resources[0];
    return list.worker?.remoteInFlight === 0;
  });
  return status;
}

/** Both data areas byte for byte; reports the first differing offset on failure. */
async function expectSameData(c: Cluster): Promise<void> {
  const [onA, onB] = [await c.readData("a"), await c.readData("b")];
  expect(onB.byteLength).toBe(onA.byteLength);
  expect(firstDifference(onA, onB)).toBe(-1);
}

function firstDifference(left: Uint8Array, right: Uint8Array): number {
  const length = Math.min(left.byteLength, right.byteLength);
  if (Buffer.compare(Buffer.from(left.buffer, left.byteOffset, length),
    Buffer.from(right.buffer, right.byteOffset, length)) === 0) {
    return left.byteLength === right.byteLength ? -1 : length;
  }
  for (let i = 0; i < length; i++) if (left[i] !== right[i]) return i;
  return length;
}

/** The error with the tail of both daemons' logs appended (they vanish with the temp dir). */
async function withDaemonLogs(c: Cluster, error: unknown): Promise<Error> {
  const parts: string[] = [];
  for (const node of Object.values(c.nodes)) {
    const text = await Bun.file(node.log).text().catch(() => "(no log)");
    parts.push(`--- log of ${node.name} ---\n${text.slice(-LOG_TAIL_CHARS)}`);
  }
  const base = error instanceof Error ? error : new Error(String(error));
  base.message = `${base.message}\n${parts.join("\n")}`;
  return base;
}
