/**
 * When the link lets go of a request's payload (RemoteCall.released): the primary frees the
 * request slot a write was received into at that moment, so a release that comes early lets the
 * next write refill memory that is still being sent or encoded. Driven with a scripted
 * Connection (replies are injected as frames) and, for the codec stage, a pipeline whose
 * encoding finishes when the test says so.
 */
import { expect, test } from "bun:test";
import type { CodecPipeline } from "./codec_pipeline.ts";
import { RemoteLink, systemClock } from "./remote_link.ts";
import type { Connection } from "./transport.ts";
import { FrameFlag, MessageType, type Frame } from "./wire.ts";

class ScriptedConnection implements Connection {
  onFrame: (frame: Frame) => void = () => {};
  onClose: (reason: string) => void = () => {};
  readonly remoteAddress = "scripted";
  readonly sent: Uint8Array[][] = [];
  closed = false;
  readonly gone = Promise.withResolvers<void>();
  readonly finished = this.gone.promise;
  readonly encrypted = false;

  secure(): void {
    throw new Error("not used by these tests");
  }

  send(pieces: Uint8Array[]): boolean {
    this.sent.push(pieces);
    return true;
  }

  async drained(): Promise<void> {}

  close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.onClose(reason);
  }

  reply(seq: number, flags = 0): void {
    this.onFrame({ type: MessageType.Reply, flags, seq, offset: 0, length: 0, error: 0, payload: new Uint8Array(0) });
  }
}

function linkOver(conn: Connection, pipeline: CodecPipeline | null = null): RemoteLink {
  return new RemoteLink(conn, {
    timeoutMs: 60_000, keepaliveMs: 60_000, maxInFlight: 16, maxInFlightBytes: 1 << 26, clock: systemClock,
    codec: { compression: "none", checksum: "sha256" }, pipeline, onClose: () => {},
  });
}

/** Whether `promise` has settled after the microtasks and one turn of the event loop ran. */
async function settled(promise: Promise<unknown>): Promise<boolean> {
  let done = false;
  void promise.then(() => (done = true), () => (done = true));
  await Bun.sleep(1);
  return done;
}

const write = (bytes: number) => ({
  type: MessageType.Write, offset: 0, length: bytes, payload: new Uint8Array(bytes).fill(3),
});

test("released comes with the final reply, not the early received acknowledgement", async () => {
  const conn = new ScriptedConnection();
  const link = linkOver(conn);
  const call = link.call(write(4096));
  expect(conn.sent).toHaveLength(1);
  conn.reply(1, FrameFlag.Received);
  await call.received;
  expect(await settled(call.released())).toBe(false);
  conn.reply(1);
  await call.done;
  expect(await settled(call.released())).toBe(true);
  link.close("test over");
});

test("after the link went down, released waits until the connection is gone", async () => {
  const conn = new ScriptedConnection();
  const link = linkOver(conn);
  const call = link.call(write(4096));
  link.close("test: link lost");
  await expect(call.done).rejects.toThrow("link lost");
  expect(await settled(call.released())).toBe(false); // its bytes may still be in the socket
  conn.gone.resolve();
  expect(await settled(call.released())).toBe(true);
  expect(await settled(link.call(write(4096)).released())).toBe(true); // never sent at all
});

test("a payload a codec thread still reads is released only after the encoding ended", async () => {
  const conn = new ScriptedConnection();
  const encoding = Promise.withResolvers<{ flags: number; pieces: Uint8Array[] }>();
  const pipeline = { encode: () => encoding.promise } as unknown as CodecPipeline;
  const link = linkOver(conn, pipeline);
  const call = link.call(write(256 * 1024)); // large and checksummed: encoded on a thread
  expect(conn.sent).toHaveLength(0);
  link.close("test: link lost");
  conn.gone.resolve();
  expect(await settled(call.released())).toBe(false);
  encoding.resolve({ flags: 0, pieces: [new Uint8Array(256 * 1024)] });
  expect(await settled(call.released())).toBe(true);
  expect(conn.sent).toHaveLength(0); // nothing goes out on a closed link
});
