/**
 * Facts about a benchmark run that make its numbers interpretable later: date, machine (CPUs,
 * CPU model, kernel, memory, load), tool versions, the git commit and whether the tree was dirty,
 * and the exact command line.
 */
import { readFileSync } from "node:fs";
import { availableParallelism, loadavg, release, totalmem } from "node:os";
import { runCommand } from "./proc.ts";
import type { RunFacts } from "./report.ts";

/** Collects the {@link RunFacts} of this run; `args` are the flags given to bench/run.ts. */
export async function describeRun(
  root: string, args: string[], options: { settings: string },
): Promise<RunFacts> {
  const cpuinfo = readFileSync("/proc/cpuinfo", "utf8");
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1].trim() ?? "unknown";
  const viaNpm = process.env.npm_lifecycle_event === "bench" ? " (via `npm run bench`)" : "";
  const command = ["bun", "bench/run.ts", ...args].join(" ");
  return {
    date: new Date().toISOString(),
    commandLine: `\`${command}\`${viaNpm}`,
    commit: await gitState(root),
    machine: [
      `machine: nproc ${availableParallelism()}, CPU "${model}", kernel ${release()}, ` +
        `memory ${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
      `load average at start: ${loadavg().map((l) => l.toFixed(2)).join(" ")} ` +
        "(other work on this shared machine is not controlled)",
      `tools: bun ${Bun.version}, ${await firstLine(["fio", "--version"])}, ` +
        `${await firstLine(["nbdkit", "--version"])}`,
    ],
    settings: options.settings,
  };
}

async function firstLine(argv: string[]): Promise<string> {
  const result = await runCommand(argv, { allowFailure: true });
  return (result.stdout || result.stderr).split("\n")[0].trim();
}

/** "abc1234, tree dirty (5 paths changed, 2 outside bench/)" or "abc1234, tree clean". */
async function gitState(root: string): Promise<string> {
  const git = async (...args: string[]) =>
    (await runCommand(["git", ...args], { cwd: root })).stdout;
  const head = (await git("rev-parse", "--short", "HEAD")).trim();
  const status = await git("status", "--porcelain");
  const paths = status.split("\n").filter((line) => line.trim() !== "")
    .map((line) => line.slice(3));
  if (paths.length === 0) return `${head}, tree clean`;
  const outside = paths.filter((path) => !path.startsWith("bench/"));
  const shown = `${outside.slice(0, 6).join(", ")}${outside.length > 6 ? ", …" : ""}`;
  return `${head}, tree dirty (${paths.length} paths changed or untracked, ` +
    `${outside.length} outside bench/: ${shown})`;
}
