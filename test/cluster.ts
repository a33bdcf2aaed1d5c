/**
 * A two-node hast cluster for tests: a config with nodes "a" and "b", file-backed
 * providers, daemons started with `hast serve -F` (inside network namespaces
 * when `netns` is set, else on loopback 127.0.0.1/127.0.0.2), and helpers to run
 * `hast` commands and read status. Everything is registered with a Cleanup.
 *
 * The hast command is `$HAST_BIN` when set (e.g. dist/hast), else `bun main.ts`.
 */
import { closeSync, openSync, readFileSync, readSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import {
  type Cleanup, createHostPair, type HostPair, makeTempDir, run, type RunResult, spawnProcess,
  type SpawnedProcess, waitFor,
} from "./harness.ts";

const ROOT = resolve(import.meta.dir, "..");

/** argv prefix that runs hast. */
export function hastCommand(): string[] {
  const bin = process.env.HAST_BIN;
  if (bin) return [resolve(ROOT, bin)];
  return [process.execPath, join(ROOT, "main.ts")];
}

export type NodeName = "a" | "b";

export interface ClusterOptions {
  /** Run the daemons in two network namespaces joined by a veth pair. */
  netns?: boolean;
  replication?: "fullsync" | "memsync" | "async";
  /** Size of each provider file (default 64 MiB). */
  sizeBytes?: number;
  /** `hast create` options, e.g. ["-e", "1M", "-k", "4"]. */
  createArgs?: string[];
  /** Extra lines inside the resource section (e.g. "exec /path/hook", "timeout 5"). */
  resourceLines?: string[];
  /** Extra lines for one node's resource section. */
  nodeLines?: Partial<Record<NodeName, string[]>>;
  /** Port for replication (default: random high port in loopback mode, 8457 in netns). */
  port?: number;
  /**
   * A provider path per node used instead of a fresh image file (e.g. a loop device the test
   * set up); it is neither created nor truncated here, and `image`/`readData` refer to it.
   */
  localOverride?: Partial<Record<NodeName, string>>;
  /**
   * A `remote` address per node ("host:port") used instead of the other node's listen address,
   * e.g. a relay the test puts on the link.
   */
  remoteOverride?: Partial<Record<NodeName, string>>;
}

export interface ClusterNode {
  name: NodeName;
  ip: string;
  ns?: string;
  image: string;
  control: string;
  socket: string;
  log: string;
  daemon: SpawnedProcess | null;
}

export interface Cluster {
  dir: string;
  configPath: string;
  pair: HostPair | null;
  nodes: Record<NodeName, ClusterNode>;
  /** Runs `hast -c conf --node N args…` (in the node's namespace). Throws on non-zero exit unless allowFailure. */
  hast(node: NodeName, args: string[], options?: { allowFailure?: boolean }): Promise<RunResult>;
  /** `hast create` on both nodes. */
  createBoth(): Promise<void>;
  /** Starts `hast serve -F` for a node and waits until it answers. */
  startDaemon(node: NodeName): Promise<SpawnedProcess>;
  /** SIGKILLs a node's daemon and its workers (process group). */
  killDaemon(node: NodeName): Promise<void>;
  /**
   * The usual start: `hast create` on both, both daemons, b secondary, a primary; waits until a
   * reports the pair complete and returns that status.
   */
  startPair(): Promise<Record<string, any>>;
  /** The JSON status object of the resource on a node. */
  status(node: NodeName): Promise<Record<string, any>>;
  /** Polls status until `predicate` holds. */
  waitStatus(
    node: NodeName, what: string, predicate: (s: Record<string, any>) => boolean, timeoutMs?: number,
  ): Promise<Record<string, any>>;
  /** libnbd URI of a node's export. */
  uri(node: NodeName): string;
  /** Reads a node's data area (the bytes the export shows), straight from its image file. */
  readData(node: NodeName, offset?: number, length?: number): Promise<Uint8Array>;
  /** The on-disk metadata as `hast dump --json` prints it. */
  dump(node: NodeName): Promise<Record<string, any>>;
}

let portCounter = 0;

/** Creates the cluster's files and config (no daemon started yet). */
export async function createCluster(cleanup: Cleanup, options: ClusterOptions = {}): Promise<Cluster> {
  const dir = await makeTempDir(cleanup, "hast-cluster-");
  const pair = options.netns ? await createHostPair(cleanup) : null;
  const port = options.port ?? (options.netns ? 8457 : 20000 + ((process.pid * 7 + portCounter++ * 131) % 20000));
  const mk = (name: NodeName, ip: string, ns?: string): ClusterNode => ({
    name, ip, ns,
    image: options.localOverride?.[name] ?? join(dir, `${name}.img`),
    control: join(dir, `${name}.ctl`),
    socket: join(dir, `${name}.sock`),
    log: join(dir, `${name}.log`),
    daemon: null,
  });
  const nodes = {
    a: mk("a", pair ? pair.a.ip : "127.0.0.1", pair?.a.ns),
    b: mk("b", pair ? pair.b.ip : "127.0.0.2", pair?.b.ns),
  };
  const sizeBytes = options.sizeBytes ?? 64 * 1024 * 1024;
  for (const node of Object.values(nodes)) {
    if (options.localOverride?.[node.name] !== undefined) continue;
    writeFileSync(node.image, "");
    await run(["truncate", "-s", String(sizeBytes), node.image]);
  }
  const configPath = join(dir, "hast.conf");
  writeFileSync(configPath, renderConfig(nodes, port, options));
  const cluster: Cluster = {
    dir, configPath, pair, nodes,
    hast: (node, args, o = {}) =>
      run([...hastCommand(), "-c", configPath, "--node", node, ...args], {
        ns: nodes[node].ns, allowFailure: o.allowFailure, timeoutMs: 120_000,
      }),
    async createBoth() {
      await cluster.hast("a", ["create", ...(options.createArgs ?? []), "data"]);
      await cluster.hast("b", ["create", ...(options.createArgs ?? []), "data"]);
    },
    async startDaemon(name) {
      const node = nodes[name];
      const proc = spawnProcess(cleanup, [...hastCommand(), "-c", configPath, "--node", name, "serve", "-F", "-d"], {
        ns: node.ns, logPath: node.log,
      });
      node.daemon = proc;
      await waitFor(`daemon ${name} answers`, async () => {
        if (proc.hasExited()) throw new Error(`daemon ${name} exited: ${await proc.readLog()}`);
        const r = await cluster.hast(name, ["status", "--json"], { allowFailure: true });
        return r.code === 0;
      }, { timeoutMs: 30_000 });
      return proc;
    },
    async killDaemon(name) {
      const proc = nodes[name].daemon;
      if (!proc) return;
      proc.killGroup("SIGKILL");
      await proc.exited;
      nodes[name].daemon = null;
    },
    async startPair() {
      await cluster.createBoth();
      await cluster.startDaemon("a");
      await cluster.startDaemon("b");
      await cluster.hast("b", ["role", "secondary", "data"]);
      await cluster.hast("a", ["role", "primary", "data"]);
      return cluster.waitStatus("a", "pair complete", (s) => s.status === "complete");
    },
    async status(name) {
      const r = await cluster.hast(name, ["status", "--json"]);
      return JSON.parse(r.stdout).resources[0];
    },
    async waitStatus(name, what, predicate, timeoutMs = 60_000) {
      let last: Record<string, any> = {};
      try {
        return await waitFor(what, async () => {
          last = await cluster.status(name);
          return predicate(last) ? last : undefined;
        }, { timeoutMs, intervalMs: 200 });
      } catch (error) {
        throw new Error(`${(error as Error).message}; last status of ${name}: ${JSON.stringify(last)}`);
      }
    },
    uri: (name) => `nbd+unix:///?socket=${nodes[name].socket}`,
    async dump(name) {
      const r = await cluster.hast(name, ["dump", "--json"]);
      return JSON.parse(r.stdout).resources[0];
    },
    async readData(name, offset = 0, length) {
      const m = await cluster.dump(name);
      const size = length ?? m.datasizeBytes - offset;
      const out = new Uint8Array(size);
      const fd = openSync(nodes[name].image, "r");
      try {
        readSync(fd, out, 0, size, m.dataOffsetBytes + offset);
      } finally {
        closeSync(fd);
      }
      return out;
    },
  };
  cleanup.add("stop hast daemons", async () => {
    for (const node of Object.values(nodes)) {
      if (node.daemon && !node.daemon.hasExited()) {
        node.daemon.kill("SIGTERM");
        await Promise.race([node.daemon.exited, Bun.sleep(5000)]);
      }
    }
  });
  return cluster;
}

function renderConfig(nodes: Record<NodeName, ClusterNode>, port: number, options: ClusterOptions): string {
  const other = (n: NodeName): ClusterNode => nodes[n === "a" ? "b" : "a"];
  const lines = [`replication ${options.replication ?? "fullsync"}`, "timeout 5"];
  for (const node of Object.values(nodes)) {
    lines.push(`on ${node.name} {`, `  control uds://${node.control}`, `  pidfile ${node.control}.pid`,
      `  listen tcp://${node.ip}:${port}`, `}`);
  }
  lines.push("resource data {", ...(options.resourceLines ?? []).map((l) => `  ${l}`));
  for (const node of Object.values(nodes)) {
    const remote = options.remoteOverride?.[node.name] ?? `${other(node.name).ip}:${port}`;
    lines.push(`  on ${node.name} {`, `    local ${node.image}`, `    remote tcp://${remote}`,
      `    source tcp://${node.ip}`, `    export uds://${node.socket}`,
      ...(options.nodeLines?.[node.name] ?? []).map((l) => `    ${l}`), "  }");
  }
  lines.push("}");
  return lines.join("\n") + "\n";
}

/**
 * Compiles hast the way `npm run build` does (same entrypoints, read from package.json's build
 * script), but into a temp dir so the tree's dist/ is left alone.
 * @returns the path of the executable.
 */
export async function buildHastBinary(cleanup: Cleanup): Promise<string> {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as {
    scripts: Record<string, string>;
  };
  const script = pkg.scripts.build ?? "";
  const entries = script.split(/\s+/).filter((word) => word.endsWith(".ts"));
  if (!entries.includes("main.ts")) throw new Error(`Cannot build: no main.ts in "${script}"`);
  const dir = await makeTempDir(cleanup, "hast-bin-");
  const outfile = join(dir, "hast");
  await run([process.execPath, "build", "--compile", ...entries.map((e) => join(ROOT, e)),
    "--outfile", outfile], { timeoutMs: 90_000 });
  return outfile;
}
