/**
 * Size and duration parsing for config files and command lines.
 *
 * Sizes follow FreeBSD's expand_number(3), which hastctl uses for `create -e 2M`: an integer
 * with an optional one-letter suffix k, M, G, T, P or E (any case), in powers of 1024.
 * Durations are whole numbers with an optional s, m or h suffix (default seconds).
 */

const SIZE_SHIFTS: Readonly<Record<string, number>> = {
  "": 0,
  k: 10,
  m: 20,
  g: 30,
  t: 40,
  p: 50,
  e: 60,
};

/** Longest size or duration text we look at: a limit so hostile input stays cheap. */
const UNIT_TEXT_LENGTH_MAX = 32;

/**
 * Parses a size such as `512`, `4k`, `2M`, `1G` into bytes (binary multiples).
 *
 * @param text the size as written
 * @returns the size in bytes, a safe integer >= 0
 * @throws SyntaxError when the text is not a number with an optional suffix
 * @throws RangeError when the size exceeds Number.MAX_SAFE_INTEGER
 */
export function parseSizeBytes(text: string): number {
  const match = /^([0-9]+)([kKmMgGtTpPeE]?)$/.exec(text);
  if (text.length > UNIT_TEXT_LENGTH_MAX || match === null) {
    throw new SyntaxError(
      `Cannot parse size: ${JSON.stringify(text)} is not a number with an optional ` +
        `k/M/G/T/P/E suffix`,
    );
  }
  const shift = SIZE_SHIFTS[match[2]!.toLowerCase()]!;
  const bytes = BigInt(match[1]!) << BigInt(shift);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new RangeError(`Cannot parse size: ${JSON.stringify(text)} is too large`);
  }
  return Number(bytes);
}

/**
 * Formats bytes with the largest binary suffix that represents them exactly
 * (`2097152` → `2M`, `1536` → `1536`). The result parses back to the same number.
 *
 * @param bytes a safe integer >= 0
 * @returns the shortest exact form, e.g. `2M`, `100k`, `1000`
 */
export function formatSizeBytes(bytes: number): string {
  if (!Number.isSafeInteger(bytes) || bytes < 0) {
    throw new RangeError(`Cannot format size: ${bytes} is not a non-negative safe integer`);
  }
  if (bytes === 0) return "0";
  const suffixes = ["", "k", "M", "G", "T", "P", "E"];
  let value = BigInt(bytes);
  let index = 0;
  while (index < suffixes.length - 1 && value % 1024n === 0n) {
    value /= 1024n;
    index += 1;
  }
  return `${value}${suffixes[index]}`;
}

/**
 * Parses a duration such as `20`, `20s`, `5m`, `1h` into whole seconds.
 *
 * @param text the duration as written; a bare number means seconds
 * @returns the duration in seconds, a safe integer >= 0
 * @throws SyntaxError when the text is not a whole number with an optional s/m/h suffix
 * @throws RangeError when the duration exceeds Number.MAX_SAFE_INTEGER seconds
 */
export function parseDurationSeconds(text: string): number {
  const match = /^([0-9]+)([smh]?)$/.exec(text);
  if (text.length > UNIT_TEXT_LENGTH_MAX || match === null) {
    throw new SyntaxError(
      `Cannot parse duration: ${JSON.stringify(text)} is not a whole number with an ` +
        `optional s/m/h suffix`,
    );
  }
  const factor = match[2] === "h" ? 3600 : match[2] === "m" ? 60 : 1;
  const seconds = Number(match[1]!) * factor;
  if (!Number.isSafeInteger(seconds)) {
    throw new RangeError(`Cannot parse duration: ${JSON.stringify(text)} is too large`);
  }
  return seconds;
}
