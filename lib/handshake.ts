/**
 * Connection set-up between primary and secondary (spec §5, §7): Hello,
 * HelloReply, the secondary's dirty bitmap in Map frames. The decision which
 * way to sync is the secondary's (counters.ts); the primary follows it.
 */
import { authenticateAsPrimary, helloAuthFields, readAuthKey } from "./auth.ts";
import type { ResourceConfig } from "./config.ts";
import { decideSync, newResuid, type SyncDecision } from "./counters.ts";
import type { MetaStore } from "./storage.ts";
import type { Connection } from "./transport.ts";
import {
  decodeJson, encodeFrame, encodeJson, FrameFlag, MAX_IO_BYTES, MessageType, ProtocolError,
  WIRE_VERSION, type Frame,
} from "./wire.ts";

/** What the primary announces. Counters travel as decimal strings (64-bit). */
export interface Hello {
  protocol: number;
  resource: string;
  resuid: string;
  proposedResuid: string;
  localcnt: string;
  remotecnt: string;
  datasizeBytes: number;
  extentsizeBytes: number;
  replication: string;
  checksum: string;
  compression: string;
  /** Present when the primary has an authkey (auth.ts): the secondary must authenticate. */
  auth?: true;
  authNonce?: string;
  /** The primary's `encryption` (auth.ts, link_crypto.ts); absent from an older hast: none. */
  encryption?: string;
}

export type HandshakeResult =
  | { kind: "refused"; reason: string; splitBrain: boolean }
  | {
    kind: "accepted";
    source: "primary" | "secondary";
    full: boolean;
    reason: string;
    peer: { resuid: bigint; localcnt: bigint; remotecnt: bigint };
    secondaryMap: Uint8Array;
    /** The secondary answers Verify requests (absent in an older hast's HelloReply). */
    peerCanVerify: boolean;
  };

/** Validates and types a Hello payload; throws ProtocolError naming the bad field. */
export function parseHello(frame: Frame): Hello {
  if (frame.type !== MessageType.Hello) {
    throw new ProtocolError(`Cannot start connection: first message has type ${frame.type}`);
  }
  const raw = decodeJson(frame);
  const strings = ["resource", "resuid", "proposedResuid", "localcnt", "remotecnt",
    "replication", "checksum", "compression"] as const;
  for (const key of strings) {
    if (typeof raw[key] !== "string") throw new ProtocolError(`Cannot parse Hello: "${key}" missing`);
  }
  if (raw.encryption !== undefined && typeof raw.encryption !== "string") {
    throw new ProtocolError(`Cannot parse Hello: "encryption" is ${JSON.stringify(raw.encryption)}`);
  }
  for (const key of ["protocol", "datasizeBytes", "extentsizeBytes"] as const) {
    if (!Number.isSafeInteger(raw[key])) throw new ProtocolError(`Cannot parse Hello: "${key}" missing`);
  }
  for (const key of ["resuid", "proposedResuid", "localcnt", "remotecnt"] as const) {
    if (!/^\d{1,20}$/.test(raw[key] as string)) {
      throw new ProtocolError(`Cannot parse Hello: "${key}" is ${JSON.stringify(raw[key])}`);
    }
  }
  return raw as unknown as Hello;
}

