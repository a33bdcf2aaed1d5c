/**
 * The promise hast makes about a crash of the primary, checked at every step
 * of a seeded random run: at every instant, an extent that is clean in the
 * on-disk activemap (the map last written, and the one being written) holds
 * the same bytes in the primary's page cache, on the primary's disk (what the
 * last flushes made durable) and on the secondary, in its cache and on its
 * disk. Otherwise a crash of the primary, or a power loss of both hosts, at
 * that instant would restart without resyncing an extent whose copies
 * differ: silent divergence. And while the link is down (the secondary
 * may have crashed), every extent the primary holds in step is on the
 * secondary's disk, not only in its cache.
 *
 * The real Primary and Secondary run in-process (test/sim.ts) under random
 * concurrent writes, zeroings, trims, FUA writes, flushes and reads, while a
 * chaos loop drops the link, partitions it, fails and delays disk writes,
 * flushes and map writes on either side, flips bits on the wire (caught by the checksum,
 * or by the link's encryption in the encrypted case), and kills the primary mid-load (as
 * SIGKILL: nothing it does lands afterwards) and starts a new one from the on-disk map, as the
 * daemon restarts a crashed worker. The
 * invariant is checked synchronously after every change of a disk, a map or
 * durable state. At the end the faults stop, the pair resyncs, and both copies
 * must equal a model of every write the application was told succeeded.
 *
 * Each run prints its seed; HAST_SEED=N reruns that seed.
 */
import { afterAll, afterEach, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ResourceConfig } from "../lib/config.ts";
import { seededRandom, waitFor } from "./harness.ts";
import { eio, type Fence, Sim } from "./sim.ts";

const KIB = 1024;
const SECTOR = 512;
const EXTENT = 64 * KIB;
const MEDIA = 2 * 1024 * KIB + 64 * KIB; // room for metadata, 2 MiB of data
const CHAOS_MS = 8_000;
/** Extents most requests go to at a time (keepdirty is 3). */
const HOT_EXTENTS = 6;

/** The authkey of the encrypted case. */
const keyDir = mkdtempSync(join(tmpdir(), "hast-invariant-"));
const keyPath = join(keyDir, "key");
writeFileSync(keyPath, "invariant-test-key-0123456789\n");
chmodSync(keyPath, 0o600);
afterAll(() => rmSync(keyDir, { recursive: true, force: true }));

let sim: Sim | null = null;
afterEach(async () => {
  await sim?.stop();
  sim = null;
});

interface Case {
  replication: ResourceConfig["replication"];
  checksum: ResourceConfig["checksum"];
  compression: ResourceConfig["compression"];
  /** Large payloads encoded on codec threads, read where they lie in the request slots. */
  pipeline?: boolean;
  /** authkey and `encryption aes-256-gcm`: flipped bits are caught by the records' tags. */
  encrypted?: boolean;
}

const CASES: Case[] = [
  { replication: "fullsync", checksum: "crc32", compression: "lz4" },
  { replication: "memsync", checksum: "none", compression: "hole" },
  { replication: "async", checksum: "sha256", compression: "hole" },
  { replication: "memsync", checksum: "sha256", compression: "lz4", pipeline: true },
  { replication: "memsync", checksum: "none", compression: "lz4", encrypted: true },
];

/** Durable state of a disk: per sector, the newest version a completed flush covered. */
class DurableTracker {
  readonly bytes: Uint8Array;
  private readonly version: Float64Array;
  private readonly durableVersion: Float64Array;
  private next = 1;

  constructor(private readonly live: Uint8Array) {
    this.bytes = live.slice();
    this.version = new Float64Array(live.byteLength / SECTOR);
    this.durableVersion = new Float64Array(live.byteLength / SECTOR);
  }

  changed(offset: number, length: number): void {
    const first = Math.floor(offset / SECTOR);
    const last = Math.floor((offset + length - 1) / SECTOR);
    for (let s = first; s <= last; s++) this.version[s] = this.next++;
  }

