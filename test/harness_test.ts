// Proves the end-to-end test harness works on this machine and leaves nothing behind: each test
// builds real namespaces, processes, FUSE mounts, loop devices and file systems through the
// harness, checks they behave, runs the Cleanup, and then lists the system (ip netns, losetup,
// /proc/mounts, /proc/*) to show that none of it remains. Needs root, iproute2, ping, nbdkit,
// nbdfuse (libnbd-bin), fuse3 and e2fsprogs.
import { describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  attachLoop,
  Cleanup,
  createHostPair,
  fsckClean,
  hashTree,
  isMounted,
  loopDiskseq,
  makeTempDir,
  mkfsExt4,
  mountFs,
  nbdfuseMount,
  run,
  spawnProcess,
  waitFor,
  writeTree,
} from "./harness.ts";

const LONG_TEST_MS = 120_000;

/** True if `pid` exists and is not a zombie. */
async function isAlive(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

/** PIDs of live processes whose argv mentions any of `needles`. */
async function processesMentioning(needles: string[]): Promise<number[]> {
  const found: number[] = [];
  for (const name of await readdir("/proc")) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, "utf8").catch(() => "");
    if (needles.some((needle) => cmdline.includes(needle)) && (await isAlive(Number(name)))) {
      found.push(Number(name));
    }
  }
  return found;
}

/** A loop device as attached by a test: its path and the attachment's diskseq. */
interface LoopSeen {
  dev: string;
  diskseq: string | undefined;
}

async function seeLoop(dev: string): Promise<LoopSeen> {
  const diskseq = await loopDiskseq(dev);
  expect(diskseq).toBeDefined();
  return { dev, diskseq };
}

/**
 * Asserts that nothing the test made is left: no namespace, mount, loop or process mentioning
 * one of `needles`, and none of `loops` still holding the attachment the test made.
 */
async function expectNothingLeft(needles: string[], loops: LoopSeen[] = []): Promise<void> {
  const netns = (await run(["ip", "netns", "list"])).stdout;
  const attached = (await run(["losetup", "-a"])).stdout;
  const mounts = await readFile("/proc/self/mounts", "utf8");
  for (const needle of needles) {
    expect(netns).not.toContain(needle);
    expect(attached).not.toContain(needle);
    expect(mounts).not.toContain(needle);
  }
  for (const loop of loops) expect(await loopDiskseq(loop.dev)).not.toBe(loop.diskseq);
  expect(await processesMentioning(needles)).toEqual([]);
}

async function ping(from: string, to: string): Promise<number> {
  return (await run(["ping", "-c1", "-W2", to], { ns: from, allowFailure: true })).code;
}

/** Starts nbdkit's 64 MiB memory disk on a Unix socket in a temp dir, inside `ns`. */
async function startNbdkit(cleanup: Cleanup, ns: string): Promise<{ pid: number; uri: string }> {
  const dir = await makeTempDir(cleanup, "hast-nbdkit-");
  const socket = join(dir, "sock");
  const pidfile = join(dir, "pid");
  const nbdkit = spawnProcess(cleanup, ["nbdkit", "--foreground", "--unix", socket,
    "--pidfile", pidfile, "memory", "64M"], { ns });
  await waitFor("nbdkit pidfile", () => existsSync(pidfile));
  // The pidfile names the process Bun started: `ip netns exec` execs in place.
  expect(Number((await readFile(pidfile, "utf8")).trim())).toBe(nbdkit.pid);
  return { pid: nbdkit.pid, uri: `nbd+unix:///?socket=${socket}` };
}

describe("Cleanup", () => {
  test("runs in reverse order, continues past failures, aggregates them, runs once", async () => {
    const cleanup = new Cleanup();
    const ran: string[] = [];
    cleanup.add("first", () => void ran.push("first"));
    cleanup.add("broken", () => {
      throw new Error("boom");
    });
    cleanup.add("last", async () => void ran.push("last"));
    const error = await cleanup.run().then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(AggregateError);
    expect((error as AggregateError).errors).toHaveLength(1);
    expect((error as AggregateError).message).toContain('"broken": boom');
    expect(ran).toEqual(["last", "first"]);
    await cleanup.run();
    expect(ran).toEqual(["last", "first"]);
  });

  test("a child stage runs early once, or with its parent", async () => {
    const cleanup = new Cleanup();
    const ran: string[] = [];
    cleanup.add("parent", () => void ran.push("parent"));
    const early = cleanup.child("early");
    early.add("early", () => void ran.push("early"));
    const late = cleanup.child("late");
    late.add("late", () => void ran.push("late"));
    await early.run();
    await cleanup.run();
    expect(ran).toEqual(["early", "late", "parent"]);
  });

  test("a hung action times out and the rest still run", async () => {
    const cleanup = new Cleanup({ actionTimeoutMs: 50 });
    let ran = false;
    cleanup.add("runs", () => void (ran = true));
    cleanup.add("hangs", () => new Promise<void>(() => undefined));
    await expect(cleanup.run()).rejects.toThrow("still running after 50 ms");
    expect(ran).toBe(true);
  });
});

