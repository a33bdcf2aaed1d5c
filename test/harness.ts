/**
 * Test-host harness for hast's end-to-end tests: two hosts as network namespaces joined by a
 * veth pair, processes started inside them, and a real file system on the primary's NBD export
 * (nbdfuse → losetup → mkfs.ext4 → mount). Every helper registers its own undo action in a
 * {@link Cleanup}, so a test builds up state and tears all of it down in one `finally`.
 *
 * Facts this harness relies on (checked as root on Debian 12, kernel 6.x, iproute2, libnbd 1.14):
 *
 * - `ip netns exec NS cmd…` execs `cmd` in place: the PID Bun.spawn returns for `ip` is the
 *   command's PID. But before exec it unshares a new *mount* namespace (to remount /sys for NS)
 *   and makes `/` recursively slave. Mounts made by such a command, e.g. nbdfuse's FUSE mount,
 *   are invisible in the root mount namespace and in every other `ip netns exec` (each call makes
 *   a fresh one), and `fusermount3 -u` from outside fails with "Invalid argument". Mounts made in
 *   the root namespace still propagate into it, and files (Unix sockets included) are shared.
 * - Unix sockets are named by a file-system path and ignore network namespaces. So the hast
 *   daemons live in the namespaces, while nbdfuse, losetup, mkfs and mount all run in the root
 *   namespace and reach the primary over its socket path. Keep those sockets in temp dirs on the
 *   real file system (not in a tmpfs mounted under `ip netns exec`), and short: sun_path holds
 *   108 bytes.
 * - Where nbdfuse must reach a TCP address inside a namespace, it runs under
 *   `nsenter --net=/run/netns/NS`, which switches only the network namespace: the FUSE mount
 *   stays in the root mount namespace and nsenter, too, execs in place (same PID).
 * - nbdfuse does not daemonize; it serves in the foreground until `fusermount3 -u`, then exits.
 *   It exits at once when it cannot connect, so waiting for its file also watches its exit.
 *   Its default is up to 4 connections (multi-conn) when the server advertises it.
 * - Loop over a FUSE file works with `losetup --direct-io=off` (pinned, so behaviour does not
 *   depend on util-linux defaults): the loop driver writes through the FUSE file, and a flush
 *   becomes fsync → NBD flush. nbdfuse's manual warns such loop mounts can deadlock; teardown
 *   order therefore is umount → losetup -d → fusermount3 -u → kill nbdfuse → kill the server,
 *   which is the reverse of setup, and killing nbdfuse aborts the FUSE connection if all else
 *   hangs. Re-reading through the same loop device may be served from its page cache: to prove
 *   data reached the server, tear the stack down and attach it afresh.
 * - Processes are spawned detached (own process group); cleanup sends SIGKILL to the group
 *   while the leader is still ours (not yet reaped), so children such as hook scripts go too.
 */
import { afterEach, beforeEach } from "bun:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, writeSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, rmdir, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";

/** Default time a {@link run} command may take before it is killed. */
const RUN_TIMEOUT_MS_DEFAULT = 60_000;
/** Default time one cleanup action may take before {@link Cleanup.run} moves on. */
const CLEANUP_ACTION_TIMEOUT_MS_DEFAULT = 120_000;
/** How long to wait for a SIGKILLed process to be reaped (D state can delay it). */
const KILL_WAIT_MS = 10_000;
/** How long to keep reading pipes after exit (a grandchild may hold them open). */
const PIPE_GRACE_MS = 2_000;
/** How much of stderr an error message quotes. */
const ERROR_OUTPUT_CHARS_MAX = 4_000;

/** One undo action registered with a {@link Cleanup}. */
interface CleanupAction {
  description: string;
  action: () => void | Promise<void>;
}

/** A registry of cleanup actions run in reverse order; every helper here registers its own. */
// When a test reaches its timeout, bun abandons its promise: the test's `finally { await
// cleanup.run() }` never runs, and netns, mounts, loop devices, daemons and temp dirs stayed
// behind (found by review). So a Cleanup created while a test runs and not yet run by it when
// the test ends is run by this file's afterEach hook. Cleanups created outside a test (in
// beforeAll, for a whole file) are the file's own business.
let inTest = false;
const notRunByTheirTest = new Set<Cleanup>();
beforeEach(() => {
  inTest = true;
});
afterEach(async () => {
  inTest = false;
  const left = [...notRunByTheirTest].reverse();
  notRunByTheirTest.clear();
  if (left.length > 0) {
    process.stderr.write(`harness: running ${left.length} cleanup(s) the test did not reach (timed out?)\n`);
  }
  for (const cleanup of left) await cleanup.run();
});

