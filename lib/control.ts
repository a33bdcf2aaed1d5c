/**
 * The control socket between `hast` commands and the daemon (hastctl ↔
 * hastd): a Unix socket, mode 0600, carrying one JSON request and one JSON
 * response per connection, each a single line.
 */
import net from "node:net";

/** Largest request or response line. */
export const MAX_CONTROL_BYTES = 4 * 1024 * 1024;
/**
 * How long a control connection may take to send its request line (a `hast` command
 * sends it at once), and to close once answered.
 */
export const CONTROL_TIMEOUT_MS = 10_000;
/**
 * Control connections served at once; one more is answered with an error and closed. Each may
 * hold up to MAX_CONTROL_BYTES for CONTROL_TIMEOUT_MS, so this bounds the daemon's memory.
 */
export const MAX_CONTROL_CONNECTIONS = 64;

export interface ControlRequest {
  command: "role" | "status" | "list" | "syncrate" | "discard" | "verify" | "ping";
  names?: string[];
  role?: "init" | "primary" | "secondary";
  force?: boolean;
  bytesPerSecond?: number;
}

export type ControlResponse =
  | { ok: true; value: unknown }
  | { ok: false; error: string; exitCode: number };

/** Sends one request to the daemon at `path` and returns its response. */
export function controlRequest(
  path: string, request: ControlRequest, timeoutMs = 120_000,
): Promise<ControlResponse> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(path);
    let input = "";
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`Cannot talk to the daemon at "${path}": no answer in ${timeoutMs} ms`));
    }, timeoutMs);
    socket.setEncoding("utf8");
    socket.on("connect", () => socket.write(JSON.stringify(request) + "\n"));
    socket.on("data", (chunk: string) => {
      input += chunk;
      if (input.length > MAX_CONTROL_BYTES) socket.destroy(new Error("response too large"));
    });
    socket.on("error", (error) => {
      clearTimeout(timer);
      reject(new Error(`Cannot talk to the daemon at "${path}": ${error.message}`));
    });
    socket.on("end", () => {
      clearTimeout(timer);
      let response: unknown;
      try {
        response = JSON.parse(input);
      } catch {
        response = undefined;
      }
      if (isResponse(response)) resolve(response);
      else reject(new Error(`Cannot talk to the daemon at "${path}": malformed response`));
    });
  });
}

/**
 * Whether a parsed answer has the shape of a ControlResponse, with an error's exit code in
 * 1..255 (found by review: an answer `null` made the CLI fail with "Cannot read properties of
 * null", and a refusal with exit code 0 made it exit 0).
 */
function isResponse(value: unknown): value is ControlResponse {
  if (typeof value !== "object" || value === null) return false;
  const r = value as Record<string, unknown>;
  if (r.ok === true) return true;
  return r.ok === false && typeof r.error === "string" &&
    Number.isInteger(r.exitCode) && (r.exitCode as number) >= 1 && (r.exitCode as number) <= 255;
}

export interface ControlServerOptions {
  /** See CONTROL_TIMEOUT_MS, the default. */
  timeoutMs?: number;
  /** See MAX_CONTROL_CONNECTIONS, the default. */
  maxConnections?: number;
}

/**
 * Serves control requests with `handler`: one request line per connection, and at most
 * MAX_CONTROL_BYTES in all. Bytes after the first newline are read and dropped (never
 * parsed, never run again); they are drained rather than left unread because closing a
 * Unix socket with unread input resets the peer, which could lose the answer.
 * A connection is closed if its request line is not complete `timeoutMs` after it
 * connected (silent or trickling), or if it is still open `timeoutMs` after its answer;
 * in between, the handler may take as long as it needs.
 */
