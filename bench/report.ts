/**
 * The benchmark's report: medians and ratios to the reference, the target checks from the issue,
 * and the markdown that is printed and written into the generated section of bench/RESULTS.md.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import type { FioResult, WorkloadKey } from "./fio.ts";
import type { MemoryStats } from "./targets.ts";

/** Which targets of the issue apply to a configuration. */
export type TargetClass = "reference" | "none" | "fullsync" | "memsync" | "async";

/** Everything measured for one configuration. */
export interface ConfigResult {
  label: string;
  targetClass: TargetClass;
  /** Runs per workload, in run order. */
  runs: Map<WorkloadKey, FioResult[]>;
  /** Primary worker memory after set-up, and after all workloads (hast only). */
  memoryIdle?: MemoryStats | null;
  memoryEnd?: MemoryStats | null;
  workerRestarts?: number;
}

/** The resync measurement. */
export interface ResyncResult {
  datasizeBytes: number;
  dirtyBytes: number[];
  seconds: number[];
  /** Of `seconds`, until the primary was first seen connected (its reconnect interval: RECONNECT_INTERVAL_MS). */
  connectSeconds: number[];
  hastRateBytesPerSecond: number[];
  memoryEnd: MemoryStats | null;
  verified: boolean;
}

/** Facts about the run printed above the tables. */
export interface RunFacts {
  date: string;
  machine: string[];
  commit: string;
  /** Markdown: the command in backticks, and how it was started. */
  commandLine: string;
  settings: string;
}