  /** At a flush's start: what it will cover. */
  snapshot(): { bytes: Uint8Array; version: Float64Array } {
    return { bytes: this.live.slice(), version: this.version.slice() };
  }

  /** At the flush's successful end: its snapshot is durable (a flush never un-persists). */
  commit(snap: { bytes: Uint8Array; version: Float64Array }): void {
    for (let s = 0; s < snap.version.length; s++) {
      if (snap.version[s]! > this.durableVersion[s]!) {
        this.durableVersion[s] = snap.version[s]!;
        this.bytes.set(snap.bytes.subarray(s * SECTOR, (s + 1) * SECTOR), s * SECTOR);
      }
    }
  }
}

type Fault = "pWriteFail" | "sWriteFail" | "pFlushFail" | "sFlushFail" | "mapFail" | "flip";
type OneShot = Exclude<Fault, "pWriteFail" | "sWriteFail">;

/** One seeded run: the pair, the fault switches, the checker, the load and the model. */
class ChaosRun {
  readonly sim: Sim;
  readonly random: () => number;
  violation: string | null = null;
  checks = 0;
  drops = 0;
  /** Times the primary was killed and restarted mid-run. */
  crashes = 0;
  readonly counts = { ok: 0, failed: 0, reads: 0 };
  /** Faults that actually fired. */
  readonly fired = { pWriteFail: 0, sWriteFail: 0, pFlushFail: 0, sFlushFail: 0, mapFail: 0, flip: 0 };
  private readonly faults = {
    pWriteFail: 0, sWriteFail: 0, pFlushFail: false, sFlushFail: false, mapFail: false, flip: false,
  };
  private readonly durable: DurableTracker;
  private readonly sDurable: DurableTracker;
  private pendingMap: Uint8Array | null = null;
  /** What the application was told is on the device; `unknown` marks sectors a failed request left undefined. */
  private readonly model: Uint8Array;
  private readonly unknown: Uint8Array;
  private readonly busy: { from: number; to: number }[] = [];
  private chaosOver = false;
  private hotExtent = 0;

  constructor(readonly c: Case, readonly seed: number) {
    this.random = seededRandom(seed);
    this.sim = new Sim({
      replication: c.replication, checksum: c.checksum, compression: c.compression,
      mediasizeBytes: MEDIA, extentsizeBytes: EXTENT, keepdirty: 3, timeoutSeconds: 2, pipeline: c.pipeline,
      ...(c.encrypted ? { authkey: keyPath, encryption: "aes-256-gcm" as const } : {}),
    });
    this.durable = new DurableTracker(this.sim.primaryDisk.bytes);
    this.sDurable = new DurableTracker(this.sim.secondaryDisk.bytes);
    this.model = new Uint8Array(this.sim.primaryDisk.sizeBytes);
    this.unknown = new Uint8Array(this.model.byteLength / SECTOR);
    this.installHooks();
  }

  pick(n: number): number {
    return Math.floor(this.random() * n);
  }

  /** The invariant (module comment), over the landed map and the one being written. */
  check(when: string): void {
    if (this.violation) return;
    this.checks++;
    const { primaryDisk: P, secondaryDisk: S, primaryMeta } = this.sim;
    const maps = this.pendingMap ? [primaryMeta.map, this.pendingMap] : [primaryMeta.map];
    for (let e = 0; e * EXTENT < P.sizeBytes; e++) {
      if (maps.every((m) => (m[e >> 3]! & (1 << (e & 7))) !== 0)) continue;
      const from = e * EXTENT;
      const to = Math.min(P.sizeBytes, from + EXTENT);
      const live = P.bytes.subarray(from, to);
      if (Buffer.compare(live, S.bytes.subarray(from, to)) !== 0) {
        this.violation = `after ${when}: extent ${e} is clean on disk but the secondary's copy differs`;
      } else if (Buffer.compare(live, this.durable.bytes.subarray(from, to)) !== 0) {
        this.violation = `after ${when}: extent ${e} is clean on disk but the primary's disk lacks cached writes`;
      } else if (Buffer.compare(live, this.sDurable.bytes.subarray(from, to)) !== 0) {
        this.violation = `after ${when}: extent ${e} is clean on disk but the secondary's disk lacks cached writes`;
      }
      if (this.violation) return;
    }
    if (this.sim.primary?.status().link !== "connected") this.checkSecondaryCrash(when);
  }

