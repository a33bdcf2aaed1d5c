import { expect, test } from "bun:test";
import { parseConfig } from "./config.ts";
import { describeResource, formatStatusTable, formatVerify } from "./status.ts";

const MIB = 1024 * 1024;
const base = {
  state: "done", checkedBytes: 8 * MIB, skippedBytes: 0, totalBytes: 8 * MIB, bytesPerSecond: 0,
  etaSeconds: null, differingExtents: 0, error: null,
};

test("the Verify column: none yet, running, identical, differences, failed", () => {
  expect(formatVerify(null)).toBe("-");
  expect(formatVerify({ ...base, state: "running", checkedBytes: 2 * MIB, bytesPerSecond: MIB, etaSeconds: 6 }))
    .toBe("running 25.0% 1M/s eta 6s");
  expect(formatVerify(base)).toBe("done, identical");
  expect(formatVerify({ ...base, differingExtents: 3 })).toBe("done, 3 extents differed (resynced)");
  expect(formatVerify({ ...base, state: "failed", checkedBytes: MIB, error: "the link went down" }))
    .toBe("failed at 1M: the link went down");
  const table = formatStatusTable([{
    name: "data", status: "complete", role: "primary", local: "/dev/sdb", remote: "10.0.0.2",
    dirtyBytes: 0, sync: null, verify: base,
  }]).split("\n");
  expect(table[0]).toMatch(/^Name\s+Status\s+Role\s+Components\s+Dirty\s+Sync\s+Verify$/);
  expect(table[1]).toMatch(/^data\s+complete\s+primary\s+\/dev\/sdb 10\.0\.0\.2\s+0\s+-\s+done, identical$/);
});

const config = parseConfig("resource r {\n  local /dev/sdb\n  on a { remote 10.0.0.2 }\n}\n", "t.conf", { node: "a" })
  .resources[0]!;

// Found by review: a worker being restarted in its role (a crash or a reload restart) showed the
// resource "failed" while it started. Proves a starting worker's answer shows "starting", with
// none of a running role's fields, and that no answer at all still shows "failed".
test("status of a worker that is starting, and of none", () => {
  const options = { full: true, pid: 42, lastError: "worker exited unexpectedly (70)" };
  const starting = describeResource(config, "primary", { status: "starting" }, options);
  expect(starting.status).toBe("starting");
  expect([starting.nbd, starting.link, starting.sync, starting.dirtyBytes]).toEqual([null, null, null, null]);
  expect(starting.linkError).toBe("worker exited unexpectedly (70)");
  expect(starting.pipelinePending).toBeNull();
  expect(describeResource(config, "primary", null, options).status).toBe("failed");
});

// Proves `hast list` says when a reloaded pipeline setting waits for the next start (the worker
// reports it as pipelineChange), and says nothing otherwise.
test("hast list: pipelinePending from the worker's pipelineChange", () => {
  const options = { full: true, pid: 42, lastError: "" };
  const pending = "the codec threads start at the next role change or restart (none run now)";
  const worker = { role: "primary", status: "complete", link: "connected", pipelineChange: pending };
  expect(describeResource(config, "primary", worker, options).pipelinePending).toBe(pending);
  expect(describeResource(config, "primary", { ...worker, pipelineChange: null }, options).pipelinePending).toBeNull();
});

// Proves `hast list` shows metaflush off when the worker's provider cannot flush (the metadata
// store then writes without flushing and says so once), and the configured value otherwise.
test("hast list: metaflush is off in effect when the provider cannot flush", () => {
  const options = { full: true, pid: 42, lastError: "" };
  const worker = { role: "primary", status: "complete", link: "connected", local: { flushUnsupported: false } };
  expect(config.metaflush).toBe(true);
  expect(describeResource(config, "primary", worker, options).metaflush).toBe(true);
  const cannot = { ...worker, local: { flushUnsupported: true } };
  expect(describeResource(config, "primary", cannot, options).metaflush).toBe(false);
});

// Proves `hast status --json` passes on why a sync stopped (the synchronizer's first failure).
test("status: the sync's error, null when there is none", () => {
  const options = { full: false, pid: 42, lastError: "" };
  const sync = {
    state: "interrupted", source: "primary", doneBytes: 1, totalBytes: 2, bytesPerSecond: 0, etaSeconds: null,
  };
  const failed = { ...sync, error: "sync read failed: EIO" };
  const worker = { role: "primary", status: "syncing", link: "connected", sync: failed };
  expect(describeResource(config, "primary", worker, options).sync).toMatchObject({ error: "sync read failed: EIO" });
  const clean = { ...worker, sync };
  expect(describeResource(config, "primary", clean, options).sync).toMatchObject({ error: null });
});
