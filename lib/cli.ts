/**
 * The `hast` command line: `serve` (hastd) and the control commands
 * (hastctl). Exit codes follow sysexits(3).
 */
import { spawn } from "node:child_process";
import { closeSync, mkdirSync, openSync } from "node:fs";
import { dirname } from "node:path";
import { parseArgs } from "node:util";
import { loadConfig, type NodeConfig, type ResourceConfig } from "./config.ts";
import { controlRequest, type ControlRequest } from "./control.ts";
import { Daemon, selfCommand } from "./daemon.ts";
import { createMetadata, LAYOUT_ALIGN_BYTES, MetadataStore, stalenessOf } from "./metadata.ts";
import { Provider } from "./provider.ts";
import {
  EX_CONFIG, EX_TEMPFAIL, EX_USAGE, ExitError, exitCodeOf,
} from "./exit_codes.ts";
import { formatList, formatStatusTable } from "./status.ts";
import { parseSizeBytes } from "./units.ts";

const USAGE = `usage: hast [-c config] [--node name] command [options] [args]
commands:
  serve [-F] [-d]... [-P pidfile] [--log file]   run the daemon (hastd)
  create [-e extentsize] [-k keepdirty] [-m mediasize] [--force] name...
  role [--force] init|primary|secondary all|name...
  status [--json] [all|name...]
  list [--json] [all|name...]
  dump [--json] [all|name...]
  discard name...          mark this side's data to be overwritten by the peer (split-brain recovery)
  syncrate rate name...    change the sync rate limit at run time (e.g. 100M, 0 = unlimited)
  promotable name...       exit 0 if each resource may become primary here without --force (for a
                           cluster manager's health check, e.g. keepalived's vrrp_script), else 1
  verify [--wait] [--rate rate] name...
                           compare both copies online (on the primary); differing extents are
                           resynced from it. --wait: print the result; exit 1 if any differed.
                           --rate: at most this many bytes per second (e.g. 100M; default unlimited)
global options:
  -c file       configuration (default /etc/hast.conf; .yaml/.yml for YAML)
  --node name   act as this node instead of matching the host name`;

interface Globals {
  configPath: string;
  node?: string;
}

/** Runs the CLI; returns the exit code. */
export async function runCli(argv: string[]): Promise<number> {
  try {
    const { globals, command, rest } = splitGlobals(argv);
    if (command === "help" || wantsHelp(rest)) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    return await dispatch(globals, command, rest);
  } catch (error) {
    const code = exitCodeOf(error);
    process.stderr.write(`hast: ${error instanceof Error ? error.message : String(error)}\n`);
    if (code === EX_USAGE) process.stderr.write(`${USAGE}\n`);
    return code;
  }
}

function splitGlobals(argv: string[]): { globals: Globals; command: string; rest: string[] } {
  const globals: Globals = { configPath: "/etc/hast.conf" };
  let i = 0;
  for (; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "-c" || arg === "--config") globals.configPath = requireValue(argv, ++i, arg);
    else if (arg === "--node") globals.node = nodeName(requireValue(argv, ++i, arg));
    else if (arg === "-h" || arg === "--help") return { globals, command: "help", rest: [] };
    else break;
  }
  const command = argv[i];
  if (command === undefined) throw new ExitError("Cannot run: no command given", EX_USAGE);
  // Found by review: "hast --nod a status" said `Cannot run command "--nod": unknown command`.
  if (command.startsWith("-")) {
    throw new ExitError(`Cannot parse options: "${command}" is not a global option (-c, --node, -h)`, EX_USAGE);
  }
  return { globals, command, rest: argv.slice(i + 1) };
}

/** Whether a command's arguments ask for help (`hast status -h`); not after "--". */
function wantsHelp(rest: string[]): boolean {
  const end = rest.indexOf("--");
  return (end < 0 ? rest : rest.slice(0, end)).some((arg) => arg === "-h" || arg === "--help");
}

