// Proves size and duration parsing: binary suffixes in any case, exact round-trips through
// formatSizeBytes, and rejection of malformed or overflowing text, by table-driven checks.

import { describe, expect, test } from "bun:test";
import { formatSizeBytes, parseDurationSeconds, parseSizeBytes } from "./units.ts";

describe("parseSizeBytes", () => {
  test("reads plain numbers and k/M/G/T/P/E suffixes as powers of 1024", () => {
    const cases: [string, number][] = [
      ["0", 0],
      ["512", 512],
      ["4k", 4096],
      ["4K", 4096],
      ["2M", 2 * 1024 ** 2],
      ["2m", 2 * 1024 ** 2],
      ["1G", 1024 ** 3],
      ["3T", 3 * 1024 ** 4],
      ["1P", 1024 ** 5],
    ];
    for (const [text, bytes] of cases) expect(parseSizeBytes(text)).toBe(bytes);
  });

  test("rejects malformed text with SyntaxError and overflow with RangeError", () => {
    for (const bad of ["", "k", "1.5M", "-1", "1 M", "1MB", "0x10", "1".repeat(40)]) {
      expect(() => parseSizeBytes(bad)).toThrow(SyntaxError);
    }
    expect(() => parseSizeBytes("7E")).toThrow(RangeError);
    expect(() => parseSizeBytes("9007199254740992")).toThrow(RangeError);
    expect(parseSizeBytes("9007199254740991")).toBe(Number.MAX_SAFE_INTEGER);
  });
});

describe("formatSizeBytes", () => {
  test("uses the largest exact suffix and parses back to the same number", () => {
    expect(formatSizeBytes(0)).toBe("0");
    expect(formatSizeBytes(1536)).toBe("1536");
    expect(formatSizeBytes(2 * 1024 ** 2)).toBe("2M");
    expect(formatSizeBytes(100 * 1024)).toBe("100k");
    for (const bytes of [1, 1023, 1024, 4096, 3 * 1024 ** 4, Number.MAX_SAFE_INTEGER]) {
      expect(parseSizeBytes(formatSizeBytes(bytes))).toBe(bytes);
    }
    expect(() => formatSizeBytes(-1)).toThrow(RangeError);
    expect(() => formatSizeBytes(1.5)).toThrow(RangeError);
  });
});

describe("parseDurationSeconds", () => {
  test("reads seconds with an optional s/m/h suffix and rejects anything else", () => {
    expect(parseDurationSeconds("20")).toBe(20);
    expect(parseDurationSeconds("20s")).toBe(20);
    expect(parseDurationSeconds("5m")).toBe(300);
    expect(parseDurationSeconds("2h")).toBe(7200);
    expect(parseDurationSeconds("0")).toBe(0);
    for (const bad of ["", "s", "1.5", "-3", "10ms", "1d", "20 s"]) {
      expect(() => parseDurationSeconds(bad)).toThrow(SyntaxError);
    }
    expect(() => parseDurationSeconds("9007199254740991h")).toThrow(RangeError);
  });
});
