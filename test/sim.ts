/**
 * In-process simulation of a primary and a secondary with injectable faults:
 * memory disks that can be slowed, gated or made to fail, and an in-memory
 * network whose byte stream goes through the real framing and can be
 * corrupted. Drives the real Primary, Secondary and handshake code.
 */
import { afterEach } from "bun:test";
import { ActiveMap } from "../lib/activemap.ts";
import type { BufferPool } from "../lib/buffer_pool.ts";
import { CodecPipeline } from "../lib/codec_pipeline.ts";
import { RequestSlots } from "../lib/request_slots.ts";
import type { ResourceConfig } from "../lib/config.ts";
import { parseHello } from "../lib/handshake.ts";
import type { HookEvent, HookRunner } from "../lib/hooks.ts";
import { type LinkKeys, Opener, Sealer } from "../lib/link_crypto.ts";
import { computeLayout, type Metadata } from "../lib/metadata.ts";
import { Primary, REQUEST_SLOT_MIN_BYTES, REQUEST_SLOTS } from "../lib/primary.ts";
import { systemClock } from "../lib/remote_link.ts";
import { Secondary } from "../lib/secondary.ts";
import type { DataStore, MetaStore } from "../lib/storage.ts";
import type { Connection, Network } from "../lib/transport.ts";
import { FrameParser, MAX_IO_BYTES, ProtocolError, type Frame } from "../lib/wire.ts";
import { waitFor } from "./harness.ts";

/** An error as the kernel reports a failed disk operation (`what`: e.g. "fdatasync"). */
export function eio(what: string): Error & { code: string } {
  return Object.assign(new Error(`EIO: i/o error, ${what}`), { code: "EIO" });
}

/**
 * What a primary process holds: once `alive` is false (the process was killed), nothing it
 * starts or finishes lands on a disk or in the metadata, and it makes no new connection.
 */
export class Fence {
  alive = true;

  /** Throws, as a write of a process that is gone never happens. */
  check(what: string): void {
    if (!this.alive) throw Object.assign(new Error(`EIO: the process was killed before its ${what}`), { code: "EIO" });
  }
}

/** A disk in memory; `beforeWrite` can delay or fail writes. */
export class MemoryDisk implements DataStore {
  readonly bytes: Uint8Array;
  writes = 0;
  beforeWrite: (offset: number, data: Uint8Array) => Promise<void> = async () => {};
  /** Called synchronously right after bytes change (a write or zeroing landed). */
  onChange: (offset: number, length: number) => void = () => {};

  constructor(readonly sizeBytes: number) {
    this.bytes = new Uint8Array(sizeBytes);
  }

  /** Set to make reads fail (a failing local disk). */
  readError: Error | null = null;

  /** Can delay reads (e.g. hold a sync's read of its source). */
  beforeRead: (offset: number, length: number) => Promise<void> = async () => {};

  async read(offset: number, length: number): Promise<Uint8Array> {
    await this.beforeRead(offset, length);
    if (this.readError) throw this.readError;
    return this.bytes.slice(offset, offset + length);
  }

  async readInto(offset: number, buf: Uint8Array): Promise<void> {
    buf.set(await this.read(offset, buf.byteLength));
  }

  async write(offset: number, data: Uint8Array, fence?: Fence): Promise<void> {
    fence?.check("write");
    await this.beforeWrite(offset, data);
    fence?.check("write");
    this.bytes.set(data, offset);
    this.writes++;
    this.onChange(offset, data.byteLength);
  }

  async zero(offset: number, length: number, fence?: Fence): Promise<void> {
    fence?.check("zeroing");
    await this.beforeWrite(offset, new Uint8Array(0));
    fence?.check("zeroing");
    this.bytes.fill(0, offset, offset + length);
    this.onChange(offset, length);
  }

  /** Set to make flushes fail, as fdatasync does when the disk lost cached writes. */
  flushError: Error | null = null;
  flushes = 0;
  beforeFlush: () => Promise<void> = async () => {};

  async flush(fence?: Fence): Promise<boolean> {
    fence?.check("flush");
    await this.beforeFlush();
    fence?.check("flush");
    this.flushes++;
    if (this.flushError) throw this.flushError;
    return true;
  }
}

/** Metadata and map in memory; `beforeWriteMap` can delay or fail map writes. */
export class MemoryMeta implements MetaStore {
  metadata: Metadata;
  map: Uint8Array;
  mapWrites = 0;
  beforeWriteMap: (bitmap: Uint8Array) => Promise<void> = async () => {};
  /** Called synchronously right after a map write landed. */
  onMapWritten: () => void = () => {};

