/**
 * Configuration: FreeBSD hast.conf syntax or the same model in YAML (chosen by the file
 * extension), resolved for one node into a NodeConfig.
 *
 * Both front ends (config_conf.ts, config_yaml.ts) build the section tree of config_tree.ts;
 * everything else (duplicate checks, value checks, node matching, precedence, defaults)
 * happens once, here, so the two syntaxes cannot drift apart.
 *
 * Precedence, as in HAST's parse.y:
 * - name, local, export: resource `on` section > resource section > default
 *   (name defaults to the resource name; local has no default; export defaults to
 *   `uds:///run/hast/<name>.sock`). HAST's grammar does not allow name/local globally.
 * - metaflush, authkey: resource `on` section > resource section > global > default (on; none).
 * - replication, checksum, compression, timeout, exec, syncrate, pipeline, encryption:
 *   resource section > global > default. `encryption aes-256-gcm` needs an authkey.
 * - control, pidfile, listen: matching top-level `on` section > global > default.
 * - remote, source: only in a resource `on` section.
 */

import assert from "node:assert";
import { closeSync, openSync, readSync } from "node:fs";
import { isIPv4, isIPv6 } from "node:net";
import { availableParallelism, hostname as osHostname } from "node:os";
import { parseConfSyntax } from "./config_conf.ts";
import {
  checkOptionKey,
  checkPlainName,
  checkSectionName,
  checkValueWord,
  ConfigError,
  describeSection,
  fail,
  OPTION_SPECS,
  type Entry,
  type Pos,
  type Section,
} from "./config_tree.ts";
import { parseYamlSyntax } from "./config_yaml.ts";
import { parseDurationSeconds, parseSizeBytes } from "./units.ts";

export { ConfigError } from "./config_tree.ts";

/** When a write is acknowledged (spec §2). */
export type ReplicationMode = "fullsync" | "memsync" | "async";
/** Checksum over data on the wire. */
export type ChecksumKind = "none" | "crc32" | "sha256";
/** Compression of data on the wire. */
export type CompressionKind = "none" | "hole" | "lz4";
/** Encryption of the replication link (link_crypto.ts). */
export type EncryptionKind = "none" | "aes-256-gcm";
/** tcp endpoint; family "tcp" = either, from `tcp://` or no scheme, "tcp4"/"tcp6" from those. */
export interface TcpAddress {
  kind: "tcp";
  family: "tcp" | "tcp4" | "tcp6";
  /** Host name or IP literal, IPv6 without brackets. */
  host: string;
  port: number;
}
/** Unix domain socket, written `uds:///path`. */
export interface UnixAddress {
  kind: "unix";
  path: string;
}
/** Any endpoint. */
export type Address = TcpAddress | UnixAddress;

/** One resource as seen by this node. */
export interface ResourceConfig {
  /** The section name: `resource <resource> {`. */
  resource: string;
  /** Provider name (`name` option); defaults to `resource`; used in the default export path. */
  name: string;
  /** Absolute path of the local provider. */
  local: string;
  /** The peer; null means `remote none` (peer not known yet, no connection attempts). */
  remote: TcpAddress | null;
  /** Bind address for outgoing connections (port 0 unless given); null when not set. */
  source: TcpAddress | null;
  replication: ReplicationMode;
  checksum: ChecksumKind;
  compression: CompressionKind;
  timeoutSeconds: number;
  /** Absolute path of the hook program, or null. */
  exec: string | null;
  metaflush: boolean;
  /** `syncrate` (k/M/G suffixes, powers of 1024); 0 means unlimited. */
  syncRateBytesPerSecond: number;
  /** `pipeline on|off|auto` (auto: on with PIPELINE_AUTO_MIN_CORES cores or more). */
  pipeline: boolean;
  /**
   * `authkey PATH`: a secret file (mode 0600, at least AUTHKEY_MIN_BYTES) both nodes hold; the
   * replication connection is then mutually authenticated (handshake.ts). null: `none`.
   */
  authkey: string | null;
  /**
   * `encryption none|aes-256-gcm`: with aes-256-gcm, everything after the authkey exchange is
   * sealed with keys derived from the authkey (link_crypto.ts); needs `authkey`.
   */
  encryption: EncryptionKind;
  /** Where the primary serves NBD. */
  export: Address;
  /** Line of the `resource` keyword (YAML: of the resource's key). */
  line: number;
}

