/**
 * The primary's checks of the secondary's HelloReply (handshake.ts): a reply is validated
 * before anything in it is allocated or acted on (mapBytes within what this resource's size and
 * extent size allow, counters 64-bit decimal strings, a known sync source), driven through
 * parseHelloReply and through handshakeAsPrimary against a scripted secondary; the map bound
 * holds for every layout computeLayout makes; a Goodbye in place of the Hello names its reason.
 * The secondary's side (handshakeAsSecondary, against a capturing connection): a copy that may
 * lack writes (localWritesLost) is synced in full when metaflush is off on either node.
 */
import { describe, expect, test } from "bun:test";
import type { ResourceConfig } from "./config.ts";
import {
  handshakeAsPrimary, handshakeAsSecondary, parseHello, parseHelloReply, peerMapBytesMax, type HandshakeResult,
  type Hello,
} from "./handshake.ts";
import { computeLayout, type Metadata } from "./metadata.ts";
import type { MetaStore } from "./storage.ts";
import type { Connection } from "./transport.ts";
import { encodeFrame, encodeJson, FrameFlag, FrameParser, MessageType, ProtocolError, type Frame } from "./wire.ts";

const EXTENT = 1024 * 1024;
const layout = computeLayout(64 * 1024 * 1024, EXTENT);
const limits = { datasizeBytes: layout.datasizeBytes, extentsizeBytes: EXTENT };
const accepted = {
  accepted: true, resuid: "7", localcnt: "1", remotecnt: "1", source: "primary", full: false,
  reason: "in step", mapBytes: layout.mapSizeBytes, verify: true,
};

describe("parseHelloReply", () => {
  test("a reply as a secondary sends it is typed, counters as bigints", () => {
    expect(parseHelloReply(accepted, limits)).toEqual({
      accepted: true, resuid: 7n, localcnt: 1n, remotecnt: 1n, source: "primary", full: false,
      reason: "in step", mapBytes: layout.mapSizeBytes, verify: true,
    });
    expect(parseHelloReply({ ...accepted, mapBytes: 0 }, limits).accepted).toBe(true);
    expect(parseHelloReply({ accepted: false, reason: "no", splitBrain: true }, limits))
      .toEqual({ accepted: false, reason: "no", splitBrain: true });
  });

  test("a mapBytes this resource cannot have is a ProtocolError", () => {
    const max = peerMapBytesMax(limits.datasizeBytes, limits.extentsizeBytes);
    for (const mapBytes of [2 ** 40, max + 1, -1, 1.5, Number.NaN, "4096", 1]) {
      expect(() => parseHelloReply({ ...accepted, mapBytes }, limits)).toThrow(ProtocolError);
    }
    expect(() => parseHelloReply({ ...accepted, mapBytes: 2 ** 40 }, limits))
      .toThrow(`"mapBytes" is 1099511627776, expected 0 or 8 to ${max} for this resource`);
    expect(parseHelloReply({ ...accepted, mapBytes: max }, limits).accepted).toBe(true);
  });

  test("counters that are not 64-bit decimal strings, or an unknown source, are ProtocolErrors", () => {
    for (const value of ["-1", "0x10", "1e3", "", String(1n << 64n), 5, null, undefined]) {
      for (const name of ["resuid", "localcnt", "remotecnt"]) {
        expect(() => parseHelloReply({ ...accepted, [name]: value }, limits)).toThrow(ProtocolError);
      }
    }
    expect(parseHelloReply({ ...accepted, localcnt: String((1n << 64n) - 1n) }, limits).accepted).toBe(true);
    expect(() => parseHelloReply({ ...accepted, source: "both" }, limits)).toThrow(/"source" is "both"/);
  });
});

test("peerMapBytesMax is at least the map area of every layout with that datasize and extent size", () => {
  // Media sizes log-uniform from 64 KiB to 16 TiB (seeded), and around each size where the map
  // area grows by a page (the most map for the least data).
  let seed = 12345;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (const extent of [4096, 65536, 1024 * 1024]) {
    const room = extent + 16384; // a medium smaller than one extent plus metadata has no layout
    const media = Array.from({ length: 3000 }, () => Math.floor(2 ** (16 + random() * 28)) + room);
    for (let pages = 1; pages < 2 ** 16; pages *= 3) {
      const edge = pages * 4096 * 8 * extent;
      media.push(edge - 1, edge, edge + 1, edge + 8192 + 4096);
    }
    for (const m of media) {
      const l = computeLayout(m, extent);
      const max = peerMapBytesMax(l.datasizeBytes, extent);
      expect(l.mapSizeBytes).toBeLessThanOrEqual(max);
      expect(max).toBeLessThanOrEqual(Math.ceil(l.extentCount / 8) * 1.001 + 8193);
    }
  }
});

