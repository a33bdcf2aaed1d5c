// Proves how queued frame pieces reach the socket: in order, small pieces copied together
// into one write per run, large ones (payloads) written as they are, never corked; and that
// none is handed to a socket whose buffer is full: they wait for 'drain', and drained() with
// them, and all arrive in order.
import { expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import net from "node:net";
import { deriveLinkKeys } from "./link_crypto.ts";
import { encodeFrame, encodeJson, MessageType, type Frame } from "./wire.ts";
import { socketConnection, writePieces } from "./transport.ts";

test("writePieces: runs of small pieces in one write each, large pieces alone, order kept", () => {
  const writes: Uint8Array[] = [];
  const socket = {
    write: (piece: Uint8Array) => writes.push(piece) > 0,
    cork: () => { throw new Error("cork used"); },
  } as unknown as net.Socket;
  const small = (n: number) => new Uint8Array(32).fill(n);
  const large = new Uint8Array(1 << 20).fill(9);
  expect(writePieces(socket, [small(1), small(2), large, small(3)])).toBe(4);
  expect(writes.length).toBe(3);
  expect([...writes[0]!]).toEqual([...small(1), ...small(2)]);
  expect(writes[1]).toBe(large); // not copied
  expect([...writes[2]!]).toEqual([...small(3)]);
  writes.length = 0;
  writePieces(socket, [large, large]);
  expect(writes).toEqual([large, large]);
  writes.length = 0;
  writePieces(socket, [small(4)]);
  expect(writes.length).toBe(1);
});

test("writePieces stops after the write that reports the socket full", () => {
  const writes: Uint8Array[] = [];
  const socket = { write: (piece: Uint8Array) => writes.push(piece) < 2 } as unknown as net.Socket;
  const small = new Uint8Array(32);
  const large = new Uint8Array(1 << 20);
  // small+small go in one write (accepted), the first large fills the socket: the rest waits.
  expect(writePieces(socket, [small, small, large, large, small])).toBe(3);
  expect(writes.length).toBe(2);
  writes.length = 0;
  // A run of small pieces that fills the socket counts as written as a whole.
  expect(writePieces({ write: () => false } as unknown as net.Socket, [small, small, large])).toBe(2);
});

/** A TCP connection on loopback: the client socket, the server's end (paused), and the server. */
async function socketPair(): Promise<{ client: net.Socket; peer: net.Socket; server: net.Server }> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  const accepted = new Promise<net.Socket>((resolve) => server.once("connection", resolve));
  const client = net.connect({ host: "127.0.0.1", port });
  await new Promise<void>((resolve) => client.once("connect", resolve));
  const peer = await accepted;
  peer.pause(); // the receiver reads nothing for now
  return { client, peer, server };
}

test("a connection holds frames while the peer does not read, then delivers all in order", async () => {
  const { client, peer, server } = await socketPair();
  try {
    const sender = socketConnection(client);
    const MIB = 1 << 20;
    const frames = 64;
    let refused = -1;
    for (let i = 0; i < frames; i++) {
      const payload = new Uint8Array(MIB).fill(i);
      if (!sender.send(encodeFrame({ type: MessageType.Write, seq: i + 1, offset: i * MIB, length: MIB, payload }))
        && refused < 0) refused = i;
      await Bun.sleep(0);
    }
    // 64 MiB do not fit in the socket buffers: send() said so, and drained() waits.
    expect(refused).toBeGreaterThan(0);
    // …and the socket itself was given about one frame beyond what the kernel took, not 64 MiB
    // (which it would copy into a user-space buffer).
    expect(client.writableLength).toBeLessThan(4 * MIB);
    let drained = false;
    const drain = sender.drained().then(() => (drained = true));
    await Bun.sleep(100);
    expect(drained).toBe(false);
    const received: Frame[] = [];
    const receiver = socketConnection(peer);
    receiver.onFrame = (frame) => received.push(frame);
    peer.resume();
    await drain;
    for (let waited = 0; received.length < frames && waited < 10_000; waited += 10) await Bun.sleep(10);
    expect(received.map((f) => f.seq)).toEqual(Array.from({ length: frames }, (_, i) => i + 1));
    expect(received.every((f, i) => f.payload.byteLength === MIB && f.payload.every((b) => b === i))).toBe(true);
    // finished (when a request slot sent from may be reused) comes with the socket's end only.
    let finished = false;
    void sender.finished.then(() => (finished = true));
    await Bun.sleep(20);
    expect(finished).toBe(false);
    receiver.close("done");
    sender.close("done");
    await sender.finished;
    expect(client.destroyed).toBe(true);
  } finally {
    client.destroy();
    server.close();
  }
}, 20_000);

for (const sealed of [false, true]) {
  test(`${sealed ? "sealed" : "unsealed"}: close() hands over every queued frame, then a Goodbye with the reason`,
    async () => {
      const { client, peer, server } = await socketPair();
      try {
        const sender = socketConnection(client);
        const receiver = socketConnection(peer);
        if (sealed) {
          const nonces = [randomBytes(32), randomBytes(32), randomBytes(32)] as const;
          const key = Buffer.from("0123456789abcdef0123");
          sender.secure(deriveLinkKeys(key, "r", nonces[0], nonces[1], "primary", nonces[2]));
          receiver.secure(deriveLinkKeys(key, "r", nonces[0], nonces[1], "secondary", nonces[2]));
        }
        const received: Frame[] = [];
        receiver.onFrame = (frame) => received.push(frame);
        const closed = new Promise<string>((resolve) => (receiver.onClose = resolve));
        const MIB = 1 << 20;
        const frames = 64; // far more than the socket buffers hold
        for (let i = 0; i < frames; i++) {
          const payload = new Uint8Array(MIB).fill(i);
          sender.send(encodeFrame({ type: MessageType.Write, seq: i + 1, offset: i * MIB, length: MIB, payload }));
        }
        sender.close("the test is done");
        peer.resume();
        expect(await closed).toBe("peer closed the connection: the test is done");
        expect(received.map((f) => f.seq)).toEqual(Array.from({ length: frames }, (_, i) => i + 1));
      } finally {
        client.destroy();
        server.close();
      }
    }, 20_000);
}

