/**
 * Exclusive byte-range lock (spec §6): application writes and sync chunks on
 * overlapping ranges exclude each other, and two overlapping application
 * writes are applied in arrival order on both copies (so they cannot end up
 * in different orders on primary and secondary).
 *
 * Waiters are granted in FIFO order among overlapping requests: a waiter is
 * granted only if it overlaps neither a held range nor an earlier waiter.
 */
import assert from "node:assert/strict";

interface Range {
  start: number;
  end: number; // exclusive
}

interface Waiter extends Range {
  grant: () => void;
}

function overlaps(a: Range, b: Range): boolean {
  return a.start < b.end && b.start < a.end;
}

export class RangeLock {
  private readonly held: Range[] = [];
  private readonly waiters: Waiter[] = [];

  constructor(private readonly maxWaiters = 65536) {}

  /** Resolves with a release function once [offset, offset+length) is held. */
  acquire(offset: number, length: number): Promise<() => void> {
    assert.ok(length > 0 && offset >= 0, "bad range");
    const range = { start: offset, end: offset + length };
    if (this.canGrant(range, this.waiters.length)) return Promise.resolve(this.take(range));
    assert.ok(this.waiters.length < this.maxWaiters, "range lock waiters exceed limit");
    return new Promise((resolve) => {
      this.waiters.push({ ...range, grant: () => resolve(this.take(range)) });
    });
  }

  /** Number of held ranges and waiters, for `hast list`. */
  stats(): { held: number; waiting: number } {
    return { held: this.held.length, waiting: this.waiters.length };
  }

  private canGrant(range: Range, waitersBefore: number): boolean {
    for (const h of this.held) if (overlaps(h, range)) return false;
    for (let i = 0; i < waitersBefore; i++) if (overlaps(this.waiters[i]!, range)) return false;
    return true;
  }

  private take(range: Range): () => void {
    this.held.push(range);
    let released = false;
    return () => {
      assert.ok(!released, "range released twice");
      released = true;
      const index = this.held.indexOf(range);
      assert.ok(index >= 0);
      this.held.splice(index, 1);
      this.wake();
    };
  }

  private wake(): void {
    for (let i = 0; i < this.waiters.length; ) {
      const waiter = this.waiters[i]!;
      if (this.canGrant(waiter, i)) {
        this.waiters.splice(i, 1);
        waiter.grant();
      } else {
        i++;
      }
    }
  }
}
