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
import { Cleanup, run } from "./harness.ts";

test("nbdcopy through the primary lands byte-identical on the secondary", async () => {
  const cleanup = new Cleanup();
  try {
    const c = await createCluster(cleanup, { replication: "fullsync" });
    await c.createBoth();
    await c.startDaemon("a");
    await c.startDaemon("b");
    await c.hast("b", ["role", "secondary", "data"]);
    await c.hast("a", ["role", "primary", "data"]);
    const status = await c.waitStatus("a", "primary complete", (s) => s.status === "complete");
    expect(status.nbd).toBe(c.uri("a"));
    const payload = randomBytes(16 * 1024 * 1024);
    const file = join(c.dir, "payload.bin");
    writeFileSync(file, payload);
    await run(["nbdcopy", file, c.uri("a")]);
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
