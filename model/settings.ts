/**
 * Checked settings: one {@link Check} per key says what the key expects, in
 * words, and whether a value is that. A library's settings (LoRA's in
 * model/lora_apply.ts, the RL update's in rl/config.ts and rl/reward.ts)
 * declare their checks once, here in this form; the library checks its
 * arguments with them, and `deno task train`'s YAML config (train/config.ts)
 * checks the same keys with the same checks.
 * @module
 */

/** One key's check: what it expects, in words, and whether a value is that. */
export interface Check {
  /** "an integer ≥ 1", "one of "token", "sequence"", ... */
  readonly expected: string;
  /** Whether v is acceptable. */
  ok(v: unknown): boolean;
}

/** A check for every key of a flat section T. */
export type Checks<T> = { readonly [K in keyof T]-?: Check };

const isInt = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v);
const isNum = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

/** An integer at least min. */
export const int = (min: number): Check => ({
  expected: `an integer ≥ ${min}`,
  ok: (v) => isInt(v) && v >= min,
});

/** A finite number at least min (above min when open), at most max. */
export const num = (min: number, max = Infinity, open = false): Check => ({
  expected: max === Infinity
    ? `a number ${open ? ">" : "≥"} ${min}`
    : `a number in ${open ? "(" : "["}${min}, ${max}]`,
  ok: (v) => isNum(v) && (open ? v > min : v >= min) && v <= max,
});

/** Any finite number. */
export const anyNum: Check = { expected: "a number", ok: isNum };
/** true or false. */
export const bool: Check = { expected: "true or false", ok: (v) => typeof v === "boolean" };
/** A non-empty string. */
export const str: Check = { expected: "a non-empty string", ok: (v) => typeof v === "string" && v !== "" };
/** Any string. */
export const text: Check = { expected: "a string", ok: (v) => typeof v === "string" };

/** One of the given strings. */
export const oneOf = (...values: readonly string[]): Check => ({
  expected: `one of ${values.map((s) => JSON.stringify(s)).join(", ")}`,
  ok: (v) => typeof v === "string" && values.includes(v),
});

/** c, or null. */
export const nullable = (c: Check): Check => ({
  expected: `${c.expected}, or null`,
  ok: (v) => v === null || c.ok(v),
});

/** A list (possibly empty) of some of the given strings. */
export const listOf = (values: readonly string[]): Check => ({
  expected: `a list of ${values.map((s) => JSON.stringify(s)).join(", ")}`,
  ok: (v) => Array.isArray(v) && v.every((x) => values.includes(x)),
});

/** A value and its type, for "got …". */
export function describe(v: unknown): string {
  if (v === null) return "null";
  if (v === undefined) return "nothing";
  if (Array.isArray(v)) return `${JSON.stringify(v).slice(0, 60)} (a list)`;
  if (typeof v === "object") return "a mapping";
  if (typeof v === "number" && !Number.isFinite(v)) return `${v} (a number)`; // JSON would say null
  return `${JSON.stringify(v).slice(0, 60)} (a ${typeof v})`;
}

/** "section.key: expected …, got …" for every key of value that fails its check; "unknown setting" for a key without one. */
export function checkSection<T>(section: string, value: T, checks: Checks<T>): string[] {
  const problems: string[] = [];
  // A misspelt key would otherwise be ignored in silence (a config file's keys are checked as they are read).
  for (const key of Object.keys((value ?? {}) as object)) {
    if (!(key in checks)) {
      problems.push(`${section}.${key}: unknown setting (known: ${Object.keys(checks).join(", ")})`);
    }
  }
  for (const [key, check] of Object.entries(checks) as [string, Check][]) {
    const v = (value as Record<string, unknown>)[key];
    if (!check.ok(v)) problems.push(`${section}.${key}: expected ${check.expected}, got ${describe(v)}`);
  }
  return problems;
}

/**
 * Throws a RangeError listing problems, when there are any.
 * @throws {RangeError} "problem" for one, "N problems: ..." for several
 */
export function throwProblems(problems: readonly string[]): void {
  if (problems.length === 1) throw new RangeError(problems[0]);
  if (problems.length > 1) throw new RangeError(`${problems.length} problems: ${problems.join("; ")}`);
}

/** Edit distance where swapping two neighbours is one edit, as typing makes it ("trian" is 1 from "train"). */
export function editDistance(a: string, b: string): number {
  let before: number[] = [], prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        cur[j] = Math.min(cur[j]!, before[j - 2]! + 1);
      }
    }
    [before, prev] = [prev, cur];
  }
  return prev[b.length]!;
}

/** Case, "_" and "-" do not count: learning_rate ≈ learningRate. */
export const foldKey = (s: string): string => s.toLowerCase().replace(/[_-]/g, "");
