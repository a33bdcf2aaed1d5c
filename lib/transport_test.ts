// Proves how queued frame pieces reach the socket: in order, small pieces copied together
// into one write per run, large ones (payloads) written as they are, never corked.
import { expect, test } from "bun:test";
import type net from "node:net";
import { writePieces } from "./transport.ts";

test("writePieces: runs of small pieces in one write each, large pieces alone, order kept", () => {
  const writes: Uint8Array[] = [];
  const socket = {
    write: (piece: Uint8Array) => writes.push(piece) > 0,
    cork: () => { throw new Error("cork used"); },
  } as unknown as net.Socket;
  const small = (n: number) => new Uint8Array(32).fill(n);
  const large = new Uint8Array(1 << 20).fill(9);
  writePieces(socket, [small(1), small(2), large, small(3)]);
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
