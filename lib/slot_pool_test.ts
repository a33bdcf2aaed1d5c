/**
 * The slot pool: allocation hands out every slot once and then -1, freed
 * slots are reused with a new generation and zeroed metadata, the state
 * machine rejects illegal or stale transitions and double frees, data buffers
 * are disjoint and 4096-aligned, and the fan-out countdown is won exactly
 * once per arming even when two threads decrement the same slots at the same
 * time (a worker thread races the main thread over many rounds).
 */
import { expect, test } from "bun:test";
import {
  readMetaOffset,
  SLOT_META_WORDS,
  SlotMeta,
  SlotPool,
  SlotState,
  writeMetaOffset,
} from "./slot_pool.ts";

function makePool(slotCount: number, slotDataBytes: number): SlotPool {
  const sab = new SharedArrayBuffer(SlotPool.bytesFor(slotCount, slotDataBytes));
  return new SlotPool(sab, { slotCount, slotDataBytes, initialise: true });
}

function complete(pool: SlotPool, slot: number): void {
  pool.transition(slot, SlotState.Filled, SlotState.Done);
  pool.free(slot);
}

test("allocate hands out every slot once, then -1; free makes it reusable", () => {
  const pool = makePool(8, 100);
  const taken = new Set<number>();
  for (let i = 0; i < 8; i++) {
    const slot = pool.allocate();
    expect(slot).toBeGreaterThanOrEqual(0);
    expect(pool.state(slot)).toBe(SlotState.Filled);
    expect(pool.generation(slot)).toBe(1);
    taken.add(slot);
  }
  expect(taken.size).toBe(8);
  expect(pool.allocate()).toBe(-1);
  expect(pool.stats()).toEqual({ free: 0, inUse: 8 });
  complete(pool, 5);
  expect(pool.stats()).toEqual({ free: 1, inUse: 7 });
  expect(pool.allocate()).toBe(5);
  expect(pool.generation(5)).toBe(2);
  expect(pool.allocate()).toBe(-1);
  for (const slot of taken) complete(pool, slot);
  expect(pool.stats()).toEqual({ free: 8, inUse: 0 });
});

test("metadata is zeroed on allocate and the offset survives 64 bits of range", () => {
  const pool = makePool(2, 16);
  const slot = pool.allocate();
  const meta = pool.meta(slot);
  expect(meta.length).toBe(SLOT_META_WORDS);
  meta[SlotMeta.Length] = 4096;
  meta[SlotMeta.User2] = -1;
  for (const offset of [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32 + 5, 2 ** 52 + 3]) {
    writeMetaOffset(meta, offset);
    expect(readMetaOffset(meta)).toBe(offset);
  }
  expect(() => writeMetaOffset(meta, -1)).toThrow();
  complete(pool, slot);
  expect(pool.allocate()).toBe(slot);
  expect(Array.from(pool.meta(slot))).toEqual(new Array(SLOT_META_WORDS).fill(0));
  expect(pool.state(1 - slot)).toBe(SlotState.Free); // neighbour untouched
});

test("data buffers are disjoint, slotDataBytes long and 4096-aligned in the buffer", () => {
  const pool = makePool(4, 5000);
  const views = [0, 1, 2, 3].map((slot) => pool.data(slot));
  views.forEach((view, slot) => {
    expect(view.length).toBe(5000);
    expect(view.byteOffset % 4096).toBe(0);
    view.fill(slot + 1);
  });
  views.forEach((view, slot) => expect(view.every((byte) => byte === slot + 1)).toBe(true));
  expect(SlotPool.bytesFor(4, 5000) % 4096).toBe(0);
  expect(() => pool.data(4)).toThrow("not in [0, 4)");
  expect(() => pool.meta(-1)).toThrow();
});

test("slotContaining finds a view's slot, at a pool's offset too; other memory is -1", () => {
  const sab = new SharedArrayBuffer(8192 + SlotPool.bytesFor(3, 5000));
  const pool = new SlotPool(sab, { slotCount: 3, slotDataBytes: 5000, byteOffset: 8192, initialise: true });
  for (const slot of [0, 1, 2]) {
    const data = pool.data(slot);
    expect(pool.slotContaining(data)).toBe(slot);
    expect(pool.slotContaining(data.subarray(4000, 5000))).toBe(slot);
  }
  expect(pool.slotContaining(new Uint8Array(5000))).toBe(-1);
  // Memory of the pool's buffer that is not one slot's data: its header, or across two slots.
  expect(() => pool.slotContaining(new Uint8Array(sab, 8192, 64))).toThrow("not in one slot's data");
  const first = pool.data(0);
  expect(() => pool.slotContaining(new Uint8Array(sab, first.byteOffset + 4096, 4096))).toThrow("not in one slot");
});

