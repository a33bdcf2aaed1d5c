/**
 * The codec stage on worker threads gives exactly the bytes the inline codec
 * gives (every compression × checksum, holes, compressible and random data),
 * rejects corrupt input with the inline codec's reason, queues callers when
 * every slot is busy and completes each of them once, and leaves no slot in
 * use afterwards. A job that fails on a thread rejects with the thread's
 * message; a thread that dies leaves a pipeline that computes inline, byte
 * for byte the same, and says so in its stats.
 */
import { afterAll, afterEach, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CHECKSUMS, CodecPipeline, COMPRESSIONS, PIPELINE_MIN_BYTES } from "./codec_pipeline.ts";
import { decodePayload, encodePayload, type CodecOptions } from "./payload_codec.ts";
import { RequestSlots } from "./request_slots.ts";
import { MAX_IO_BYTES, ProtocolError } from "./wire.ts";

let pipeline: CodecPipeline | null = null;
afterEach(async () => {
  await pipeline?.close();
  pipeline = null;
});

const concat = (pieces: Uint8Array[]) => new Uint8Array(Buffer.concat(pieces));

// Faulty codec threads for the failure tests: a prelude, then the real thread (workers/codec_worker.ts),
// so the product code has no test-only branch. They live in a temporary directory.
const workerDir = mkdtempSync(join(tmpdir(), "hast-codec-worker-"));
afterAll(() => rmSync(workerDir, { recursive: true, force: true }));

function faultyWorker(name: string, prelude: string): string {
  const path = join(workerDir, `${name}.ts`);
  const real = new URL("../workers/codec_worker.ts", import.meta.url).pathname;
  writeFileSync(path, `${prelude}\nawait import(${JSON.stringify(real)});\n`);
  return path;
}

/** First bytes of a payload that the thread of markedWorker() refuses, or dies on. */
const REFUSE = 0xe2;
const DIE = 0xe1;

/** A thread whose crc32 throws for a payload starting with REFUSE and exits the thread for DIE. */
function markedWorker(): string {
  return faultyWorker("marked", [
    "const crc32 = Bun.hash.crc32;",
    "Bun.hash.crc32 = (data, seed) => {",
    `  if (data[0] === ${DIE}) process.exit(7);`,
    `  if (data[0] === ${REFUSE}) throw new RangeError("crc32 refused a marked payload");`,
    "  return crc32(data, seed);",
    "};",
  ].join("\n"));
}

/** A payload of `bytes` random bytes whose first byte is `first`. */
function marked(bytes: number, first: number): Uint8Array {
  const data = new Uint8Array(randomBytes(bytes));
  data[0] = first;
  return data;
}

function samples(): Uint8Array[] {
  const text = new Uint8Array(MAX_IO_BYTES).map((_, i) => "hast replicates blocks "[i % 23]!.charCodeAt(0));
  return [new Uint8Array(PIPELINE_MIN_BYTES), text, new Uint8Array(randomBytes(MAX_IO_BYTES)),
    new Uint8Array(randomBytes(PIPELINE_MIN_BYTES + 512))];
}

test("encode and decode on threads match the inline codec byte for byte", async () => {
  pipeline = CodecPipeline.start();
  for (const compression of COMPRESSIONS) {
    for (const checksum of CHECKSUMS) {
      const codec: CodecOptions = { compression, checksum };
      for (const data of samples()) {
        const inline = encodePayload(data, codec);
        const threaded = await pipeline.encode(data, codec);
        const what = `${compression}/${checksum}/${data.byteLength}`;
        expect(threaded.flags, what).toBe(inline.flags);
        expect(Buffer.compare(concat(threaded.pieces), concat(inline.pieces)), what).toBe(0);
        const decoded = await pipeline.decode(inline.flags, concat(inline.pieces), data.byteLength, checksum);
        expect(Buffer.compare(decoded, data), what).toBe(0);
      }
    }
  }
  const stats = pipeline.stats();
  expect(stats.encoded).toBe(36);
  expect(stats.decoded).toBe(36);
  expect(stats.slotsInUse).toBe(0);
});

