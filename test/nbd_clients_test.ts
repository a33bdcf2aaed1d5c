/**
 * Integration tests: the NBD server against the real clients people will point at hast
 * (libnbd's nbdinfo, nbdcopy and nbdfuse; qemu-io and qemu-img; fio's nbd engine), over a unix
 * socket in a temp dir, backed by a small file device. A missing tool fails the test.
 */
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as fsp from "node:fs/promises";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { type BlockDevice, NbdServer } from "../lib/nbd_server.ts";

const MIB = 1024 * 1024;
const DEVICE_BYTES = 32 * MIB;
const FILL = 0xee;
const ZEROES = new Uint8Array(MIB);
const TOOLS = ["nbdinfo", "nbdcopy", "nbdfuse", "qemu-io", "qemu-img", "fio", "fusermount3"];

/** A BlockDevice on a regular file: pread/pwrite/fdatasync, zeroing by writing zeroes. */
class FileDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly #fd: number;

  constructor(filePath: string, sizeBytes: number) {
    this.sizeBytes = sizeBytes;
    this.#fd = fs.openSync(filePath, "r+");
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    return this.#io("read", buffer, offset).then(() => buffer);
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    await this.#io("write", data, offset);
    if (fua) await this.flush();
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => {
      fs.fdatasync(this.#fd, (error) => (error ? reject(error) : resolve()));
    });
  }

  /** Trim zeroes the range, so tests can see that the TRIM reached the device. */
  trim(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length, false);
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    for (let done = 0; done < length; done += ZEROES.length) {
      const n = Math.min(ZEROES.length, length - done);
      await this.#io("write", ZEROES.subarray(0, n), offset + done);
    }
    if (fua) await this.flush();
  }

  close(): void {
    fs.closeSync(this.#fd);
  }

  /** pread/pwrite the whole buffer, continuing after short transfers. */
  async #io(op: "read" | "write", buffer: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buffer.length) {
      const n = await new Promise<number>((resolve, reject) => {
        const callback = (error: Error | null, bytes: number) =>
          error ? reject(error) : resolve(bytes);
        const [at, n, position] = [done, buffer.length - done, offset + done];
        if (op === "read") fs.read(this.#fd, buffer, at, n, position, callback);
        else fs.write(this.#fd, buffer, at, n, position, callback);
      });
      if (n === 0) throw Object.assign(new Error(`Cannot ${op}: end of file`), { code: "EIO" });
      done += n;
    }
  }
}

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a tool to completion (killed after timeoutMs). Throws if the tool is not installed. */
async function run(argv: string[], timeoutMs = 60_000): Promise<RunResult> {
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  try {
    const [stdout, stderr] = await Promise.all([
      new Response(proc.stdout).text(),
      new Response(proc.stderr).text(),
    ]);
    return { code: await proc.exited, stdout, stderr };
  } finally {
    clearTimeout(timer);
    proc.kill("SIGKILL"); // no-op once exited
  }
}

function expectSuccess(result: RunResult, what: string): void {
  if (result.code !== 0) {
    throw new Error(`${what} exited ${result.code}\n${result.stdout}\n${result.stderr}`);
  }
}

let dir = "";
let socketPath = "";
let uri = "";
let imagePath = "";
let device: FileDevice | null = null;
let server: NbdServer | null = null;
let logs: string[] = [];

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbd-clients-test-"));
  socketPath = path.join(dir, "nbd.sock");
  uri = `nbd+unix:///?socket=${socketPath}`;
  imagePath = path.join(dir, "device.img");
  fs.writeFileSync(imagePath, new Uint8Array(DEVICE_BYTES).fill(FILL));
  device = new FileDevice(imagePath, DEVICE_BYTES);
  logs = [];
  server = new NbdServer(device, {
    exportName: "data",
    description: "hast test export",
    log: (level, message) => logs.push(`${level}: ${message}`),
  });
  await server.listen({ kind: "unix", path: socketPath });
});

