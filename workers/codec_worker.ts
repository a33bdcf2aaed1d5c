/**
 * A codec thread of lib/codec_pipeline.ts: sleeps on its request ring, takes
 * every slot queued at a wake-up, encodes or decodes each one (input → the
 * slot's output region) with payload_codec, and pushes the batch back on its
 * completion ring with one wake-up of the event loop. The input is the slot's
 * input region, or a payload in one of the primary's request slots, read
 * where it lies.
 */
import assert from "node:assert/strict";
import { workerData } from "node:worker_threads";
import {
  CHECKSUMS, CodecMeta, CodecOp, COMPRESSIONS, type CodecWorkerData, InputRegion, PIPELINE_REGION_BYTES,
  STOP_ENTRY,
} from "../lib/codec_pipeline.ts";
import { decodePayload, encodePayload } from "../lib/payload_codec.ts";
import { SpscRing } from "../lib/ring.ts";
import { SlotPool, SlotState } from "../lib/slot_pool.ts";

const shared = workerData as CodecWorkerData;
const pool = new SlotPool(shared.sab, {
  slotCount: shared.slotCount, slotDataBytes: shared.slotDataBytes,
  byteOffset: shared.poolOffset,
});
const inputs = shared.inputs === null ? null : new SlotPool(shared.inputs.sab, {
  slotCount: shared.inputs.slotCount, slotDataBytes: shared.inputs.slotDataBytes,
});
const requests = new SpscRing(shared.sab, shared.requestsOffset, shared.ringCapacity);
const completions = new SpscRing(shared.sab, shared.completionsOffset, shared.ringCapacity);
const batch = new Uint32Array(shared.ringCapacity);
const encoder = new TextEncoder();

/** True when `piece` is the bytes of `region` starting at offset `at`. */
function isAt(piece: Uint8Array, region: Uint8Array, at: number): boolean {
  return piece.buffer === region.buffer && piece.byteOffset === region.byteOffset + at;
}

/** Runs one slot's job; errors become the slot's result, never an exception of the thread. */
function work(slot: number): void {
  pool.transition(slot, SlotState.Filled, SlotState.Encoding);
  const meta = pool.meta(slot);
  const data = pool.data(slot);
  const inputBytes = meta[CodecMeta.InputBytes]!;
  const inputOffset = meta[CodecMeta.InputOffset]!;
  const region = meta[CodecMeta.InputRegion]!;
  assert.ok(region === InputRegion.Own || region === InputRegion.RequestSlot, `slot ${slot}: input region ${region}`);
  const input = region === InputRegion.RequestSlot
    ? inputs!.data(meta[CodecMeta.InputSlot]!).subarray(inputOffset, inputOffset + inputBytes)
    : data.subarray(0, inputBytes);
  const output = data.subarray(PIPELINE_REGION_BYTES);
  const codec = {
    compression: COMPRESSIONS[meta[CodecMeta.Compression]!]!,
    checksum: CHECKSUMS[meta[CodecMeta.Checksum]!]!,
  };
  try {
    // When the body is the input unchanged (nothing compressed), only the checksum trailer is
    // written out and the event loop keeps using its own copy of the data. Compressed and
    // expanded bytes are written straight into the output region: no buffer per payload.
    if (meta[CodecMeta.Op] === CodecOp.Encode) {
      const { flags, pieces } = encodePayload(input, codec, output);
      const bodyIsInput = pieces[0] === input;
      meta[CodecMeta.BodyIsInput] = bodyIsInput ? 1 : 0;
      let at = 0;
      for (const piece of bodyIsInput ? pieces.slice(1) : pieces) {
        if (!isAt(piece, output, at)) output.set(piece, at);
        at += piece.byteLength;
      }
      meta[CodecMeta.Flags] = flags;
      meta[CodecMeta.OutLength] = at;
    } else {
      const decoded = decodePayload(meta[CodecMeta.Flags]!, input, meta[CodecMeta.Length]!, codec.checksum, output);
      const bodyIsInput = isAt(decoded, input, 0);
      meta[CodecMeta.BodyIsInput] = bodyIsInput ? 1 : 0;
      assert.ok(bodyIsInput || isAt(decoded, output, 0), `slot ${slot}: decoded outside the output region`);
      meta[CodecMeta.OutLength] = decoded.byteLength;
    }
    meta[CodecMeta.Error] = 0;
  } catch (error) {
    const message = encoder.encode(error instanceof Error ? error.message : String(error)).subarray(0, 4096);
    output.set(message, 0);
    meta[CodecMeta.OutLength] = message.byteLength;
    meta[CodecMeta.Error] = 1;
  }
  pool.transition(slot, SlotState.Encoding, SlotState.Encoded);
}

for (;;) {
  const n = requests.popBatch(batch);
  if (n === 0) {
    requests.waitForDataSync(Infinity);
    continue;
  }
  let stop = false;
  for (let i = 0; i < n; i++) {
    const slot = batch[i]!;
    if (slot === STOP_ENTRY) {
      stop = true;
      continue;
    }
    work(slot);
    completions.push(slot);
    completions.notifyConsumer(); // a syscall only when the event loop sleeps
  }
  if (stop) break;
}
