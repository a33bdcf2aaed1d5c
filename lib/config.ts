/**
 * Configuration: FreeBSD hast.conf syntax or the same model in YAML (chosen by the file
 * extension), resolved for one node into a NodeConfig.
 *
 * Both front ends (config_conf.ts, config_yaml.ts) build the section tree of config_tree.ts;
 * everything else (duplicate checks, value checks, node matching, precedence, defaults, the
 * checks across resources such as two resources on one provider) happens once, here, so the
 * two syntaxes cannot drift apart. Every error names the file, line and column of the value at
 * fault; loadConfig also checks the authkey files the node's resources use.
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
import { isUtf8 } from "node:buffer";
import { closeSync, openSync, readSync } from "node:fs";
import { BlockList, isIPv4, isIPv6 } from "node:net";
import { availableParallelism, hostname as osHostname } from "node:os";
import { readAuthKey } from "./auth.ts";
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
    if (path.endsWith("/")) return `expected a socket file, not a directory (the path ends with "/")`;
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
  // Found by review: "010.0.0.1", "127.1" and "1.2.3.4.5" passed as host names, and the resolver
  // reads the first as 8.0.0.1 (inet_aton's octal) and the second as 127.0.0.1.
  if (/^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]*))*$/i.test(host)) {
    return `${JSON.stringify(host)} is not an IPv4 address (expected four numbers 0-255 without ` +
      `leading zeros, such as 10.0.0.1)`;
  }
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

/** An IP address as a peer's is compared and keyed: an IPv4-mapped IPv6 address as plain IPv4. */
export function normalizeIp(ip: string): string {
  return ip.startsWith("::ffff:") ? ip.slice(7) : ip;
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
  /** Where each option's value is written (for the checks across sections and resources). */
  pos: Partial<Record<string, Pos>>;
  /** Where each `listen` value is written, in the order of `listen`. */
  listenPos: Pos[];
}

/** Control and format characters (NUL, newline, zero-width space, BOM, bidi overrides…). */
const INVISIBLE = /[\p{Cc}\p{Cf}]/u;

