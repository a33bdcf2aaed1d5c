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

/** A clock the test moves (advanceTo), for pieces that wait concurrently. */
function steppedClock(): Clock & { advanceTo(ms: number): Promise<void> } {
  let now = 0;
  const sleepers: { untilMs: number; wake: () => void }[] = [];
  return {
    now: () => now,
    sleep: (ms) => new Promise<void>((wake) => sleepers.push({ untilMs: now + ms, wake })),
    setInterval: () => ({ stop() {} }),
    async advanceTo(ms) {
      await new Promise((resolve) => setImmediate(resolve)); // what runs at the current time
      while (now < ms) {
        now = Math.min(ms, now + 10);
        for (const s of sleepers.splice(0).filter((s) => s.untilMs > now || (s.wake(), false))) sleepers.push(s);
        await new Promise((resolve) => setImmediate(resolve)); // woken pieces run on, or sleep again
      }
    },
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
  // Six seconds later without progress: no progress since the last sample before the window.
  await clock.sleep(6000);
  expect(meter.measure(2 * MIB, 8 * MIB)).toEqual({ bytesPerSecond: 0, etaSeconds: null });
});

// Found by review: below one chunk per window (a 1 MiB chunk every 10 s at a 100 KiB/s limit)
// the window mostly held no progress, so a sync that was progressing showed 0 B/s and no ETA.
// Proves the rate is measured from the last sample before the window: 1 MiB done at once,
// 1 MiB more at 10 s, then 3 s without progress.
test("progress slower than one piece per window still has a rate and an ETA", async () => {
  const clock = fakeClock();
  const meter = new RateMeter(clock);
  meter.record(MIB); // the first chunk goes at once
  await clock.sleep(10_000);
  meter.record(2 * MIB);
  await clock.sleep(3_000);
  // 1 MiB since the last sample before the window (at 0 s), 13 s ago.
  expect(meter.measure(2 * MIB, 8 * MIB)).toEqual({ bytesPerSecond: Math.round(MIB / 13), etaSeconds: 104 });
});

// Found by review: a rate lowered while pieces waited let every waiting piece start at once
// (SYNC_WORKERS chunks, plus the next, unpaced under the new limit). Proves the waiting pieces
// queue again under the new rate: four pieces wait at 1 MiB/s, the rate drops to 0.1 MiB/s, and
// from the next slice on they start 10 s apart.
test("pieces waiting when the rate is lowered queue again under the new rate", async () => {
  const clock = steppedClock();
  const pacer = new Pacer(clock, MIB);
  const startsMs: number[] = [];
  const pieces = Array.from({ length: 4 }, () => pacer.pace(MIB, () => true).then(() => startsMs.push(clock.now())));
  await clock.advanceTo(150);
  expect(startsMs).toEqual([0]); // the others wait until 1, 2 and 3 s
  pacer.setRate(MIB / 10);
  await clock.advanceTo(40_000);
  await Promise.all(pieces);
  // The waiting pieces see the change when their current slice ends, at 200 ms.
  expect(startsMs).toEqual([0, 200, 10_200, 20_200]);
});

// Found by review: a configuration reload sets the rate again, unchanged, and that let waiting
// pieces start at once. Proves setting the same rate leaves the schedule alone: three pieces at
// 1 MiB/s start at 0, 1 and 2 s although the rate is set again (to the same) at 150 ms.
test("setting the rate it already has changes nothing", async () => {
  const clock = steppedClock();
  const pacer = new Pacer(clock, MIB);
  const startsMs: number[] = [];
  const pieces = Array.from({ length: 3 }, () => pacer.pace(MIB, () => true).then(() => startsMs.push(clock.now())));
  await clock.advanceTo(150);
  pacer.setRate(MIB);
  await clock.advanceTo(5_000);
  await Promise.all(pieces);
  expect(startsMs).toEqual([0, 1_000, 2_000]);
});