  constructor(resource: string, mediasizeBytes: number, extentsizeBytes: number, keepdirty: number) {
    const layout = computeLayout(mediasizeBytes, extentsizeBytes);
    this.metadata = {
      resource, datasizeBytes: layout.datasizeBytes, extentsizeBytes, keepdirty,
      mapOffsetBytes: layout.mapOffsetBytes, mapSizeBytes: layout.mapSizeBytes,
      dataOffsetBytes: layout.dataOffsetBytes, resuid: 0n, localcnt: 0n, remotecnt: 0n,
      prevrole: "init", syncTarget: false, discardPending: false, localWritesLost: false,
      generation: 1n,
    };
    this.map = new Uint8Array(layout.mapSizeBytes);
  }

  /** Can fail a metadata write (it then changes nothing, as a failed write of a slot). */
  beforeWrite: (update: Partial<Omit<Metadata, "generation">>) => Promise<void> = async () => {};

  async write(
    update: Partial<Omit<Metadata, "generation">>, _options?: { flush?: boolean }, fence?: Fence,
  ): Promise<void> {
    fence?.check("metadata write");
    await this.beforeWrite(update);
    fence?.check("metadata write");
    this.metadata = { ...this.metadata, ...update, generation: this.metadata.generation + 1n };
  }

  async readMap(): Promise<Uint8Array> {
    return this.map.slice();
  }

  async writeMap(bitmap: Uint8Array, _options?: { flush?: boolean }, fence?: Fence): Promise<void> {
    fence?.check("map write");
    const copy = bitmap.slice();
    await this.beforeWriteMap(copy);
    fence?.check("map write");
    this.map.set(copy.subarray(0, this.map.byteLength));
    this.mapWrites++;
    this.onMapWritten();
  }
}

/** One end of an in-memory connection; bytes pass through `tamper` and the real parser. */
class MemoryConnection implements Connection {
  onFrame: (frame: Frame) => void = () => {};
  onClose: (reason: string) => void = () => {};
  peer!: MemoryConnection;
  private isClosed = false;
  private readonly parser: FrameParser;
  private sealer: Sealer | null = null;
  private opener: Opener | null = null;
  /** send() copies what it is given, so nothing given to it is held. */
  readonly finished = Promise.resolve();

  constructor(
    readonly remoteAddress: string,
    private readonly tamper: (bytes: Uint8Array) => Uint8Array,
    /** True while the link silently loses everything, closes included (a pulled cable). */
    private readonly silent: () => boolean = () => false,
    /** Received large payloads go into its buffers, as with socketConnection. */
    pool: BufferPool | null = null,
  ) {
    this.parser = new FrameParser((frame) => this.onFrame(frame), pool);
  }

  get closed(): boolean {
    return this.isClosed;
  }

  get encrypted(): boolean {
    return this.sealer !== null;
  }

  secure(keys: LinkKeys): void {
    if (!this.parser.idle) {
      throw new ProtocolError("Cannot encrypt the link: part of a frame arrived before the switch");
    }
    this.sealer = new Sealer(keys.send);
    this.opener = new Opener(keys.receive, (plaintext) => this.parser.push(plaintext));
  }

  send(pieces: Uint8Array[]): boolean {
    if (this.isClosed) return false;
    if (this.silent()) return true;
    let plain: Uint8Array = Buffer.concat(pieces);
    if (this.sealer !== null) plain = Buffer.concat(this.sealer.seal(plain));
    const bytes = this.tamper(new Uint8Array(plain));
    const peer = this.peer;
    setImmediate(() => {
      if (peer.isClosed) return;
      try {
        if (peer.opener !== null) peer.opener.push(bytes);
        else peer.parser.push(bytes);
      } catch (error) {
        peer.close(`protocol violation: ${(error as Error).message}`);
      }
    });
    return true;
  }

  async drained(): Promise<void> {}

  close(reason: string): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.onClose(reason);
    if (this.silent()) return;
    setImmediate(() => this.peer.close(`peer closed: ${reason}`));
  }
}

export interface SimOptions {
  replication: ResourceConfig["replication"];
  checksum?: ResourceConfig["checksum"];
  compression?: ResourceConfig["compression"];
  mediasizeBytes?: number;
  extentsizeBytes?: number;
  keepdirty?: number;
  timeoutSeconds?: number;
  /** Encode and decode large payloads on codec threads, as a resource with `pipeline on`. */
  pipeline?: boolean;
  /** `authkey` of both sides, unless `secondaryAuthkey` sets the secondary's (null: none). */
  authkey?: string;
  secondaryAuthkey?: string | null;
  /** `encryption` of both sides, unless `secondaryEncryption` sets the secondary's. */
  encryption?: ResourceConfig["encryption"];
  secondaryEncryption?: ResourceConfig["encryption"];
}

