/**
 * A bounded pool of equal-sized receive buffers, reused instead of allocated per frame.
 *
 * Why: on this VM the first touch of a fresh page costs more than copying into it; the secondary
 * allocated a new buffer for every 1 MiB payload it received, and in async mode (up to 64 MiB
 * queued) it took ~110 page faults and ~4.5 ms of CPU per MiB (bench/RESULTS.md). A buffer taken
 * from the pool must be given back exactly once, by whoever is last to use it; one that is never
 * given back is only garbage (the pool then allocates a fresh one). Giving back a buffer twice,
 * or one the pool did not hand out, is a bug and fails an assertion: two requests would share
 * one buffer.
 *
 * Buffers are allocated on first need, up to `capacity`, not all at start (style.md asks for
 * the latter): a resource that never sees a large write then holds none, and a full pool costs
 * the same. When all are in use, take() allocates one more, which goes to the garbage collector
 * when given back: the pool bounds what is kept, the callers' own limits (NBD requests in
 * flight, the replication window) bound what is in use.
 */
import assert from "node:assert/strict";

export interface BufferPoolStats {
  /** Buffers kept for reuse now. */
  free: number;
  /** take() calls served from the free list / by a fresh allocation. */
  reused: number;
  allocated: number;
}

export class BufferPool {
  readonly #free: ArrayBuffer[] = [];
  /**
   * The views take() handed out and that were not given back (weak: one never given back is
   * collected as garbage). Keyed by the view, not its buffer: reading `.buffer` of a small typed
   * array that never had one makes the runtime create it, which owns() must not do to every
   * payload it is asked about.
   */
  readonly #out = new WeakSet<Uint8Array>();
  #reused = 0;
  #allocated = 0;

  /**
   * @param bufferBytes size of every buffer (the largest payload it serves)
   * @param capacity buffers kept for reuse at most (memory held when idle: capacity × bufferBytes)
   * @param minBytes smaller payloads are not worth a pooled buffer (take() returns null)
   */
  constructor(readonly bufferBytes: number, readonly capacity: number, readonly minBytes: number) {
    assert.ok(Number.isSafeInteger(bufferBytes) && bufferBytes > 0);
    assert.ok(Number.isSafeInteger(capacity) && capacity >= 0);
    assert.ok(minBytes <= bufferBytes);
  }

  /** A buffer of `bytes` (a view of a pooled one), or null if `bytes` is out of the pool's range. */
  take(bytes: number): Uint8Array | null {
    if (bytes < this.minBytes || bytes > this.bufferBytes) return null;
    let buffer = this.#free.pop();
    if (buffer === undefined) {
      buffer = new ArrayBuffer(this.bufferBytes);
      this.#allocated++;
    } else {
      this.#reused++;
    }
    const view = new Uint8Array(buffer, 0, bytes);
    this.#out.add(view);
    return view;
  }

  /** Whether `view` is one take() handed out and that was not given back. */
  owns(view: Uint8Array): boolean {
    return this.#out.has(view);
  }

  /** Gives back a buffer from take(); the caller must not use `view` afterwards. */
  give(view: Uint8Array): void {
    assert.ok(this.#out.delete(view), "buffer given back twice or not from this pool");
    if (this.#free.length < this.capacity) this.#free.push(view.buffer as ArrayBuffer);
  }

  stats(): BufferPoolStats {
    return { free: this.#free.length, reused: this.#reused, allocated: this.#allocated };
  }
}
