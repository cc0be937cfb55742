/**
 * Checking nested settings against a schema (a {@link Check} per leaf key,
 * model/settings.ts): overrides merged onto a base, unknown keys reported
 * with a suggestion, type and range errors naming the key, then checks that
 * involve several keys. train/config.ts builds the training config's schema
 * from the library's checks and its own.
 * @module
 */
import { parse } from "yaml";
import { type Check, describe, editDistance, foldKey } from "../model/settings.ts";

/** A check for every leaf of T; nested objects are nested schemas (checked by the compiler). */
export type Schema<T> = {
  readonly [K in keyof T]-?: T[K] extends readonly unknown[] | string | number | boolean | null | undefined
    ? Check
    : Schema<T[K]>;
};

/** A bad training config: its message lists every problem, one a line, each naming the file and the key. */
export class TrainConfigError extends Error {
  /** The problems, one string each. */
  readonly problems: string[];
  /** Wraps problems into one error. */
  constructor(problems: string[]) {
    super(
      problems.length === 1 ? problems[0] : `${problems.length} config errors:\n  ${problems.join("\n  ")}`,
    );
    this.name = "TrainConfigError";
    this.problems = problems;
  }
}

const isCheck = (node: unknown): node is Check =>
  typeof node === "object" && node !== null && typeof (node as Check).ok === "function";
const isMapping = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

/** A schema with the settings' defaults: merges overrides, checks them, suggests keys. */
export class SettingsSchema<T> {
  readonly #schema: Schema<T>;
  readonly #aliases: Readonly<Record<string, string>>;
  readonly #crossChecks: (cfg: T) => string[];

  /**
   * @param aliases other tools' names for settings, folded (lower case, no "_" or "-"), to full paths
   * @param crossChecks checks that involve several keys, on a config whose every key passed its check
   */
  constructor(
    schema: Schema<T>,
    aliases: Readonly<Record<string, string>>,
    crossChecks: (cfg: T) => string[],
  ) {
    this.#schema = schema;
    this.#aliases = aliases;
    this.#crossChecks = crossChecks;
  }

  /** Every leaf path ("train.learningRate", …). */
  keys(node: Record<string, unknown> = this.#schema as Record<string, unknown>, prefix = ""): string[] {
    return Object.entries(node).flatMap(([k, v]) =>
      isCheck(v) ? [`${prefix}${k}`] : this.keys(v as Record<string, unknown>, `${prefix}${k}.`)
    );
  }