/** The primary's side: sends Hello, waits for the reply and the bitmap. */
export async function handshakeAsPrimary(
  conn: Connection,
  options: { meta: MetaStore; config: ResourceConfig; timeoutMs: number; metaflush: boolean },
): Promise<HandshakeResult> {
  const m = options.meta.metadata;
  let proposed = 0n;
  if (m.resuid === 0n) proposed = newResuid();
  const key = options.config.authkey === null ? null : readAuthKey(options.config.authkey);
  const { nonce, ...authFields } = helloAuthFields(key);
  const hello: Hello = {
    ...authFields,
    protocol: WIRE_VERSION,
    resource: m.resource,
    resuid: String(m.resuid),
    proposedResuid: String(proposed),
    localcnt: String(m.localcnt),
    remotecnt: String(m.remotecnt),
    datasizeBytes: m.datasizeBytes,
    extentsizeBytes: m.extentsizeBytes,
    replication: options.config.replication,
    checksum: options.config.checksum,
    compression: options.config.compression,
    encryption: options.config.encryption,
  };
  let frames: ReturnType<typeof collectReply>;
  if (key === null) {
    frames = collectReply(conn, options.timeoutMs);
    conn.send(encodeJson(MessageType.Hello, hello));
  } else {
    conn.send(encodeJson(MessageType.Hello, hello));
    const unauthenticated = await authenticateAsPrimary(conn, {
      key, nonce: nonce!, hello, timeoutMs: options.timeoutMs, encryption: options.config.encryption,
    });
    if (unauthenticated !== null) {
      const reply = decodeJson(unauthenticated);
      if (reply.accepted !== true) {
        // Sent before the exchange, so anyone on the path could have sent it: a reason to log,
        // never a split-brain verdict to act on (the secondary gives that only after it).
        return { kind: "refused", reason: String(reply.reason), splitBrain: false };
      }
      throw new Error("authentication failed: the secondary accepted without authenticating itself " +
        "(it has no authkey, or runs an older hast)");
    }
    frames = collectReply(conn, options.timeoutMs);
  }
  const { reply, map } = await frames;
  if (reply.accepted !== true) {
    return { kind: "refused", reason: String(reply.reason), splitBrain: reply.splitBrain === true };
  }
  const resuid = BigInt(String(reply.resuid));
  if (m.resuid === 0n) {
    await options.meta.write({ resuid }, { flush: options.metaflush });
  }
  return {
    kind: "accepted",
    source: reply.source === "secondary" ? "secondary" : "primary",
    full: reply.full === true,
    reason: String(reply.reason),
    peer: { resuid, localcnt: BigInt(String(reply.localcnt)), remotecnt: BigInt(String(reply.remotecnt)) },
    secondaryMap: map,
    peerCanVerify: reply.verify === true,
  };
}

/** Collects HelloReply and, if accepted, the Map frames up to the Last flag. */
function collectReply(
  conn: Connection, timeoutMs: number,
): Promise<{ reply: Record<string, unknown>; map: Uint8Array }> {
  return new Promise((resolve, reject) => {
    let reply: Record<string, unknown> | null = null;
    let map = new Uint8Array(0);
    const timer = setTimeout(() => fail(new Error(`no handshake reply within ${timeoutMs} ms`)), timeoutMs);
    const fail = (error: Error) => {
      clearTimeout(timer);
      conn.onFrame = () => {};
      reject(error);
    };
    conn.onClose = (reason) => fail(new Error(`connection closed during handshake: ${reason}`));
    conn.onFrame = (frame) => {
      try {
        if (reply === null) {
          if (frame.type !== MessageType.HelloReply) {
            throw new ProtocolError(`expected HelloReply, got type ${frame.type}`);
          }
          reply = decodeJson(frame);
          if (reply.accepted !== true) return finish();
          map = new Uint8Array(Number(reply.mapBytes ?? 0));
          if (map.byteLength === 0) return finish();
          return;
        }
        if (frame.type !== MessageType.Map || frame.offset + frame.payload.byteLength > map.byteLength) {
          throw new ProtocolError(`bad Map frame (type ${frame.type}, offset ${frame.offset})`);
        }
        map.set(frame.payload, frame.offset);
        if (frame.flags & FrameFlag.Last) finish();
      } catch (error) {
        fail(error as Error);
      }
    };
    const finish = () => {
      clearTimeout(timer);
      conn.onFrame = () => {};
      conn.onClose = () => {};
      resolve({ reply: reply!, map });
    };
  });
}

/** What the secondary needs to answer a Hello. */
export interface SecondaryContext {
  meta: MetaStore;
  config: ResourceConfig;
  metaflush: boolean;
}

/**
 * The secondary's side: checks the Hello against its own metadata and config,
 * applies the decision table, persists what it adopts, and answers. Returns
 * the decision (the caller fires hooks and starts serving when accepted).
 */
