/**
 * NBD wire format (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md), the parts
 * a server speaking fixed newstyle negotiation with simple replies needs: pure encoders, decoders
 * and a stream parser for what clients send. No I/O here; `nbd_server.ts` drives the sockets.
 *
 * All integers are big-endian. 64-bit offsets are carried as JavaScript numbers: exact up to
 * 2^53, and anything larger is beyond every export we can serve, so a range check still rejects
 * it. Cookies (called "handles" in older versions of the spec) are opaque and kept as bigint so
 * they are echoed bit for bit.
 *
 * @module
 */

/** "NBDMAGIC", the first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": second greeting magic, and the magic of every option request. */
export const IHAVEOPT_MAGIC = 0x49484156454f5054n;
/** Magic of every option reply. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
/** Magic of a transmission request. */
export const REQUEST_MAGIC = 0x25609513;
/** Magic of a simple reply. */
export const SIMPLE_REPLY_MAGIC = 0x67446698;

/** Size of the server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export const GREETING_BYTES = 18;
/** Size of an option request header: magic, option, length. */
export const OPTION_HEADER_BYTES = 16;
/** Size of an option reply header: magic, option, reply type, length. */
export const OPTION_REPLY_HEADER_BYTES = 20;
/** Size of a transmission request header: magic, flags, type, cookie, offset, length. */
export const REQUEST_HEADER_BYTES = 28;
/** Size of a simple reply header: magic, error, cookie. */
export const SIMPLE_REPLY_BYTES = 16;
/** Reserved zero bytes after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was agreed. */
export const EXPORT_NAME_PADDING_BYTES = 124;
/** The spec's upper bound for any string (export names, descriptions, messages). */
export const STRING_BYTES_MAX = 4096;

