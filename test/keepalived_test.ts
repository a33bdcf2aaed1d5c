/**
 * Automatic failover with keepalived (README, "Automatic failover with keepalived"), for real:
 * two hosts as network namespaces joined by a veth pair, each running hast and keepalived
 * (VRRP over the veth). keepalived, not hast, decides the roles through its notify commands
 * (`hast role primary|secondary`), and `hast promotable` is its health check.
 *
 * Proves, in each case without any `hast role` from the test until keepalived has acted:
 * - a (higher priority) becomes primary and b secondary; when a's host dies (SIGKILL of a's
 *   keepalived and a's hast, both process groups), b is promoted and serves what a's client
 *   wrote; when a's host comes back, it stays backup (nopreempt), becomes secondary, resyncs
 *   from b, and the two data areas end byte-identical.
 * - when a's disk loses writes it had cached (a loop device over a full tmpfs: the writeback
 *   fails, the flush reports EIO), a's health check fails, keepalived's `notify_fault` demotes
 *   a and b is promoted; b serves every write a's client was told succeeded; once a's disk has
 *   room again, a becomes secondary (as an operator would finish it) and resyncs from b.
 */
import { expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type Cluster, type ClusterOptions, createCluster, hastCommand, type NodeName } from "./cluster.ts";
import { Cleanup, diskThatLosesWrites, run, type SpawnedProcess, spawnProcess } from "./harness.ts";

const MIB = 1024 * 1024;
const DEVICE_BYTES = 64 * MIB;
const PRIORITY: Record<NodeName, number> = { a: 150, b: 100 };

/** keepalived.conf for `node`, as the README shows it, with this test's paths. */
function keepalivedConf(c: Cluster, node: NodeName): string {
  const hast = [...hastCommand(), "-c", join(c.dir, "hast.conf"), "--node", node].join(" ");
  const vip = c.nodes[node].ip.replace(/\.\d+$/, ".100");
  return `global_defs {
  router_id hast_${node}
  script_user root
}
vrrp_script chk_hast {
  script "${hast} promotable data"
  interval 2
  timeout 10
  fall 3
  rise 2
}
vrrp_instance hast_data {
  state BACKUP
  nopreempt
  interface veth0
  virtual_router_id 51
  priority ${PRIORITY[node]}
  advert_int 1
  virtual_ipaddress {
    ${vip}/24
  }
  track_script {
    chk_hast
  }
  notify_master "${hast} role primary data"
  notify_backup "${hast} role secondary data"
  notify_fault "${hast} role secondary data"
}
`;
}

function startKeepalived(cleanup: Cleanup, c: Cluster, node: NodeName): SpawnedProcess {
  const conf = join(c.dir, `keepalived-${node}.conf`);
  writeFileSync(conf, keepalivedConf(c, node));
  const pid = (kind: string) => join(c.dir, `keepalived-${node}.${kind}.pid`);
  // Debian installs it in /usr/sbin, which a non-login PATH may lack.
  const program = Bun.which("keepalived") ?? "/usr/sbin/keepalived";
  return spawnProcess(cleanup, [
    program, "--dont-fork", "--log-console", "--log-detail", "--vrrp", "-f", conf,
    "-p", pid("main"), "-r", pid("vrrp"), "-c", pid("checkers"),
  ], { ns: c.nodes[node].ns, logPath: join(c.dir, `keepalived-${node}.log`) });
}

/** A netns pair managed by keepalived: a primary and b secondary by election, pair complete. */
async function startManagedPair(
  cleanup: Cleanup, options: ClusterOptions,
): Promise<{ cluster: Cluster; kaA: SpawnedProcess }> {
  const cluster = await createCluster(cleanup, { netns: true, replication: "fullsync", ...options });
  await cluster.createBoth();
  await cluster.startDaemon("a");
  await cluster.startDaemon("b");
  const kaA = startKeepalived(cleanup, cluster, "a");
  await cluster.waitStatus("a", "a primary (keepalived master)", (s) => s.role === "primary", 30_000);
  startKeepalived(cleanup, cluster, "b");
  await cluster.waitStatus("b", "b secondary (keepalived backup)", (s) => s.role === "secondary", 30_000);
  await cluster.waitStatus("a", "pair complete", (s) => s.status === "complete" && s.dirtyBytes === 0);
  return { cluster, kaA };
}

/**
 * Runs a scenario with a fresh Cleanup; a failure's message gets the tail of the keepalived
 * and hast logs of the cluster the scenario registered (they live in a temp dir removed on
 * cleanup).
 */
async function scenario(body: (cleanup: Cleanup, registered: (c: Cluster) => void) => Promise<void>) {
  const cleanup = new Cleanup();
  let dir: string | null = null;
  try {
    await body(cleanup, (c) => {
      dir = c.dir;
    });
  } catch (error) {
    if (dir !== null && error instanceof Error) {
      for (const name of ["keepalived-a.log", "keepalived-b.log", "a.log", "b.log"]) {
        try {
          error.message += `\n--- ${name} ---\n${readFileSync(join(dir, name), "utf8").slice(-6000)}`;
        } catch {
          // not written
        }
      }
    }
    throw error;
  } finally {
    await cleanup.run();
  }
}

