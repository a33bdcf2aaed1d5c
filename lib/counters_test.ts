/**
 * The connect-time decision table of spec §5, row by row, including the
 * split-brain row and the operator's discard.
 */
import { expect, test } from "bun:test";
import { decideSync } from "./counters.ts";

const side = (resuid: bigint, localcnt: bigint, remotecnt: bigint) => ({ resuid, localcnt, remotecnt });

test("fresh secondary: virgin pair syncs nothing, else a full sync from the primary", () => {
  expect(decideSync(side(0n, 0n, 0n), side(0n, 0n, 0n))).toEqual({ kind: "virgin" });
  expect(decideSync(side(0n, 1n, 0n), side(0n, 0n, 0n))).toMatchObject({ kind: "sync", source: "primary", full: true });
  expect(decideSync(side(7n, 0n, 0n), side(0n, 0n, 0n))).toMatchObject({ kind: "sync", source: "primary", full: true });
});

test("a secondary that wrote as primary before it ever connected is synced from, or split-brain", () => {
  // The primary never wrote either: the secondary's copy is the only written one.
  expect(decideSync(side(0n, 0n, 0n), side(0n, 1n, 0n)))
    .toMatchObject({ kind: "sync", source: "secondary", full: true, reason: "secondary written alone" });
  // Both wrote alone: neither may silently replace the other.
  expect(decideSync(side(0n, 1n, 0n), side(0n, 1n, 0n))).toEqual({ kind: "split-brain" });
  expect(decideSync(side(7n, 2n, 1n), side(0n, 1n, 0n))).toEqual({ kind: "split-brain" });
  // Once the operator discarded the secondary's writes: a full sync from the primary, virgin or not.
  for (const primary of [side(0n, 1n, 0n), side(0n, 0n, 0n)]) {
    expect(decideSync(primary, side(0n, 1n, 0n), { secondaryDiscarded: true }))
      .toMatchObject({ kind: "sync", source: "primary", full: true });
  }
});

test("different resource ids are refused, also a re-created primary meeting a used secondary", () => {
  expect(decideSync(side(7n, 1n, 1n), side(8n, 1n, 1n))).toEqual({ kind: "uid-mismatch" });
  expect(decideSync(side(0n, 0n, 0n), side(8n, 1n, 1n))).toEqual({ kind: "uid-mismatch" });
});

test("in step, secondary behind, primary behind", () => {
  expect(decideSync(side(7n, 3n, 2n), side(7n, 2n, 3n)))
    .toMatchObject({ source: "primary", full: false, reason: "in step" });
  expect(decideSync(side(7n, 4n, 2n), side(7n, 2n, 3n)))
    .toMatchObject({ source: "primary", reason: "secondary is behind" });
  expect(decideSync(side(7n, 3n, 2n), side(7n, 5n, 3n)))
    .toMatchObject({ source: "secondary", reason: "primary is behind" });
});

test("split-brain: both wrote while apart", () => {
  expect(decideSync(side(7n, 4n, 2n), side(7n, 3n, 3n))).toEqual({ kind: "split-brain" });
});

test("a discarded secondary syncs from the primary even with split-brain counters", () => {
  expect(decideSync(side(7n, 4n, 2n), side(7n, 3n, 3n), { secondaryDiscarded: true }))
    .toMatchObject({ kind: "sync", source: "primary", full: false, reason: "secondary discarded" });
});

test("inconsistent counters fall back to a full sync from the side further ahead", () => {
  // The secondary's own counter went backwards (SL < PR): restored from an old backup.
  expect(decideSync(side(7n, 3n, 5n), side(7n, 4n, 3n)))
    .toMatchObject({ kind: "sync", source: "primary", full: true, reason: "counters inconsistent" });
  // The mirror: the primary's went backwards (PL < SR) while the secondary wrote on: the
  // secondary is further ahead, so it is the source (found by review: swapping the two
  // directions passed every test).
  expect(decideSync(side(7n, 2n, 3n), side(7n, 5n, 4n)))
    .toMatchObject({ kind: "sync", source: "secondary", full: true, reason: "counters inconsistent" });
});
