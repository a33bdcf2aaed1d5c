import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { controlRequest, controlServer, type ControlRequest, type ControlResponse } from "./control.ts";

const dir = mkdtempSync(join(tmpdir(), "hast-control-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let sockets = 0;

interface Served {
  path: string;
  requests: ControlRequest[];
  logs: string[];
  connections(): Promise<number>;
  close(): Promise<void>;
}

/** A control server on a fresh Unix socket whose handler records each request and answers after `delayMs`. */
async function serve(
  options: { delayMs?: number; timeoutMs?: number; maxConnections?: number } = {},
): Promise<Served> {
  const path = join(dir, `c${sockets++}.sock`);
  const requests: ControlRequest[] = [];
  const logs: string[] = [];
  const handler = async (request: ControlRequest): Promise<ControlResponse> => {
    requests.push(request);
    await Bun.sleep(options.delayMs ?? 0);
    return { ok: true, value: requests.length };
  };
  const log = (level: string, message: string) => logs.push(`${level}: ${message}`);
  const server = controlServer(handler, log, { timeoutMs: options.timeoutMs, maxConnections: options.maxConnections });
  await new Promise<void>((resolve) => server.listen(path, () => resolve()));
  const close = () => new Promise<void>((resolve) => server.close(() => resolve()));
  const connections = () =>
    new Promise<number>((resolve, reject) => server.getConnections((e, n) => (e ? reject(e) : resolve(n))));
  return { path, requests, logs, connections, close };
}

/** Connects a raw client; resolves with everything the server sent once the connection ends. */
function rawClient(path: string, allowHalfOpen = false): { socket: net.Socket; done: Promise<string> } {
  const socket = net.connect({ path, allowHalfOpen });
  let input = "";
  socket.setEncoding("utf8");
  socket.on("data", (chunk: string) => (input += chunk));
  const done = new Promise<string>((resolve) => {
    socket.on("error", () => {});
    socket.on("close", () => resolve(input));
  });
  return { socket, done };
}

test("bytes after the request line do not run the request again", async () => {
  // The request line arrives, then (while the handler is still busy) a space and a
  // whole second line in separate writes; each chunk used to re-parse the first line.
  const served = await serve({ delayMs: 150 });
  const client = rawClient(served.path);
  client.socket.write(JSON.stringify({ command: "role", role: "secondary", names: ["r"] }) + "\n");
  await Bun.sleep(30);
  client.socket.write(" ");
  await Bun.sleep(30);
  client.socket.write(JSON.stringify({ command: "ping" }) + "\n");
  const answer = await client.done;
  expect(served.requests).toEqual([{ command: "role", role: "secondary", names: ["r"] }]);
  expect(JSON.parse(answer)).toEqual({ ok: true, value: 1 });
  await Bun.sleep(200);
  expect(served.requests.length).toBe(1);
  await served.close();
});

test("a client that never finishes its request line is disconnected after the timeout", async () => {
  // Half a request and then silence: the server closes the connection instead of holding it forever.
  const served = await serve({ timeoutMs: 100 });
  const client = rawClient(served.path);
  client.socket.write('{"command":');
  const closed = await Promise.race([client.done.then(() => true), Bun.sleep(2000).then(() => false)]);
  client.socket.destroy();
  expect(closed).toBe(true);
  expect(served.requests).toEqual([]);
  expect(served.logs.some((line) => line.startsWith("warn:") && line.includes("100 ms"))).toBe(true);
  await served.close();
});

test("the timeout does not cut off a request whose handler takes longer", async () => {
  // The timeout only bounds the wait for the request line, not the work it starts.
  const served = await serve({ timeoutMs: 50, delayMs: 300 });
  const response = await controlRequest(served.path, { command: "ping" }, 5000);
  expect(response).toEqual({ ok: true, value: 1 });
  await served.close();
});

test("a client that stays open after its answer is disconnected after the timeout", async () => {
  // A half-open client (it never closes its side) does not hold the server's connection
  // forever either: the server's count of connections drops to 0.
  const served = await serve({ timeoutMs: 100 });
  const client = rawClient(served.path, true);
  client.socket.write(JSON.stringify({ command: "ping" }) + "\n");
  await Bun.sleep(50);
  expect(await served.connections()).toBe(1);
  await Bun.sleep(300);
  expect(await served.connections()).toBe(0);
  expect(served.logs.some((line) => line.includes("did not close after its answer"))).toBe(true);
  client.socket.destroy();
  expect(JSON.parse(await client.done)).toEqual({ ok: true, value: 1 });
  await served.close();
});

test("a request line over the size limit closes the connection without running it", async () => {
  // A line longer than MAX_CONTROL_BYTES (counted in bytes) is refused before it is parsed.
  const served = await serve();
  const client = rawClient(served.path);
  client.socket.write(Buffer.alloc(4 * 1024 * 1024 + 1, "x"));
  client.socket.write("\n");
  await client.done;
  expect(served.requests).toEqual([]);
  expect(served.logs.some((line) => line.includes("over"))).toBe(true);
  await served.close();
});

test("a malformed request line gets a refusal, and the well-formed one an answer", async () => {
  // The protocol around the fix is unchanged: one JSON line in, one JSON response out.
  const served = await serve();
  const client = rawClient(served.path);
  client.socket.write("not json\n");
  const refusal = await client.done;
  expect(JSON.parse(refusal)).toEqual({ ok: false, error: "malformed control request", exitCode: 64 });
  expect(refusal.endsWith("}\n"), "one line, like every other answer").toBe(true);
  expect(await controlRequest(served.path, { command: "ping" }, 5000)).toEqual({ ok: true, value: 1 });
  await served.close();
});

// Found by review: a role request with a misspelt or missing role was passed on (the daemon
// stopped the worker and started one in that "role", answering ok), and so were names or rates
// of the wrong type.
test("requests with fields of the wrong kind are refused before the handler sees them", async () => {
  const served = await serve();
  const refused = async (request: unknown) => {
    const client = rawClient(served.path);
    client.socket.write(JSON.stringify(request) + "\n");
    const answer = JSON.parse(await client.done);
    expect(answer).toMatchObject({ ok: false, exitCode: 64 });
    return answer.error as string;
  };
  expect(await refused({ command: "role", role: "Primary", names: ["r"] }))
    .toBe('malformed control request: role "Primary" is not init, primary or secondary');
  expect(await refused({ command: "role", names: ["r"] })).toContain("role null is not");
  expect(await refused({ command: "status", names: "r" })).toContain("names must be a list");
  expect(await refused({ command: "status", names: [1] })).toContain("names must be a list");
  expect(await refused({ command: "syncrate", bytesPerSecond: "abc" })).toContain("bytesPerSecond");
  expect(await refused({ command: "syncrate", bytesPerSecond: -1 })).toContain("bytesPerSecond");
  expect(await refused({ command: "role", role: "primary", force: "yes" })).toContain("force");
  expect(await refused(null)).toContain("not a JSON object");
  expect(await refused([1])).toContain("not a JSON object");
  expect(served.requests).toEqual([]);
  expect(await controlRequest(served.path, { command: "role", role: "primary", names: ["r"] }, 5000))
    .toEqual({ ok: true, value: 1 });
  await served.close();
});

// Found by review: an answer JSON could not encode (or the client would refuse for its size) was
// an unhandled rejection, and the client waited for its own timeout.
test("an answer that cannot be encoded or is too large becomes an error answer", async () => {
  const path = join(dir, `c${sockets++}.sock`);
  let value: unknown = 1n;
  const server = controlServer(async () => ({ ok: true, value }), () => {});
  await new Promise<void>((resolve) => server.listen(path, () => resolve()));
  try {
    const bigint = await controlRequest(path, { command: "status" }, 5000);
    expect(bigint).toMatchObject({ ok: false, exitCode: 70 });
    expect((bigint as { error: string }).error).toContain("Cannot encode the answer");
    value = "x".repeat(5 * 1024 * 1024);
    const large = await controlRequest(path, { command: "status" }, 5000);
    expect(large).toMatchObject({ ok: false, exitCode: 70 });
    expect((large as { error: string }).error).toContain("name fewer resources");
  } finally {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

// Found by review: nothing bounded the connections served at once, each of which may hold 4 MiB.
test("a connection beyond maxConnections gets a busy answer; the next one after a close is served", async () => {
  const served = await serve({ maxConnections: 2 });
  const open = [rawClient(served.path), rawClient(served.path)];
  open[0]!.socket.write("{");
  open[1]!.socket.write("{");
  await Bun.sleep(50);
  const third = rawClient(served.path);
  third.socket.write(JSON.stringify({ command: "ping" }) + "\n");
  expect(JSON.parse(await third.done)).toMatchObject({ ok: false, exitCode: 75 });
  expect(served.logs.join("\n")).toContain("control connection refused: 2 connections open");
  open[0]!.socket.destroy();
  await Bun.sleep(50);
  expect(await controlRequest(served.path, { command: "ping" }, 5000)).toEqual({ ok: true, value: 1 });
  open[1]!.socket.destroy();
  await served.close();
});

test("an answer without the shape of a response is refused by the client, not passed on", async () => {
  // A raw server sends each answer in turn. Found by review: `null` made the CLI fail with
  // "Cannot read properties of null", and a refusal with exit code 0 made the command exit 0.
  const path = join(dir, `c${sockets++}.sock`);
  const answers = [
    "null", "[]", '{"ok":false}', '{"ok":false,"error":"no","exitCode":0}', '{"ok":false,"error":"no","exitCode":1.5}',
    '{"ok":"yes"}', '{"ok":true,"value":1}', '{"ok":false,"error":"no","exitCode":78}',
  ];
  let next = 0;
  const server = net.createServer((socket) => {
    socket.on("error", () => {});
    socket.once("data", () => socket.end(answers[next++] + "\n"));
  });
  await new Promise<void>((resolve) => server.listen(path, () => resolve()));
  try {
    const outcomes = [];
    for (let i = 0; i < answers.length; i++) {
      outcomes.push(await controlRequest(path, { command: "ping" }, 5000).catch((error: Error) => error.message));
    }
    const malformed = `Cannot talk to the daemon at "${path}": malformed response`;
    expect(outcomes).toEqual([
      malformed, malformed, malformed, malformed, malformed, malformed,
      { ok: true, value: 1 }, { ok: false, error: "no", exitCode: 78 },
    ]);
  } finally {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});
