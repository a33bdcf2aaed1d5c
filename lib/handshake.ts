/**
 * Connection set-up between primary and secondary (spec §5, §7): Hello,
 * HelloReply, the secondary's dirty bitmap in Map frames. The decision which
 * way to sync is the secondary's (counters.ts); the primary follows it.
 */
import {
  authenticateAsPrimary, type AuthSession, helloAuthFields, helloReplyProblem, readAuthKey, signHelloReply,
} from "./auth.ts";
import type { ResourceConfig } from "./config.ts";
import { decideSync, newResuid, type SyncDecision } from "./counters.ts";
import type { MetaStore } from "./storage.ts";
import type { Connection } from "./transport.ts";
import {
  decodeJson, encodeFrame, encodeJson, FrameFlag, MAX_IO_BYTES, MessageType, ProtocolError,
  WIRE_VERSION, type Frame,
} from "./wire.ts";

/** A Goodbye in place of a Hello is logged with this much of its (unauthenticated) reason. */
const GOODBYE_REASON_SHOWN_MAX = 300;

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
  /**
   * The primary's `metaflush` and its metadata's `localWritesLost` (see syncForLoss); absent from
   * an older hast, which counts as metaflush off and no loss.
   */
  metaflush?: boolean;
  localWritesLost?: boolean;
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
  if (frame.type === MessageType.Goodbye) {
    // E.g. the primary could not read its authkey: say so, not only the message type.
    const why = JSON.stringify(String(decodeJson(frame).reason ?? "").slice(0, GOODBYE_REASON_SHOWN_MAX));
    throw new ProtocolError(`Cannot start connection: the primary closed it before its Hello: ${why}`);
  }
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
  for (const key of ["metaflush", "localWritesLost"] as const) {
    if (raw[key] !== undefined && typeof raw[key] !== "boolean") {
      throw new ProtocolError(`Cannot parse Hello: "${key}" is ${JSON.stringify(raw[key])}`);
    }
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

/**
 * The largest dirty map a secondary with this resource's size and extent size can send: the
 * whole map area of its metadata (computeLayout), which has a bit per extent of the medium, not
 * only of the data area. With B = ceil(extents / 8): the medium is at most 8192 + S + datasize +
 * 4095 bytes for a map area of S bytes, so the map needs at most B + S/32768 + 3 bytes (extents
 * of at least 4096 bytes), rounded up to 4096: S ≤ B + 4098 + (B + 4098)/32767, below the bound.
 * A larger mapBytes is not from a hast secondary; the primary allocates no more than this.
 */
export function peerMapBytesMax(datasizeBytes: number, extentsizeBytes: number): number {
  const mapBytes = mapBitsBytes(datasizeBytes, extentsizeBytes);
  return mapBytes + Math.ceil(mapBytes / 16384) + 8192;
}

/** Bytes of the dirty bitmap proper: one bit per extent of the data area (the least a map holds). */
function mapBitsBytes(datasizeBytes: number, extentsizeBytes: number): number {
  return Math.ceil(Math.ceil(datasizeBytes / extentsizeBytes) / 8);
}

/** A checked HelloReply (parseHelloReply). Counters travel as decimal strings (64-bit). */
export type HelloReply =
  | { accepted: false; reason: string; splitBrain: boolean }
  | {
    accepted: true;
    resuid: bigint;
    localcnt: bigint;
    remotecnt: bigint;
    source: "primary" | "secondary";
    full: boolean;
    reason: string;
    /** Bytes of the dirty map in the Map frames that follow: 0, or one bit per extent at least. */
    mapBytes: number;
    verify: boolean;
  };

/**
 * Validates and types a HelloReply payload before the primary allocates or acts on anything in it.
 * @param limits datasize and extent size of the resource (the secondary checked they match ours)
 * @throws ProtocolError naming the bad field
 */
export function parseHelloReply(
  raw: Record<string, unknown>, limits: { datasizeBytes: number; extentsizeBytes: number },
): HelloReply {
  const reason = String(raw.reason ?? "");
  if (raw.accepted !== true) return { accepted: false, reason, splitBrain: raw.splitBrain === true };
  const counters = (["resuid", "localcnt", "remotecnt"] as const).map((name) => {
    const value = raw[name];
    if (typeof value !== "string" || !/^\d{1,20}$/.test(value) || BigInt(value) >= 1n << 64n) {
      throw new ProtocolError(`Cannot parse HelloReply: "${name}" is ${JSON.stringify(value)}`);
    }
    return BigInt(value);
  });
  if (raw.source !== "primary" && raw.source !== "secondary") {
    throw new ProtocolError(`Cannot parse HelloReply: "source" is ${JSON.stringify(raw.source)}`);
  }
  const mapBytes = raw.mapBytes ?? 0;
  const max = peerMapBytesMax(limits.datasizeBytes, limits.extentsizeBytes);
  const min = mapBitsBytes(limits.datasizeBytes, limits.extentsizeBytes);
  if (typeof mapBytes !== "number" || !Number.isSafeInteger(mapBytes) || mapBytes < 0 || mapBytes > max ||
    (mapBytes > 0 && mapBytes < min)) {
    throw new ProtocolError(`Cannot parse HelloReply: "mapBytes" is ${JSON.stringify(mapBytes)}, ` +
      `expected 0 or ${min} to ${max} for this resource`);
  }
  return {
    accepted: true, resuid: counters[0]!, localcnt: counters[1]!, remotecnt: counters[2]!, source: raw.source,
    full: raw.full === true, reason, mapBytes, verify: raw.verify === true,
  };
}

/**
 * Reads this resource's authkey for a connection attempt (null: none configured).
 * @throws Error "Cannot use authkey …" naming the file (readAuthKey)
 */
export function primaryAuthKey(config: ResourceConfig): Buffer | null {
  return config.authkey === null ? null : readAuthKey(config.authkey);
}

/**
 * The primary's side: sends Hello, waits for the reply and the bitmap. `key` is the authkey the
 * caller read before it connected (primaryAuthKey); when absent it is read here.
 */
export async function handshakeAsPrimary(
  conn: Connection,
  options: { meta: MetaStore; config: ResourceConfig; timeoutMs: number; metaflush: boolean; key?: Buffer | null },
): Promise<HandshakeResult> {
  const m = options.meta.metadata;
  let proposed = 0n;
  if (m.resuid === 0n) proposed = newResuid();
  const key = options.key !== undefined ? options.key : primaryAuthKey(options.config);
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
    metaflush: options.metaflush,
    localWritesLost: m.localWritesLost,
  };
  const replyOptions = {
    timeoutMs: options.timeoutMs, datasizeBytes: m.datasizeBytes, extentsizeBytes: m.extentsizeBytes,
  };
  let frames: ReturnType<typeof collectReply>;
  let session: AuthSession | null = null;
  if (key === null) {
    frames = collectReply(conn, replyOptions);
    conn.send(encodeJson(MessageType.Hello, hello));
  } else {
    conn.send(encodeJson(MessageType.Hello, hello));
    const exchange = await authenticateAsPrimary(conn, {
      key, nonce: nonce!, hello, timeoutMs: options.timeoutMs, encryption: options.config.encryption,
    });
    if ("early" in exchange) return earlyReply(exchange.early);
    session = exchange.session;
    frames = collectReply(conn, replyOptions);
  }
  const { raw, reply, map } = await frames;
  const unsigned = session === null ? null : helloReplyProblem(session, raw, map);
  if (!reply.accepted) {
    // Unsigned (the secondary refused our proof, so it had no session to sign with; or forged on
    // the way): a reason to log, never a split-brain verdict to act on.
    return { kind: "refused", reason: reply.reason, splitBrain: unsigned === null && reply.splitBrain };
  }
  if (unsigned !== null) throw new Error(`authentication failed: ${unsigned}; not acting on it`);
  if (m.resuid === 0n) {
    await options.meta.write({ resuid: reply.resuid }, { flush: options.metaflush });
  }
  return {
    kind: "accepted",
    source: reply.source,
    full: reply.full,
    reason: reply.reason,
    peer: { resuid: reply.resuid, localcnt: reply.localcnt, remotecnt: reply.remotecnt },
    secondaryMap: map,
    peerCanVerify: reply.verify,
  };
}

