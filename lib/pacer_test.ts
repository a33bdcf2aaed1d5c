import { expect, test } from "bun:test";
import { Pacer, RateMeter } from "./pacer.ts";
import type { Clock } from "./remote_link.ts";

const MIB = 1024 * 1024;

/** A clock that only moves when something sleeps on it. */
function fakeClock(): Clock & { slept: number[] } {
  let now = 0;
  const slept: number[] = [];
  return {
    slept,
    now: () => now,
    sleep: async (ms) => {
      slept.push(ms);
      now += ms;
    },
    setInterval: () => ({ stop() {} }),
  };
}

test("pieces start no earlier than the rate allows, in slices of at most 100 ms", async () => {
  const clock = fakeClock();
  const pacer = new Pacer(clock, MIB);
  for (let i = 0; i < 3; i++) await pacer.pace(MIB, () => true);
  // The first piece starts at once, each next one a second after the previous.
  expect(clock.now()).toBe(2000);
  expect(Math.max(...clock.slept)).toBeLessThanOrEqual(100);
});

test("0 is unlimited; a new rate applies at once; keepGoing false stops the wait", async () => {
  const clock = fakeClock();
  const pacer = new Pacer(clock, 0);
  for (let i = 0; i < 5; i++) await pacer.pace(MIB, () => true);
  expect(clock.now()).toBe(0);
  pacer.setRate(MIB / 10); // 10 s per MiB
  await pacer.pace(MIB, () => true);
  expect(clock.now()).toBe(0);
  let checks = 0;
  await pacer.pace(MIB, () => ++checks < 3);
  expect(clock.now()).toBe(200); // two slices of 100 ms, then keepGoing said stop
  expect(pacer.rateBytesPerSecond).toBe(MIB / 10);
});

test("a piece already waiting under the old rate starts once the rate changes", async () => {
  const clock = fakeClock();
  const pacer = new Pacer(clock, MIB / 100); // 100 s per MiB
  await pacer.pace(MIB, () => true); // the first starts at once
  let checks = 0;
  // The next would wait 100 s; the rate is lifted at the third check, after two slices.
  await pacer.pace(MIB, () => {
    if (++checks === 3) pacer.setRate(0);
    return true;
  });
  expect(clock.now()).toBe(200);
});

test("the meter gives the rate over the last 5 s and the time left at it", async () => {
  const clock = fakeClock();
  const meter = new RateMeter(clock);
  expect(meter.measure(0, 10 * MIB)).toEqual({ bytesPerSecond: 0, etaSeconds: null });
  await clock.sleep(1000);
  meter.record(2 * MIB);
  expect(meter.measure(2 * MIB, 8 * MIB)).toEqual({ bytesPerSecond: 2 * MIB, etaSeconds: 4 });
  // Six seconds later without progress: the old samples left the window.
  await clock.sleep(6000);
  expect(meter.measure(2 * MIB, 8 * MIB)).toEqual({ bytesPerSecond: 0, etaSeconds: null });
});
