/**
 * Mutual authentication of the replication link with a shared secret (`authkey`; spec §12),
 * DRBD's cram-hmac scheme in both directions. Without it, anyone who can connect from the
 * configured remote address can replace the primary's connection and write the secondary's
 * disk; with it, only a holder of the key.
 *
 *   primary → Hello {auth: true, authNonce: nP}
 *   secondary → AuthChallenge {nonce: nS, proof: HMAC(key, "secondary", resource, nP, nS)}
 *   primary checks the proof (a secondary without the key cannot collect our data), then
 *   primary → Auth {proof: HMAC(key, "primary", resource, nS, nP)}
 *   secondary checks it before it acts on the connection at all (it neither drops the
 *   current primary's link nor touches its metadata), then answers the Hello with
 *   HelloReply {…, mapSha256, proof: HMAC(key, "reply", resource, nP, nS, hello, reply)}
 *   primary checks that proof, and the Map frames against mapSha256, before it acts on
 *   any of it (which side is the sync source, full or not, the dirty map, split-brain).
 *
 * Fresh 32-byte nonces on both sides make a recorded exchange useless to replay. It does let
 * anyone who records one (or who connects from the remote's address: the secondary proves
 * itself first) test guesses of the key offline, so the key must be random, not a passphrase;
 * and the link's keys come from the authkey alone (no Diffie-Hellman), so whoever learns it can
 * open recorded connections too (no forward secrecy).
 *
 * By itself this authenticates the peers when they connect; with `encryption aes-256-gcm`
 * (which needs the authkey) each side then seals all it sends after the exchange, with keys
 * derived from the key and both nonces (link_crypto.ts): the primary right after it sends Auth,
 * the secondary right after it checked it. Both nodes must agree on `encryption`; the Hello says the primary's, and
 * the secondary refuses a difference before the exchange. Both nodes without an authkey: no
 * exchange, as before this existed; one without: refused, with the reason on both sides.
 */
