/**
 * Automatic failover with keepalived (README, "Automatic failover with keepalived"), for real:
 * two hosts as network namespaces joined by a veth pair, each running hast and keepalived
 * (VRRP over the veth). keepalived, not hast, decides the roles through its notify commands
 * (`hast role primary|secondary`), and `hast promotable` is its health check.
 *
 * Proves: a (higher priority) becomes primary and b secondary without any `hast role` from the
 * test; when a's host dies (SIGKILL of a's keepalived and a's hast, both process groups), b is
 * promoted and serves what a's client wrote; when a's host comes back, it stays backup
 * (nopreempt), becomes secondary, resyncs from b, and the two data areas end byte-identical.
 */
import { expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type Cluster, createCluster, hastCommand, type NodeName } from "./cluster.ts";
import { Cleanup, run, type SpawnedProcess, spawnProcess, waitFor } from "./harness.ts";

const MIB = 1024 * 1024;
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

test("keepalived promotes b when a's host dies; a comes back as secondary and resyncs", async () => {
  const cleanup = new Cleanup();
  let c: Cluster | null = null;
  try {
    c = await createCluster(cleanup, { netns: true, replication: "fullsync", createArgs: ["-e", "1M"] });
    const cluster = c;
    await cluster.createBoth();
    await cluster.startDaemon("a");
    await cluster.startDaemon("b");
    let kaA = startKeepalived(cleanup, cluster, "a");
    await cluster.waitStatus("a", "a primary (keepalived master)", (s) => s.role === "primary", 30_000);
    startKeepalived(cleanup, cluster, "b");
    await cluster.waitStatus("b", "b secondary (keepalived backup)", (s) => s.role === "secondary", 30_000);
    await cluster.waitStatus("a", "pair complete", (s) => s.status === "complete" && s.dirtyBytes === 0);
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
    kaA = startKeepalived(cleanup, cluster, "a");
    await cluster.waitStatus("a", "a secondary (keepalived backup)", (s) => s.role === "secondary", 30_000);
    await cluster.waitStatus("b", "pair complete again",
      (s) => s.role === "primary" && s.status === "complete" && s.dirtyBytes === 0, 60_000);
    expect((await cluster.status("a")).role).toBe("secondary");
    expect(Buffer.compare(await cluster.readData("a"), await cluster.readData("b"))).toBe(0);
  } catch (error) {
    if (c && error instanceof Error) {
      for (const name of ["keepalived-a.log", "keepalived-b.log", "a.log", "b.log"]) {
        try {
          error.message += `\n--- ${name} ---\n${readFileSync(join(c.dir, name), "utf8").slice(-6000)}`;
        } catch {
          // not written
        }
      }
    }
    throw error;
  } finally {
    await cleanup.run();
  }
}, 180_000);