  /**
   * With the link down, the secondary may have crashed: every extent the
   * primary holds in step (nothing to resync) must be on the secondary's disk.
   */
  private checkSecondaryCrash(when: string): void {
    const { primaryDisk: P, activemap } = this.sim;
    for (let from = 0; from < P.sizeBytes; from += EXTENT) {
      const to = Math.min(P.sizeBytes, from + EXTENT);
      if (!activemap.inStep(from, to - from)) continue;
      if (Buffer.compare(P.bytes.subarray(from, to), this.sDurable.bytes.subarray(from, to)) !== 0) {
        this.violation = `after ${when}, link down: extent ${from / EXTENT} is in step, ` +
          "but the secondary's disk lacks writes the primary will not resync";
        return;
      }
    }
  }

  /** Faults and delays on both disks, the map and the wire; the checker after every change. */
  private installHooks(): void {
    const { primaryDisk: P, secondaryDisk: S, primaryMeta } = this.sim;
    const jitter = () => (this.random() < 0.3 ? Bun.sleep(this.pick(3)) : Promise.resolve());
    const failing = async (rate: number, fault: Fault) => {
      await jitter();
      if (this.random() >= rate) return;
      this.fired[fault]++;
      throw eio(`injected ${fault}`);
    };
    P.beforeWrite = () => failing(this.faults.pWriteFail, "pWriteFail");
    S.beforeWrite = () => failing(this.faults.sWriteFail, "sWriteFail");
    P.onChange = (offset, length) => {
      this.durable.changed(offset, length);
      this.check("a primary disk write");
    };
    S.onChange = (offset, length) => {
      this.sDurable.changed(offset, length);
      this.check("a secondary disk write");
    };
    const tracked = (disk: typeof P, durable: DurableTracker, fault: "pFlushFail" | "sFlushFail") => {
      const flush = disk.flush.bind(disk);
      disk.flush = async (fence?: Fence) => {
        const snap = durable.snapshot();
        await failing(this.once(fault) ? 1 : 0, fault);
        const ok = await flush(fence);
        durable.commit(snap);
        this.check(`a ${fault === "pFlushFail" ? "primary" : "secondary"} flush`);
        return ok;
      };
    };
    tracked(P, this.durable, "pFlushFail");
    tracked(S, this.sDurable, "sFlushFail");
    primaryMeta.beforeWriteMap = async (bitmap) => {
      this.pendingMap = bitmap;
      this.check("a map write began");
      await failing(this.once("mapFail") ? 1 : 0, "mapFail").catch((error) => {
        this.pendingMap = null;
        throw error;
      });
    };
    primaryMeta.onMapWritten = () => {
      this.pendingMap = null;
      this.check("a map write landed");
    };
    this.sim.tamperToSecondary = (bytes) => {
      if (bytes.byteLength < 2048 || !this.once("flip")) return bytes;
      this.fired.flip++;
      const copy = bytes.slice();
      copy[copy.byteLength - 1 - this.pick(1024)]! ^= 1 << this.pick(8);
      return copy;
    };
  }

  /**
   * Kills the primary mid-load (its page cache survives: what landed stays) and starts a new one
   * from the on-disk map and metadata. Its requests in flight fail (the model marks their ranges
   * unknown); a map write it had begun never lands.
   */
  private crashPrimary(): void {
    this.sim.crashPrimary();
    this.pendingMap = null;
    this.crashes++;
    this.check("a primary crash");
  }

  /** True once after a one-shot fault was armed. */
  private once(fault: OneShot): boolean {
    const armed = this.faults[fault];
    this.faults[fault] = false;
    return armed;
  }

