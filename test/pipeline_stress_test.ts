/**
 * The staged-pipeline foundation under load across two threads: the main
 * thread (owner of a 256-slot pool) fills requests and passes slot indices to
 * a worker through a small request ring (so tryPush really hits backpressure),
 * the worker returns them through a completion ring, and each request is
 * fanned out with a countdown of 2 (the worker's "remote" part and a "local"
 * part the main thread finishes one loop later), so either side may complete
 * it. For a million requests it proves that every request completes exactly
 * once, every use of a slot is seen by the worker exactly once (a per-slot
 * use count checked against the pool's generation), the data written by one
 * thread is read intact by the other, no slot is lost (all free at the end,
 * generations sum to the request count), and no wake-up is lost (a wait
 * that runs into its 1 s timeout fails the test at once).
 */
import { expect, test } from "bun:test";
import { SpscRing } from "../lib/ring.ts";
import { SlotMeta, SlotPool, SlotState } from "../lib/slot_pool.ts";
import type { StressReport, StressSetup } from "./stress_worker.ts";

const SLOT_COUNT = 256;
const SLOT_DATA_BYTES = 64;
const REQUEST_CAPACITY = 32; // smaller than the pool: the producer meets backpressure
const COMPLETION_CAPACITY = 256; // ≥ slots in flight: the asserting push suffices
const BATCH_MAX = 64;
const STOP = 0xffff_ffff;
/** A wait for completions ends at this timeout only if a wake-up was lost: the workers always
 *  have work to complete by then. Long, so that a merely stalled thread on a loaded machine
 *  is not taken for a lost wake-up. */
const WAIT_TIMEOUT_MS = 10_000;
const STALL_MS = WAIT_TIMEOUT_MS - 500;

interface MainReport {
  completedHere: number;
  backpressured: number;
  sleeps: number;
}

/** Main-thread side: submits, finishes the local part, completes and checks. */
class Driver {
  readonly pool: SlotPool;
  readonly requests: SpscRing;
  readonly completions: SpscRing;
  /** How many times each request sequence number completed (must end all 1). */
  readonly completedBySequence: Uint8Array;
  private readonly sequenceOfSlot = new Int32Array(SLOT_COUNT);
  private localPrevious = new Int32Array(SLOT_COUNT);
  private localCurrent = new Int32Array(SLOT_COUNT);
  private localPreviousCount = 0;
  private localCurrentCount = 0;
  private readonly batch = new Uint32Array(BATCH_MAX);
  private submitted = 0;
  private completed = 0;
  private pending = -1; // allocated and filled, but the request ring was full
  readonly report: MainReport = { completedHere: 0, backpressured: 0, sleeps: 0 };

  constructor(
    readonly setup: StressSetup,
    readonly total: number,
  ) {
    this.pool = new SlotPool(setup.poolBuffer, {
      slotCount: SLOT_COUNT,
      slotDataBytes: SLOT_DATA_BYTES,
      initialise: true,
    });
    this.requests = new SpscRing(setup.ringBuffer, 0, REQUEST_CAPACITY, { initialise: true });
    this.completions = new SpscRing(setup.ringBuffer, setup.completionOffset, COMPLETION_CAPACITY, {
      initialise: true,
    });
    this.completedBySequence = new Uint8Array(total);
  }

  async run(): Promise<void> {
    while (this.completed < this.total) {
      let progressed = this.submit();
      progressed = this.finishLocalParts() || progressed;
      progressed = this.drainCompletions() || progressed;
      if (!progressed) await this.sleep();
    }
    this.requests.push(STOP);
    this.requests.notifyConsumer();
  }

  /** Allocates and pushes until the pool or the request ring runs out. */
  private submit(): boolean {
    let pushed = false;
    while (this.pending >= 0 || this.submitted < this.total) {
      let slot = this.pending;
      if (slot < 0) {
        slot = this.pool.allocate();
        if (slot < 0) break;
        this.fill(slot, this.submitted++);
      }
      if (!this.requests.tryPush(slot)) {
        this.pending = slot;
        this.report.backpressured++;
        break;
      }
      this.pending = -1;
      this.localCurrent[this.localCurrentCount++] = slot;
      pushed = true;
    }
    if (pushed) this.requests.notifyConsumer();
    return pushed;
  }

  private fill(slot: number, sequence: number): void {
    const data = this.pool.data(slot);
    data[0] = sequence & 0xff;
    data[1] = (sequence >>> 8) & 0xff;
    data[2] = (sequence >>> 16) & 0xff;
    data[3] = sequence >>> 24;
    const meta = this.pool.meta(slot);
    meta[SlotMeta.Length] = 4;
    meta[SlotMeta.User0] = sequence;
    this.sequenceOfSlot[slot] = sequence;
    this.pool.setCountdown(slot, 2); // before publishing: local + remote
  }

