/**
 * A zeroing (WRITE_ZEROES / TRIM) longer than one Delete frame (DELETE_FRAME_MAX_BYTES, 1 GiB)
 * goes to the secondary in several frames. If the link drops after the first frame went out and
 * while a later one waits for room in the replication window, the request must not count as
 * replicated: the extents of the unsent part stay dirty and are resynced, so the secondary
 * never keeps old data where the application zeroed (found by review; before the fix the pair
 * reported complete with the copies differing). Needs ~2.3 GiB of memory (two 1 GiB disks).
 */
import { expect, test } from "bun:test";
import { DELETE_FRAME_MAX_BYTES } from "../lib/primary.ts";
import { waitFor } from "./harness.ts";
import { inSync, pattern, Sim } from "./sim.ts";

const MIB = 1 << 20;
const GIB = DELETE_FRAME_MAX_BYTES;
/** The replication window's request count (MAX_REMOTE_IN_FLIGHT). */
const WINDOW = 256;

test("a zeroing of more than one frame that loses its link midway leaves the rest dirty, and it resyncs", async () => {
  const holders: (() => void)[] = [];
  const sim = new Sim({ replication: "fullsync", mediasizeBytes: GIB + 8 * MIB, extentsizeBytes: MIB, keepdirty: 4 });
  try {
    sim.start();
    await inSync(sim, "first connect", 60_000);
    // Data where the second Delete frame would zero, on both copies.
    const old = pattern(MIB, 5);
    await sim.primary.write(GIB, old, false);
    await inSync(sim, "written", 20_000);
    await sim.primary.flush();
    expect(Buffer.from(sim.secondaryDisk.bytes.subarray(GIB, GIB + MIB)).equals(old)).toBe(true);

    // The secondary holds writes to a load area, so the window fills up.
    const LOAD = GIB + 2 * MIB;
    sim.secondaryDisk.beforeWrite = async (offset) => {
      if (offset >= LOAD) await new Promise<void>((release) => holders.push(release));
    };
    const loads: Promise<unknown>[] = [];
    const load = (i: number) =>
      loads.push(sim.primary.write(LOAD + i * 4096, pattern(4096, i + 1), false).catch(() => {}));
    for (let i = 0; i < WINDOW; i++) load(i);
    await waitFor("window full", () => holders.length === WINDOW || undefined, { timeoutMs: 10_000, intervalMs: 5 });

    // The zeroing waits for room; then 4 more writes queue behind it.
    const zero = sim.primary.writeZeroes(0, GIB + MIB, false);
    await Bun.sleep(50);
    for (let i = WINDOW; i < WINDOW + 4; i++) load(i);
    await Bun.sleep(50);

    // One slot frees: the first (1 GiB) Delete goes; the second frame waits behind the 4 writes.
    let firstDeleteApplied = false;
    sim.secondaryDisk.onChange = (offset, length) => {
      if (offset === 0 && length === GIB) firstDeleteApplied = true;
    };
    holders[0]!();
    await waitFor("first Delete applied", () => firstDeleteApplied || undefined, { timeoutMs: 20_000, intervalMs: 5 });
    await Bun.sleep(200); // its reply reaches the primary

    sim.dropLink("test: link lost");
    sim.secondaryDisk.beforeWrite = async () => {};
    for (const release of holders) release();
    await zero; // answered: the local zeroing succeeded
    await Promise.all(loads);
    await Bun.sleep(1000);
    await inSync(sim, "reconnected and resynced", 60_000);
    expect(sim.primaryDisk.bytes.subarray(GIB, GIB + MIB).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(sim.secondaryDisk.bytes.subarray(GIB, GIB + MIB),
      sim.primaryDisk.bytes.subarray(GIB, GIB + MIB))).toBe(0);
  } finally {
    for (const release of holders) release();
    await sim.stop().catch(() => {});
  }
}, 180_000);