/** The configuration that applies to this node. */
export interface NodeConfig {
  /** Path the config came from. */
  file: string;
  /** The override if given, else the first matching section name, else the host name. */
  node: string;
  control: Address;
  pidfile: string;
  listen: TcpAddress[];
  /** In file order. */
  resources: ResourceConfig[];
}

/** HAST's port for replication connections. */
export const DEFAULT_PORT = 8457;
/** IANA port of NBD, the default for a `tcp://` export without a port. */
export const NBD_PORT = 10809;
/** Largest config file loadConfig reads. */
export const CONFIG_SIZE_BYTES_MAX = 1024 * 1024;
/** Largest timeout: setTimeout's limit is 2^31-1 ms. */
export const TIMEOUT_SECONDS_MAX = 2_147_483;
/** sun_path holds 108 bytes on Linux, including the terminating NUL. */
const UNIX_PATH_BYTES_MAX = 107;
const PATH_LENGTH_MAX = 4095;

const DEFAULTS = {
  control: "uds:///var/run/hastctl",
  pidfile: "/var/run/hastd.pid",
  replication: "memsync",
  checksum: "none",
  compression: "hole",
  timeoutSeconds: 20,
  metaflush: true,
} as const;

/**
 * `pipeline auto` (the default) turns the codec threads on only with at least this many
 * cores: on the 2-core benchmark machine, where the primary, the secondary and the
 * client share the cores, fullsync with sha256 + lz4 wrote 1 MiB blocks ~25% slower with
 * the threads (bench/RESULTS.md); they pay where cores are idle.
 */
export const PIPELINE_AUTO_MIN_CORES = 3;

/** What `pipeline auto` means on this machine. */
export function pipelineAuto(): boolean {
  return availableParallelism() >= PIPELINE_AUTO_MIN_CORES;
}

/** Default listen addresses: every IPv4 and every IPv6 address on port 8457. */
function defaultListen(): TcpAddress[] {
  return [
    { kind: "tcp", family: "tcp4", host: "0.0.0.0", port: DEFAULT_PORT },
    { kind: "tcp", family: "tcp6", host: "::", port: DEFAULT_PORT },
  ];
}

// ---------------------------------------------------------------------------------------
// Addresses

/** Parses an address, or returns why it cannot be parsed. */
function addressOrProblem(text: string, defaultPort: number): Address | string {
  if (text.startsWith("uds://")) {
    const path = text.slice("uds://".length);
    if (!path.startsWith("/")) return "expected an absolute path after uds://";
    if (path.includes("\0")) return "the path contains a NUL character";
    if (Buffer.byteLength(path) > UNIX_PATH_BYTES_MAX) {
      return `the socket path is longer than ${UNIX_PATH_BYTES_MAX} bytes`;
    }
    return { kind: "unix", path };
  }
  const scheme = /^([a-zA-Z0-9]*):\/\//.exec(text);
  let family: TcpAddress["family"] = "tcp";
  if (scheme !== null) {
    if (scheme[1] !== "tcp" && scheme[1] !== "tcp4" && scheme[1] !== "tcp6") {
      return `unknown scheme ${JSON.stringify(scheme[1] + "://")} ` +
        `(expected tcp://, tcp4://, tcp6:// or uds://)`;
    }
    family = scheme[1];
  }
  return tcpOrProblem(text.slice(scheme === null ? 0 : scheme[0].length), family, defaultPort);
}

/** Parses `host`, `host:port`, `[v6]`, `[v6]:port` or an unbracketed IPv6 literal. */
function tcpOrProblem(
  rest: string,
  family: TcpAddress["family"],
  defaultPort: number,
): TcpAddress | string {
  let host = rest;
  let portText: string | null = null;
  if (rest.startsWith("[")) {
    const close = rest.indexOf("]");
    if (close < 0) return `missing "]" after the IPv6 address`;
    host = rest.slice(1, close);
    const after = rest.slice(close + 1);
    if (after !== "" && !after.startsWith(":")) return `unexpected text after "]"`;
    if (after !== "") portText = after.slice(1);
    if (!isIPv6(host)) return `${JSON.stringify(host)} in brackets is not an IPv6 address`;
  } else if (rest.indexOf(":") === rest.lastIndexOf(":") && rest.includes(":")) {
    host = rest.slice(0, rest.indexOf(":"));
    portText = rest.slice(rest.indexOf(":") + 1);
  }
  const problem = hostProblem(host, family);
  if (problem !== null) return problem;
  let port = defaultPort;
  if (portText !== null) {
    if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) > 65535) {
      return `port ${JSON.stringify(portText)} is not a number from 0 to 65535`;
    }
    port = Number(portText);
  }
  return { kind: "tcp", family, host, port };
}