test("the full pipeline path and the shortcuts are allowed edges", () => {
  const pool = makePool(2, 0);
  const slot = pool.allocate();
  pool.transition(slot, SlotState.Filled, SlotState.Encoding);
  pool.transition(slot, SlotState.Encoding, SlotState.Encoded);
  pool.transition(slot, SlotState.Encoded, SlotState.Sending);
  pool.transition(slot, SlotState.Sending, SlotState.InFlight);
  pool.transition(slot, SlotState.InFlight, SlotState.Done);
  pool.free(slot);
  const raw = pool.allocate();
  pool.transition(raw, SlotState.Filled, SlotState.Sending); // no encoding stage
  pool.transition(raw, SlotState.Sending, SlotState.Done); // aborted: peer gone
  pool.free(raw);
  const fanned = pool.allocate();
  pool.transition(fanned, SlotState.Filled, SlotState.InFlight); // to several paths at once
  pool.transition(fanned, SlotState.InFlight, SlotState.Done);
  pool.free(fanned);
});

test("illegal or stale transitions and double frees throw and change nothing", () => {
  const pool = makePool(2, 0);
  const slot = pool.allocate();
  expect(() => pool.transition(slot, SlotState.Filled, SlotState.Encoded)).toThrow("not allowed");
  expect(() => pool.transition(slot, SlotState.Encoded, SlotState.Filled)).toThrow("not allowed");
  expect(() => pool.transition(slot, SlotState.Done, SlotState.Free)).toThrow("not allowed");
  expect(() => pool.transition(slot, SlotState.Free, SlotState.Filled)).toThrow("not allowed");
  expect(() => pool.transition(slot, SlotState.Encoding, SlotState.Encoded)).toThrow(
    "state is 'Filled', expected Encoding",
  );
  expect(pool.state(slot)).toBe(SlotState.Filled);
  expect(() => pool.free(slot)).toThrow("state is 'Filled'");
  pool.transition(slot, SlotState.Filled, SlotState.Encoding);
  expect(() => pool.transition(slot, SlotState.Filled, SlotState.Encoding)).toThrow(); // twice
  pool.transition(slot, SlotState.Encoding, SlotState.Done);
  pool.free(slot);
  expect(() => pool.free(slot)).toThrow("state is 'Free'");
  expect(pool.stats()).toEqual({ free: 2, inUse: 0 });
  expect(() => pool.transition(7, SlotState.Filled, SlotState.Done)).toThrow("not in [0, 2)");
});

test("finish moves a live slot of unknown state to Done and returns that state", () => {
  const pool = makePool(2, 0);
  const slot = pool.allocate();
  pool.transition(slot, SlotState.Filled, SlotState.Encoding);
  expect(pool.finish(slot)).toBe(SlotState.Encoding);
  expect(pool.state(slot)).toBe(SlotState.Done);
  expect(() => pool.finish(slot)).toThrow("state is 'Done', not live");
  pool.free(slot);
  expect(() => pool.finish(slot)).toThrow("state is 'Free', not live");
});

test("countdown: set once, counted to zero once, guarded against misuse", () => {
  const pool = makePool(2, 0);
  const slot = pool.allocate();
  expect(() => pool.countDown(slot)).toThrow("not running");
  pool.setCountdown(slot, 3);
  expect(() => pool.setCountdown(slot, 2)).toThrow("running");
  expect([pool.countDown(slot), pool.countDown(slot)]).toEqual([false, false]);
  pool.transition(slot, SlotState.Filled, SlotState.Sending);
  expect(() => pool.free(slot)).toThrow(); // not Done
  expect(pool.countDown(slot)).toBe(true);
  expect(() => pool.countDown(slot)).toThrow("not running");
  pool.transition(slot, SlotState.Sending, SlotState.Done);
  expect(() => pool.setCountdown(slot, 1)).toThrow("Free or Done");
  pool.free(slot);
  expect(() => pool.setCountdown(slot, 1)).toThrow("Free or Done");
});

test("attaching checks the shape; only the owner thread allocates", async () => {
  const sab = new SharedArrayBuffer(SlotPool.bytesFor(4, 64));
  expect(() => new SlotPool(sab, { slotCount: 4, slotDataBytes: 64 })).toThrow("not initialised");
  new SlotPool(sab, { slotCount: 4, slotDataBytes: 64, initialise: true });
  expect(() => new SlotPool(sab, { slotCount: 2, slotDataBytes: 64 })).toThrow("differs");
  const attached = new SlotPool(sab, { slotCount: 4, slotDataBytes: 64 });
  expect(attached.allocate()).toBe(0); // same thread: the owner
  const result = await runWorker(
    `const pool = new SlotPool(data.sab, { slotCount: 4, slotDataBytes: 64 });
     let error = ""; try { pool.allocate(); } catch (e) { error = String(e.message); }
     const owner = new SlotPool(data.sab, { slotCount: 4, slotDataBytes: 64, owner: true });
     return [error, owner.allocate()];`,
    { sab },
  );
  expect(result).toEqual([expect.stringContaining("is not the owner"), 1]);
  expect(() => attached.allocate()).toThrow("is not the owner");
});

