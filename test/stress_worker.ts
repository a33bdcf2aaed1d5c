/**
 * Worker side of test/pipeline_stress_test.ts: plays the "remote" path of a
 * fanned-out request. It pops slot indices in batches from the request ring,
 * checks and "encodes" each slot (walking it through Encoding → Encoded →
 * Sending → InFlight), records per slot how many uses it has seen, counts
 * down, and — when it is the last party — moves the slot to Done and pushes
 * it onto the completion ring. The `stop` value ends the loop; a sleep that
 * runs into its 1 s timeout means a lost wake-up and fails the run.
 */
import { SpscRing } from "../lib/ring.ts";
import { SlotMeta, SlotPool, SlotState } from "../lib/slot_pool.ts";

declare const self: Worker;

/** What the main thread sends to start the worker. */
export interface StressSetup {
  poolBuffer: SharedArrayBuffer;
  slotCount: number;
  slotDataBytes: number;
  ringBuffer: SharedArrayBuffer;
  requestCapacity: number;
  completionOffset: number;
  completionCapacity: number;
  /** Consumer spin count for the request ring. */
  spinCount: number;
  /** The request value that ends the loop. */
  stop: number;
  batchMax: number;
}

/** What the worker sends back when stopped (or `error` if it failed). */
export interface StressReport {
  processed: number;
  completedHere: number;
  batches: number;
  sleeps: number;
  error?: string;
}

const STALL_MS = 900;

self.onmessage = (event: MessageEvent) => {
  try {
    self.postMessage(run(event.data as StressSetup));
  } catch (error) {
    const report: StressReport = {
      processed: 0, completedHere: 0, batches: 0, sleeps: 0,
      error: String((error as Error).stack ?? error),
    };
    self.postMessage(report);
  }
};

function run(setup: StressSetup): StressReport {
  const { slotCount, slotDataBytes } = setup;
  const pool = new SlotPool(setup.poolBuffer, { slotCount, slotDataBytes });
  const requests = new SpscRing(setup.ringBuffer, 0, setup.requestCapacity, {
    spinCount: setup.spinCount,
  });
  const completions = new SpscRing(
    setup.ringBuffer,
    setup.completionOffset,
    setup.completionCapacity,
  );
  const usesSeen = new Uint32Array(slotCount);
  const batch = new Uint32Array(setup.batchMax);
  const report: StressReport = { processed: 0, completedHere: 0, batches: 0, sleeps: 0 };
  for (;;) {
    const count = requests.popBatch(batch);
    if (count === 0) {
      const start = performance.now();
      requests.waitForDataSync(1000);
      report.sleeps++;
      const sleptMs = performance.now() - start;
      if (sleptMs > STALL_MS) {
        throw new Error(`Cannot wait for requests: lost wake-up (slept '${sleptMs}' ms)`);
      }
      continue;
    }
    report.batches++;
    for (let i = 0; i < count; i++) {
      const slot = batch[i]!;
      if (slot === setup.stop) return report;
      usesSeen[slot]!++;
      encode(pool, slot, usesSeen[slot]!);
      report.processed++;
      // The last party completes; the main thread's "local" part may come first or last.
      if (pool.countDown(slot)) {
        pool.transition(slot, SlotState.InFlight, SlotState.Done);
        completions.push(slot); // room guaranteed: capacity ≥ slotCount
        report.completedHere++;
      }
    }
    completions.notifyConsumer();
  }
}

/** Checks the request the main thread wrote and writes the "encoded" output. */
function encode(pool: SlotPool, slot: number, uses: number): void {
  pool.transition(slot, SlotState.Filled, SlotState.Encoding);
  const meta = pool.meta(slot);
  const data = pool.data(slot);
  const sequence = meta[SlotMeta.User0]!;
  const written = data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24);
  if (written !== sequence || meta[SlotMeta.Length] !== 4) {
    throw new Error(`Cannot encode slot ${slot}: data '${written}' does not match ${sequence}`);
  }
  const inverted = ~sequence;
  data[4] = inverted & 0xff;
  data[5] = (inverted >>> 8) & 0xff;
  data[6] = (inverted >>> 16) & 0xff;
  data[7] = inverted >>> 24;
  meta[SlotMeta.OutLength] = 8;
  meta[SlotMeta.User1] = uses;
  pool.transition(slot, SlotState.Encoding, SlotState.Encoded);
  pool.transition(slot, SlotState.Encoded, SlotState.Sending);
  pool.transition(slot, SlotState.Sending, SlotState.InFlight);
}
