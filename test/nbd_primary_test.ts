/**
 * Real NBD clients against a hast primary that replicates to a connected secondary (two daemons
 * on loopback, fullsync): nbdinfo sees the data size; qemu-io patterns, `write -z` and `discard`
 * land on both sides (the secondary's data area reads back the patterns and the zeros); fio's
 * nbd engine writes at random and verifies; a `write -z` (NO_HOLE) leaves its range allocated in
 * both image files; and garbage sent on the export socket by other
 * clients does not disturb an nbdcopy running at the same time. After each step the primary is
 * waited on until it is complete with nothing in flight, and then the two data areas are
 * compared byte for byte, read straight from the image files.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { type Cluster, createCluster } from "./cluster.ts";
import { Cleanup, run, type RunResult, waitFor } from "./harness.ts";

const KIB = 1024;
const MIB = 1024 * KIB;
/** Time per test; each is a few seconds when all is well. */
const TEST_TIMEOUT_MS = 60_000;
/** nbdcopy's 4 connections plus this many garbage clients stay under the export's 16. */
const GARBAGE_CLIENTS_PER_ROUND = 5;
/** How long a garbage client waits for the server to close on it. */
const GARBAGE_CLOSE_MS = 10_000;
/** Bytes of the fixed-newstyle greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
const GREETING_BYTES = 18;
/** NBD_OPT_EXPORT_NAME's reply when NO_ZEROES was agreed: size (64 bits) + flags (16 bits). */
const EXPORT_NAME_REPLY_BYTES = 10;

