/**
 * The intermediate form shared by both config front ends (hast.conf and YAML): a tree of
 * sections holding raw option entries with their source positions, plus the rules both
 * front ends apply while building it (which options exist, which section allows them,
 * which words are reserved). The resolver in config.ts turns the tree into a NodeConfig.
 */

import assert from "node:assert";

/** A 1-based source position. Columns count UTF-16 code units; a tab counts as one. */
export interface Pos {
  line: number;
  column: number;
}

/** One `key value` statement (or YAML pair); `listen` may appear several times. */
export interface Entry {
  key: string;
  keyPos: Pos;
  value: string;
  valuePos: Pos;
}

/**
 * global: the top level; node: an `on` section at the top level;
 * resource: a `resource` section; resourceNode: an `on` section inside a resource.
 */
export type SectionKind = "global" | "node" | "resource" | "resourceNode";

/** A section with its entries in source order and its nested sections. */
export interface Section {
  kind: SectionKind;
  /** The node or resource name; "" for the global section. */
  name: string;
  /** Position of the opening keyword (`on`, `resource`) or YAML key. */
  pos: Pos;
  /** Position of the name. */
  namePos: Pos;
  entries: Entry[];
  /** global: node and resource sections; resource: resourceNode sections; else empty. */
  children: Section[];
}

/** A config error carrying the file and position; the message starts `file:line:column: `. */
export class ConfigError extends Error {
  override name = "ConfigError";
  /** The message without the `file:line:column: ` prefix. */
  readonly reason: string;

  /**
   * @param reason what is wrong, "Cannot <action>: <state>"
   * @param file the config file
   * @param line 1-based line, 0 when the error concerns the whole file
   * @param column 1-based column, 0 when the error concerns the whole file
   */
  constructor(
    reason: string,
    readonly file: string,
    readonly line: number,
    readonly column: number,
  ) {
    super(`${file}:${line}:${column}: ${reason}`);
    this.reason = reason;
  }
}

/** Throws a ConfigError at a position. */
export function fail(file: string, pos: Pos, reason: string): never {
  throw new ConfigError(reason, file, pos.line, pos.column);
}

/** How a value is read; the resolver converts by key, this drives front-end type checks. */
export type ValueKind = "word" | "bool" | "enum" | "list";

interface OptionSpec {
  kind: ValueKind;
  /** Keywords accepted as values (enum choices, `on`/`off`, `none` for remote). */
  values: readonly string[];
  sections: readonly SectionKind[];
}

const ON_OFF = ["on", "off"] as const;
const G = "global";
const N = "node";
const R = "resource";
const RN = "resourceNode";

/** Every option, the sections that accept it, and the keywords allowed as its value. */
export const OPTION_SPECS: Readonly<Record<string, OptionSpec>> = {
  control: { kind: "word", values: [], sections: [G, N] },
  pidfile: { kind: "word", values: [], sections: [G, N] },
  listen: { kind: "list", values: [], sections: [G, N] },
  replication: { kind: "enum", values: ["fullsync", "memsync", "async"], sections: [G, R] },
  checksum: { kind: "enum", values: ["none", "crc32", "sha256"], sections: [G, R] },
  compression: { kind: "enum", values: ["none", "hole", "lz4"], sections: [G, R] },
  timeout: { kind: "word", values: [], sections: [G, R] },
  exec: { kind: "word", values: [], sections: [G, R] },
  syncrate: { kind: "word", values: [], sections: [G, R] },
  pipeline: { kind: "bool", values: [...ON_OFF, "auto"], sections: [G, R] },
  authkey: { kind: "word", values: ["none"], sections: [G, R, RN] },
  encryption: { kind: "enum", values: ["none", "aes-256-gcm"], sections: [G, R] },
  metaflush: { kind: "bool", values: ON_OFF, sections: [G, R, RN] },
  name: { kind: "word", values: [], sections: [R, RN] },
  local: { kind: "word", values: [], sections: [R, RN] },
  export: { kind: "word", values: [], sections: [R, RN] },
  remote: { kind: "word", values: ["none"], sections: [RN] },
  source: { kind: "word", values: [], sections: [RN] },
};

/**
 * Reserved words: option names, section keywords and value keywords. `lzf` (HAST's
 * compression) stays reserved so a HAST config fails with a clear message, not oddly.
 */
export const KEYWORDS: ReadonlySet<string> = new Set([
  ...Object.keys(OPTION_SPECS),
  "resource",
  "on",
  "off",
  "none",
  "fullsync",
  "memsync",
  "async",
  "crc32",
  "sha256",
  "hole",
  "lz4",
  "lzf",
]);

