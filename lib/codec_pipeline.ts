/**
 * The codec stage of the data path on worker threads (spec §11): compression
 * and checksums of large payloads run beside the event loop instead of on it.
 *
 * Shape: one SharedArrayBuffer holds a fixed {@linkcode SlotPool} (allocated
 * at start, never grown) and, per worker thread, two bounded SPSC rings of
 * slot indices: requests to the thread and completions back. The event-loop
 * thread owns the pool: it puts a job in a free slot, pushes the index, and
 * resolves the caller's promise when the index comes back. A payload that lies
 * in one of the primary's request slots (lib/request_slots.ts, whose memory
 * the threads also see) is read there; any other is copied into the slot. A
 * thread takes every index queued at a wake-up in one batch, and the event
 * loop drains every completion per wake-up, so the ≈ 50 µs thread hand-off
 * (platform.md) is paid once per batch, not per request.
 *
 * Slot states (asserted by the pool on every transition):
 *   Free → Filled (allocated, input copied in) → Encoding (a thread works on
 *   it) → Encoded (output in the slot) → Done (result copied out) → Free.
 *
 * Only payloads of at least {@linkcode PIPELINE_MIN_BYTES} with real codec
 * work (a checksum or lz4) are sent here: for a 4 KiB write the hand-off
 * costs more than the work, so the single-request path stays inline
 * ({@linkcode CodecPipeline.wants}). When every slot is busy, callers wait
 * in FIFO order (backpressure); their number is bounded by the replication
 * link's in-flight limit and shown by `hast list`.
 *
 * Slot data: an input region then an output region, each large enough for a
 * MAX_IO_BYTES payload after lz4's worst-case growth plus a checksum.
 */
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import type { ChecksumKind, CompressionKind } from "./config.ts";
import type { CodecOptions } from "./payload_codec.ts";
import { SpscRing } from "./ring.ts";
import type { RequestSlots, RequestSlotsShape } from "./request_slots.ts";
import { SlotPool, SlotMeta, SlotState } from "./slot_pool.ts";
import { MAX_IO_BYTES, ProtocolError } from "./wire.ts";

/** Worker threads of the codec stage (this kind of machine has two cores). */
export const PIPELINE_THREADS = 2;
/** Request slots shared by the threads. */
export const PIPELINE_SLOTS = 16;
/** Smaller payloads are encoded inline: the hand-off would cost more than it saves. */
export const PIPELINE_MIN_BYTES = 64 * 1024;
/** One region of a slot: a MAX_IO_BYTES payload, lz4's worst-case growth, the checksum. */
export const PIPELINE_REGION_BYTES = MAX_IO_BYTES + 64 * 1024;

/** Opcodes in CodecMeta.Op. */
export const enum CodecOp {
  Encode = 1,
  Decode = 2,
}

/** Where a job's input is (CodecMeta.InputRegion). */
export const enum InputRegion {
  /** Copied into the codec slot's input region. */
  Own = 1,
  /** In a request slot of the primary (CodecMeta.InputSlot, at CodecMeta.InputOffset). */
  RequestSlot = 2,
}

/**
 * The caller words of a codec slot (its pool carries codec jobs, not device requests, so the
 * words get the job's names; each is one of the pool's SlotMeta words).
 */
export const enum CodecMeta {
  Op = SlotMeta.Command,
  /** In: the frame flags of a payload to decode. Out: the flags of the encoded payload. */
  Flags = SlotMeta.Flags,
  InputRegion = SlotMeta.OffsetLo,
  InputSlot = SlotMeta.OffsetHi,
  /** The decoded length (a decode's expected output). */
  Length = SlotMeta.Length,
  OutLength = SlotMeta.OutLength,
  /** 0, or 1 when the job failed (the output region then holds the message). */
  Error = SlotMeta.Error,
  /** 1 when the result's body is the input unchanged (only a trailer was written out). */
  BodyIsInput = SlotMeta.CookieLo,
  InputOffset = SlotMeta.CookieHi,
  InputBytes = SlotMeta.User0,
  /** Indices into COMPRESSIONS and CHECKSUMS. */
  Compression = SlotMeta.User1,
  Checksum = SlotMeta.User2,
}

