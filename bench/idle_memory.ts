/**
 * Standalone reproduction of the "idle memory" cost (bench/RESULTS.md): a Bun process that only
 * receives bytes over a Unix socket with node:net takes more page faults and ends with a larger
 * RSS when it also holds a SharedArrayBuffer it never touches. hast's resource workers hold such
 * memory (request slots, codec slots), so the same effect shows there on every request.
 *
 * Each measurement is a fresh child process (`--child MIB`): it allocates MIB MiB of
 * SharedArrayBuffer (0 = none), starts a node:net server on a Unix socket in a temp dir, and
 * spawns a sender that writes `--gib` GiB in 1 MiB writes. It reports the minor page faults and
 * CPU time of the receiving process from the first byte to the last, and its RSS at the end.
 * Allocator purging is off (`MIMALLOC_PURGE_DELAY=-1`), as in hast's workers. Sizes alternate
 * (0, N, 0, N, …) so that drift of this shared machine hits both alike.
 *
 * Run: node_modules/.bin/bun bench/idle_memory.ts [--mib 32] [--gib 4] [--rounds 3]
 */
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  args: Bun.argv.slice(2),
  options: {
    child: { type: "string" },
    mib: { type: "string", default: "32" },
    gib: { type: "string", default: "4" },
    rounds: { type: "string", default: "3" },
  },
});

/** What one child reports. */
interface Sample {
  idleMiB: number;
  faults: number;
  cpuMs: number;
  rssMiB: number;
}

if (values.child !== undefined) {
  const idleMiB = Number(values.child);
  // Held, never read or written: only its existence is measured.
  const idle = idleMiB > 0 ? new SharedArrayBuffer(idleMiB * 2 ** 20) : null;
  const totalBytes = Number(values.gib) * 2 ** 30;
  const dir = mkdtempSync(join(tmpdir(), "hast-idle-"));
  const path = join(dir, "s.sock");
  let start = process.resourceUsage();
  let received = 0;
  const server = net.createServer((socket) => {
    socket.on("data", (chunk: Buffer) => {
      if (received === 0) start = process.resourceUsage();
      received += chunk.byteLength;
    });
    socket.on("end", () => {
      const end = process.resourceUsage();
      const sample: Sample = {
        idleMiB: idle === null ? 0 : idle.byteLength / 2 ** 20,
        faults: end.minorPageFault - start.minorPageFault,
        cpuMs: Math.round((end.userCPUTime + end.systemCPUTime - start.userCPUTime - start.systemCPUTime) / 1000),
        rssMiB: Math.round(process.memoryUsage().rss / 2 ** 20),
      };
      if (received !== totalBytes) throw new Error(`received ${received} of ${totalBytes} bytes`);
      console.log(JSON.stringify(sample));
      server.close();
      rmSync(dir, { recursive: true, force: true });
    });
  });
  server.listen(path, () => {
    const sender = `
      const socket = require("node:net").connect(${JSON.stringify(path)});
      const chunk = Buffer.alloc(1 << 20, 7);
      let left = ${totalBytes / 2 ** 20};
      const pump = () => {
        while (left > 0) { left--; if (!socket.write(chunk)) { socket.once("drain", pump); return; } }
        socket.end();
      };
      socket.on("connect", pump);`;
    Bun.spawn([process.execPath, "-e", sender], { stdout: "inherit", stderr: "inherit" });
  });
} else {
  const sizes = [0, Number(values.mib)];
  const results = new Map<number, Sample[]>(sizes.map((size) => [size, []]));
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const size of sizes) {
      const child = Bun.spawnSync([
        process.execPath, import.meta.path, "--child", String(size), "--gib", String(values.gib),
      ], { env: { ...process.env, MIMALLOC_PURGE_DELAY: "-1" }, stderr: "inherit" });
      if (child.exitCode !== 0) throw new Error(`child for ${size} MiB failed (exit ${child.exitCode})`);
      const sample = JSON.parse(child.stdout.toString().trim()) as Sample;
      results.get(size)!.push(sample);
      console.log(JSON.stringify(sample));
    }
  }
  const list = (samples: Sample[], key: keyof Sample) => samples.map((s) => s[key]).join(" / ");
  console.log(`\nreceiving ${values.gib} GiB over a Unix socket (node:net), ${values.rounds} rounds:`);
  console.log("| idle SharedArrayBuffer | page faults | CPU ms | RSS at end, MiB |\n| --- | --- | --- | --- |");
  for (const [size, samples] of results) {
    const cells = [list(samples, "faults"), list(samples, "cpuMs"), list(samples, "rssMiB")];
    console.log(`| ${size} MiB | ${cells.join(" | ")} |`);
  }
}
