/**
 * Process helpers for the benchmark: run a command to completion with a time limit, and keep a
 * registry of the long-running processes it started (nbdkit, hast daemons) so that every one of
 * them is stopped by PID in a `finally`, whatever happened before.
 */
import assert from "node:assert/strict";
import { closeSync, existsSync, openSync, readFileSync } from "node:fs";

/** Default time a {@link runCommand} command may take before it is killed. */
const COMMAND_TIMEOUT_MS_DEFAULT = 120_000;
/** How long a process gets to exit after SIGTERM before it is sent SIGKILL. */
const STOP_GRACE_MS = 5_000;
/** How much of a failed command's output an error message quotes. */
const ERROR_OUTPUT_CHARS_MAX = 2_000;

/** Outcome of a command run to completion. */
export interface CommandResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Options of {@link runCommand}. */
export interface CommandOptions {
  timeoutMs?: number;
  /** Return a non-zero exit instead of throwing. */
  allowFailure?: boolean;
  cwd?: string;
}

/** Runs `argv` to completion; throws on a non-zero exit (unless allowed) or on timeout. */
export async function runCommand(
  argv: string[], options: CommandOptions = {},
): Promise<CommandResult> {
  assert(argv.length > 0);
  const timeoutMs = options.timeoutMs ?? COMMAND_TIMEOUT_MS_DEFAULT;
  const proc = Bun.spawn(argv, {
    cwd: options.cwd, stdin: "ignore", stdout: "pipe", stderr: "pipe",
  });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill("SIGKILL");
  }, timeoutMs);
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited,
  ]).finally(() => clearTimeout(timer));
  const what = `"${argv.join(" ")}"`;
  if (timedOut) throw new Error(`Cannot run ${what}: still running after ${timeoutMs} ms (killed)`);
  if (code !== 0 && !options.allowFailure) {
    const output = (stderr + stdout).trim().slice(-ERROR_OUTPUT_CHARS_MAX);
    throw new Error(`Cannot run ${what}: exit code ${code}: ${output}`);
  }
  return { code, stdout, stderr };
}

/** A long-running process started by {@link Processes.spawn}. */
export interface Started {
  name: string;
  pid: number;
  exited: Promise<number>;
  hasExited(): boolean;
}

interface Entry {
  started: Started;
  proc: Bun.Subprocess;
}

/**
 * The long-running processes this benchmark started, stopped by PID: SIGTERM, then SIGKILL after
 * a grace period. Processes they started in turn (hast's resource workers) are registered with
 * {@link Processes.adopt} and killed by PID if they outlive their parent.
 */
export class Processes {
  readonly #entries: Entry[] = [];
  readonly #adopted = new Map<number, string>();

  /** Starts `argv` with stdout and stderr appended to `logPath`. */
  spawn(name: string, argv: string[], options: { logPath: string; cwd?: string }): Started {
    const fd = openSync(options.logPath, "a");
    let proc: Bun.Subprocess;
    try {
      proc = Bun.spawn(argv, { cwd: options.cwd, stdin: "ignore", stdout: fd, stderr: fd });
    } finally {
      closeSync(fd);
    }
    const started: Started = {
      name, pid: proc.pid, exited: proc.exited,
      hasExited: () => proc.exitCode !== null || proc.signalCode !== null,
    };
    this.#entries.push({ started, proc });
    return started;
  }

  /** Remembers `pid` (not our child) to be killed at the end if its command line has `marker`. */
  adopt(pid: number, marker: string): void {
    assert(Number.isInteger(pid) && pid > 0);
    this.#adopted.set(pid, marker);
  }

  /** Stops one process started here and forgets it. */
  async stop(started: Started): Promise<void> {
    const index = this.#entries.findIndex((entry) => entry.started === started);
    assert(index >= 0, `Cannot stop "${started.name}": not started here`);
    const [entry] = this.#entries.splice(index, 1);
    await stopEntry(entry);
  }

  /** Stops every process, newest first, then kills adopted processes that are still alive. */
  async stopAll(): Promise<void> {
    for (let entry = this.#entries.pop(); entry !== undefined; entry = this.#entries.pop()) {
      await stopEntry(entry);
    }
    for (const [pid, marker] of this.#adopted) {
      if (commandLine(pid).includes(marker)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // Exited between the check and the kill.
        }
      }
    }
    this.#adopted.clear();
  }
}

async function stopEntry(entry: Entry): Promise<void> {
  if (entry.started.hasExited()) return;
  entry.proc.kill("SIGTERM");
  const exited = entry.proc.exited.then(() => true);
  const stopped = await Promise.race([exited, Bun.sleep(STOP_GRACE_MS)]);
  if (stopped !== true) {
    entry.proc.kill("SIGKILL");
    await entry.proc.exited;
  }
}

/** The command line of a live process, "" when it is gone. */
export function commandLine(pid: number): string {
  const path = `/proc/${pid}/cmdline`;
  if (!existsSync(path)) return "";
  try {
    return readFileSync(path, "utf8").replaceAll("\0", " ").trim();
  } catch {
    return "";
  }
}

/** Polls `probe` every `intervalMs` until it returns a value other than undefined. */
export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined>,
  options: { timeoutMs: number; intervalMs?: number },
): Promise<T> {
  const deadline = Date.now() + options.timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) {
      throw new Error(`Cannot wait for ${what}: not true after ${options.timeoutMs} ms`);
    }
    await Bun.sleep(options.intervalMs ?? 100);
  }
}