function requireValue(argv: string[], index: number, option: string): string {
  const value = argv[index];
  if (value === undefined) throw new ExitError(`Cannot parse options: "${option}" needs a value`, EX_USAGE);
  return value;
}

/** The value of --node: found by review, "" reached the config as a RangeError (exit 65). */
function nodeName(value: string): string {
  if (value === "") throw new ExitError(`Cannot parse options: "--node" needs a node name, not ""`, EX_USAGE);
  return value;
}

async function dispatch(globals: Globals, command: string, rest: string[]): Promise<number> {
  switch (command) {
    case "serve":
      return serve(globals, rest);
    case "create":
      return create(globals, rest);
    case "role":
      return role(globals, rest);
    case "status":
    case "list":
      return statusOrList(globals, command, rest);
    case "dump":
      return dump(globals, rest);
    case "discard":
      return discard(globals, rest);
    case "syncrate":
      return syncrate(globals, rest);
    case "verify":
      return verify(globals, rest);
    case "promotable":
      return promotable(globals, rest);
    default:
      throw new ExitError(`Cannot run command "${command}": unknown command`, EX_USAGE);
  }
}

type ParsedValues = Record<string, string | boolean | (string | boolean)[] | undefined>;

type Options = NonNullable<NonNullable<Parameters<typeof parseArgs>[0]>["options"]>;

function parse(command: string, rest: string[], options: Options): { values: ParsedValues; positionals: string[] } {
  try {
    const parsed = parseArgs({ args: rest, options, allowPositionals: true, strict: true });
    return { values: parsed.values as ParsedValues, positionals: parsed.positionals };
  } catch (error) {
    // Found by review: an unknown option (or a negative number, "syncrate -1") got parseArgs'
    // advice to put it after "--", which no hast command accepts.
    const unknown = (error as { code?: string }).code === "ERR_PARSE_ARGS_UNKNOWN_OPTION"
      ? /'([^']+)'/.exec((error as Error).message)?.[1] : undefined;
    if (unknown !== undefined) {
      const known = Object.entries(options).map(([long, o]) => (o.short ? `-${o.short}, ` : "") + `--${long}`);
      throw new ExitError(`Cannot parse options of "${command}": unknown option "${unknown}"; ` +
        (known.length === 0 ? "it takes none" : `it takes ${known.join("; ")}`), EX_USAGE);
    }
    throw new ExitError(`Cannot parse options of "${command}": ${(error as Error).message}`, EX_USAGE);
  }
}

function config(globals: Globals): NodeConfig {
  return loadConfig(globals.configPath, { node: globals.node });
}

/**
 * The configured resources named (all of them for none or "all"), each once. A name not in the
 * config exits 78 (EX_CONFIG) whatever the command: every command checks its names here before
 * asking the daemon (found by review: status, list and syncrate left it to the daemon, which
 * answered 64, while the others exited 78).
 */
function pickResources(cfg: NodeConfig, names: string[]): ResourceConfig[] {
  if (isAll(names)) return cfg.resources;
  return [...new Set(names)].map((name) => {
    const found = cfg.resources.find((r) => r.resource === name);
    if (!found) throw new ExitError(`Cannot find resource "${name}" in ${cfg.file}`, EX_CONFIG);
    return found;
  });
}

function isAll(names: string[]): boolean {
  return names.length === 0 || (names.length === 1 && names[0] === "all");
}

/**
 * The names to send to the daemon once pickResources accepted them: none for "all", which the
 * daemon takes as every resource (found by review: "status all" and "promotable all" sent the
 * name "all" and were refused).
 */
function daemonNames(names: string[]): string[] {
  return isAll(names) ? [] : [...new Set(names)];
}

/**
 * A size given on the command line, in bytes (`what` names the argument in the message). A
 * malformed one is a usage error, 64, not a data error (found by review: "syncrate abc" exited 65).
 */