describe("run", () => {
  test("captures output, takes input and env, reports failures with argv and stderr", async () => {
    const echoed = await run(["sh", "-c", 'cat; printf "$X"; echo oops >&2'], {
      input: "in:",
      env: { X: "env" },
    });
    expect(echoed).toEqual({ code: 0, stdout: "in:env", stderr: "oops\n" });
    const failing = ["sh", "-c", "echo why >&2; exit 3"];
    await expect(run(failing)).rejects.toThrow(
      `Cannot run ${JSON.stringify(failing)}: exit code 3; stderr: why`,
    );
    expect((await run(failing, { allowFailure: true })).code).toBe(3);
    await expect(run(["/nonexistent/program"])).rejects.toThrow("Cannot start");
  });

  test("a timeout kills the command and its children by process group", async () => {
    const cleanup = new Cleanup();
    try {
      const dir = await makeTempDir(cleanup, "hast-run-");
      const pids = join(dir, "pids");
      const started = Date.now();
      const script = `echo $$ > ${pids}; sleep 30 & echo $! >> ${pids}; wait`;
      await expect(run(["sh", "-c", script], { timeoutMs: 300 })).rejects.toThrow(
        "timed out after 300 ms",
      );
      expect(Date.now() - started).toBeLessThan(25_000); // did not wait for the 30 s sleep
      const [shell, child] = (await readFile(pids, "utf8")).trim().split("\n").map(Number);
      await waitFor("killed processes to go", async () =>
        !(await isAlive(shell!)) && !(await isAlive(child!)));
    } finally {
      await cleanup.run();
    }
  });
});

describe("waitFor", () => {
  test("returns the first truthy value, times out naming what, passes errors through", async () => {
    let calls = 0;
    expect(await waitFor("third call", () => (++calls >= 3 ? calls : false), {
      intervalMs: 1,
    })).toBe(3);
    await expect(waitFor("never", () => false, { timeoutMs: 30, intervalMs: 5 })).rejects
      .toThrow("Cannot wait for never: not reached after 30 ms");
    await expect(waitFor("broken", () => {
      throw new Error("fatal");
    })).rejects.toThrow("fatal");
  });
});

describe("writeTree and hashTree", () => {
  test("the same seed writes the same nested tree, and hashTree reads it back", async () => {
    const cleanup = new Cleanup();
    try {
      const one = await makeTempDir(cleanup, "hast-tree-");
      const two = await makeTempDir(cleanup, "hast-tree-");
      const manifest = await writeTree(one, 7, { files: 30 });
      expect(manifest.size).toBe(30);
      expect([...(await writeTree(two, 7, { files: 30 }))]).toEqual([...manifest]);
      expect([...(await hashTree(one))]).toEqual([...manifest]);
      expect([...manifest.keys()].some((path) => path.split("/").length >= 3)).toBe(true);
      const sizes = await Promise.all([...manifest.keys()].map(async (path) =>
        (await stat(join(one, path))).size));
      expect(Math.min(...sizes)).toBe(0);
      expect(Math.max(...sizes)).toBeGreaterThan(128 * 1024);
      expect(Math.max(...sizes)).toBeLessThanOrEqual(1024 * 1024 + 4096);
      const other = await makeTempDir(cleanup, "hast-tree-");
      expect([...(await writeTree(other, 8, { files: 30 }))]).not.toEqual([...manifest]);
    } finally {
      await cleanup.run();
    }
  });
});

