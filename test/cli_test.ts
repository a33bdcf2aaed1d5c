/**
 * The `hast` command line as an operator meets it, with real processes on a loopback cluster:
 * every failure ends with its sysexits(3) code and a message that names the offending file,
 * resource or value; the JSON of status, list and dump has the documented shape; `serve`
 * without -F detaches and returns only once its control socket answers, and a second daemon for
 * the same node is refused; a node whose data is stale (after `hast discard`) is not promoted
 * without --force. Each case runs the real CLI (`bun main.ts`, or $HAST_BIN) and checks exit
 * code and stderr; daemons are stopped by PID in cleanup.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, existsSync, openSync, readFileSync, writeFileSync, writeSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { controlRequest } from "../lib/control.ts";
import {
  NBD_MAX_CLIENTS, NBD_MAX_IN_FLIGHT, NBD_MAX_REQUEST_BYTES,
} from "../lib/resource_worker.ts";
import { WORKER_RESTART_MS } from "../lib/daemon.ts";
import { RECONNECT_INTERVAL_MS } from "../lib/primary.ts";
import { socketConnection } from "../lib/transport.ts";
import { decodeJson, encodeJson, type Frame, MessageType, WIRE_VERSION } from "../lib/wire.ts";
import { type Cluster, createCluster, hastCommand, type NodeName } from "./cluster.ts";
import { Cleanup, expandRanges, makeTempDir, run, type RunResult, waitFor } from "./harness.ts";

const EX_USAGE = 64;
const EX_DATAERR = 65;
const EX_UNAVAILABLE = 69;
const EX_SOFTWARE = 70;
const EX_TEMPFAIL = 75;
const EX_CONFIG = 78;
/** Time per test: a few CLI runs (each a fresh Bun process) and maybe a daemon start. */
const TEST_TIMEOUT_MS = 60_000;
/** How long a detached daemon gets to exit after SIGTERM before its group gets SIGKILL. */
const DAEMON_STOP_MS = 10_000;

/** Runs hast with `args` as given (no -c/--node added); never throws on a non-zero exit. */
function hastRaw(args: string[]): Promise<RunResult> {
  return run([...hastCommand(), ...args], { allowFailure: true, timeoutMs: 60_000 });
}

/** Expects exit `code` and a stderr line that matches every pattern. */
function expectFailure(result: RunResult, code: number | number[], ...patterns: RegExp[]): void {
  const context = `stderr: ${result.stderr}`;
  const codes = Array.isArray(code) ? code : [code];
  expect(codes, context).toContain(result.code);
  for (const pattern of patterns) expect(result.stderr, context).toMatch(pattern);
}

/** `"text"` as a RegExp source, for messages that quote the offending value. */
function quoted(text: string): RegExp {
  return new RegExp(`"${text.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}"`);
}