/** Handshake flags sent by the server (16 bits). */
export const HandshakeFlag = {
  /** Server speaks fixed newstyle negotiation. */
  FIXED_NEWSTYLE: 1 << 0,
  /** Server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bits) sent in answer to the greeting. */
export const ClientFlag = {
  /** Client speaks fixed newstyle negotiation. */
  FIXED_NEWSTYLE: 1 << 0,
  /** Client does not want the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
  NO_ZEROES: 1 << 1,
} as const;

/** Option codes sent during option haggling. */
export const Option = {
  /** Choose an export and enter transmission; no reply on failure, only a closed connection. */
  EXPORT_NAME: 1,
  /** End negotiation; server replies ACK and closes. */
  ABORT: 2,
  /** List exports: one NBD_REP_SERVER per export, then ACK. */
  LIST: 3,
  /** Withdrawn. */
  PEEK_EXPORT: 4,
  /** Upgrade to TLS. */
  STARTTLS: 5,
  /** Describe an export (NBD_REP_INFO replies, then ACK) without entering transmission. */
  INFO: 6,
  /** Like INFO, then enter transmission after the ACK. */
  GO: 7,
  /** Ask for structured replies. */
  STRUCTURED_REPLY: 8,
  /** Metadata contexts (need structured replies). */
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  /** 64-bit request and reply headers. */
  EXTENDED_HEADERS: 11,
} as const;

/** Option reply types; errors have bit 31 set. */
export const OptionReply = {
  ACK: 1,
  /** Payload: 32-bit name length, name, optional human-readable details. */
  SERVER: 2,
  /** Payload: 16-bit info type, then type-specific data. */
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 2 ** 31 + 1,
  ERR_POLICY: 2 ** 31 + 2,
  ERR_INVALID: 2 ** 31 + 3,
  ERR_PLATFORM: 2 ** 31 + 4,
  ERR_TLS_REQD: 2 ** 31 + 5,
  ERR_UNKNOWN: 2 ** 31 + 6,
  ERR_SHUTDOWN: 2 ** 31 + 7,
  ERR_BLOCK_SIZE_REQD: 2 ** 31 + 8,
  ERR_TOO_BIG: 2 ** 31 + 9,
} as const;

/** Information types requested by and sent for NBD_OPT_INFO / NBD_OPT_GO. */
export const InfoType = {
  /** Size (64 bits) and transmission flags (16 bits). Always sent. */
  EXPORT: 0,
  /** Canonical export name. */
  NAME: 1,
  /** Human-readable description. */
  DESCRIPTION: 2,
  /** Minimum, preferred and maximum block size (32 bits each). */
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (16 bits) describing what the export supports. */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  /** FLUSH and FUA on one connection cover writes completed on every connection. */
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Transmission command types. */
export const Command = {
  READ: 0,
  /** The only command followed by a payload (when extended headers are not negotiated). */
  WRITE: 1,
  /** Soft disconnect; no reply. */
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Command flags (16 bits) in a request. */
export const CommandFlag = {
  /** Force unit access: persist before replying. Valid on every command. */
  FUA: 1 << 0,
  /** WRITE_ZEROES: do not punch a hole. */
  NO_HOLE: 1 << 1,
  /** READ: do not fragment a structured reply. */
  DF: 1 << 2,
  /** BLOCK_STATUS: one extent only. */
  REQ_ONE: 1 << 3,
  /** WRITE_ZEROES: fail fast rather than write slowly. */
  FAST_ZERO: 1 << 4,
  /** Extended headers: length is a payload length. */
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Error values in replies (the spec fixes these numbers whatever the host's errno values). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** Name of an NBD error value, for logs ("EINVAL"), or the number if unknown. */
export function nbdErrnoName(errno: number): string {
  for (const [name, value] of Object.entries(NbdErrno)) {
    if (value === errno) return name;
  }
  return String(errno);
}

/** A transmission request header as decoded from the wire. */
export interface NbdRequest {
  /** Command flags (CommandFlag bits). */
  flags: number;
  /** Command type (Command). */
  type: number;
  /** Opaque client value echoed in the reply. */
  cookie: bigint;
  /** Byte offset; exact below 2^53. */
  offset: number;
  /** Byte length (unsigned 32 bits). */
  length: number;
}

/** Raised by the decoders and the parser when a peer breaks the framing. */
export class NbdProtocolError extends Error {
  override name = "NbdProtocolError";
}

const EMPTY = new Uint8Array(0);
const TWO_POW_32 = 2 ** 32;
const textEncoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

function hex(value: number | bigint): string {
  return "0x" + value.toString(16);
}

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function setUint64(view: DataView, at: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`Cannot encode 64-bit value: '${value}' is not a safe unsigned integer`);
  }
  view.setUint32(at, Math.floor(value / TWO_POW_32));
  view.setUint32(at + 4, value % TWO_POW_32);
}

function getUint64(view: DataView, at: number): number {
  return view.getUint32(at) * TWO_POW_32 + view.getUint32(at + 4);
}

function assertUint(value: number, bits: 16 | 32, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** bits) {
    throw new RangeError(`Cannot encode ${what}: '${value}' is not an unsigned ${bits}-bit int`);
  }
}

/** UTF-8 bytes of a spec string, refusing NUL and anything over 4096 bytes. */
export function encodeNbdString(text: string, what: string): Uint8Array {
  const bytes = textEncoder.encode(text);
  if (bytes.length > STRING_BYTES_MAX || bytes.includes(0)) {
    const why = `${quoteBounded(text)} has a NUL or exceeds 4096 bytes`;
    throw new RangeError(`Cannot encode ${what}: ${why}`);
  }
  return bytes;
}

/** Characters of a peer's string kept by quoteBounded: the spec's advised string length. */
export const QUOTED_CHARS_MAX = 256;

/**
 * `text` in single quotes for a message or a log line, cut to QUOTED_CHARS_MAX characters with
 * an ellipsis: a peer's string may be 4096 bytes, which would overflow a reply message that
 * quotes it and flood the log. At most 3 * QUOTED_CHARS_MAX + 5 UTF-8 bytes.
 */
export function quoteBounded(text: string): string {
  if (text.length <= QUOTED_CHARS_MAX) return `'${text}'`;
  let end = QUOTED_CHARS_MAX;
  const last = text.charCodeAt(end - 1);
  if (last >= 0xd800 && last <= 0xdbff) end--; // do not split a surrogate pair
  return `'${text.slice(0, end)}…'`;
}

// ---------------------------------------------------------------------------------------------
// Handshake: server side encoders

/** The server's greeting: NBDMAGIC, IHAVEOPT and the 16-bit handshake flags. */
export function encodeGreeting(handshakeFlags: number): Uint8Array {
  assertUint(handshakeFlags, 16, "handshake flags");
  const bytes = new Uint8Array(GREETING_BYTES);
  const view = viewOf(bytes);
  view.setBigUint64(0, NBD_MAGIC);
  view.setBigUint64(8, IHAVEOPT_MAGIC);
  view.setUint16(16, handshakeFlags);
  return bytes;
}

/** An option reply: header plus optional payload, in one buffer. */
export function encodeOptionReply(
  option: number,
  replyType: number,
  data: Uint8Array = EMPTY,
): Uint8Array {
  assertUint(option, 32, "option");
  assertUint(replyType, 32, "option reply type");
  const bytes = new Uint8Array(OPTION_REPLY_HEADER_BYTES + data.length);
  const view = viewOf(bytes);
  view.setBigUint64(0, OPTION_REPLY_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, replyType);
  view.setUint32(16, data.length);
  bytes.set(data, OPTION_REPLY_HEADER_BYTES);
  return bytes;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeros unless noZeroes. */
export function encodeExportNameReply(
  sizeBytes: number,
  transmissionFlags: number,
  noZeroes: boolean,
): Uint8Array {
  assertUint(transmissionFlags, 16, "transmission flags");
  const bytes = new Uint8Array(10 + (noZeroes ? 0 : EXPORT_NAME_PADDING_BYTES));
  const view = viewOf(bytes);
  setUint64(view, 0, sizeBytes);
  view.setUint16(8, transmissionFlags);
  return bytes;
}

/** Payload of NBD_REP_SERVER: name length, name, optional details text. */
export function encodeServerReplyData(name: string, details = ""): Uint8Array {
  const nameBytes = encodeNbdString(name, "export name");
  const detailBytes = encodeNbdString(details, "export details");
  const bytes = new Uint8Array(4 + nameBytes.length + detailBytes.length);
  viewOf(bytes).setUint32(0, nameBytes.length);
  bytes.set(nameBytes, 4);
  bytes.set(detailBytes, 4 + nameBytes.length);
  return bytes;
}

/** Payload of NBD_REP_INFO / NBD_INFO_EXPORT: type, 64-bit size, transmission flags. */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Uint8Array {
  assertUint(transmissionFlags, 16, "transmission flags");
  const bytes = new Uint8Array(12);
  const view = viewOf(bytes);
  view.setUint16(0, InfoType.EXPORT);
  setUint64(view, 2, sizeBytes);
  view.setUint16(10, transmissionFlags);
  return bytes;
}

/** Payload of NBD_REP_INFO carrying a string: NBD_INFO_NAME or NBD_INFO_DESCRIPTION. */
export function encodeInfoString(infoType: number, text: string): Uint8Array {
  const textBytes = encodeNbdString(text, "info string");
  const bytes = new Uint8Array(2 + textBytes.length);
  viewOf(bytes).setUint16(0, infoType);
  bytes.set(textBytes, 2);
  return bytes;
}

/** Payload of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum. */
export function encodeInfoBlockSize(
  minimumBytes: number,
  preferredBytes: number,
  maximumBytes: number,
): Uint8Array {
  assertUint(minimumBytes, 32, "minimum block size");
  assertUint(preferredBytes, 32, "preferred block size");
  assertUint(maximumBytes, 32, "maximum block size");
  const bytes = new Uint8Array(14);
  const view = viewOf(bytes);
  view.setUint16(0, InfoType.BLOCK_SIZE);
  view.setUint32(2, minimumBytes);
  view.setUint32(6, preferredBytes);
  view.setUint32(10, maximumBytes);
  return bytes;
}

/** What an NBD_OPT_INFO / NBD_OPT_GO asks for. */
export interface InfoRequest {
  /** Export name, "" for the default export. */
  name: string;
  /** Requested NBD_INFO_* types, in the client's order. */
  infoTypes: number[];
}

/**
 * Decode the data of NBD_OPT_INFO / NBD_OPT_GO: name length, name, count, 16-bit info types.
 * Throws NbdProtocolError if the lengths do not add up or the name is not valid UTF-8; the
 * framing is still intact then, so the caller answers NBD_REP_ERR_INVALID.
 */
export function decodeInfoRequest(data: Uint8Array): InfoRequest {
  const view = viewOf(data);
  if (data.length < 6) {
    throw new NbdProtocolError(`Cannot decode info request: ${data.length} bytes is too short`);
  }
  const nameBytes = view.getUint32(0);
  if (nameBytes > data.length - 6) {
    throw new NbdProtocolError(
      `Cannot decode info request: name length ${nameBytes} exceeds data length ${data.length}`,
    );
  }
  const count = view.getUint16(4 + nameBytes);
  const expectedBytes = 6 + nameBytes + 2 * count;
  if (expectedBytes !== data.length) {
    throw new NbdProtocolError(
      `Cannot decode info request: expected ${expectedBytes} bytes, got ${data.length}`,
    );
  }
  const name = decodeNbdString(data.subarray(4, 4 + nameBytes), "export name");
  const infoTypes: number[] = [];
  for (let i = 0; i < count; i++) infoTypes.push(view.getUint16(6 + nameBytes + 2 * i));
  return { name, infoTypes };
}

/** Decode a spec string (UTF-8, no NUL, at most 4096 bytes); throws NbdProtocolError. */
export function decodeNbdString(bytes: Uint8Array, what: string): string {
  if (bytes.length > STRING_BYTES_MAX) {
    throw new NbdProtocolError(`Cannot decode ${what}: ${bytes.length} bytes exceeds 4096`);
  }
  let text: string;
  try {
    text = strictDecoder.decode(bytes);
  } catch {
    throw new NbdProtocolError(`Cannot decode ${what}: not valid UTF-8`);
  }
  if (text.includes("\0")) throw new NbdProtocolError(`Cannot decode ${what}: contains NUL`);
  return text;
}

// ---------------------------------------------------------------------------------------------
// Transmission: request and simple reply

/** Encode a request header (client side; the server uses it in tests). */
export function encodeRequest(request: NbdRequest): Uint8Array {
  assertUint(request.flags, 16, "command flags");
  assertUint(request.type, 16, "command type");
  assertUint(request.length, 32, "request length");
  const bytes = new Uint8Array(REQUEST_HEADER_BYTES);
  const view = viewOf(bytes);
  view.setUint32(0, REQUEST_MAGIC);
  view.setUint16(4, request.flags);
  view.setUint16(6, request.type);
  view.setBigUint64(8, BigInt.asUintN(64, request.cookie));
  setUint64(view, 16, request.offset);
  view.setUint32(24, request.length);
  return bytes;
}

/** Decode a 28-byte request header at `at`; throws NbdProtocolError on bad magic. */
export function decodeRequest(bytes: Uint8Array, at = 0): NbdRequest {
  if (bytes.length - at < REQUEST_HEADER_BYTES) {
    throw new NbdProtocolError(
      `Cannot decode request: ${bytes.length - at} bytes is shorter than a header`,
    );
  }
  const view = viewOf(bytes);
  const magic = view.getUint32(at);
  if (magic !== REQUEST_MAGIC) {
    throw new NbdProtocolError(
      `Cannot decode request: bad magic ${hex(magic)} (expected ${hex(REQUEST_MAGIC)})`,
    );
  }
  return {
    flags: view.getUint16(at + 4),
    type: view.getUint16(at + 6),
    cookie: view.getBigUint64(at + 8),
    offset: getUint64(view, at + 16),
    length: view.getUint32(at + 24),
  };
}

/** A simple reply header: magic, error (0 for success), cookie. READ data follows it. */
export function encodeSimpleReply(errno: number, cookie: bigint): Uint8Array {
  assertUint(errno, 32, "reply error");
  const bytes = new Uint8Array(SIMPLE_REPLY_BYTES);
  const view = viewOf(bytes);
  view.setUint32(0, SIMPLE_REPLY_MAGIC);
  view.setUint32(4, errno);
  view.setBigUint64(8, cookie);
  return bytes;
}

/** Decode a simple reply header (client side, for tests); throws NbdProtocolError. */
export function decodeSimpleReply(bytes: Uint8Array): { errno: number; cookie: bigint } {
  if (bytes.length < SIMPLE_REPLY_BYTES) {
    throw new NbdProtocolError(`Cannot decode simple reply: only ${bytes.length} bytes`);
  }
  const view = viewOf(bytes);
  const magic = view.getUint32(0);
  if (magic !== SIMPLE_REPLY_MAGIC) {
    throw new NbdProtocolError(`Cannot decode simple reply: bad magic ${hex(magic)}`);
  }
  return { errno: view.getUint32(4), cookie: view.getBigUint64(8) };
}

// ---------------------------------------------------------------------------------------------
// Client side of the handshake (used by tests and tools that probe a server)

/** Encode the client's 32-bit flags. */
export function encodeClientFlags(flags: number): Uint8Array {
  assertUint(flags, 32, "client flags");
  const bytes = new Uint8Array(4);
  viewOf(bytes).setUint32(0, flags);
  return bytes;
}

/** Encode an option request: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Uint8Array = EMPTY): Uint8Array {
  assertUint(option, 32, "option");
  const bytes = new Uint8Array(OPTION_HEADER_BYTES + data.length);
  const view = viewOf(bytes);
  view.setBigUint64(0, IHAVEOPT_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, data.length);
  bytes.set(data, OPTION_HEADER_BYTES);
  return bytes;
}

/** Encode the data of NBD_OPT_INFO / NBD_OPT_GO. */
export function encodeInfoRequest(request: InfoRequest): Uint8Array {
  const nameBytes = encodeNbdString(request.name, "export name");
  const bytes = new Uint8Array(6 + nameBytes.length + 2 * request.infoTypes.length);
  const view = viewOf(bytes);
  view.setUint32(0, nameBytes.length);
  bytes.set(nameBytes, 4);
  assertUint(request.infoTypes.length, 16, "info request count");
  view.setUint16(4 + nameBytes.length, request.infoTypes.length);
  request.infoTypes.forEach((infoType, i) => {
    assertUint(infoType, 16, "info type");
    view.setUint16(6 + nameBytes.length + 2 * i, infoType);
  });
  return bytes;
}

/** Decode the server greeting; returns the handshake flags. Throws NbdProtocolError. */
export function decodeGreeting(bytes: Uint8Array): number {
  if (bytes.length < GREETING_BYTES) {
    throw new NbdProtocolError(`Cannot decode greeting: only ${bytes.length} bytes`);
  }
  const view = viewOf(bytes);
  const magic = view.getBigUint64(0);
  const optMagic = view.getBigUint64(8);
  if (magic !== NBD_MAGIC || optMagic !== IHAVEOPT_MAGIC) {
    throw new NbdProtocolError(
      `Cannot decode greeting: bad magic ${hex(magic)} ${hex(optMagic)}`,
    );
  }
  return view.getUint16(16);
}

/** Decode an option reply header; `length` payload bytes follow it. Throws NbdProtocolError. */
export function decodeOptionReplyHeader(
  bytes: Uint8Array,
): { option: number; replyType: number; length: number } {
  if (bytes.length < OPTION_REPLY_HEADER_BYTES) {
    throw new NbdProtocolError(`Cannot decode option reply: only ${bytes.length} bytes`);
  }
  const view = viewOf(bytes);
  const magic = view.getBigUint64(0);
  if (magic !== OPTION_REPLY_MAGIC) {
    throw new NbdProtocolError(`Cannot decode option reply: bad magic ${hex(magic)}`);
  }
  return { option: view.getUint32(8), replyType: view.getUint32(12), length: view.getUint32(16) };
}

// ---------------------------------------------------------------------------------------------
// Stream parser for what a client sends

/** One complete unit of client input, in wire order. */
export type NbdClientFrame =
  | { kind: "clientFlags"; flags: number }
  | { kind: "option"; option: number; data: Uint8Array }
  /** Option data longer than maxOptionBytes; the parser stops, the server closes (after an
   *  NBD_REP_ERR_TOO_BIG reply unless the option is NBD_OPT_EXPORT_NAME, which gets none). */
  | { kind: "optionTooBig"; option: number; lengthBytes: number }
  /** A request; `payload` holds the data of a WRITE (exactly `length` bytes), else null. */
  | { kind: "request"; request: NbdRequest; payload: Uint8Array | null }
  /** A WRITE longer than maxPayloadBytes: its payload was skipped without being stored. */
  | { kind: "oversizedWrite"; request: NbdRequest };

/** Where the parser is: it reads client flags, then options, then (when told) requests. */
export type NbdParserPhase = "clientFlags" | "options" | "transmission" | "failed";

/**
 * Buffers a device lends for WRITE payloads (the primary's request slots, lib/request_slots.ts).
 * One taken and not passed to the device's write() goes back by give().
 */
export interface ReceiveBuffers {
  /** A buffer of `bytes`, or null to use a fresh one. */
  take(bytes: number): Uint8Array | null;
  /** Whether `view` is a buffer take() handed out and nobody took over. */
  owns(view: Uint8Array): boolean;
  give(view: Uint8Array): void;
}

/** Bounds checked before anything is allocated. */
export interface NbdServerParserOptions {
  /** Largest option data accepted (longer → an optionTooBig frame). */
  maxOptionBytes: number;
  /** Largest WRITE payload stored (longer → skipped, an oversizedWrite frame). */
  maxPayloadBytes: number;
  /** WRITE payloads are received into its buffers where it serves their size. */
  pool?: ReceiveBuffers | null;
}

interface PendingPayload {
  request: NbdRequest;
  /** Destination of the payload, or null when it is being skipped. */
  buffer: Uint8Array | null;
  filledBytes: number;
}

const CHUNKS_COMPACT_MIN = 64;

/**
 * Turns the bytes a client sends, in chunks of any size, into frames. Push chunks, then call
 * next() until it returns null. It keeps leftover bytes between calls, views small headers in
 * place (copying only a header split across chunks), and copies each WRITE payload exactly
 * once, into a buffer of the declared length allocated when the header arrives. A framing
 * violation throws NbdProtocolError and leaves the parser in phase "failed".
 */
export class NbdServerParser {
  readonly #options: NbdServerParserOptions;
  #chunks: Uint8Array[] = [];
  /** Index of the first chunk with unconsumed bytes. */
  #first = 0;
  /** Bytes already consumed from #chunks[#first]. */
  #head = 0;
  #bufferedBytes = 0;
  #phase: NbdParserPhase = "clientFlags";
  #pending: PendingPayload | null = null;
  readonly #scratch = new Uint8Array(REQUEST_HEADER_BYTES);

  /** Create a parser expecting the client flags first. */
  constructor(options: NbdServerParserOptions) {
    if (!(options.maxOptionBytes >= 0 && options.maxPayloadBytes >= 0)) {
      throw new RangeError(`Cannot create parser: bad limits '${JSON.stringify(options)}'`);
    }
    this.#options = { ...options };
  }

  /** Current phase. */
  get phase(): NbdParserPhase {
    return this.#phase;
  }

  /** Bytes received but not yet turned into frames (excluding a payload being collected). */
  get bufferedBytes(): number {
    return this.#bufferedBytes;
  }

  /** Add received bytes. The chunk is referenced, not copied, until consumed. */
  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#bufferedBytes += chunk.length;
  }

  /** Switch from options to requests (after NBD_OPT_EXPORT_NAME or a successful NBD_OPT_GO). */
  enterTransmission(): void {
    if (this.#phase !== "options") {
      throw new Error(`Cannot enter transmission: parser is in phase '${this.#phase}'`);
    }
    this.#phase = "transmission";
  }

  /** The next complete frame, or null if more bytes are needed (or the parser failed). */
  next(): NbdClientFrame | null {
    try {
      switch (this.#phase) {
        case "clientFlags":
          return this.#nextClientFlags();
        case "options":
          return this.#nextOption();
        case "transmission":
          return this.#nextRequest();
        case "failed":
          return null;
      }
    } catch (error) {
      this.#phase = "failed";
      throw error;
    }
  }

  /** Gives back the buffer of a WRITE payload still being received (the connection ended). */
  discardPending(): void {
    const buffer = this.#pending?.buffer;
    this.#pending = null;
    if (buffer && this.#options.pool?.owns(buffer)) this.#options.pool.give(buffer);
  }

  /** If input stopped in the middle of a frame, what was left incomplete; else null. */
  incompleteFrame(): string | null {
    const pending = this.#pending;
    if (pending !== null) {
      return `WRITE payload incomplete: ${pending.filledBytes} of ${pending.request.length} bytes`;
    }
    if (this.#bufferedBytes === 0) return null;
    const what = { clientFlags: "client flags", options: "option", transmission: "request" };
    const frame = this.#phase === "failed" ? "frame" : what[this.#phase];
    return `${this.#bufferedBytes} bytes of an incomplete ${frame}`;
  }

  #nextClientFlags(): NbdClientFrame | null {
    if (this.#bufferedBytes < 4) return null;
    const flags = viewOf(this.#peek(4)).getUint32(0);
    this.#consume(4);
    this.#phase = "options";
    return { kind: "clientFlags", flags };
  }

  #nextOption(): NbdClientFrame | null {
    if (this.#bufferedBytes >= 8) {
      const magic = viewOf(this.#peek(8)).getBigUint64(0);
      if (magic !== IHAVEOPT_MAGIC) {
        throw new NbdProtocolError(
          `Cannot parse option: bad magic ${hex(magic)} (expected ${hex(IHAVEOPT_MAGIC)})`,
        );
      }
    }
    if (this.#bufferedBytes < OPTION_HEADER_BYTES) return null;
    const view = viewOf(this.#peek(OPTION_HEADER_BYTES));
    const option = view.getUint32(8);
    const lengthBytes = view.getUint32(12);
    if (lengthBytes > this.#options.maxOptionBytes) {
      this.#consume(OPTION_HEADER_BYTES);
      this.#phase = "failed";
      return { kind: "optionTooBig", option, lengthBytes };
    }
    if (this.#bufferedBytes < OPTION_HEADER_BYTES + lengthBytes) return null;
    this.#consume(OPTION_HEADER_BYTES);
    const data = new Uint8Array(lengthBytes);
    this.#copyOut(data, 0, lengthBytes);
    return { kind: "option", option, data };
  }

  #nextRequest(): NbdClientFrame | null {
    if (this.#pending === null) {
      if (this.#bufferedBytes >= 4) {
        const magic = viewOf(this.#peek(4)).getUint32(0);
        if (magic !== REQUEST_MAGIC) {
          throw new NbdProtocolError(
            `Cannot parse request: bad magic ${hex(magic)} (expected ${hex(REQUEST_MAGIC)})`,
          );
        }
      }
      if (this.#bufferedBytes < REQUEST_HEADER_BYTES) return null;
      const request = decodeRequest(this.#peek(REQUEST_HEADER_BYTES));
      this.#consume(REQUEST_HEADER_BYTES);
      if (request.type !== Command.WRITE) return { kind: "request", request, payload: null };
      const stored = request.length <= this.#options.maxPayloadBytes;
      // Not zeroed: every byte is received before the payload is handed out (memset was
      // 6% of the event loop's time under 1 MiB writes).
      const buffer = stored ? this.#options.pool?.take(request.length) ?? Bun.allocUnsafe(request.length) : null;
      this.#pending = { request, buffer, filledBytes: 0 };
    }
    return this.#fillPayload(this.#pending);
  }

  #fillPayload(pending: PendingPayload): NbdClientFrame | null {
    const wanted = pending.request.length - pending.filledBytes;
    const n = Math.min(wanted, this.#bufferedBytes);
    if (pending.buffer === null) this.#consume(n);
    else this.#copyOut(pending.buffer, pending.filledBytes, n);
    pending.filledBytes += n;
    if (pending.filledBytes < pending.request.length) return null;
    this.#pending = null;
    if (pending.buffer === null) return { kind: "oversizedWrite", request: pending.request };
    return { kind: "request", request: pending.request, payload: pending.buffer };
  }

  /** View the next n buffered bytes without consuming them (n <= header size). */
  #peek(n: number): Uint8Array {
    const chunk = this.#chunks[this.#first]!;
    if (chunk.length - this.#head >= n) return chunk.subarray(this.#head, this.#head + n);
    let copied = 0;
    for (let i = this.#first; copied < n; i++) {
      const c = this.#chunks[i]!;
      const from = i === this.#first ? this.#head : 0;
      const take = Math.min(n - copied, c.length - from);
      this.#scratch.set(c.subarray(from, from + take), copied);
      copied += take;
    }
    return this.#scratch.subarray(0, n);
  }

  /** Copy n buffered bytes into target[at...] and consume them. */
  #copyOut(target: Uint8Array, at: number, n: number): void {
    let copied = 0;
    while (copied < n) {
      const chunk = this.#chunks[this.#first]!;
      const take = Math.min(n - copied, chunk.length - this.#head);
      target.set(chunk.subarray(this.#head, this.#head + take), at + copied);
      copied += take;
      this.#consume(take);
    }
  }

  /** Drop n buffered bytes. */
  #consume(n: number): void {
    this.#bufferedBytes -= n;
    let left = n;
    while (left > 0) {
      const available = this.#chunks[this.#first]!.length - this.#head;
      if (left < available) {
        this.#head += left;
        return;
      }
      left -= available;
      this.#first++;
      this.#head = 0;
    }
    if (this.#first === this.#chunks.length) {
      this.#chunks = [];
      this.#first = 0;
    } else if (this.#first >= CHUNKS_COMPACT_MIN) {
      this.#chunks = this.#chunks.slice(this.#first);
      this.#first = 0;
    }
  }
}