describe("spawnProcess", () => {
  test("logs output, and cleanup kills the process with its children", async () => {
    const cleanup = new Cleanup();
    const dir = await makeTempDir(cleanup, "hast-spawn-");
    const childPidFile = join(dir, "child");
    const script = `echo hello; sleep 1000 & echo $! > ${childPidFile}; wait`;
    const proc = spawnProcess(cleanup, ["sh", "-c", script]);
    let childPid = 0;
    try {
      await waitFor("log output", async () => (await proc.readLog()).includes("hello"));
      await waitFor("child pid", () => existsSync(childPidFile));
      childPid = Number((await readFile(childPidFile, "utf8")).trim());
      expect(proc.hasExited()).toBe(false);
      expect(await isAlive(childPid)).toBe(true);
    } finally {
      await cleanup.run();
    }
    expect(await proc.exited).toBe(128 + 9);
    expect(proc.hasExited()).toBe(true);
    expect(existsSync(proc.logPath)).toBe(false);
    await waitFor("sleep child to go", async () => !(await isAlive(childPid)));
  });
});

describe("makeTempDir", () => {
  test("cleanup refuses to delete through a mount left inside", async () => {
    const cleanup = new Cleanup();
    const dir = await makeTempDir(cleanup, "hast-guard-");
    const inner = join(dir, "inner");
    try {
      await mkdir(inner);
      await run(["mount", "-t", "tmpfs", "none", inner]);
      await writeFile(join(inner, "keep"), "precious");
      await expect(cleanup.run()).rejects.toThrow("still mounted");
      expect(await readFile(join(inner, "keep"), "utf8")).toBe("precious");
    } finally {
      if (await isMounted(inner)) await run(["umount", inner]);
      await run(["rm", "-rf", dir]);
    }
  });
});

describe("createHostPair", () => {
  test("hosts ping each other, linkDown partitions, linkUp heals, cleanup removes", async () => {
    const cleanup = new Cleanup();
    let names: string[] = [];
    try {
      const pair = await createHostPair(cleanup);
      const other = await createHostPair(cleanup);
      names = [pair.a.ns, pair.b.ns, other.a.ns, other.b.ns];
      expect(new Set(names).size).toBe(4);
      expect(pair.a.ip.split(".").slice(0, 3)).toEqual(pair.b.ip.split(".").slice(0, 3));
      expect(pair.a.ip).not.toBe(other.a.ip);
      const addresses = await run(["ip", "-o", "-4", "addr", "show"], { ns: pair.a.ns });
      expect(addresses.stdout).toContain(`${pair.a.ip}/24`);
      expect(addresses.stdout).toContain("127.0.0.1");
      expect(await ping(pair.a.ns, pair.b.ip)).toBe(0);
      expect(await ping(pair.b.ns, pair.a.ip)).toBe(0);
      expect(await ping(pair.a.ns, "127.0.0.1")).toBe(0);
      await pair.linkDown();
      expect(await ping(pair.a.ns, pair.b.ip)).not.toBe(0);
      expect(await ping(pair.b.ns, pair.a.ip)).not.toBe(0);
      expect(await ping(other.a.ns, other.b.ip)).toBe(0);
      await pair.linkUp();
      expect(await ping(pair.a.ns, pair.b.ip)).toBe(0);
    } finally {
      await cleanup.run();
    }
    expect(names).toHaveLength(4);
    await expectNothingLeft(names);
  }, LONG_TEST_MS);

  test("a half-made pair is undone without touching what was not ours", async () => {
    const prefix = `hastx${process.pid}`;
    const cleanup = new Cleanup();
    await run(["ip", "netns", "add", `${prefix}b`]);
    try {
      await expect(createHostPair(cleanup, { prefix })).rejects.toThrow("netns");
      await cleanup.run();
      const list = (await run(["ip", "netns", "list"])).stdout;
      expect(list).not.toContain(`${prefix}a`);
      expect(list).toContain(`${prefix}b`);
    } finally {
      await cleanup.run();
      await run(["ip", "netns", "del", `${prefix}b`]);
    }
  });
});