test("keepalived promotes b when a's host dies; a comes back as secondary and resyncs", async () => {
  await scenario(async (cleanup, registered) => {
    const { cluster, kaA } = await startManagedPair(cleanup, { createArgs: ["-e", "1M"] });
    registered(cluster);
    await run(["qemu-io", "-f", "raw", cluster.uri("a"), "-c", "write -P 0x3c 0 8M", "-c", "flush"]);

    // a's host dies: keepalived and hast (daemon and worker) at once.
    kaA.killGroup("SIGKILL");
    await kaA.exited;
    await cluster.killDaemon("a");
    await cluster.waitStatus("b", "b promoted by keepalived", (s) => s.role === "primary", 30_000);
    const read = await run(["qemu-io", "-f", "raw", cluster.uri("b"), "-c", `read -P 0x3c 0 ${8 * MIB}`]);
    expect(read.stdout).toContain(`read ${8 * MIB}/${8 * MIB} bytes`);
    expect(read.stdout).not.toContain("Pattern verification failed");

    // a's host comes back: b stays master (nopreempt); a becomes secondary and resyncs.
    await cluster.startDaemon("a");
    startKeepalived(cleanup, cluster, "a");
    await cluster.waitStatus("a", "a secondary (keepalived backup)", (s) => s.role === "secondary", 30_000);
    await cluster.waitStatus("b", "pair complete again",
      (s) => s.role === "primary" && s.status === "complete" && s.dirtyBytes === 0, 60_000);
    expect((await cluster.status("a")).role).toBe("secondary");
    expect(Buffer.compare(await cluster.readData("a"), await cluster.readData("b"))).toBe(0);
  });
}, 180_000);

test("keepalived's notify_fault demotes a primary whose disk lost writes; b takes over with them", async () => {
  await scenario(async (cleanup, registered) => {
    // a's disk: a loop device over a sparse file on a 2 MiB tmpfs, room for the metadata and one
    // extent. Writeback of any 1 MiB more fails, and the next flush reports EIO.
    const disk = await diskThatLosesWrites(cleanup, DEVICE_BYTES, 2 * MIB);
    const dev = disk.dev;
    const { cluster } = await startManagedPair(cleanup, {
      createArgs: ["-e", "1M", "-k", "4"], localOverride: { a: dev }, sizeBytes: DEVICE_BYTES,
    });
    registered(cluster);
    await run(["qemu-io", "-f", "raw", cluster.uri("a"), "-c", "write -P 0x11 0 1M", "-c", "flush"]);

    const extents = [10, 11, 12, 13, 14, 15];
    const client = await run(["qemu-io", "-f", "raw", cluster.uri("a"),
      ...extents.flatMap((e) => ["-c", `write -P 0x5a ${e * MIB} 1M`]), "-c", "flush"],
    { timeoutMs: 60_000, allowFailure: true });
    expect(`${client.stdout}${client.stderr}`).toMatch(/flush failed|Input\/output error/i);
    const acknowledged = [...client.stdout.matchAll(/wrote 1048576\/1048576 bytes at offset (\d+)/g)]
      .map((m) => Number(m[1]) / MIB);
    expect(acknowledged.length).toBeGreaterThan(0);

    // keepalived alone: a's check fails 3 times (fall 3, every 2 s), a goes to FAULT and
    // notify_fault demotes it; b stops hearing a master and notify_master promotes it.
    await cluster.waitStatus("a", "a demoted by notify_fault", (s) => s.role !== "primary", 60_000);
    await cluster.waitStatus("b", "b promoted by keepalived", (s) => s.role === "primary", 60_000);
    expect(readFileSync(join(cluster.dir, "keepalived-a.log"), "utf8")).toMatch(/Entering FAULT STATE/);
    for (const e of [0, ...acknowledged]) {
      const pattern = e === 0 ? "0x11" : "0x5a";
      const read = await run(["qemu-io", "-f", "raw", "-r", cluster.uri("b"),
        "-c", `read -P ${pattern} ${e * MIB} 1M`]);
      expect(read.stdout).not.toContain("Pattern verification failed");
      expect(read.stdout).toContain(`read ${MIB}/${MIB} bytes`);
    }

    // The disk has room again. a's worker may have failed to start as secondary on the
    // kernel's leftover writeback error; the operator repeats the command (README).
    await disk.resize(2 * DEVICE_BYTES);
    if ((await cluster.status("a")).role !== "secondary") {
      const first = await cluster.hast("a", ["role", "secondary", "data"], { allowFailure: true });
      if (first.code !== 0) await cluster.hast("a", ["role", "secondary", "data"]);
    }
    await cluster.waitStatus("b", "b resynced a",
      (s) => s.role === "primary" && s.status === "complete" && s.dirtyBytes === 0, 60_000);
    const dump = await cluster.dump("a");
    expect([dump.localWritesLost, dump.syncTarget]).toEqual([false, false]);
    const a = await cluster.readData("a");
    expect(Buffer.compare(a, await cluster.readData("b"))).toBe(0);
    for (const e of acknowledged) expect(a.subarray(e * MIB, (e + 1) * MIB).every((x) => x === 0x5a)).toBe(true);
  });
}, 180_000);
