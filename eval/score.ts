/**
 * `deno task score <file.jsonl> [--out FILE] [--summary FILE]`: scores
 * completions produced elsewhere with the same answer extraction as the
 * reward (data/answer.ts), strict and flexible.
 *
 * Input: one JSON object a line with `completion` (the model's text) and
 * `answer` (the gold answer: a number, a number string, or a GSM8K solution
 * ending in `#### n`; `answer_gold` is read when `answer` is absent, so
 * `deno task evaluate`'s predictions.jsonl scores as it is); other fields are
 * ignored except `id`, which is copied.
 * Output, each written atomically (a temporary file renamed into place):
 *
 * - `--out` (default `<input>.scored.jsonl`): one verdict a scored line:
 *   `{line, id?, answer_gold, extracted_strict, extracted_flexible,
 *   method_flexible, correct_strict, correct_flexible}`;
 * - `--summary` (default `<input>.summary.json`): the totals, also printed.
 *
 * A malformed line (bad JSON, a missing field, a gold answer that is not a
 * number) is skipped, reported on stderr with its line number, and counted;
 * accuracies are over the scored lines. Relative paths are taken from the folder the
 * command was started in (`INIT_CWD` under `deno task`). Exit status: 0, or 1 when no line
 * could be scored or a file cannot be read or written, 2 for bad arguments.
 * @module
 */
import { writeAtomic } from "../model/atomic_write.ts";
import { failureText, fromStartDir, parseCommandLine } from "../train/cli.ts";
import { type AnswerVerdict, EXTRACT_METHODS, type ExtractMethod, judgeAnswer } from "../data/answer.ts";
import { parseGold } from "../data/numbers.ts";
import { isJsonObject } from "../model/json.ts";
import { parseJsonl } from "../data/jsonl.ts";

/** The verdict on one scored line: data/answer.ts's verdict, with where it came from. */
export interface RowVerdict extends AnswerVerdict {
  /** 1-based line number in the input. */
  line: number;
  /** The input row's `id`, when it has one. */
  id?: string | number;
  /** The gold answer as a canonical number string. */
  answer_gold: string;
}

/** A line that could not be scored. */
export interface MalformedLine {
  /** 1-based line number. */
  line: number;
  /** Why. */
  reason: string;
}

/** The totals of a scored file. */
export interface ScoreSummary {
  /** The input file (null when scoring text). */
  input: string | null;
  /** Non-blank lines read. */
  rows: number;
  /** Lines scored. */
  scored: number;
  /** Lines skipped as malformed. */
  malformed: number;
  /** Scored lines correct under strict extraction. */
  correct_strict: number;
  /** Scored lines correct under flexible extraction. */
  correct_flexible: number;
  /** correct_strict / scored (0 when nothing was scored). */
  accuracy_strict: number;
  /** correct_flexible / scored (0 when nothing was scored). */
  accuracy_flexible: number;
  /** How the flexible answers were found: count per method ("none" for no answer). */
  methods_flexible: Record<ExtractMethod | "none", number>;
  /** The malformed lines with their reasons. */
  malformed_lines: MalformedLine[];
}

/** What {@link scoreText} returns. */
export interface ScoreResult {
  /** One verdict per scored line, in input order. */
  verdicts: RowVerdict[];
  /** The totals. */
  summary: ScoreSummary;
}

/** Scores one parsed input row, or says why it is malformed. */
export function scoreRow(
  value: unknown,
  line: number,
): { ok: true; verdict: RowVerdict } | { ok: false; reason: string } {
  if (!isJsonObject(value)) return { ok: false, reason: "expected a JSON object" };
  const { completion, id } = value;
  const field = value.answer === undefined && value.answer_gold !== undefined ? "answer_gold" : "answer";
  const answer = value[field]; // evaluate's predictions (and our verdicts) say answer_gold
  if (typeof completion !== "string") {
    return {
      ok: false,
      reason: `"completion" must be a string, got ${JSON.stringify(completion) ?? "nothing"}`,
    };
  }
  if (typeof answer !== "string" && typeof answer !== "number") {
    return {
      ok: false,
      reason: `"${field}" must be a number or a string, got ${JSON.stringify(answer) ?? "nothing"}`,
    };
  }
  const gold = parseGold(answer);
  if (gold === null) {
    return { ok: false, reason: `"${field}" ${JSON.stringify(answer).slice(0, 60)} is not a number` };
  }
  return {
    ok: true,
    verdict: {
      line,
      ...(typeof id === "string" || typeof id === "number" ? { id } : {}),
      answer_gold: gold,
      ...judgeAnswer(completion, gold),
    },
  };
}

