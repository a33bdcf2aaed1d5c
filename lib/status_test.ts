import { expect, test } from "bun:test";
import { formatStatusTable, formatVerify } from "./status.ts";

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