/** A primary and a secondary joined by an in-memory network. */
export class Sim {
  readonly primaryDisk: MemoryDisk;
  readonly secondaryDisk: MemoryDisk;
  readonly primaryMeta: MemoryMeta;
  readonly secondaryMeta: MemoryMeta;
  readonly events: string[] = [];
  readonly logs: string[] = [];
  /** Applied to primary → secondary bytes (e.g. flip a bit). */
  tamperToSecondary: (bytes: Uint8Array) => Uint8Array = (b) => b;
  /** What the secondary sends, one frame per call, on its way to the primary. */
  tamperToPrimary: (bytes: Uint8Array) => Uint8Array = (b) => b;
  /** False makes connect attempts fail (partition). */
  reachable = true;
  /** True makes established connections lose every byte and close without telling the peer. */
  silent = false;
  primary!: Primary;
  secondary!: Secondary;
  pipeline: CodecPipeline | null = null;
  /**
   * The primary's request slots, shared with the codec threads as a resource worker does; kept
   * across restartPrimary (a worker would allocate new ones), so a slot a stopped primary never
   * gave back stays counted in use.
   */
  readonly requestSlots = new RequestSlots(REQUEST_SLOTS, MAX_IO_BYTES, REQUEST_SLOT_MIN_BYTES);
  activemap!: ActiveMap;
  /** The running primary's; a crash ends it (see crashPrimary). */
  private fence = new Fence();
  /** Log lines of primaries killed by crashPrimary, after their crash. */
  readonly deadLogs: string[] = [];
  /** Primary-side ends of the connections made so far. */
  private readonly links: MemoryConnection[] = [];
  /** Connections the primary made (connect calls that did not fail), for the Sim's whole life. */
  connectsMade = 0;

  constructor(readonly options: SimOptions) {
    const media = options.mediasizeBytes ?? 16 * 1024 * 1024;
    const extent = options.extentsizeBytes ?? 1024 * 1024;
    const keepdirty = options.keepdirty ?? 4;
    this.primaryMeta = new MemoryMeta("sim", media, extent, keepdirty);
    this.secondaryMeta = new MemoryMeta("sim", media, extent, keepdirty);
    this.primaryDisk = new MemoryDisk(this.primaryMeta.metadata.datasizeBytes);
    this.secondaryDisk = new MemoryDisk(this.secondaryMeta.metadata.datasizeBytes);
  }

  config(): ResourceConfig {
    return {
      resource: "sim", name: "sim", local: "/sim", line: 1,
      remote: { kind: "tcp", family: "tcp", host: "sim", port: 1 }, source: null,
      replication: this.options.replication, checksum: this.options.checksum ?? "none",
      compression: this.options.compression ?? "hole", timeoutSeconds: this.options.timeoutSeconds ?? 5,
      exec: null,
      metaflush: true, syncRateBytesPerSecond: 0, pipeline: this.options.pipeline ?? false,
      authkey: this.options.authkey ?? null, encryption: this.options.encryption ?? "none",
      export: { kind: "unix", path: "/sim.sock" },
    };
  }

  private hooks(side: string): HookRunner {
    return { run: (event: HookEvent, args: string[]) => this.events.push([side, event, ...args].join(" ")) };
  }

  private log(side: string, fence?: Fence) {
    return (level: string, message: string) =>
      (fence?.alive === false ? this.deadLogs : this.logs).push(`${side} ${level}: ${message}`);
  }

  /** Starts both sides; the primary connects at once. */
  start(): void {
    const config = this.config();
    if (this.options.secondaryAuthkey !== undefined) config.authkey = this.options.secondaryAuthkey;
    if (this.options.secondaryEncryption !== undefined) config.encryption = this.options.secondaryEncryption;
    this.pipeline = config.pipeline ? CodecPipeline.start({ inputs: this.requestSlots }) : null;
    const pipeline = this.pipeline;
    this.secondary = new Secondary({
      config, data: this.secondaryDisk, meta: this.secondaryMeta, hooks: this.hooks("secondary"),
      log: this.log("secondary"), pipeline,
    });
    this.startPrimary();
  }

