/**
 * The control socket between `hast` commands and the daemon (hastctl ↔
 * hastd): a Unix socket, mode 0600, carrying one JSON request and one JSON
 * response per connection, each a single line.
 */
import net from "node:net";

/** Largest request or response line. */
export const MAX_CONTROL_BYTES = 4 * 1024 * 1024;

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
      try {
        resolve(JSON.parse(input) as ControlResponse);
      } catch {
        reject(new Error(`Cannot talk to the daemon at "${path}": malformed response`));
      }
    });
  });
}

/** Serves control requests on `path` with `handler`; one request per connection. */
export function controlServer(
  handler: (request: ControlRequest) => Promise<ControlResponse>,
  log: (level: "warn", message: string) => void,
): net.Server {
  return net.createServer((socket) => {
    let input = "";
    socket.setEncoding("utf8");
    socket.on("error", () => {});
    socket.on("data", (chunk: string) => {
      input += chunk;
      if (input.length > MAX_CONTROL_BYTES) {
        log("warn", `control request over ${MAX_CONTROL_BYTES} bytes; closing`);
        socket.destroy();
        return;
      }
      const newline = input.indexOf("\n");
      if (newline < 0) return;
      let request: ControlRequest;
      try {
        request = JSON.parse(input.slice(0, newline)) as ControlRequest;
      } catch {
        socket.end(JSON.stringify({ ok: false, error: "malformed control request", exitCode: 64 }));
        return;
      }
      handler(request)
        .catch((error: Error) => ({ ok: false as const, error: error.message, exitCode: 70 }))
        .then((response) => socket.end(JSON.stringify(response) + "\n"));
    });
  });
}