/** `text` as a RegExp that matches it literally. */
function literal(text: string): RegExp {
  return new RegExp(text.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&"));
}

/** A cluster with a fresh cleanup, torn down after `body` whatever happens. */
async function withCluster(body: (c: Cluster) => Promise<void>): Promise<void> {
  const cleanup = new Cleanup();
  try {
    await body(await createCluster(cleanup));
  } finally {
    await cleanup.run();
  }
}

describe("without a daemon", () => {
  test("an unknown command exits 64 and names it", async () => {
    const result = await hastRaw(["frobnicate"]);
    expectFailure(result, EX_USAGE, quoted("frobnicate"), /usage:/);
  }, TEST_TIMEOUT_MS);

  test("a missing config file exits 78 and names the file", async () => {
    const cleanup = new Cleanup();
    try {
      const path = join(await makeTempDir(cleanup, "hast-cli-"), "missing.conf");
      const result = await hastRaw(["-c", path, "--node", "a", "status"]);
      expectFailure(result, EX_CONFIG, new RegExp(path.replace(/[.]/g, "\\.")));
    } finally {
      await cleanup.run();
    }
  }, TEST_TIMEOUT_MS);

  test("a config syntax error exits 78 with file:line:column", async () => {
    const cleanup = new Cleanup();
    try {
      const path = join(await makeTempDir(cleanup, "hast-cli-"), "bad.conf");
      // Line 3 opens a section where an option value belongs.
      writeFileSync(path, "# a comment\nresource data {\n  local /tmp/x {\n  }\n}\n");
      const result = await hastRaw(["-c", path, "--node", "a", "status"]);
      expectFailure(result, EX_CONFIG);
      const match = new RegExp(`${path.replace(/[.]/g, "\\.")}:(\\d+):(\\d+)`).exec(result.stderr);
      expect(match, `stderr: ${result.stderr}`).not.toBeNull();
      expect(Number(match![1])).toBe(3);
      expect(Number(match![2])).toBeGreaterThan(0);
    } finally {
      await cleanup.run();
    }
  }, TEST_TIMEOUT_MS);

  test("create twice without --force exits 65 naming the resource; --force works", async () => {
    await withCluster(async (c) => {
      await c.hast("a", ["create", "data"]);
      const again = await c.hast("a", ["create", "data"], { allowFailure: true });
      expectFailure(again, EX_DATAERR, quoted("data"), /force/);
      const forced = await c.hast("a", ["create", "--force", "-k", "8", "data"]);
      expect(forced.stdout).toMatch(/data: created/);
      const dump = await c.dump("a");
      expect(dump.resource).toBe("data");
      expect(dump.keepdirty).toBe(8); // the forced create really rewrote the metadata
    });
  }, TEST_TIMEOUT_MS);

  test("create with a bad extent size is refused, quoting the value", async () => {
    await withCluster(async (c) => {
      const result = await c.hast("a", ["create", "-e", "3000", "data"], { allowFailure: true });
      expectFailure(result, EX_USAGE, quoted("3000"), /power of two/);
      // Nothing was written: there is still no metadata to dump.
      const dump = await c.hast("a", ["dump", "--json"], { allowFailure: true });
      expect(dump.code).not.toBe(0);
    });
  }, TEST_TIMEOUT_MS);

  test("role with an unknown resource exits 78 and names it", async () => {
    await withCluster(async (c) => {
      const result = await c.hast("a", ["role", "primary", "nosuch"], { allowFailure: true });
      expectFailure(result, EX_CONFIG, quoted("nosuch"));
    });
  }, TEST_TIMEOUT_MS);

  test("a malformed argument exits 64, naming the argument and the form it takes", async () => {
    // Each bad value is refused before the config is read or anything is written (found by
    // review: a size that was not one exited 65, and "-k ''" created with keepdirty 0).
    await withCluster(async (c) => {
      const size = /k\/M\/G\/T\/P\/E suffix/;
      const cases: [string[], ...RegExp[]][] = [
        [["syncrate", "abc", "data"], /rate/, quoted("abc"), size],
        [["syncrate", "99999999999999999999T", "data"], /rate/, quoted("99999999999999999999T"), size],
        [["verify", "--rate", "1e3", "data"], /--rate/, quoted("1e3"), size],
        [["create", "-m", "abc", "data"], /-m/, quoted("abc"), size],
        [["create", "-e", "zz", "data"], /-e/, quoted("zz"), size],
        [["create", "-e", "", "data"], /-e/, quoted(""), size],
        [["create", "-k", "", "data"], /-k/, quoted(""), /0\.\.65536/],
        [["create", "-k", "0x10", "data"], /-k/, quoted("0x10"), /0\.\.65536/],
        [["syncrate", "-1", "data"], /syncrate/, quoted("-1"), /takes none/],
        [["status", "--bogus"], /status/, quoted("--bogus"), /--json/],
        [["role"], /init, primary or secondary/],
      ];
      for (const [args, ...patterns] of cases) {
        expectFailure(await c.hast("a", args, { allowFailure: true }), EX_USAGE, ...patterns);
      }
      const dump = await c.hast("a", ["dump", "--json"], { allowFailure: true });
      expect(dump.code, "no metadata was written").not.toBe(0);
    });
  }, TEST_TIMEOUT_MS);

  test("-h after global options prints the usage and exits 0; an unknown global option is named", async () => {
    const help = await hastRaw(["-c", "/nonexistent.conf", "-h"]);
    expect(help.code, help.stderr).toBe(0);
    expect(help.stdout).toMatch(/^usage: hast/);
    expect(help.stderr).toBe("");
    expect((await hastRaw(["status", "--help"])).stdout).toMatch(/^usage: hast/);
    expectFailure(await hastRaw(["--nod", "a", "status"]), EX_USAGE, quoted("--nod"), /global option/);
  }, TEST_TIMEOUT_MS);

  // Found by review: an empty --node reached the config as a RangeError and exited 65.
  test("an empty --node is a usage error that names the option", async () => {
    const cleanup = new Cleanup();
    try {
      const path = join(await makeTempDir(cleanup, "hast-cli-"), "hast.conf");
      writeFileSync(path, "resource data {\n  on a { local /dev/null remote 10.0.0.2 }\n}\n");
      expectFailure(await hastRaw(["-c", path, "--node", "", "status"]), EX_USAGE, quoted("--node"), /usage:/);
    } finally {
      await cleanup.run();
    }
  }, TEST_TIMEOUT_MS);

  test("role without a running daemon exits 75", async () => {
    await withCluster(async (c) => {
      await c.createBoth();
      const result = await c.hast("a", ["role", "primary", "data"], { allowFailure: true });
      expectFailure(result, EX_TEMPFAIL, /daemon/);
    });
  }, TEST_TIMEOUT_MS);
});

/** What the detached `serve` of node a did, recorded by beforeAll for the tests below. */
interface Served {
  result: RunResult;
  /** Whether the control socket answered a ping the moment `serve` had returned. */
  answeredAtOnce: boolean;
  pid: number | null;
  log: string;
}

describe("with daemons (a detached by `serve`, b in the foreground)", () => {
  const cleanup = new Cleanup();
  let c: Cluster;
  let served: Served;

  beforeAll(async () => {
    c = await createCluster(cleanup);
    await c.createBoth();
    served = await serveDetached(cleanup, c, "a");
    expect(served.result.code, served.result.stderr).toBe(0);
    await c.startDaemon("b");
    await c.hast("b", ["role", "secondary", "data"]);
    await c.hast("a", ["role", "primary", "data"]);
    await c.waitStatus("a", "a primary complete", (s) => s.status === "complete");
  }, TEST_TIMEOUT_MS);

  afterAll(() => cleanup.run(), TEST_TIMEOUT_MS);

  test("serve without -F detaches and returns only once control answers", async () => {
    expect(served.answeredAtOnce).toBe(true);
    expect(served.pid).not.toBeNull();
    expect(served.pid).not.toBe(process.pid);
    const cmdline = readCmdline(served.pid!);
    expect(cmdline).toContain("serve");
    expect(cmdline).toContain("-F");
    expect(existsSync(served.log)).toBe(true);
  }, TEST_TIMEOUT_MS);

  test("a second `serve -F` for the same node exits 75", async () => {
    const result = await c.hast("a", ["serve", "-F", "-P", join(c.dir, "second.pid")],
      { allowFailure: true });
    expectFailure(result, EX_TEMPFAIL, /already/);
    expect((await c.status("a")).role).toBe("primary");
  }, TEST_TIMEOUT_MS);

  test("a second detached `serve` for the same node exits 75", async () => {
    const log = join(c.dir, "second-serve.log");
    const result = await c.hast("a", ["serve", "--log", log], { allowFailure: true });
    // For the failure message: what the refused daemon wrote, once it has written anything.
    const logText = await waitFor("second daemon's log", () => readText(log).trim() || false, {
      timeoutMs: 3_000,
    }).catch(() => readText(log));
    const context = `exit ${result.code}; stderr: ${result.stderr}; daemon log: ${logText}`;
    try {
      expect(result.code, context).toBe(EX_TEMPFAIL);
      expect(readPidfile(c, "a"), "the first daemon keeps its pidfile").toBe(served.pid);
      expect((await c.status("a")).role).toBe("primary");
    } finally {
      // Had the second daemon started (the failure tested for), it must not outlive the test.
      const pid = readPidfile(c, "a");
      if (pid !== null && pid !== served.pid) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // it is gone already
        }
      }
    }
  }, TEST_TIMEOUT_MS);

  test("create on the provider of a running primary exits 75 (in use)", async () => {
    const before = await c.dump("a");
    const result = await c.hast("a", ["create", "--force", "data"], { allowFailure: true });
    expectFailure(result, EX_TEMPFAIL, /in use|locked/, quoted(c.nodes.a.image));
    expect((await c.dump("a")).resuid).toBe(before.resuid);
    expect((await c.status("a")).status).toBe("complete");
  }, TEST_TIMEOUT_MS);

  test("status --json has one object per resource with the documented fields", async () => {
    const parsed = JSON.parse((await c.hast("a", ["status", "--json"])).stdout);
    expect(Object.keys(parsed)).toEqual(["resources"]);
    expect(parsed.resources).toHaveLength(1);
    expect(parsed.resources[0]).toMatchObject({
      name: "data",
      role: "primary",
      status: "complete",
      local: c.nodes.a.image,
      remote: expect.stringContaining(c.nodes.b.ip),
      nbd: c.uri("a"),
      dirtyBytes: 0,
      verify: null,
      localError: null,
    });
    const b = await c.status("b");
    expect(b).toMatchObject({ name: "data", role: "secondary", local: c.nodes.b.image, nbd: null });
    expect(b.remote).toContain(c.nodes.a.ip);
    expect("dirtyBytes" in b).toBe(true);
  }, TEST_TIMEOUT_MS);

  test("list --json includes the NBD export's limits", async () => {
    const row = JSON.parse((await c.hast("a", ["list", "--json"])).stdout).resources[0];
    const limits = row.nbdLimits ?? row.worker?.nbdLimits;
    expect(limits, JSON.stringify(row)).toMatchObject({
      maxRequestBytes: NBD_MAX_REQUEST_BYTES,
      maxInFlight: NBD_MAX_IN_FLIGHT,
      maxClients: NBD_MAX_CLIENTS,
    });
    expect(row).toMatchObject({ name: "data", role: "primary", replication: "fullsync" });
  }, TEST_TIMEOUT_MS);

  test("a resource not in the config exits 78 and is named, whatever the command", async () => {
    // Found by review: status, list and syncrate left the name to the daemon, which answered 64,
    // while role, dump, verify, discard, promotable and create exited 78. Nothing changes on a.
    for (const args of [
      ["status", "nosuch"], ["list", "--json", "nosuch"], ["role", "secondary", "nosuch"], ["dump", "nosuch"],
      ["verify", "nosuch"], ["syncrate", "10M", "nosuch"], ["discard", "nosuch"], ["promotable", "nosuch"],
      ["create", "nosuch"], ["status", "data", "nosuch"],
    ]) {
      const result = await c.hast("a", args, { allowFailure: true });
      expectFailure(result, EX_CONFIG, quoted("nosuch"), literal(c.configPath));
      expect(result.stderr, args.join(" ")).not.toMatch(/usage:/);
    }
    expect(await c.status("a")).toMatchObject({ role: "primary", status: "complete" });
  }, TEST_TIMEOUT_MS);

  test("\"all\" names every resource for status, list, syncrate and promotable", async () => {
    // Found by review: these sent the name "all" to the daemon, which did not know it.
    for (const command of ["status", "list"]) {
      const rows = JSON.parse((await c.hast("a", [command, "--json", "all"])).stdout).resources;
      expect(rows.map((r: { name: string }) => r.name)).toEqual(["data"]);
    }
    await c.hast("a", ["syncrate", "0", "all"]);
    expect((await c.hast("a", ["promotable", "all"])).stdout).toBe("data: promotable\n");
  }, TEST_TIMEOUT_MS);

  test("dump --json shows the on-disk metadata of both sides", async () => {
    const [a, b] = [await c.dump("a"), await c.dump("b")];
    for (const [m, prevrole] of [[a, "primary"], [b, "secondary"]] as const) {
      expect(m).toMatchObject({
        resource: "data",
        extentsizeBytes: 2 * 1024 * 1024,
        keepdirty: 64,
        prevrole,
      });
      expect(typeof m.datasizeBytes).toBe("number");
      expect(m.datasizeBytes).toBeGreaterThan(60 * 1024 * 1024);
      for (const field of ["resuid", "localcnt", "remotecnt"]) {
        expect(String(m[field]), field).toMatch(/^\d+$/);
      }
      expect(m.dirtyExtentList).toMatch(/^(\d+(-\d+)?(,\d+(-\d+)?)*)?$/);
      expect(expandRanges(m.dirtyExtentList).length).toBe(m.dirtyExtents);
    }
    // The first connect gave both sides the same, non-zero resource id.
    expect(a.resuid).not.toBe("0");
    expect(b.resuid).toBe(a.resuid);
    expect(b.datasizeBytes).toBe(a.datasizeBytes);
  }, TEST_TIMEOUT_MS);
});

