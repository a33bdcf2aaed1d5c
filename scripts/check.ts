/**
 * Tree tidiness checks run by `npm run check` (and CI): line length, no
 * leftover debug output in the product code, no focused or skipped tests,
 * and the shell scripts (setup, demo, CI entry) at least parse (`bash -n`).
 * Paths are relative to the working directory (the repository root under npm).
 */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";

const MAX_LINE_CHARS = 120;
const ROOTS = ["main.ts", "lib", "workers", "test", "bench", "scripts"];
const SHELL_SCRIPTS = ["scripts/setup", "scripts/demo", ".ci/run"];

function files(path: string): string[] {
  try {
    if (statSync(path).isFile()) return path.endsWith(".ts") ? [path] : [];
  } catch {
    return [];
  }
  return readdirSync(path).flatMap((name) => files(join(path, name)));
}

const problems: string[] = [];
for (const file of ROOTS.flatMap(files)) {
  const lines = readFileSync(file, "utf8").split("\n");
  lines.forEach((line, i) => {
    const where = `${file}:${i + 1}`;
    if (line.length > MAX_LINE_CHARS) problems.push(`${where}: line of ${line.length} chars > ${MAX_LINE_CHARS}`);
    const product = file.startsWith("lib/") || file.startsWith("workers/") || file === "main.ts";
    if (product && /\bconsole\.(log|debug)\(/.test(line)) problems.push(`${where}: console output in product code`);
    if (/\b(test|it|describe)\.(only|skip|todo|skipIf|todoIf|if|failing)\(/.test(line) ||
      /\b(xit|xtest|xdescribe)\(/.test(line)) {
      problems.push(`${where}: focused, skipped or conditional test`);
    }
    if (/^\s*debugger;/.test(line)) problems.push(`${where}: debugger statement`);
  });
}
for (const file of SHELL_SCRIPTS.filter((script) => existsSync(script))) {
  const parsed = spawnSync("bash", ["-n", file], { encoding: "utf8" });
  if (parsed.status !== 0) problems.push(`${file}: bash -n: ${parsed.stderr.trim()}`);
  readFileSync(file, "utf8").split("\n").forEach((line, i) => {
    if (line.length > MAX_LINE_CHARS) {
      problems.push(`${file}:${i + 1}: line of ${line.length} chars > ${MAX_LINE_CHARS}`);
    }
  });
}
if (problems.length > 0) {
  console.error(problems.join("\n"));
  console.error(`check: ${problems.length} problem(s)`);
  process.exit(1);
}
console.log("check: ok");