describe("nbdfuse, loop and mount", () => {
  test("ext4 on nbdkit via nbdfuse survives a full teardown and reattach", async () => {
    const cleanup = new Cleanup();
    const needles: string[] = [];
    const loops: LoopSeen[] = [];
    try {
      const pair = await createHostPair(cleanup);
      needles.push(pair.a.ns, pair.b.ns);
      // The server lives in a namespace; nbdfuse reaches its Unix socket from the root one.
      const nbdkit = await startNbdkit(cleanup, pair.a.ns);
      needles.push(nbdkit.uri.split("=")[1]!);
      const first = cleanup.child("first attach");
      const { dir, file } = await nbdfuseMount(first, nbdkit.uri);
      needles.push(dir);
      expect((await stat(file)).size).toBe(64 * 1024 * 1024);
      const dev = await attachLoop(first, file);
      loops.push(await seeLoop(dev));
      await mkfsExt4(dev);
      const mounted = first.child("first mount");
      const mnt = await mountFs(mounted, dev);
      needles.push(mnt);
      const manifest = await writeTree(mnt, 42, { files: 40 });
      await mounted.run();
      expect(await isMounted(mnt)).toBe(false);
      await fsckClean(dev);
      await first.run();
      expect(await isMounted(dir)).toBe(false);
      expect(await loopDiskseq(dev)).not.toBe(loops[0]!.diskseq);
      expect(await processesMentioning([dir])).toEqual([]);
      // Fresh FUSE mount and loop device: no page cache can answer, only the server.
      const second = await nbdfuseMount(cleanup, nbdkit.uri, { readOnly: true });
      needles.push(second.dir);
      const readonlyDev = await attachLoop(cleanup, second.file);
      loops.push(await seeLoop(readonlyDev));
      await fsckClean(readonlyDev);
      const again = await mountFs(cleanup, readonlyDev, { readOnly: true });
      needles.push(again);
      expect([...(await hashTree(again))]).toEqual([...manifest]);
      expect(await isAlive(nbdkit.pid)).toBe(true);
    } finally {
      await cleanup.run();
    }
    expect(needles).toHaveLength(7);
    expect(loops).toHaveLength(2);
    await expectNothingLeft(needles, loops);
  }, LONG_TEST_MS);

  test("with ns, nbdfuse reaches a TCP server in the namespace and mounts visibly", async () => {
    const cleanup = new Cleanup();
    const needles: string[] = [];
    try {
      const pair = await createHostPair(cleanup);
      needles.push(pair.a.ns, pair.b.ns);
      const port = String(20_000 + (process.pid % 20_000));
      const dir = await makeTempDir(cleanup, "hast-nbdkit-");
      const pidfile = join(dir, "pid");
      spawnProcess(cleanup, ["nbdkit", "--foreground", "--ipaddr", pair.a.ip, "--port", port,
        "--pidfile", pidfile, "memory", "1M"], { ns: pair.a.ns });
      await waitFor("nbdkit pidfile", () => existsSync(pidfile));
      const uri = `nbd://${pair.a.ip}:${port}`;
      const mounted = await nbdfuseMount(cleanup, uri, { ns: pair.b.ns });
      needles.push(mounted.dir);
      expect(await isMounted(mounted.dir)).toBe(true);
      expect((await stat(mounted.file)).size).toBe(1024 * 1024);
    } finally {
      await cleanup.run();
    }
    await expectNothingLeft(needles);
  }, LONG_TEST_MS);

  test("nbdfuse under `ip netns exec` mounts in a private mount namespace", async () => {
    // Documents why nbdfuseMount never uses `ip netns exec`: the mount is invisible to us.
    const cleanup = new Cleanup();
    const needles: string[] = [];
    try {
      const pair = await createHostPair(cleanup);
      needles.push(pair.a.ns, pair.b.ns);
      const nbdkit = await startNbdkit(cleanup, pair.a.ns);
      const dir = await makeTempDir(cleanup, "hast-hidden-");
      needles.push(dir);
      const hidden = spawnProcess(cleanup, ["nbdfuse", dir, nbdkit.uri], { ns: pair.b.ns });
      await waitFor("nbdfuse to mount in its own namespace", async () =>
        (await readFile(`/proc/${hidden.pid}/mounts`, "utf8")).includes(dir));
      expect(await isMounted(dir)).toBe(false);
      expect(await readdir(dir)).toEqual([]);
    } finally {
      await cleanup.run();
    }
    await expectNothingLeft(needles);
  }, LONG_TEST_MS);

  test("a server that is not there fails fast and leaves nothing", async () => {
    const cleanup = new Cleanup();
    const dir = await makeTempDir(cleanup, "hast-nosrv-");
    const uri = `nbd+unix:///?socket=${join(dir, "missing.sock")}`;
    const started = Date.now();
    try {
      // "it exited": the mount noticed nbdfuse's exit rather than waiting out its 10 s deadline.
      await expect(nbdfuseMount(cleanup, uri)).rejects.toThrow(/Cannot mount .* it exited with code/);
    } finally {
      await cleanup.run();
    }
    await expectNothingLeft([dir]);
  });
});