test("payloads in request slots are encoded where they lie, byte for byte as inline", async () => {
  const slots = new RequestSlots(3, MAX_IO_BYTES, PIPELINE_MIN_BYTES);
  pipeline = CodecPipeline.start({ inputs: slots });
  const codec: CodecOptions = { compression: "lz4", checksum: "sha256" };
  let inPlace = 0;
  for (const data of samples()) {
    // At the start of a slot, and at an offset inside one (a frame of a larger write).
    for (const at of [0, 8192]) {
      if (at + data.byteLength > MAX_IO_BYTES) continue;
      const buffer = slots.take(MAX_IO_BYTES)!;
      const view = buffer.subarray(at, at + data.byteLength);
      view.set(data);
      buffer.fill(0xee, 0, at); // bytes around the payload must not leak into it
      buffer.fill(0xee, at + data.byteLength);
      const inline = encodePayload(data, codec);
      const threaded = await pipeline.encode(view, codec);
      expect(threaded.flags).toBe(inline.flags);
      expect(Buffer.compare(concat(threaded.pieces), concat(inline.pieces))).toBe(0);
      inPlace++;
      slots.give(buffer);
    }
  }
  const copied = await pipeline.encode(samples()[1]!, codec); // not in a slot: copied as before
  expect(copied.pieces.length).toBeGreaterThan(0);
  expect(pipeline.stats()).toMatchObject({ encoded: inPlace + 1, encodedInPlace: inPlace, slotsInUse: 0 });
  expect(inPlace).toBeGreaterThan(4);
});

test("a flipped bit is rejected with the same reason as inline, and the pipeline goes on", async () => {
  pipeline = CodecPipeline.start();
  const data = new Uint8Array(randomBytes(256 * 1024));
  for (const checksum of ["crc32", "sha256"] as const) {
    const { flags, pieces } = encodePayload(data, { compression: "lz4", checksum });
    const wire = concat(pieces);
    wire[1000]! ^= 0x10;
    let inlineError = "";
    try {
      decodePayload(flags, wire, data.byteLength, checksum);
    } catch (error) {
      inlineError = (error as Error).message;
    }
    expect(inlineError).toContain(`${checksum} mismatch`);
    const threaded = pipeline.decode(flags, wire, data.byteLength, checksum);
    await expect(threaded).rejects.toBeInstanceOf(ProtocolError);
    await expect(threaded).rejects.toThrow(inlineError);
  }
  const ok = await pipeline.encode(data, { compression: "none", checksum: "crc32" });
  expect(concat(ok.pieces).byteLength).toBe(data.byteLength + 4);
  expect(ok.pieces[0]).toBe(data); // unchanged body: the caller's own bytes, not a copy
});

test("with more callers than slots, callers wait in turn and each completes once", async () => {
  pipeline = CodecPipeline.start({ threads: 2, slots: 2 });
  const codec: CodecOptions = { compression: "lz4", checksum: "sha256" };
  const inputs = Array.from({ length: 24 }, (_, i) => new Uint8Array(128 * 1024).fill(i + 1));
  const runs = inputs.map((data) => pipeline!.encode(data, codec));
  expect(pipeline.stats().waitingForSlot).toBe(22);
  expect(pipeline.stats().slotsInUse).toBe(2);
  const results = await Promise.all(runs);
  results.forEach((result, i) => {
    const inline = encodePayload(inputs[i]!, codec);
    expect(Buffer.compare(concat(result.pieces), concat(inline.pieces))).toBe(0);
  });
  const stats = pipeline.stats();
  expect(stats).toMatchObject({ slotsInUse: 0, waitingForSlot: 0, encoded: 24, threadQueueDepths: [0, 0] });
  expect(stats.completionsPerWake).toBeGreaterThanOrEqual(1);
});

