/**
 * Logging to stderr, one line per event: time, pid, component, level, text.
 * The daemon's stderr goes to the terminal with -F, else to its log file.
 */
import { writeSync } from "node:fs";

export type LogLevel = "debug" | "info" | "warn" | "error";
export type Logger = (level: LogLevel, message: string) => void;

/**
 * Writes text to the log, all of it or throwing: `writeSync` on stderr by default. Tests pass
 * their own to fail on demand.
 */
export type LogWrite = (text: string) => void;

/**
 * Where the lines of every logger of a process go. A line that cannot be written (the log's
 * disk is full, EIO, a non-blocking pipe is full) is dropped and counted, never thrown at the
 * caller: before, process.stderr emitted an 'error' event nobody handled, and the daemon and its
 * workers exited with code 1 at the first line written to a full disk (found by review, with
 * stderr on /dev/full). The first line that is written again follows a line saying how many
 * were lost and why. The write is synchronous, as process.stderr's is on Linux for files and
 * pipes: a log that blocks (a terminal held by ^S) holds the daemon, as before.
 */
export class LogOutput {
  #lostLines = 0;
  #lastError = "";
  /** Part of a line reached the log before a write failed: the next text starts a new line. */
  #torn = false;

  constructor(private readonly write: LogWrite = writeStderr) {}

  /** Lines dropped since the last one that was written. */
  get lostLines(): number {
    return this.#lostLines;
  }

  /** Writes `line` (ending in a newline) after the report of lines lost before it, if any. */
  emit(line: string, lostReport: (count: number, error: string) => string): void {
    let text = this.#lostLines > 0 ? lostReport(this.#lostLines, this.#lastError) + line : line;
    if (this.#torn) text = `\n${text}`;
    try {
      this.write(text);
      this.#lostLines = 0;
      this.#torn = false;
    } catch (error) {
      this.#lostLines++;
      this.#lastError = oneLine(error instanceof Error ? error.message : String(error));
      if ((error as { partial?: unknown }).partial === true) this.#torn = true;
    }
  }
}

/** Writes all of `text` to fd 2; on failure after a part was written, the error says `partial`. */
function writeStderr(text: string): void {
  const bytes = Buffer.from(text);
  let doneBytes = 0;
  try {
    while (doneBytes < bytes.length) doneBytes += writeSync(2, bytes, doneBytes, bytes.length - doneBytes);
  } catch (error) {
    if (doneBytes > 0 && error instanceof Error) Object.assign(error, { partial: true });
    throw error;
  }
}

/** The output of every logger that names none: the process's stderr. */
const STDERR_OUTPUT = new LogOutput();

/** Options of {@linkcode makeLogger}. */
export interface LoggerOptions {
  /** Default: the process's stderr, shared by every logger. */
  output?: LogOutput;
  /** Default: the system clock. */
  now?: () => Date;
}

/** A logger for `component`; debug lines only when `debug` > 0 (`-d`). */
export function makeLogger(component: string, debug: number, options: LoggerOptions = {}): Logger {
  const output = options.output ?? STDERR_OUTPUT;
  const now = options.now ?? (() => new Date());
  const format = (time: string, name: string, level: LogLevel, message: string) =>
    `${time} hast[${process.pid}] ${oneLine(name)}: ${level}: ${oneLine(message)}\n`;
  return (level, message) => {
    if (level === "debug" && debug <= 0) return;
    const time = now().toISOString();
    output.emit(format(time, component, level, message), (count, error) =>
      format(time, "log", "error", `${count} log lines could not be written and are lost: ${error}`));
  };
}

/**
 * `text` with every character that could end a line or move the cursor escaped (`\n`, `\r`,
 * `\u001b`, U+2028…): a peer's string in a message must not be able to start a line of its own
 * that reads as one the daemon wrote. Tabs stay; backslashes stay (nothing is unescaped).
 */
export function oneLine(text: string): string {
  return text.replace(/[\u0000-\u0008\u000a-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => {
    if (c === "\n") return "\\n";
    if (c === "\r") return "\\r";
    return `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`;
  });
}

/**
 * The kind of a message for a {@linkcode RepeatLimiter} key: the text with quoted strings and
 * numbers replaced by `…` and `#`. A message that quotes what a peer sent (a name, a flags
 * value) would otherwise make a new key, and go through, each time the peer sent another value.
 */
export function repeatKind(message: string): string {
  return message
    .replace(/"(?:[^"\\]|\\.)*"?/g, "…") // JSON.stringify's quoting
    .replace(/'[^]*'/g, "…") // quoteBounded's (nbd_protocol.ts), quotes inside included
    .replace(/0x[0-9a-f]+|\d+/gi, "#")
    .slice(0, REPEAT_KIND_CHARS_MAX);
}

/** Longest kind {@linkcode repeatKind} returns. */
const REPEAT_KIND_CHARS_MAX = 200;

/**
 * A peer refused again for the same reason is logged at most this often: a primary retries
 * every RECONNECT_INTERVAL_MS (lib/primary.ts).
 */
export const REFUSAL_LOG_INTERVAL_MS = 60_000;

/**
 * Keys a {@linkcode RepeatLimiter} remembers. Past this, those whose interval has passed are
 * forgotten; if none has, new keys share one key (REPEAT_LIMITER_OVERFLOW_KEY) until some has.
 */
export const REPEAT_LIMITER_MAX_KEYS = 1024;

/** The key that new keys share while a limiter is full. */
export const REPEAT_LIMITER_OVERFLOW_KEY = "\u0000overflow";

/**
 * Lets a message that repeats (the same peer refused for the same reason every retry) through
 * once per interval: the first time, then at most once per `intervalMs` with the number of
 * repeats held back. A different key is a different message and goes through at once, up to
 * REPEAT_LIMITER_MAX_KEYS keys per interval: beyond them (a flood from many addresses) the
 * new keys are limited together, so at most REPEAT_LIMITER_MAX_KEYS + 1 lines pass per interval.
 * Before, a full table was cleared, and every key then went through again at once.
 */
export class RepeatLimiter {
  /** In the order they last went through: the oldest first. */
  readonly #seen = new Map<string, { atMs: number; held: number }>();

  constructor(private readonly intervalMs: number, private readonly now: () => number = Date.now) {}

  /** The text to log for this occurrence of `key`, or null to hold it back. */
  pass(key: string, message: string): string | null {
    const now = this.now();
    if (!this.#seen.has(key) && this.#seen.size >= REPEAT_LIMITER_MAX_KEYS) this.#forgetExpired(now);
    if (!this.#seen.has(key) && this.#seen.size >= REPEAT_LIMITER_MAX_KEYS) {
      key = REPEAT_LIMITER_OVERFLOW_KEY;
      message = `${message} (too many kinds of message to limit each: these are limited together)`;
    }
    const seen = this.#seen.get(key);
    if (seen !== undefined && now - seen.atMs < this.intervalMs) {
      seen.held++;
      return null;
    }
    this.#seen.delete(key); // re-inserted last: the map stays ordered by atMs
    this.#seen.set(key, { atMs: now, held: 0 });
    if (seen === undefined || seen.held === 0) return message;
    return `${message} (and ${seen.held} times more in the ${Math.round((now - seen.atMs) / 1000)} s before)`;
  }

  /**
   * Drops the keys whose interval has passed: their next message goes through anyway. Their
   * repeats held back are not reported (nor are they when no message of the key comes again).
   */
  #forgetExpired(now: number): void {
    for (const [key, seen] of this.#seen) {
      if (now - seen.atMs < this.intervalMs) return;
      this.#seen.delete(key);
    }
  }
}