import { createHash, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { closeSync, constants, fstatSync, openSync, readSync } from "node:fs";
import type { EncryptionKind } from "./config.ts";
import type { Hello } from "./handshake.ts";
import { deriveLinkKeys } from "./link_crypto.ts";
import type { Connection } from "./transport.ts";
import { decodeJson, encodeJson, MessageType, type Frame } from "./wire.ts";

/** Shortest key accepted (bytes of the file, trailing ASCII whitespace removed). */
export const AUTHKEY_MIN_BYTES = 16;
/**
 * Largest key file accepted (bytes, trailing whitespace included). HMAC-SHA256 hashes a key
 * longer than 64 bytes down to 32 anyway; the limit keeps a file named by mistake (a log, an
 * image) from being read whole at every connection.
 */
export const AUTHKEY_MAX_BYTES = 4096;
/** Bytes of each side's nonce. */
const NONCE_BYTES = 32;
const NONCE_PATTERN = /^[0-9a-f]{64}$/;

/**
 * Reads a key file: a regular file of AUTHKEY_MIN_BYTES to AUTHKEY_MAX_BYTES, owned by this
 * user or root and readable by its owner only (like an ssh private key). Trailing ASCII
 * whitespace (a newline, CR LF, spaces, tabs) is not part of the key, so a key written by echo
 * or an editor works; every other byte is, so a binary key keeps all of its own. Read at every
 * connection, so a new key takes effect without a restart.
 * @throws Error "Cannot use authkey …" naming the file and the problem
 */
export function readAuthKey(path: string): Buffer {
  let key: Buffer;
  try {
    key = withoutTrailingSpace(readKeyFile(path));
  } catch (error) {
    throw new Error(`Cannot use authkey "${path}": ${(error as Error).message}`);
  }
  if (key.byteLength < AUTHKEY_MIN_BYTES) {
    throw new Error(`Cannot use authkey "${path}": ${key.byteLength} bytes, at least ${AUTHKEY_MIN_BYTES} needed`);
  }
  return key;
}

/**
 * The bytes of the key file at `path` once its checks pass. One open, then fstat and read on it:
 * the checks hold for the bytes read (a file swapped in between a stat and a read would not be
 * checked), and O_NONBLOCK keeps a FIFO at the path from blocking the worker in open().
 */
function readKeyFile(path: string): Buffer {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
  try {
    const stat = fstatSync(fd);
    if (!stat.isFile()) throw new Error("not a regular file");
    const mode = stat.mode & 0o777;
    if ((mode & 0o077) !== 0) {
      throw new Error(`readable by group or others (mode ${mode.toString(8)}); chmod 600 it`);
    }
    const uid = process.getuid?.() ?? 0;
    if (stat.uid !== uid && stat.uid !== 0) {
      throw new Error(`owned by uid ${stat.uid}, which could read or replace it; chown it to uid ${uid} or root`);
    }
    if (stat.size > AUTHKEY_MAX_BYTES) throw new Error(`${stat.size} bytes, at most ${AUTHKEY_MAX_BYTES} allowed`);
    // Read up to one byte more than allowed: a file that grew after the fstat is refused too.
    const bytes = Buffer.alloc(AUTHKEY_MAX_BYTES + 1);
    let filled = 0;
    for (let got = -1; got !== 0 && filled < bytes.byteLength; filled += got) {
      got = readSync(fd, bytes, filled, bytes.byteLength - filled, null);
    }
    if (filled > AUTHKEY_MAX_BYTES) throw new Error(`more than ${AUTHKEY_MAX_BYTES} bytes (it grows)`);
    return bytes.subarray(0, filled);
  } finally {
    closeSync(fd);
  }
}

/** `bytes` without its trailing tabs, newlines, vertical tabs, form feeds, carriage returns and spaces. */
function withoutTrailingSpace(bytes: Buffer): Buffer {
  let end = bytes.byteLength;
  while (end > 0 && (bytes[end - 1] === 0x20 || (bytes[end - 1]! >= 0x09 && bytes[end - 1]! <= 0x0d))) end--;
  return bytes.subarray(0, end);
}

/** The fields the primary adds to its Hello when it has a key. */
export function helloAuthFields(key: Buffer | null): { auth?: true; authNonce?: string; nonce: Buffer | null } {
  if (key === null) return { nonce: null };
  const nonce = randomBytes(NONCE_BYTES);
  return { auth: true, authNonce: nonce.toString("hex"), nonce };
}

/**
 * The digest of what the primary's Hello says, every field the secondary acts on, in a fixed
 * order (the daemon hands the worker a re-serialised copy). Both proofs and the link's keys
 * cover it, so a Hello changed on the way (counters rewritten to make the secondary the sync
 * source, say) fails the exchange instead of being acted on.
 */
export function helloDigest(hello: Hello): Buffer {
  const fields = [hello.protocol, hello.resource, hello.resuid, hello.proposedResuid, hello.localcnt,
    hello.remotecnt, hello.datasizeBytes, hello.extentsizeBytes, hello.replication, hello.checksum,
    hello.compression, hello.encryption ?? "none", hello.authNonce,
    // The secondary acts on these (a full sync after a loss; handshake.ts syncForLoss): covered
    // when present, so a Hello from a build without them keeps the digest it had.
    ...(hello.metaflush !== undefined || hello.localWritesLost !== undefined
      ? [hello.metaflush ?? null, hello.localWritesLost ?? null] : [])];
  return createHash("sha256").update(JSON.stringify(fields)).digest();
}

/**
 * What the exchange binds the secondary's HelloReply to: the key, both nonces and the Hello.
 * Without it a man in the middle who passed the exchange through unchanged could answer in
 * the secondary's place (say "sync from the secondary, full", or a dirty map that makes the
 * primary copy stale extents over good ones), and the primary would act on it.
 */
export interface AuthSession {
  key: Buffer;
  resource: string;
  primaryNonce: Buffer;
  secondaryNonce: Buffer;
  helloDigest: Buffer;
}

/**
 * The secondary's sessions from its exchange to its HelloReply, by connection. Kept here so that
 * Secondary.attach passes the connection from authenticateAsSecondary to handshakeAsSecondary as
 * it did before the reply was signed; a WeakMap lets a connection that never answers go.
 */
const replySessions = new WeakMap<Connection, AuthSession>();

/**
 * The digest of a HelloReply: every field but the proof, sorted by name, as JSON carries them
 * (a field the primary acts on cannot be left out, nor one added later).
 */
export function helloReplyDigest(reply: Record<string, unknown>): Buffer {
  const carried = JSON.parse(JSON.stringify(reply)) as Record<string, unknown>;
  const fields = Object.entries(carried).filter(([name]) => name !== "proof")
    .sort(([a], [b]) => (a < b ? -1 : 1));
  return createHash("sha256").update(JSON.stringify(fields)).digest();
}

function replyProof(session: AuthSession, replyDigest: Buffer): Buffer {
  return createHmac("sha256", session.key).update(`hast-reply-1 secondary ${session.resource}\n`)
    .update(session.primaryNonce).update(session.secondaryNonce).update(session.helloDigest)
    .update(replyDigest).digest();
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/**
 * The secondary's side: `reply` with `mapSha256` (of `map`, the Map frames that follow an
 * acceptance) and `proof` added, when this connection passed the exchange; else unchanged (no
 * authkey on either side). A connection gets one HelloReply: the session is used up.
 */
export function signHelloReply(
  conn: Connection, reply: Record<string, unknown>, map: Uint8Array | null,
): Record<string, unknown> {
  const session = replySessions.get(conn);
  if (session === undefined) return reply;
  replySessions.delete(conn);
  const signed = map === null ? { ...reply } : { ...reply, mapSha256: sha256Hex(map) };
  return { ...signed, proof: replyProof(session, helloReplyDigest(signed)).toString("hex") };
}

/**
 * The primary's side: why it must not act on `reply` (and `map`, the Map frames that followed
 * it), or null when the secondary of this exchange signed both.
 */
export function helloReplyProblem(
  session: AuthSession, reply: Record<string, unknown>, map: Uint8Array,
): string | null {
  if (reply.proof === undefined) {
    return "the secondary's HelloReply carries no proof (it runs an older hast, or the reply was forged on the way)";
  }
  if (!proofMatches(replyProof(session, helloReplyDigest(reply)), reply.proof)) {
    return "the secondary's HelloReply has a proof that does not match (it was changed on the way)";
  }
  if (reply.accepted === true && reply.mapSha256 !== sha256Hex(map)) {
    return "the secondary's dirty map differs from the one its HelloReply names (it was changed on the way)";
  }
  return null;
}

function proof(
  key: Buffer, role: "primary" | "secondary", resource: string, first: Buffer, second: Buffer, hello: Buffer,
): Buffer {
  return createHmac("sha256", key).update(`hast-auth-2 ${role} ${resource}\n`)
    .update(first).update(second).update(hello).digest();
}

function proofMatches(expected: Buffer, got: unknown): boolean {
  if (typeof got !== "string" || !/^[0-9a-f]{64}$/.test(got)) return false;
  return timingSafeEqual(expected, Buffer.from(got, "hex"));
}

/** Resolves with the next frame on `conn`, or rejects on close or after `timeoutMs`. */
export function nextFrame(conn: Connection, timeoutMs: number, what: string): Promise<Frame> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => done(new Error(`no ${what} within ${timeoutMs} ms`)), timeoutMs);
    const done = (result: Frame | Error) => {
      clearTimeout(timer);
      // Until the caller takes the connection on, nothing may arrive: a frame that came with
      // this one in the same chunk would otherwise be read unsealed after the switch.
      conn.onFrame = (frame) => conn.close(`protocol violation from ${conn.remoteAddress}: ` +
        `message type ${frame.type} during the authentication exchange`);
      conn.onClose = () => {};
      if (result instanceof Error) reject(result);
      else resolve(result);
    };
    conn.onFrame = (frame) => done(frame);
    conn.onClose = (reason) => done(new Error(`connection closed before ${what}: ${reason}`));
  });
}