describe("promoting stale data", () => {
  test("role primary after `discard` is refused with the reason; --force promotes", async () => {
    await withCluster(async (c) => {
      await c.createBoth();
      const noDaemon = await c.hast("b", ["promotable", "data"], { allowFailure: true });
      expect(noDaemon.code).toBe(1);
      expect(noDaemon.stdout).toMatch(/^data: not promotable: the daemon does not answer/);
      await c.startDaemon("b");
      expect((await c.hast("b", ["promotable", "data"])).stdout).toBe("data: promotable\n");
      await c.hast("b", ["discard", "data"]);
      const notNow = await c.hast("b", ["promotable", "data"], { allowFailure: true });
      expect(notNow.code).toBe(1);
      expect(notNow.stdout).toMatch(/^data: not promotable: discarded by "hast discard"/);
      const dump = await c.dump("b");
      expect(dump.syncTarget || dump.discardPending).toBe(true);
      const refused = await c.hast("b", ["role", "primary", "data"], { allowFailure: true });
      expect(refused.code).not.toBe(0);
      expect(refused.code).not.toBe(EX_SOFTWARE);
      expect(refused.stderr).toMatch(/stale|discard|sync/);
      expect(refused.stderr).toMatch(/--force/);
      expect((await c.status("b")).role).toBe("init");
      // A worker that cannot start is not a crash: nothing restarts it, its reason stays shown.
      await Bun.sleep(WORKER_RESTART_MS + 500);
      expect(readText(c.nodes.b.log)).not.toContain("exited unexpectedly");
      expect((await c.status("b")).linkError).toMatch(/stale/);
      await c.hast("b", ["role", "--force", "primary", "data"]);
      expect((await c.status("b")).role).toBe("primary");
      expect((await c.hast("b", ["promotable", "data"])).stdout).toBe("data: promotable\n");
      // The operator's choice is recorded: this copy is current, so it needs no --force again.
      const forced = await c.dump("b");
      expect([forced.syncTarget, forced.discardPending, forced.localWritesLost]).toEqual([false, false, false]);
      await c.hast("b", ["role", "init", "data"]);
      await c.hast("b", ["role", "primary", "data"]);
      expect((await c.status("b")).role).toBe("primary");
    });
  }, TEST_TIMEOUT_MS);
});

