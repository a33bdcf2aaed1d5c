/**
 * hast — Highly Available STorage for Linux. One executable: `hast serve` is
 * the daemon, the other commands control it (see `hast --help`).
 */
import { runCli } from "./lib/cli.ts";
import { runWorker } from "./lib/resource_worker.ts";

if (process.argv[2] === "__worker") {
  runWorker();
} else {
  const code = await runCli(process.argv.slice(2));
  if (code !== 0 || process.argv[2] !== "serve") process.exit(code);
}
