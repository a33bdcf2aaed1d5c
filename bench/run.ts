/**
 * `npm run bench`: measures hast against nbdkit's file plugin (the reference NBD server) with
 * fio's nbd engine, all in one run, and writes the tables to stdout and bench/RESULTS.md.
 *
 * Configurations: the reference; a hast primary without a secondary (degraded); a primary with a
 * secondary on loopback per replication mode; fullsync with sha256 + lz4, pipeline on and off;
 * fullsync with an encrypted link.
 * Runs are interleaved (run 1 of every configuration, then run 2, …) so that drift of this shared
 * machine hits all configurations alike; each figure is the median of the runs. Then a resync of
 * a fully dirty 1 GiB resource is timed. Every process is started here and stopped by PID in a
 * `finally` (or on SIGINT / SIGTERM); all files live in one temp dir that is removed at the end.
 *
 * Flags: --runs N (3), --seconds S per fio job (10), --quick (1 run of 2 s), --bin PATH (use this
 * hast binary; default: `npm run build` first and use dist/hast), --only NAME,… (only these hast
 * configurations, beside the reference (`reference` alone: none of them), and the resync only if
 * `resync` is one of the names; for investigations: the tables are printed but bench/RESULTS.md
 * is left as it is).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { commonSizeBytes, FILL, runFio, WORKLOADS } from "./fio.ts";
import { describeRun } from "./machine.ts";
import { Processes, runCommand } from "./proc.ts";
import {
  type ConfigResult, renderGenerated, renderLogFindings, renderMainTable, renderResyncTable,
  renderRunsTable, type ResyncResult, type RunFacts, type TargetClass, writeResults,
} from "./report.ts";
import { measureResync } from "./resync.ts";
import { HastSetup, type SecondaryMode, startReference, type Target } from "./targets.ts";

const ROOT = resolve(import.meta.dir, "..");
const DEVICE_BYTES = 256 * 2 ** 20;
const RESYNC_DEVICE_BYTES = 2 ** 30;

/** Parsed command-line flags. */
interface Options {
  runs: number;
  seconds: number;
  quick: boolean;
  bin: string | undefined;
  /** Names of the hast configurations to run (--only), or null for all of them and the resync. */
  only: string[] | null;
}

/** A hast configuration of the table. */
interface HastConfig {
  name: string;
  label: string;
  secondary: SecondaryMode;
  resourceLines: string[];
  targetClass: TargetClass;
  /** Both nodes get the same fresh authkey. */
  authkey?: boolean;
}

const SHA_LZ4 = ["replication fullsync", "checksum sha256", "compression lz4"];

const HAST_CONFIGS: readonly HastConfig[] = [
  { name: "degraded", label: "hast, no secondary (degraded)", secondary: "none",
    resourceLines: [], targetClass: "none" },
  { name: "fullsync", label: "hast fullsync", secondary: "secondary",
    resourceLines: ["replication fullsync"], targetClass: "fullsync" },
  { name: "memsync", label: "hast memsync", secondary: "secondary",
    resourceLines: ["replication memsync"], targetClass: "memsync" },
  { name: "async", label: "hast async", secondary: "secondary",
    resourceLines: ["replication async"], targetClass: "async" },
  { name: "fs-sha-lz4-on", label: "hast fullsync, sha256 + lz4, pipeline on",
    secondary: "secondary", resourceLines: [...SHA_LZ4, "pipeline on"], targetClass: "fullsync" },
  { name: "fs-sha-lz4-off", label: "hast fullsync, sha256 + lz4, pipeline off",
    secondary: "secondary", resourceLines: [...SHA_LZ4, "pipeline off"], targetClass: "fullsync" },
  { name: "fullsync-aes", label: "hast fullsync, authkey + encryption aes-256-gcm", secondary: "secondary",
    resourceLines: ["replication fullsync", "encryption aes-256-gcm"], targetClass: "fullsync", authkey: true },
];