describe("online verify", () => {
  test("`verify --wait` finds a change made behind hast's back, which is resynced", async () => {
    await withCluster(async (c) => {
      await c.startPair();
      await run(["qemu-io", "-f", "raw", c.uri("a"), "-c", "write -P 0x5a 0 6M", "-c", "flush"]);
      await c.waitStatus("a", "complete", (s) => s.status === "complete" && s.dirtyBytes === 0);
      const clean = await c.hast("a", ["verify", "--wait", "data"]);
      expect(clean.stdout).toMatch(/^data: identical; \d+ bytes compared, 0 skipped/);
      const onSecondary = await c.hast("b", ["verify", "data"], { allowFailure: true });
      expect(onSecondary.code).toBe(EX_UNAVAILABLE);
      expect(onSecondary.stderr).toMatch(/Cannot verify "data": it is not primary here \(role secondary\)/);
      // Change 4 KiB inside extent 1 of b's disk (a bad disk, a stray dd); b's cache sees it.
      const m = await c.dump("b");
      const fd = openSync(c.nodes.b.image, "r+");
      try {
        writeSync(fd, new Uint8Array(4096).fill(0xff), 0, 4096, m.dataOffsetBytes + m.extentsizeBytes + 8192);
      } finally {
        closeSync(fd);
      }
      const found = await c.hast("a", ["verify", "--wait", "data"], { allowFailure: true });
      expect(found.code).toBe(1);
      expect(found.stdout).toMatch(/^data: 1 extents differed \(1\); resyncing them from this node/);
      await c.waitStatus("a", "resynced", (s) => s.status === "complete" && s.dirtyBytes === 0);
      expect(Buffer.compare(await c.readData("a"), await c.readData("b"))).toBe(0);
      const again = await c.hast("a", ["verify", "--wait", "data"]);
      expect(again.stdout).toMatch(/^data: identical/);
      const status = await c.status("a");
      expect(status.verify).toMatchObject({ state: "done", differingExtents: 0, error: null });
    });
  }, TEST_TIMEOUT_MS);
});