/** Why `host` is not usable for `family`, or null. */
function hostProblem(host: string, family: TcpAddress["family"]): string | null {
  if (host === "") return "host missing";
  if (isIPv6(host)) return family === "tcp4" ? "tcp4:// cannot take an IPv6 address" : null;
  if (isIPv4(host)) return family === "tcp6" ? "tcp6:// cannot take an IPv4 address" : null;
  if (/^[0-9]+$/.test(host)) return `host missing (write tcp://0.0.0.0:${host} for a port)`;
  if (!/^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$/.test(host)) {
    return `${JSON.stringify(host)} is not a host name or IP address`;
  }
  return null;
}

/**
 * Parses an address as written in config: `tcp://host:port`, `tcp4://`, `tcp6://`, a bare
 * host, `host:port`, `[v6]` or `[v6]:port`, an unbracketed IPv6 literal (no port), or
 * `uds:///absolute/path`. No scheme means family "tcp" (either).
 *
 * @param text the address
 * @param defaultPort port used when the text has none (0..65535)
 * @returns the address; IPv6 hosts are stored without brackets
 * @throws SyntaxError when the text is not a valid address
 */
export function parseAddress(text: string, defaultPort: number): Address {
  assert(Number.isInteger(defaultPort) && defaultPort >= 0 && defaultPort <= 65535);
  const result = addressOrProblem(text, defaultPort);
  if (typeof result === "string") {
    throw new SyntaxError(`Cannot parse address ${JSON.stringify(text)}: ${result}`);
  }
  return result;
}

/**
 * Formats an address so that parseAddress reads it back unchanged:
 * `uds:///path`, `tcp://host:port`, `tcp6://[::1]:8457`.
 */
export function formatAddress(a: Address): string {
  if (a.kind === "unix") return `uds://${a.path}`;
  const host = a.host.includes(":") ? `[${a.host}]` : a.host;
  return `${a.family}://${host}:${a.port}`;
}

// ---------------------------------------------------------------------------------------
// Values of one section

/** The options set in one section, converted and checked. */
interface Values {
  control?: Address;
  pidfile?: string;
  listen: TcpAddress[];
  replication?: ReplicationMode;
  checksum?: ChecksumKind;
  compression?: CompressionKind;
  timeoutSeconds?: number;
  exec?: string;
  metaflush?: boolean;
  syncRateBytesPerSecond?: number;
  pipeline?: boolean;
  authkey?: string | null;
  encryption?: { kind: EncryptionKind; pos: Pos };
  name?: string;
  local?: string;
  export?: Address;
  remote?: TcpAddress | null;
  source?: TcpAddress;
}

/** Converts the entries of one section; rejects duplicates (except `listen`). */
function convertSection(file: string, section: Section): Values {
  const seen = new Map<string, Entry>();
  const values: Values = { listen: [] };
  for (const entry of section.entries) {
    checkOptionKey(file, section.kind, entry.key, entry.keyPos);
    const first = seen.get(entry.key);
    if (first !== undefined && entry.key !== "listen") {
      fail(file, entry.keyPos, `Cannot set ${JSON.stringify(entry.key)} twice in the ` +
        `${describeSection(section.kind)}: first set at line ${first.keyPos.line}`);
    }
    seen.set(entry.key, entry);
    checkValueWord(file, entry.key, entry.value, entry.valuePos);
    applyEntry(file, values, entry);
  }
  return values;
}