/** Ring entry that tells a thread to exit. */
export const STOP_ENTRY = 0xffffffff;

export const COMPRESSIONS: readonly CompressionKind[] = ["none", "hole", "lz4"];
export const CHECKSUMS: readonly ChecksumKind[] = ["none", "crc32", "sha256"];

/** What a thread needs to attach to the shared memory (its `workerData`). */
export interface CodecWorkerData {
  sab: SharedArrayBuffer;
  slotCount: number;
  slotDataBytes: number;
  poolOffset: number;
  requestsOffset: number;
  completionsOffset: number;
  ringCapacity: number;
  /** The primary's request slots, whose payloads are encoded where they lie. */
  inputs: RequestSlotsShape | null;
}

/** Counters and depths, shown by `hast list`. */
export interface PipelineStats {
  threads: number;
  slots: number;
  slotsInUse: number;
  /** Callers waiting for a free slot now. */
  waitingForSlot: number;
  /** Requests queued to or running on each thread now. */
  threadQueueDepths: number[];
  encoded: number;
  /** Of those, encoded from a request slot without a copy. */
  encodedInPlace: number;
  decoded: number;
  /** Completions taken per wake-up of the event loop, on average. */
  completionsPerWake: number;
}

interface ThreadLink {
  worker: Worker;
  requests: SpscRing;
  completions: SpscRing;
  outstanding: number;
}

interface Job {
  op: CodecOp;
  input: Uint8Array;
  /** The request slot `input` lies in, or -1 (then it is copied into the pipeline's slot). */
  inputSlot: number;
  flags: number;
  length: number;
  codec: CodecOptions;
  resolve: (slot: number) => void;
  reject: (error: Error) => void;
}

/** Encodes and decodes payloads on worker threads; see the module comment. */
export class CodecPipeline {
  private readonly pool: SlotPool;
  private readonly threads: ThreadLink[] = [];
  private readonly pending = new Map<number, Job>();
  private readonly waiting: Job[] = [];
  private readonly batch: Uint32Array;
  private closed = false;
  private encodedCount = 0;
  private encodedInPlace = 0;
  private decodedCount = 0;
  private wakes = 0;
  private completions = 0;

  private constructor(
    threadCount: number, slotCount: number, workerUrl: string | URL, private readonly inputs: RequestSlots | null,
  ) {
    assert.ok(threadCount >= 1 && slotCount >= 1, "Cannot start pipeline: no threads or slots");
    const ringCapacity = 2 ** Math.ceil(Math.log2(slotCount + 1));
    const ringBytes = SpscRing.bytesFor(ringCapacity);
    const poolBytes = SlotPool.bytesFor(slotCount, 2 * PIPELINE_REGION_BYTES);
    const ringsBytes = Math.ceil((2 * threadCount * ringBytes) / 4096) * 4096;
    const sab = new SharedArrayBuffer(ringsBytes + poolBytes);
    this.pool = new SlotPool(sab, {
      slotCount, slotDataBytes: 2 * PIPELINE_REGION_BYTES, byteOffset: ringsBytes, initialise: true,
    });
    this.batch = new Uint32Array(ringCapacity);
    for (let t = 0; t < threadCount; t++) {
      const requestsOffset = 2 * t * ringBytes;
      const completionsOffset = requestsOffset + ringBytes;
      const requests = new SpscRing(sab, requestsOffset, ringCapacity, { initialise: true });
      const completions = new SpscRing(sab, completionsOffset, ringCapacity, { initialise: true });
      const workerData: CodecWorkerData = {
        sab, slotCount, slotDataBytes: 2 * PIPELINE_REGION_BYTES, poolOffset: ringsBytes,
        requestsOffset, completionsOffset, ringCapacity, inputs: inputs?.shape ?? null,
      };
      const worker = new Worker(workerUrl, { workerData });
      worker.unref();
      worker.on("error", (error: Error) => this.fail(`codec thread ${t} failed: ${error.message}`));
      const link: ThreadLink = { worker, requests, completions, outstanding: 0 };
      this.threads.push(link);
      void this.drain(link);
    }
  }

