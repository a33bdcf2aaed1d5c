/**
 * The connect-time decision (spec §5): given the generation counters of both
 * sides, which way to synchronise, or whether to refuse.
 *
 * Each side keeps `localcnt` (generations of its own independent writes) and
 * `remotecnt` (what it last knew of the peer's localcnt). A primary bumps its
 * localcnt on its first write while disconnected, so "my localcnt is ahead of
 * what the peer remembers of me" means "I wrote something the peer has not".
 *
 * SL/SR = secondary local/remote, PL/PR = primary local/remote.
 *
 * | case                | condition                 | result                                   |
 * |---------------------|---------------------------|------------------------------------------|
 * | fresh secondary     | secondary resuid = 0      | adopt the primary's resuid; if the       |
 * |                     |                           | primary is virgin too, sync nothing,     |
 * |                     |                           | else full sync from the primary          |
 * | secondary written   | secondary resuid = 0,     | it was primary alone before it ever      |
 * | before it connected | SL > 0 (not discarded)    | connected: full sync from it if the      |
 * |                     |                           | primary is virgin, else split-brain      |
 * | different resource  | resuids differ            | refuse ("resource unique ID mismatch")   |
 * | primary is behind   | SL > PR and SR == PL      | sync from the secondary to the primary   |
 * | in step             | SL == PR and SR == PL     | sync the dirty extents from the primary  |
 * | secondary is behind | SL == PR and SR < PL      | sync from the primary                    |
 * | split-brain         | SL > PR and PL > SR       | refuse on both sides until an operator   |
 * |                     |                           | discards one side                        |
 * | anything else       | —                         | full sync from the side whose counter is |
 * |                     |                           | ahead                                    |
 *
 * Better than HAST: a side the operator has discarded (`hast discard`) is
 * treated as "secondary is behind" with the union of both dirty maps, so a
 * healed split-brain resyncs only what either side wrote while apart.
 */

import { randomBytes } from "node:crypto";

/** One side's identity and counters. */
export interface SideCounters {
  resuid: bigint;
  localcnt: bigint;
  remotecnt: bigint;
}

export type SyncDecision =
  | { kind: "virgin" } // both fresh: nothing to sync
  | { kind: "sync"; source: "primary" | "secondary"; full: boolean; reason: string }
  | { kind: "uid-mismatch" }
  | { kind: "split-brain" };

/**
 * Applies the table above. `secondaryDiscarded` is true when the operator ran
 * `hast discard` on the secondary since it last synchronised.
 */
export function decideSync(
  primary: SideCounters,
  secondary: SideCounters,
  options: { secondaryDiscarded?: boolean } = {},
): SyncDecision {
  const { localcnt: SL, remotecnt: SR } = secondary;
  const { localcnt: PL, remotecnt: PR } = primary;
  if (secondary.resuid === 0n) {
    // "Virgin": the primary has never connected either (its resuid is still 0;
    // it proposes a new one in its Hello) and never wrote while disconnected.
    const primaryVirgin = primary.resuid === 0n && PL === 0n && PR === 0n;
    if (SL > 0n) {
      // The secondary never connected, yet wrote while it was primary alone (its first write
      // bumped localcnt): its writes exist nowhere else (found by review: they were overwritten
      // by a "fresh secondary" full sync, or, against a virgin primary, never synced at all).
      if (options.secondaryDiscarded) {
        return { kind: "sync", source: "primary", full: true, reason: "secondary discarded" };
      }
      if (primaryVirgin) return { kind: "sync", source: "secondary", full: true, reason: "secondary written alone" };
      return { kind: "split-brain" };
    }
    if (primaryVirgin) return { kind: "virgin" };
    return { kind: "sync", source: "primary", full: true, reason: "fresh secondary" };
  }
  // Includes a freshly created primary (resuid 0) meeting a used secondary.
  if (secondary.resuid !== primary.resuid) return { kind: "uid-mismatch" };
  if (options.secondaryDiscarded) {
    return { kind: "sync", source: "primary", full: false, reason: "secondary discarded" };
  }
  if (SL > PR && SR === PL) {
    return { kind: "sync", source: "secondary", full: false, reason: "primary is behind" };
  }
  if (SL === PR && SR === PL) {
    return { kind: "sync", source: "primary", full: false, reason: "in step" };
  }
  if (SL === PR && SR < PL) {
    return { kind: "sync", source: "primary", full: false, reason: "secondary is behind" };
  }
  if (SL > PR && PL > SR) return { kind: "split-brain" };
  // Anything else (e.g. a counter went backwards after a restore): full sync
  // from the side that is further ahead of what its peer knows.
  const primaryLead = PL - SR;
  const secondaryLead = SL - PR;
  const source = secondaryLead > primaryLead ? "secondary" : "primary";
  return { kind: "sync", source, full: true, reason: "counters inconsistent" };
}

/** A random non-zero 64-bit resource id. */
export function newResuid(): bigint {
  for (;;) {
    const value = randomBytes(8).readBigUInt64BE(0);
    if (value !== 0n) return value;
  }
}