/**
 * The secondary's side, before anything else happens on the connection. Returns null when
 * the primary proved it holds our key (or neither side has one), else why the connection must
 * be refused.
 */
export async function authenticateAsSecondary(
  conn: Connection,
  hello: Hello,
  options: { keyPath: string | null; timeoutMs: number; encryption: EncryptionKind },
): Promise<string | null> {
  const theirEncryption = hello.encryption ?? "none";
  if (options.keyPath === null) {
    if (hello.auth === true) {
      return "the primary authenticates, but this node has no authkey (set the same authkey on both nodes)";
    }
    return theirEncryption === "none" ? null : encryptionDiffers(theirEncryption, options.encryption);
  }
  let key: Buffer;
  try {
    key = readAuthKey(options.keyPath);
  } catch (error) {
    return `this node cannot authenticate: ${(error as Error).message}`;
  }
  if (hello.auth !== true || typeof hello.authNonce !== "string" || !NONCE_PATTERN.test(hello.authNonce)) {
    return "authentication required: this node has an authkey and the primary sent none " +
      "(set the same authkey on both nodes)";
  }
  if (theirEncryption !== options.encryption) return encryptionDiffers(theirEncryption, options.encryption);
  const theirs = Buffer.from(hello.authNonce, "hex");
  const ours = randomBytes(NONCE_BYTES);
  const digest = helloDigest(hello);
  const answer = nextFrame(conn, options.timeoutMs, "authentication from the primary");
  conn.send(encodeJson(MessageType.AuthChallenge, {
    nonce: ours.toString("hex"),
    proof: proof(key, "secondary", hello.resource, theirs, ours, digest).toString("hex"),
  }));
  let frame: Frame;
  try {
    frame = await answer;
  } catch (error) {
    return `authentication failed: ${(error as Error).message}`;
  }
  if (frame.type !== MessageType.Auth) return `authentication failed: message type ${frame.type} instead of Auth`;
  const expected = proof(key, "primary", hello.resource, ours, theirs, digest);
  if (!proofMatches(expected, decodeJson(frame).proof)) {
    return "authentication failed: the primary's authkey differs from this node's";
  }
  if (conn.closed) return "authentication failed: the connection closed during the exchange";
  if (options.encryption !== "none") {
    try {
      conn.secure(deriveLinkKeys(key, hello.resource, theirs, ours, "secondary", digest));
    } catch (error) {
      // The primary seals from here on, so a refusal in the clear would not reach it readably.
      const why = `authentication failed: ${(error as Error).message}`;
      conn.close(why);
      return why;
    }
  }
  replySessions.set(conn, {
    key, resource: hello.resource, primaryNonce: theirs, secondaryNonce: ours, helloDigest: digest,
  });
  return null;
}