/** The name `--only` takes for the resync measurement. */
const RESYNC = "resync";
/** The name `--only` takes for the reference alone (it runs in every selection anyway). */
const REFERENCE = "reference";

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: "string" },
      seconds: { type: "string" },
      quick: { type: "boolean", default: false },
      bin: { type: "string" },
      only: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      "usage: bun bench/run.ts [--runs N] [--seconds S] [--quick] [--bin PATH] [--only NAME,…]\n" +
      `configurations: ${[REFERENCE, ...HAST_CONFIGS.map((c) => c.name), RESYNC].join(", ")}\n`);
    process.exit(0);
  }
  const positive = (name: string, text: string | undefined, fallback: number): number => {
    if (text === undefined) return fallback;
    const value = Number(text);
    if (!Number.isInteger(value) || value < 1) {
      throw new RangeError(`Cannot use --${name}: "${text}"`);
    }
    return value;
  };
  const quick = values.quick === true;
  const only = values.only === undefined ? null : values.only.split(",");
  for (const name of only ?? []) {
    if (name !== RESYNC && name !== REFERENCE && !HAST_CONFIGS.some((c) => c.name === name)) {
      throw new RangeError(`Cannot use --only: no configuration "${name}" ` +
        `(there are ${[REFERENCE, ...HAST_CONFIGS.map((c) => c.name), RESYNC].join(", ")})`);
    }
  }
  return {
    quick, bin: values.bin, only,
    runs: positive("runs", values.runs, quick ? 1 : 3),
    seconds: positive("seconds", values.seconds, quick ? 2 : 10),
  };
}

/** argv prefix that runs hast: `--bin`, or dist/hast freshly built. */
async function hastCommand(options: Options): Promise<string[]> {
  if (options.bin === undefined) {
    progress("building dist/hast (npm run build)");
    await runCommand(["npm", "run", "build"], { cwd: ROOT, timeoutMs: 300_000 });
  }
  const bin = resolve(ROOT, options.bin ?? "dist/hast");
  if (!existsSync(bin)) throw new Error(`Cannot use hast binary: "${bin}" does not exist`);
  return [bin];
}

