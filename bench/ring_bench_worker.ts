/**
 * Echo stage for bench/ring_bench.ts: pops values in batches from the
 * request ring and pushes each onto the response ring, notifying once per
 * batch. Sleeps (after `spinCount` spins) when the request ring is empty.
 * The value `stop` ends it, and it replies with how often it slept.
 */
import { SpscRing } from "../lib/ring.ts";

declare const self: Worker;

/** Start message of the echo worker. */
export interface EchoSetup {
  buffer: SharedArrayBuffer;
  capacity: number;
  responseOffset: number;
  spinCount: number;
  stop: number;
}

self.onmessage = (event: MessageEvent) => {
  const setup = event.data as EchoSetup;
  const requests = new SpscRing(setup.buffer, 0, setup.capacity, { spinCount: setup.spinCount });
  const responses = new SpscRing(setup.buffer, setup.responseOffset, setup.capacity);
  const batch = new Uint32Array(setup.capacity);
  let sleeps = 0;
  for (;;) {
    const count = requests.popBatch(batch);
    if (count === 0) {
      requests.waitForDataSync(Infinity);
      sleeps++;
      continue;
    }
    for (let i = 0; i < count; i++) {
      if (batch[i] === setup.stop) {
        self.postMessage({ sleeps });
        return;
      }
      responses.push(batch[i]!);
    }
    responses.notifyConsumer();
  }
};