describe("authkey", () => {
  // Proves the key set in hast.conf authenticates the pair, and that a peer without it, even
  // one connecting from the primary's own address, is refused without disturbing the link it
  // tried to replace (before authkey, any Hello from that address replaced the connection).
  test("a keyed pair connects; a Hello without the key from the primary's address changes nothing",
    async () => {
      const cleanup = new Cleanup();
      try {
        const keys = await makeTempDir(cleanup, "hast-key-");
        const keyPath = join(keys, "data.key");
        writeFileSync(keyPath, "a shared secret of the pair\n", { mode: 0o600 });
        const port = 20000 + ((process.pid * 13) % 20000);
        const c = await createCluster(cleanup, { port, resourceLines: [`authkey ${keyPath}`] });
        await c.startPair();
        const reply = await helloWithoutKey(c.nodes.a.ip, c.nodes.b.ip, port);
        expect(reply).toMatchObject({ accepted: false });
        expect(String(reply.reason)).toMatch(/^authentication required: this node has an authkey/);
        await Bun.sleep(500);
        expect(readText(c.nodes.a.log)).not.toContain("disconnected");
        expect(readText(c.nodes.b.log)).not.toContain("replaced by a new connection");
        expect((await c.status("a")).status).toBe("complete");
        await run(["qemu-io", "-f", "raw", c.uri("a"), "-c", "write -P 0x77 0 1M", "-c", "flush"]);
        await c.waitStatus("a", "written", (s) => s.status === "complete" && s.dirtyBytes === 0);
        expect(Buffer.compare(await c.readData("a", 0, 1 << 20), await c.readData("b", 0, 1 << 20))).toBe(0);
      } finally {
        await cleanup.run();
      }
    }, TEST_TIMEOUT_MS);
});

