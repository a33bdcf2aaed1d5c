/**
 * NBD server: serves one export (a BlockDevice) to any number of clients over unix or TCP
 * sockets, speaking fixed newstyle negotiation and simple replies (see nbd_protocol.ts).
 *
 * Requests run concurrently and are answered as they complete, matched by cookie. Per connection
 * at most `maxInFlight` requests and about `maxInFlightBytes` of READ/WRITE data are
 * outstanding; beyond that, and while the socket's send buffer is full, the server stops reading
 * from that client. A client that breaks the framing is logged and disconnected; nothing a
 * client sends can throw out of this module.
 *
 * Nothing a client does at will logs a line each time: lines about a connection's life
 * (connected, serving, disconnected) are logged for one connection per peer a minute, and
 * warnings (refusals, protocol violations, refused or failed requests) once a minute per kind and
 * peer, with the count of repeats (RepeatLimiter). Before, every connection logged at least two
 * lines and every refused one three, so a flood of connections flooded the log (found by review).
 * A peer is a TCP client's address (any port) or, for the unix socket, every local client.
 *
 * @module
 */

import * as fs from "node:fs";
import * as net from "node:net";
import {
  ClientFlag,
  Command,
  CommandFlag,
  decodeInfoRequest,
  decodeNbdString,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeNbdString,
  encodeOptionReply,
  encodeServerReplyData,
  encodeSimpleReply,
  HandshakeFlag,
  InfoType,
  NbdErrno,
  nbdErrnoName,
  type NbdClientFrame,
  type NbdRequest,
  NbdServerParser,
  Option,
  OptionReply,
  quoteBounded,
  type ReceiveBuffers,
  TransmissionFlag,
} from "./nbd_protocol.ts";
import { normalizeIp } from "./config.ts";
import { makeLogger, REFUSAL_LOG_INTERVAL_MS, RepeatLimiter, repeatKind } from "./log.ts";

/**
 * What the NBD server needs from the device behind it. All offsets/lengths are validated by the
 * server (in range, non-zero, aligned to `minBlockBytes`, READ/WRITE within `maxRequestBytes`)
 * before these are called. Errors thrown are mapped to NBD errors: an Error with `code`
 * "EIO" | "ENOSPC" | "EINVAL" | "EPERM" | "EOVERFLOW" | "ESHUTDOWN" maps to that NBD error
 * ("EDQUOT" and "EFBIG" to ENOSPC, as the spec asks), anything else → EIO.
 */
export interface BlockDevice {
  /** Size of the export; fixed for the life of the server. */
  readonly sizeBytes: number;
  /** Resolve with exactly `length` bytes. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /**
   * Write `data` (owned by the device from now on: a buffer from `writeBuffers` is the device's
   * to give back); with `fua`, persist before resolving.
   */
  write(offset: number, data: Uint8Array, fua: boolean): Promise<void>;
  /** Where the server receives WRITE payloads into, if the device lends buffers. */
  readonly writeBuffers?: ReceiveBuffers;
  /** Persist every write that completed before this call, on any connection. */
  flush(): Promise<void>;
  /** Discard a range (a hint; reads of it afterwards are undefined). */
  trim(offset: number, length: number): Promise<void>;
  /** Make a range read as zeroes, a hole allowed; with `fua`, persist before resolving. Length is
   *  not bounded by maxRequestBytes (up to 4 GiB - 1); split it if needed. A WRITE_ZEROES with
   *  NBD_CMD_FLAG_NO_HOLE does not come here: the server writes zeroes through write(). */
  writeZeroes(offset: number, length: number, fua: boolean): Promise<void>;
}

/** Log sink; the server never throws for client behaviour, it logs. */
export type NbdLog = (level: "info" | "warn" | "error", message: string) => void;

/** Configuration of an NbdServer. */
export interface NbdServerOptions {
  /** Name reported in LIST / INFO; the server accepts "" and this name. */
  exportName: string;
  /** Human-readable description (NBD_INFO_DESCRIPTION, details of NBD_REP_SERVER). */
  description?: string;
  /** Largest READ/WRITE payload; advertised as the maximum block size. Default 32 MiB. */
  maxRequestBytes?: number;
  /** Requests outstanding per connection before the server stops reading it. Default 64. */
  maxInFlight?: number;
  /** READ/WRITE bytes outstanding per connection before it stops reading. Default 4 × max. */
  maxInFlightBytes?: number;
  /** Concurrent clients; more are accepted and refused, logged once a minute per peer. Default 16. */
  maxClients?: number;
  /** Advertised minimum block size (power of two ≤ 64 KiB); unaligned requests get EINVAL.
   *  Default 1: any byte range is served. */
  minBlockBytes?: number;
  /** A client that has not finished the handshake by then is disconnected. Default 30 s. */
  handshakeTimeoutMs?: number;
  /**
   * After our FIN, how long the client may take to close once every reply was handed to the
   * kernel; at a server shutdown, counted from the FIN. Default 5 s.
   */
  closeGraceMs?: number;
  /** Log sink. Default: stderr. */
  log?: NbdLog;
}

/** Limits in force, for status output. */
export interface NbdServerLimits {
  maxRequestBytes: number;
  maxInFlight: number;
  maxClients: number;
  maxInFlightBytes: number;
  minBlockBytes: number;
  maxOptionBytes: number;
  maxOptionsPerConnection: number;
  handshakeTimeoutMs: number;
  closeGraceMs: number;
}

/** Where to listen. */
export type NbdListenAddress =
  | { kind: "unix"; path: string }
  | { kind: "tcp"; host: string; port: number };