export function controlServer(
  handler: (request: ControlRequest) => Promise<ControlResponse>,
  log: (level: "warn", message: string) => void,
  options: ControlServerOptions = {},
): net.Server {
  const timeoutMs = options.timeoutMs ?? CONTROL_TIMEOUT_MS;
  const maxConnections = options.maxConnections ?? MAX_CONTROL_CONNECTIONS;
  let connections = 0;
  return net.createServer((socket) => {
    if (connections >= maxConnections) {
      log("warn", `control connection refused: ${maxConnections} connections open`);
      socket.on("error", () => {});
      socket.end(JSON.stringify({
        ok: false, error: `the daemon is busy: ${maxConnections} control connections open; try again`, exitCode: 75,
      }) + "\n");
      socket.resume(); // drain what it sends, so the answer is not lost to a reset
      setTimeout(() => socket.destroy(), timeoutMs).unref?.();
      return;
    }
    connections++;
    socket.once("close", () => connections--);
    const chunks: Buffer[] = [];
    let receivedBytes = 0;
    let lineSeen = false;
    const closeAfter = (what: string) => setTimeout(() => {
      log("warn", `control connection ${what} in ${timeoutMs} ms; closing`);
      socket.destroy();
    }, timeoutMs);
    let deadline = closeAfter("sent no complete request");
    socket.on("close", () => clearTimeout(deadline));
    socket.on("error", () => {});
    socket.on("data", (chunk: Buffer) => {
      receivedBytes += chunk.length;
      if (receivedBytes > MAX_CONTROL_BYTES) {
        log("warn", `control request over ${MAX_CONTROL_BYTES} bytes; closing`);
        socket.destroy();
        return;
      }
      if (lineSeen) return;
      const newline = chunk.indexOf(0x0a);
      if (newline < 0) {
        chunks.push(chunk);
        return;
      }
      lineSeen = true;
      clearTimeout(deadline);
      chunks.push(chunk.subarray(0, newline));
      const line = Buffer.concat(chunks).toString("utf8");
      chunks.length = 0;
      answer(line, socket, handler).catch((error: Error) => {
        log("warn", `control request failed: ${error.message}`);
        socket.destroy();
      }).finally(() => {
        if (!socket.destroyed) deadline = closeAfter("did not close after its answer");
      });
    });
  });
}

/** Parses one request line, runs it, and sends the response and end of stream. */
async function answer(
  line: string, socket: net.Socket, handler: (request: ControlRequest) => Promise<ControlResponse>,
): Promise<void> {
  let request: ControlRequest;
  try {
    request = JSON.parse(line) as ControlRequest;
  } catch {
    socket.end(JSON.stringify({ ok: false, error: "malformed control request", exitCode: 64 }) + "\n");
    return;
  }
  const invalid = requestError(request);
  if (invalid !== null) {
    socket.end(JSON.stringify({ ok: false, error: `malformed control request: ${invalid}`, exitCode: 64 }) + "\n");
    return;
  }
  const response = await handler(request)
    .catch((error: Error) => ({ ok: false as const, error: error.message, exitCode: 70 }));
  socket.end(encodeAnswer(response) + "\n");
}

const ROLES: readonly unknown[] = ["init", "primary", "secondary"];

/**
 * What is wrong with a parsed request's fields, or null (found by review: a role request with a
 * misspelt role stopped the resource's worker and was answered ok).
 */
export function requestError(request: unknown): string | null {
  if (typeof request !== "object" || request === null || Array.isArray(request)) return "not a JSON object";
  const r = request as Record<string, unknown>;
  if (typeof r.command !== "string") return "no command";
  if (r.names !== undefined && (!Array.isArray(r.names) || !r.names.every((n) => typeof n === "string"))) {
    return "names must be a list of resource names";
  }
  if (r.command === "role" && !ROLES.includes(r.role)) {
    return `role ${JSON.stringify(r.role ?? null)} is not init, primary or secondary`;
  }
  if (r.force !== undefined && typeof r.force !== "boolean") return "force must be true or false";
  if (r.bytesPerSecond !== undefined &&
    (typeof r.bytesPerSecond !== "number" || !Number.isFinite(r.bytesPerSecond) || r.bytesPerSecond < 0)) {
    return "bytesPerSecond must be a number ≥ 0";
  }
  return null;
}

/**
 * The answer's JSON, or an error in its place when it cannot be encoded or exceeds
 * MAX_CONTROL_BYTES (the client would refuse it): the client always gets an answer.
 */
export function encodeAnswer(response: ControlResponse): string {
  let text: string;
  try {
    text = JSON.stringify(response);
  } catch (error) {
    return JSON.stringify({ ok: false, error: `Cannot encode the answer: ${(error as Error).message}`, exitCode: 70 });
  }
  if (Buffer.byteLength(text) < MAX_CONTROL_BYTES) return text; // and the newline
  return JSON.stringify({
    ok: false, exitCode: 70,
    error: `Cannot send the answer: ${Buffer.byteLength(text)} bytes exceed ${MAX_CONTROL_BYTES}; name fewer resources`,
  });
}
