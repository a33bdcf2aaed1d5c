/**
 * Rate limiting and rate measurement for background copies that share the
 * disks with applications: the sync (synchronizer.ts) and online verify
 * (verifier.ts).
 */
import type { Clock } from "./remote_link.ts";

/** The measured rate is over this window. */
const RATE_WINDOW_MS = 5000;
/** Longest single sleep of the pacer (it rechecks `keepGoing` after each). */
const PACE_SLICE_MS = 100;

/** Token-bucket pacing: each piece of work starts no earlier than the rate allows. */
export class Pacer {
  private nextFreeMs = 0;
  /** Bumped by setRate: a piece waiting under the old rate queues again under the new one. */
  private generation = 0;

  /** @param bytesPerSecond 0 = unlimited */
  constructor(private readonly clock: Clock, private bytesPerSecond: number) {}

  get rateBytesPerSecond(): number {
    return this.bytesPerSecond;
  }

  /**
   * Changes the rate: the next piece starts at once, the pieces waiting then queue again behind
   * it at the new rate (at once when unlimited). The same rate changes nothing.
   */
  setRate(bytesPerSecond: number): void {
    if (bytesPerSecond === this.bytesPerSecond) return; // e.g. a reload that kept it
    this.bytesPerSecond = bytesPerSecond;
    this.nextFreeMs = 0;
    this.generation++;
  }

  /**
   * Waits until `bytes` more may start, in slices of at most PACE_SLICE_MS, ending early once
   * `keepGoing` is false (e.g. the link went down), so that a slow copy stops promptly.
   */
  async pace(bytes: number, keepGoing: () => boolean): Promise<void> {
    // Found by review: a piece waiting when the rate changed started at once, so lowering the
    // rate let every waiting piece (one per sync worker) through unpaced. It queues again instead;
    // each change costs one more round at most, and only setRate changes the generation.
    for (let generation = this.generation; ; generation = this.generation) {
      const rate = this.bytesPerSecond;
      if (rate <= 0) return;
      const now = this.clock.now();
      const startMs = Math.max(this.nextFreeMs, now);
      this.nextFreeMs = startMs + (bytes * 1000) / rate;
      let rateChanged = false;
      for (let left = startMs - now; left > 0 && !rateChanged; left = startMs - this.clock.now()) {
        if (!keepGoing()) return;
        rateChanged = this.generation !== generation;
        if (!rateChanged) await this.clock.sleep(Math.min(left, PACE_SLICE_MS));
      }
      if (!rateChanged) return; // its turn came
    }
  }
}

/**
 * Bytes per second over the last RATE_WINDOW_MS (from the last sample before it), and the time
 * left at that rate.
 */
export class RateMeter {
  private readonly samples: { atMs: number; doneBytes: number }[] = [];

  constructor(private readonly clock: Clock) {
    this.samples.push({ atMs: clock.now(), doneBytes: 0 });
  }

  /**
   * Records that `doneBytes` (a running total) are done now. Samples older than the window go
   * here too, not only when someone measures: a long sync nobody watches records one per chunk.
   */
  record(doneBytes: number): void {
    const now = this.clock.now();
    this.samples.push({ atMs: now, doneBytes });
    this.prune(now);
  }

  /** The rate now, given the running total, and the seconds left for `remainingBytes`. */
  measure(doneBytes: number, remainingBytes: number): { bytesPerSecond: number; etaSeconds: number | null } {
    const now = this.clock.now();
    this.prune(now);
    const first = this.samples[0];
    const spanMs = first ? now - first.atMs : 0;
    const rate = first && spanMs > 0 ? ((doneBytes - first.doneBytes) * 1000) / spanMs : 0;
    return {
      bytesPerSecond: Math.round(rate),
      etaSeconds: rate > 0 ? Math.ceil(Math.max(0, remainingBytes) / rate) : null,
    };
  }

  /**
   * Drops the samples older than RATE_WINDOW_MS (they are in time order) but the newest of them,
   * which the rate is measured from. Found by review: dropping it too left a window without
   * progress whenever a piece took longer than the window (a 1 MiB chunk at 100 KiB/s), and a
   * sync that was progressing showed 0 B/s and no ETA.
   */
  private prune(now: number): void {
    let stale = 0;
    while (stale + 1 < this.samples.length && now - this.samples[stale + 1]!.atMs >= RATE_WINDOW_MS) stale++;
    if (stale > 0) this.samples.splice(0, stale);
  }
}
