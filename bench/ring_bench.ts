/**
 * Micro-benchmark of the SPSC ring between the main thread and a worker
 * (bench/ring_bench_worker.ts echoes every value back):
 *
 * 1. Round-trip latency of one request (main → worker → main) when both
 *    consumers sleep at once, and when they spin briefly before sleeping;
 *    the main thread waits with Atomics.waitAsync (as the daemon's event
 *    loop must) or, for comparison, with a blocking Atomics.wait.
 * 2. Throughput when the main thread hands over B requests per wake-up and
 *    waits for all B to come back (closed loop), for several B.
 *
 * CPU is process CPU time (both threads) per request: spinning buys latency
 * with a core, and this machine has two.
 *
 * Run: node_modules/.bin/bun bench/ring_bench.ts
 *
 * Results (Bun 1.4.5, 2 cores; other test suites and benchmarks were running
 * on the machine, so re-measure; "quiet" = the first run, at the lightest
 * load seen (not recorded); "loaded" = six runs at load average 2.5–5):
 *
 *   round trip, µs                      quiet p50/p99   loaded p50 / p90 / p99
 *   sleep/sleep, main waitAsync          66 / 171        13–57 / 16–78 / 47–169
 *   sleep/sleep, main Atomics.wait       66 / 223        19–28 / 27–68 / 53–209
 *   worker spins 2000, main waitAsync    0.7 / 100       15–23 / 74–86 / 115–575
 *   both spin 2000, main waitAsync       0.5 / 4.3       0.5–176 / 2–206 / 217–677
 *
 *   closed loop, requests/s   B=1      B=4       B=16      B=64      B=256
 *   sleep, quiet              25k      84k       515k      1.7M      2.7M
 *   sleep, loaded             10–65k   93–239k   0.5–0.8M  0.45–2.5M 2.7–7.4M
 *   spin 2000, quiet          1.7M     2.8M      3.8M      4.5M      4.6M
 *   spin 2000, loaded         5–73k    24–131k   86–129k   0.24–0.9M 1.1–1.7M
 *
 * Reading: a futex wake-up costs ~15–65 µs of latency and ~15–60 µs of CPU
 * (the idle core's wake-up dominates on a quiet machine); batching amortises
 * it (B=64 is ~70× B=1). Spinning gives ~1 µs round trips only while a core
 * is free for the spinner; on two cores shared with other work it is up to
 * 10× worse than sleeping, because the spinner holds the core the other
 * stage needs. One spin iteration ≈ 40–50 ns (up to 220 ns under load).
 */
import { SpscRing } from "../lib/ring.ts";
import type { EchoSetup } from "./ring_bench_worker.ts";

const CAPACITY = 256;
const STOP = 0xffff_ffff;

interface Pair {
  requests: SpscRing;
  responses: SpscRing;
  worker: Worker;
  done: Promise<unknown>;
}

async function startPair(workerSpin: number, mainSpin: number): Promise<Pair> {
  const responseOffset = SpscRing.bytesFor(CAPACITY);
  const buffer = new SharedArrayBuffer(2 * responseOffset);
  const requests = new SpscRing(buffer, 0, CAPACITY, { initialise: true });
  const responses = new SpscRing(buffer, responseOffset, CAPACITY, {
    initialise: true,
    spinCount: mainSpin,
  });
  const worker = new Worker(new URL("./ring_bench_worker.ts", import.meta.url).href);
  const done = new Promise((resolve) => {
    worker.onmessage = (event: MessageEvent) => resolve(event.data);
  });
  const setup: EchoSetup = {
    buffer,
    capacity: CAPACITY,
    responseOffset,
    spinCount: workerSpin,
    stop: STOP,
  };
  worker.postMessage(setup);
  // Warm up: one round trip proves the worker runs before anything is timed.
  requests.push(0);
  requests.notifyConsumer();
  while (responses.pop() < 0) await responses.waitForData(1000);
  return { requests, responses, worker, done };
}

async function stopPair(pair: Pair): Promise<void> {
  pair.requests.push(STOP);
  pair.requests.notifyConsumer();
  await pair.done;
  pair.worker.terminate();
}

async function receive(pair: Pair, count: number, sync: boolean): Promise<void> {
  let received = 0;
  while (received < count) {
    const value = pair.responses.pop();
    if (value >= 0) received++;
    else if (sync) pair.responses.waitForDataSync(1000);
    else await pair.responses.waitForData(1000);
  }
}