/** Median of a non-empty list (mean of the middle two for even lengths). */
export function median(values: number[]): number {
  assert(values.length > 0);
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

type Metric = "clatMeanUs" | "clatP99Us" | "iops" | "bytesPerSecond";

interface Column {
  title: string;
  workload: WorkloadKey;
  metric: Metric;
  format: (value: number) => string;
}

const integer = (v: number) => Math.round(v).toLocaleString("en-US");

/** Table columns; the arrow says which direction is better (latency: lower). */
const COLUMNS: readonly Column[] = [
  { title: "4K rand write QD1 mean µs ↓", workload: "randwrite_qd1", metric: "clatMeanUs",
    format: (v) => v.toFixed(1) },
  { title: "4K rand write QD1 p99 µs ↓", workload: "randwrite_qd1", metric: "clatP99Us",
    format: (v) => v.toFixed(0) },
  { title: "4K rand write QD32 IOPS ↑", workload: "randwrite_qd32", metric: "iops",
    format: integer },
  { title: "4K rand read QD32 IOPS ↑", workload: "randread_qd32", metric: "iops",
    format: integer },
  { title: "1M seq write QD8 MB/s ↑", workload: "write_1m_qd8", metric: "bytesPerSecond",
    format: (v) => (v / 1e6).toFixed(0) },
];

function medianOf(result: ConfigResult, workload: WorkloadKey, metric: Metric): number {
  const runs = result.runs.get(workload) ?? [];
  return runs.length === 0 ? Number.NaN : median(runs.map((run) => run[metric]));
}

/** hast/ref ratio of a column's medians. */
function ratio(result: ConfigResult, reference: ConfigResult, column: Column): number {
  const of = (r: ConfigResult) => medianOf(r, column.workload, column.metric);
  return of(result) / of(reference);
}

type SpeedName = "QD1 latency" | "QD32 write" | "QD32 read" | "1M seq";
const SPEED_NAMES: readonly SpeedName[] = ["QD1 latency", "QD32 write", "QD32 read", "1M seq"];

/**
 * The targets for a class as floors on "speed" ratios, higher is better; for QD1 the
 * ratio is reference latency / hast latency, so "latency ≤ 1.5×" is the floor 1/1.5.
 */
function floorsFor(targetClass: TargetClass): Map<SpeedName, number> {
  const floors = new Map<SpeedName, number>();
  const raise = (name: SpeedName, floor: number) =>
    floors.set(name, Math.max(floors.get(name) ?? 0, floor));
  const everyWorkload: Partial<Record<TargetClass, number>> = {
    none: 0.95, async: 0.9, memsync: 0.8,
  };
  const floor = everyWorkload[targetClass];
  if (floor !== undefined) for (const name of SPEED_NAMES) raise(name, floor);
  if (targetClass === "fullsync") {
    raise("QD32 write", 0.7);
    raise("QD32 read", 0.7);
    raise("QD1 latency", 1 / 1.5);
  }
  if (targetClass !== "none" && targetClass !== "reference") raise("1M seq", 0.5);
  return floors;
}

/** The targets that `result` misses, as short texts ("QD32 write 0.61 < 0.7"). */
export function missedTargets(result: ConfigResult, reference: ConfigResult): string[] {
  const r = (workload: WorkloadKey, metric: Metric) =>
    ratio(result, reference, COLUMNS.find((c) => c.workload === workload && c.metric === metric)!);
  const speed: Record<SpeedName, number> = {
    "QD1 latency": 1 / r("randwrite_qd1", "clatMeanUs"),
    "QD32 write": r("randwrite_qd32", "iops"),
    "QD32 read": r("randread_qd32", "iops"),
    "1M seq": r("write_1m_qd8", "bytesPerSecond"),
  };
  const missed: string[] = [];
  for (const [name, floor] of floorsFor(result.targetClass)) {
    if (speed[name] >= floor) continue;
    missed.push(name === "QD1 latency"
      ? `QD1 latency ×${(1 / speed[name]).toFixed(2)} > ×${(1 / floor).toFixed(2)}`
      : `${name} ${speed[name].toFixed(2)} < ${floor}`);
  }
  return missed;
}

function mib(bytes: number | undefined): string {
  return bytes === undefined || Number.isNaN(bytes) ? "?" : (bytes / 2 ** 20).toFixed(0);
}

function memoryCell(result: ConfigResult): string {
  if (result.targetClass === "reference") return "—";
  const idle = result.memoryIdle?.rssBytes;
  const end = result.memoryEnd;
  if (end === null || end === undefined) return "worker gone";
  return `${mib(idle)} / ${mib(end.hwmBytes)} / ${mib(end.rssBytes)}`;
}

/** The main table: medians, ratios to the reference, worker memory and missed targets. */
export function renderMainTable(results: ConfigResult[]): string {
  const reference = results.find((r) => r.targetClass === "reference");
  assert(reference !== undefined);
  const header = ["configuration", ...COLUMNS.map((c) => c.title),
    "primary worker RSS MiB idle / peak / end", "targets missed"];
  const rows = results.map((result) => {
    const cells = COLUMNS.map((column) => {
      const value = column.format(medianOf(result, column.workload, column.metric));
      if (result === reference) return value;
      return `${value} (×${ratio(result, reference, column).toFixed(2)})`;
    });
    const missed = result === reference
      ? "—"
      : missedTargets(result, reference).join("; ") || "none";
    const restarts = result.workerRestarts ? ` (worker restarted ${result.workerRestarts}×)` : "";
    return [result.label, ...cells, memoryCell(result) + restarts, missed];
  });
  return markdownTable(header, rows);
}

/** Every run's value per configuration, to show the spread behind the medians. */
export function renderRunsTable(results: ConfigResult[]): string {
  const header = ["configuration", ...COLUMNS.map((c) => c.title.replace(/ [↑↓]$/, ""))];
  const rows = results.map((result) => [result.label, ...COLUMNS.map((column) => {
    const runs = result.runs.get(column.workload) ?? [];
    return runs.map((run) => column.format(run[column.metric])).join(" / ");
  })]);
  return markdownTable(header, rows);
}

/** The resync table; the ratio is to the reference's median 1 MiB sequential write rate. */
export function renderResyncTable(resync: ResyncResult, reference: ConfigResult): string {
  const rates = resync.seconds.map((s, i) => resync.dirtyBytes[i] / s);
  const rate = median(rates);
  const referenceRate = medianOf(reference, "write_1m_qd8", "bytesPerSecond");
  const factor = rate / referenceRate;
  const header = ["resource", "dirty at start MiB", "time s (runs)", "of which until connected s",
    "MB/s (median)",
    "×ref 1M seq write ↑", "hast's own rate MB/s", "primary worker peak RSS MiB",
    "data identical after", "targets missed"];
  const row = [
    `${mib(resync.datasizeBytes)} MiB, default settings`,
    resync.dirtyBytes.map((b) => mib(b)).join(" / "),
    resync.seconds.map((s) => s.toFixed(2)).join(" / "),
    resync.connectSeconds.map((s) => s.toFixed(2)).join(" / "),
    (rate / 1e6).toFixed(0),
    factor.toFixed(2),
    resync.hastRateBytesPerSecond.map((b) => (b / 1e6).toFixed(0)).join(" / "),
    mib(resync.memoryEnd?.hwmBytes),
    resync.verified ? "yes" : "NO",
    factor >= 0.5 ? "none" : `resync ${factor.toFixed(2)} < 0.5`,
  ];
  return markdownTable(header, [row]);
}

/** Daemon log warnings and errors per configuration (message digits replaced by N). */
export function renderLogFindings(findings: Map<string, Map<string, number>>): string {
  const lines: string[] = [];
  for (const [label, found] of findings) {
    if (found.size === 0) {
      lines.push(`- ${label}: no warnings or errors`);
      continue;
    }
    lines.push(`- ${label}:`);
    const sorted = [...found].sort((a, b) => b[1] - a[1]);
    for (const [message, count] of sorted.slice(0, 8)) {
      lines.push(`  - ${count}× \`${message.slice(0, 200)}\``);
    }
    if (sorted.length > 8) lines.push(`  - … ${sorted.length - 8} more distinct messages`);
  }
  return lines.join("\n");
}

function markdownTable(header: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.map((c) => c.replaceAll("|", "\\|")).join(" | ")} |`;
  return [line(header), line(header.map(() => "---")), ...rows.map(line)].join("\n");
}

/** The generated section: run facts, then the tables. */
export function renderGenerated(facts: RunFacts, parts: { title: string; body: string }[]): string {
  const lines = [
    `Generated by \`bench/run.ts\` on ${facts.date}.`, "",
    `- command: ${facts.commandLine}`,
    `- git: ${facts.commit}`,
    `- settings: ${facts.settings}`,
    ...facts.machine.map((m) => `- ${m}`), "",
  ];
  for (const part of parts) lines.push(`### ${part.title}`, "", part.body, "");
  return lines.join("\n");
}

const BEGIN = "<!-- BEGIN GENERATED: bench/run.ts rewrites everything up to the END marker -->";
const END = "<!-- END GENERATED -->";

const DEFAULT_HEADER = `# hast benchmark results

Written by \`npm run bench\` (\`bench/run.ts\`); the section between the markers is generated.
`;

/** Writes `generated` between the markers of `path`, keeping the hand-written text around it. */
export function writeResults(path: string, generated: string): void {
  let before = DEFAULT_HEADER + "\n";
  let after = "";
  if (existsSync(path)) {
    const text = readFileSync(path, "utf8");
    const begin = text.indexOf(BEGIN);
    const end = text.indexOf(END);
    if (begin >= 0 && end > begin) {
      before = text.slice(0, begin);
      after = text.slice(end + END.length);
    } else {
      before = text.trimEnd() + "\n\n";
    }
  }
  writeFileSync(path, `${before}${BEGIN}\n\n${generated.trim()}\n\n${END}${after || "\n"}`);
}
