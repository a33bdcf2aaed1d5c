/**
 * Front end for the YAML form of the config (hast.yaml): the same model as hast.conf, built
 * into the same section tree so that config.ts validates both with one set of rules.
 *
 * ```yaml
 * listen: [tcp://127.0.0.1:8457]   # global options; listen takes a string or a list
 * on:
 *   hosta: { control: uds:///run/hast/control }
 * resources:
 *   data:
 *     local: /dev/ada0
 *     on:
 *       hosta: { remote: 10.0.0.1 }
 * ```
 */

import {
  isAlias,
  isMap,
  isNode,
  isPair,
  isScalar,
  isSeq,
  LineCounter,
  parseDocument,
  Scalar,
  type Alias,
  type Document,
  type Node,
  type Pair,
  type YAMLMap,
} from "yaml";
import {
  checkOptionKey,
  describeSection,
  fail,
  type Pos,
  type Section,
  type SectionKind,
  type ValueKind,
} from "./config_tree.ts";

/**
 * Deepest nesting of mappings and sequences accepted. The model needs five levels (resources,
 * resource, on, node, listen list); the limit keeps the walk below cheap on hostile input.
 */
export const YAML_NESTING_DEPTH_MAX = 32;

class YamlFront {
  /** Each alias's node, found in one walk (see targets). */
  private readonly aliases: Map<Alias, Node>;

  constructor(
    private readonly doc: Document.Parsed,
    private readonly lines: LineCounter,
    private readonly file: string,
  ) {
    this.aliases = this.targets();
  }

  /**
   * Resolves every alias in one walk in document order: an alias names the anchor defined last
   * before it, as in yaml's Alias.resolve. Found by review: that one walks the whole document for
   * each alias, so 10,000 aliases took 3 s and a 1 MiB file of them minutes, holding up
   * `hast serve`, every command and SIGHUP. The walk is iterative and bounded in depth.
   */
  private targets(): Map<Alias, Node> {
    const anchors = new Map<string, Node>();
    const targets = new Map<Alias, Node>();
    const stack: { node: unknown; depth: number }[] = [{ node: this.doc.contents, depth: 0 }];
    while (stack.length > 0) {
      const { node, depth } = stack.pop()!;
      if (isAlias(node)) {
        const target = anchors.get(node.source);
        if (target === undefined) {
          fail(this.file, this.pos(node), `Cannot parse YAML: alias "*${node.source}" names no ` +
            `anchor defined before it`);
        }
        targets.set(node, target);
      } else if (isNode(node)) {
        if (node.anchor !== undefined) anchors.set(node.anchor, node);
        if (!isMap(node) && !isSeq(node)) continue;
        if (depth >= YAML_NESTING_DEPTH_MAX) {
          fail(this.file, this.pos(node), `Cannot parse YAML: nested more than ` +
            `${YAML_NESTING_DEPTH_MAX} levels deep`);
        }
        const children = (node.items as unknown[]).flatMap((item) => isPair(item) ? [item.key, item.value] : [item]);
        for (let i = children.length - 1; i >= 0; i -= 1) stack.push({ node: children[i], depth: depth + 1 });
      }
    }
    return targets;
  }

  /** Position of a node's first character (1:1 when the node has no range). */
  pos(node: Node | null | undefined, fallback?: Pos): Pos {
    const offset = node?.range?.[0];
    if (offset === undefined) return fallback ?? { line: 1, column: 1 };
    const { line, col } = this.lines.linePos(offset);
    return { line, column: col };
  }

  /** Follows aliases to the node they name. */
  private deref(node: unknown): Node | null {
    if (isAlias(node)) return this.aliases.get(node) ?? null;
    return (node as Node | null) ?? null;
  }

  /** A mapping key as text, with its position. */
  private key(pair: Pair): { text: string; pos: Pos } {
    const key = this.deref(pair.key);
    const pos = this.pos(key);
    if (!isScalar(key) || key.value === null || typeof key.value === "object") {
      fail(this.file, pos, `Cannot parse key: expected a plain name`);
    }
    // A plain key as written: YAML reads 007 or 1.10 as numbers, and a resource or node
    // name must stay what the operator wrote (found by review: "007" became "7").
    const plain = key.type === Scalar.PLAIN && typeof key.source === "string";
    return { text: plain ? key.source as string : String(key.value), pos };
  }

  /** A mapping (null counts as empty), or an error naming what was expected. */
  private map(node: Node | null, pos: Pos, what: string): readonly Pair[] {
    if (node === null || (isScalar(node) && node.value === null)) return [];
    if (!isMap(node)) fail(this.file, this.pos(node, pos), `Cannot parse ${what}: ` +
      `expected a mapping`);
    return (node as YAMLMap).items as Pair[];
  }

  /** Builds the global section from the document root. */
  root(): Section {
    const contents = this.deref(this.doc.contents);
    const start = { line: 1, column: 1 };
    const global = newSection("global", "", start, start);
    this.fill(global, this.map(contents, this.pos(contents), "the top level"));
    return global;
  }