test("a Goodbye in place of the Hello is refused with its reason, not only its type", () => {
  const goodbye = frameOf(encodeJson(MessageType.Goodbye, { reason: 'Cannot use authkey "/k": ENOENT' }));
  expect(() => parseHello(goodbye))
    .toThrow('the primary closed it before its Hello: "Cannot use authkey \\"/k\\": ENOENT"');
});

/** The one frame `pieces` encode. */
function frameOf(pieces: Uint8Array[]): Frame {
  const frames: Frame[] = [];
  new FrameParser((f) => frames.push({ ...f, payload: f.payload.slice() })).push(Buffer.concat(pieces));
  expect(frames.length).toBe(1);
  return frames[0]!;
}

/** A connection to a scripted secondary: `answer` returns what it sends back to each frame. */
function scripted(answer: (frame: Frame) => Uint8Array[][]): Connection {
  const parser = new FrameParser((frame) => {
    for (const pieces of answer({ ...frame, payload: frame.payload.slice() })) {
      const reply = frameOf(pieces);
      setImmediate(() => conn.onFrame(reply));
    }
  });
  const conn: Connection = {
    send: (pieces) => {
      parser.push(Buffer.concat(pieces));
      return true;
    },
    drained: async () => {},
    close: (reason) => conn.onClose(reason),
    onFrame: () => {},
    onClose: () => {},
    remoteAddress: "scripted",
    closed: false,
    finished: Promise.resolve(),
    secure: () => {
      throw new Error("not used");
    },
    encrypted: false,
  };
  return conn;
}

/** Metadata of resource "r" (resuid 7, counters 1 and 1), with `change` applied. */
function metadataOf(change: Partial<Metadata> = {}): Metadata {
  return {
    resource: "r", datasizeBytes: layout.datasizeBytes, extentsizeBytes: EXTENT, keepdirty: 0,
    mapOffsetBytes: layout.mapOffsetBytes, mapSizeBytes: layout.mapSizeBytes, dataOffsetBytes: layout.dataOffsetBytes,
    resuid: 7n, localcnt: 1n, remotecnt: 1n, prevrole: "primary", syncTarget: false, discardPending: false,
    localWritesLost: false, generation: 1n, ...change,
  };
}

/** A MetaStore over `metadata` whose writes apply in memory; its map is all clean. */
function metaOf(metadata: Metadata): MetaStore {
  const meta = {
    metadata,
    write: async (update: Partial<Metadata>) => void (meta.metadata = { ...meta.metadata, ...update }),
    readMap: async () => new Uint8Array(metadata.mapSizeBytes),
    writeMap: async () => {},
  };
  return meta;
}

const CONFIG = {
  authkey: null, replication: "fullsync", checksum: "none", compression: "hole", encryption: "none",
} as unknown as ResourceConfig;

function handshake(conn: Connection, metadata = metadataOf()): Promise<HandshakeResult> {
  return handshakeAsPrimary(conn, { meta: metaOf(metadata), config: CONFIG, timeoutMs: 5_000, metaflush: false });
}

test("handshakeAsPrimary refuses an oversized mapBytes or a negative counter before it acts on them", async () => {
  // Without the check, max + 1 bytes are allocated and the one Map frame below completes the
  // handshake; 2 ** 40 would be an allocation the size of the peer's choosing.
  const max = peerMapBytesMax(limits.datasizeBytes, limits.extentsizeBytes);
  const bad = [
    { change: { mapBytes: max + 1 }, message: `"mapBytes" is ${max + 1}` },
    { change: { mapBytes: 2 ** 40 }, message: `"mapBytes" is ${2 ** 40}` },
    { change: { localcnt: "-1" }, message: '"localcnt" is "-1"' },
  ];
  for (const { change, message } of bad) {
    const conn = scripted((frame) => frame.type !== MessageType.Hello ? [] : [
      encodeJson(MessageType.HelloReply, { ...accepted, ...change }),
      encodeFrame({ type: MessageType.Map, offset: 0, flags: FrameFlag.Last, payload: new Uint8Array(8) }),
    ]);
    const error = await handshake(conn).then(() => null, (e: Error) => e);
    expect(error).toBeInstanceOf(ProtocolError);
    expect(error!.message).toContain(message);
  }
  const fine = scripted((frame) => frame.type !== MessageType.Hello ? [] : [
    encodeJson(MessageType.HelloReply, accepted),
    encodeFrame({ type: MessageType.Map, offset: 0, flags: FrameFlag.Last, payload: new Uint8Array(8).fill(1) }),
  ]);
  const result = await handshake(fine);
  expect(result.kind === "accepted" && result.secondaryMap.byteLength).toBe(layout.mapSizeBytes);
});