/** Converts one entry into `values`. */
function applyEntry(file: string, values: Values, entry: Entry): void {
  const v = entry.value;
  switch (entry.key) {
    case "control":
      values.control = address(file, entry, 0);
      // The daemon and the CLI serve and reach a Unix socket only (found by review: a tcp://
      // address was accepted here, and the daemon then failed naming no file or line).
      if (values.control.kind !== "unix") {
        valueError(file, entry, "expected uds:///path (TCP control is not supported)");
      }
      return;
    case "pidfile": values.pidfile = absolutePath(file, entry); return;
    case "listen": values.listen.push(tcpAddress(file, entry, DEFAULT_PORT)); return;
    case "replication": values.replication = choice(file, entry) as ReplicationMode; return;
    case "checksum": values.checksum = choice(file, entry) as ChecksumKind; return;
    case "compression": values.compression = choice(file, entry) as CompressionKind; return;
    case "timeout": values.timeoutSeconds = timeout(file, entry); return;
    case "exec": values.exec = absolutePath(file, entry); return;
    case "metaflush": values.metaflush = choice(file, entry) === "on"; return;
    case "pipeline": {
      const value = choice(file, entry);
      values.pipeline = value === "auto" ? pipelineAuto() : value === "on";
      return;
    }
    case "syncrate": values.syncRateBytesPerSecond = unit(file, entry, parseSizeBytes); return;
    case "authkey": values.authkey = v === "none" ? null : absolutePath(file, entry); return;
    case "encryption": values.encryption = { kind: choice(file, entry) as EncryptionKind, pos: entry.keyPos }; return;
    case "name": checkPlainName(file, `set "name" to`, v, entry.valuePos); values.name = v; return;
    case "local": values.local = absolutePath(file, entry); return;
    case "export": values.export = address(file, entry, NBD_PORT); return;
    case "remote":
      values.remote = v === "none" ? null : tcpAddress(file, entry, DEFAULT_PORT);
      if (values.remote?.port === 0) valueError(file, entry, "a remote needs a port from 1 to 65535");
      return;
    case "source": values.source = tcpAddress(file, entry, 0); return;
    default: assert.fail(`option ${entry.key} has no conversion`);
  }
}

function valueError(file: string, entry: Entry, problem: string): never {
  fail(file, entry.valuePos, `Cannot set ${JSON.stringify(entry.key)} to ` +
    `${JSON.stringify(entry.value)}: ${problem}`);
}

function address(file: string, entry: Entry, defaultPort: number): Address {
  const result = addressOrProblem(entry.value, defaultPort);
  if (typeof result === "string") valueError(file, entry, result);
  return result;
}

function tcpAddress(file: string, entry: Entry, defaultPort: number): TcpAddress {
  const result = address(file, entry, defaultPort);
  if (result.kind !== "tcp") valueError(file, entry, "expected a TCP address, not uds://");
  return result;
}

function absolutePath(file: string, entry: Entry): string {
  const v = entry.value;
  if (!v.startsWith("/")) valueError(file, entry, "expected an absolute path");
  if (v.length > PATH_LENGTH_MAX || v.includes("\0")) {
    valueError(file, entry, `expected a path of at most ${PATH_LENGTH_MAX} characters`);
  }
  return v;
}

/** Checks an enum or on/off value against the option's accepted keywords. */
function choice(file: string, entry: Entry): string {
  const accepted = OPTION_SPECS[entry.key]!.values;
  if (accepted.includes(entry.value)) return entry.value;
  const hint = entry.value === "lzf" ? " (HAST's lzf is replaced by lz4)" : "";
  return valueError(file, entry, `expected one of ${accepted.join(", ")}${hint}`);
}

function unit(file: string, entry: Entry, parse: (text: string) => number): number {
  try {
    return parse(entry.value);
  } catch (error) {
    const detail = (error as Error).message.replace(/^Cannot parse [a-z]+: /, "");
    return valueError(file, entry, detail);
  }
}

function timeout(file: string, entry: Entry): number {
  const seconds = unit(file, entry, parseDurationSeconds);
  if (seconds <= 0 || seconds > TIMEOUT_SECONDS_MAX) {
    valueError(file, entry, `expected 1 to ${TIMEOUT_SECONDS_MAX} seconds`);
  }
  return seconds;
}

// ---------------------------------------------------------------------------------------
// Node matching and resolution

/** The identity of this node: the override or host name, and names that match it. */
interface Identity {
  node: string;
  names: string[];
}

function identityOf(node: string): Identity {
  if (node === "") throw new RangeError("Cannot select node: the node name is empty");
  const firstLabel = node.split(".")[0]!;
  return { node, names: firstLabel === node || firstLabel === "" ? [node] : [node, firstLabel] };
}