/** Connects from `from` to a daemon at `to:port`, sends a Hello for "data" without a key, and
 *  returns the daemon's HelloReply. */
async function helloWithoutKey(from: string, to: string, port: number): Promise<Record<string, unknown>> {
  const socket = net.connect({ host: to, port, localAddress: from });
  try {
    const conn = socketConnection(socket);
    const reply = new Promise<Frame>((resolve, reject) => {
      conn.onFrame = resolve;
      conn.onClose = (why) => reject(new Error(`closed without a reply: ${why}`));
    });
    await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    conn.send(encodeJson(MessageType.Hello, {
      protocol: WIRE_VERSION, resource: "data", resuid: "0", proposedResuid: "1", localcnt: "0",
      remotecnt: "0", datasizeBytes: 0, extentsizeBytes: 0, replication: "fullsync", checksum: "none",
      compression: "hole",
    }));
    return decodeJson(await reply);
  } finally {
    socket.destroy();
  }
}

describe("a primary whose peer is not secondary yet", () => {
  test("it keeps retrying; both sides log the refusal once, not once per attempt", async () => {
    await withCluster(async (c) => {
      await c.createBoth();
      await c.startDaemon("a");
      await c.startDaemon("b");
      await c.hast("a", ["role", "primary", "data"]);
      const refusals = () => readText(c.nodes.b.log).split("\n")
        .filter((line) => line.includes("refused connection from")).length;
      // Wait for a few refused attempts (the primary retries every RECONNECT_INTERVAL_MS).
      const attempts = 4;
      await waitFor("a refused attempt", () => refusals() > 0 || undefined, { timeoutMs: 10_000 });
      await Bun.sleep(attempts * RECONNECT_INTERVAL_MS);
      // Between attempts the link shows why it is down (during one it shows "connecting").
      await c.waitStatus("a", "link refused", (s) => s.link === "refused", 10_000);
      expect(refusals()).toBe(1);
      const refusedOnA = readText(c.nodes.a.log).split("\n")
        .filter((line) => line.includes("secondary refused the connection")).length;
      expect(refusedOnA).toBe(1);
      expect(readText(c.nodes.b.log)).toContain('is not secondary here (role init)');
      await c.hast("b", ["role", "secondary", "data"]);
      await c.waitStatus("a", "complete", (s) => s.status === "complete", 30_000);
    });
  }, TEST_TIMEOUT_MS);
});