  /** Runs the load with four clients while the chaos loop injects faults for CHAOS_MS. */
  async run(): Promise<void> {
    const client = async () => {
      while (!this.chaosOver && !this.violation) await this.oneRequest();
    };
    await Promise.all([this.chaos(), client(), client(), client(), client()]);
    Object.assign(this.faults, {
      pWriteFail: 0, sWriteFail: 0, pFlushFail: false, sFlushFail: false, mapFail: false, flip: false,
    });
    this.sim.reachable = true;
  }

  /** Every action once in a shuffled order, then at random until CHAOS_MS passed, then a failed local flush. */
  private async chaos(): Promise<void> {
    const s = this.sim;
    // A window of failing writes, held open until one failed (or 5 s more passed).
    const during = (fault: "pWriteFail" | "sWriteFail", rate: number) => async () => {
      const before = this.fired[fault];
      this.faults[fault] = rate;
      await Bun.sleep(300 + this.pick(500));
      await this.firedSince(fault, before);
      this.faults[fault] = 0;
    };
    // A one-shot fault, armed until it fires; the loop waits for that (up to 5 s).
    const arm = (fault: OneShot) => async () => {
      const before = this.fired[fault];
      this.faults[fault] = true;
      if (fault === "mapFail") this.hotExtent = this.pick(this.model.byteLength / EXTENT); // new extents: map writes
      await this.firedSince(fault, before);
    };
    const actions: (() => Promise<void> | void)[] = [
      async () => {
        await this.connected(); // else a reset finds no link (e.g. still reconnecting after a flip)
        if (s.dropLink("chaos: link reset")) this.drops++;
      },
      async () => {
        s.reachable = false;
        if (s.dropLink("chaos: partition")) this.drops++;
        await Bun.sleep(200 + this.pick(800));
        s.reachable = true;
      },
      during("sWriteFail", 0.05), during("pWriteFail", 0.03), arm("sFlushFail"),
      arm("mapFail"),
      this.c.checksum === "none" && !this.c.encrypted ? () => {} : arm("flip"),
      () => s.primary.clearRound(), () => s.primary.clearRound(),
      async () => { // a slow sync for a while (a link lost meanwhile must not confuse the next one)
        s.primary.setSyncRate(256 * 1024);
        await Bun.sleep(500 + this.pick(1500));
        s.primary.setSyncRate(0);
      },
      () => void (this.hotExtent = this.pick(this.model.byteLength / EXTENT)),
      () => void (this.hotExtent = this.pick(this.model.byteLength / EXTENT)),
      () => this.crashPrimary(), () => this.crashPrimary(),
    ];
    const order = actions.map((_, i) => i).sort(() => this.random() - 0.5);
    const end = performance.now() + CHAOS_MS;
    for (let step = 0; (step < order.length || performance.now() < end) && !this.violation; step++) {
      await Bun.sleep(20 + this.pick(150));
      await actions[order[step] ?? this.pick(actions.length)]!();
    }
    // Last, as it ends all clearing and syncing until the primary restarts: a failed local flush,
    // with load going on for a while after it.
    await arm("pFlushFail")();
    await Bun.sleep(500);
    this.chaosOver = true;
  }

  /** Waits until `fault` fired more than `before` times, up to 5 s. */
  private async firedSince(fault: Fault, before: number): Promise<void> {
    for (let waited = 0; this.fired[fault] === before && waited < 5_000; waited += 20) await Bun.sleep(20);
  }

  /** Waits up to 5 s for the primary to be connected. */
  private async connected(): Promise<void> {
    for (let waited = 0; waited < 5_000 && this.sim.primary.status().link !== "connected"; waited += 20) {
      await Bun.sleep(20);
    }
  }

