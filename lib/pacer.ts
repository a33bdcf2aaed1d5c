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

  /** @param bytesPerSecond 0 = unlimited */
  constructor(private readonly clock: Clock, private bytesPerSecond: number) {}

  get rateBytesPerSecond(): number {
    return this.bytesPerSecond;
  }

  /** Changes the rate; the next piece starts at once. */
  setRate(bytesPerSecond: number): void {
    this.bytesPerSecond = bytesPerSecond;
    this.nextFreeMs = 0;
  }

  /**
   * Waits until `bytes` more may start, in slices of at most PACE_SLICE_MS, ending early once
   * `keepGoing` is false (e.g. the link went down), so that a slow copy stops promptly.
   */
  async pace(bytes: number, keepGoing: () => boolean): Promise<void> {
    const rate = this.bytesPerSecond;
    if (rate <= 0) return;
    const now = this.clock.now();
    const startMs = Math.max(this.nextFreeMs, now);
    this.nextFreeMs = startMs + (bytes * 1000) / rate;
    for (let left = startMs - now; left > 0 && keepGoing(); left = startMs - this.clock.now()) {
      await this.clock.sleep(Math.min(left, PACE_SLICE_MS));
    }
  }
}

/** Bytes per second over the last RATE_WINDOW_MS, and the time left at that rate. */
export class RateMeter {
  private samples: { atMs: number; doneBytes: number }[] = [];

  constructor(private readonly clock: Clock) {
    this.samples.push({ atMs: clock.now(), doneBytes: 0 });
  }

  /** Records that `doneBytes` (a running total) are done now. */
  record(doneBytes: number): void {
    this.samples.push({ atMs: this.clock.now(), doneBytes });
  }

  /** The rate now, given the running total, and the seconds left for `remainingBytes`. */
  measure(doneBytes: number, remainingBytes: number): { bytesPerSecond: number; etaSeconds: number | null } {
    const now = this.clock.now();
    this.samples = this.samples.filter((s) => now - s.atMs <= RATE_WINDOW_MS);
    const first = this.samples[0];
    const spanMs = first ? now - first.atMs : 0;
    const rate = first && spanMs > 0 ? ((doneBytes - first.doneBytes) * 1000) / spanMs : 0;
    return {
      bytesPerSecond: Math.round(rate),
      etaSeconds: rate > 0 ? Math.ceil(Math.max(0, remainingBytes) / rate) : null,
    };
  }
}