/** A HelloReply that came in place of the authentication challenge. */
function earlyReply(frame: Frame): HandshakeResult {
  const reply = decodeJson(frame);
  if (reply.accepted !== true) {
    // Sent before the exchange, so anyone on the path could have sent it: a reason to log,
    // never a split-brain verdict to act on (the secondary gives that only after it).
    return { kind: "refused", reason: String(reply.reason), splitBrain: false };
  }
  throw new Error("authentication failed: the secondary accepted without authenticating itself " +
    "(it has no authkey, or runs an older hast)");
}

/**
 * Collects HelloReply and, if accepted, the Map frames up to the Last flag. The reply is
 * checked (parseHelloReply) before the map is allocated.
 */
function collectReply(
  conn: Connection, options: { timeoutMs: number; datasizeBytes: number; extentsizeBytes: number },
): Promise<{ raw: Record<string, unknown>; reply: HelloReply; map: Uint8Array }> {
  return new Promise((resolve, reject) => {
    let raw: Record<string, unknown> | null = null;
    let reply: HelloReply | null = null;
    let map = new Uint8Array(0);
    const timeoutMs = options.timeoutMs;
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
          raw = decodeJson(frame);
          reply = parseHelloReply(raw, options);
          if (!reply.accepted) return finish();
          map = new Uint8Array(reply.mapBytes);
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
      resolve({ raw: raw!, reply: reply!, map });
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
    conn.send(encodeJson(MessageType.HelloReply, signHelloReply(conn, { accepted: false, reason: mismatch }, null)));
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
    conn.send(encodeJson(MessageType.HelloReply, signHelloReply(conn, { accepted: false, reason, splitBrain }, null)));
    return decision;
  }
  const unfit = decision.kind === "sync" && decision.source === "secondary" ? unfitSource(m) : null;
  if (unfit !== null) {
    const reason = `this node's copy would be the sync source, but ${unfit}: it cannot be. Keep this ` +
      "copy with `hast role --force primary` here, or the primary's with `hast discard` here (role init first)";
    conn.send(encodeJson(MessageType.HelloReply, signHelloReply(conn, { accepted: false, reason }, null)));
    return { kind: "mismatch", reason };
  }
  const chosen = decision.kind !== "sync" ? decision : syncForLoss(decision, {
    primaryLost: hello.localWritesLost === true, secondaryLost: m.localWritesLost,
    primaryMetaflush: hello.metaflush === true, secondaryMetaflush: ctx.metaflush,
  });
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
    conn.send(encodeJson(MessageType.HelloReply, signHelloReply(conn, { accepted: false, reason }, null)));
    return { kind: "mismatch", reason };
  }
  // Signed with the authkey (auth.ts): the primary acts on nothing here, the map included, unsigned.
  conn.send(encodeJson(MessageType.HelloReply, signHelloReply(conn, {
    accepted: true,
    resuid: String(resuid),
    localcnt: String(m.localcnt),
    remotecnt: String(m.remotecnt),
    source: chosen.kind === "sync" ? chosen.source : "primary",
    full: chosen.kind === "sync" && chosen.full,
    reason: chosen.kind === "sync" ? chosen.reason : "both fresh",
    mapBytes: map.byteLength,
    verify: true,
  }, map)));
  for (let at = 0; at < map.byteLength; at += MAX_IO_BYTES) {
    const piece = map.subarray(at, Math.min(map.byteLength, at + MAX_IO_BYTES));
    const last = at + piece.byteLength >= map.byteLength;
    conn.send(encodeFrame({ type: MessageType.Map, offset: at, flags: last ? FrameFlag.Last : 0, payload: piece }));
  }
  return chosen;
}