  /**
   * A range of 1–16 sectors (sometimes up to 384) that overlaps no request in
   * flight; all but 1 in 200 start in the hot window (HOT_EXTENTS extents that the chaos
   * loop moves), so extents go idle, are cleared, and are written again.
   */
  private freeRange(): { from: number; to: number } {
    const size = this.model.byteLength;
    for (;;) {
      const length = (1 + this.pick(this.random() < 0.8 ? 16 : 384)) * SECTOR;
      const hot = this.random() < 0.995;
      const base = hot ? this.hotExtent * EXTENT : 0;
      const span = hot ? Math.min(HOT_EXTENTS * EXTENT, size - base) : size;
      const from = Math.min(base + this.pick(span / SECTOR) * SECTOR, size - length);
      const to = from + length;
      if (this.busy.every((b) => to <= b.from || from >= b.to)) return { from, to };
    }
  }

  private async oneRequest(): Promise<void> {
    const range = this.freeRange();
    this.busy.push(range);
    try {
      const roll = this.random();
      if (roll < 0.15) await this.read(range.from, range.to);
      else if (roll < 0.152) await this.sim.primary.flush().catch(() => {});
      else await this.mutate(roll, range.from, range.to);
    } finally {
      this.busy.splice(this.busy.indexOf(range), 1);
    }
  }

  /** A read must return what the model holds wherever the model knows. */
  private async read(from: number, to: number): Promise<void> {
    this.counts.reads++;
    const got = await this.sim.primary.read(from, to - from).catch(() => null);
    for (let sec = from / SECTOR; got && sec < to / SECTOR; sec++) {
      const at = sec * SECTOR - from;
      const want = this.model.subarray(sec * SECTOR, (sec + 1) * SECTOR);
      if (!this.unknown[sec] && Buffer.compare(got.subarray(at, at + SECTOR), want) !== 0) {
        this.violation ??= `read at ${from}+${to - from} returned data the application never wrote there`;
      }
    }
  }

  private async mutate(roll: number, from: number, to: number): Promise<void> {
    const primary = this.sim.primary;
    let data: Uint8Array | null = null;
    let op: Promise<void>;
    if (roll < 0.3) op = primary.writeZeroes(from, to - from, this.random() < 0.05);
    else if (roll < 0.35) op = primary.trim(from, to - from);
    else {
      data = this.randomData(to - from);
      // As the NBD server does, a large write arrives in one of the primary's request slots (one
      // freed too early would be refilled by another client while still being written).
      const pooled = primary.writeBuffers.take(data.byteLength);
      pooled?.set(data);
      op = primary.write(from, pooled ?? data, this.random() < 0.005);
    }
    const ok = await op.then(() => true, () => false);
    this.unknown.fill(ok ? 0 : 1, from / SECTOR, to / SECTOR);
    if (!ok) {
      this.counts.failed++;
      return;
    }
    this.counts.ok++;
    if (data) this.model.set(data, from);
    else this.model.fill(0, from, to);
  }

  /** Incompressible, one repeated byte, or mostly zeros (each codec path). */
  private randomData(bytes: number): Uint8Array {
    const data = new Uint8Array(bytes);
    const kind = this.pick(4);
    if (kind === 0) for (let i = 0; i < bytes; i++) data[i] = this.pick(256);
    else if (kind === 1) data.fill(this.pick(256));
    else if (kind === 2) for (let i = 0; i < bytes; i += 64) data[i] = this.pick(256);
    return data;
  }

  /** After the heal: both copies identical, and equal to the model wherever it knows. */
  verifyConverged(): void {
    const { primaryDisk: P, secondaryDisk: S } = this.sim;
    expect(Buffer.compare(S.bytes, P.bytes)).toBe(0);
    for (let sec = 0; sec < this.unknown.length; sec++) {
      const at = sec * SECTOR;
      const same = Buffer.compare(P.bytes.subarray(at, at + SECTOR), this.model.subarray(at, at + SECTOR)) === 0;
      if (!this.unknown[sec] && !same) throw new Error(`sector ${sec} lost a write the application was told succeeded`);
    }
  }
}

