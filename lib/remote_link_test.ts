/**
 * When the link lets go of a request's payload (RemoteCall.released): the primary frees the
 * request slot a write was received into at that moment, so a release that comes early lets the
 * next write refill memory that is still being sent or encoded. Driven with a scripted
 * Connection (replies are injected as frames) and, for the codec stage, a pipeline whose
 * encoding finishes when the test says so.
 */
import { describe, expect, test } from "bun:test";
import type { CodecPipeline } from "./codec_pipeline.ts";
import { RemoteLink, systemClock } from "./remote_link.ts";
import { encodePayload } from "./payload_codec.ts";
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
    this.onFrame(scriptedReply(seq, flags));
  }
}

const empty = new Uint8Array(0);

/** A reply without data. */
function scriptedReply(seq: number, flags: number): Frame {
  return { type: MessageType.Reply, flags, seq, offset: 0, length: 0, error: 0, payload: empty };
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

/** A reply frame with `data` encoded as the secondary encodes it (sha256 trailer, maybe a hole). */
function dataReply(
  seq: number, data: Uint8Array, extra: Partial<Frame> = {}, compression: "none" | "hole" = "none",
): Frame {
  const { flags, pieces } = encodePayload(data, { compression, checksum: "sha256" });
  const payload = new Uint8Array(Buffer.concat(pieces));
  return { type: MessageType.Reply, flags, seq, offset: 0, length: data.byteLength, error: 0, payload, ...extra };
}

/** A link over a scripted connection that records why it closed. */
function watchedLink(): { conn: ScriptedConnection; link: RemoteLink; closedWith: string[] } {
  const conn = new ScriptedConnection();
  const closedWith: string[] = [];
  const link = new RemoteLink(conn, {
    timeoutMs: 60_000, keepaliveMs: 60_000, maxInFlight: 16, maxInFlightBytes: 1 << 26, clock: systemClock,
    codec: { compression: "none", checksum: "sha256" }, pipeline: null, onClose: (why) => closedWith.push(why),
  });
  return { conn, link, closedWith };
}

// Found by review: a final reply whose data failed its checksum rejected `done` but left
// `received` pending for ever (the entry had left the table the close settles), so a memsync
// write, which waits for `received`, hung.
test("a reply with bad data closes the link and settles both promises of its request", async () => {
  const { conn, link, closedWith } = watchedLink();
  const call = link.call({ type: MessageType.Read, offset: 0, length: 4096 });
  const bad = dataReply(1, new Uint8Array(4096));
  bad.payload = bad.payload.slice();
  bad.payload[0]! ^= 1; // the sha256 trailer no longer matches
  conn.onFrame(bad);
  expect(closedWith).toEqual([expect.stringMatching(/^bad data from secondary: .*sha256 mismatch/)]);
  expect(await settled(call.received)).toBe(true);
  await expect(call.received).rejects.toThrow("sha256 mismatch");
  await expect(call.done).rejects.toThrow("sha256 mismatch");
  expect([link.isUp, link.inFlight, link.inFlightBytes]).toEqual([false, 0, 0]);
});

// Found by review: replies were matched by seq only, so a secondary could answer a write with
// data, a read with fewer bytes than asked (the caller saw an EIO "errno 0", the link stayed
// up), or acknowledge receipt of a request that has none; each is a protocol violation now.
describe("a reply that does not fit its request closes the link", () => {
  const read = { type: MessageType.Read, offset: 0, length: 4096 };
  const cases: [string, Partial<Frame> & { type: MessageType }, (seq: number) => Frame[], RegExp][] = [
    ["a read answered with fewer bytes", read, (seq) => [dataReply(seq, new Uint8Array(512))],
      /reply to Read \(seq 1\) of 4096 bytes carries 512/],
    ["a read answered with no data", read, (seq) => [dataReply(seq, new Uint8Array(0), { flags: 0, payload: empty })],
      /reply to Read \(seq 1\) of 4096 bytes carries 0/],
    ["a read answered with a hole of another length", read,
      (seq) => [dataReply(seq, new Uint8Array(8192), {}, "hole")],
      /reply to Read \(seq 1\) of 4096 bytes carries 8192/],
    ["a write answered with data", write(4096), (seq) => [dataReply(seq, new Uint8Array(4096))],
      /reply to Write \(seq 1\) carries data/],
    ["a flush answered with a data flag", { type: MessageType.Flush },
      (seq) => [dataReply(seq, new Uint8Array(0))], /reply to Flush \(seq 1\) carries data/],
    ["a verify answered with no digest", { type: MessageType.Verify, offset: 0, length: 4096 },
      (seq) => [dataReply(seq, new Uint8Array(16))], /reply to Verify \(seq 1\) of 4096 bytes carries 16/],
    ["an error reply with data", read, (seq) => [dataReply(seq, new Uint8Array(4096), { error: 5 })],
      /error reply to Read \(seq 1\) carries data/],
    ["a receipt for a read", read, (seq) => [scriptedReply(seq, FrameFlag.Received)],
      /receipt acknowledged for a Read \(seq 1\)/],
    ["a second receipt for a write", write(4096),
      (seq) => [scriptedReply(seq, FrameFlag.Received), scriptedReply(seq, FrameFlag.Received)],
      /second receipt/],
    ["a receipt with an error", write(4096), (seq) => [{ ...scriptedReply(seq, FrameFlag.Received), error: 5 }],
      /receipt .* error/],
  ];
  for (const [name, request, replies, why] of cases) {
    test(name, async () => {
      const { conn, link, closedWith } = watchedLink();
      const call = link.call(request);
      for (const frame of replies(1)) conn.onFrame(frame);
      expect(closedWith).toEqual([expect.stringMatching(why)]);
      expect(await settled(call.received)).toBe(true);
      await expect(call.done).rejects.toThrow(why);
      expect([link.isUp, link.inFlight, link.inFlightBytes]).toEqual([false, 0, 0]);
    });
  }

  test("the control: well-formed replies keep the link up and empty the window", async () => {
    const { conn, link, closedWith } = watchedLink();
    const data = new Uint8Array(4096).fill(7);
    const reading = link.call(read);
    const writing = link.call(write(4096));
    const flushing = link.call({ type: MessageType.Flush });
    const verifying = link.call({ type: MessageType.Verify, offset: 0, length: 4096 });
    const failing = link.call(read);
    expect(link.inFlightBytes).toBe(4 * 4096);
    conn.onFrame(dataReply(1, data));
    conn.reply(2, FrameFlag.Received);
    await writing.received;
    conn.reply(2);
    conn.reply(3);
    conn.onFrame(dataReply(4, new Uint8Array(32)));
    conn.onFrame({ ...scriptedReply(5, 0), error: 5 });
    expect(Buffer.compare((await reading.done).payload, data)).toBe(0);
    expect((await writing.done).error).toBe(0);
    expect((await flushing.done).error).toBe(0);
    expect((await verifying.done).payload.byteLength).toBe(32);
    expect((await failing.done).error).toBe(5);
    expect([closedWith, link.isUp, link.inFlight, link.inFlightBytes]).toEqual([[], true, 0, 0]);
    link.close("test over");
  });
});

test("seq wraps from 2^32-1 to 1 and replies still find their requests", async () => {
  const { conn, link, closedWith } = watchedLink();
  (link as unknown as { nextSeq: number }).nextSeq = 0xffffffff;
  const last = link.call({ type: MessageType.Flush });
  const first = link.call({ type: MessageType.Flush });
  const sentSeqs = conn.sent.map((pieces) => new DataView(pieces[0]!.buffer).getUint32(12));
  expect(sentSeqs).toEqual([0xffffffff, 1]);
  conn.reply(1);
  conn.reply(0xffffffff);
  expect([(await last.done).seq, (await first.done).seq, closedWith]).toEqual([0xffffffff, 1, []]);
  link.close("test over");
});

test("closing the link rejects every pending request and wakes those waiting for room", async () => {
  const conn = new ScriptedConnection();
  const link = new RemoteLink(conn, {
    timeoutMs: 60_000, keepaliveMs: 60_000, maxInFlight: 2, maxInFlightBytes: 1 << 26, clock: systemClock,
    codec: { compression: "none", checksum: "sha256" }, onClose: () => {},
  });
  const sent = [link.call(write(4096)), link.call({ type: MessageType.Flush })];
  const waiting = link.callWhenRoom({ type: MessageType.Flush });
  expect(await settled(waiting)).toBe(false);
  link.close("test: link lost");
  await expect(waiting).rejects.toThrow("test: link lost");
  for (const call of sent) {
    await expect(call.received).rejects.toThrow("test: link lost");
    await expect(call.done).rejects.toThrow("test: link lost");
  }
  expect([link.inFlight, link.inFlightBytes]).toEqual([0, 0]);
});

// Found by review: a request whose send threw (a bug of ours) stayed in the pending table, never
// sent, until the request timeout; the link now closes at once and settles it.
test("a send that throws closes the link and settles the request; the caller sees the error", async () => {
  const conn = new ScriptedConnection();
  const link = linkOver(conn);
  conn.send = () => {
    throw new TypeError("test: a bug in send");
  };
  expect(() => link.call(write(4096))).toThrow("test: a bug in send");
  expect(link.isUp).toBe(false);
  expect(conn.closed).toBe(true);
});

// The request whose send threw has no RemoteCall: its caller waits on `finished` before it reuses
// the payload (Primary.linkBroken; it kept each connection's `finished` in a map of its own).
test("finished resolves once the connection let go of everything it was given, not at the close", async () => {
  const conn = new ScriptedConnection();
  const link = linkOver(conn);
  link.close("test: link lost");
  expect(await settled(link.finished)).toBe(false); // its bytes may still be in the socket
  conn.gone.resolve();
  expect(await settled(link.finished)).toBe(true);
});