  /** Adds the pairs of one YAML mapping to `section` (options and nested sections). */
  private fill(section: Section, pairs: readonly Pair[]): void {
    for (const pair of pairs) {
      const key = this.key(pair);
      const value = this.deref(pair.value);
      if (key.text === "on" && section.kind !== "node" && section.kind !== "resourceNode") {
        const kind = section.kind === "global" ? "node" : "resourceNode";
        this.children(section, kind, value, key.pos);
      } else if (key.text === "resources" && section.kind === "global") {
        this.children(section, "resource", value, key.pos);
      } else if (key.text === "on" || key.text === "resources") {
        fail(this.file, key.pos, `Cannot open ${JSON.stringify(key.text)} in the ` +
          `${describeSection(section.kind)}: sections do not nest here`);
      } else {
        this.entries(section, key.text, key.pos, value);
      }
    }
  }

  /** Adds one child section per pair of the mapping under `on:` or `resources:`. */
  private children(parent: Section, kind: SectionKind, node: Node | null, pos: Pos): void {
    const what = kind === "resource" ? `"resources"` : `"on"`;
    for (const pair of this.map(node, pos, what)) {
      const key = this.key(pair);
      const value = this.deref(pair.value);
      const child = newSection(kind, key.text, key.pos, key.pos);
      this.fill(child, this.map(value, key.pos, `${what} entry ${JSON.stringify(key.text)}`));
      parent.children.push(child);
    }
  }

  /** Adds the entries of one option; `listen` accepts a sequence of values. */
  private entries(section: Section, key: string, keyPos: Pos, node: Node | null): void {
    const spec = checkOptionKey(this.file, section.kind, key, keyPos);
    // Found by review: `listen: []` was taken as "not set", so the node listened on the default
    // wildcard addresses, the opposite of what an empty list says.
    if (isSeq(node) && spec.kind === "list" && node.items.length === 0) {
      fail(this.file, this.pos(node, keyPos), `Cannot set ${JSON.stringify(key)}: the list is ` +
        `empty (leave the key out for the default)`);
    }
    const items = isSeq(node) && spec.kind === "list"
      ? node.items.map((item) => this.deref(item))
      : [node];
    for (const item of items) {
      const value = this.scalar(key, spec.kind, item, keyPos);
      section.entries.push({ key, keyPos, value, valuePos: this.pos(item, keyPos) });
    }
  }

  /**
   * Converts a scalar to the text hast.conf would hold: numbers keep their source text,
   * booleans become `on`/`off` where the option is on/off, anything else is a type error.
   */
  private scalar(key: string, kind: ValueKind, node: Node | null, keyPos: Pos): string {
    const pos = this.pos(node, keyPos);
    const name = JSON.stringify(key);
    if (node === null || (isScalar(node) && node.value === null)) {
      fail(this.file, pos, `Cannot set ${name}: value missing`);
    }
    if (!isScalar(node)) {
      const expected = kind === "list" ? "a string or a list of strings" : "a single value";
      fail(this.file, pos, `Cannot set ${name}: expected ${expected}`);
    }
    const value = node.value;
    if (typeof value === "string") return value;
    if (typeof value === "number") {
      const plain = node.type === Scalar.PLAIN && typeof node.source === "string";
      return plain ? node.source as string : String(value);
    }
    if (typeof value === "boolean" && kind === "bool") return value ? "on" : "off";
    return fail(this.file, pos, `Cannot set ${name}: expected ` +
      `${kind === "bool" ? "on/off or true/false" : "a string"}, found ${String(value)}`);
  }
}

function newSection(kind: SectionKind, name: string, pos: Pos, namePos: Pos): Section {
  return { kind, name, pos, namePos, entries: [], children: [] };
}

/**
 * Parses YAML config text into the section tree.
 *
 * @param text the file contents
 * @param file the file name used in messages
 * @returns the global section; node and resource sections are its children
 * @throws ConfigError for YAML syntax errors and for keys or types the model does not allow
 */
export function parseYamlSyntax(text: string, file: string): Section {
  const lines = new LineCounter();
  let doc: Document.Parsed;
  try {
    doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true });
  } catch (error) {
    // Not seen; the library reports its errors in doc.errors. Still a config error, not a crash.
    return fail(file, { line: 1, column: 1 }, `Cannot parse YAML: ${(error as Error).message}`);
  }
  const error = doc.errors[0];
  if (error !== undefined) {
    const { line, col } = lines.linePos(error.pos[0]);
    fail(file, { line, column: col }, `Cannot parse YAML: ${yamlErrorDetail(error.code, error.message)}`);
  }
  return new YamlFront(doc, lines, file).root();
}

/** The first line of a yaml library error, reworded where it would not tell an operator much. */
function yamlErrorDetail(code: string, message: string): string {
  if (code === "DUPLICATE_KEY") return "a key appears twice in one mapping (options may be set once per section)";
  // Found by review: thousands of nested brackets gave "Maximum call stack size exceeded."
  if (/call stack/i.test(message)) return `nested too deeply (at most ${YAML_NESTING_DEPTH_MAX} levels are accepted)`;
  return message.split("\n")[0]!;
}
