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
 *
 * A thread that fails (an uncaught error, or an exit while the pipeline is
 * open) must not take replication down with it: the replication link drops
 * its connection when a large write cannot be encoded, so a resync could
 * never finish. The pipeline then stops its threads and computes every job
 * not yet returned, and every later one, inline with payload_codec (the same
 * bytes, on the event loop); `hast list` shows the reason (`failed`) and the
 * count (`inline`). Only close() makes it refuse work.
 */
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import type { ChecksumKind, CompressionKind } from "./config.ts";
import { type CodecOptions, decodePayload, encodePayload } from "./payload_codec.ts";
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
/** How long a thread may take to exit once told to (then it is terminated, or given up on). */
const THREAD_STOP_TIMEOUT_MS = 2000;

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
  /** Why the threads were stopped (a thread failed; jobs are computed inline since), or null. */
  failed: string | null;
  /** Jobs computed inline since a thread failed (also in encoded/decoded when they succeeded). */
  inline: number;
}

interface ThreadLink {
  worker: Worker;
  requests: SpscRing;
  completions: SpscRing;
  outstanding: number;
  /** Settles when the thread has exited (for whatever reason). */
  exited: Promise<void>;
}

interface Job {
  op: CodecOp;
  input: Uint8Array;
  /** The request slot `input` lies in, or -1 (then it is copied into the pipeline's slot). */
  inputSlot: number;
  flags: number;
  length: number;
  codec: CodecOptions;
  /** With the slot holding the thread's result, or null when the job is to be computed inline. */
  resolve: (slot: number | null) => void;
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
  /** close()'s result, once it was called. */
  private closing: Promise<void> | null = null;
  /** Why the threads failed, or null while they serve (see the module comment). */
  private failure: string | null = null;
  private inlineCount = 0;
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
      // An 'error' is followed by an 'exit'; the first one seen gives the reason.
      worker.on("error", (error: Error) => this.threadFailed(`codec thread ${t} failed: ${error.message}`));
      const exited = new Promise<void>((resolve) => worker.once("exit", (code: number) => {
        this.threadFailed(`codec thread ${t} exited with code ${code}`);
        resolve();
      }));
      const link: ThreadLink = { worker, requests, completions, outstanding: 0, exited };
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
   * Same result as payload_codec's encodePayload, computed on a thread (inline once a thread
   * failed). `data` must stay unchanged until this settles (a thread may read it in its request
   * slot, and after a failure it is encoded again inline); the result's pieces may include
   * `data` itself. Rejects with the codec's message if encoding fails.
   */
  async encode(data: Uint8Array, codec: CodecOptions): Promise<{ flags: number; pieces: Uint8Array[] }> {
    assert.ok(data.byteLength <= MAX_IO_BYTES, "Cannot encode: payload larger than MAX_IO_BYTES");
    const slot = await this.submit(CodecOp.Encode, data, 0, data.byteLength, codec);
    if (slot === null) return this.encodeInline(data, codec);
    const meta = this.pool.meta(slot);
    const failed = meta[CodecMeta.Error]! !== 0;
    const flags = meta[CodecMeta.Flags]!;
    const out = this.output(slot).slice(0, meta[CodecMeta.OutLength]!);
    const bodyIsInput = meta[CodecMeta.BodyIsInput] === 1;
    this.release(slot);
    // The output region then holds the thread's message, not a payload.
    if (failed) throw new Error(new TextDecoder().decode(out));
    this.encodedCount++;
    const pieces = bodyIsInput ? [data, out] : [out];
    return { flags, pieces: pieces.filter((piece) => piece.byteLength > 0) };
  }

  /**
   * Same result as payload_codec's decodePayload, computed on a thread (inline once a thread
   * failed); a bad checksum or corrupt data rejects with a ProtocolError. `payload` must stay
   * unchanged until this settles.
   */
  async decode(flags: number, payload: Uint8Array, length: number, checksum: ChecksumKind): Promise<Uint8Array> {
    if (payload.byteLength > PIPELINE_REGION_BYTES || length > MAX_IO_BYTES) {
      throw new ProtocolError(`Cannot accept data: ${payload.byteLength} bytes for length ${length}`);
    }
    const codec: CodecOptions = { compression: "none", checksum };
    const slot = await this.submit(CodecOp.Decode, payload, flags, length, codec);
    if (slot === null) return this.decodeInline(flags, payload, length, checksum);
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
      failed: this.failure,
      inline: this.inlineCount,
    };
  }

  /**
   * Stops the threads; requests not yet returned fail, and so does any later one. Resolves once
   * the threads have exited (every call resolves with the first one).
   */
  close(): Promise<void> {
    this.closing ??= this.stop();
    return this.closing;
  }

  /**
   * Jobs waiting for a slot never reached a thread and fail at once. Jobs on a thread fail only
   * once the threads have exited (or were given up on, as in threadFailed): their callers reuse
   * the input when the job settles (the link frees the request slot it lies in), and a thread
   * still reading it would read another request's data. Found by review: close() failed them at
   * once, while a thread still read them.
   */
  private async stop(): Promise<void> {
    this.closed = true;
    const error = new Error("Cannot run codec: pipeline closed");
    for (const job of this.waiting.splice(0)) job.reject(error);
    if (this.failure === null) { // else the threads are stopped or stopping
      for (const t of this.threads) {
        t.requests.push(STOP_ENTRY); // behind the jobs queued to it: they are run first
        t.requests.notifyConsumer();
      }
    }
    if (!(await this.threadsExited())) await Promise.all(this.threads.map((t) => t.worker.terminate()));
    this.abandonPending((job) => job.reject(error));
  }

  /**
   * Settles every job a thread held, once no thread reads them any more (or one that does not
   * exit was given up on), and frees their slots: nothing allocates a slot after a failure or
   * a close, so even one a stuck thread may still write is freed, and `hast list` shows no slots
   * in use that no request holds.
   */
  private abandonPending(settle: (job: Job) => void): void {
    for (const [slot, job] of this.pending) {
      this.pool.finish(slot);
      this.pool.free(slot);
      settle(job);
    }
    this.pending.clear();
  }

  private encodeInline(data: Uint8Array, codec: CodecOptions): { flags: number; pieces: Uint8Array[] } {
    this.inlineCount++;
    const result = encodePayload(data, codec);
    this.encodedCount++;
    return result;
  }

  private decodeInline(flags: number, payload: Uint8Array, length: number, checksum: ChecksumKind): Uint8Array {
    this.inlineCount++;
    const decoded = decodePayload(flags, payload, length, checksum);
    this.decodedCount++;
    return decoded;
  }

  private output(slot: number): Uint8Array {
    return this.pool.data(slot).subarray(PIPELINE_REGION_BYTES);
  }

  /** Resolves with the slot holding a thread's result, or with null: compute it inline. */
  private submit(
    op: CodecOp, input: Uint8Array, flags: number, length: number, codec: CodecOptions,
  ): Promise<number | null> {
    if (this.closed) return Promise.reject(new Error("Cannot use pipeline: it is closed"));
    if (this.failure !== null) return Promise.resolve(null);
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
    while (!this.closed && this.failure === null) {
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
    if (this.failure !== null) return; // nothing waits: waiting jobs went inline
    const next = this.waiting.shift();
    if (next && !this.dispatch(next)) this.waiting.unshift(next);
  }

  /**
   * A thread failed while the pipeline was open: from now on every job is computed inline
   * (module comment). Jobs waiting for a slot never reached a thread and go inline at once.
   * Jobs on a thread go inline once every thread has exited, so that no thread still reads
   * their input when their caller, seeing the job done, reuses it (a request slot is freed
   * then). Inline and not rejected: the result is the same bytes (the caller keeps the input
   * unchanged until the job settles, and the slot is not read), while a rejection would drop
   * the replication link and start a resync. A thread that does not exit even when terminated
   * is given up on after the timeout: it could still read an input, but it writes only its own
   * slot, which is never read again.
   */
  private threadFailed(reason: string): void {
    if (this.closed || this.failure !== null) return;
    this.failure = reason;
    for (const job of this.waiting.splice(0)) job.resolve(null);
    for (const t of this.threads) void t.worker.terminate();
    void this.threadsExited().then(() => {
      this.abandonPending((job) => job.resolve(null));
      for (const t of this.threads) t.outstanding = 0;
    });
  }

  /** True once every thread has exited; false if some have not within THREAD_STOP_TIMEOUT_MS. */
  private async threadsExited(): Promise<boolean> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), THREAD_STOP_TIMEOUT_MS);
      timer.unref();
    });
    const exited = await Promise.race([Promise.all(this.threads.map((t) => t.exited)).then(() => true), timeout]);
    clearTimeout(timer);
    return exited;
  }
}