  /** A new Primary over the same disk and metadata; its activemap starts from the on-disk map. */
  private startPrimary(): void {
    const fence = new Fence();
    this.fence = fence;
    const m = this.primaryMeta.metadata;
    this.activemap = new ActiveMap({
      extentCount: Math.ceil(m.datasizeBytes / m.extentsizeBytes), extentsizeBytes: m.extentsizeBytes,
      datasizeBytes: m.datasizeBytes, keepdirty: m.keepdirty, onDisk: this.primaryMeta.map,
    });
    const disk = this.primaryDisk;
    const meta = this.primaryMeta;
    const data: DataStore = {
      sizeBytes: disk.sizeBytes,
      read: (offset, length) => disk.read(offset, length),
      readInto: (offset, buf) => disk.readInto(offset, buf),
      write: (offset, bytes) => disk.write(offset, bytes, fence),
      zero: (offset, length) => disk.zero(offset, length, fence),
      flush: () => disk.flush(fence),
    };
    const metaStore: MetaStore = {
      get metadata() {
        return meta.metadata;
      },
      write: (update, options) => meta.write(update, options, fence),
      readMap: () => meta.readMap(),
      writeMap: (bitmap, options) => meta.writeMap(bitmap, options, fence),
    };
    this.primary = new Primary({
      config: this.config(), data, meta: metaStore, activemap: this.activemap,
      network: this.network(fence), clock: systemClock, hooks: this.hooks("primary"),
      log: this.log("primary", fence), pipeline: this.pipeline, requestSlots: this.requestSlots,
    });
    this.primary.start();
  }

  /**
   * Kills the primary as SIGKILL would, and starts a new one over the same disk and metadata (as
   * the daemon restarts a crashed worker): from this instant nothing the old one does lands (its
   * page cache survives, so what landed stays), its connection is gone, and its requests in
   * flight fail. The new one starts from the on-disk map and metadata.
   */
  crashPrimary(): void {
    const old = this.primary;
    this.fence.alive = false;
    this.dropLink("primary crashed");
    void old.stop().catch(() => {}); // ends its loops and timers; everything it writes is fenced
    this.startPrimary();
  }

  /** Stops the primary and starts it again (as the daemon restarts a resource's worker). */
  async restartPrimary(): Promise<void> {
    await this.primary.stop(); // closes its link
    this.startPrimary();
  }

  private network(fence: Fence): Network {
    return {
      connect: async () => {
        fence.check("connect");
        if (!this.reachable) throw new Error("unreachable (simulated partition)");
        const silent = () => this.silent;
        const client = new MemoryConnection("secondary", (b) => this.tamperToSecondary(b), silent);
        const server = new MemoryConnection("primary", (b) => this.tamperToPrimary(b), silent,
          this.secondary.receivePool);
        client.peer = server;
        server.peer = client;
        this.links.push(client);
        this.connectsMade++;
        // As the daemon does: read the Hello, then hand the connection over.
        server.onFrame = (frame) => {
          server.onFrame = () => {};
          void this.secondary.attach(server, parseHello(frame));
        };
        return client;
      },
    };
  }

  /** Closes the live connection (both sides see it at once, as on a reset); returns false if none. */
  dropLink(reason: string): boolean {
    const live = this.links.filter((c) => !c.closed);
    for (const c of live) c.close(reason);
    this.links.length = 0;
    return live.length > 0;
  }

  async stop(): Promise<void> {
    await this.primary.stop();
    await this.secondary.stop();
    await this.pipeline?.close();
  }
}

/** Waits until the primary reports the pair complete with nothing dirty. */
export async function inSync(s: Sim, what: string, timeoutMs = 10_000): Promise<void> {
  await waitFor(what, () => {
    const st = s.primary.status();
    return st.status === "complete" && st.dirtyBytes === 0 ? true : undefined;
  }, { timeoutMs, intervalMs: 10 });
}

/**
 * For a test file whose tests each run one pair: registers an afterEach that stops the pair of
 * the test (also when its first sync never came, or the test failed). `track` registers a pair
 * the test builds itself; `startPair` builds, starts and waits for the first sync.
 */
export function pairPerTest(): { startPair: (options: SimOptions) => Promise<Sim>; track: (sim: Sim) => Sim } {
  let current: Sim | null = null;
  afterEach(async () => {
    await current?.stop();
    current = null;
  });
  const track = (sim: Sim) => (current = sim);
  const startPair = async (options: SimOptions) => {
    const sim = track(new Sim(options));
    sim.start();
    await inSync(sim, "first connect");
    return sim;
  };
  return { startPair, track };
}

/** `bytes` of a pattern that differs by `seed` and is not a hole. */
export const pattern = (bytes: number, seed: number): Uint8Array =>
  new Uint8Array(bytes).map((_, i) => (i * seed + 11) & 0xff);

/**
 * Gives both sides the counters of a pair that was in step (same resuid, remotecnt 1) until
 * `newer` wrote alone (its localcnt 2, the other's 1): the handshake then syncs from `newer`.
 */
export function makeNewer(sim: Sim, newer: "primary" | "secondary"): void {
  const shared = { resuid: 77n, remotecnt: 1n };
  Object.assign(sim.primaryMeta.metadata, shared, { localcnt: newer === "primary" ? 2n : 1n });
  Object.assign(sim.secondaryMeta.metadata, shared, { localcnt: newer === "secondary" ? 2n : 1n });
}
