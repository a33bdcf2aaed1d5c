/**
 * The benchmark's fio workloads and one function that runs a workload against an NBD URI with
 * fio's `nbd` engine (one libnbd connection, `--iodepth` requests in flight) and returns the
 * figures the report uses, parsed from fio's JSON output.
 */
import assert from "node:assert/strict";
import { readFileSync, rmSync } from "node:fs";
import { runCommand } from "./proc.ts";

/** One fio workload of the table. */
export interface Workload {
  key: WorkloadKey;
  /** Column heading. */
  title: string;
  rw: "randwrite" | "randread" | "write";
  blockSizeBytes: number;
  iodepth: number;
}

export type WorkloadKey = "randwrite_qd1" | "randwrite_qd32" | "randread_qd32" | "write_1m_qd8";

/** The measured workloads, in the order they run on each target. */
export const WORKLOADS: readonly Workload[] = [
  { key: "randwrite_qd1", title: "4 KiB random write QD1", rw: "randwrite",
    blockSizeBytes: 4096, iodepth: 1 },
  { key: "randwrite_qd32", title: "4 KiB random write QD32", rw: "randwrite",
    blockSizeBytes: 4096, iodepth: 32 },
  { key: "randread_qd32", title: "4 KiB random read QD32", rw: "randread",
    blockSizeBytes: 4096, iodepth: 32 },
  { key: "write_1m_qd8", title: "1 MiB sequential write QD8", rw: "write",
    blockSizeBytes: 1 << 20, iodepth: 8 },
];

/** A sequential 1 MiB QD8 write of the whole device once (preconditioning, resync setup). */
export const FILL: Workload = {
  key: "write_1m_qd8", title: "fill the device", rw: "write", blockSizeBytes: 1 << 20, iodepth: 8,
};

/**
 * The size every workload uses on every target: the smallest device, rounded down to the largest
 * block size, so that hast (whose data area is its disk less the metadata) and the reference get
 * the same range and, with fio's default `randrepeat`, the same offsets.
 */
export function commonSizeBytes(sizes: number[]): number {
  assert(sizes.length > 0);
  const blockBytes = Math.max(...WORKLOADS.map((w) => w.blockSizeBytes));
  const size = Math.floor(Math.min(...sizes) / blockBytes) * blockBytes;
  if (size <= 0) throw new RangeError(`Cannot size the workloads: a device is smaller than ${blockBytes} bytes`);
  return size;
}

/** Figures of one fio run (one job, one direction). */
export interface FioResult {
  iops: number;
  bytesPerSecond: number;
  clatMeanUs: number;
  clatP99Us: number;
  ioBytes: number;
  runtimeMs: number;
}

/** Options of {@link runFio}. */
export interface FioOptions {
  /** Device size (fio `--size`). */
  sizeBytes: number;
  /** Time-based run of this many seconds; without it, one pass over `sizeBytes`. */
  seconds?: number;
  /** Where fio writes its JSON report. */
  outputPath: string;
  /** More fio options, e.g. ["--randseed=2", "--refill_buffers"] for data unlike earlier runs. */
  extraArgs?: string[];
}

/** Runs `workload` against `uri` and returns its figures; throws if fio or the job failed. */
export async function runFio(
  uri: string, workload: Workload, options: FioOptions,
): Promise<FioResult> {
  assert(options.sizeBytes > 0);
  const argv = [
    "fio", "--name=bench", "--ioengine=nbd", `--uri=${uri}`, `--rw=${workload.rw}`,
    `--bs=${workload.blockSizeBytes}`, `--iodepth=${workload.iodepth}`, "--numjobs=1",
    `--size=${options.sizeBytes}`, "--output-format=json", `--output=${options.outputPath}`,
  ];
  if (options.seconds !== undefined) argv.push("--time_based", `--runtime=${options.seconds}`);
  argv.push(...(options.extraArgs ?? []));
  const timeoutMs = options.seconds !== undefined ? (options.seconds + 120) * 1000 : 900_000;
  // A report left by an earlier job must not be read as this one's.
  rmSync(options.outputPath, { force: true });
  await runCommand(argv, { timeoutMs });
  return parseFioJson(readFileSync(options.outputPath, "utf8"), workload);
}

/** Extracts the figures of the single job's read or write side from fio's JSON report. */
export function parseFioJson(text: string, workload: Workload): FioResult {
  const report = JSON.parse(text);
  const job = report.jobs?.[0];
  if (job === undefined) {
    throw new Error(`Cannot parse fio report: no job in "${text.slice(0, 200)}"`);
  }
  if (job.error !== 0) {
    throw new Error(`Cannot run fio job "${workload.title}": error ${job.error}`);
  }
  const side = workload.rw === "randread" ? job.read : job.write;
  if (!(side.io_bytes > 0)) throw new Error(`Cannot run fio job "${workload.title}": no I/O done`);
  const p99Ns = side.clat_ns.percentile?.["99.000000"];
  return {
    iops: side.iops,
    bytesPerSecond: side.bw_bytes,
    clatMeanUs: side.clat_ns.mean / 1000,
    clatP99Us: typeof p99Ns === "number" ? p99Ns / 1000 : Number.NaN,
    ioBytes: side.io_bytes,
    runtimeMs: side.runtime,
  };
}
