/**
 * The primary's request slots: sizes served, fallback when all are busy, the countdown that
 * frees a slot only after its last party, and refusals of misuse (a slot freed twice, handed on
 * twice, or given back after it was handed on would let two requests share one buffer).
 */
import { expect, test } from "bun:test";
import { RequestSlots } from "./request_slots.ts";
import { SlotState } from "./slot_pool.ts";

const KIB = 1024;

test("take serves sizes in [minBytes, slotBytes] from distinct slots, then falls back", () => {
  const slots = new RequestSlots(2, 128 * KIB, 64 * KIB);
  expect(slots.take(64 * KIB - 1)).toBeNull(); // small: copied by the caller instead
  expect(slots.take(128 * KIB + 1)).toBeNull(); // larger than a slot
  const a = slots.take(64 * KIB)!;
  const b = slots.take(128 * KIB)!;
  expect([a.byteLength, b.byteLength]).toEqual([64 * KIB, 128 * KIB]);
  expect(a.buffer).toBe(slots.sab);
  expect(slots.slotOf(a)).not.toBe(slots.slotOf(b));
  a.fill(1);
  b.fill(2);
  expect(a.every((x) => x === 1)).toBe(true); // disjoint memory
  expect(slots.take(64 * KIB)).toBeNull(); // every slot busy
  expect(slots.stats()).toEqual({
    slots: 2, slotBytes: 128 * KIB, minBytes: 64 * KIB, inUse: 2, taken: 2, fallbacks: 1,
  });
});

test("slotOf finds the slot of a view into it, and -1 for other memory and small views", () => {
  const slots = new RequestSlots(3, 100 * KIB, 64 * KIB); // a stride rounded up to 4 KiB
  const views = [slots.take(100 * KIB)!, slots.take(100 * KIB)!, slots.take(100 * KIB)!];
  const found = views.map((v) => slots.slotOf(v));
  expect(new Set(found).size).toBe(3);
  views.forEach((v, i) => {
    expect(slots.slotOf(v.subarray(36 * KIB))).toBe(found[i]!);
    expect(slots.slotOf(v.subarray(99 * KIB))).toBe(-1); // under minBytes: never a slot's payload
    expect(slots.owns(v)).toBe(true);
  });
  expect(slots.slotOf(new Uint8Array(100 * KIB))).toBe(-1);
  expect(slots.owns(new Uint8Array(100 * KIB))).toBe(false);
});

test("a dispatched slot is freed by its last party only, once", () => {
  const slots = new RequestSlots(1, 128 * KIB, 64 * KIB);
  const view = slots.take(128 * KIB)!;
  const slot = slots.slotOf(view);
  slots.dispatch(slot, 2);
  expect(slots.pool.state(slot)).toBe(SlotState.InFlight);
  expect(slots.owns(view)).toBe(false); // handed on: nobody may give it back now
  expect(() => slots.give(view)).toThrow();
  expect(() => slots.dispatch(slot, 2)).toThrow(); // handed on twice
  slots.partyDone(slot);
  expect(slots.stats().inUse).toBe(1);
  expect(slots.take(128 * KIB)).toBeNull();
  slots.partyDone(slot);
  expect(slots.stats().inUse).toBe(0);
  expect(slots.pool.state(slot)).toBe(SlotState.Free);
  expect(() => slots.partyDone(slot)).toThrow(); // a third party that does not exist
  const again = slots.take(128 * KIB)!;
  expect(slots.slotOf(again)).toBe(slot);
  expect(slots.pool.generation(slot)).toBe(2);
});

test("give frees a slot that was never handed on; giving it twice throws", () => {
  const slots = new RequestSlots(1, 128 * KIB, 64 * KIB);
  const view = slots.take(64 * KIB)!;
  slots.give(view);
  expect(slots.stats().inUse).toBe(0);
  expect(() => slots.give(view)).toThrow();
  expect(() => slots.give(new Uint8Array(64 * KIB))).toThrow("not a request slot");
});

test("a view kept from an earlier use of a slot is not owned and cannot free the slot's new request", () => {
  // One slot, used twice: a caller that kept the first use's view (given back, or handed on and
  // freed by its last party) must not see the second request's slot as its own. Before the fix
  // owns() looked at the state only (Filled again), and give() freed the new request's buffer.
  const slots = new RequestSlots(1, 128 * KIB, 64 * KIB);
  const given = slots.take(128 * KIB)!;
  slots.give(given);
  const current = slots.take(128 * KIB)!;
  expect(slots.slotOf(given)).toBe(slots.slotOf(current)); // the same memory, another use
  expect(slots.owns(given)).toBe(false);
  expect(slots.owns(current)).toBe(true);
  expect(() => slots.give(given)).toThrow("not the buffer take() handed out");
  expect(slots.pool.state(slots.slotOf(current))).toBe(SlotState.Filled); // still the new request's
  expect(slots.stats().inUse).toBe(1);

  const slot = slots.slotOf(current);
  slots.dispatch(slot, 1);
  slots.partyDone(slot);
  const third = slots.take(128 * KIB)!;
  expect([slots.owns(given), slots.owns(current), slots.owns(third)]).toEqual([false, false, true]);
  expect(() => slots.give(current)).toThrow("not the buffer take() handed out");
  slots.give(third);
  expect(slots.stats().inUse).toBe(0);
});