/** Scores JSONL text (see the module doc for the format). */
export function scoreText(text: string, input: string | null = null): ScoreResult {
  const verdicts: RowVerdict[] = [];
  const malformed: MalformedLine[] = [];
  const lines = parseJsonl(text);
  for (const l of lines) {
    const r = l.ok ? scoreRow(l.value, l.line) : { ok: false as const, reason: l.reason };
    if (r.ok) verdicts.push(r.verdict);
    else malformed.push({ line: l.line, reason: r.reason });
  }
  const methods = Object.fromEntries([...EXTRACT_METHODS, "none"].map((m) => [m, 0])) as Record<
    ExtractMethod | "none",
    number
  >;
  for (const v of verdicts) methods[v.method_flexible ?? "none"]++;
  const strict = verdicts.filter((v) => v.correct_strict).length;
  const flexible = verdicts.filter((v) => v.correct_flexible).length;
  const n = verdicts.length;
  return {
    verdicts,
    summary: {
      input,
      rows: lines.length,
      scored: n,
      malformed: malformed.length,
      correct_strict: strict,
      correct_flexible: flexible,
      accuracy_strict: n > 0 ? strict / n : 0,
      accuracy_flexible: n > 0 ? flexible / n : 0,
      methods_flexible: methods,
      malformed_lines: malformed,
    },
  };
}

/** `<input>` with its `.jsonl` extension (if any) replaced by suffix. */
function beside(input: string, suffix: string): string {
  return input.replace(/\.jsonl$/i, "") + suffix;
}

/** Paths of {@link scoreFile}'s outputs. */
export interface ScoreFileOptions {
  /** Per-line verdicts (default `<input>.scored.jsonl`). */
  out?: string;
  /** Totals (default `<input>.summary.json`). */
  summary?: string;
}

/**
 * Scores a JSONL file and writes the verdicts and the totals atomically.
 * @throws {Error} naming the file when the input cannot be read, an output would overwrite the input, or an
 *   output cannot be written
 */
export async function scoreFile(
  input: string,
  opts: ScoreFileOptions = {},
): Promise<ScoreResult & { out: string; summaryPath: string }> {
  const out = opts.out ?? beside(input, ".scored.jsonl");
  const summaryPath = opts.summary ?? beside(input, ".summary.json");
  for (const p of [out, summaryPath]) {
    if (p === input) throw new Error(`refusing to overwrite the input ${input} with an output`);
  }
  let text: string;
  try {
    text = await Deno.readTextFile(input);
  } catch (e) {
    throw new Error(`cannot read ${input}: ${(e as Error).message}`, { cause: e });
  }
  const result = scoreText(text, input);
  await writeAtomic(out, result.verdicts.map((v) => JSON.stringify(v) + "\n").join(""));
  await writeAtomic(summaryPath, JSON.stringify(result.summary, null, 2) + "\n");
  return { ...result, out, summaryPath };
}

const USAGE = `usage: deno task score <file.jsonl> [-o, --out verdicts.jsonl] [-s, --summary summary.json]

Scores GSM8K completions made elsewhere, strict (#### only) and flexible (the cascade): each line
{"completion": "...", "answer": <a number, a number string, or a GSM8K solution ending in "#### n">};
"answer_gold" is read when "answer" is absent (so deno task evaluate's predictions.jsonl scores as it is),
"id" is copied, other fields are ignored.

  -o, --out FILE      the verdicts, one line per scored line (default: the input's path with .scored.jsonl
                      for its .jsonl)
  -s, --summary FILE  the totals, also printed (default: the input's path with .summary.json for its .jsonl)
  -h, --help          this text

Exit status: 0 done, 1 no line scored or a file not read or written, 2 a bad argument.`;

const pct = (x: number): string => `${(100 * x).toFixed(2)}%`;

/** The command line: returns the exit status (0 ok, 1 nothing scored or an I/O error, 2 bad arguments). */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine("score", USAGE, args, {
    out: { type: "string", short: "o" },
    summary: { type: "string", short: "s" },
  }, true);
  if (typeof parsed === "number") return parsed;
  if (parsed.positionals.length !== 1) {
    console.error(`score: expected one input file, got ${parsed.positionals.length}\n${USAGE}`);
    return 2;
  }
  const at = fromStartDir; // relative paths mean the folder the task was started from
  const input = at(parsed.positionals[0])!;
  let r;
  try {
    r = await scoreFile(input, { out: at(parsed.values.out), summary: at(parsed.values.summary) });
  } catch (e) {
    console.error(`score: ${failureText(e)}`);
    return 1;
  }
  const s = r.summary;
  for (const m of s.malformed_lines) console.error(`score: ${input}:${m.line}: skipped: ${m.reason}`);
  console.log(`${input}: ${s.scored} scored, ${s.malformed} malformed (of ${s.rows} lines)`);
  console.log(`  strict   (#### only): ${s.correct_strict}/${s.scored} = ${pct(s.accuracy_strict)}`);
  console.log(`  flexible (cascade)  : ${s.correct_flexible}/${s.scored} = ${pct(s.accuracy_flexible)}`);
  console.log(
    `  flexible answers by method: ${
      Object.entries(s.methods_flexible).map(([k, v]) => `${k} ${v}`).join(", ")
    }`,
  );
  console.log(`  verdicts: ${r.out}\n  summary:  ${r.summaryPath}`);
  if (s.scored === 0) {
    console.error(`score: no line of ${input} could be scored`);
    return 1;
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
