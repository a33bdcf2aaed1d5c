/**
 * Resync benchmark: a hast pair whose secondary is stopped (role init), the whole device written
 * on the (degraded) primary so that every extent is dirty, then the secondary brought up and the
 * time taken from `hast role secondary` until the primary's status is complete with 0 dirty
 * bytes. Repeated `runs` times on the same pair; afterwards both data areas are compared.
 */
import { join } from "node:path";
import { FILL, runFio } from "./fio.ts";
import { type Processes, runCommand } from "./proc.ts";
import type { ResyncResult } from "./report.ts";
import { HastSetup } from "./targets.ts";

/** How long one resync may take. */
const RESYNC_TIMEOUT_MS = 600_000;

/** Options of {@link measureResync}. */
export interface ResyncOptions {
  dir: string;
  hast: string[];
  port: number;
  sizeBytes: number;
  runs: number;
  progress: (message: string) => void;
}

/** Runs the resync measurement; returns its figures and the daemons' log findings. */
export async function measureResync(
  processes: Processes, options: ResyncOptions,
): Promise<{ result: ResyncResult; logFindings: Map<string, number> }> {
  const setup = new HastSetup(processes, {
    label: "resync", dir: options.dir, hast: options.hast, port: options.port,
    sizeBytes: options.sizeBytes, secondary: "init", resourceLines: [], preallocate: true,
  });
  options.progress(`resync: starting a ${options.sizeBytes}-byte pair, secondary in role init`);
  await setup.start();
  const result: ResyncResult = {
    datasizeBytes: setup.sizeBytes, dirtyBytes: [], seconds: [], connectSeconds: [], hastRateBytesPerSecond: [],
    memoryEnd: null, verified: false,
  };
  try {
    for (let run = 1; run <= options.runs; run++) {
      if (run > 1) {
        await setup.hast("b", ["role", "init", "data"]);
        await setup.waitStatus("degraded", (s) => s.status === "degraded", 60_000);
      }
      await resyncOnce(setup, result, { outputPath: join(options.dir, "fio.json"), run });
      const last = result.seconds.length - 1;
      options.progress(`resync run ${run}/${options.runs}: ${result.dirtyBytes[last]} dirty ` +
        `bytes in ${result.seconds[last].toFixed(2)} s`);
    }
    result.memoryEnd = setup.workerMemory();
  } finally {
    await setup.stop();
  }
  result.verified = await sameData(setup);
  return { result, logFindings: setup.logFindings() };
}

/** Dirties the whole device on the degraded primary, then times one resync to completion. */
async function resyncOnce(
  setup: HastSetup, result: ResyncResult, options: { outputPath: string; run: number },
): Promise<void> {
  // Fresh random data in every block and every run, so the final comparison proves the last
  // resync copied everything (fio otherwise repeats the same few buffers, run after run).
  await runFio(setup.uri, FILL, {
    sizeBytes: setup.sizeBytes, outputPath: options.outputPath,
    extraArgs: [`--randseed=${options.run}`, "--refill_buffers"],
  });
  const before = await setup.status();
  checkFullyDirty(before, setup.sizeBytes);
  await runCommand(["sync"]);
  let rate = 0;
  let connectedMs: number | null = null;
  const startMs = performance.now();
  await setup.hast("b", ["role", "secondary", "data"]);
  const done = await setup.waitStatus("resync to complete", (s) => {
    if (connectedMs === null && s.link === "connected") connectedMs = performance.now();
    if (s.sync?.bytesPerSecond > 0) rate = s.sync.bytesPerSecond;
    return s.status === "complete" && s.dirtyBytes === 0;
  }, RESYNC_TIMEOUT_MS);
  const seconds = (performance.now() - startMs) / 1000;
  if (done.sync?.bytesPerSecond > 0) rate = done.sync.bytesPerSecond;
  result.dirtyBytes.push(before.dirtyBytes);
  result.seconds.push(seconds);
  result.connectSeconds.push(((connectedMs ?? performance.now()) - startMs) / 1000);
  result.hastRateBytesPerSecond.push(rate);
}

/**
 * Throws unless the primary's status is degraded with every extent dirty (`dirtyBytes` equal to
 * the data size), as the measurement claims: a partly dirty device would be timed as a resync of
 * less data than the table's "fully dirty" says.
 */
export function checkFullyDirty(status: Record<string, any>, datasizeBytes: number): void {
  if (status.status !== "degraded" || status.dirtyBytes !== datasizeBytes) {
    const state = JSON.stringify(status);
    throw new Error(`Cannot measure resync: primary not degraded with all ${datasizeBytes} bytes dirty: ${state}`);
  }
}

/** True when both nodes' data areas are byte-identical (daemons stopped). */
async function sameData(setup: HastSetup): Promise<boolean> {
  const dumps = await Promise.all((["a", "b"] as const).map(async (node) =>
    JSON.parse((await setup.hast(node, ["dump", "--json"])).stdout).resources[0]));
  const [a, b] = dumps;
  const length = Math.min(a.datasizeBytes, b.datasizeBytes);
  const dir = setup.options.dir;
  const cmp = await runCommand([
    "cmp", "-s", "-i", `${a.dataOffsetBytes}:${b.dataOffsetBytes}`, "-n", String(length),
    join(dir, "a.img"), join(dir, "b.img"),
  ], { allowFailure: true });
  return cmp.code === 0;
}