const SECTION_NAMES: Readonly<Record<SectionKind, string>> = {
  global: "global section",
  node: `top-level "on" section`,
  resource: "resource section",
  resourceNode: `resource "on" section`,
};

/** Describes a section kind for messages, e.g. `resource "on" section`. */
export function describeSection(kind: SectionKind): string {
  return SECTION_NAMES[kind];
}

/**
 * Looks up an option and checks that `section` allows it.
 *
 * @returns the option's spec
 * @throws ConfigError for an unknown option or one that belongs in another section
 */
export function checkOptionKey(file: string, kind: SectionKind, key: string, pos: Pos) {
  const spec = Object.hasOwn(OPTION_SPECS, key) ? OPTION_SPECS[key] : undefined;
  if (spec === undefined) {
    fail(file, pos, `Cannot parse statement: unknown keyword ${JSON.stringify(key)}` +
      ` (expected an option name)`);
  }
  if (!spec.sections.includes(kind)) {
    const allowed = spec.sections.map((s) => `the ${SECTION_NAMES[s]}`);
    fail(file, pos, `Cannot use ${JSON.stringify(key)} in the ${SECTION_NAMES[kind]}: ` +
      `allowed only in ${joinWords(allowed)}`);
  }
  return spec;
}

/**
 * Rejects a reserved word used as a free-form value (`remote` accepts `none`). In hast.conf
 * this is also how a missing value shows (`local` directly followed by `on`). Enum and on/off
 * options are left to the resolver, whose message lists the accepted values.
 */
export function checkValueWord(file: string, key: string, value: string, pos: Pos): void {
  const spec = OPTION_SPECS[key];
  assert(spec !== undefined, `unknown option ${key}`);
  if (spec.kind !== "word" && spec.kind !== "list") return;
  if (KEYWORDS.has(value) && !spec.values.includes(value)) {
    fail(file, pos, `Cannot set ${JSON.stringify(key)}: value missing ` +
      `(found keyword ${JSON.stringify(value)}, keywords are reserved)`);
  }
}

/** Longest section name: resource names end up in socket paths and metadata. */
export const NAME_LENGTH_MAX = 64;
/** Longest node name (a host name is at most 253 characters). */
export const NODE_NAME_LENGTH_MAX = 255;

/**
 * Checks a section name. Resource names are limited to `[A-Za-z0-9._-]` (not starting with a
 * dot) because they become file names; node names to the hast.conf word characters.
 */
export function checkSectionName(file: string, kind: SectionKind, name: string, pos: Pos) {
  const what = kind === "resource" ? "resource" : "node";
  if (KEYWORDS.has(name)) {
    fail(file, pos, `Cannot name a ${what} ${JSON.stringify(name)}: keywords are reserved`);
  }
  if (kind === "resource") {
    checkPlainName(file, "name resource", name, pos);
    // Found by review: the CLI reads "all" as every resource, so a resource of that name could
    // not be named alone (`hast role init all` stopped them all).
    if (name === "all") {
      fail(file, pos, `Cannot name resource "all": on the command line "all" means every resource`);
    }
  } else if (!/^[a-zA-Z0-9.\-_/:[\]]+$/.test(name) || name.length > NODE_NAME_LENGTH_MAX) {
    fail(file, pos, `Cannot name a node ${JSON.stringify(name)}: expected up to ` +
      `${NODE_NAME_LENGTH_MAX} of the characters [a-zA-Z0-9.-_/:[]]`);
  }
}

/**
 * Checks a resource or provider name: 1..64 of [A-Za-z0-9._-], not starting with a dot (a hidden
 * file) or a dash (found by review: the CLI took `hast role init -x` for an option, so such a
 * resource could not be named on the command line).
 */
export function checkPlainName(file: string, action: string, name: string, pos: Pos): void {
  if (!/^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(name) || name.length > NAME_LENGTH_MAX) {
    fail(file, pos, `Cannot ${action} ${JSON.stringify(name)}: expected 1 to ` +
      `${NAME_LENGTH_MAX} of the characters [A-Za-z0-9._-], not starting with "." or "-"`);
  }
}

/** Joins words as `a`, `a and b`, `a, b and c`. */
export function joinWords(words: readonly string[]): string {
  if (words.length <= 1) return words.join("");
  return `${words.slice(0, -1).join(", ")} and ${words[words.length - 1]}`;
}
