// The worker's allocator setting (lib/daemon.ts): purging off by default, the operator's own
// MIMALLOC_PURGE_DELAY kept as it is. recovery_test checks a real worker's environment.
import { expect, test } from "bun:test";
import { WORKER_MIMALLOC_PURGE_DELAY, workerEnv } from "./daemon.ts";

test("a worker runs with the allocator's purging off unless the operator chose a delay", () => {
  expect(WORKER_MIMALLOC_PURGE_DELAY).toBe("-1");
  const env = workerEnv({ PATH: "/usr/bin" });
  expect(env).toEqual({ PATH: "/usr/bin", MIMALLOC_PURGE_DELAY: "-1" });
  expect(workerEnv({ PATH: "/usr/bin", MIMALLOC_PURGE_DELAY: "1000" })).toEqual({
    PATH: "/usr/bin", MIMALLOC_PURGE_DELAY: "1000",
  });
});
