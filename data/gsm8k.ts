/**
 * GSM8K records from a local `.jsonl` file (the release's format: one
 * `{"question", "answer"}` object a line), a local `.parquet` file (the Hub's
 * format, same columns), or the Hub dataset `openai/gsm8k` (its parquet files,
 * through the HF cache; data/hub.ts). The gold answer is the number after the
 * solution's `####`.
 *
 * A malformed record (bad JSON, a missing field, no `#### <number>`) never
 * crashes a run: it is skipped and reported with its line (row) number, or,
 * with `onBadRecord: "error"`, rejected with an error naming file and line.
 * @module
 */
import { basename, extname, resolve } from "node:path";
import { parseGold } from "./numbers.ts";
import { isFile, isJsonObject } from "../model/json.ts";
import { parseRepoId } from "../model/hub.ts";
import { type DatasetFileOptions, resolveDatasetFile } from "./hub.ts";
import { readJsonl } from "./jsonl.ts";
import { readParquetRows } from "./parquet.ts";

/** GSM8K's splits. */
export const GSM8K_SPLITS = ["train", "test"] as const;

/** A GSM8K split. */
export type Gsm8kSplit = typeof GSM8K_SPLITS[number];

/** What a malformed record does: skipped and reported, or an error ending the load. */
export const BAD_RECORD_POLICIES = ["skip", "error"] as const;

/** One GSM8K problem. */
export interface Gsm8kExample {
  /**
   * `<split>-<index>`: index counts every record of the source from 0 in file order, the skipped ones
   * included, so ids stay put when a bad record is dropped, and the jsonl and parquet releases agree.
   */
  id: string;
  /** The problem text. */
  question: string;
  /** The record's "answer" field verbatim: the reasoning, with `<<…>>` calculator notes, and `#### n`. */
  solution: string;
  /** The gold number as a canonical string (data/answer.ts `normalizeNumber`: "1,000" → "1000"). */
  answer: string;
  /** The gold number's value. */
  answerValue: number;
}

/** A record that was skipped. */
export interface SkippedRecord {
  /** 1-based line number in a jsonl file, or 1-based row number in a parquet file. */
  line: number;
  /** What was wrong. */
  reason: string;
}

/** What {@link loadGsm8k} returns. */
export interface Gsm8kData {
  /** The valid records, in file order. */
  examples: Gsm8kExample[];
  /** The malformed records that were skipped (empty with onBadRecord "error"). */
  skipped: SkippedRecord[];
}

/** Options for {@link loadGsm8k}. */
export interface LoadGsm8kOptions extends DatasetFileOptions {
  /**
   * The split: which Hub file to read (default "train"), and the ids' prefix; for a local file the default
   * is "train" or "test" when its name contains one, else the file's name without extension.
   */
  split?: Gsm8kSplit;
  /** A malformed record is skipped and reported (default "skip"), or ends the load with an error. */
  onBadRecord?: typeof BAD_RECORD_POLICIES[number];
  /** Stop after this many valid examples (default: all). */
  limit?: number;
  /** Hub only: the dataset config, a folder of the repo (default "main"; openai/gsm8k also has "socratic"). */
  config?: string;
  /** Hub only: the file to read, overriding `<config>/<split>-00000-of-00001.parquet`. */
  hubPath?: string;
}

/** The Hub dataset the release is published as. */
export const GSM8K_HUB_ID = "openai/gsm8k";

/**
 * One record checked: the example, or why it is malformed.
 * @param value the parsed record (a JSON value or a parquet row)
 * @param id the example's id
 */
export function parseGsm8kRecord(
  value: unknown,
  id: string,
): { ok: true; example: Gsm8kExample } | { ok: false; reason: string } {
  if (!isJsonObject(value)) {
    return { ok: false, reason: `expected an object with "question" and "answer", got ${kind(value)}` };
  }
  const { question, answer } = value;
  if (typeof question !== "string" || question.trim() === "") {
    return { ok: false, reason: `"question" must be a non-empty string, got ${kind(question)}` };
  }
  if (typeof answer !== "string") {
    return { ok: false, reason: `"answer" must be a string ending in "#### <number>", got ${kind(answer)}` };
  }
  if (!answer.includes("####")) return { ok: false, reason: `"answer" has no "#### <number>" line` };
  const gold = parseGold(answer);
  if (gold === null) {
    const after = answer.slice(answer.lastIndexOf("####") + 4).trim().slice(0, 40);
    return { ok: false, reason: `"answer": "#### ${after}" is not followed by a number` };
  }
  return { ok: true, example: { id, question, solution: answer, answer: gold, answerValue: valueOf(gold) } };
}

/** A canonical number string's value ("1/3" → 0.333…). */
function valueOf(canonical: string): number {
  const [a, b] = canonical.split("/");
  return b === undefined ? Number(a) : Number(a) / Number(b);
}

function kind(v: unknown): string {
  if (v === null) return "null";
  if (v === undefined) return "nothing";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "string") return v.trim() === "" ? "an empty string" : "a string";
  return `a ${typeof v}`;
}

/** A local path rather than a Hub id: it has a data file extension or starts like a path. */
function looksLikePath(source: string): boolean {
  return /\.(jsonl|parquet|json)$/i.test(source) || /^(\.{1,2}|~)?[\\/]/.test(source) ||
    source.startsWith(".");
}