/** Converts the entries of one section; rejects duplicates (except `listen`). */
function convertSection(file: string, section: Section): Values {
  const seen = new Map<string, Entry>();
  const values: Values = { listen: [], pos: {}, listenPos: [] };
  for (const entry of section.entries) {
    checkOptionKey(file, section.kind, entry.key, entry.keyPos);
    const first = seen.get(entry.key);
    if (first !== undefined && entry.key !== "listen") {
      fail(file, entry.keyPos, `Cannot set ${JSON.stringify(entry.key)} twice in the ` +
        `${describeSection(section.kind)}: first set at line ${first.keyPos.line}`);
    }
    seen.set(entry.key, entry);
    checkValueWord(file, entry.key, entry.value, entry.valuePos);
    // Found by review: YAML strings took any character, so a local path with a newline or a
    // zero-width space (invisible in an editor) was accepted and failed only when opened.
    const invisible = INVISIBLE.exec(entry.value);
    if (invisible !== null) {
      const code = invisible[0].codePointAt(0)!.toString(16).toUpperCase().padStart(4, "0");
      valueError(file, entry, `the value contains the invisible character U+${code}`);
    }
    applyEntry(file, values, entry);
    values.pos[entry.key] = entry.valuePos;
    if (entry.key === "listen") values.listenPos.push(entry.valuePos);
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
    case "export":
      values.export = address(file, entry, NBD_PORT);
      // Found by review: port 0 bound a random port, and `hast status` told clients port 0.
      if (values.export.kind === "tcp" && values.export.port === 0) {
        valueError(file, entry, "an export needs a port from 1 to 65535");
      }
      return;
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
  if (v.length > PATH_LENGTH_MAX) {
    valueError(file, entry, `expected a path of at most ${PATH_LENGTH_MAX} characters`);
  }
  // Found by review: "/" and "/var/run/" were accepted for pidfile, local, exec and authkey,
  // and failed only when used, naming no line.
  if (v.endsWith("/")) valueError(file, entry, `expected a file, not a directory (the path ends with "/")`);
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

/** A resolved resource and where its values are written, for the checks across resources. */
interface Placed {
  config: ResourceConfig;
  /** The `local` value. */
  local: Pos;
  /** The `export` value, else the `name` value or the resource name the default path comes from. */
  export: Pos;
  /** The `remote` value. */
  remote: Pos;
  /** The `source` value, when set. */
  source: Pos | null;
  /** The `authkey` value in effect, when set (also `authkey none`). */
  authkey: Pos | null;
}

/** Where the first of `sources` that sets `key` writes its value. */
function posOf(key: string, ...sources: Values[]): Pos | undefined {
  return sources.find((values) => values.pos[key] !== undefined)?.pos[key];
}

/** Resolves one resource section for this node. */
function resolveResource(
  file: string,
  section: Section,
  global: Values,
  me: Identity,
): { placed: Placed; matched: string } {
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
  const placed: Placed = {
    config,
    local: posOf("local", node, res)!,
    export: posOf("export", node, res) ?? posOf("name", node, res) ?? section.namePos,
    remote: node.pos.remote!,
    source: node.pos.source ?? null,
    authkey: posOf("authkey", node, res, global) ?? null,
  };
  return { placed, matched: match.section.name };
}

/** The first argument that is not undefined (null counts: `authkey none` overrides). */
function firstDefined<T>(...values: (T | undefined)[]): T | undefined {
  return values.find((value) => value !== undefined);
}

/** A configuration and where its values are written. */
interface Resolved {
  config: NodeConfig;
  resources: Placed[];
}

/** Resolves the whole tree for this node. */
function resolve(file: string, tree: Section, me: Identity, override: boolean): Resolved {
  const global = convertSection(file, tree);
  const nodeSections = tree.children.filter((s) => s.kind === "node");
  const nodeMatch = pickNode(file, nodeSections, me);
  const local = nodeMatch?.values;
  const placed: Placed[] = [];
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
    placed.push(result.placed);
    matched ??= result.matched;
  }
  const listenFrom = local?.listen.length ? local : global.listen.length ? global : null;
  const listen: Located<TcpAddress>[] = listenFrom === null
    ? defaultListen().map((value) => ({ value, pos: null }))
    : listenFrom.listen.map((value, i) => ({ value, pos: listenFrom.listenPos[i]! }));
  const control = { value: local?.control ?? global.control ?? parseAddress(DEFAULTS.control, 0),
    pos: posOf("control", ...(local ? [local] : []), global) ?? null };
  const pidfile = { value: local?.pidfile ?? global.pidfile ?? DEFAULTS.pidfile,
    pos: posOf("pidfile", ...(local ? [local] : []), global) ?? null };
  checkShared(file, { listen, control, pidfile }, placed);
  const config: NodeConfig = {
    file,
    node: override ? me.node : matched ?? me.node,
    control: control.value,
    pidfile: pidfile.value,
    listen: listen.map((l) => l.value),
    resources: placed.map((p) => p.config),
  };
  return { config, resources: placed };
}

// ---------------------------------------------------------------------------------------
// Checks across options and resources

/** A value and where it is written; null: a default. */
interface Located<T> {
  value: T;
  pos: Pos | null;
}

/** What this node itself binds and writes, besides its resources. */
interface NodeSide {
  listen: Located<TcpAddress>[];
  control: Located<Address>;
  pidfile: Located<string>;
}

/** What uses a file, socket path or port, and where it is written (null: a default). */
interface Claim {
  what: string;
  pos: Pos | null;
}

/** " (line N)" or " (the default)", for messages. */
function where(pos: Pos | null): string {
  return pos === null ? " (the default)" : ` (line ${pos.line})`;
}

/** A path with repeated slashes and `.` segments removed, so that `/dev//sdb` equals `/dev/sdb`. */
function samePath(path: string): string {
  return "/" + path.split("/").filter((part) => part !== "" && part !== ".").join("/");
}

/**
 * Rejects two uses of one thing on this node (found by review: each was accepted and failed
 * later, naming no file or line, or not at all): two listen addresses on one port, two resources
 * on one provider or one export, an export on the control socket, the pidfile or a listen port,
 * a remote that is this node's own listen address, and a source that is the remote. Maps keep
 * it linear: a 1 MiB file holds tens of thousands of resources or listen addresses.
 */
function checkShared(file: string, node: NodeSide, resources: Placed[]): void {
  const listen = new PortTable();
  const ports = new PortTable();
  for (const entry of node.listen) {
    const claim = { what: `the listen address ${formatAddress(entry.value)}`, pos: entry.pos };
    const other = listen.find(listenBound(entry.value));
    // Defaults do not overlap each other, so a clash has a position.
    if (other !== undefined) {
      fail(file, entry.pos!, `Cannot listen on ${formatAddress(entry.value)}: ${other.what}` +
        `${where(other.pos)} takes the same port`);
    }
    listen.add(listenBound(entry.value), claim);
    ports.add(listenBound(entry.value), claim);
  }
  const paths = nodeClaims(file, node);
  for (const placed of resources) {
    const name = JSON.stringify(placed.config.resource);
    const claimPath = (path: string, pos: Pos, option: string, described: string, hint: string) => {
      const other = paths.get(samePath(path));
      if (other !== undefined) {
        fail(file, pos, `Cannot configure resource ${name}: its ${option} ${described} is also ` +
          `${other.what}${where(other.pos)}${hint}`);
      }
      paths.set(samePath(path), { what: `resource ${name}'s ${option}`, pos });
    };
    claimPath(placed.config.local, placed.local, "local", JSON.stringify(placed.config.local), "");
    const exported = placed.config.export;
    if (exported.kind === "unix") {
      claimPath(exported.path, placed.export, "export", formatAddress(exported), `; set "name" or "export"`);
    } else {
      const bound = { host: exported.host, port: exported.port, v6only: false };
      const other = ports.find(bound);
      if (other !== undefined) {
        fail(file, placed.export, `Cannot configure resource ${name}: its export ` +
          `${formatAddress(exported)} takes the port of ${other.what}${where(other.pos)}`);
      }
      ports.add(bound, { what: `resource ${name}'s export ${formatAddress(exported)}`, pos: placed.export });
    }
    checkRemote(file, placed, listen);
  }
}

/** The pidfile, the control socket and its lock file, by path: each a different file. */
function nodeClaims(file: string, node: NodeSide): Map<string, Claim> {
  const claims = new Map<string, Claim>();
  const pidfile = node.pidfile.value;
  claims.set(samePath(pidfile), { what: "the pidfile", pos: node.pidfile.pos });
  if (node.control.value.kind !== "unix") return claims;
  const control = node.control.value.path;
  const own: [string, Claim][] = [
    [control, { what: "the control socket", pos: node.control.pos }],
    [`${control}.lock`, { what: "the daemon's lock file (the control path + .lock)", pos: node.control.pos }],
  ];
  for (const [path, claim] of own) {
    if (samePath(path) === samePath(pidfile)) {
      // The defaults differ, so one of the two is written in the file.
      fail(file, node.pidfile.pos ?? node.control.pos!, `Cannot use ${JSON.stringify(pidfile)} as the ` +
        `pidfile: it is ${claim.what}${where(claim.pos)}`);
    }
    claims.set(samePath(path), claim);
  }
  return claims;
}

/** A TCP address as bound: `v6only` as the daemon binds a tcp6:// listen address. */
interface Bound {
  host: string;
  port: number;
  v6only: boolean;
}

function listenBound(address: TcpAddress): Bound {
  return { host: address.host, port: address.port, v6only: address.family === "tcp6" };
}

/** Whether binding both would fail with EADDRINUSE (or one would take the other's connections). */
function overlaps(a: Bound, b: Bound): boolean {
  if (a.port !== b.port || a.port === 0) return false;
  return a.host === b.host || covers(a, b) || covers(b, a);
}

/** Whether the wildcard address `wild` takes connections to `other`. */
function covers(wild: Bound, other: Bound): boolean {
  if (wild.host === "0.0.0.0") return isIPv4(other.host) || (other.host === "::" && !other.v6only);
  if (wild.host === "::") return isIPv6(other.host) || (!wild.v6only && isIPv4(other.host));
  return false;
}

const WILDCARDS = ["0.0.0.0", "::"];

/**
 * TCP endpoints by port and host, to find one that overlaps a new one without comparing every
 * pair. Only a wildcard is compared with every host on its port, and at most two wildcards
 * (0.0.0.0 and a v6-only ::) can share a port without overlapping.
 */
class PortTable {
  private readonly byPort = new Map<number, Map<string, { bound: Bound; claim: Claim }[]>>();

  /** The first endpoint added that overlaps `bound`, or undefined. */
  find(bound: Bound): Claim | undefined {
    const hosts = this.byPort.get(bound.port);
    if (hosts === undefined) return undefined;
    const candidates = WILDCARDS.includes(bound.host) ? [...hosts.values()].flat()
      : [bound.host, ...WILDCARDS].flatMap((host) => hosts.get(host) ?? []);
    return candidates.find((taken) => overlaps(taken.bound, bound))?.claim;
  }

  /** The first endpoint added with exactly this host and port, or undefined. */
  exact(host: string, port: number): Claim | undefined {
    return this.byPort.get(port)?.get(host)?.[0]?.claim;
  }

  /** The first wildcard endpoint added that takes connections to `bound`, or undefined. */
  wildcard(bound: Bound): Claim | undefined {
    const hosts = this.byPort.get(bound.port);
    const wild = WILDCARDS.flatMap((host) => hosts?.get(host) ?? []);
    return wild.find((taken) => covers(taken.bound, bound))?.claim;
  }

  add(bound: Bound, claim: Claim): void {
    if (bound.port === 0) return; // a port the kernel picks overlaps nothing
    const hosts = this.byPort.get(bound.port) ?? new Map<string, { bound: Bound; claim: Claim }[]>();
    this.byPort.set(bound.port, hosts);
    const list = hosts.get(bound.host) ?? [];
    hosts.set(bound.host, list);
    list.push({ bound, claim });
  }
}

const LOOPBACK_V4 = new BlockList();
LOOPBACK_V4.addSubnet("127.0.0.0", 8, "ipv4");
const LOOPBACK_V6 = new BlockList();
LOOPBACK_V6.addAddress("::1", "ipv6");

/**
 * A loopback IP literal as a listen address would see it: an IPv4 one (also when written
 * IPv4-mapped, which reaches IPv4 sockets) as 127.0.0.1, ::1 in any spelling as "::1";
 * null for any other host.
 */
function loopbackHost(host: string): string | null {
  const family = isIPv4(host) ? "ipv4" : isIPv6(host) ? "ipv6" : null;
  if (family === null) return null;
  if (LOOPBACK_V4.check(host, family)) return "127.0.0.1";
  return LOOPBACK_V6.check(host, family) ? "::1" : null;
}

/** A remote that is this node's own listen address, or a source that is the remote. */
function checkRemote(file: string, placed: Placed, listen: PortTable): void {
  const { remote, source, resource } = placed.config;
  if (remote === null) return;
  const name = JSON.stringify(resource);
  const self = listen.exact(remote.host, remote.port);
  if (self !== undefined) {
    fail(file, placed.remote, `Cannot configure resource ${name}: its remote ${formatAddress(remote)} is ` +
      `${self.what}${where(self.pos)} of this node; the remote is the other node (did the two "on" ` +
      `sections swap their remotes?)`);
  }
  // Found by review: a loopback remote on a port that a wildcard listen address takes is this
  // node too. A host name is resolved only when connecting, so it is not judged here.
  const loopback = loopbackHost(remote.host);
  const wild = loopback === null ? undefined
    : listen.wildcard({ host: loopback, port: remote.port, v6only: false });
  if (wild !== undefined) {
    fail(file, placed.remote, `Cannot configure resource ${name}: its remote ${formatAddress(remote)} is ` +
      `this node itself, reached through ${wild.what}${where(wild.pos)}; the remote is the other node ` +
      `(two nodes on one machine each listen on their own loopback address, such as tcp://127.0.0.1)`);
  }
  if (source !== null && placed.source !== null && source.host === remote.host) {
    fail(file, placed.source, `Cannot configure resource ${name}: its source ${source.host} is also its ` +
      `remote${where(placed.remote)}; the source is this node's own address`);
  }
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
  return parseResolved(text, file, options).config;
}

function parseResolved(text: string, file: string, options: { node?: string; hostname?: string }): Resolved {
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

/** Offset of the first byte that does not start a valid UTF-8 sequence (RFC 3629), or -1. */
function firstInvalidUtf8(bytes: Uint8Array): number {
  let i = 0;
  while (i < bytes.length) {
    const lead = bytes[i]!;
    if (lead < 0x80) {
      i += 1;
      continue;
    }
    // Continuation bytes to follow: C2-DF lead 2-byte, E0-EF 3-byte, F0-F4 4-byte sequences.
    const more = lead < 0xc2 ? 0 : lead <= 0xdf ? 1 : lead <= 0xef ? 2 : lead <= 0xf4 ? 3 : 0;
    if (more === 0) return i;
    let codePoint = lead & (0x3f >> more);
    for (let k = 1; k <= more; k += 1) {
      const next = bytes[i + k];
      if (next === undefined || (next & 0xc0) !== 0x80) return i;
      codePoint = (codePoint << 6) | (next & 0x3f);
    }
    const overlong = codePoint < [0, 0x80, 0x800, 0x10000][more]!;
    if (overlong || codePoint > 0x10ffff || (codePoint >= 0xd800 && codePoint <= 0xdfff)) return i;
    i += more + 1;
  }
  return -1;
}

/**
 * The text of a config file, or a ConfigError at the first byte that is not UTF-8 (found by
 * review: such bytes became U+FFFD, so a YAML path holding one named another file).
 */
function decodeUtf8(bytes: Buffer, file: string): string {
  if (isUtf8(bytes)) return bytes.toString("utf8"); // the common case, checked natively
  const offset = firstInvalidUtf8(bytes);
  if (offset < 0) return bytes.toString("utf8");
  const lineStart = bytes.lastIndexOf(0x0a, offset - 1) + 1;
  const line = bytes.subarray(0, lineStart).filter((byte) => byte === 0x0a).length + 1;
  const column = bytes.subarray(lineStart, offset).toString("utf8").length + 1;
  throw new ConfigError(`Cannot read config: byte 0x${bytes[offset]!.toString(16).padStart(2, "0")} ` +
    `is not UTF-8 (save the file as UTF-8)`, file, line, column);
}

/**
 * Checks each authkey file the resources of this node use, as the link will read it
 * (auth.ts): found by review, a missing, short or world-readable key was reported only at
 * each connection attempt, naming the key but not the config line, while the daemon started.
 */
function checkAuthkeys(file: string, resources: Placed[]): void {
  const checked = new Set<string>();
  for (const placed of resources) {
    const path = placed.config.authkey;
    if (path === null || checked.has(path)) continue;
    checked.add(path);
    let problem: string | null = null;
    try {
      readAuthKey(path); // refuses a FIFO or device without blocking, naming the key
    } catch (error) {
      problem = (error as Error).message;
    }
    if (problem !== null) fail(file, placed.authkey!, problem);
  }
}

/**
 * Reads and parses a config file (see parseConfig). With `checkKeys` (the daemon: start and
 * SIGHUP) it also checks the authkey files it names; the CLI does not, so that an operator who
 * may not read a key (mode 0600) can still run `hast status`.
 *
 * @throws ConfigError, with line and column 0 when the file cannot be read or is larger
 * than CONFIG_SIZE_BYTES_MAX
 */
export function loadConfig(file: string, options: { node?: string; checkKeys?: boolean } = {}): NodeConfig {
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
  const resolved = parseResolved(decodeUtf8(bytes, file), file, options);
  if (options.checkKeys === true) checkAuthkeys(file, resolved.resources);
  return resolved.config;
}