export class Cleanup {
  readonly #actions: CleanupAction[] = [];
  readonly #actionTimeoutMs: number;
  #running: Promise<void> | undefined;

  /** @param options.actionTimeoutMs how long one action may run before it counts as failed. */
  constructor(options: { actionTimeoutMs?: number } = {}) {
    this.#actionTimeoutMs = options.actionTimeoutMs ?? CLEANUP_ACTION_TIMEOUT_MS_DEFAULT;
    assert(this.#actionTimeoutMs > 0);
    if (inTest) notRunByTheirTest.add(this);
  }

  /** Registers `action`; it runs before every action registered earlier. */
  add(description: string, action: () => void | Promise<void>): void {
    assert(typeof action === "function");
    this.#actions.push({ description, action });
  }

  /**
   * Returns a new Cleanup whose run() is registered here, so a test can tear down one stage
   * early (`await stage.run()`) and still have it torn down if the test fails before that.
   */
  child(description: string): Cleanup {
    const stage = new Cleanup({ actionTimeoutMs: this.#actionTimeoutMs });
    this.add(description, () => stage.run());
    return stage;
  }

  /**
   * Runs all actions in reverse order, continuing past failures, then throws an AggregateError
   * if any failed. Idempotent: each action runs at most once; concurrent calls share one run.
   */
  run(): Promise<void> {
    notRunByTheirTest.delete(this);
    if (this.#running === undefined) {
      this.#running = this.#runAll().finally(() => {
        this.#running = undefined;
      });
    }
    return this.#running;
  }

  async #runAll(): Promise<void> {
    const errors: Error[] = [];
    for (let entry = this.#actions.pop(); entry !== undefined; entry = this.#actions.pop()) {
      try {
        await withTimeout(Promise.resolve().then(entry.action), this.#actionTimeoutMs);
      } catch (error) {
        errors.push(new Error(`Cannot clean up "${entry.description}": ${message(error)}`, {
          cause: error,
        }));
      }
    }
    if (errors.length > 0) {
      const summary = errors.map((error) => error.message).join("; ");
      throw new AggregateError(errors, `Cannot clean up: ${errors.length} failed: ${summary}`);
    }
  }
}

/** Resolves with `promise`, or rejects once `timeoutMs` have passed. */
async function withTimeout<T>(promise: Promise<T>, timeoutMs: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`still running after ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

/** Waits for `promise` at most `ms`; true if it settled in time. Clears its timer either way. */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([promise.then(() => true, () => true), expired]);
  } finally {
    clearTimeout(timer);
  }
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------------------------
// Processes

/** Result of {@link run}. */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Options of {@link run}. */
export interface RunOptions {
  /** Network namespace to run in, via `ip netns exec` (which also gives a private mount ns). */
  ns?: string;
  /** Kill the command (its whole process group, SIGKILL) after this long. Default 60 s. */
  timeoutMs?: number;
  /** Bytes written to the command's stdin; without it stdin is /dev/null. */
  input?: string | Uint8Array;
  /** Variables added to (or overriding) this process's environment. */
  env?: Record<string, string>;
  /** Return a non-zero exit code instead of throwing. A timeout always throws. */
  allowFailure?: boolean;
}

/** The argv that runs `argv` inside network namespace `ns` (or `argv` itself). */
function inNamespace(argv: string[], ns: string | undefined): string[] {
  assert(argv.length > 0, "argv must name a program");
  if (ns === undefined) return argv;
  assertName(ns);
  return ["ip", "netns", "exec", ns, ...argv];
}

/** Describes a command for error messages: its argv quoted, and the namespace if any. */
function describe(argv: string[], ns: string | undefined): string {
  const where = ns === undefined ? "" : ` in netns "${ns}"`;
  return `${JSON.stringify(argv)}${where}`;
}

function tail(text: string): string {
  const trimmed = text.trim();
  if (trimmed.length <= ERROR_OUTPUT_CHARS_MAX) return trimmed;
  return `…${trimmed.slice(-ERROR_OUTPUT_CHARS_MAX)}`;
}

/** Sends `signal` to the process group led by `proc`, while `proc` has not been reaped. */
function killGroup(proc: Bun.Subprocess, signal: NodeJS.Signals): void {
  // Until Bun reaps the leader its PID (and so the group id) cannot be reused, so this only
  // reaches processes this harness started. After that, leftovers are out of reach by design.
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  try {
    process.kill(-proc.pid, signal);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ESRCH") throw error;
  }
}

/** Collects a pipe's bytes as they come; `stop()` gives up on a pipe a grandchild keeps open. */
function collect(stream: ReadableStream<Uint8Array>): {
  done: Promise<void>;
  text: () => string;
  stop: () => void;
} {
  const reader = stream.getReader();
  const chunks: Uint8Array[] = [];
  const done = (async () => {
    for (;;) {
      const { done: end, value } = await reader.read();
      if (end) return;
      chunks.push(value);
    }
  })().catch(() => undefined);
  return {
    done,
    text: () => Buffer.concat(chunks).toString("utf8"),
    stop: () => void reader.cancel().catch(() => undefined),
  };
}

function spawnOrThrow(argv: string[], options: Parameters<typeof Bun.spawn>[1]): Bun.Subprocess {
  try {
    return Bun.spawn(argv, options);
  } catch (error) {
    throw new Error(`Cannot start ${JSON.stringify(argv)}: ${message(error)}`, { cause: error });
  }
}

/**
 * Runs a command to completion, optionally inside a network namespace, and captures its output.
 * @param argv program and arguments (no shell).
 * @returns exit code, stdout and stderr as UTF-8.
 * @throws on a non-zero exit (unless `allowFailure`) or a timeout, naming argv, code and stderr.
 */
export async function run(argv: string[], options: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? RUN_TIMEOUT_MS_DEFAULT;
  assert(timeoutMs > 0);
  const full = inNamespace(argv, options.ns);
  const input = typeof options.input === "string"
    ? new TextEncoder().encode(options.input)
    : options.input;
  const proc = spawnOrThrow(full, {
    stdin: input ?? "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, ...options.env },
    detached: true,
  });
  const stdout = collect(proc.stdout as ReadableStream<Uint8Array>);
  const stderr = collect(proc.stderr as ReadableStream<Uint8Array>);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), timeoutMs);
  });
  const outcome = await Promise.race([proc.exited, expired]);
  clearTimeout(timer);
  if (outcome === "timeout") killGroup(proc, "SIGKILL");
  await settlesWithin(Promise.all([stdout.done, stderr.done]), PIPE_GRACE_MS);
  stdout.stop();
  stderr.stop();
  const what = describe(argv, options.ns);
  if (outcome === "timeout") {
    throw new Error(`Cannot run ${what}: timed out after ${timeoutMs} ms, killed pid ` +
      `${proc.pid}; stderr: ${tail(stderr.text())}`);
  }
  const result = { code: outcome, stdout: stdout.text(), stderr: stderr.text() };
  if (result.code !== 0 && options.allowFailure !== true) {
    const signal = proc.signalCode === null ? "" : ` (${proc.signalCode})`;
    throw new Error(`Cannot run ${what}: exit code ${result.code}${signal}; stderr: ` +
      tail(result.stderr));
  }
  return result;
}

/** A long-running process started by {@link spawnProcess}. */
export interface SpawnedProcess {
  /** PID of the command itself (`ip netns exec` and `nsenter` exec in place). */
  readonly pid: number;
  /** The argv as given (without the namespace wrapper). */
  readonly argv: string[];
  /** File that receives the command's stdout and stderr. */
  readonly logPath: string;
  /** Resolves with the exit code, or 128 + signal number when killed by a signal. */
  readonly exited: Promise<number>;
  /** True once the process has exited and been reaped. */
  hasExited(): boolean;
  /** Sends `signal` (default SIGTERM) to the process only (not its group). No-op once exited. */
  kill(signal?: NodeJS.Signals): void;
  /** Sends `signal` to its whole process group (e.g. a daemon and its workers). No-op once exited. */
  killGroup(signal: NodeJS.Signals): void;
  /** The log so far, for error messages. */
  readLog(): Promise<string>;
}

/** Options of {@link spawnProcess}. */
export interface SpawnOptions {
  /** Network namespace to run in, via `ip netns exec`. */
  ns?: string;
  /** Log file (appended); default a fresh file in a temp dir removed on cleanup. */
  logPath?: string;
  /** Variables added to (or overriding) this process's environment. */
  env?: Record<string, string>;
}

/**
 * Starts a long-running process in its own process group, stdout and stderr to a log file.
 * Registers: SIGKILL to its group and wait until it is reaped.
 */
export function spawnProcess(
  cleanup: Cleanup,
  argv: string[],
  options: SpawnOptions = {},
): SpawnedProcess {
  const full = inNamespace(argv, options.ns);
  const logPath = options.logPath ?? defaultLogPath(cleanup, argv[0]!);
  const fd = openSync(logPath, "a");
  let proc: Bun.Subprocess;
  try {
    writeSync(fd, `# ${new Date().toISOString()} ${describe(argv, options.ns)}\n`);
    proc = spawnOrThrow(full, {
      stdin: "ignore",
      stdout: fd,
      stderr: fd,
      env: { ...process.env, ...options.env },
      detached: true,
    });
  } finally {
    closeSync(fd);
  }
  const what = `${describe(argv, options.ns)} pid ${proc.pid}`;
  cleanup.add(`stop ${what}`, async () => {
    killGroup(proc, "SIGKILL");
    if (!(await settlesWithin(proc.exited, KILL_WAIT_MS))) {
      throw new Error(`still running ${KILL_WAIT_MS} ms after SIGKILL (D state?)`);
    }
  });
  return {
    pid: proc.pid,
    argv,
    logPath,
    exited: proc.exited,
    hasExited: () => proc.exitCode !== null || proc.signalCode !== null,
    kill: (signal: NodeJS.Signals = "SIGTERM") => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
    },
    killGroup: (signal) => killGroup(proc, signal),
    readLog: () => readFile(logPath, "utf8"),
  };
}

