/**
 * Logging to stderr, one line per event: time, pid, component, level, text.
 * The daemon's stderr goes to the terminal with -F, else to its log file.
 */
export type LogLevel = "debug" | "info" | "warn" | "error";
export type Logger = (level: LogLevel, message: string) => void;

/** A logger for `component`; debug lines only when `debug` > 0 (`-d`). */
export function makeLogger(component: string, debug: number): Logger {
  return (level, message) => {
    if (level === "debug" && debug <= 0) return;
    const time = new Date().toISOString();
    process.stderr.write(`${time} hast[${process.pid}] ${component}: ${level}: ${message}\n`);
  };
}

/**
 * A peer refused again for the same reason is logged at most this often: a primary retries
 * every RECONNECT_INTERVAL_MS (lib/primary.ts).
 */
export const REFUSAL_LOG_INTERVAL_MS = 60_000;

/** Entries a {@linkcode RepeatLimiter} remembers; past this it forgets them all and starts again. */
export const REPEAT_LIMITER_MAX_KEYS = 1024;

/**
 * Lets a message that repeats (the same peer refused for the same reason every retry) through
 * once per interval: the first time, then at most once per `intervalMs` with the number of
 * repeats held back. A different key is a different message and goes through at once.
 */
export class RepeatLimiter {
  readonly #seen = new Map<string, { atMs: number; held: number }>();

  constructor(private readonly intervalMs: number, private readonly now: () => number = Date.now) {}

  /** The text to log for this occurrence of `key`, or null to hold it back. */
  pass(key: string, message: string): string | null {
    const now = this.now();
    const seen = this.#seen.get(key);
    if (seen !== undefined && now - seen.atMs < this.intervalMs) {
      seen.held++;
      return null;
    }
    if (this.#seen.size >= REPEAT_LIMITER_MAX_KEYS) this.#seen.clear();
    this.#seen.set(key, { atMs: now, held: 0 });
    if (seen === undefined || seen.held === 0) return message;
    return `${message} (and ${seen.held} times more in the ${Math.round((now - seen.atMs) / 1000)} s before)`;
  }
}