for (const c of CASES) {
  const codec = `${c.checksum}, ${c.compression}${c.pipeline ? ", pipeline" : ""}${c.encrypted ? ", encrypted" : ""}`;
  test(`${c.replication} (${codec}): a clean extent in the on-disk activemap ` +
    "never differs between the copies, under random load and faults", async () => {
    const seed = Number(process.env.HAST_SEED ?? Math.floor(Math.random() * 2 ** 31));
    console.log(`seed ${seed} (rerun with HAST_SEED=${seed})`);
    const run = new ChaosRun(c, seed);
    sim = run.sim;
    run.sim.start();
    await waitFor("first connect", () => run.sim.primary.status().status === "complete" || undefined,
      { timeoutMs: 5_000, intervalMs: 10 });
    await run.run();
    expect(run.violation).toBeNull(); // first: a violation ends the chaos early
    // After its failed flush the primary flushes (and so clears and syncs) nothing more until
    // it restarts, as the daemon restarts a resource's worker; it resumes from its on-disk map.
    expect(run.sim.primary.status().localFlushFailure).toContain("injected pFlushFail");
    // Large writes travelled in request slots (primary) and reused buffers (secondary), so an
    // early give-back would show; and no slot stays taken once the primary stopped.
    const slots = run.sim.primary.writeBuffers;
    const pooled = { primary: slots.stats().taken, secondary: run.sim.secondary.receivePool.stats().reused };
    // Its failed flush recorded localWritesLost, so only `hast role --force primary` starts it
    // again here; that keeps this copy and clears the record (a flagged primary syncs nothing to
    // its secondary). MemoryDisk lost nothing, so the copies can still be compared.
    expect(run.sim.primaryMeta.metadata.localWritesLost).toBe(true);
    run.sim.primaryMeta.metadata = { ...run.sim.primaryMeta.metadata, localWritesLost: false };
    await run.sim.restartPrimary();
    await waitFor("every request slot back", () => slots.stats().inUse === 0 || undefined, { timeoutMs: 5_000 });
    await waitFor("resynced after the faults", () => {
      const st = run.sim.primary.status();
      return st.status === "complete" && st.dirtyBytes === 0 && st.remoteInFlight === 0 ? true : undefined;
    }, { timeoutMs: 30_000, intervalMs: 20 });
    await run.sim.primary.clearRound();
    expect(run.violation).toBeNull();
    expect(run.sim.logs.filter((l) => /sync failed|Assertion/.test(l))).toEqual([]);
    run.verifyConverged();
    // The run exercised what it claims to: load, failures, reconnects, resyncs and checks.
    expect(run.counts.ok).toBeGreaterThan(200);
    expect(run.counts.failed).toBeGreaterThan(0);
    expect(run.drops).toBeGreaterThan(0);
    expect(run.crashes).toBeGreaterThan(0);
    expect(run.sim.events.filter((e) => e === "primary syncstart").length).toBeGreaterThan(0);
    expect(run.checks).toBeGreaterThan(1000);
    expect(pooled.primary).toBeGreaterThan(0);
    expect(pooled.secondary).toBeGreaterThan(0);
    if (c.pipeline) expect(run.sim.pipeline!.stats().encodedInPlace).toBeGreaterThan(0);
    const { flip, ...diskFaults } = run.fired;
    for (const [fault, times] of Object.entries(diskFaults)) expect([fault, times > 0]).toEqual([fault, true]);
    if (c.checksum !== "none" || c.encrypted) {
      expect(flip).toBeGreaterThan(0);
      const caughtBy = c.encrypted ? "Cannot decrypt record" : `${c.checksum} mismatch`;
      expect(run.sim.logs.some((l) => l.includes(caughtBy))).toBe(true);
    }
    console.log(`seed ${seed}: ${run.counts.ok} ok, ${run.counts.failed} failed, ${run.counts.reads} reads, ` +
      `${run.drops} link drops, ${run.crashes} crashes, ${run.checks} checks, ` +
      `${run.sim.primaryMeta.mapWrites} map writes, ` +
      `faults ${JSON.stringify(run.fired)}, slots taken / buffers reused ${JSON.stringify(pooled)}`);
  }, 60_000);
}