interface NodeMatch {
  section: Section;
  values: Values;
}

/**
 * Checks every `on` section among `sections` (names, duplicates, values, even for other
 * nodes) and returns the one matching this node, or null. Two matching sections (say
 * `hosta` and `hosta.example.com`) are an error: which one wins would be a guess.
 */
function pickNode(file: string, sections: Section[], me: Identity): NodeMatch | null {
  const byName = new Map<string, Section>();
  let match: NodeMatch | null = null;
  for (const section of sections) {
    checkSectionName(file, section.kind, section.name, section.namePos);
    const first = byName.get(section.name);
    if (first !== undefined) {
      fail(file, section.namePos, `Cannot define "on ${section.name}" twice in one ` +
        `section: first defined at line ${first.pos.line}`);
    }
    byName.set(section.name, section);
    const values = convertSection(file, section);
    if (!me.names.includes(section.name)) continue;
    if (match !== null) {
      fail(file, section.namePos, `Cannot choose an "on" section for node ` +
        `${JSON.stringify(me.node)}: both ${JSON.stringify(match.section.name)} (line ` +
        `${match.section.pos.line}) and ${JSON.stringify(section.name)} match`);
    }
    match = { section, values };
  }
  return match;
}

/** Resolves one resource section for this node. */
function resolveResource(
  file: string,
  section: Section,
  global: Values,
  me: Identity,
): { config: ResourceConfig; matched: string } {
  checkSectionName(file, section.kind, section.name, section.namePos);
  const res = convertSection(file, section);
  const match = pickNode(file, section.children, me);
  const quoted = JSON.stringify(section.name);
  if (match === null) {
    const names = section.children.map((s) => JSON.stringify(s.name)).join(", ");
    fail(file, section.pos, `Cannot configure resource ${quoted}: no "on" section for this ` +
      `node ${JSON.stringify(me.node)} (acceptable node names: ${names || "none"})`);
  }
  const node = match.values;
  const local = node.local ?? res.local;
  if (local === undefined) {
    fail(file, section.pos, `Cannot configure resource ${quoted}: "local" is missing ` +
      `(set it in the resource or its "on ${match.section.name}" section)`);
  }
  if (node.remote === undefined) {
    fail(file, match.section.pos, `Cannot configure resource ${quoted}: "remote" is ` +
      `missing in its "on ${match.section.name}" section (write "remote none" if unknown)`);
  }
  const name = node.name ?? res.name ?? section.name;
  const authkey = firstDefined(node.authkey, res.authkey, global.authkey) ?? null;
  const encryption = res.encryption ?? global.encryption;
  if (encryption !== undefined && encryption.kind !== "none" && authkey === null) {
    fail(file, encryption.pos, `Cannot configure resource ${quoted}: "encryption ${encryption.kind}" ` +
      `needs an "authkey" (the link's keys are derived from it); set one for this resource`);
  }
  const config: ResourceConfig = {
    resource: section.name,
    name,
    local,
    remote: node.remote,
    source: node.source ?? null,
    replication: res.replication ?? global.replication ?? DEFAULTS.replication,
    checksum: res.checksum ?? global.checksum ?? DEFAULTS.checksum,
    compression: res.compression ?? global.compression ?? DEFAULTS.compression,
    timeoutSeconds: res.timeoutSeconds ?? global.timeoutSeconds ?? DEFAULTS.timeoutSeconds,
    exec: res.exec ?? global.exec ?? null,
    metaflush: node.metaflush ?? res.metaflush ?? global.metaflush ?? DEFAULTS.metaflush,
    syncRateBytesPerSecond: res.syncRateBytesPerSecond ?? global.syncRateBytesPerSecond ?? 0,
    pipeline: res.pipeline ?? global.pipeline ?? pipelineAuto(),
    authkey,
    encryption: encryption?.kind ?? "none",
    export: node.export ?? res.export ?? { kind: "unix", path: `/run/hast/${name}.sock` },
    line: section.pos.line,
  };
  return { config, matched: match.section.name };
}

/** The first argument that is not undefined (null counts: `authkey none` overrides). */
function firstDefined<T>(...values: (T | undefined)[]): T | undefined {
  return values.find((value) => value !== undefined);
}

