/**
 * Replication over loopback with two real daemons: data written through the
 * primary's NBD export with nbdcopy appears byte-identical in the secondary's
 * data area (fullsync), and status reports the pair complete.
 */
import { expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { createCluster } from "./cluster.ts";
import { Cleanup, run, waitFor } from "./harness.ts";

const CASES = [
  { replication: "fullsync", codec: ["compression none", "checksum none"] },
  { replication: "memsync", codec: ["compression lz4", "checksum sha256"] },
  { replication: "async", codec: ["compression hole", "checksum crc32"] },
] as const;

test.each(CASES)("nbdcopy through the primary lands byte-identical on the secondary (%o)", async (c0) => {
  const cleanup = new Cleanup();
  try {
    const c = await createCluster(cleanup, { replication: c0.replication, resourceLines: [...c0.codec] });
    await c.createBoth();
    await c.startDaemon("a");
    await c.startDaemon("b");
    await c.hast("b", ["role", "secondary", "data"]);
    await c.hast("a", ["role", "primary", "data"]);
    const status = await c.waitStatus("a", "primary complete", (s) => s.status === "complete");
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
  } finally {
    await cleanup.run();
  }
});
