/**
 * The SPSC ring: values come out in FIFO order over many laps and across the
 * Int32 counter wrap; full and empty are reported exactly (tryPush false,
 * push asserts, pop -1); popBatch and size agree with a model queue; and the
 * wake-up protocol (announce, re-check, wait on the tail word) neither loses
 * a wake-up nor sleeps when data is there. Cross-thread use is proven in
 * test/pipeline_stress_test.ts.
 */
import { expect, test } from "bun:test";
import { SpscRing } from "./ring.ts";

function makeRing(capacity: number, spinCount = 0): SpscRing {
  const sab = new SharedArrayBuffer(SpscRing.bytesFor(capacity));
  return new SpscRing(sab, 0, capacity, { initialise: true, spinCount });
}

test("bytesFor rounds to 64 and rejects capacities that are not powers of two", () => {
  expect(SpscRing.bytesFor(1)).toBe(256 + 64);
  expect(SpscRing.bytesFor(16)).toBe(256 + 64);
  expect(SpscRing.bytesFor(256)).toBe(256 + 1024);
  for (const bad of [0, 3, 100, -4, 1.5, 2 ** 31]) expect(() => SpscRing.bytesFor(bad)).toThrow();
});

test("values wrap around in FIFO order over many laps with varying fill", () => {
  const ring = makeRing(8);
  const model: number[] = [];
  let next = 0;
  let seed = 12345;
  for (let step = 0; step < 100_000; step++) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    if (seed % 3 !== 0 && model.length < 8) {
      expect(ring.tryPush(next)).toBe(true);
      model.push(next++);
    } else {
      expect(ring.pop()).toBe(model.length > 0 ? model.shift()! : -1);
    }
    expect(ring.size()).toBe(model.length);
  }
  expect(next).toBeGreaterThan(8 * 1000); // many laps
});

test("full and empty: tryPush returns false, push asserts, pop returns -1", () => {
  const ring = makeRing(4);
  expect(ring.isEmpty()).toBe(true);
  expect(ring.pop()).toBe(-1);
  for (let i = 0; i < 4; i++) ring.push(0xffff_fff0 + i);
  expect(ring.isFull()).toBe(true);
  expect(ring.size()).toBe(4);
  expect(ring.tryPush(1)).toBe(false);
  expect(() => ring.push(1)).toThrow("Cannot push: ring is full");
  expect(ring.pop()).toBe(0xffff_fff0); // full u32 range, distinct from -1
  expect(ring.tryPush(7)).toBe(true);
  expect([ring.pop(), ring.pop(), ring.pop(), ring.pop(), ring.pop()]).toEqual([
    0xffff_fff1, 0xffff_fff2, 0xffff_fff3, 7, -1,
  ]);
  expect(ring.isEmpty()).toBe(true);
});

test("push rejects values that are not u32", () => {
  const ring = makeRing(4);
  for (const bad of [-1, 2 ** 32, 1.5, NaN]) expect(() => ring.tryPush(bad)).toThrow();
  expect(ring.size()).toBe(0);
});

test("popBatch takes up to out.length values in order with one head update", () => {
  const ring = makeRing(16);
  const out = new Uint32Array(5);
  expect(ring.popBatch(out)).toBe(0);
  for (let lap = 0; lap < 50; lap++) {
    for (let i = 0; i < 12; i++) ring.push(lap * 100 + i);
    expect(ring.popBatch(out)).toBe(5);
    expect(Array.from(out)).toEqual([0, 1, 2, 3, 4].map((i) => lap * 100 + i));
    expect(ring.size()).toBe(7);
    expect(ring.popBatch(out)).toBe(5);
    expect(ring.popBatch(out)).toBe(2);
    expect(Array.from(out.subarray(0, 2))).toEqual([lap * 100 + 10, lap * 100 + 11]);
    expect(ring.isEmpty()).toBe(true);
  }
});

test("counters wrap past 2^31 without losing or reordering values", () => {
  const capacity = 8;
  const sab = new SharedArrayBuffer(SpscRing.bytesFor(capacity));
  new SpscRing(sab, 0, capacity, { initialise: true });
  // White box: head at byte 64, tail at byte 128; start both just below 2^31.
  const control = new Int32Array(sab);
  control[16] = 0x7fff_fffb;
  control[32] = 0x7fff_fffb;
  const ring = new SpscRing(sab, 0, capacity);
  const out = new Uint32Array(3);
  let next = 0;
  let expected = 0;
  for (let round = 0; round < 20; round++) {
    while (ring.tryPush(next)) next++;
    expect(ring.size()).toBe(capacity);
    for (let count = ring.popBatch(out); count > 0; count = ring.popBatch(out)) {
      for (const value of out.subarray(0, count)) expect(value).toBe(expected++);
    }
  }
  expect(expected).toBe(next);
  expect(control[32]).toBeLessThan(0); // tail really wrapped into negative Int32
});

