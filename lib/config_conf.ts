/**
 * Front end for FreeBSD hast.conf syntax: tokenizer and parser producing the section tree
 * of config_tree.ts. Like HAST's grammar it ignores line breaks: a statement is a keyword
 * and one value, a section is `on <node> {…}` or `resource <name> {…}`.
 */

import {
  checkOptionKey,
  checkValueWord,
  describeSection,
  fail,
  type Pos,
  type Section,
  type SectionKind,
} from "./config_tree.ts";

interface Token {
  type: "word" | "{" | "}" | "eof";
  text: string;
  pos: Pos;
}

const WORD_CHAR = /[a-zA-Z0-9.\-_/:[\]]/;

/** Splits hast.conf text into tokens; `#` starts a comment that runs to the end of the line. */
function tokenize(text: string, file: string): Token[] {
  const tokens: Token[] = [];
  let line = 1;
  let lineStart = 0;
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    const pos = { line, column: i - lineStart + 1 };
    // A lone CR ends a line too (old Mac files), so that errors still name the right line.
    if (c === "\n" || (c === "\r" && text[i + 1] !== "\n")) {
      line += 1;
      lineStart = i + 1;
      i += 1;
    } else if (c === " " || c === "\t" || c === "\r") {
      i += 1;
    } else if (c === "#") {
      while (i < text.length && text[i] !== "\n" && text[i] !== "\r") i += 1;
    } else if (c === "{" || c === "}") {
      tokens.push({ type: c, text: c, pos });
      i += 1;
    } else if (WORD_CHAR.test(c)) {
      const start = i;
      while (i < text.length && WORD_CHAR.test(text[i]!)) i += 1;
      tokens.push({ type: "word", text: text.slice(start, i), pos });
    } else {
      fail(file, pos, `Cannot parse: unexpected character ${describeChar(text.codePointAt(i)!)}`);
    }
  }
  tokens.push({ type: "eof", text: "", pos: { line, column: i - lineStart + 1 } });
  return tokens;
}

/**
 * A character for messages: printable ASCII quoted, anything else as U+XXXX (found by review: a
 * no-break space or a control character was quoted as itself, invisible in the message).
 */
function describeChar(codePoint: number): string {
  if (codePoint > 0x20 && codePoint < 0x7f) return JSON.stringify(String.fromCodePoint(codePoint));
  return `U+${codePoint.toString(16).toUpperCase().padStart(4, "0")}`;
}

/** Describes a token for messages: `"}"`, `end of file`, `"word"`. */
function describe(token: Token): string {
  return token.type === "eof" ? "end of file" : JSON.stringify(token.text);
}

class Parser {
  private index = 0;

  constructor(
    private readonly tokens: Token[],
    private readonly file: string,
  ) {}

  private next(): Token {
    const token = this.tokens[this.index]!;
    if (token.type !== "eof") this.index += 1;
    return token;
  }

  /** Parses the whole file as the global section. */
  parseFile(): Section {
    const global: Section = {
      kind: "global",
      name: "",
      pos: { line: 1, column: 1 },
      namePos: { line: 1, column: 1 },
      entries: [],
      children: [],
    };
    for (;;) {
      const token = this.next();
      if (token.type === "eof") return global;
      if (token.type === "}") {
        fail(this.file, token.pos, `Cannot parse: unexpected "}" (no section is open)`);
      }
      this.parseItem(global, token);
    }
  }

  /** Parses one statement or nested section starting at `token` inside `section`. */
  private parseItem(section: Section, token: Token): void {
    if (token.type !== "word") {
      fail(this.file, token.pos, `Cannot parse statement: expected an option name, ` +
        `found ${describe(token)}`);
    }
    if (token.text === "on" || token.text === "resource") {
      section.children.push(this.parseSection(section.kind, token));
      return;
    }
    checkOptionKey(this.file, section.kind, token.text, token.pos);
    const value = this.next();
    if (value.type !== "word") {
      fail(this.file, value.pos, `Cannot set ${JSON.stringify(token.text)}: value missing ` +
        `(found ${describe(value)})`);
    }
    checkValueWord(this.file, token.text, value.text, value.pos);
    section.entries.push({
      key: token.text,
      keyPos: token.pos,
      value: value.text,
      valuePos: value.pos,
    });
  }

  /** Parses `on <node> {…}` or `resource <name> {…}`; `keyword` is already consumed. */
  private parseSection(parent: SectionKind, keyword: Token): Section {
    const kind = this.childKind(parent, keyword);
    const name = this.next();
    if (name.type !== "word") {
      fail(this.file, name.pos, `Cannot open ${JSON.stringify(keyword.text)} section: ` +
        `name missing (found ${describe(name)})`);
    }
    const open = this.next();
    if (open.type !== "{") {
      fail(this.file, open.pos, `Cannot open ${JSON.stringify(keyword.text)} section ` +
        `${JSON.stringify(name.text)}: expected "{", found ${describe(open)}`);
    }
    const section: Section = {
      kind,
      name: name.text,
      pos: keyword.pos,
      namePos: name.pos,
      entries: [],
      children: [],
    };
    for (;;) {
      const token = this.next();
      if (token.type === "}") return section;
      if (token.type === "eof") {
        fail(this.file, token.pos, `Cannot parse: end of file inside the ` +
          `${describeSection(kind)} ${JSON.stringify(name.text)} opened at line ` +
          `${keyword.pos.line} (missing "}")`);
      }
      this.parseItem(section, token);
    }
  }

  /** Which section `keyword` opens inside `parent`, or an error where sections cannot nest. */
  private childKind(parent: SectionKind, keyword: Token): SectionKind {
    if (parent === "global") return keyword.text === "on" ? "node" : "resource";
    if (parent === "resource" && keyword.text === "on") return "resourceNode";
    const where = keyword.text === "on"
      ? `only at the top level and inside a resource section`
      : `only at the top level`;
    return fail(this.file, keyword.pos, `Cannot open ${JSON.stringify(keyword.text)} ` +
      `section in the ${describeSection(parent)}: allowed ${where}`);
  }
}

/**
 * Parses hast.conf text into the section tree.
 *
 * @param text the file contents
 * @param file the file name used in messages
 * @returns the global section; node and resource sections are its children
 * @throws ConfigError at the first syntax error
 */
export function parseConfSyntax(text: string, file: string): Section {
  // A byte order mark (added by some Windows editors) is not content, as in YAML; found by
  // review: it was "unexpected character" at 1:1, a character no editor shows.
  const body = text.startsWith("\uFEFF") ? text.slice(1) : text;
  return new Parser(tokenize(body, file), file).parseFile();
}