/** Default log file in a fresh temp dir, removed on cleanup unless HAST_KEEP_LOGS=1. */
function defaultLogPath(cleanup: Cleanup, program: string): string {
  const dir = mkdtempSync(join(tmpdir(), "hast-log-"));
  // Opt-in for debugging a failing end-to-end test: keep the daemons' logs.
  if (process.env.HAST_KEEP_LOGS !== "1") {
    cleanup.add(`remove log dir "${dir}"`, () => removeTree(dir));
  }
  const name = program.split("/").pop()!.replace(/[^A-Za-z0-9_.-]/g, "_");
  return join(dir, `${name}.log`);
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and mounts

/** Mount points listed in /proc/self/mounts, octal escapes (\040 for space) decoded. */
async function mountPoints(): Promise<string[]> {
  const text = await readFile("/proc/self/mounts", "utf8");
  return text.split("\n").filter((line) => line !== "").map((line) =>
    line.split(" ")[1]!.replace(/\\([0-7]{3})/g, (_, octal: string) =>
      String.fromCharCode(parseInt(octal, 8))));
}

/** True if `dir` is a mount point in this process's mount namespace. */
export async function isMounted(dir: string): Promise<boolean> {
  return (await mountPoints()).includes(dir);
}

/** Removes `dir` recursively, refusing (throwing) if anything is still mounted at or under it. */
async function removeTree(dir: string): Promise<void> {
  // rm -rf would descend into a mount left over by a failed unmount and delete its contents.
  const inside = (await mountPoints()).filter((m) => m === dir || m.startsWith(`${dir}/`));
  if (inside.length > 0) {
    throw new Error(`Cannot remove "${dir}": still mounted: ${JSON.stringify(inside)}`);
  }
  await rm(dir, { recursive: true, force: true });
}

/** Creates a fresh directory `<tmpdir>/<prefix>XXXXXX`; registers its recursive removal. */
export async function makeTempDir(cleanup: Cleanup, prefix: string): Promise<string> {
  assert(!prefix.includes("/"), "prefix must not contain '/'");
  const dir = await mkdtemp(join(tmpdir(), prefix));
  cleanup.add(`remove temp dir "${dir}"`, () => removeTree(dir));
  return dir;
}

/** Creates an empty mount point; registers rmdir (never recursive: it may still be in use). */
async function makeMountPoint(cleanup: Cleanup, prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  cleanup.add(`remove mount point "${dir}"`, async () => {
    if (existsSync(dir)) await rmdir(dir);
  });
  return dir;
}

/** Unmounts `dir` if mounted: a few tries of `umount` (EBUSY passes), then `umount -l`. */
async function unmount(dir: string): Promise<void> {
  for (let attempt = 0; attempt < 5 && (await isMounted(dir)); attempt++) {
    if (attempt > 0) await sleep(200 * attempt);
    await run(["umount", dir], { allowFailure: true, timeoutMs: 20_000 }).catch(() => undefined);
  }
  if (await isMounted(dir)) await run(["umount", "-l", dir], { timeoutMs: 20_000 });
}

/**
 * Mounts block device `dev` on a fresh temp dir (file system type detected by mount).
 * `readOnly` mounts with `-o ro`; note ext4 still replays a dirty journal on a writable device.
 * Registers umount (lazy fallback after retries) and removal of the mount point.
 * @returns the mount point.
 */
export async function mountFs(
  cleanup: Cleanup,
  dev: string,
  options: { readOnly?: boolean } = {},
): Promise<string> {
  const dir = await makeMountPoint(cleanup, "hast-mnt-");
  const flags = options.readOnly === true ? ["-o", "ro"] : [];
  await run(["mount", ...flags, dev, dir]);
  cleanup.add(`unmount "${dir}" (${dev})`, () => unmount(dir));
  return dir;
}

/**
 * Mounts a tmpfs of `sizeBytes` on a fresh temp dir; registers umount and removal of the mount
 * point. A sparse file on it larger than the tmpfs, behind a loop device, is a disk whose
 * writeback fails with EIO once the tmpfs is full (fdatasync reports it); `resize` heals it.
 */
export async function mountTmpfs(
  cleanup: Cleanup,
  sizeBytes: number,
): Promise<{ dir: string; resize(sizeBytes: number): Promise<void> }> {
  const dir = await makeMountPoint(cleanup, "hast-tmpfs-");
  await run(["mount", "-t", "tmpfs", "-o", `size=${sizeBytes}`, "none", dir]);
  cleanup.add(`unmount tmpfs "${dir}"`, () => unmount(dir));
  return {
    dir,
    resize: async (bytes) => {
      await run(["mount", "-o", `remount,size=${bytes}`, dir]);
    },
  };
}

/** Makes a fresh ext4 file system on `dev` (`mkfs.ext4 -F -q`). */
export async function mkfsExt4(dev: string): Promise<void> {
  await run(["mkfs.ext4", "-F", "-q", dev], { timeoutMs: 120_000 });
}

/** Runs `e2fsck -fn` on `dev` (unmounted) and throws, with its output, unless it is clean. */
export async function fsckClean(dev: string): Promise<void> {
  const result = await run(["e2fsck", "-fn", dev], { allowFailure: true, timeoutMs: 120_000 });
  if (result.code !== 0) {
    throw new Error(`Cannot confirm a clean file system on "${dev}": e2fsck exit code ` +
      `${result.code}:\n${tail(result.stdout + result.stderr)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// NBD through FUSE and loop devices

/** Options of {@link nbdfuseMount}. */
export interface NbdfuseOptions {
  /**
   * Network namespace whose network nbdfuse uses (for tcp URIs into a namespace). It runs under
   * `nsenter --net`, not `ip netns exec`, so the FUSE mount stays visible (see file comment).
   * Unix socket URIs need no namespace.
   */
  ns?: string;
  /** Pass `-r`: the file is read-only. */
  readOnly?: boolean;
  /** How long to wait for the file to appear. Default 10 s. */
  timeoutMs?: number;
}

/**
 * Presents NBD export `uri` (e.g. `nbd+unix:///?socket=/tmp/x/sock`) as the file `<dir>/nbd`
 * in a fresh temp dir, with nbdfuse running in the foreground as a spawned process. The server
 * must already accept connections (nbdfuse does not retry): wait for its socket first.
 * Registers: `fusermount3 -u` (lazy fallback), SIGKILL of nbdfuse, removal of the dir.
 */
export async function nbdfuseMount(
  cleanup: Cleanup,
  uri: string,
  options: NbdfuseOptions = {},
): Promise<{ dir: string; file: string }> {
  const dir = await makeMountPoint(cleanup, "hast-nbdfuse-");
  const file = join(dir, "nbd");
  const netns = options.ns === undefined ? [] : ["nsenter", `--net=/run/netns/${options.ns}`];
  if (options.ns !== undefined) assertName(options.ns);
  const flags = options.readOnly === true ? ["-r"] : [];
  const nbdfuse = spawnProcess(cleanup, [...netns, "nbdfuse", ...flags, dir, uri]);
  cleanup.add(`fusermount3 -u "${dir}"`, () => fuseUnmount(dir));
  await waitFor(`nbdfuse to present "${file}" for ${uri}`, async () => {
    if (nbdfuse.hasExited()) {
      throw new Error(`Cannot mount ${uri} with nbdfuse: it exited with code ` +
        `${await nbdfuse.exited}: ${tail(await nbdfuse.readLog())}`);
    }
    if (!(await isMounted(dir))) return false;
    return (await stat(file).catch(() => undefined))?.isFile() === true;
  }, { timeoutMs: options.timeoutMs ?? 10_000, intervalMs: 50 });
  return { dir, file };
}

/** Unmounts a FUSE mount point; falls back to a lazy unmount if it is busy (loop attached). */
async function fuseUnmount(dir: string): Promise<void> {
  for (let attempt = 0; attempt < 3 && (await isMounted(dir)); attempt++) {
    if (attempt > 0) await sleep(200 * attempt);
    await run(["fusermount3", "-u", dir], { allowFailure: true, timeoutMs: 20_000 });
  }
  if (await isMounted(dir)) await run(["fusermount3", "-u", "-z", dir], { timeoutMs: 20_000 });
}

/**
 * A disk that loses cached writes, as a failing one does: a loop device over a sparse file of
 * `sizeBytes` on a tmpfs with room for `roomBytes`. Once the tmpfs is full, writeback fails and
 * the next fdatasync reports EIO (once). `resize` gives the tmpfs room again (the disk "works").
 * Registers the unmount and the detach.
 */
export async function diskThatLosesWrites(
  cleanup: Cleanup, sizeBytes: number, roomBytes: number,
): Promise<{ dev: string; resize(bytes: number): Promise<void> }> {
  const tmpfs = await mountTmpfs(cleanup, roomBytes);
  const backing = join(tmpfs.dir, "disk.img");
  await run(["truncate", "-s", String(sizeBytes), backing]);
  const dev = await attachLoop(cleanup, backing);
  return { dev, resize: tmpfs.resize };
}

/**
 * Attaches `file` to a free loop device (`losetup -f --show --direct-io=off`).
 * Registers `losetup -d`, but only while the device still holds this attachment (same
 * /sys/block/loopN/diskseq, which the kernel bumps on every attach and detach), so a device that
 * was already detached and reused by someone else is left alone. The backing path is no good
 * for that check: after a lazy FUSE unmount losetup shows it as just "/nbd".
 * @returns the device path, e.g. /dev/loop3.
 */
export async function attachLoop(cleanup: Cleanup, file: string): Promise<string> {
  const result = await run(["losetup", "-f", "--show", "--direct-io=off", file]);
  const dev = result.stdout.trim();
  assert(/^\/dev\/loop\d+$/.test(dev), `unexpected losetup output "${dev}"`);
  const diskseq = await loopDiskseq(dev);
  assert(diskseq !== undefined, `"${dev}" has no diskseq`);
  cleanup.add(`detach loop "${dev}" (${file})`, async () => {
    if ((await loopDiskseq(dev)) !== diskseq) return;
    await run(["losetup", "-d", dev], { timeoutMs: 20_000 });
  });
  return dev;
}

/**
 * The kernel's sequence number of the disk now behind loop device `dev`, or undefined when
 * nothing is attached. A change means the attachment seen earlier is gone.
 */
export async function loopDiskseq(dev: string): Promise<string | undefined> {
  const sys = join("/sys/block", dev.replace(/^\/dev\//, ""));
  if (!existsSync(join(sys, "loop"))) return undefined;
  return (await readFile(join(sys, "diskseq"), "utf8").catch(() => "")).trim() || undefined;
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/** One test host: a network namespace with one veth interface and an IPv4 address. */
export interface Host {
  /** Namespace name, for `ip netns exec` / the `ns` options here. */
  ns: string;
  /** IPv4 address (without prefix length) on `ifname`. */
  ip: string;
  /** The veth interface inside `ns`. */
  ifname: string;
}

/** Two hosts joined by a veth pair. */
export interface HostPair {
  a: Host;
  b: Host;
  /** Partition: `ip link set <ifname> down` on both sides. */
  linkDown(): Promise<void>;
  /** Heal: link up on both sides, then wait until both report operstate UP. */
  linkUp(): Promise<void>;
}

/** Interface name inside each namespace; namespaces keep equal names apart. */
const VETH_NAME = "veth0";

/** Counts prefixes tried by {@link freePrefix}. */
let pairCounter = 0;
/** Counts pairs created by this process, for {@link subnetFor}. */
let subnetCounter = 0;

function assertName(name: string): void {
  assert(/^[A-Za-z0-9_.-]{1,64}$/.test(name), `bad namespace name "${name}"`);
}

/**
 * Subnet 10.<x>.<y>.0/24 for the n-th pair of this process: y differs per pair within a
 * process, x follows the PID. Pairs of different processes may share a subnet, which is
 * harmless: every address lives only inside its own namespaces.
 */
function subnetFor(counter: number): string {
  const x = 16 + (process.pid % 224);
  const y = 1 + ((counter - 1) % 254);
  return `10.${x}.${y}`;
}

/**
 * Creates namespaces `<prefix>a` and `<prefix>b` (prefix default `hast<pid><counter>`) joined by
 * a veth pair created directly inside them (nothing touches the root namespace), with
 * 10.<x>.<y>.1/24 on a and .2/24 on b, and loopback up in each.
 * Registers deletion of each namespace as soon as it exists (which also removes the veth).
 */
export async function createHostPair(
  cleanup: Cleanup,
  options: { prefix?: string } = {},
): Promise<HostPair> {
  const prefix = options.prefix ?? freePrefix();
  subnetCounter++;
  const subnet = subnetFor(subnetCounter);
  const a: Host = { ns: `${prefix}a`, ip: `${subnet}.1`, ifname: VETH_NAME };
  const b: Host = { ns: `${prefix}b`, ip: `${subnet}.2`, ifname: VETH_NAME };
  for (const host of [a, b]) {
    assertName(host.ns);
    await run(["ip", "netns", "add", host.ns]);
    cleanup.add(`delete netns "${host.ns}"`, () => deleteNamespace(host.ns));
  }
  await run(["ip", "link", "add", VETH_NAME, "netns", a.ns, "type", "veth",
    "peer", "name", VETH_NAME, "netns", b.ns]);
  for (const host of [a, b]) {
    await run(["ip", "-n", host.ns, "link", "set", "lo", "up"]);
    await run(["ip", "-n", host.ns, "addr", "add", `${host.ip}/24`, "dev", host.ifname]);
    await run(["ip", "-n", host.ns, "link", "set", host.ifname, "up"]);
  }
  const pair: HostPair = {
    a,
    b,
    linkDown: () => setLinks([a, b], "down"),
    linkUp: () => setLinks([a, b], "up"),
  };
  await waitForLinks([a, b], "UP");
  return pair;
}

/** Next `hast<pid><counter>` whose namespaces do not exist (a crashed run may have left some). */
function freePrefix(): string {
  for (let attempt = 0; attempt < 100; attempt++) {
    pairCounter++;
    const prefix = `hast${process.pid}${pairCounter}`;
    const taken = ["a", "b"].some((side) => existsSync(join("/run/netns", `${prefix}${side}`)));
    if (!taken) return prefix;
  }
  throw new Error(`Cannot pick a namespace prefix: "hast${process.pid}<n>" all taken`);
}

async function deleteNamespace(ns: string): Promise<void> {
  if (!existsSync(join("/run/netns", ns))) return;
  await run(["ip", "netns", "del", ns]);
}

async function setLinks(hosts: Host[], state: "up" | "down"): Promise<void> {
  for (const host of hosts) {
    await run(["ip", "-n", host.ns, "link", "set", host.ifname, state]);
  }
  await waitForLinks(hosts, state === "up" ? "UP" : "DOWN");
}

async function waitForLinks(hosts: Host[], operstate: "UP" | "DOWN"): Promise<void> {
  for (const host of hosts) {
    await waitFor(`${host.ns}/${host.ifname} operstate ${operstate}`, async () => {
      const shown = await run(["ip", "-j", "-n", host.ns, "link", "show", "dev", host.ifname]);
      const links = JSON.parse(shown.stdout) as { operstate?: string }[];
      return links[0]?.operstate === operstate;
    }, { timeoutMs: 10_000, intervalMs: 50 });
  }
}

// ---------------------------------------------------------------------------------------------
// File trees

/** A seeded PRNG returning numbers in [0, 1), so a randomized test replays from its seed. */
export function seededRandom(seed: number): () => number {
  const next = prng(seed);
  return () => next() / 2 ** 32;
}

/** mulberry32: a tiny seeded PRNG; returns uint32 values. */
function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/** File size for one file: some empty, many small, a few up to 1 MiB + a bit (not aligned). */
function pickSizeBytes(next: () => number): number {
  const roll = next() % 100;
  if (roll < 10) return 0;
  if (roll < 50) return next() % 4097;
  if (roll < 85) return 4097 + (next() % (128 * 1024));
  return 128 * 1024 + (next() % (1024 * 1024 - 128 * 1024 + 4097));
}

/** Relative path of file `index`: 0 to 3 directory levels from a small set of names. */
function pickPath(next: () => number, index: number): string {
  const depth = next() % 4;
  const parts: string[] = [];
  for (let level = 0; level < depth; level++) parts.push(`d${level}${next() % 3}`);
  parts.push(`f${String(index).padStart(4, "0")}.bin`);
  return parts.join("/");
}

function fillBytes(next: () => number, sizeBytes: number): Buffer {
  const words = new Uint32Array(Math.ceil(sizeBytes / 4));
  for (let i = 0; i < words.length; i++) words[i] = next();
  return Buffer.from(words.buffer, 0, sizeBytes);
}

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/**
 * Writes a deterministic tree of files under `root` (same seed, same tree): nested dirs and
 * sizes from 0 to about 1 MiB, content from a seeded PRNG.
 * @param options.files number of files, default 40.
 * @returns manifest: relative path → sha256 hex, sorted by path.
 */
export async function writeTree(
  root: string,
  seed: number,
  options: { files?: number } = {},
): Promise<Map<string, string>> {
  const files = options.files ?? 40;
  assert(Number.isInteger(files) && files >= 0);
  const next = prng(seed);
  const manifest = new Map<string, string>();
  for (let index = 0; index < files; index++) {
    const path = pickPath(next, index);
    const bytes = fillBytes(next, pickSizeBytes(next));
    await mkdir(dirname(join(root, path)), { recursive: true });
    await writeFile(join(root, path), bytes);
    manifest.set(path, sha256(bytes));
  }
  return sortedMap(manifest);
}

/**
 * Hashes every regular file under `root` (directories are walked, other types ignored, so an
 * ext4 root's empty lost+found does not show).
 * @returns relative path → sha256 hex, sorted by path.
 */
export async function hashTree(root: string): Promise<Map<string, string>> {
  const manifest = new Map<string, string>();
  const walk = async (relative: string): Promise<void> => {
    const entries = await readdir(join(root, relative), { withFileTypes: true });
    for (const entry of entries) {
      const path = relative === "" ? entry.name : `${relative}/${entry.name}`;
      if (entry.isDirectory()) await walk(path);
      else if (entry.isFile()) manifest.set(path, sha256(await readFile(join(root, path))));
    }
  };
  await walk("");
  return sortedMap(manifest);
}

function sortedMap(map: Map<string, string>): Map<string, string> {
  return new Map([...map].sort(([left], [right]) => (left < right ? -1 : left > right ? 1 : 0)));
}

// ---------------------------------------------------------------------------------------------
// Polling

/**
 * Polls `fn` until it returns a truthy value and returns that value.
 * An exception from `fn` ends the wait at once (throw to report a condition that can't heal).
 * @throws `Cannot wait for <what>: …` after `timeoutMs` (default 10 s).
 */
export async function waitFor<T>(
  what: string,
  fn: () => Promise<T | undefined | false> | T | undefined | false,
  options: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<T> {
  const timeoutMs = options.timeoutMs ?? 10_000;
  const intervalMs = options.intervalMs ?? 100;
  assert(timeoutMs > 0 && intervalMs > 0);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() >= deadline) {
      throw new Error(`Cannot wait for ${what}: not reached after ${timeoutMs} ms`);
    }
    await sleep(Math.min(intervalMs, Math.max(0, deadline - Date.now())));
  }
}

/** Expands `hast dump`'s dirtyExtentList ("0-2,5") to the extent numbers. */
export function expandRanges(list: string): number[] {
  const out: number[] = [];
  for (const part of list === "" ? [] : list.split(",")) {
    const [first, last = first] = part.split("-").map(Number);
    for (let e = first!; e <= last!; e++) out.push(e);
  }
  return out;
}