describe("NBD clients on a replicating primary", () => {
  const cleanup = new Cleanup();
  let c: Cluster;
  let datasizeBytes = 0;

  beforeAll(async () => {
    c = await createCluster(cleanup, { replication: "fullsync", sizeBytes: 64 * MIB });
    await c.startPair();
    datasizeBytes = (await c.dump("a")).datasizeBytes;
  }, TEST_TIMEOUT_MS);

  afterAll(() => cleanup.run(), TEST_TIMEOUT_MS);

  test("nbdinfo --json reports the data size and the 512-byte minimum block", async () => {
    const info = JSON.parse((await run(["nbdinfo", "--json", c.uri("a")])).stdout);
    expect(info.exports).toHaveLength(1);
    expect(info.exports[0]["export-size"]).toBe(datasizeBytes);
    expect(info.exports[0]["block_size_minimum"]).toBe(512);
    expect(info.exports[0]).toMatchObject({ is_read_only: false, can_trim: true, can_zero: true });
  }, TEST_TIMEOUT_MS);

  test("qemu-io patterns, write -z and discard reach the secondary", async () => {
    const commands = [
      "write -P 0xaa 0 1M",
      "write -P 0x55 1M 1M",
      "write -P 0x5a 3000 1000", // unaligned
      "write -z 256k 128k",
      "discard 1M 512k",
      "flush",
      "read -P 0xaa 0 3000",
      "read -P 0x5a 3000 1000",
      "read -P 0 256k 128k",
      "read -P 0 1M 512k",
      "read -P 0x55 1536k 512k",
    ];
    const result = await run(["qemu-io", "-f", "raw", c.uri("a"),
      ...commands.flatMap((command) => ["-c", command])]);
    expect(result.stdout + result.stderr).not.toMatch(/verification failed|error/i);
    await waitReplicated(c);
    const expected = Buffer.alloc(2 * MIB, 0xaa);
    expected.fill(0x5a, 3000, 4000);
    expected.fill(0, 256 * KIB, 384 * KIB);
    expected.fill(0x55, MIB);
    expected.fill(0, MIB, MIB + 512 * KIB);
    const onB = Buffer.from(await c.readData("b", 0, 2 * MIB));
    expect(firstDifference(onB, expected)).toBe(-1);
    await expectSameData(c);
    // The check can fail: a wrong pattern makes qemu-io say so.
    const wrong = await run(["qemu-io", "-f", "raw", c.uri("a"), "-c", "read -P 0x99 0 4k"],
      { allowFailure: true });
    expect(wrong.stdout).toContain("Pattern verification failed");
  }, TEST_TIMEOUT_MS);

  // fullsync acknowledges a write only once the secondary wrote it (spec §2), so right after
  // qemu-io returns, the secondary must hold the bytes, without a resync. The export advertises
  // a minimum block size of 512 (the wire's sector alignment), so qemu-io turns an unaligned
  // write into an aligned read-modify-write rather than sending a request hast cannot carry.
  test("an unaligned write acknowledged in fullsync is already on the secondary", async () => {
    const before = (await listRow(c)).worker.counters.remoteErrors;
    await run(["qemu-io", "-f", "raw", c.uri("a"), "-c", "write -P 0x3c 40000 1000"]);
    const onB = Buffer.from(await c.readData("b", 40000, 1000));
    const worker = (await listRow(c)).worker;
    const context = `remoteErrors ${before} → ${worker.counters.remoteErrors}, ` +
      `syncExtents ${worker.activemap.syncExtents}`;
    expect(firstDifference(onB, Buffer.alloc(1000, 0x3c)), context).toBe(-1);
    expect(worker.counters.remoteErrors, context).toBe(before);
    expect(worker.activemap.syncExtents, context).toBe(0);
  }, TEST_TIMEOUT_MS);

  // The spec: a WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE (qemu-io's `write -z` without -u sets
  // it) MUST leave the range allocated. Found by review: hast punched a hole in both image
  // files. The discard beside it shows that the check sees a hole where one is punched.
  test("write -z (NO_HOLE) leaves the range allocated on both copies, discard may punch", async () => {
    const zeroed = 8 * MIB;
    const discarded = zeroed + 512 * KIB;
    const commands = [
      `write -P 0x77 ${zeroed} 1M`, `write -z ${zeroed} 256k`, `discard ${discarded} 256k`, "flush",
      `read -P 0 ${zeroed} 256k`, `read -P 0x77 ${zeroed + 256 * KIB} 256k`, `read -P 0 ${discarded} 256k`,
    ];
    const result = await run(["qemu-io", "-f", "raw", c.uri("a"), ...commands.flatMap((cmd) => ["-c", cmd])]);
    expect(result.stdout + result.stderr).not.toMatch(/verification failed|error/i);
    await waitReplicated(c);
    for (const node of ["a", "b"] as const) {
      const { dataOffsetBytes } = await c.dump(node);
      const image = c.nodes[node].image;
      expect(await holeWithin(image, dataOffsetBytes + zeroed, 256 * KIB), `${node}: zeroed`).toBe(false);
      expect(await holeWithin(image, dataOffsetBytes + discarded, 256 * KIB), `${node}: discarded`).toBe(true);
    }
    await expectSameData(c);
  }, TEST_TIMEOUT_MS);

  test("fio --ioengine=nbd random writes verify, and both sides match", async () => {
    const result = await run([
      "fio", "--name=verify", "--ioengine=nbd", `--uri=${c.uri("a")}`, "--rw=randwrite",
      "--bsrange=4k-64k", "--offset=16m", "--size=8m", "--iodepth=16", "--verify=crc32c",
      "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
    ], { timeoutMs: 60_000 });
    const job = JSON.parse(result.stdout.slice(result.stdout.indexOf("{"))).jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBeGreaterThanOrEqual(8 * MIB);
    expect(job.read.io_bytes).toBe(job.write.io_bytes); // the verify pass read it all back
    await waitReplicated(c);
    const onB = await c.readData("b", 16 * MIB, 8 * MIB);
    expect(onB.some((byte) => byte !== 0)).toBe(true);
    await expectSameData(c);
  }, TEST_TIMEOUT_MS);

  test("garbage on the export socket does not disturb a concurrent nbdcopy", async () => {
    const payload = randomBytes(32 * MIB);
    const file = join(c.dir, "payload.bin");
    writeFileSync(file, payload);
    const socket = c.nodes.a.socket;
    let copyDone = false;
    let rounds = 0;
    let roundsDuringCopy = 0;
    // The copy is repeated until two rounds of garbage ran during it, so that a fast machine,
    // copying before a second round, still tests the overlap.
    const copying = (async (): Promise<RunResult> => {
      try {
        for (let copies = 1; ; copies++) {
          const copy = await run(["nbdcopy", "--flush", file, c.uri("a")], { allowFailure: true, timeoutMs: 40_000 });
          if (copy.code !== 0 || roundsDuringCopy >= 2 || copies === 10) return copy;
        }
      } finally {
        copyDone = true;
      }
    })();
    const closedByServer: boolean[] = [];
    do {
      if (!copyDone) roundsDuringCopy++;
      closedByServer.push(...await Promise.all(garbageClients(socket)));
      rounds++;
    } while (!copyDone && rounds < 100);
    const copy: RunResult = await copying;
    expect(copy.code, copy.stderr).toBe(0);
    expect(roundsDuringCopy).toBeGreaterThanOrEqual(2);
    const perRound = GARBAGE_CLIENTS_PER_ROUND;
    const lingering = closedByServer.flatMap((closed, i) =>
      closed ? [] : [`client ${i % perRound} of round ${Math.floor(i / perRound)}`]);
    expect(lingering).toEqual([]);
    await waitReplicated(c);
    expect(firstDifference(Buffer.from(await c.readData("a", 0, payload.byteLength)), payload))
      .toBe(-1);
    expect(firstDifference(Buffer.from(await c.readData("b", 0, payload.byteLength)), payload))
      .toBe(-1);
    await expectSameData(c);
    const nbd = (await listRow(c)).worker.nbd;
    expect(nbd.protocolErrors).toBeGreaterThanOrEqual(rounds);
    await run(["nbdinfo", c.uri("a")]); // still serving
  }, TEST_TIMEOUT_MS);
});