const MIB = 1024 * 1024;
const DEFAULT_MAX_REQUEST_BYTES = 32 * MIB;
const DEFAULT_MAX_IN_FLIGHT = 64;
const DEFAULT_MAX_CLIENTS = 16;
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
/**
 * TCP clients: keepalive probes start after this long idle (then the kernel's interval and
 * count, 75 s × 9 by default), so a client whose host died or was cut off while idle does not
 * hold one of maxClients forever (found by review). Unix-socket clients cannot vanish that way.
 */
export const NBD_TCP_KEEPALIVE_IDLE_MS = 60_000;
/** Option data limit: a GO names at most a 4 KiB export and a few info types. */
const MAX_OPTION_BYTES = 64 * 1024;
/** Options per connection before we call it a denial of service and disconnect. */
const MAX_OPTIONS_PER_CONNECTION = 256;
const PREFERRED_BLOCK_BYTES = 4096;
const MAX_BLOCK_BYTES_LIMIT = 2 ** 32 - 1;
const DEFAULT_CLOSE_GRACE_MS = 5_000;
/** A server shutting down answers options that arrive this long with NBD_REP_ERR_SHUTDOWN. */
const SHUTDOWN_NEGOTIATION_MS = 1_000;
/**
 * A WRITE_ZEROES with NO_HOLE is carried out as writes of zero buffers this large, one at a time:
 * the spec requires the range to be allocated afterwards, and writeZeroes() may punch a hole
 * (found by review: `qemu-io -c "write -z"` left holes on both copies). 1 MiB is the largest
 * replication frame, so each write goes out whole; the buffer counts against maxInFlightBytes.
 */
const ZERO_WRITE_CHUNK_BYTES = MIB;
/** Replies queued in one turn up to this size are copied into one buffer for one write. */
const COALESCE_BYTES_MAX = 256 * 1024;
const FLUSH_SCHEDULER = (callback: () => void) => setImmediate(callback);

/**
 * Transmission flags. CAN_MULTI_CONN is correct because BlockDevice.flush covers every completed
 * write whichever connection carried it, and FUA writes persist before they complete.
 */
const TRANSMISSION_FLAGS =
  TransmissionFlag.HAS_FLAGS |
  TransmissionFlag.SEND_FLUSH |
  TransmissionFlag.SEND_FUA |
  TransmissionFlag.SEND_TRIM |
  TransmissionFlag.SEND_WRITE_ZEROES |
  TransmissionFlag.CAN_MULTI_CONN;

/** Command flags accepted per command; FUA is valid on every command (spec). */
const ALLOWED_COMMAND_FLAGS = new Map<number, number>([
  [Command.READ, CommandFlag.FUA],
  [Command.WRITE, CommandFlag.FUA],
  [Command.FLUSH, CommandFlag.FUA],
  [Command.TRIM, CommandFlag.FUA],
  [Command.WRITE_ZEROES, CommandFlag.FUA | CommandFlag.NO_HOLE],
]);

const COMMAND_NAMES = new Map<number, string>(Object.entries(Command).map(([k, v]) => [v, k]));

const ERRNO_BY_CODE = new Map<string, number>([
  ["EIO", NbdErrno.EIO],
  ["ENOSPC", NbdErrno.ENOSPC],
  ["EDQUOT", NbdErrno.ENOSPC],
  ["EFBIG", NbdErrno.ENOSPC],
  ["EINVAL", NbdErrno.EINVAL],
  ["EPERM", NbdErrno.EPERM],
  ["EOVERFLOW", NbdErrno.EOVERFLOW],
  ["ESHUTDOWN", NbdErrno.ESHUTDOWN],
]);