function progress(message: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

interface Measured {
  target: Target;
  result: ConfigResult;
}

/** Starts the reference and every hast configuration; they stay up until the workloads end. */
async function startAll(
  processes: Processes, dir: string, hast: string[], portBase: number, only: string[] | null,
): Promise<Measured[]> {
  const measured: Measured[] = [];
  const fresh = (label: string, targetClass: TargetClass): ConfigResult =>
    ({ label, targetClass, runs: new Map(WORKLOADS.map((w) => [w.key, []])) });
  mkdirSync(join(dir, "ref"));
  progress("starting the reference (nbdkit file)");
  const reference = await startReference(processes, join(dir, "ref"), DEVICE_BYTES);
  measured.push({ target: reference, result: fresh(reference.label, "reference") });
  for (const [index, config] of HAST_CONFIGS.entries()) {
    if (only !== null && !only.includes(config.name)) continue;
    progress(`starting ${config.label}`);
    const setupDir = join(dir, config.name);
    mkdirSync(setupDir);
    const setup = new HastSetup(processes, {
      label: config.label, dir: setupDir, hast, port: portBase + index, sizeBytes: DEVICE_BYTES,
      secondary: config.secondary, resourceLines: config.resourceLines, authkey: config.authkey,
    });
    await setup.start();
    const result = fresh(config.label, config.targetClass);
    result.memoryIdle = setup.workerMemory();
    measured.push({ target: setup, result });
  }
  return measured;
}

/**
 * Fills every device once, then runs all workloads `runs` times, interleaved across targets, all
 * over the same size ({@link commonSizeBytes}): hast's data area is smaller than the reference's.
 * Returns that size.
 */
async function measureWorkloads(
  measured: Measured[], options: Options, dir: string,
): Promise<number> {
  const outputPath = join(dir, "fio.json");
  const sizeBytes = commonSizeBytes(measured.map((m) => m.target.sizeBytes));
  progress(`workloads over the first ${sizeBytes} bytes of every device`);
  for (const { target } of measured) {
    progress(`${target.label}: filling ${target.sizeBytes} bytes`);
    await runFio(target.uri, FILL, { sizeBytes: target.sizeBytes, outputPath });
    await target.settle();
  }
  for (let run = 1; run <= options.runs; run++) {
    for (const { target, result } of measured) {
      for (const workload of WORKLOADS) {
        // Start every job with clean page cache so earlier jobs' write-back does not land in it.
        await runCommand(["sync"]);
        const figures = await runFio(target.uri, workload, {
          sizeBytes, seconds: options.seconds, outputPath,
        });
        result.runs.get(workload.key)!.push(figures);
        progress(`run ${run}/${options.runs} ${target.label}: ${workload.title}: ` +
          `${Math.round(figures.iops)} IOPS, ${(figures.bytesPerSecond / 1e6).toFixed(0)} MB/s, ` +
          `clat mean ${figures.clatMeanUs.toFixed(1)} µs p99 ${figures.clatP99Us.toFixed(0)} µs`);
        await target.settle();
      }
    }
  }
  return sizeBytes;
}

/** Reads worker memory and stops every hast set-up; returns their daemon log findings. */
async function finishSetups(measured: Measured[]): Promise<Map<string, Map<string, number>>> {
  const findings = new Map<string, Map<string, number>>();
  for (const { target, result } of measured) {
    if (!(target instanceof HastSetup)) continue;
    result.memoryEnd = target.workerMemory();
    result.workerRestarts = target.workerRestarts;
    await target.stop();
    findings.set(target.label, target.logFindings());
  }
  return findings;
}

/** Prints the generated report and writes it into bench/RESULTS.md. */
function report(facts: RunFacts, results: ConfigResult[], resync: ResyncResult,
  findings: Map<string, Map<string, number>>): void {
  facts.machine.push(`load average at end: ${loadavg().map((l) => l.toFixed(2)).join(" ")}`);
  const generated = renderGenerated(facts, [
    { title: "Workloads (median of runs; ratio = hast / reference in this run)",
      body: renderMainTable(results) },
    { title: "Resync of a fully dirty resource", body: renderResyncTable(resync, results[0]) },
    { title: "Every run (to judge the spread)", body: renderRunsTable(results) },
    { title: "Daemon log warnings and errors", body: renderLogFindings(findings) },
  ]);
  process.stdout.write(generated + "\n");
  writeResults(join(ROOT, "bench", "RESULTS.md"), generated);
  progress("wrote bench/RESULTS.md");
}

/** Times the resync of a fully dirty resource (bench/resync.ts) in its own directory. */
function runResync(
  processes: Processes, dir: string, hast: string[], portBase: number, runs: number,
): ReturnType<typeof measureResync> {
  const resyncDir = join(dir, RESYNC);
  mkdirSync(resyncDir);
  return measureResync(processes, {
    dir: resyncDir, hast, port: portBase + HAST_CONFIGS.length,
    sizeBytes: RESYNC_DEVICE_BYTES, runs, progress,
  });
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const options = parseOptions(args);
  const processes = new Processes();
  const dir = mkdtempSync(join(tmpdir(), "hast-bench-"));
  // One clean-up however many callers (a signal, then the `finally` when the step it interrupted fails).
  let cleaning: Promise<void> | null = null;
  const cleanUp = () => cleaning ??= (async () => {
    await processes.stopAll();
    rmSync(dir, { recursive: true, force: true });
  })();
  for (const [signal, code] of [["SIGINT", 130], ["SIGTERM", 143]] as const) {
    process.on(signal, () => {
      progress(`${signal}: stopping everything`);
      cleanUp().finally(() => process.exit(code));
    });
  }
  try {
    const hast = await hastCommand(options);
    const portBase = 20_000 + Math.floor(Math.random() * 20_000);
    const facts = await describeRun(ROOT, args, {
      settings: `${options.runs} run(s) per figure, ${options.seconds} s per fio job, ` +
        `device 256 MiB, resync device 1 GiB, hast = ${hast.join(" ")}` +
        (options.quick ? " (--quick: smoke run, not representative)" : ""),
    });
    const measured = await startAll(processes, dir, hast, portBase, options.only);
    const workloadBytes = await measureWorkloads(measured, options, dir);
    facts.settings += `, workloads over the first ${(workloadBytes / 2 ** 20).toFixed(2)} MiB of each device`;
    const findings = await finishSetups(measured);
    const wantResync = options.only === null || options.only.includes(RESYNC);
    const resync = wantResync ? await runResync(processes, dir, hast, portBase, options.runs) : null;
    if (resync) findings.set(RESYNC, resync.logFindings);
    const results = measured.map((m) => m.result);
    if (options.only !== null) {
      process.stdout.write(renderMainTable(results) + "\n\n" + renderRunsTable(results) + "\n\n" +
        (resync ? renderResyncTable(resync.result, results[0]!) + "\n\n" : "") +
        renderLogFindings(findings) + "\n");
      progress("--only: bench/RESULTS.md left as it is");
      return;
    }
    report(facts, results, resync!.result, findings);
  } finally {
    await cleanUp();
  }
}

await main();