/**
 * The sync into a copy that may lack writes it answered (metadata.localWritesLost): the whole
 * device when the dirty maps may not cover the loss. `sides`: each node's record and metaflush
 * (the primary's from its Hello). Decision table:
 *
 * | copy with the record | metaflush                 | sync                                         |
 * |----------------------|---------------------------|----------------------------------------------|
 * | neither              | any                       | as decided (decideSync)                      |
 * | the sync source      | any                       | not here: a secondary with it is refused as  |
 * |                      |                           | the source (unfitSource); a primary whose    |
 * |                      |                           | flush failed starts no sync (Primary)        |
 * | the sync target      | on on both nodes          | as decided: the maps cover the loss (below)  |
 * | the sync target      | off on either node, or    | full, from the source                        |
 * |                      | not said (older primary)  |                                              |
 *
 * A disk loses the writes since its last good flush (the kernel drops a cached write and reports
 * it to the next fdatasync; a failed write is answered EIO and stays sync-needed on the
 * primary). With metaflush on, a clear round clears an extent in the primary's on-disk map only
 * once a flush of both copies covered its last write (a failed flush clears nothing), so every
 * extent written since the last good flush of either copy is still set: in the primary's map
 * for a loss of its secondary, in a node's own map (sent as the secondary's after a failover)
 * for a loss it had as primary. With metaflush off the rounds clear without flushing: an extent
 * written, cleared, then lost from the page cache is in no map once the primary that knew of it
 * (its unflushed extents, marked for sync when the link drops) has restarted, or has been failed
 * over from. The sync then copies the maps only, its end clears the record, and the copies
 * differ where nothing shows it (found by review). The record does not say in which role the
 * loss came (as secondary the peer's map covers it, as primary its own, at a worker's start
 * either), so either node's metaflush off is enough. The current settings are all we know: one
 * a reload turned on since the loss is not seen.
 */
export function syncForLoss(
  decision: Extract<SyncDecision, { kind: "sync" }>,
  sides: { primaryLost: boolean; secondaryLost: boolean; primaryMetaflush: boolean; secondaryMetaflush: boolean },
): Extract<SyncDecision, { kind: "sync" }> {
  const targetLost = decision.source === "primary" ? sides.secondaryLost : sides.primaryLost;
  if (decision.full || !targetLost || (sides.primaryMetaflush && sides.secondaryMetaflush)) return decision;
  const target = decision.source === "primary" ? "secondary" : "primary";
  return {
    ...decision, full: true,
    reason: `${decision.reason}; full: the ${target}'s disk may lack writes outside the dirty maps (metaflush off)`,
  };
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