/**
 * Runs `hast serve --log <file>` (no -F) for `node` and pings the control socket right after
 * it returns. Registers, before starting, a stop of whatever PID the pidfile then names.
 */
async function serveDetached(cleanup: Cleanup, c: Cluster, node: NodeName): Promise<Served> {
  const log = join(c.dir, `${node}-detached.log`);
  let pid: number | null = null;
  cleanup.add(`stop detached daemon of ${node}`, () => stopDetached(pid ?? readPidfile(c, node)));
  const result = await c.hast(node, ["serve", "--log", log], { allowFailure: true });
  const answeredAtOnce = await controlRequest(c.nodes[node].control, { command: "ping" }, 2000)
    .then((response) => response.ok, () => false);
  pid = await waitFor(`pidfile of ${node}`, () => readPidfile(c, node) ?? false, {
    timeoutMs: 5_000,
  }).catch(() => null);
  return { result, answeredAtOnce, pid, log };
}

function readPidfile(c: Cluster, node: NodeName): number | null {
  const path = `${c.nodes[node].control}.pid`;
  if (!existsSync(path)) return null;
  const pid = Number(readFileSync(path, "utf8").trim());
  return Number.isSafeInteger(pid) && pid > 1 ? pid : null;
}

function readText(path: string): string {
  return existsSync(path) ? readFileSync(path, "utf8") : "";
}

function readCmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ");
  } catch {
    return "";
  }
}

function isRunning(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return !/^\d+ \(.*\) Z /.test(stat);
  } catch {
    return false;
  }
}

/**
 * SIGTERM to a detached daemon (only if its command line is a hast `serve`, so a reused PID is
 * left alone), then SIGKILL to its process group (it leads one: it was spawned detached) if it
 * has not exited in time; the group holds its workers.
 */
async function stopDetached(pid: number | null): Promise<void> {
  if (pid === null || !isRunning(pid) || !readCmdline(pid).includes(" serve -F")) return;
  process.kill(pid, "SIGTERM");
  const stopped = await waitFor(`daemon ${pid} to exit`, () => !isRunning(pid), {
    timeoutMs: DAEMON_STOP_MS,
  }).then(() => true, () => false);
  if (stopped) return;
  process.kill(-pid, "SIGKILL");
  await waitFor(`daemon ${pid} to die`, () => !isRunning(pid), { timeoutMs: DAEMON_STOP_MS });
}