/** NBD error value for an error thrown by the device. */
function nbdErrnoOf(error: unknown): number {
  const code = (error as { code?: unknown } | null)?.code;
  return (typeof code === "string" && ERRNO_BY_CODE.get(code)) || NbdErrno.EIO;
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

const defaultLog: NbdLog = makeLogger("nbd", 0);

/** Who a connection's lines are limited for: a TCP client's address, or all local clients. */
function peerOf(socket: net.Socket): string {
  return socket.remoteAddress ? normalizeIp(socket.remoteAddress) : "local";
}

/** Counters exposed by stats(). */
interface NbdCounters {
  clients: number;
  reads: number;
  writes: number;
  flushes: number;
  trims: number;
  zeroes: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
  inFlight: number;
  refusedClients: number;
  protocolErrors: number;
}

/** What every connection shares with the server. */
interface ServerContext {
  readonly device: BlockDevice;
  readonly exportName: string;
  readonly description: string;
  readonly limits: NbdServerLimits;
  readonly log: NbdLog;
  /** Lines a client can cause at will go through it, keyed by kind and peer (see @module). */
  readonly repeats: RepeatLimiter;
  readonly counters: NbdCounters;
}

function positiveInt(value: number, name: string, max: number): number {
  if (!Number.isSafeInteger(value) || value < 1 || value > max) {
    throw new RangeError(`Cannot create NBD server: ${name} '${value}' is not in 1..${max}`);
  }
  return value;
}

function resolveLimits(options: NbdServerOptions): NbdServerLimits {
  const minBlockBytes = positiveInt(options.minBlockBytes ?? 1, "minBlockBytes", 65536);
  if ((minBlockBytes & (minBlockBytes - 1)) !== 0) {
    throw new RangeError(`Cannot create NBD server: minBlockBytes '${minBlockBytes}' is not 2^n`);
  }
  const maxRequestBytes = positiveInt(
    options.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES,
    "maxRequestBytes",
    MAX_BLOCK_BYTES_LIMIT,
  );
  if (maxRequestBytes < Math.max(PREFERRED_BLOCK_BYTES, minBlockBytes)) {
    throw new RangeError(`Cannot create NBD server: maxRequestBytes '${maxRequestBytes}' < 4096`);
  }
  if (maxRequestBytes % minBlockBytes !== 0) {
    throw new RangeError(
      `Cannot create NBD server: maxRequestBytes '${maxRequestBytes}' is not a multiple of ` +
        `minBlockBytes '${minBlockBytes}'`,
    );
  }
  return {
    maxRequestBytes,
    minBlockBytes,
    maxInFlight: positiveInt(options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT, "maxInFlight", 4096),
    maxInFlightBytes: positiveInt(
      options.maxInFlightBytes ?? 4 * maxRequestBytes,
      "maxInFlightBytes",
      Number.MAX_SAFE_INTEGER,
    ),
    maxClients: positiveInt(options.maxClients ?? DEFAULT_MAX_CLIENTS, "maxClients", 65536),
    maxOptionBytes: MAX_OPTION_BYTES,
    maxOptionsPerConnection: MAX_OPTIONS_PER_CONNECTION,
    handshakeTimeoutMs: positiveInt(
      options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
      "handshakeTimeoutMs",
      2 ** 31 - 1,
    ),
    closeGraceMs: positiveInt(options.closeGraceMs ?? DEFAULT_CLOSE_GRACE_MS, "closeGraceMs", 2 ** 31 - 1),
  };
}

/**
 * Serves one BlockDevice as a single NBD export.
 *
 * ```ts
 * const server = new NbdServer(device, { exportName: "data" });
 * await server.listen({ kind: "unix", path: "/run/hast/data.sock" });
 * // ...
 * await server.close();
 * ```
 */
export class NbdServer {
  /** Limits in force (defaults applied). */
  readonly limits: NbdServerLimits;
  readonly #context: ServerContext;
  readonly #connections = new Map<NbdConnection, Promise<void>>();
  /**
   * Clients beyond maxClients, told why in the handshake (every option but ABORT answered
   * NBD_REP_ERR_POLICY) until they leave or the handshake timeout ends them; at most maxClients.
   */
  readonly #refusing = new Map<NbdConnection, Promise<void>>();
  readonly #listeners: Array<{ server: net.Server; unixPath: string | null }> = [];
  #nextConnectionId = 1;
  #closing = false;

  /** Validate options (throws RangeError) and prepare; nothing listens until listen(). */
  constructor(device: BlockDevice, options: NbdServerOptions) {
    if (!Number.isSafeInteger(device.sizeBytes) || device.sizeBytes < 0) {
      throw new RangeError(`Cannot create NBD server: device size '${device.sizeBytes}' is bad`);
    }
    encodeNbdString(options.exportName, "export name");
    encodeNbdString(options.description ?? "", "export description");
    this.limits = resolveLimits(options);
    this.#context = {
      device,
      exportName: options.exportName,
      description: options.description ?? "",
      limits: this.limits,
      log: options.log ?? defaultLog,
      repeats: new RepeatLimiter(REFUSAL_LOG_INTERVAL_MS),
      counters: {
        clients: 0, reads: 0, writes: 0, flushes: 0, trims: 0, zeroes: 0, bytesRead: 0,
        bytesWritten: 0, errors: 0, inFlight: 0, refusedClients: 0, protocolErrors: 0,
      },
    };
  }

  /** Serve one connected socket (net.Socket from node:net). Returns when the connection ends
   *  and every request it started has finished on the device. Never rejects. */
  async handleConnection(socket: net.Socket): Promise<void> {
    const { counters, limits, log, repeats } = this.#context;
    if (this.#closing || this.#connections.size >= limits.maxClients) {
      counters.refusedClients++;
      const why = this.#closing ? "server is closing" : `${limits.maxClients} clients connected`;
      const peer = peerOf(socket);
      const line = repeats.pass(`refusing: ${why} ${peer}`,
        `nbd: refusing connection from ${peer}: ${why} (maxClients ${limits.maxClients})`);
      if (line !== null) log("warn", line);
      if (this.#closing || this.#refusing.size >= limits.maxClients) {
        socket.destroy();
        return;
      }
      // Told in the handshake, so that the client can say why (found by review: qemu-io said
      // "Failed to read initial magic", nbdinfo "external event 0 is invalid").
      const refusal = `Cannot serve '${this.#context.exportName}': ${why} (maxClients ${limits.maxClients})`;
      const refused = new NbdConnection(this.#context, socket, this.#nextConnectionId++, refusal);
      const ended = refused.run();
      this.#refusing.set(refused, ended);
      await ended;
      this.#refusing.delete(refused);
      return;
    }
    const connection = new NbdConnection(this.#context, socket, this.#nextConnectionId++);
    const done = connection.run();
    this.#connections.set(connection, done);
    counters.clients++;
    try {
      await done;
    } finally {
      this.#connections.delete(connection);
      counters.clients--;
    }
  }

  /** Listen on a unix socket path (removing a stale socket file first) or tcp host:port. */
  async listen(address: NbdListenAddress): Promise<void> {
    if (this.#closing) throw new Error("Cannot listen: server is closing");
    const server = net.createServer({ allowHalfOpen: true }, (socket) => {
      void this.handleConnection(socket);
    });
    if (address.kind === "unix") await removeStaleSocket(address.path);
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      const ready = () => {
        server.off("error", reject);
        resolve();
      };
      if (address.kind === "unix") server.listen(address.path, ready);
      else server.listen(address.port, address.host, ready);
    });
    server.on("error", (error) => {
      // Accept errors (EMFILE under a flood of connections) come once per attempt.
      const message = `nbd: listener: ${messageOf(error)}`;
      const line = this.#context.repeats.pass(repeatKind(message), message);
      if (line !== null) this.#context.log("error", line);
    });
    this.#listeners.push({ server, unixPath: address.kind === "unix" ? address.path : null });
    const where = address.kind === "unix" ? address.path : `${address.host}:${address.port}`;
    this.#context.log("info", `nbd: export '${this.#context.exportName}' listening on ${where}`);
  }

  /** The bound TCP ports (useful after listening on port 0), in listen() order. */
  tcpPorts(): number[] {
    const ports: number[] = [];
    for (const { server, unixPath } of this.#listeners) {
      const address = server.address();
      if (unixPath === null && address !== null && typeof address === "object") {
        ports.push(address.port);
      }
    }
    return ports;
  }

  /** Stop accepting, end all connections (in-flight requests finish first; requests that arrive
   *  meanwhile get ESHUTDOWN), remove the unix socket files. */
  async close(): Promise<void> {
    this.#closing = true;
    const listenersClosed = this.#listeners.map(
      ({ server }) => new Promise<void>((resolve) => server.close(() => resolve())),
    );
    for (const connection of [...this.#connections.keys(), ...this.#refusing.keys()]) connection.shutdown();
    await Promise.all([...this.#connections.values(), ...this.#refusing.values()]);
    await Promise.all(listenersClosed);
    for (const { unixPath } of this.#listeners) {
      if (unixPath !== null) fs.rmSync(unixPath, { force: true });
    }
    this.#listeners.length = 0;
  }

  /** Counters for `hast list`: clients, reads, writes, flushes, trims, zeroes, bytesRead,
   *  bytesWritten, errors (error replies), inFlight, refusedClients, protocolErrors. */
  stats(): Record<string, number> {
    return { ...this.#context.counters };
  }
}

/** Remove a socket file nobody accepts on; refuse a live socket or a non-socket file. */
async function removeStaleSocket(path: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
    throw error;
  }
  if (!stat.isSocket()) throw new Error(`Cannot listen on '${path}': exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.createConnection(path);
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
  if (live) throw new Error(`Cannot listen on '${path}': another server accepts connections there`);
  fs.rmSync(path, { force: true });
}

type ConnectionState = "handshake" | "transmission" | "closing";

/**
 * One client. Control flow: socket events feed the parser; pump() turns frames into actions
 * while the limits allow; each request runs on the device and replies when done; closing waits
 * for in-flight requests. run() resolves once the socket is closed and nothing is in flight.
 */
class NbdConnection {
  readonly #ctx: ServerContext;
  readonly #socket: net.Socket;
  readonly #label: string;
  /** See peerOf. */
  readonly #peer: string;
  /** Whether this connection's life is logged: one connection per peer a minute (see @module). */
  #lifeLogged = false;
  readonly #parser: NbdServerParser;
  readonly #done = Promise.withResolvers<void>();
  /** Device promises of WRITE/TRIM/WRITE_ZEROES not yet settled; FLUSH waits for them. */
  readonly #pendingWrites = new Set<Promise<unknown>>();
  #state: ConnectionState = "handshake";
  #noZeroes = false;
  #optionCount = 0;
  #inFlight = 0;
  #inFlightBytes = 0;
  #writeBlocked = false;
  #readPaused = false;
  #outbox: Uint8Array[] = [];
  #outboxBytes = 0;
  #flushScheduled = false;
  #peerEnded = false;
  /** The parser had no complete frame left the last time pump() asked. */
  #parserDrained = true;
  #ending = false;
  #socketClosed = false;
  #shutdownRequested = false;
  #handshakeTimer: ReturnType<typeof setTimeout> | null = null;
  #graceTimer: ReturnType<typeof setTimeout> | null = null;
  /** Why this client is refused (it is beyond maxClients), or null: see NbdServer.#refusing. */
  readonly #refusal: string | null;

  constructor(context: ServerContext, socket: net.Socket, id: number, refusal: string | null = null) {
    this.#ctx = context;
    this.#refusal = refusal;
    this.#socket = socket;
    const peer = socket.remoteAddress ? ` (${socket.remoteAddress}:${socket.remotePort})` : "";
    this.#label = `nbd client ${id}${peer}`;
    this.#peer = peerOf(socket);
    this.#parser = new NbdServerParser({
      maxOptionBytes: context.limits.maxOptionBytes,
      maxPayloadBytes: context.limits.maxRequestBytes,
      pool: context.device.writeBuffers ?? null,
    });
  }

  /** Start serving; resolves when the connection is over. */
  run(): Promise<void> {
    const socket = this.#socket;
    socket.allowHalfOpen = true; // finish in-flight replies after the client's FIN
    if (socket.remoteAddress) {
      socket.setNoDelay(true);
      socket.setKeepAlive(true, NBD_TCP_KEEPALIVE_IDLE_MS);
    }
    socket.on("data", (chunk: Uint8Array) => this.#onData(chunk));
    socket.on("end", () => this.#onPeerEnd());
    socket.on("drain", () => {
      this.#writeBlocked = false;
      this.#pump();
    });
    socket.on("error", (error) => {
      this.#logLife(`socket error: ${messageOf(error)}`);
      socket.destroy();
    });
    socket.on("close", () => this.#onClose());
    this.#handshakeTimer = setTimeout(() => {
      this.#violation(`handshake not finished in ${this.#ctx.limits.handshakeTimeoutMs} ms`);
    }, this.#ctx.limits.handshakeTimeoutMs);
    this.#handshakeTimer.unref?.();
    const connected = this.#ctx.repeats.pass(`connection ${this.#peer}`, `${this.#label}: connected`);
    this.#lifeLogged = connected !== null;
    if (connected !== null) this.#ctx.log("info", connected);
    this.#send(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
    return this.#done.promise;
  }

  /** Server shutdown: answer what is buffered with ESHUTDOWN, let in-flight finish, close. */
  shutdown(): void {
    this.#shutdownRequested = true;
    if (this.#state === "handshake") {
      // The NBD spec: a server going away during negotiation SHOULD answer options with
      // NBD_REP_ERR_SHUTDOWN, so the client can say why, rather than just close. Options
      // arriving within a short window are so answered (#onOption); then the socket closes.
      this.#ctx.log("info", `${this.#label}: server shutdown during handshake: closing`);
      if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
      this.#handshakeTimer = setTimeout(() => this.#hardClose(), SHUTDOWN_NEGOTIATION_MS);
      this.#handshakeTimer.unref?.();
      return;
    }
    this.#pump();
    this.#state = "closing";
    this.#maybeFinish();
    // Already ending (DISC, the client's FIN) and waiting for a slow reader: bounded now.
    if (this.#ending) this.#armCloseGrace();
  }

  #onData(chunk: Uint8Array): void {
    if (this.#ending || this.#state === "closing") return; // nothing more is expected
    this.#parser.push(chunk);
    this.#parserDrained = false;
    this.#pump();
  }

  /** The client sent FIN. Frames it sent before are still served (a client may half-close
   *  and wait for its replies); #maybeFinish ends our side once they are answered. */
  #onPeerEnd(): void {
    this.#peerEnded = true;
    this.#pump();
  }

  #onClose(): void {
    this.#socketClosed = true;
    this.#ending = true;
    this.#parser.discardPending();
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    if (this.#graceTimer !== null) clearTimeout(this.#graceTimer);
    this.#logLife("disconnected");
    this.#maybeResolve();
  }

  #maybeResolve(): void {
    if (this.#socketClosed && this.#inFlight === 0) this.#done.resolve();
  }

  /** Turn buffered bytes into actions while the limits allow, then pause or resume reading.
   *  A bug of ours surfacing here closes this connection only, loudly, not the process. */
  #pump(): void {
    try {
      this.#pumpFrames();
    } catch (error) {
      const detail = error instanceof Error ? (error.stack ?? error.message) : String(error);
      this.#logRepeated("error", "internal error", `internal error, closing connection: ${detail}`);
      this.#hardClose();
      return;
    }
    this.#maybeFinish();
    const pause = this.#state === "transmission" && !this.#ending && this.#atLimit();
    if (pause !== this.#readPaused) {
      this.#readPaused = pause;
      if (pause) this.#socket.pause();
      else this.#socket.resume();
    }
  }

  #pumpFrames(): void {
    while (!this.#ending && this.#state !== "closing") {
      if (this.#state === "transmission" && this.#atLimit() && !this.#shutdownRequested) return;
      let frame: NbdClientFrame | null;
      try {
        frame = this.#parser.next();
      } catch (error) {
        return this.#violation(messageOf(error));
      }
      if (frame === null) {
        this.#parserDrained = true;
        return;
      }
      this.#dispatch(frame);
    }
  }

  #atLimit(): boolean {
    const { maxInFlight, maxInFlightBytes } = this.#ctx.limits;
    // Replies waiting in the outbox count too: a read the device answers within the turn (a
    // page-cache hit) frees its in-flight bytes at once, and only the outbox's flush, a turn
    // later, can see the socket full. Without this, every READ buffered from the client was
    // read and queued before that (found by review: 64 × 32 MiB READs, 1,792 bytes sent by a
    // client that read nothing, took the worker to 1.5 GB).
    const heldBytes = this.#inFlightBytes + this.#outboxBytes;
    return this.#writeBlocked || this.#inFlight >= maxInFlight || heldBytes >= maxInFlightBytes;
  }

  #dispatch(frame: NbdClientFrame): void {
    switch (frame.kind) {
      case "clientFlags":
        return this.#onClientFlags(frame.flags);
      case "option":
        return this.#onOption(frame.option, frame.data);
      case "optionTooBig":
        return this.#onOptionTooBig(frame.option, frame.lengthBytes);
      case "request":
        return this.#onRequest(frame.request, frame.payload, false);
      case "oversizedWrite":
        return this.#onRequest(frame.request, null, true);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Handshake

  #onClientFlags(flags: number): void {
    const known = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;
    if ((flags & ~known) !== 0) {
      return this.#violation(`unknown client flags 0x${flags.toString(16)}`);
    }
    if ((flags & ClientFlag.FIXED_NEWSTYLE) === 0) {
      return this.#violation(`client flags 0x${flags.toString(16)} lack FIXED_NEWSTYLE`);
    }
    this.#noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
  }

  /** The parser has stopped: the option's data is not read, so the connection must close. */
  #onOptionTooBig(option: number, lengthBytes: number): void {
    const limit = `(limit ${this.#ctx.limits.maxOptionBytes})`;
    if (option === Option.EXPORT_NAME) {
      // The spec allows no option reply to NBD_OPT_EXPORT_NAME, not even an error: close only.
      return this.#violation(`EXPORT_NAME carries ${lengthBytes} bytes ${limit}, no reply allowed`);
    }
    this.#sendOptionReply(
      option,
      OptionReply.ERR_TOO_BIG,
      `option data of ${lengthBytes} bytes exceeds ${this.#ctx.limits.maxOptionBytes}`,
    );
    // Graceful: the ERR_TOO_BIG reply must reach the client before the FIN.
    return this.#violation(`option ${option} carries ${lengthBytes} bytes ${limit}`, true);
  }

  #onOption(option: number, data: Uint8Array): void {
    const { maxOptionsPerConnection } = this.#ctx.limits;
    if (++this.#optionCount > maxOptionsPerConnection) {
      return this.#violation(`more than ${maxOptionsPerConnection} options`);
    }
    if (this.#shutdownRequested && option !== Option.ABORT) {
      // EXPORT_NAME allows no error reply: the spec says close.
      if (option === Option.EXPORT_NAME) return this.#hardClose();
      return this.#sendOptionReply(option, OptionReply.ERR_SHUTDOWN, "server is shutting down");
    }
    if (this.#refusal !== null && option !== Option.ABORT) {
      // EXPORT_NAME allows no error reply: the spec says close.
      if (option === Option.EXPORT_NAME) return this.#violation(this.#refusal);
      return this.#sendOptionReply(option, OptionReply.ERR_POLICY, this.#refusal);
    }
    switch (option) {
      case Option.EXPORT_NAME:
        return this.#onExportName(data);
      case Option.ABORT:
        this.#sendOptionReply(option, OptionReply.ACK);
        this.#logLife("client aborted negotiation");
        return this.#endGracefully();
      case Option.LIST:
        return this.#onList(data);
      case Option.INFO:
      case Option.GO:
        return this.#onInfo(option, data);
      default:
        // Includes STRUCTURED_REPLY (we send simple replies only, which the spec allows),
        // STARTTLS (no TLS: the socket is local or the network is trusted), meta contexts and
        // extended headers, which depend on structured replies.
        return this.#sendOptionReply(option, OptionReply.ERR_UNSUP, `option ${option} unsupported`);
    }
  }

  #onExportName(data: Uint8Array): void {
    let name: string;
    try {
      name = decodeNbdString(data, "export name");
    } catch (error) {
      return this.#violation(messageOf(error));
    }
    // NBD_OPT_EXPORT_NAME cannot be refused with an error reply: the spec says close.
    if (!this.#knowsExport(name)) return this.#violation(`unknown export ${quoteBounded(name)}`);
    const { device } = this.#ctx;
    this.#send(encodeExportNameReply(device.sizeBytes, TRANSMISSION_FLAGS, this.#noZeroes));
    this.#enterTransmission();
  }

  #onList(data: Uint8Array): void {
    if (data.length !== 0) {
      return this.#sendOptionReply(Option.LIST, OptionReply.ERR_INVALID, "LIST takes no data");
    }
    const reply = encodeServerReplyData(this.#ctx.exportName, this.#ctx.description);
    this.#send(encodeOptionReply(Option.LIST, OptionReply.SERVER, reply));
    this.#sendOptionReply(Option.LIST, OptionReply.ACK);
  }

  /** NBD_OPT_INFO / NBD_OPT_GO: requested infos, then block sizes and export info, then ACK. */
  #onInfo(option: number, data: Uint8Array): void {
    let request: { name: string; infoTypes: number[] };
    try {
      request = decodeInfoRequest(data);
    } catch (error) {
      return this.#sendOptionReply(option, OptionReply.ERR_INVALID, messageOf(error));
    }
    if (!this.#knowsExport(request.name)) {
      // Both names bounded: a valid 4096-byte name quoted whole would overflow the message.
      const known = `this server exports ${quoteBounded(this.#ctx.exportName)}`;
      const message = `Cannot open export ${quoteBounded(request.name)}: unknown, ${known}`;
      return this.#sendOptionReply(option, OptionReply.ERR_UNKNOWN, message);
    }
    const { device, description, exportName, limits } = this.#ctx;
    const requested = new Set(request.infoTypes);
    const infos: Uint8Array[] = [];
    if (requested.has(InfoType.NAME)) infos.push(encodeInfoString(InfoType.NAME, exportName));
    if (requested.has(InfoType.DESCRIPTION) && description !== "") {
      infos.push(encodeInfoString(InfoType.DESCRIPTION, description));
    }
    // Sent even when not requested (the spec allows it), so every client learns the limits.
    const preferred = Math.max(PREFERRED_BLOCK_BYTES, limits.minBlockBytes);
    infos.push(encodeInfoBlockSize(limits.minBlockBytes, preferred, limits.maxRequestBytes));
    infos.push(encodeInfoExport(device.sizeBytes, TRANSMISSION_FLAGS));
    for (const info of infos) this.#send(encodeOptionReply(option, OptionReply.INFO, info));
    this.#sendOptionReply(option, OptionReply.ACK);
    if (option === Option.GO) this.#enterTransmission();
  }

  #knowsExport(name: string): boolean {
    return name === "" || name === this.#ctx.exportName;
  }

  #enterTransmission(): void {
    this.#parser.enterTransmission();
    this.#state = "transmission";
    if (this.#handshakeTimer !== null) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    const size = this.#ctx.device.sizeBytes;
    this.#logLife(`serving '${this.#ctx.exportName}' (${size} bytes)`);
  }

  #sendOptionReply(option: number, replyType: number, message = ""): void {
    this.#send(encodeOptionReply(option, replyType, encodeNbdString(message, "message")));
  }

  // -------------------------------------------------------------------------------------------
  // Transmission

  /**
   * A WRITE whose declared length exceeds maxRequestBytes is answered EINVAL, and the
   * connection continues: the length field still frames the stream exactly, so the parser skips
   * the payload without storing it (no memory cost) and the next header is where the client put
   * it. The spec lets a server disconnect on a payload large enough to be a denial of service
   * instead, but advises against it below 32 MiB; skipping is correct at any size and costs only
   * bandwidth, which a hostile client could spend with valid writes anyway.
   */
  #onRequest(request: NbdRequest, payload: Uint8Array | null, oversized: boolean): void {
    if (request.type === Command.DISC) {
      this.#logLife("client sent disconnect");
      this.#state = "closing";
      return this.#maybeFinish();
    }
    if (this.#shutdownRequested) return this.#reject(request, NbdErrno.ESHUTDOWN, null, payload);
    if (oversized) {
      const why = `exceeds maxRequestBytes ${this.#ctx.limits.maxRequestBytes}`;
      return this.#reject(request, NbdErrno.EINVAL, why, null);
    }
    const [errno, why] = this.#validate(request);
    if (errno !== 0) return this.#reject(request, errno, why, payload);
    this.#execute(request, payload);
  }

  /** [0, ""] if the device may run the request, else [NBD error, reason]. */
  #validate(request: NbdRequest): [number, string] {
    const { type, flags, offset, length } = request;
    const { limits, device } = this.#ctx;
    const allowed = ALLOWED_COMMAND_FLAGS.get(type);
    if (allowed === undefined) return [NbdErrno.EINVAL, "unsupported command"];
    if ((flags & ~allowed) !== 0) return [NbdErrno.EINVAL, `bad flags 0x${flags.toString(16)}`];
    if (type === Command.FLUSH) return [0, ""]; // offset and length are reserved; ignored
    if (length === 0) return [NbdErrno.EINVAL, "zero length"];
    const isData = type === Command.READ || type === Command.WRITE;
    if (isData && length > limits.maxRequestBytes) {
      return [NbdErrno.EINVAL, `exceeds maxRequestBytes ${limits.maxRequestBytes}`];
    }
    if (offset % limits.minBlockBytes !== 0 || length % limits.minBlockBytes !== 0) {
      return [NbdErrno.EINVAL, `not aligned to ${limits.minBlockBytes} bytes`];
    }
    if (offset + length > device.sizeBytes) {
      // The spec asks for ENOSPC when a WRITE or WRITE_ZEROES goes past the end, EINVAL for a
      // READ or TRIM (or any other command) that does.
      const isWrite = type === Command.WRITE || type === Command.WRITE_ZEROES;
      const errno = isWrite ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
      return [errno, `beyond the end of the export (${device.sizeBytes} bytes)`];
    }
    return [0, ""];
  }

  /** Answers `errno`; a payload received into the device's buffer goes back. */
  #reject(request: NbdRequest, errno: number, why: string | null, payload: Uint8Array | null): void {
    const buffers = this.#ctx.device.writeBuffers;
    if (payload !== null && buffers?.owns(payload)) buffers.give(payload);
    if (why !== null) this.#logRequest("warn", request, `refused (${nbdErrnoName(errno)}): ${why}`);
    this.#ctx.counters.errors++;
    this.#reply(request.cookie, errno, null);
  }

  #execute(request: NbdRequest, payload: Uint8Array | null): void {
    const costBytes = this.#heldBytes(request);
    this.#inFlight++;
    this.#inFlightBytes += costBytes;
    this.#ctx.counters.inFlight++;
    const work = this.#perform(request, payload);
    if (request.type !== Command.READ && request.type !== Command.FLUSH) {
      this.#pendingWrites.add(work);
      const forget = () => this.#pendingWrites.delete(work);
      work.then(forget, forget);
    }
    work
      .then(
        (data) => this.#complete(request, 0, data),
        (error) => this.#complete(request, this.#deviceErrno(request, error), null),
      )
      .finally(() => {
        this.#inFlight--;
        this.#inFlightBytes -= costBytes;
        this.#ctx.counters.inFlight--;
        this.#pump();
        this.#maybeResolve();
      })
      .catch((error) => this.#logRepeated("error", "internal error", `internal error: ${error}`));
  }

  /** Data bytes a request holds while it runs, counted against maxInFlightBytes. */
  #heldBytes(request: NbdRequest): number {
    if (request.type === Command.READ || request.type === Command.WRITE) return request.length;
    if (request.type === Command.WRITE_ZEROES && (request.flags & CommandFlag.NO_HOLE) !== 0) {
      return Math.min(request.length, this.#zeroChunkBytes());
    }
    return 0;
  }

  #zeroChunkBytes(): number {
    return Math.min(ZERO_WRITE_CHUNK_BYTES, this.#ctx.limits.maxRequestBytes);
  }

  /**
   * WRITE_ZEROES with NO_HOLE: zero buffers through write(), then a flush for FUA. Up to 4 GiB
   * is thousands of writes: it stops between two once the client is gone or the server shuts
   * down, so that neither waits for the rest (the client gets ESHUTDOWN, if anything).
   */
  async #writeZeroesAllocated(offset: number, length: number, fua: boolean): Promise<void> {
    const chunkBytes = this.#zeroChunkBytes();
    for (let done = 0; done < length; done += chunkBytes) {
      if (this.#socketClosed || this.#shutdownRequested) {
        throw Object.assign(new Error(`stopped after ${done} of ${length} bytes: connection ending`), {
          code: "ESHUTDOWN",
        });
      }
      // A fresh buffer each time: write() owns what it is given.
      await this.#ctx.device.write(offset + done, new Uint8Array(Math.min(chunkBytes, length - done)), false);
    }
    if (fua) await this.#ctx.device.flush();
  }

  /** Run the request on the device; READ resolves with the data, the rest with null. */
  async #perform(request: NbdRequest, payload: Uint8Array | null): Promise<Uint8Array | null> {
    const { device } = this.#ctx;
    const { offset, length } = request;
    const fua = (request.flags & CommandFlag.FUA) !== 0;
    switch (request.type) {
      case Command.READ: {
        const data = await device.read(offset, length);
        if (!(data instanceof Uint8Array) || data.length !== length) {
          const got = data instanceof Uint8Array ? `${data.length} bytes` : typeof data;
          throw new Error(`device read returned ${got}, expected ${length} bytes`);
        }
        return data;
      }
      case Command.WRITE:
        await device.write(offset, payload!, fua);
        return null;
      case Command.FLUSH: {
        // Snapshot taken before the first await: the writes received before this FLUSH.
        const before = [...this.#pendingWrites];
        await Promise.allSettled(before);
        await device.flush();
        return null;
      }
      case Command.TRIM:
        await device.trim(offset, length);
        if (fua) await device.flush();
        return null;
      case Command.WRITE_ZEROES:
        if ((request.flags & CommandFlag.NO_HOLE) !== 0) await this.#writeZeroesAllocated(offset, length, fua);
        else await device.writeZeroes(offset, length, fua);
        return null;
    }
    throw new Error(`unreachable: command ${request.type} passed validation`);
  }

  #complete(request: NbdRequest, errno: number, data: Uint8Array | null): void {
    const counters = this.#ctx.counters;
    if (errno !== 0) {
      counters.errors++;
    } else if (request.type === Command.READ) {
      counters.reads++;
      counters.bytesRead += request.length;
    } else if (request.type === Command.WRITE) {
      counters.writes++;
      counters.bytesWritten += request.length;
    } else if (request.type === Command.FLUSH) {
      counters.flushes++;
    } else if (request.type === Command.TRIM) {
      counters.trims++;
    } else {
      counters.zeroes++;
    }
    this.#reply(request.cookie, errno, data);
  }

  #deviceErrno(request: NbdRequest, error: unknown): number {
    const errno = nbdErrnoOf(error);
    this.#logRequest("warn", request, `failed (${nbdErrnoName(errno)}): ${messageOf(error)}`);
    return errno;
  }

  /** Once a minute per command, reason and peer (see @module). */
  #logRequest(level: "warn" | "error", request: NbdRequest, what: string): void {
    const name = COMMAND_NAMES.get(request.type) ?? `command ${request.type}`;
    const where = `offset ${request.offset} length ${request.length}`;
    this.#logRepeated(level, `${name} ${what}`, `${name} ${where} ${what}`);
  }

  /** A line about the connection's life, if this connection's life is logged (see @module). */
  #logLife(what: string): void {
    if (this.#lifeLogged) this.#ctx.log("info", `${this.#label}: ${what}`);
  }

  /** A line the client can cause at will: once a minute per kind of `what` and peer. */
  #logRepeated(level: "warn" | "error", kind: string, what: string): void {
    const line = this.#ctx.repeats.pass(`${repeatKind(kind)} ${this.#peer}`, `${this.#label}: ${what}`);
    if (line !== null) this.#ctx.log(level, line);
  }

  /** Simple reply; READ data follows the header. Dropped if the socket is gone. */
  #reply(cookie: bigint, errno: number, data: Uint8Array | null): void {
    if (this.#ending) return;
    this.#send(encodeSimpleReply(errno, cookie));
    if (data !== null) this.#send(data);
  }

  /** Queue bytes for the socket. Replies completing in the same turn of the event loop go out
   *  in one write: a syscall per 16-byte reply would cap small-request throughput. */
  #send(bytes: Uint8Array): void {
    if (this.#ending || this.#socket.destroyed) return;
    this.#outbox.push(bytes);
    this.#outboxBytes += bytes.length;
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      FLUSH_SCHEDULER(() => this.#flushOutbox());
    }
  }

  #flushOutbox(): void {
    this.#flushScheduled = false;
    const parts = this.#outbox;
    const totalBytes = this.#outboxBytes;
    this.#outbox = [];
    this.#outboxBytes = 0;
    if (parts.length === 0 || this.#socket.destroyed) return;
    let ok: boolean;
    if (parts.length === 1) {
      ok = this.#socket.write(parts[0]!);
    } else if (totalBytes <= COALESCE_BYTES_MAX) {
      ok = this.#socket.write(Buffer.concat(parts, totalBytes));
    } else {
      ok = true;
      for (const part of parts) ok = this.#socket.write(part) && ok;
    }
    if (!ok && !this.#writeBlocked) {
      this.#writeBlocked = true;
      this.#pump(); // pause reading now rather than at the next request
    } else if (ok && this.#readPaused) {
      this.#pump(); // the outbox no longer holds bytes against maxInFlightBytes
    }
  }

  // -------------------------------------------------------------------------------------------
  // Closing

  /** End our side once idle and either closing (DISC, shutdown) or the client has ended and
   *  every complete frame it sent has been answered. */
  #maybeFinish(): void {
    if (this.#ending || this.#inFlight !== 0) return;
    if (this.#state === "closing") return this.#endGracefully();
    if (!this.#peerEnded || !this.#parserDrained) return;
    const incomplete = this.#parser.incompleteFrame();
    if (incomplete !== null && this.#parser.phase !== "failed") {
      this.#logRepeated("warn", "client closed mid-frame", `client closed mid-frame: ${incomplete}`);
    }
    this.#endGracefully();
  }

  /**
   * Send what is queued, FIN, keep reading (discarding) until the peer closes or the grace
   * period passes; closing with unread input would reset the connection and lose replies. The
   * period starts once every reply was handed to the kernel ('finish'), so a client that reads
   * slowly still gets all of them (found by review: 16 MiB of READ replies to a client that
   * sent DISC and read them 7 s later were cut off after 5 s, and it got none). A server
   * shutdown does not wait for a slow reader: it starts the period at the FIN.
   */
  #endGracefully(): void {
    if (this.#ending) return;
    this.#flushOutbox();
    this.#ending = true;
    this.#socket.end(() => this.#armCloseGrace());
    if (this.#readPaused) this.#socket.resume();
    if (this.#shutdownRequested) this.#armCloseGrace();
  }

  #armCloseGrace(): void {
    if (this.#graceTimer !== null || this.#socketClosed) return;
    this.#graceTimer = setTimeout(() => this.#socket.destroy(), this.#ctx.limits.closeGraceMs);
    this.#graceTimer.unref?.();
  }

  /** The client broke the protocol: log why and disconnect (hard unless a final reply is
   *  queued). In-flight requests still finish on the device; their replies are dropped. */
  #violation(reason: string, graceful = false): void {
    if (this.#ending) return;
    this.#ctx.counters.protocolErrors++;
    this.#logRepeated("warn", `closing connection: ${reason}`, `closing connection: ${reason}`);
    if (graceful) this.#endGracefully();
    else this.#hardClose();
  }

  #hardClose(): void {
    this.#ending = true;
    this.#socket.destroy();
  }
}
