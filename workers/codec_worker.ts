/**
 * A codec thread of lib/codec_pipeline.ts: sleeps on its request ring, takes
 * every slot queued at a wake-up, encodes or decodes each one (input → the
 * slot's output region) with payload_codec, and pushes the batch back on its
 * completion ring with one wake-up of the event loop. The input is the slot's
 * input region, or a payload in one of the primary's request slots, read
 * where it lies.
 */
import { workerData } from "node:worker_threads";
import {
  BODY_IS_INPUT, CHECKSUMS, CodecOp, COMPRESSIONS, type CodecWorkerData, INPUT_OFFSET, INPUT_SLOT,
  PIPELINE_REGION_BYTES, STOP_ENTRY,
} from "../lib/codec_pipeline.ts";
import { decodePayload, encodePayload } from "../lib/payload_codec.ts";
import { SpscRing } from "../lib/ring.ts";
import { SlotMeta, SlotPool, SlotState } from "../lib/slot_pool.ts";

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

/** Runs one slot's job; errors become the slot's result, never an exception of the thread. */
function work(slot: number): void {
  pool.transition(slot, SlotState.Filled, SlotState.Encoding);
  const meta = pool.meta(slot);
  const data = pool.data(slot);
  const inputBytes = meta[SlotMeta.User0]!;
  const inputSlot = meta[INPUT_SLOT]! - 1;
  const input = inputSlot < 0
    ? data.subarray(0, inputBytes)
    : inputs!.data(inputSlot).subarray(meta[INPUT_OFFSET]!, meta[INPUT_OFFSET]! + inputBytes);
  const output = data.subarray(PIPELINE_REGION_BYTES);
  const codec = { compression: COMPRESSIONS[meta[SlotMeta.User1]!]!, checksum: CHECKSUMS[meta[SlotMeta.User2]!]! };
  try {
    // When the body is the input unchanged (nothing compressed), only the checksum trailer is
    // written out and the event loop keeps using its own copy of the data.
    if (meta[SlotMeta.Command] === CodecOp.Encode) {
      const { flags, pieces } = encodePayload(input, codec);
      const bodyIsInput = pieces[0] === input;
      meta[BODY_IS_INPUT] = bodyIsInput ? 1 : 0;
      let at = 0;
      for (const piece of bodyIsInput ? pieces.slice(1) : pieces) {
        output.set(piece, at);
        at += piece.byteLength;
      }
      meta[SlotMeta.Flags] = flags;
      meta[SlotMeta.OutLength] = at;
    } else {
      const decoded = decodePayload(meta[SlotMeta.Flags]!, input, meta[SlotMeta.Length]!, codec.checksum);
      const bodyIsInput = decoded.buffer === input.buffer && decoded.byteOffset === input.byteOffset;
      meta[BODY_IS_INPUT] = bodyIsInput ? 1 : 0;
      if (!bodyIsInput) output.set(decoded, 0);
      meta[SlotMeta.OutLength] = decoded.byteLength;
    }
    meta[SlotMeta.Error] = 0;
  } catch (error) {
    const message = encoder.encode(error instanceof Error ? error.message : String(error)).subarray(0, 4096);
    output.set(message, 0);
    meta[SlotMeta.OutLength] = message.byteLength;
    meta[SlotMeta.Error] = 1;
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
