/**
 * The primary's request slots (spec §11): a fixed pool of write buffers in one
 * SharedArrayBuffer, allocated when the resource starts, that large application
 * writes are received into and that travel down the data path without a copy.
 *
 * Life of a slot (states asserted by {@linkcode SlotPool} on every step):
 *
 *   Free ──take()──▶ Filled ──dispatch()──▶ InFlight ──(countdown reaches 0)──▶ Done ──▶ Free
 *                      └──────────────give() (never handed on)──────────────────┘
 *
 * - Filled: the NBD server receives the payload into it.
 * - InFlight: the primary handed the request to its two paths at once, the
 *   local write and the replication link, with a countdown of 2 armed *before*
 *   either sees it. The codec threads (lib/codec_pipeline.ts) read a slot's
 *   payload where it lies, and a frame whose body is the payload unchanged is
 *   written to the socket from the slot.
 * - Each path counts down once when nothing of it reads the slot any more: the
 *   local write ended; the link has the secondary's reply to the frame, or the
 *   link's connection is gone and no codec thread reads it. Whichever is last
 *   frees the slot. The application's reply does not wait for this: the mode
 *   decides that (spec §2), and in memsync and async it comes earlier.
 *
 * A write smaller than `minBytes` is copied instead (a slot per 4 KiB write
 * would pin 1 MiB for as long as the secondary takes to answer); one that
 * finds every slot busy is received into a fresh buffer that the garbage
 * collector reclaims (counted in `fallbacks`): the pool bounds memory, the NBD
 * server's and the link's in-flight limits bound the work.
 */
import assert from "node:assert/strict";
import { SlotPool, SlotState } from "./slot_pool.ts";

/** Counters and depths for `hast list`. */
export interface RequestSlotStats {
  /** Slots in the pool, and bytes of each (the largest write received into one). */
  slots: number;
  slotBytes: number;
  /** Writes from this size on are received into a slot. */
  minBytes: number;
  inUse: number;
  /** Slots handed out, ever. */
  taken: number;
  /** Writes that found every slot busy and were received into a fresh buffer. */
  fallbacks: number;
}

/** What a codec thread needs to read slots (passed as `workerData`). */
export interface RequestSlotsShape {
  sab: SharedArrayBuffer;
  slotCount: number;
  slotDataBytes: number;
}

export class RequestSlots {
  readonly pool: SlotPool;
  readonly sab: SharedArrayBuffer;
  /**
   * Per slot, the view take() handed out while the slot is Filled, else null. owns() and give()
   * compare by identity: a view kept from an earlier use of the slot (given back or handed on,
   * then freed, and taken again by another request) is not the current one, so it cannot free
   * the slot under the request that now fills it. The state alone (Filled) cannot tell the uses
   * apart. Every view comes from take(), which makes a new one per use.
   */
  readonly #views: (Uint8Array | null)[];
  #taken = 0;
  #fallbacks = 0;

  constructor(slotCount: number, readonly slotBytes: number, readonly minBytes: number) {
    assert.ok(minBytes >= 1 && minBytes <= slotBytes, "Cannot create request slots: bad minBytes");
    this.sab = new SharedArrayBuffer(SlotPool.bytesFor(slotCount, slotBytes));
    this.pool = new SlotPool(this.sab, { slotCount, slotDataBytes: slotBytes, initialise: true });
    this.#views = new Array<Uint8Array | null>(slotCount).fill(null);
  }

  get shape(): RequestSlotsShape {
    return { sab: this.sab, slotCount: this.pool.slotCount, slotDataBytes: this.slotBytes };
  }

  /**
   * A buffer of `bytes` in a free slot (now Filled), or null when `bytes` is outside
   * [minBytes, slotBytes] or every slot is busy. The taker hands it on with dispatch() or gives
   * it back with give().
   */
  take(bytes: number): Uint8Array | null {
    if (bytes < this.minBytes || bytes > this.slotBytes) return null;
    const slot = this.pool.allocate();
    if (slot < 0) {
      this.#fallbacks++;
      return null;
    }
    this.#taken++;
    const view = this.pool.data(slot).subarray(0, bytes);
    this.#views[slot] = view;
    return view;
  }

  /**
   * The slot whose data `view` lies in, or -1 for memory that is not one of ours. A view shorter
   * than minBytes is never one (take() hands out none) and is not looked at: reading `.buffer`
   * of a small typed array makes the runtime create an ArrayBuffer for it, on every 4 KiB write.
   */
  slotOf(view: Uint8Array): number {
    return view.byteLength < this.minBytes ? -1 : this.pool.slotContaining(view);
  }

  /**
   * Whether `view` is the buffer take() handed out for its slot's current use, not yet handed on
   * nor given back (a view from an earlier use of the same slot is not).
   */
  owns(view: Uint8Array): boolean {
    const slot = this.slotOf(view);
    return slot >= 0 && this.#views[slot] === view && this.pool.state(slot) === SlotState.Filled;
  }

  /** Frees a taken slot that was never handed on (its request was refused or abandoned). */
  give(view: Uint8Array): void {
    const slot = this.slotOf(view);
    assert.ok(slot >= 0, "Cannot give back: not a request slot");
    assert.ok(this.#views[slot] === view, `Cannot give back slot ${slot}: not the buffer take() handed out for it`);
    this.pool.transition(slot, SlotState.Filled, SlotState.Done);
    this.#views[slot] = null;
    this.pool.free(slot);
  }

  /**
   * Hands a Filled slot to `parties` paths (it is now InFlight); each calls {@linkcode
   * RequestSlots.partyDone} exactly once, when it no longer reads the slot.
   */
  dispatch(slot: number, parties: number): void {
    this.pool.transition(slot, SlotState.Filled, SlotState.InFlight);
    this.#views[slot] = null;
    this.pool.setCountdown(slot, parties);
  }

  /** One path is done with the slot; the last one frees it. */
  partyDone(slot: number): void {
    if (!this.pool.countDown(slot)) return;
    this.pool.transition(slot, SlotState.InFlight, SlotState.Done);
    this.pool.free(slot);
  }

  stats(): RequestSlotStats {
    return {
      slots: this.pool.slotCount, slotBytes: this.slotBytes, minBytes: this.minBytes,
      inUse: this.pool.stats().inUse, taken: this.#taken, fallbacks: this.#fallbacks,
    };
  }
}