test("only large payloads with a checksum or lz4 are worth the hand-off", () => {
  expect(CodecPipeline.wants(4096, { compression: "lz4", checksum: "sha256" })).toBe(false);
  expect(CodecPipeline.wants(MAX_IO_BYTES, { compression: "hole", checksum: "none" })).toBe(false);
  expect(CodecPipeline.wants(MAX_IO_BYTES, { compression: "none", checksum: "crc32" })).toBe(true);
  expect(CodecPipeline.wants(PIPELINE_MIN_BYTES, { compression: "lz4", checksum: "none" })).toBe(true);
});

test("a closed pipeline refuses work with a clear error", async () => {
  pipeline = CodecPipeline.start({ threads: 1, slots: 1 });
  await pipeline.close();
  await expect(pipeline.encode(new Uint8Array(PIPELINE_MIN_BYTES), { compression: "none", checksum: "crc32" }))
    .rejects.toThrow("closed");
});

test("an encode that fails on a thread rejects with the thread's message, and the pipeline goes on", async () => {
  // The thread's crc32 throws for a marked payload: before the fix, encode() returned the message
  // as the frame's payload (flags 0).
  pipeline = CodecPipeline.start({ threads: 1, slots: 2, workerUrl: markedWorker() });
  const codec: CodecOptions = { compression: "none", checksum: "crc32" };
  await expect(pipeline.encode(marked(PIPELINE_MIN_BYTES, REFUSE), codec))
    .rejects.toThrow("crc32 refused a marked payload");
  const data = marked(PIPELINE_MIN_BYTES, 0);
  const ok = await pipeline.encode(data, codec);
  expect(Buffer.compare(concat(ok.pieces), concat(encodePayload(data, codec).pieces))).toBe(0);
  expect(pipeline.stats()).toMatchObject({ encoded: 1, slotsInUse: 0, failed: null, inline: 0 });
});

/** Encodes and decodes every input on `p`, in parallel, and expects the inline codec's bytes. */
async function expectInlineResults(p: CodecPipeline, inputs: Uint8Array[], codec: CodecOptions): Promise<void> {
  const encoded = await Promise.all(inputs.map((data) => p.encode(data, codec)));
  const wires = inputs.map((data, i) => {
    const inline = encodePayload(data, codec);
    expect(encoded[i]!.flags).toBe(inline.flags);
    expect(Buffer.compare(concat(encoded[i]!.pieces), concat(inline.pieces))).toBe(0);
    return { flags: inline.flags, wire: concat(inline.pieces) };
  });
  const decoded = await Promise.all(wires.map(({ flags, wire }, i) =>
    p.decode(flags, wire, inputs[i]!.byteLength, codec.checksum)));
  decoded.forEach((data, i) => expect(Buffer.compare(data, inputs[i]!)).toBe(0));
}

test("when a thread fails at start, encode and decode go on inline, byte for byte, and the stats say why", async () => {
  // Jobs submitted before the thread's error arrives are on a thread or waiting for a slot then;
  // those submitted after it never reach a thread. All of them must complete, as inline would.
  pipeline = CodecPipeline.start({
    threads: 2, slots: 2, workerUrl: faultyWorker("broken", 'throw new Error("codec thread test: cannot start");'),
  });
  const codec: CodecOptions = { compression: "lz4", checksum: "sha256" };
  await expectInlineResults(pipeline, samples(), codec);
  await expectInlineResults(pipeline, samples(), codec);
  const stats = pipeline.stats();
  expect(stats.failed).toContain("cannot start");
  expect(stats).toMatchObject({ encoded: 8, decoded: 8, inline: 16, waitingForSlot: 0 });
  // A corrupt payload is still rejected with the inline codec's reason.
  const { flags, pieces } = encodePayload(samples()[2]!, codec);
  const wire = concat(pieces);
  wire[1000]! ^= 0x10;
  await expect(pipeline.decode(flags, wire, MAX_IO_BYTES, "sha256")).rejects.toThrow("sha256 mismatch");
});