describe("the test runner (scripts/test.ts)", () => {
  const RUNNER = join(import.meta.dir, "..", "scripts", "test.ts");

  // A fixture tree with one clean test file and one, two directories deep, that passes but leaves
  // a process outside its process group (setsid), a network namespace named like the harness's,
  // and a tmpfs mount. The runner must find the nested file, fail the run on it, name each
  // leftover and remove the process and the namespace.
  test("finds nested test files and fails one that leaves a process, netns or mount", async () => {
    const cleanup = new Cleanup();
    try {
      const root = await makeTempDir(cleanup, "hast-runner-");
      const mountpoint = join(root, "mnt");
      await mkdir(mountpoint);
      const marker = `hast-runner-leak-${process.pid}`;
      const leaking = [
        `import { expect, test } from "bun:test";`,
        `test("passes but leaves things", () => {`,
        `  const quiet = { stdout: "ignore", stderr: "ignore" } as const;`,
        `  Bun.spawnSync(["setsid", "-f", "bash", "-c", "exec -a ${marker} sleep 600"], quiet);`,
        "  Bun.spawnSync([\"ip\", \"netns\", \"add\", `hast${process.pid}99a`]);",
        `  Bun.spawnSync(["mount", "-t", "tmpfs", "${marker}", "${mountpoint}"]);`,
        `  expect(1).toBe(1);`,
        `});`,
        ``,
      ].join("\n");
      await mkdir(join(root, "test", "deeper", "sub"), { recursive: true });
      await writeFile(join(root, "test", "ok_test.ts"),
        `import { expect, test } from "bun:test";\ntest("ok", () => expect(1).toBe(1));\n`);
      await writeFile(join(root, "test", "deeper", "sub", "leak_test.ts"), leaking);
      cleanup.add("unmount the fixture's tmpfs", async () => {
        if (await isMounted(mountpoint)) await run(["umount", mountpoint]);
      });
      const result = await run([process.execPath, RUNNER], {
        env: { HAST_TEST_ROOT: root }, allowFailure: true, timeoutMs: 60_000,
      });
      const output = result.stdout + result.stderr;
      expect(result.code, output).toBe(1);
      expect(output).toMatch(/ok\s+[\d.]+ s\s+1 tests\s+test\/ok_test\.ts/);
      expect(output).toMatch(/FAIL \(3 left behind\).*test\/deeper\/sub\/leak_test\.ts/);
      expect(output).toContain(`${marker} 600`);
      const ns = /network namespace (hast\d+99a)/.exec(output)?.[1];
      expect(ns).toBeDefined();
      expect(output).toContain(`mount ${mountpoint}`);
      expect(await processesMentioning([marker])).toEqual([]);
      expect((await run(["ip", "netns", "list"])).stdout).not.toContain(ns!);
    } finally {
      await cleanup.run();
    }
  }, LONG_TEST_MS);
});

describe("the tree check (scripts/check.ts)", () => {
  // A tree whose only problem is a shell script that does not parse: the check must fail and
  // name it, since CI runs scripts/setup and the README's quick start runs scripts/demo.
  test("fails on a shell script that bash cannot parse", async () => {
    const cleanup = new Cleanup();
    try {
      const root = await makeTempDir(cleanup, "hast-check-");
      await mkdir(join(root, "scripts"));
      await writeFile(join(root, "scripts", "demo"), "#!/usr/bin/env bash\nif true; then\n  echo unclosed\n");
      await writeFile(join(root, "scripts", "ok.ts"), "export const ok = 1;\n");
      const check = Bun.spawn([process.execPath, join(import.meta.dir, "..", "scripts", "check.ts")],
        { cwd: root, stdout: "pipe", stderr: "pipe" });
      const [code, stderr] = await Promise.all([check.exited, new Response(check.stderr).text()]);
      expect(code, stderr).toBe(1);
      expect(stderr).toContain("scripts/demo: bash -n:");
      await writeFile(join(root, "scripts", "demo"), "#!/usr/bin/env bash\nif true; then\n  echo closed\nfi\n");
      const again = Bun.spawn([process.execPath, join(import.meta.dir, "..", "scripts", "check.ts")],
        { cwd: root, stdout: "pipe", stderr: "pipe" });
      expect(await again.exited).toBe(0);
    } finally {
      await cleanup.run();
    }
  });
});