  /**
   * The closest known key for a misspelt one: a sibling within a small edit
   * distance (case, "_" and "-" ignored), else a key of that name in other
   * sections (full paths), else another tool's name for a setting; null
   * when nothing is close.
   */
  suggest(key: string, siblings: readonly string[]): string | null {
    const k = foldKey(key);
    let best: string | null = null, bestD = Infinity, ties = 0;
    for (const c of siblings) {
      const d = editDistance(k, foldKey(c));
      if (d < bestD) [best, bestD, ties] = [c, d, 0];
      else if (d === bestD) ties++;
    }
    if (best !== null && ties === 0 && bestD <= Math.max(1, Math.floor(k.length / 4))) return best;
    const same = this.keys().filter((p) => foldKey(p.slice(p.lastIndexOf(".") + 1)) === k);
    if (same.length) return same.join(" or ");
    return Object.hasOwn(this.#aliases, k) ? this.#aliases[k]! : null; // not Object.prototype's "constructor"
  }

  /**
   * Applies one layer of overrides (a parsed YAML document) to base.
   * @param where names the source in errors (a file path, "--set")
   * @param crossWhere names the sources in errors of the checks across keys; null skips them (a layer that a
   *   later one may complete: a file before its `--set`s)
   * @throws {TrainConfigError} listing every unknown key, bad value and inconsistency
   */
  apply(base: T, overrides: unknown, where: string, crossWhere: string | null = where): T {
    if (overrides === null || overrides === undefined) return structuredClone(base);
    if (!isMapping(overrides)) {
      throw new TrainConfigError([
        `${where}: expected a mapping of settings at the top, got ${describe(overrides)}`,
      ]);
    }
    const problems: string[] = [];
    const root = this.#schema as Record<string, unknown>;
    const cfg = this.#merge(
      structuredClone(base) as Record<string, unknown>,
      overrides,
      root,
      where,
      "",
      problems,
    );
    if (problems.length === 0 && crossWhere !== null) {
      problems.push(...this.#crossChecks(cfg as T).map((p) => `${crossWhere}: ${p}`));
    }
    if (problems.length) throw new TrainConfigError(problems);
    return cfg as T;
  }

  /** Overrides merged into base (a copy): mappings key by key, every other value (lists too) replaces. */
  #merge(
    base: Record<string, unknown>,
    over: Record<string, unknown>,
    schema: Record<string, unknown>,
    where: string,
    path: string,
    problems: string[],
  ): Record<string, unknown> {
    const out = { ...base };
    for (const [key, value] of Object.entries(over)) {
      const full = `${path}${key}`;
      const node = Object.hasOwn(schema, key) ? schema[key] : undefined;
      if (node === undefined) {
        const hint = this.suggest(key, Object.keys(schema));
        problems.push(`${where}: unknown key ${full}${hint ? ` (did you mean ${hint}?)` : ""}`);
      } else if (isCheck(node)) {
        if (node.ok(value)) out[key] = Array.isArray(value) ? [...value] : value;
        else problems.push(`${where}: ${full}: expected ${node.expected}, got ${describe(value)}`);
      } else if (!isMapping(value)) {
        problems.push(
          `${where}: ${full} is a section (keys ${Object.keys(node as object).join(", ")}), got ${
            describe(value)
          }`,
        );
      } else {
        out[key] = this.#merge(
          base[key] as Record<string, unknown>,
          value,
          node as Record<string, unknown>,
          where,
          `${full}.`,
          problems,
        );
      }
    }
    return out;
  }
}

/**
 * Parses `--set` arguments ("a.b=value", the value read as a YAML scalar or
 * flow list: `train.learningRate=2e-5`, `lora.targetModules=[q_proj, v_proj]`,
 * `data.system=null`) into one overrides mapping. A value that YAML would read
 * as a mapping ("a: b") is taken as the plain string.
 * @throws {TrainConfigError} for an argument without "=" or with an empty key
 */
export function parseSets(sets: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const problems: string[] = [];
  for (const s of sets) {
    const eq = s.indexOf("=");
    const path = eq < 0 ? [] : s.slice(0, eq).trim().split(".");
    if (eq < 0 || path.some((k) => k === "")) {
      problems.push(`--set ${s}: expected key.path=value`);
      continue;
    }
    const raw = s.slice(eq + 1);
    let value: unknown;
    try {
      value = parse(raw, { logLevel: "error" }); // no warning printed for text that is not YAML
    } catch {
      value = raw;
    }
    // YAML reads numbers, booleans, null and lists; anything it would turn into other text (a comment cut off,
    // an anchor, a block marker) or into a mapping is the text as typed. `key=` is the empty string.
    const quoted = /^\s*["']/.test(raw);
    const nulls = ["null", "Null", "NULL", "~"];
    if (raw === "") value = "";
    else if (isMapping(value)) value = raw;
    else if (typeof value === "string" && !quoted && value !== raw.trim()) value = raw;
    else if (value === null && !nulls.includes(raw.trim())) value = raw;
    let node = out;
    for (const k of path.slice(0, -1)) {
      if (!isMapping(node[k])) node[k] = {};
      node = node[k] as Record<string, unknown>;
    }
    node[path.at(-1)!] = value;
  }
  if (problems.length) throw new TrainConfigError(problems);
  return out;
}

/**
 * Parses YAML text into overrides.
 * @throws {TrainConfigError} naming where and the line for a YAML syntax error (duplicate keys included)
 */
export function parseYaml(text: string, where: string): unknown {
  try {
    return parse(text, { merge: true }); // "<<: *defaults" merge keys, as YAML 1.1 tools read them
  } catch (e) {
    const msg = (e as Error).message.split("\n")[0];
    throw new TrainConfigError([`${where}: invalid YAML: ${msg}`]);
  }
}