afterEach(async () => {
  await server?.close();
  server = null;
  device?.close();
  device = null;
  fs.rmSync(dir, { recursive: true, force: true });
});

function image(): Uint8Array {
  return new Uint8Array(fs.readFileSync(imagePath));
}

describe("real NBD clients", () => {
  test("every client tool is installed", () => {
    const missing = TOOLS.filter((tool) => Bun.which(tool) === null);
    expect(missing).toEqual([]);
  });

  test("nbdinfo --json reports size, block sizes and flags", async () => {
    const result = await run(["nbdinfo", "--json", uri]);
    expectSuccess(result, "nbdinfo");
    const info = JSON.parse(result.stdout);
    expect(info.protocol).toBe("newstyle-fixed");
    expect(info.structured).toBe(false);
    expect(info.exports).toHaveLength(1);
    expect(info.exports[0]).toMatchObject({
      "export-name": "data",
      description: "hast test export",
      "export-size": DEVICE_BYTES,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MIB,
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_trim: true,
      can_zero: true,
      can_multi_conn: true,
      can_fast_zero: false,
      can_cache: false,
    });
    const list = await run(["nbdinfo", "--list", "--json", uri]);
    expectSuccess(list, "nbdinfo --list");
    const exports: Array<{ "export-name": string }> = JSON.parse(list.stdout).exports;
    const names = exports.map((e) => e["export-name"]);
    expect(names).toEqual(["data"]);
    const wrong = await run(["nbdinfo", `nbd+unix:///nope?socket=${socketPath}`]);
    expect(wrong.code).not.toBe(0);
    expect(wrong.stderr).toContain("nope");
  });

  test("qemu-img info sees a raw image of the export's size", async () => {
    const result = await run(["qemu-img", "info", "--output=json", uri]);
    expectSuccess(result, "qemu-img info");
    const info = JSON.parse(result.stdout);
    expect(info).toMatchObject({ "virtual-size": DEVICE_BYTES, format: "raw" });
  });

  // Copies random data in through nbdcopy (which opens several connections since the export
  // says CAN_MULTI_CONN) and back out, then compares with the source and the backing file.
  test("nbdcopy moves 8 MiB of random data in and back out unchanged", async () => {
    const source = path.join(dir, "random.img");
    const copy = path.join(dir, "copy.img");
    const random = crypto.randomBytes(8 * MIB);
    fs.writeFileSync(source, random);
    // Counted here: the log has one connection's life a minute (nbd_server.ts).
    let connections = 0;
    const handle = server!.handleConnection.bind(server!);
    server!.handleConnection = (socket) => {
      connections++;
      return handle(socket);
    };
    expectSuccess(await run(["nbdcopy", "--flush", source, uri]), "nbdcopy in");
    expectSuccess(await run(["nbdcopy", uri, copy]), "nbdcopy out");
    const out = fs.readFileSync(copy);
    expect(out.length).toBe(DEVICE_BYTES);
    expect(out.subarray(0, 8 * MIB).equals(random)).toBe(true);
    expect(out.subarray(8 * MIB).every((b) => b === FILL)).toBe(true);
    expect(Buffer.from(image().subarray(0, 8 * MIB)).equals(random)).toBe(true);
    // Two runs took more than two connections: nbdcopy used CAN_MULTI_CONN.
    expect(connections).toBeGreaterThan(2);
    const stats = server!.stats();
    expect(stats.bytesWritten).toBe(8 * MIB);
    expect(stats.bytesRead).toBeGreaterThanOrEqual(DEVICE_BYTES);
    expect(stats.flushes).toBeGreaterThanOrEqual(1);
    expect(stats.errors).toBe(0);
  }, 60_000);

  test("qemu-io writes and reads patterns, flushes, zeroes and discards", async () => {
    const commands = [
      "write -P 0xab 0 64k",
      "read -P 0xab 0 64k",
      "write -f -P 0xcd 1M 4k", // FUA
      "read -P 0xcd 1M 4k",
      "flush",
      "write -z 64k 64k",
      "read -P 0 64k 64k",
      "discard 2M 128k",
      "write -P 0x5a 3000 1000", // unaligned
      "read -P 0x5a 3000 1000",
      "aio_write -P 0x11 4M 64k",
      "aio_write -P 0x22 5M 64k",
      "aio_flush",
      "read -P 0x11 4M 64k",
      "read -P 0x22 5M 64k",
    ];
    const result = await run(["qemu-io", "-f", "raw", uri, ...commands.flatMap((c) => ["-c", c])]);
    expectSuccess(result, "qemu-io");
    expect(result.stdout + result.stderr).not.toMatch(/verification failed|error|fail/i);
    const bytes = image();
    expect(bytes.subarray(0, 3000).every((b) => b === 0xab)).toBe(true);
    expect(bytes.subarray(3000, 4000).every((b) => b === 0x5a)).toBe(true);
    expect(bytes.subarray(64 * 1024, 128 * 1024).every((b) => b === 0)).toBe(true);
    expect(bytes.subarray(MIB, MIB + 4096).every((b) => b === 0xcd)).toBe(true);
    expect(bytes.subarray(2 * MIB, 2 * MIB + 128 * 1024).every((b) => b === 0)).toBe(true);
    expect(bytes[128 * 1024]).toBe(FILL);
    const stats = server!.stats();
    expect(stats.flushes).toBeGreaterThanOrEqual(2);
    expect(stats.zeroes).toBeGreaterThanOrEqual(1);
    expect(stats.trims).toBeGreaterThanOrEqual(1);
    // The check above can fail: a wrong pattern makes qemu-io say so and exit non-zero.
    const wrong = await run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x99 0 4k"]);
    expect(wrong.code).not.toBe(0);
    expect(wrong.stdout).toContain("Pattern verification failed");
  }, 60_000);

  test("fio's nbd engine runs a random write + crc32c verify job cleanly", async () => {
    const result = await run([
      "fio",
      "--name=verify",
      "--ioengine=nbd",
      `--uri=${uri}`,
      "--rw=randwrite",
      "--bsrange=4k-64k",
      "--size=4m",
      "--iodepth=16",
      "--verify=crc32c",
      "--verify_fatal=1",
      "--verify_state_save=0", // else fio leaves local-verify-0-verify.state in the cwd
      "--output-format=json",
    ]);
    expectSuccess(result, "fio");
    const job = JSON.parse(result.stdout.slice(result.stdout.indexOf("{"))).jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBeGreaterThanOrEqual(4 * MIB);
    expect(job.read.io_bytes).toBe(job.write.io_bytes); // the verify pass read it all back
    expect(server!.stats().errors).toBe(0);
  }, 60_000);

  test("nbdfuse exposes the export as a file that reads and writes through", async () => {
    const mountpoint = path.join(dir, "mnt");
    const pidFile = path.join(dir, "nbdfuse.pid");
    fs.mkdirSync(mountpoint);
    const fuse = Bun.spawn(["nbdfuse", "-P", pidFile, mountpoint, uri], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    try {
      const deadline = Date.now() + 10_000;
      while (!(fs.existsSync(pidFile) && fs.statSync(pidFile).size > 0)) {
        if (Date.now() > deadline || fuse.exitCode !== null) throw new Error("nbdfuse not ready");
        await Bun.sleep(20);
      }
      // Only asynchronous file calls on the mount: the server runs on this thread, so a
      // synchronous one would wait for a reply that the blocked event loop can never send.
      const file = path.join(mountpoint, "nbd");
      expect((await fsp.stat(file)).size).toBe(DEVICE_BYTES);
      const data = crypto.randomBytes(256 * 1024);
      const handle = await fsp.open(file, "r+");
      try {
        await handle.write(data, 0, data.length, 5 * MIB);
        await handle.write(Buffer.from("hello"), 0, 5, 7 * MIB + 3); // unaligned
        await handle.sync();
        const back = Buffer.alloc(data.length);
        await handle.read(back, 0, back.length, 5 * MIB);
        expect(back.equals(data)).toBe(true);
      } finally {
        await handle.close();
      }
      const bytes = image();
      expect(Buffer.from(bytes.subarray(5 * MIB, 5 * MIB + data.length)).equals(data)).toBe(true);
      expect(new TextDecoder().decode(bytes.subarray(7 * MIB + 3, 7 * MIB + 8))).toBe("hello");
    } finally {
      await unmount(mountpoint, fuse);
    }
  }, 60_000);

  // Garbage on other connections while nbdcopy works: each bad connection is closed with a
  // logged reason (each kind once a minute: "GET " and random bytes are both unknown client
  // flags), and the copy completes with the right bytes.
  test("garbage on other connections does not disturb a well-behaved client", async () => {
    const source = path.join(dir, "random.img");
    const random = crypto.randomBytes(8 * MIB);
    fs.writeFileSync(source, random);
    const copying = run(["nbdcopy", "--flush", source, uri]);
    const garbage = await Promise.all([
      sendGarbage([Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n")]),
      sendGarbage([u32(1), Buffer.from("IHAVEOPX"), Buffer.alloc(8)]),
      sendGarbage([u32(1), option(1, Buffer.alloc(0)), Buffer.from("\xde\xad\xbe\xef", "latin1")]),
      sendGarbage([crypto.randomBytes(MIB)]),
      sendGarbage([u32(0), option(7, Buffer.alloc(0))]), // no FIXED_NEWSTYLE
    ]);
    expect(garbage.every((closedByServer) => closedByServer)).toBe(true);
    expectSuccess(await copying, "nbdcopy");
    expect(Buffer.from(image().subarray(0, 8 * MIB)).equals(random)).toBe(true);
    const text = logs.join("\n");
    expect(text).toMatch(/unknown client flags 0x[0-9a-f]+/); // "GET " read as client flags, or random
    expect(text).toContain("bad magic 0x49484156454f5058"); // "IHAVEOPX"
    expect(text).toContain("bad magic 0xdeadbeef");
    expect(text).toContain("lack FIXED_NEWSTYLE");
    expect(server!.stats().protocolErrors).toBe(5);
    expectSuccess(await run(["nbdinfo", uri]), "nbdinfo after the garbage");
  }, 60_000);
});

function u32(value: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value);
  return bytes;
}

function option(code: number, data: Buffer): Buffer {
  return Buffer.concat([Buffer.from("IHAVEOPT"), u32(code), u32(data.length), data]);
}

/** Connect, send the parts after the greeting, and report whether the server closed on us. */
function sendGarbage(parts: Buffer[]): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      resolve(false);
    }, 10_000);
    socket.once("data", () => {
      for (const part of parts) socket.write(part);
    });
    socket.on("error", () => {}); // a reset is one way of being closed
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** Unmount a FUSE mount with fusermount3 -u and reap nbdfuse, killing it if it lingers. */
async function unmount(mountpoint: string, fuse: Bun.Subprocess): Promise<void> {
  const mounted = () => fs.readFileSync("/proc/mounts", "utf8").includes(` ${mountpoint} `);
  if (mounted()) {
    const result = await run(["fusermount3", "-u", mountpoint], 10_000);
    // Busy (a test step failed mid-I/O): detach lazily so nothing stays mounted, then fail.
    if (result.code !== 0) await run(["fusermount3", "-u", "-z", mountpoint], 10_000);
    expectSuccess(result, "fusermount3 -u");
  }
  const exited = await Promise.race([
    fuse.exited.then(() => true),
    Bun.sleep(5000).then(() => false),
  ]);
  if (!exited) {
    fuse.kill("SIGKILL");
    await fuse.exited;
  }
  expect(mounted()).toBe(false);
}