function defaultLabel(file: string): string {
  const name = basename(file, extname(file));
  return /(^|[^a-z])train([^a-z]|$)/i.test(name)
    ? "train"
    : /(^|[^a-z])test([^a-z]|$)/i.test(name)
    ? "test"
    : name;
}

/**
 * Why a local file's name contradicts the split it is given, or null. The split only labels a local file's
 * ids and evaluation folders, so `eval.split: test` on `train.jsonl` would report training problems as test
 * accuracy.
 * @param source a `.jsonl`/`.parquet` path or a Hub dataset id (never contradicts: the split picks its file)
 * @param split the split it is given
 */
export function splitContradiction(source: string, split: Gsm8kSplit): string | null {
  if (!looksLikePath(source)) return null;
  const named = defaultLabel(source);
  if (named === split || !(GSM8K_SPLITS as readonly string[]).includes(named)) return null;
  return `${source} is named as GSM8K's ${named} split but is labelled "${split}": its ids and evaluation ` +
    `folders will say ${split}`;
}

/**
 * Whether two sources give the same problems: the same local file whatever split labels it (the label only
 * names its ids), however its path is written; or the same Hub dataset and split.
 */
export function sameProblems(
  a: { source: string; split: Gsm8kSplit },
  b: { source: string; split: Gsm8kSplit },
): boolean {
  if (looksLikePath(a.source) || looksLikePath(b.source)) return resolve(a.source) === resolve(b.source);
  return a.source === b.source && a.split === b.split;
}

/**
 * Loads GSM8K.
 * @param source a `.jsonl` or `.parquet` path, or a Hub dataset id ("openai/gsm8k", "org/name@revision")
 * @throws {Error} when the source cannot be found or read (a path that does not exist, an unknown
 *   extension, a parquet file without "question"/"answer" columns, a Hub file offline and not cached, a
 *   failed download), for a bad limit or split, and, with onBadRecord "error", at the first malformed
 *   record, naming the file and its line (row) number
 * @example
 * ```ts ignore
 * const { examples, skipped } = await loadGsm8k("gsm8k/train.jsonl");
 * const test = await loadGsm8k("openai/gsm8k", { split: "test" }); // HF cache, else download
 * ```
 */
export async function loadGsm8k(source: string, opts: LoadGsm8kOptions = {}): Promise<Gsm8kData> {
  const onBad = opts.onBadRecord ?? "skip";
  if (!BAD_RECORD_POLICIES.includes(onBad)) {
    throw new Error(`loadGsm8k: onBadRecord must be "skip" or "error", got ${JSON.stringify(onBad)}`);
  }
  const limit = opts.limit ?? Infinity;
  if (limit !== Infinity && !(Number.isSafeInteger(limit) && limit >= 0)) {
    throw new Error(`loadGsm8k: limit must be a non-negative integer, got ${opts.limit}`);
  }
  if (opts.split !== undefined && opts.split !== "train" && opts.split !== "test") {
    throw new Error(`loadGsm8k: split must be "train" or "test", got ${JSON.stringify(opts.split)}`);
  }

  const file = await locate(source, opts);
  const label = opts.split ?? defaultLabel(file);
  const isParquet = /\.parquet$/i.test(file);
  const records: { line: number; value?: unknown; reason?: string }[] = isParquet
    ? (await readParquetRows(file, ["question", "answer"])).map((value, i) => ({ line: i + 1, value }))
    : (await readJsonl(file)).map((r) => (r.ok ? { line: r.line, value: r.value } : r));

  const examples: Gsm8kExample[] = [];
  const skipped: SkippedRecord[] = [];
  for (let i = 0; i < records.length && examples.length < limit; i++) {
    const r = records[i]!;
    const parsed = r.reason === undefined
      ? parseGsm8kRecord(r.value, `${label}-${i}`)
      : { ok: false as const, reason: r.reason };
    if (parsed.ok) {
      examples.push(parsed.example);
      continue;
    }
    if (onBad === "error") {
      throw new Error(`${file} ${isParquet ? "row" : "line"} ${r.line}: ${parsed.reason}`);
    }
    skipped.push({ line: r.line, reason: parsed.reason });
  }
  return { examples, skipped };
}

/** The local file a source names: the path itself, or the Hub file resolved through the cache. */
async function locate(source: string, opts: LoadGsm8kOptions): Promise<string> {
  if (typeof source !== "string" || source === "") {
    throw new Error(`loadGsm8k: expected a file path or a Hub dataset id, got ${JSON.stringify(source)}`);
  }
  if (await isFile(source)) {
    if (!/\.(jsonl|parquet)$/i.test(source)) {
      throw new Error(`${source}: expected a .jsonl or .parquet file (chosen by the extension)`);
    }
    return source;
  }
  if (looksLikePath(source)) throw new Error(`GSM8K file ${source} does not exist`);
  try {
    parseRepoId(source);
  } catch {
    throw new Error(
      `"${source}" is neither an existing .jsonl/.parquet file nor a Hub dataset id such as "${GSM8K_HUB_ID}"`,
    );
  }
  const path = opts.hubPath ?? `${opts.config ?? "main"}/${opts.split ?? "train"}-00000-of-00001.parquet`;
  return await resolveDatasetFile(source, path, opts);
}