test("a thread that exits mid-job: its job, the jobs behind it and later ones complete inline", async () => {
  // The first payload makes its thread exit while encoding it (an 'exit' without an 'error');
  // the other thread and the waiting callers are busy with the rest.
  pipeline = CodecPipeline.start({ threads: 2, slots: 2, workerUrl: markedWorker() });
  const codec: CodecOptions = { compression: "none", checksum: "crc32" };
  const inputs = [DIE, 1, 2, 3, 4, 5].map((first) => marked(256 * 1024, first));
  const encodes = inputs.map((data) => pipeline!.encode(data, codec));
  expect(pipeline.stats().waitingForSlot).toBe(4);
  const encoded = await Promise.all(encodes);
  encoded.forEach((result, i) => {
    expect(Buffer.compare(concat(result.pieces), concat(encodePayload(inputs[i]!, codec).pieces))).toBe(0);
  });
  expect(pipeline.stats()).toMatchObject({ threadQueueDepths: [0, 0], waitingForSlot: 0, slotsInUse: 0 });
  expect(pipeline.stats().failed).toContain("exited");
  await expectInlineResults(pipeline, [marked(PIPELINE_MIN_BYTES, DIE), marked(MAX_IO_BYTES, 0)], codec);
  expect(pipeline.stats().inline).toBeGreaterThanOrEqual(5);
});

/** A first byte that makes the thread of holdingWorker() hold its job (see there). */
const HOLD = 0xe3;

/**
 * A thread whose crc32, for a payload starting with HOLD, reads it only once the test opens a
 * gate: four Int32 words at `gateOffset` of the request slots' memory (which the thread sees).
 * Word 0: the thread holds the job; word 1: the test opened the gate; word 2: the thread has
 * read the payload.
 */
function holdingWorker(gateOffset: number): string {
  return faultyWorker("holding", [
    'import { workerData } from "node:worker_threads";',
    `const gate = new Int32Array(workerData.inputs.sab, ${gateOffset}, 4);`,
    "const crc32 = Bun.hash.crc32;",
    "Bun.hash.crc32 = (data, seed) => {",
    `  if (data[0] !== ${HOLD}) return crc32(data, seed);`,
    "  Atomics.store(gate, 0, 1);",
    "  Atomics.wait(gate, 1, 0);",
    "  const sum = crc32(data, seed);",
    "  Atomics.store(gate, 2, 1);",
    "  return sum;",
    "};",
  ].join("\n"));
}

test("close() fails a job a thread holds only once no thread reads its input any more", async () => {
  // The caller reuses a job's input when the job settles (the link frees the request slot it lies
  // in). A thread holds a job whose payload is in a request slot; close() runs; the gate opens on
  // the next macrotask. Before the fix the job failed at once, in a microtask, while the thread
  // had not read its input yet; now it fails after the thread read it and exited.
  const slots = new RequestSlots(2, MAX_IO_BYTES, PIPELINE_MIN_BYTES);
  const control = slots.take(MAX_IO_BYTES)!;
  const gate = new Int32Array(slots.sab, control.byteOffset, 4);
  pipeline = CodecPipeline.start({ threads: 1, slots: 2, inputs: slots, workerUrl: holdingWorker(control.byteOffset) });
  const payload = slots.take(PIPELINE_MIN_BYTES)!.fill(7);
  payload[0] = HOLD;
  const atSettle = { stillRead: null as boolean | null };
  const settled = pipeline.encode(payload, { compression: "none", checksum: "crc32" }).then(
    () => Promise.reject(new Error("a job of a closed pipeline succeeded")),
    (error: Error) => {
      atSettle.stillRead = Atomics.load(gate, 2) === 0;
      expect(error.message).toContain("closed");
    },
  );
  while (Atomics.load(gate, 0) === 0) await Bun.sleep(1); // the thread holds the job
  const closing = pipeline.close();
  setTimeout(() => {
    Atomics.store(gate, 1, 1);
    Atomics.notify(gate, 1);
  }, 0);
  await Promise.all([closing, settled, pipeline.close()]);
  expect(atSettle.stillRead).toBe(false);
  expect(pipeline.stats().slotsInUse).toBe(0);
});