/** One request at a time; returns per-round-trip latencies in µs. */
async function roundTrips(pair: Pair, count: number, sync: boolean): Promise<Float64Array> {
  const latenciesUs = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    const start = performance.now();
    pair.requests.push(i);
    pair.requests.notifyConsumer();
    await receive(pair, 1, sync);
    latenciesUs[i] = (performance.now() - start) * 1000;
  }
  return latenciesUs.sort();
}

/** Batches of `batchSize` per wake-up, closed loop; returns requests per second. */
async function batches(pair: Pair, total: number, batchSize: number): Promise<number> {
  const start = performance.now();
  for (let sent = 0; sent < total; sent += batchSize) {
    for (let i = 0; i < batchSize; i++) pair.requests.push(sent + i);
    pair.requests.notifyConsumer();
    await receive(pair, batchSize, false);
  }
  return total / ((performance.now() - start) / 1000);
}

function cpuMs(before: NodeJS.CpuUsage): number {
  const used = process.cpuUsage(before);
  return (used.user + used.system) / 1000;
}

function spinIterationNs(): number {
  const word = new Int32Array(new SharedArrayBuffer(4));
  const iterations = 1_000_000;
  const start = performance.now();
  for (let i = 0; i < iterations && Atomics.load(word, 0) === 0; i++) Atomics.pause();
  return ((performance.now() - start) * 1e6) / iterations;
}

const LATENCY_CASES = [
  { name: "sleep/sleep, main waitAsync", workerSpin: 0, mainSpin: 0, sync: false },
  { name: "sleep/sleep, main Atomics.wait", workerSpin: 0, mainSpin: 0, sync: true },
  { name: "worker spins, main waitAsync", workerSpin: 2000, mainSpin: 0, sync: false },
  { name: "both spin 200, main waitAsync", workerSpin: 200, mainSpin: 200, sync: false },
  { name: "both spin 2000, main waitAsync", workerSpin: 2000, mainSpin: 2000, sync: false },
  { name: "both spin 2000, main Atomics.wait", workerSpin: 2000, mainSpin: 2000, sync: true },
  { name: "both spin 20000, main waitAsync", workerSpin: 20000, mainSpin: 20000, sync: false },
];

async function latencyTable(count: number): Promise<void> {
  console.log(`\nRound trip of one request (${count} each), µs:`);
  console.log("case                                 p50     p90     p99    mean   cpu µs/req");
  for (const c of LATENCY_CASES) {
    const pair = await startPair(c.workerSpin, c.mainSpin);
    const cpu = process.cpuUsage();
    const latencies = await roundTrips(pair, count, c.sync);
    const cpuPerRequestUs = (cpuMs(cpu) * 1000) / count;
    await stopPair(pair);
    const at = (q: number) => format(latencies[Math.floor(q * (count - 1))]!, 1, 7);
    const mean = format(latencies.reduce((a, b) => a + b, 0) / count, 1, 7);
    const cpuText = format(cpuPerRequestUs, 1, 12);
    console.log(`${c.name.padEnd(32)} ${at(0.5)} ${at(0.9)} ${at(0.99)} ${mean} ${cpuText}`);
  }
}

function format(value: number, digits: number, width: number): string {
  return value.toFixed(digits).padStart(width);
}

/** `perWakeUp` round trips' worth of requests per case (B = 1 at ~50 µs would take long). */
async function throughputTable(perWakeUp: number): Promise<void> {
  console.log(`\nThroughput, B requests per wake-up, closed loop (${perWakeUp} × B requests):`);
  console.log("spin (both)    B    requests/s   cpu µs/req");
  for (const spin of [0, 2000]) {
    for (const batchSize of [1, 4, 16, 64, 256]) {
      const total = perWakeUp * batchSize;
      const pair = await startPair(spin, spin);
      const cpu = process.cpuUsage();
      const rate = await batches(pair, total, batchSize);
      const cpuPerRequestUs = (cpuMs(cpu) * 1000) / total;
      await stopPair(pair);
      const row = `${String(spin).padStart(11)} ${String(batchSize).padStart(4)} `;
      const rateText = Math.round(rate).toLocaleString("en").padStart(13);
      console.log(`${row}${rateText} ${format(cpuPerRequestUs, 2, 12)}`);
    }
  }
}

const spinNs = spinIterationNs().toFixed(1);
console.log(`Bun ${Bun.version}; one spin iteration (Atomics.load + Atomics.pause) ≈ ${spinNs} ns`);
await latencyTable(Number(process.env.ROUND_TRIPS ?? 20_000));
await throughputTable(Number(process.env.WAKE_UPS ?? 4_000));