/** The Hello a primary with `metadata` sends (metaflush `metaflush`), as the secondary's daemon parses it. */
async function helloOf(metadata: Metadata, metaflush: boolean): Promise<Hello> {
  let hello: Hello | null = null;
  const conn = scripted((frame) => {
    hello = parseHello(frame);
    return [encodeJson(MessageType.HelloReply, { accepted: false, reason: "test" })];
  });
  await handshakeAsPrimary(conn, { meta: metaOf(metadata), config: CONFIG, timeoutMs: 5_000, metaflush });
  return hello!;
}

/** The HelloReply the secondary with `metadata` and `metaflush` sends to `hello`. */
async function replyTo(hello: Hello, metadata: Metadata, metaflush: boolean): Promise<Record<string, unknown>> {
  const sent: Frame[] = [];
  const parser = new FrameParser((frame) => sent.push({ ...frame, payload: frame.payload.slice() }));
  const conn: Connection = {
    send: (pieces) => {
      parser.push(Buffer.concat(pieces));
      return true;
    },
    drained: async () => {}, close: () => {}, onFrame: () => {}, onClose: () => {}, remoteAddress: "capture",
    closed: false, finished: Promise.resolve(), encrypted: false,
    secure: () => {
      throw new Error("not used");
    },
  };
  await handshakeAsSecondary(conn, hello, { meta: metaOf(metadata), config: CONFIG, metaflush });
  expect(sent[0]?.type).toBe(MessageType.HelloReply);
  return JSON.parse(new TextDecoder().decode(sent[0]!.payload));
}

// Proves the secondary asks for a full sync into a copy that may lack writes it answered
// (localWritesLost) exactly when metaflush is off on either node (found by review): clear rounds
// then clear extents without a flush, so a write the page cache lost after its extent was cleared
// is in neither dirty map, and a sync of the maps would end, clearing the record, with the
// copies different. With metaflush on both nodes the maps cover every lost write: no full sync.
// The primary's record and metaflush reach the secondary in its Hello; a Hello without metaflush
// (an older hast) counts as off. A copy that is the source, not the target, changes nothing.
describe("a sync into a copy that may lack writes", () => {
  const inStep = metadataOf();
  const flagged = metadataOf({ localWritesLost: true });
  const ahead = metadataOf({ localcnt: 2n }); // the primary is behind: sync from the secondary

  test("the primary's Hello carries its metaflush and its record of a loss", async () => {
    expect(await helloOf(inStep, true)).toMatchObject({ metaflush: true, localWritesLost: false });
    expect(await helloOf(flagged, false)).toMatchObject({ metaflush: false, localWritesLost: true });
    const raw = { ...(await helloOf(inStep, true)), metaflush: "on" };
    expect(() => parseHello(frameOf(encodeJson(MessageType.Hello, raw)))).toThrow('"metaflush" is "on"');
  });

  test("the secondary's record: full sync from the primary when either node has metaflush off", async () => {
    const cases: Array<[primaryMetaflush: boolean, secondaryMetaflush: boolean, full: boolean]> = [
      [true, true, false], [false, true, true], [true, false, true], [false, false, true],
    ];
    for (const [primaryMetaflush, secondaryMetaflush, full] of cases) {
      const reply = await replyTo(await helloOf(inStep, primaryMetaflush), flagged, secondaryMetaflush);
      expect([primaryMetaflush, secondaryMetaflush, reply.accepted, reply.source, reply.full])
        .toEqual([primaryMetaflush, secondaryMetaflush, true, "primary", full]);
      if (full) expect(reply.reason).toBe("in step; full: the secondary's disk may lack writes outside the " +
        "dirty maps (metaflush off)");
    }
    const older = await helloOf(inStep, true);
    delete older.metaflush;
    expect((await replyTo(older, flagged, true)).full).toBe(true);
    // No record, no full sync, whatever metaflush is.
    expect((await replyTo(await helloOf(inStep, false), inStep, false)).full).toBe(false);
  });

  test("the primary's record: full sync from the secondary only when the primary is the target", async () => {
    const fromSecondary = await replyTo(await helloOf(flagged, false), ahead, true);
    expect([fromSecondary.source, fromSecondary.full]).toEqual(["secondary", true]);
    expect(fromSecondary.reason).toContain("primary is behind; full: the primary's disk");
    expect((await replyTo(await helloOf(flagged, true), ahead, true)).full).toBe(false);
    // The primary is the source: its record is no reason to copy everything over the secondary.
    const fromPrimary = await replyTo(await helloOf(flagged, false), inStep, false);
    expect([fromPrimary.source, fromPrimary.full]).toEqual(["primary", false]);
  });
});