// Found by review: an encrypted link cut inside a record ended as any close, and a second
// secure() would have started a new Sealer at record 0 under the same key (GCM nonces reused).
test("sealed: a close inside a record says so; secure() twice is refused", async () => {
  const { client, peer, server } = await socketPair();
  try {
    const sender = socketConnection(client);
    const receiver = socketConnection(peer);
    const nonces = [randomBytes(32), randomBytes(32), randomBytes(32)] as const;
    const key = Buffer.from("0123456789abcdef0123");
    const keys = deriveLinkKeys(key, "r", nonces[0], nonces[1], "primary", nonces[2]);
    sender.secure(keys);
    receiver.secure(deriveLinkKeys(key, "r", nonces[0], nonces[1], "secondary", nonces[2]));
    expect(() => sender.secure(keys)).toThrow("it is encrypted already");
    const closed = new Promise<string>((resolve) => (receiver.onClose = resolve));
    // A record header announcing 100 bytes, 10 of them, then the end of the stream.
    const cut = Buffer.alloc(14);
    cut.writeUInt32BE(100, 0);
    client.end(cut);
    expect(await closed).toBe("peer closed the connection inside an encrypted record (cut on the way?)");
  } finally {
    client.destroy();
    server.close();
  }
});

// Found by review: a peer that sends requests within the window but reads none of the replies
// made the secondary queue replies without bound. With pauseWhileFull it stops reading instead.
for (const pauseWhileFull of [true, false]) {
  test(`a connection ${pauseWhileFull ? "that pauses while full stops reading" : "that does not pause reads on"} ` +
    "while its peer reads none of its replies", async () => {
    const { client, peer, server } = await socketPair();
    try {
      // The server side answers every frame with 256 KiB; the client reads nothing.
      const serving = socketConnection(peer, null, { pauseWhileFull });
      let handled = 0;
      const reply = new Uint8Array(256 * 1024);
      serving.onFrame = (frame) => {
        handled++;
        const length = reply.byteLength;
        serving.send(encodeFrame({ type: MessageType.Reply, seq: frame.seq, length, payload: reply }));
      };
      client.pause();
      const frames = 400;
      const request = new Uint8Array(16 * 1024);
      for (let i = 0; i < frames; i++) {
        client.write(Buffer.concat(encodeFrame({
          type: MessageType.Write, seq: i + 1, offset: 0, length: request.byteLength, payload: request,
        })));
      }
      await Bun.sleep(500);
      if (!pauseWhileFull) {
        expect(handled).toBe(frames); // the control: every reply queued in memory
        return;
      }
      expect(handled).toBeLessThan(frames / 2);
      // Once the client reads, everything is served.
      let replies = 0;
      const receiving = socketConnection(client);
      receiving.onFrame = () => replies++;
      client.resume();
      for (let waited = 0; replies < frames && waited < 10_000; waited += 10) await Bun.sleep(10);
      expect([handled, replies]).toEqual([frames, frames]);
    } finally {
      client.destroy();
      peer.destroy();
      server.close();
    }
  }, 20_000);
}

// Found by review: the parser went on with the rest of a chunk after the frame that closed the
// connection, so frames after a Goodbye, or after one the user closed the connection on, reached
// onFrame after onClose (the secondary had to skip them itself; the primary's link saw replies
// after its close).
for (const closer of ["a Goodbye", "onFrame closing"] as const) {
  test(`no frame is delivered after the connection closed (${closer}), even from the same chunk`, async () => {
    const { client, peer, server } = await socketPair();
    try {
      const receiver = socketConnection(peer);
      const events: string[] = [];
      const closed = new Promise<void>((resolve) => {
        receiver.onClose = (reason) => {
          events.push(`close: ${reason}`);
          resolve();
        };
      });
      receiver.onFrame = (frame) => {
        events.push(`frame ${frame.seq}`);
        if (closer === "onFrame closing") receiver.close("closing at the first frame");
      };
      const first = closer === "a Goodbye" ? encodeJson(MessageType.Goodbye, { reason: "bye" })
        : encodeFrame({ type: MessageType.Reply, seq: 1 });
      const after = [2, 3].flatMap((seq) => encodeFrame({ type: MessageType.Reply, seq }));
      // One write of a few dozen bytes on loopback: one 'data' chunk, as the parse of a chunk is
      // what this checks (were it split, the later chunks are dropped as before).
      client.write(Buffer.concat([...first, ...after]));
      peer.resume();
      await closed; // the rest of the chunk is parsed in the same turn, before this resumes
      expect(events).toEqual(closer === "a Goodbye" ? ["close: peer closed the connection: bye"]
        : ["frame 1", "close: closing at the first frame"]);
    } finally {
      client.destroy();
      peer.destroy();
      server.close();
    }
  });
}
