/**
 * sysexits(3) codes and the mapping from hast's error classes to them, shared
 * by the CLI and the resource worker (whose start failures reach the CLI).
 */
import { ConfigError } from "./config.ts";
import { MetadataError } from "./metadata.ts";
import { ProviderError } from "./provider.ts";

export const EX_USAGE = 64;
export const EX_DATAERR = 65;
export const EX_NOINPUT = 66;
export const EX_UNAVAILABLE = 69;
export const EX_SOFTWARE = 70;
export const EX_IOERR = 74;
export const EX_TEMPFAIL = 75;
export const EX_CONFIG = 78;

/** An error that ends a command with a sysexits code. */
export class ExitError extends Error {
  constructor(message: string, readonly exitCode: number) {
    super(message);
  }
}

/** The exit code for an error thrown by any hast module. */
export function exitCodeOf(error: unknown): number {
  if (error instanceof ExitError) return error.exitCode;
  if (error instanceof ConfigError) return EX_CONFIG;
  if (error instanceof MetadataError) return EX_DATAERR;
  if (error instanceof ProviderError) {
    if (error.code === "EBUSY") return EX_TEMPFAIL;
    if (error.code === "ENOENT") return EX_NOINPUT;
    return EX_IOERR;
  }
  if (error instanceof RangeError || error instanceof SyntaxError) return EX_DATAERR;
  const code = (error as { exitCode?: unknown }).exitCode;
  if (typeof code === "number") return code;
  if ((error as { code?: string }).code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") return EX_USAGE;
  return EX_SOFTWARE;
}