  /**
   * Starts the threads. `workerUrl` defaults to workers/codec_worker.ts, which
   * `npm run build` compiles into the binary as an extra entry point. Payloads in `inputs` (the
   * primary's request slots) are encoded where they lie.
   */
  static start(
    options: { threads?: number; slots?: number; workerUrl?: string | URL; inputs?: RequestSlots | null } = {},
  ): CodecPipeline {
    // In the compiled binary the entry is found by its build path (platform.md); from source,
    // by a URL object relative to this file, so that any working directory will do.
    const compiled = Bun.main.startsWith("/$bunfs");
    const workerUrl = options.workerUrl ??
      (compiled ? "./workers/codec_worker.ts" : new URL("../workers/codec_worker.ts", import.meta.url));
    return new CodecPipeline(
      options.threads ?? PIPELINE_THREADS, options.slots ?? PIPELINE_SLOTS, workerUrl, options.inputs ?? null,
    );
  }

  /** True when a payload is worth a hand-off: large, and a checksum or lz4 to compute. */
  static wants(bytes: number, codec: CodecOptions): boolean {
    return bytes >= PIPELINE_MIN_BYTES && (codec.checksum !== "none" || codec.compression === "lz4");
  }

  /**
   * Same result as payload_codec's encodePayload, computed on a thread. A `data` in a request
   * slot must stay unchanged until this settles (the thread reads it there); the result's
   * pieces may include `data` itself.
   */
  async encode(data: Uint8Array, codec: CodecOptions): Promise<{ flags: number; pieces: Uint8Array[] }> {
    assert.ok(data.byteLength <= MAX_IO_BYTES, "Cannot encode: payload larger than MAX_IO_BYTES");
    const slot = await this.submit(CodecOp.Encode, data, 0, data.byteLength, codec);
    const meta = this.pool.meta(slot);
    const flags = meta[CodecMeta.Flags]!;
    const out = this.output(slot).slice(0, meta[CodecMeta.OutLength]!);
    const bodyIsInput = meta[CodecMeta.BodyIsInput] === 1;
    this.release(slot);
    this.encodedCount++;
    const pieces = bodyIsInput ? [data, out] : [out];
    return { flags, pieces: pieces.filter((piece) => piece.byteLength > 0) };
  }

  /**
   * Same result as payload_codec's decodePayload, computed on a thread; a bad
   * checksum or corrupt data rejects with a ProtocolError.
   */
  async decode(flags: number, payload: Uint8Array, length: number, checksum: ChecksumKind): Promise<Uint8Array> {
    if (payload.byteLength > PIPELINE_REGION_BYTES || length > MAX_IO_BYTES) {
      throw new ProtocolError(`Cannot accept data: ${payload.byteLength} bytes for length ${length}`);
    }
    const codec: CodecOptions = { compression: "none", checksum };
    const slot = await this.submit(CodecOp.Decode, payload, flags, length, codec);
    const meta = this.pool.meta(slot);
    const failed = meta[CodecMeta.Error]! !== 0;
    const outBytes = meta[CodecMeta.OutLength]!;
    // A body that needed no expansion is the front of the payload we already hold.
    const out = meta[CodecMeta.BodyIsInput] === 1 && !failed
      ? payload.subarray(0, outBytes)
      : this.output(slot).slice(0, outBytes);
    this.release(slot);
    if (failed) throw new ProtocolError(new TextDecoder().decode(out));
    this.decodedCount++;
    return out;
  }

  stats(): PipelineStats {
    return {
      threads: this.threads.length,
      slots: this.pool.slotCount,
      slotsInUse: this.pool.stats().inUse,
      waitingForSlot: this.waiting.length,
      threadQueueDepths: this.threads.map((t) => t.outstanding),
      encoded: this.encodedCount,
      encodedInPlace: this.encodedInPlace,
      decoded: this.decodedCount,
      completionsPerWake: this.wakes === 0 ? 0 : Math.round((this.completions / this.wakes) * 100) / 100,
    };
  }