function sizeArgument(text: string, action: string, what: string): number {
  try {
    return parseSizeBytes(text);
  } catch (error) {
    if (!(error instanceof SyntaxError || error instanceof RangeError)) throw error;
    const why = error instanceof RangeError ? `is over ${Number.MAX_SAFE_INTEGER} bytes` : "is not a size";
    throw new ExitError(`Cannot ${action}: ${what} ${JSON.stringify(text)} ${why}: give a whole number of bytes ` +
      "with an optional k/M/G/T/P/E suffix (powers of 1024), e.g. 512, 4k, 100M", EX_USAGE);
  }
}

function controlPath(cfg: NodeConfig): string {
  if (cfg.control.kind !== "unix") throw new ExitError("Cannot reach the daemon: control is not uds://", EX_CONFIG);
  return cfg.control.path;
}

async function request(cfg: NodeConfig, req: ControlRequest): Promise<unknown> {
  let response;
  try {
    response = await controlRequest(controlPath(cfg), req);
  } catch (error) {
    throw new ExitError(`${(error as Error).message} (is "hast serve" running?)`, EX_TEMPFAIL);
  }
  if (!response.ok) throw new ExitError(response.error, response.exitCode);
  return response.value;
}

// ---- serve ------------------------------------------------------------------------

async function serve(globals: Globals, rest: string[]): Promise<number> {
  const { values } = parse("serve", rest, {
    foreground: { type: "boolean", short: "F" },
    debug: { type: "boolean", short: "d", multiple: true },
    pidfile: { type: "string", short: "P" },
    log: { type: "string" },
  });
  if (!values.foreground) return detach(globals, rest, values.log as string | undefined);
  const daemon = new Daemon({
    configPath: globals.configPath,
    node: globals.node,
    debug: (values.debug as boolean[] | undefined)?.length ?? 0,
    pidfile: values.pidfile as string | undefined,
  });
  await daemon.start();
  return new Promise<number>(() => {}); // runs until a signal ends the process
}

/** Starts `serve -F` in the background and returns once it answers control commands. */
async function detach(globals: Globals, rest: string[], logFile = "/var/log/hast.log"): Promise<number> {
  const cfg = config(globals); // report config errors here, with the right exit code
  const running = await pingPid(controlPath(cfg));
  if (running !== null) {
    throw new ExitError(
      `Cannot start the daemon: one already answers on "${controlPath(cfg)}" (pid ${running})`, EX_TEMPFAIL,
    );
  }
  mkdirSync(dirname(logFile), { recursive: true });
  const fd = openSync(logFile, "a");
  const globalArgs = ["-c", globals.configPath, ...(globals.node ? ["--node", globals.node] : [])];
  const { command, args } = selfCommand([...globalArgs, "serve", "-F", ...rest.filter((a) => a !== "-F")]);
  const child = spawn(command, args, { detached: true, stdio: ["ignore", fd, fd] });
  closeSync(fd);
  let exited: number | null = null;
  child.on("exit", (code) => (exited = code ?? 1));
  child.unref();
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (exited !== null) {
      throw new ExitError(`Cannot start the daemon: it exited with code ${exited}; see ${logFile}`, exited);
    }
    // Only our child counts: another daemon that started meanwhile would make the child exit 75.
    if ((await pingPid(controlPath(cfg))) === child.pid) return 0;
    await Bun.sleep(100);
  }
  throw new ExitError(
    `Cannot start the daemon: no answer on the control socket after 30 s; see ${logFile}`, EX_TEMPFAIL,
  );
}

/** The pid of the daemon answering on a control socket, or null if none answers. */
async function pingPid(socketPath: string): Promise<number | null> {
  const reply = await controlRequest(socketPath, { command: "ping" }, 1000).catch(() => null);
  if (!reply?.ok) return null;
  const pid = (reply.value as { pid?: unknown } | undefined)?.pid;
  return typeof pid === "number" ? pid : -1;
}

// ---- offline commands -----------------------------------------------------------------