export async function handshakeAsSecondary(
  conn: Connection, hello: Hello, ctx: SecondaryContext,
): Promise<SyncDecision | { kind: "mismatch"; reason: string }> {
  const m = ctx.meta.metadata;
  const mismatch = checkCompatible(hello, ctx);
  if (mismatch) {
    conn.send(encodeJson(MessageType.HelloReply, { accepted: false, reason: mismatch }));
    return { kind: "mismatch", reason: mismatch };
  }
  const primary = {
    resuid: BigInt(hello.resuid), localcnt: BigInt(hello.localcnt), remotecnt: BigInt(hello.remotecnt),
  };
  const decision = decideSync(primary, m, { secondaryDiscarded: m.discardPending });
  if (decision.kind === "uid-mismatch" || decision.kind === "split-brain") {
    const reason = decision.kind === "split-brain"
      ? `split-brain: both sides were written independently (primary localcnt ${primary.localcnt} > ` +
        `secondary's remotecnt ${m.remotecnt}, secondary localcnt ${m.localcnt} > ` +
        `primary's remotecnt ${primary.remotecnt})`
      : `resource unique ID mismatch (primary ${primary.resuid}, secondary ${m.resuid})`;
    const splitBrain = decision.kind === "split-brain";
    conn.send(encodeJson(MessageType.HelloReply, { accepted: false, reason, splitBrain }));
    return decision;
  }
  const unfit = decision.kind === "sync" && decision.source === "secondary" ? unfitSource(m) : null;
  if (unfit !== null) {
    const reason = `this node's copy would be the sync source, but ${unfit}: it cannot be. Keep this ` +
      "copy with `hast role --force primary` here, or the primary's with `hast discard` here (role init first)";
    conn.send(encodeJson(MessageType.HelloReply, { accepted: false, reason }));
    return { kind: "mismatch", reason };
  }
  const resuid = primary.resuid === 0n ? BigInt(hello.proposedResuid) : primary.resuid;
  const update: Parameters<MetaStore["write"]>[0] = {};
  if (m.resuid === 0n) update.resuid = resuid;
  // While the primary syncs to us our copy is stale: refuse promotion until SyncDone.
  if (decision.kind === "virgin" || decision.source === "primary") update.syncTarget = decision.kind !== "virgin";
  let map: Uint8Array;
  try {
    if (Object.keys(update).length > 0) await ctx.meta.write(update, { flush: ctx.metaflush });
    map = decision.kind === "virgin" ? new Uint8Array(0) : await ctx.meta.readMap();
  } catch (error) {
    const reason = `secondary cannot use its metadata: ${error instanceof Error ? error.message : error}`;
    conn.send(encodeJson(MessageType.HelloReply, { accepted: false, reason }));
    return { kind: "mismatch", reason };
  }
  conn.send(encodeJson(MessageType.HelloReply, {
    accepted: true,
    resuid: String(resuid),
    localcnt: String(m.localcnt),
    remotecnt: String(m.remotecnt),
    source: decision.kind === "sync" ? decision.source : "primary",
    full: decision.kind === "sync" && decision.full,
    reason: decision.kind === "sync" ? decision.reason : "both fresh",
    mapBytes: map.byteLength,
    verify: true,
  }));
  for (let at = 0; at < map.byteLength; at += MAX_IO_BYTES) {
    const piece = map.subarray(at, Math.min(map.byteLength, at + MAX_IO_BYTES));
    const last = at + piece.byteLength >= map.byteLength;
    conn.send(encodeFrame({ type: MessageType.Map, offset: at, flags: last ? FrameFlag.Last : 0, payload: piece }));
  }
  return decision;
}

/**
 * Why this node's copy, newer by the counters, must not be pulled by the primary, or null: its
 * disk may have dropped writes it acknowledged (a flush failed), or a sync to it never completed
 * (stale in places). Pulling it could replace the primary's good data with older data.
 */
function unfitSource(m: { localWritesLost: boolean; syncTarget: boolean }): string | null {
  if (m.localWritesLost) return "its disk may lack writes (a write or flush failed)";
  if (m.syncTarget) return "a sync to it never completed (it is stale)";
  return null;
}

/** Returns why the primary's Hello cannot be accepted here, or null. */
function checkCompatible(hello: Hello, ctx: SecondaryContext): string | null {
  const m = ctx.meta.metadata;
  if (hello.protocol !== WIRE_VERSION) return `protocol version ${hello.protocol}, expected ${WIRE_VERSION}`;
  if (hello.resource !== m.resource) return `resource "${hello.resource}" is not "${m.resource}"`;
  if (hello.datasizeBytes !== m.datasizeBytes) {
    return `datasize mismatch (primary ${hello.datasizeBytes}, secondary ${m.datasizeBytes})`;
  }
  if (hello.extentsizeBytes !== m.extentsizeBytes) {
    return `extentsize mismatch (primary ${hello.extentsizeBytes}, secondary ${m.extentsizeBytes})`;
  }
  if (hello.checksum !== ctx.config.checksum) {
    return `checksum mismatch (primary "${hello.checksum}", secondary "${ctx.config.checksum}")`;
  }
  if (hello.compression !== ctx.config.compression) {
    return `compression mismatch (primary "${hello.compression}", secondary "${ctx.config.compression}")`;
  }
  if (!["fullsync", "memsync", "async"].includes(hello.replication)) {
    return `unknown replication mode "${hello.replication}"`;
  }
  return null;
}