function encryptionDiffers(theirs: unknown, ours: EncryptionKind): string {
  return `the primary's link encryption is ${JSON.stringify(theirs)}, this node's is "${ours}" ` +
    "(set the same encryption on both nodes)";
}

/**
 * The primary's side, after its Hello: checks the secondary's challenge and answers it. Throws
 * (the connection attempt fails with that message) when the secondary does not prove it holds
 * our key. A HelloReply instead of a challenge is returned to the caller as `early`: a refusal
 * explains itself; an acceptance means the secondary does not authenticate, which the caller
 * refuses. Else returns the session the secondary's HelloReply must be signed for.
 */
export async function authenticateAsPrimary(
  conn: Connection,
  options: { key: Buffer; nonce: Buffer; hello: Hello; timeoutMs: number; encryption: EncryptionKind },
): Promise<{ early: Frame } | { session: AuthSession }> {
  const frame = await nextFrame(conn, options.timeoutMs, "authentication challenge");
  if (frame.type === MessageType.HelloReply) return { early: frame };
  if (frame.type !== MessageType.AuthChallenge) {
    throw new Error(`authentication failed: message type ${frame.type} instead of AuthChallenge`);
  }
  const body = decodeJson(frame);
  if (typeof body.nonce !== "string" || !NONCE_PATTERN.test(body.nonce)) {
    throw new Error("authentication failed: the secondary's challenge has no valid nonce");
  }
  const theirs = Buffer.from(body.nonce, "hex");
  const digest = helloDigest(options.hello);
  const resource = options.hello.resource;
  if (!proofMatches(proof(options.key, "secondary", resource, options.nonce, theirs, digest), body.proof)) {
    throw new Error("authentication failed: the secondary's proof does not match (its authkey differs from " +
      "this node's, or our Hello was changed on the way)");
  }
  conn.send(encodeJson(MessageType.Auth, {
    proof: proof(options.key, "primary", resource, theirs, options.nonce, digest).toString("hex"),
  }));
  if (options.encryption !== "none") {
    conn.secure(deriveLinkKeys(options.key, resource, options.nonce, theirs, "primary", digest));
  }
  return {
    session: { key: options.key, resource, primaryNonce: options.nonce, secondaryNonce: theirs, helloDigest: digest },
  };
}