async function create(globals: Globals, rest: string[]): Promise<number> {
  const { values, positionals } = parse("create", rest, {
    extentsize: { type: "string", short: "e" },
    keepdirty: { type: "string", short: "k" },
    mediasize: { type: "string", short: "m" },
    force: { type: "boolean" },
  });
  if (positionals.length === 0) throw new ExitError("Cannot create: no resource name given", EX_USAGE);
  const { extentsizeBytes, mediasizeBytes, keepdirty } = createArguments(values);
  const cfg = config(globals);
  for (const resource of pickResources(cfg, positionals)) {
    const provider = Provider.open(resource.local, { exclusive: true });
    try {
      const m = await createMetadata(provider, {
        resource: resource.resource, extentsizeBytes, keepdirty, mediasizeBytes, force: values.force === true,
      });
      process.stdout.write(`${resource.resource}: created on ${resource.local}: datasize ${m.datasizeBytes} bytes, ` +
        `extentsize ${m.extentsizeBytes}, keepdirty ${m.keepdirty}\n`);
    } finally {
      provider.close();
    }
  }
  return 0;
}

/**
 * The sizes and counts `create` was given, checked as far as no provider is needed: a value that
 * no provider could take is a usage error (64) naming the option and what it accepts.
 */
function createArguments(values: ParsedValues): {
  extentsizeBytes?: number; mediasizeBytes?: number; keepdirty?: number;
} {
  const extentsizeBytes = values.extentsize === undefined
    ? undefined : sizeArgument(values.extentsize as string, "create", "extent size (-e)");
  const mediasizeBytes = values.mediasize === undefined
    ? undefined : sizeArgument(values.mediasize as string, "create", "media size (-m)");
  if (extentsizeBytes !== undefined &&
    !(extentsizeBytes >= LAYOUT_ALIGN_BYTES && (BigInt(extentsizeBytes) & BigInt(extentsizeBytes - 1)) === 0n)) {
    throw new ExitError(`Cannot create: extent size (-e) "${values.extentsize}" is not a power of two of at least ` +
      `${LAYOUT_ALIGN_BYTES} bytes (e.g. 4k, 64k, 2M)`, EX_USAGE);
  }
  // Digits only (found by review: Number() took "" as 0, "0x10" as 16 and "1e3" as 1000).
  const text = values.keepdirty as string | undefined;
  const keepdirty = text === undefined ? undefined : /^[0-9]{1,6}$/.test(text) ? Number(text) : NaN;
  if (keepdirty !== undefined && !(keepdirty >= 0 && keepdirty <= 65536)) {
    throw new ExitError(`Cannot create: keepdirty (-k) "${text}" is not a whole number in 0..65536`, EX_USAGE);
  }
  return { extentsizeBytes, mediasizeBytes, keepdirty };
}

async function dump(globals: Globals, rest: string[]): Promise<number> {
  const { values, positionals } = parse("dump", rest, { json: { type: "boolean" } });
  const cfg = config(globals);
  const out = [];
  for (const resource of pickResources(cfg, positionals)) {
    const provider = Provider.open(resource.local, { exclusive: false, readOnly: true });
    try {
      const store = await MetadataStore.load(provider);
      const m = store.metadata;
      const dirty = setBits(await store.readMap());
      out.push({
        name: resource.resource, provider: resource.local, ...m,
        resuid: String(m.resuid), localcnt: String(m.localcnt), remotecnt: String(m.remotecnt),
        generation: String(m.generation), dirtyExtents: dirty.length, dirtyExtentList: formatRanges(dirty),
      });
    } finally {
      provider.close();
    }
  }
  if (values.json) process.stdout.write(JSON.stringify({ resources: out }, null, 2) + "\n");
  else process.stdout.write(formatList(out) + "\n");
  return 0;
}

/** Indices of the bits set in an LSB-first bitmap, ascending. */
function setBits(map: Uint8Array): number[] {
  const out: number[] = [];
  for (let byte = 0; byte < map.length; byte++) {
    for (let bit = 0; bit < 8; bit++) if (map[byte]! & (1 << bit)) out.push(byte * 8 + bit);
  }
  return out;
}