  /** The "local write" of requests pushed in the previous round finishes now. */
  private finishLocalParts(): boolean {
    const count = this.localPreviousCount;
    for (let i = 0; i < count; i++) {
      const slot = this.localPrevious[i]!;
      if (this.pool.countDown(slot)) {
        // The last party does not know the other's state in general: finish() takes any.
        const previous = this.pool.finish(slot);
        if (previous !== SlotState.InFlight) throw new Error(`slot ${slot} was ${previous}`);
        this.report.completedHere++;
        this.complete(slot);
      }
    }
    const finished = this.localPrevious;
    this.localPrevious = this.localCurrent;
    this.localCurrent = finished;
    this.localPreviousCount = this.localCurrentCount;
    this.localCurrentCount = 0;
    return count > 0;
  }

  private drainCompletions(): boolean {
    const count = this.completions.popBatch(this.batch);
    for (let i = 0; i < count; i++) this.complete(this.batch[i]!);
    return count > 0;
  }

  /** Checks what the worker did to the slot, records the completion, frees the slot. */
  private complete(slot: number): void {
    const meta = this.pool.meta(slot);
    const data = this.pool.data(slot);
    const sequence = this.sequenceOfSlot[slot]!;
    const inverted = data[4]! | (data[5]! << 8) | (data[6]! << 16) | (data[7]! << 24);
    const ok =
      this.pool.state(slot) === SlotState.Done &&
      meta[SlotMeta.User0] === sequence &&
      meta[SlotMeta.User1] === this.pool.generation(slot) && // worker saw this use once
      meta[SlotMeta.OutLength] === 8 &&
      inverted === ~sequence &&
      this.completedBySequence[sequence] === 0;
    if (!ok) throw new Error(`Cannot complete slot ${slot}: request ${sequence} is inconsistent`);
    this.completedBySequence[sequence] = 1;
    this.completed++;
    this.pool.free(slot);
  }

  private async sleep(): Promise<void> {
    const start = performance.now();
    await this.completions.waitForData(WAIT_TIMEOUT_MS);
    this.report.sleeps++;
    const sleptMs = performance.now() - start;
    if (sleptMs > STALL_MS) {
      throw new Error(`Cannot wait for completions: lost wake-up (slept '${sleptMs}' ms)`);
    }
  }
}

function makeSetup(spinCount: number): StressSetup {
  const completionOffset = SpscRing.bytesFor(REQUEST_CAPACITY);
  return {
    poolBuffer: new SharedArrayBuffer(SlotPool.bytesFor(SLOT_COUNT, SLOT_DATA_BYTES)),
    slotCount: SLOT_COUNT,
    slotDataBytes: SLOT_DATA_BYTES,
    ringBuffer: new SharedArrayBuffer(completionOffset + SpscRing.bytesFor(COMPLETION_CAPACITY)),
    requestCapacity: REQUEST_CAPACITY,
    completionOffset,
    completionCapacity: COMPLETION_CAPACITY,
    spinCount,
    stop: STOP,
    batchMax: BATCH_MAX,
  };
}

async function stress(total: number, spinCount: number): Promise<void> {
  const setup = makeSetup(spinCount);
  const driver = new Driver(setup, total);
  const worker = new Worker(new URL("./stress_worker.ts", import.meta.url).href);
  try {
    const reported = new Promise<StressReport>((resolve, reject) => {
      worker.onmessage = (event: MessageEvent) => resolve(event.data as StressReport);
      worker.onerror = (event) => reject(new Error(event.message));
    });
    worker.postMessage(setup);
    const start = performance.now();
    await Promise.race([driver.run(), reported.then((r) => Promise.reject(new Error(r.error)))]);
    const remote = await reported;
    const elapsedMs = performance.now() - start;
    expect(remote.error).toBeUndefined();
    checkEnd(driver, remote, total, spinCount > 0);
    const rate = Math.round(total / (elapsedMs / 1000));
    console.log(
      `stress spin=${spinCount}: ${total} requests in ${elapsedMs.toFixed(0)} ms (${rate}/s); ` +
        `main ${JSON.stringify(driver.report)}, worker ${JSON.stringify(remote)}`,
    );
  } finally {
    worker.terminate();
  }
}

function checkEnd(driver: Driver, remote: StressReport, total: number, spinning: boolean): void {
  const { pool, report } = driver;
  expect(remote.processed).toBe(total);
  expect(report.completedHere + remote.completedHere).toBe(total);
  expect(driver.completedBySequence.every((count) => count === 1)).toBe(true);
  expect(pool.stats()).toEqual({ free: SLOT_COUNT, inUse: 0 });
  let generations = 0;
  for (let slot = 0; slot < SLOT_COUNT; slot++) {
    expect(pool.state(slot)).toBe(SlotState.Free);
    generations += pool.generation(slot);
  }
  expect(generations).toBe(total);
  expect(driver.requests.isEmpty() && driver.completions.isEmpty()).toBe(true);
  // The interesting paths were taken: backpressure and (with a sleeping
  // worker, where each side wins ~20–80 %) both completers.
  expect(report.backpressured).toBeGreaterThan(0);
  if (!spinning) expect(Math.min(report.completedHere, remote.completedHere)).toBeGreaterThan(0);
}

test("1,000,000 requests through two rings with sleeping consumers", async () => {
  await stress(1_000_000, 0);
}, 30_000);

test("200,000 requests through two rings with a spinning worker", async () => {
  await stress(200_000, 2000);
}, 30_000);
