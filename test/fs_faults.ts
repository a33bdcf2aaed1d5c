/** Faults injected into node:fs for tests of the provider and the metadata store. */
import fs from "node:fs";

/**
 * Makes every fdatasync fail with `code` until `restore()` (EIO: a lost cached write; EINVAL or
 * EOPNOTSUPP: a device that cannot flush).
 */
export function failFdatasync(code: string): { restore(): void } {
  const real = fs.fdatasync;
  Object.assign(fs, {
    fdatasync: (_fd: number, callback: (error: Error | null) => void) =>
      callback(Object.assign(new Error(`${code}: fdatasync`), { code })),
  });
  return { restore: () => Object.assign(fs, { fdatasync: real }) };
}