/** Ascending integers as ranges: [0, 1, 2, 5] → "0-2,5" ("" when empty). */
export function formatRanges(sorted: number[]): string {
  const parts: string[] = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j]! + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}-${sorted[j]}`);
    i = j + 1;
  }
  return parts.join(",");
}

async function discard(globals: Globals, rest: string[]): Promise<number> {
  const { positionals } = parse("discard", rest, {});
  if (positionals.length === 0) throw new ExitError("Cannot discard: name the resource(s) to discard", EX_USAGE);
  const cfg = config(globals);
  for (const resource of pickResources(cfg, positionals)) {
    const provider = Provider.open(resource.local, { exclusive: true });
    try {
      const store = await MetadataStore.load(provider, { resource: resource.resource });
      await store.write({ discardPending: true, syncTarget: true }, { flush: true });
      process.stdout.write(`${resource.resource}: local changes will be overwritten by the peer on the next connect\n`);
    } finally {
      provider.close();
    }
  }
  return 0;
}

// ---- daemon commands ------------------------------------------------------------------

async function role(globals: Globals, rest: string[]): Promise<number> {
  const { values, positionals } = parse("role", rest, { force: { type: "boolean" } });
  const [wanted, ...names] = positionals;
  if (wanted === undefined) {
    throw new ExitError("Cannot change role: give init, primary or secondary, then resource names or \"all\"",
      EX_USAGE);
  }
  if (wanted !== "init" && wanted !== "primary" && wanted !== "secondary") {
    throw new ExitError(`Cannot change role: "${wanted}" is not init, primary or secondary`, EX_USAGE);
  }
  if (names.length === 0) throw new ExitError("Cannot change role: name resources or \"all\"", EX_USAGE);
  const cfg = config(globals);
  pickResources(cfg, names);
  await request(cfg, { command: "role", role: wanted, names: daemonNames(names), force: values.force === true });
  return 0;
}

async function statusOrList(globals: Globals, command: "status" | "list", rest: string[]): Promise<number> {
  const { values, positionals } = parse(command, rest, { json: { type: "boolean" } });
  const cfg = config(globals);
  pickResources(cfg, positionals);
  const rows = (await request(cfg, { command, names: daemonNames(positionals) })) as Record<string, unknown>[];
  if (values.json) process.stdout.write(JSON.stringify({ resources: rows }, null, 2) + "\n");
  else process.stdout.write((command === "status" ? formatStatusTable(rows) : formatList(rows)) + "\n");
  return 0;
}

async function syncrate(globals: Globals, rest: string[]): Promise<number> {
  const { positionals } = parse("syncrate", rest, {});
  const [rate, ...names] = positionals;
  if (rate === undefined || names.length === 0) {
    throw new ExitError("Cannot set syncrate: give a rate (e.g. 100M, 0 = unlimited) and resource names", EX_USAGE);
  }
  const bytesPerSecond = sizeArgument(rate, "set syncrate", "rate");
  const cfg = config(globals);
  pickResources(cfg, names);
  await request(cfg, { command: "syncrate", names: daemonNames(names), bytesPerSecond });
  return 0;
}

/**
 * A cluster manager's health check (README, "Automatic failover with keepalived"): may each
 * resource become (or stay) primary on this node without --force? Not when the daemon does not
 * answer, the worker failed, a split-brain is detected, the local disk lost writes, or the
 * on-disk metadata marks the data stale (stalenessOf). Prints one line per resource.
 */
async function promotable(globals: Globals, rest: string[]): Promise<number> {
  const { positionals: names } = parse("promotable", rest, {});
  if (names.length === 0) throw new ExitError("Cannot check: name resources", EX_USAGE);
  const cfg = config(globals);
  const resources = pickResources(cfg, names);
  let rows: Record<string, any>[] = [];
  let daemonError: string | null = null;
  try {
    rows = (await request(cfg, { command: "status", names: daemonNames(names) })) as Record<string, any>[];
  } catch (error) {
    daemonError = (error as Error).message;
  }
  let code = 0;
  for (const resource of resources) {
    const row = rows.find((r) => r.name === resource.resource);
    let why: string | null = null;
    if (daemonError !== null) why = `the daemon does not answer: ${daemonError}`;
    else if (row?.status === "failed") why = `its worker is not running: ${row.linkError ?? "unknown error"}`;
    else if (row?.status === "split-brain") why = "split-brain: both sides were written independently";
    else if (row?.localError) why = String(row.localError);
    else why = await metadataStaleness(resource);
    if (why !== null) code = 1;
    process.stdout.write(`${resource.resource}: ${why === null ? "promotable" : `not promotable: ${why}`}\n`);
  }
  return code;
}

/** Why the on-disk metadata forbids promotion without --force, or null. */
async function metadataStaleness(resource: ResourceConfig): Promise<string | null> {
  try {
    const provider = Provider.open(resource.local, { exclusive: false, readOnly: true });
    try {
      return stalenessOf((await MetadataStore.load(provider)).metadata);
    } finally {
      provider.close();
    }
  } catch (error) {
    return `cannot read its metadata: ${(error as Error).message}`;
  }
}

/** How often `hast verify --wait` polls the daemon. */
const VERIFY_POLL_MS = 500;

async function verify(globals: Globals, rest: string[]): Promise<number> {
  const { values, positionals: names } = parse("verify", rest, {
    wait: { type: "boolean" }, rate: { type: "string" },
  });
  if (names.length === 0) throw new ExitError("Cannot verify: name resources", EX_USAGE);
  const bytesPerSecond = values.rate === undefined ? 0 : sizeArgument(values.rate as string, "verify", "--rate");
  const cfg = config(globals);
  pickResources(cfg, names);
  const asked = daemonNames(names);
  await request(cfg, { command: "verify", names: asked, bytesPerSecond });
  if (!values.wait) {
    process.stdout.write(`verify started on ${names.join(", ")}; "hast status --json" shows its progress\n`);
    return 0;
  }
  /** When each resource's verify started, as first seen: another start means ours is gone. */
  const startedAt = new Map<string, string>();
  for (;;) {
    const rows = (await request(cfg, { command: "status", names: asked })) as Record<string, any>[];
    const results = rows.map((r) => (r.verify ?? null) as Record<string, any> | null);
    // Found by review: a worker restarted mid-verify (a crash) has no verify, and this polled
    // forever while the resource stayed primary.
    rows.forEach((row, i) => {
      const v = results[i];
      const seen = startedAt.get(row.name);
      if (v === null || (seen !== undefined && v.startedAt !== seen)) {
        throw new ExitError(`Cannot verify "${row.name}": the verify this command started is gone (its worker ` +
          `restarted, or the role changed); "hast status" shows the resource, run the verify again`, EX_TEMPFAIL);
      }
      if (seen === undefined) startedAt.set(row.name, v.startedAt);
    });
    if (results.every((v) => v !== null && v.state !== "running")) {
      let code = 0;
      rows.forEach((row, i) => {
        const v = results[i]!;
        const compared = `${v.checkedBytes} bytes compared, ${v.skippedBytes} skipped (to be synced anyway)`;
        if (v.state === "failed") {
          process.stdout.write(`${row.name}: verify failed after ${compared}: ${v.error}\n`);
          code = Math.max(code, EX_TEMPFAIL);
        } else if (v.differingExtents > 0) {
          const listed = formatRanges(v.differingExtentList as number[]);
          process.stdout.write(`${row.name}: ${v.differingExtents} extents differed (${listed}${
            v.differingExtents > v.differingExtentList.length ? ", …" : ""}); resyncing them from this node; ` +
            `${compared}\n`);
          code = Math.max(code, 1);
        } else {
          process.stdout.write(`${row.name}: identical; ${compared}\n`);
        }
      });
      return code;
    }
    await Bun.sleep(VERIFY_POLL_MS);
  }
}