  /** Stops the threads; requests still queued fail. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.fail("pipeline closed");
    for (const t of this.threads) {
      t.requests.push(STOP_ENTRY);
      t.requests.notifyConsumer();
    }
    await Promise.all(this.threads.map((t) => new Promise<void>((resolve) => {
      t.worker.once("exit", () => resolve());
      setTimeout(() => void t.worker.terminate().then(() => resolve()), 2000).unref();
    })));
  }

  private output(slot: number): Uint8Array {
    return this.pool.data(slot).subarray(PIPELINE_REGION_BYTES);
  }

  private submit(
    op: CodecOp, input: Uint8Array, flags: number, length: number, codec: CodecOptions,
  ): Promise<number> {
    if (this.closed) return Promise.reject(new Error("Cannot use pipeline: it is closed"));
    const inputSlot = op === CodecOp.Encode && this.inputs ? this.inputs.slotOf(input) : -1;
    return new Promise((resolve, reject) => {
      const job: Job = { op, input, inputSlot, flags, length, codec, resolve, reject };
      if (this.waiting.length > 0 || !this.dispatch(job)) this.waiting.push(job);
    });
  }

  /** Puts a job in a free slot and hands it to the least busy thread; false if none is free. */
  private dispatch(job: Job): boolean {
    const slot = this.pool.allocate();
    if (slot < 0) return false;
    const meta = this.pool.meta(slot);
    if (job.inputSlot >= 0) {
      meta[CodecMeta.InputRegion] = InputRegion.RequestSlot;
      meta[CodecMeta.InputSlot] = job.inputSlot;
      meta[CodecMeta.InputOffset] = job.input.byteOffset - this.inputs!.pool.data(job.inputSlot).byteOffset;
      this.encodedInPlace++;
    } else {
      meta[CodecMeta.InputRegion] = InputRegion.Own;
      this.pool.data(slot).set(job.input, 0);
    }
    meta[CodecMeta.Op] = job.op;
    meta[CodecMeta.Flags] = job.flags;
    meta[CodecMeta.Length] = job.length;
    meta[CodecMeta.InputBytes] = job.input.byteLength;
    meta[CodecMeta.Compression] = COMPRESSIONS.indexOf(job.codec.compression);
    meta[CodecMeta.Checksum] = CHECKSUMS.indexOf(job.codec.checksum);
    this.pending.set(slot, job);
    let target = this.threads[0]!;
    for (const t of this.threads) if (t.outstanding < target.outstanding) target = t;
    target.outstanding++;
    target.requests.push(slot); // cannot be full: capacity > slot count
    target.requests.notifyConsumer();
    return true;
  }

  /** Event-loop side of one thread: takes every completion there is per wake-up. */
  private async drain(t: ThreadLink): Promise<void> {
    while (!this.closed) {
      const n = t.completions.popBatch(this.batch);
      if (n === 0) {
        await t.completions.waitForData(1000);
        continue;
      }
      this.wakes++;
      this.completions += n;
      for (let i = 0; i < n; i++) {
        const slot = this.batch[i]!;
        t.outstanding--;
        this.pool.transition(slot, SlotState.Encoded, SlotState.Done);
        const job = this.pending.get(slot);
        assert.ok(job, `Cannot complete slot ${slot}: no job waits for it`);
        this.pending.delete(slot);
        job.resolve(slot);
      }
    }
  }

  /** Frees a slot whose result was copied out, and starts the next waiting job. */
  private release(slot: number): void {
    this.pool.free(slot);
    const next = this.waiting.shift();
    if (next && !this.dispatch(next)) this.waiting.unshift(next);
  }

  private fail(reason: string): void {
    this.closed = true;
    const error = new Error(`Cannot run codec: ${reason}`);
    for (const job of this.waiting.splice(0)) job.reject(error);
    for (const job of this.pending.values()) job.reject(error);
    this.pending.clear();
  }
}