/** `hast list --json` of the primary (node a). */
async function listRow(c: Cluster): Promise<Record<string, any>> {
  return JSON.parse((await c.hast("a", ["list", "--json"])).stdout).resources[0];
}

/** Waits until the primary is complete, clean, and has no write in flight to the secondary. */
async function waitReplicated(c: Cluster): Promise<void> {
  await c.waitStatus("a", "a complete and clean",
    (s) => s.status === "complete" && s.dirtyBytes === 0, 30_000);
  await waitFor("no remote writes in flight", async () =>
    (await listRow(c)).worker?.remoteInFlight === 0);
}

/** Both data areas byte for byte; reports the first differing offset on failure. */
async function expectSameData(c: Cluster): Promise<void> {
  const onA = Buffer.from(await c.readData("a"));
  const onB = Buffer.from(await c.readData("b"));
  expect(onB.byteLength).toBe(onA.byteLength);
  expect(firstDifference(onA, onB)).toBe(-1);
}

/** Whether the file has a hole (SEEK_HOLE, through python3) in [offset, offset + length). */
async function holeWithin(file: string, offset: number, length: number): Promise<boolean> {
  const script = "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); " +
    "print(os.lseek(fd, int(sys.argv[2]), os.SEEK_HOLE))";
  const hole = Number((await run(["python3", "-c", script, file, String(offset)])).stdout.trim());
  expect(Number.isSafeInteger(hole)).toBe(true);
  return hole < offset + length;
}

function firstDifference(left: Buffer, right: Buffer): number {
  if (left.equals(right)) return -1;
  const length = Math.min(left.byteLength, right.byteLength);
  for (let i = 0; i < length; i++) if (left[i] !== right[i]) return i;
  return length;
}

function u32(value: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value);
  return bytes;
}

/** An NBD option request: IHAVEOPT, option code, length, data. */
function option(code: number, data: Buffer): Buffer {
  return Buffer.concat([Buffer.from("IHAVEOPT"), u32(code), u32(data.length), data]);
}

/** One message of a garbage client: sent once `afterBytes` have been received in total. */
interface Step {
  afterBytes: number;
  data: Buffer;
}

/**
 * One round of misbehaving clients: each returns true once the server closed its connection.
 * They break the handshake at several points, and one breaks the transmission phase.
 */
function garbageClients(socketPath: string): Promise<boolean>[] {
  const afterGreeting = (data: Buffer): Step[] => [{ afterBytes: GREETING_BYTES, data }];
  const scripts: Step[][] = [
    afterGreeting(Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
    afterGreeting(Buffer.concat([u32(1), Buffer.from("IHAVEOPX"), Buffer.alloc(8)])),
    // A GO without data gets an error reply (haggling goes on); then an option with bad magic.
    afterGreeting(Buffer.concat([u32(1), option(7, Buffer.alloc(0)), Buffer.from("IHAVEOPX"),
      Buffer.alloc(8)])),
    afterGreeting(randomBytes(MIB)),
    [ // flags FIXED_NEWSTYLE|NO_ZEROES, EXPORT_NAME "", then a request with a bad magic
      { afterBytes: GREETING_BYTES, data: Buffer.concat([u32(3), option(1, Buffer.alloc(0))]) },
      {
        afterBytes: GREETING_BYTES + EXPORT_NAME_REPLY_BYTES,
        data: Buffer.alloc(28, Buffer.from([0xde, 0xad, 0xbe, 0xef])),
      },
    ],
  ];
  return scripts.slice(0, GARBAGE_CLIENTS_PER_ROUND)
    .map((steps) => garbageClient(socketPath, steps));
}

/** Runs one scripted client; true if the server closed the connection in time. */
function garbageClient(socketPath: string, steps: Step[]): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection(socketPath);
    let received = 0;
    let next = 0;
    const timer = setTimeout(() => {
      socket.destroy();
      resolve(false);
    }, GARBAGE_CLOSE_MS);
    socket.on("data", (chunk: Buffer) => {
      received += chunk.byteLength;
      while (next < steps.length && received >= steps[next]!.afterBytes) {
        socket.write(steps[next]!.data);
        next++;
      }
    });
    socket.on("error", () => {}); // a reset is one way of being closed
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}