test("two threads decrementing the same countdowns: exactly one reaches zero", async () => {
  const slotCount = 4096;
  const sab = new SharedArrayBuffer(SlotPool.bytesFor(slotCount, 0));
  const pool = new SlotPool(sab, { slotCount, slotDataBytes: 0, initialise: true });
  const control = new Int32Array(new SharedArrayBuffer(8)); // [round started, round finished]
  const workerWins = new Uint8Array(new SharedArrayBuffer(slotCount));
  for (let i = 0; i < slotCount; i++) pool.allocate();
  const worker = startWorker(COUNTDOWN_RACER, { control, workerWins, slotCount, sab });
  try {
    const wins = { main: 0, worker: 0 };
    const deadline = performance.now() + 10_000;
    // At least 100 rounds, and on until both threads have won some slots (the
    // decrements really interleaved), which a busy machine may delay.
    for (let round = 1; round <= 100 || wins.main === 0 || wins.worker === 0; round++) {
      expect(performance.now()).toBeLessThan(deadline);
      for (let slot = 0; slot < slotCount; slot++) pool.setCountdown(slot, 2);
      Atomics.store(control, 0, round); // the worker spins on this word, so both start together
      const mainWins = new Uint8Array(slotCount);
      for (let slot = 0; slot < slotCount; slot++) mainWins[slot] = pool.countDown(slot) ? 1 : 0;
      while (Atomics.load(control, 1) !== round) Atomics.wait(control, 1, round - 1, 10);
      for (let slot = 0; slot < slotCount; slot++) {
        const winners = mainWins[slot]! + workerWins[slot]!;
        if (winners !== 1) throw new Error(`slot ${slot} round ${round}: ${winners} winners`);
        wins.main += mainWins[slot]!;
        wins.worker += workerWins[slot]!;
      }
    }
    Atomics.store(control, 0, -1);
    expect(await worker.result).toBe("done");
  } finally {
    worker.terminate();
  }
});

const COUNTDOWN_RACER = `
  const { control, workerWins, slotCount } = data;
  const pool = new SlotPool(data.sab, { slotCount, slotDataBytes: 0 });
  for (let round = 1; ; round++) {
    for (let spins = 0; Atomics.load(control, 0) !== round; spins++) {
      if (Atomics.load(control, 0) === -1) return "done";
      if (spins > 1e9) throw new Error("main thread never started round " + round);
    }
    for (let slot = 0; slot < slotCount; slot++) workerWins[slot] = pool.countDown(slot) ? 1 : 0;
    Atomics.store(control, 1, round);
    Atomics.notify(control, 1);
  }
`;

interface RunningWorker {
  result: Promise<unknown>;
  terminate(): void;
}

/**
 * Runs `body` (with SlotPool, SlotState and `data` in scope) in a worker
 * thread; `result` settles with its return value or its error.
 */
function startWorker(body: string, data: Record<string, unknown>): RunningWorker {
  const poolUrl = new URL("./slot_pool.ts", import.meta.url).href;
  const code = `import { SlotPool, SlotState } from ${JSON.stringify(poolUrl)};
    self.onmessage = (event) => {
      const data = event.data;
      try { self.postMessage({ ok: (() => { ${body} })() }); }
      catch (error) { self.postMessage({ error: String(error && error.stack || error) }); }
    };`;
  const url = URL.createObjectURL(new Blob([code], { type: "text/javascript" }));
  const worker = new Worker(url);
  const result = new Promise<unknown>((resolve, reject) => {
    worker.onmessage = (event: MessageEvent) => {
      const reply = event.data as { ok?: unknown; error?: string };
      if (reply.error !== undefined) reject(new Error(reply.error));
      else resolve(reply.ok);
    };
    worker.onerror = (event) => reject(new Error(event.message));
  });
  worker.postMessage(data);
  return {
    result,
    terminate: () => {
      worker.terminate();
      URL.revokeObjectURL(url);
    },
  };
}

async function runWorker(body: string, data: Record<string, unknown>): Promise<unknown> {
  const worker = startWorker(body, data);
  try {
    return await worker.result;
  } finally {
    worker.terminate();
  }
}
