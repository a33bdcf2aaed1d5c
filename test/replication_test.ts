/**
 * Replication over loopback with two real daemons: data written through the
 * primary's NBD export with nbdcopy appears byte-identical in the secondary's
 * data area in every mode, with the codecs on the event loop or on the codec
 * threads (also in the compiled binary), and status reports the pair complete. The large
 * writes are received into reused buffers on both sides.
 */
import { expect, test } from "bun:test";
import { availableParallelism } from "node:os";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildHastBinary, createCluster } from "./cluster.ts";
import { Cleanup, run, waitFor } from "./harness.ts";

interface Case {
  replication: "fullsync" | "memsync" | "async";
  codec: string[];
  /** The codec threads should carry the large writes (pipeline on and a checksum or lz4). */
  threaded: boolean;
  /** Run the compiled binary (its codec threads are an extra entry point of the build). */
  compiled?: boolean;
}

const CASES: Case[] = [
  { replication: "fullsync", codec: ["compression none", "checksum none"], threaded: false },
  { replication: "memsync", codec: ["compression lz4", "checksum sha256", "pipeline on"], threaded: true },
  { replication: "async", codec: ["compression hole", "checksum crc32", "pipeline on"], threaded: true },
  { replication: "fullsync", codec: ["compression lz4", "checksum sha256", "pipeline off"], threaded: false },
  { replication: "fullsync", codec: ["compression lz4", "checksum crc32", "pipeline on"], threaded: true,
    compiled: true },
  // The default is `pipeline auto`: threads only with 3 cores or more.
  { replication: "memsync", codec: ["compression lz4", "checksum crc32"], threaded: availableParallelism() >= 3 },
];

test.each(CASES)("nbdcopy through the primary lands byte-identical on the secondary (%o)", async (c0) => {
  const cleanup = new Cleanup();
  const savedBin = process.env.HAST_BIN;
  try {
    if (c0.compiled) process.env.HAST_BIN = await buildHastBinary(cleanup);
    const c = await createCluster(cleanup, { replication: c0.replication, resourceLines: [...c0.codec] });
    const status = await c.startPair();
    expect(status.nbd).toBe(c.uri("a"));
    // Random data, zeros and compressible text, so every codec path is taken.
    const payload = Buffer.concat([
      randomBytes(8 * 1024 * 1024), Buffer.alloc(4 * 1024 * 1024), Buffer.alloc(4 * 1024 * 1024, "hast "),
    ]);
    const file = join(c.dir, "payload.bin");
    writeFileSync(file, payload);
    await run(["nbdcopy", file, c.uri("a")]);
    await run(["nbdcopy", "--flush", file, c.uri("a")]);
    await c.waitStatus("a", "all extents clean", (s) => s.dirtyBytes === 0 && s.status === "complete");
    // async/memsync answer before the secondary wrote: wait until nothing is in flight.
    await waitFor("no remote writes in flight", async () => {
      const list = JSON.parse((await c.hast("a", ["list", "--json"])).stdout).resources[0];
      return list.worker.remoteInFlight === 0;
    });
    const onA = await c.readData("a", 0, payload.byteLength);
    const onB = await c.readData("b", 0, payload.byteLength);
    expect(Buffer.compare(Buffer.from(onA), payload)).toBe(0);
    expect(Buffer.compare(Buffer.from(onB), payload)).toBe(0);
    const after = await c.status("a");
    expect(after.dirtyBytes).toBe(0);
    expect(after.status).toBe("complete");
    const workerOf = async (node: "a" | "b") =>
      JSON.parse((await c.hast(node, ["list", "--json"])).stdout).resources[0].worker;
    const [workerA, workerB] = [await workerOf("a"), await workerOf("b")];
    // The data above arrived in request slots (a) and reused buffers (b), each given back only
    // once its request was done with it: one reused too early would have changed the data.
    expect(workerA.writeBuffers.taken).toBeGreaterThan(0);
    expect(workerA.writeBuffers.inUse).toBe(0);
    expect(workerB.receiveBuffers.reused).toBeGreaterThan(0);
    // Each worker reports its memory; the pools' 1 MiB buffers are memory the collector counts.
    for (const worker of [workerA, workerB]) {
      const { rssBytes, jsHeapBytes, extraMemoryBytes, allocatorCommittedBytes } = worker.memory;
      expect(rssBytes).toBeGreaterThan(jsHeapBytes);
      expect(jsHeapBytes).toBeGreaterThan(0);
      expect(extraMemoryBytes).toBeGreaterThanOrEqual(1 << 20);
      expect(allocatorCommittedBytes).toBeGreaterThan(0);
    }
    // Large writes went through the codec threads on both sides exactly when they should.
    const [onPrimary, onSecondary] = [workerA.pipeline, workerB.pipeline];
    if (c0.threaded) {
      expect(onPrimary.encoded).toBeGreaterThanOrEqual(8);
      // …read where the NBD server received them, in the request slots the threads share.
      expect(onPrimary.encodedInPlace).toBeGreaterThanOrEqual(8);
      expect(onSecondary.decoded).toBeGreaterThanOrEqual(8);
      expect(onPrimary).toMatchObject({ slotsInUse: 0, waitingForSlot: 0 });
    } else {
      expect(onPrimary).toBeNull();
      expect(onSecondary).toBeNull();
    }
  } finally {
    if (savedBin === undefined) delete process.env.HAST_BIN;
    else process.env.HAST_BIN = savedBin;
    await cleanup.run();
  }
});