test("rings laid side by side do not interfere; attaching checks the shape", () => {
  const bytes = SpscRing.bytesFor(4);
  const sab = new SharedArrayBuffer(2 * bytes);
  const a = new SpscRing(sab, 0, 4, { initialise: true });
  const b = new SpscRing(sab, bytes, 4, { initialise: true });
  for (let i = 0; i < 4; i++) a.push(i);
  expect(b.isEmpty()).toBe(true);
  b.push(99);
  expect([a.size(), b.pop(), a.pop()]).toEqual([4, 99, 0]);
  expect(() => new SpscRing(sab, 0, 8)).toThrow("capacity");
  expect(() => new SpscRing(sab, bytes, 2)).toThrow("capacity");
  expect(() => new SpscRing(sab, 32, 4)).toThrow("multiple of 64");
  expect(() => new SpscRing(new SharedArrayBuffer(bytes), 0, 4)).toThrow("not initialised");
});

/**
 * Records what the ring's sleeps do, instead of timing them: every Atomics.wait and
 * Atomics.waitAsync on the thread runs as usual and its outcome ("ok": woken by a notify,
 * "not-equal", "timed-out") is appended to the returned list until `restore` is called.
 */
function spySleeps(): { outcomes: string[]; restore: () => void } {
  const { wait, waitAsync } = Atomics;
  const outcomes: string[] = [];
  Atomics.wait = ((...args: Parameters<typeof wait>) => {
    const outcome = wait(...args);
    outcomes.push(outcome);
    return outcome;
  }) as typeof wait;
  Atomics.waitAsync = ((...args: Parameters<typeof waitAsync>) => {
    const result = waitAsync(...args);
    if (!result.async) outcomes.push(result.value);
    else void result.value.then((outcome) => outcomes.push(outcome));
    return result;
  }) as typeof waitAsync;
  return { outcomes, restore: () => Object.assign(Atomics, { wait, waitAsync }) };
}

test("waitForDataSync returns at once with data and sleeps until the timeout without", () => {
  const ring = makeRing(4);
  const spy = spySleeps();
  try {
    ring.push(1);
    ring.waitForDataSync(10_000);
    expect(spy.outcomes).toEqual([]); // data there: no sleep at all
    ring.pop();
    ring.waitForDataSync(30);
    expect(spy.outcomes).toEqual(["timed-out"]);
  } finally {
    spy.restore();
  }
});

test("waitForData announces sleeping, and a push plus notifyConsumer wakes it", async () => {
  const capacity = 4;
  const sab = new SharedArrayBuffer(SpscRing.bytesFor(capacity));
  const ring = new SpscRing(sab, 0, capacity, { initialise: true });
  const sleeping = () => Atomics.load(new Int32Array(sab), 48); // white box: byte 192
  const spy = spySleeps();
  try {
    let woke = false;
    const waiting = ring.waitForData(60_000).then(() => (woke = true));
    expect(sleeping()).toBe(1);
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(woke).toBe(false);
    ring.push(5);
    ring.notifyConsumer();
    await waiting;
    expect(spy.outcomes).toEqual(["ok"]); // woken by the notify, not timed out
    expect(sleeping()).toBe(0);
    expect(ring.pop()).toBe(5);
  } finally {
    spy.restore();
  }
});

test("with a spin phase, waits return at once when data is there", async () => {
  const ring = makeRing(4, 1000);
  const spy = spySleeps();
  try {
    ring.push(3);
    await ring.waitForData(10_000);
    ring.waitForDataSync(10_000);
    expect(spy.outcomes).toEqual([]); // neither slept
    expect(ring.pop()).toBe(3);
    ring.waitForDataSync(20); // spins 1000 times, then sleeps until the timeout
    expect(spy.outcomes).toEqual(["timed-out"]);
  } finally {
    spy.restore();
  }
});

test("waitForData times out when nothing arrives", async () => {
  const ring = makeRing(4);
  const keepAlive = setInterval(() => {}, 1000); // Bun busy-polls a lone waitAsync
  const spy = spySleeps();
  try {
    await ring.waitForData(30);
    expect(spy.outcomes).toEqual(["timed-out"]);
  } finally {
    spy.restore();
    clearInterval(keepAlive);
  }
});
