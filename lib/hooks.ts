/**
 * Hooks (spec §10): `exec` runs the operator's program on events, never
 * waiting for it on the I/O path. Non-zero exits are logged, and so is a hook
 * still running after HOOK_WARN_MS.
 */
import { spawn } from "node:child_process";

export type HookEvent =
  | "role" | "connect" | "disconnect" | "syncstart" | "syncdone" | "syncintr" | "split-brain";

export const HOOK_WARN_MS = 60_000;
/**
 * At most this many hooks of one resource run at once in a process; further events are logged
 * and dropped. The count is per resource and per process, shared by every runner made for that
 * resource: the daemon makes a new runner for each role hook, and (found by review) each such
 * runner started at 0, so role hooks were never capped.
 */
export const MAX_RUNNING_HOOKS = 32;

/** Hooks running in this process, per resource name; an entry is removed when it drops to 0. */
const runningByResource = new Map<string, number>();

/** Hooks of `resource` running in this process, by whichever runner started them. */
export function runningHooksOf(resource: string): number {
  return runningByResource.get(resource) ?? 0;
}

function countHook(resource: string, delta: 1 | -1): void {
  const count = runningHooksOf(resource) + delta;
  if (count < 0) throw new Error(`Cannot count hooks of "${resource}": more ended than started`);
  if (count === 0) runningByResource.delete(resource);
  else runningByResource.set(resource, count);
}

export interface HookRunner {
  /** Starts the hook for `event` with extra arguments; returns at once. */
  run(event: HookEvent, args: string[]): void;
}

/** A HookRunner that spawns processes and can say how many are still running. */
export interface ExecHookRunner extends HookRunner {
  /** Hooks this runner started and that have not ended yet (exited, or failed to start). */
  running(): number;
}

export interface ExecHookOptions {
  /** Warn about a hook still running after this long; HOOK_WARN_MS by default. */
  warnMs?: number;
}

type Log = (level: "info" | "warn" | "error" | "debug", message: string) => void;

/**
 * Runs `program event resource args…` for each event (nothing when program is null). `program`
 * may be a function, asked at each event: a worker's hooks then follow a reloaded `exec` (found
 * by review: they kept running the program the worker started with).
 */
export function execHooks(
  programOf: string | null | (() => string | null), resource: string, log: Log, options: ExecHookOptions = {},
): ExecHookRunner {
  const warnMs = options.warnMs ?? HOOK_WARN_MS;
  let running = 0;
  return {
    running: () => running,
    run(event, args) {
      const program = typeof programOf === "function" ? programOf() : programOf;
      if (program === null) return;
      const resourceRunning = runningHooksOf(resource);
      if (resourceRunning >= MAX_RUNNING_HOOKS) {
        log("error",
          `hook "${program}" not run for ${event}: ${resourceRunning} hooks still running for "${resource}"`);
        return;
      }
      const argv = [event, resource, ...args];
      const started = Date.now();
      let child;
      try {
        child = spawn(program, argv, { stdio: "ignore", detached: false });
      } catch (error) {
        log("error", `hook "${program}" ${argv.join(" ")} could not start: ${error}`);
        return;
      }
      running++;
      countHook(resource, 1);
      const warn = setTimeout(() => {
        log("warn", `hook "${program}" ${argv.join(" ")} still running after ${warnMs} ms`);
      }, warnMs);
      warn.unref?.();
      // The hook ends once, on whichever comes first: 'exit', or 'error' from a spawn that
      // failed (ENOENT, EACCES), after which Bun emits no 'exit' (Node may emit both).
      // We never kill hooks nor talk to them over IPC, so 'error' means it did not start.
      let ended = false;
      const end = (): boolean => {
        if (ended) return false;
        ended = true;
        running--;
        countHook(resource, -1);
        clearTimeout(warn);
        return true;
      };
      child.on("error", (error) => {
        if (end()) log("error", `hook "${program}" ${argv.join(" ")} could not start: ${error.message}`);
        else log("error", `hook "${program}" ${argv.join(" ")}: ${error.message}`);
      });
      child.on("exit", (code, signal) => {
        if (!end() || code === 0) return;
        const how = signal ? `signal ${signal}` : `exit code ${code}`;
        log("warn", `hook "${program}" ${argv.join(" ")} ended with ${how} after ${Date.now() - started} ms`);
      });
    },
  };
}