/** Resolves the whole tree for this node. */
function resolve(file: string, tree: Section, me: Identity, override: boolean): NodeConfig {
  const global = convertSection(file, tree);
  const nodeSections = tree.children.filter((s) => s.kind === "node");
  const nodeMatch = pickNode(file, nodeSections, me);
  const local = nodeMatch?.values;
  const resources: ResourceConfig[] = [];
  const seen = new Map<string, Section>();
  let matched = nodeMatch?.section.name;
  for (const section of tree.children) {
    if (section.kind !== "resource") continue;
    const first = seen.get(section.name);
    if (first !== undefined) {
      fail(file, section.namePos, `Cannot define resource ${JSON.stringify(section.name)} ` +
        `twice: first defined at line ${first.pos.line}`);
    }
    seen.set(section.name, section);
    const result = resolveResource(file, section, global, me);
    // Found by review: two resources on one export (the same `name` gives the same default
    // socket) were accepted, and the second failed only when made primary, naming no line.
    const exportKey = formatAddress(result.config.export);
    const sharing = resources.find((r) => formatAddress(r.export) === exportKey);
    if (sharing !== undefined) {
      const line = seen.get(sharing.resource)!.pos.line;
      fail(file, section.namePos, `Cannot configure resource ${JSON.stringify(section.name)}: its export ` +
        `${exportKey} is also resource ${JSON.stringify(sharing.resource)}'s (line ${line}); set "name" or "export"`);
    }
    resources.push(result.config);
    matched ??= result.matched;
  }
  const listen = local?.listen.length ? local.listen : global.listen;
  return {
    file,
    node: override ? me.node : matched ?? me.node,
    control: local?.control ?? global.control ?? parseAddress(DEFAULTS.control, 0),
    pidfile: local?.pidfile ?? global.pidfile ?? DEFAULTS.pidfile,
    listen: listen.length > 0 ? listen : defaultListen(),
    resources,
  };
}

/**
 * Parses config text for this node. The format follows the file extension: `.yaml`/`.yml`
 * is YAML, anything else hast.conf.
 *
 * Node matching: a section `on <n>` applies when `<n>` equals the node identity or its first
 * label, where the identity is `options.node` if given, else `options.hostname`, else the
 * host name. Top-level `on` sections that match nothing are checked and ignored (an override
 * that matches no top-level section simply gets the global values and defaults). Every
 * resource needs exactly one matching `on` section.
 *
 * @param text the config text
 * @param file the file name (for the format and for messages)
 * @param options node: override of the node name; hostname: replaces os.hostname()
 * @returns the configuration for this node
 * @throws ConfigError with `file:line:column: ` in front of the message
 */
export function parseConfig(
  text: string,
  file: string,
  options: { node?: string; hostname?: string } = {},
): NodeConfig {
  const me = identityOf(options.node ?? options.hostname ?? osHostname());
  const tree = /\.ya?ml$/i.test(file) ? parseYamlSyntax(text, file) : parseConfSyntax(text, file);
  return resolve(file, tree, me, options.node !== undefined);
}

/** Reads at most `limitBytes` of a file (a bound even for endless files such as a FIFO). */
function readLimited(file: string, limitBytes: number): Buffer {
  const fd = openSync(file, "r");
  try {
    const buffer = Buffer.alloc(limitBytes);
    let length = 0;
    while (length < limitBytes) {
      const count = readSync(fd, buffer, length, limitBytes - length, null);
      if (count === 0) break;
      length += count;
    }
    return buffer.subarray(0, length);
  } finally {
    closeSync(fd);
  }
}

/**
 * Reads and parses a config file (see parseConfig).
 *
 * @throws ConfigError, with line and column 0 when the file cannot be read or is larger
 * than CONFIG_SIZE_BYTES_MAX
 */
export function loadConfig(file: string, options: { node?: string } = {}): NodeConfig {
  let bytes: Buffer;
  try {
    bytes = readLimited(file, CONFIG_SIZE_BYTES_MAX + 1);
  } catch (error) {
    throw new ConfigError(`Cannot read config: ${(error as Error).message}`, file, 0, 0);
  }
  if (bytes.length > CONFIG_SIZE_BYTES_MAX) {
    throw new ConfigError(`Cannot read config: the file is larger than ` +
      `${CONFIG_SIZE_BYTES_MAX} bytes`, file, 0, 0);
  }
  return parseConfig(bytes.toString("utf8"), file, options);
}
