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
