/**
 * Final answers of GSM8K-style completions: finding the number a completion
 * commits to, and comparing numbers exactly.
 *
 * Two extraction modes (the conventions of lm-evaluation-harness and verl, docs/rl-update.md "Reward"):
 *
 * - **strict**: only `#### <number>`, the number right after the marker
 *   (spaces and `$` allowed), as lm-evaluation-harness' and verl's
 *   strict-match regex `#### (\-?[0-9\.\,]+)`, except that a number is read
 *   whole: `#### 1e3` is 1000 and `#### 3/4` is 0.75, where that regex reads 1 and 3.
 * - **flexible**: a cascade, first hit wins: `####` (anything but letters may
 *   stand between marker and number, e.g. `#### **$42**` or `####\n42`),
 *   `Final Answer` (`Final Answer:`, `The final answer is`, a `Final Answer`
 *   heading; not the words in passing), `\boxed{…}` (the
 *   last number inside), an answer phrase (`The answer is`, `Answer:`), and
 *   finally the last number anywhere in the text.
 *
 * After `####`, `Final Answer` or an answer phrase, the answer is the *final value* of the answer
 * line: the first line after the marker that has a letter or digit, cut at
 * its first sentence end (`.`, `!` or `?` before a space or the end), gives
 * the first number after its last `=`, else its first number. So
 * `The answer is 12 + 3 = 15.` gives 15, and `The answer is 15. She has 3
 * left.` gives 15.
 *
 * Only the design's three markers (`####`, `Final Answer`, `\boxed`) count
 * as an explicit final-answer marker ({@link MARKER_METHODS}): an answer
 * phrase or the last number is found, but earns no marker bonus.
 *
 * Several markers of a kind: the **last** one that yields a number is used.
 * lm-evaluation-harness' strict-match takes the first `####`; verl, whose
 * reward this mirrors, takes the last. The last is what a model means when it
 * restates the format early ("I'll end with #### <number>") or corrects itself,
 * and the reward and `deno task score` must agree, so both use the last. Only
 * the last 64 markers (boxes) of a kind are tried, and a marker's answer must
 * lie within 400 characters after it: extraction stays linear in the text's
 * length even on degenerate completions that repeat a marker endlessly.
 *
 * Numbers are read and compared by data/numbers.ts.
 * @module
 */

import {
  answersMatch,
  canonical,
  numbers,
  plainText,
  type Rational,
  STRICT_HASH_RE,
  tokenValue,
} from "./numbers.ts";

/** How an answer was found, in cascade order. */
export type ExtractMethod = "####" | "final_answer" | "boxed" | "answer_phrase" | "last_number";

/** Every extraction method, in cascade order. */
export const EXTRACT_METHODS: readonly ExtractMethod[] = [
  "####",
  "final_answer",
  "boxed",
  "answer_phrase",
  "last_number",
];

/** The extraction modes (see {@link ExtractMode}). */
export const EXTRACT_MODES = ["strict", "flexible"] as const;

/** "strict": `#### <number>` only; "flexible": the whole cascade (see the module doc). */
export type ExtractMode = typeof EXTRACT_MODES[number];

/** What {@link extractAnswer} found. */
export interface Extraction {
  /** The answer as a canonical number string ({@link normalizeNumber}), or null when nothing was found. */
  value: string | null;
  /** Which extractor found it, or null when none did. */
  method: ExtractMethod | null;
  /** True when the value came from an explicit final-answer marker (`####`, `Final Answer`, `\boxed`). */
  marker: boolean;
}

/** Options for {@link extractAnswer}. */
export interface ExtractOptions {
  /** "flexible" (default) or "strict". */
  mode?: ExtractMode;
}

/** The extraction methods that count as an explicit final-answer marker. */
export const MARKER_METHODS: readonly ExtractMethod[] = ["####", "final_answer", "boxed"];

// ---------------------------------------------------------------------------------------------
// Extraction

const NONE: Extraction = { value: null, method: null, marker: false };

function found(value: Rational, method: ExtractMethod): Extraction {
  return { value: canonical(value), method, marker: MARKER_METHODS.includes(method) };
}

// Bounds that keep extraction linear in the text's length, even on degenerate completions that repeat a
// marker thousands of times: markers and boxes tried (from the last), and characters read after a marker.
const MAX_TRIES = 64;
const MAX_SPAN = 400;

/**
 * The final value of the answer line after `from` (see the module doc): the
 * first line that has any letter or digit (lines of only markup such as `**`,
 * `\[` or `$$` are passed over), within MAX_SPAN characters, cut at its first
 * sentence end; the first number after its last `=` (when one follows it),
 * else its first number. Null when that line has no number, or, with
 * noLetterFirst, when a letter comes before its first number.
 */
function answerLineValue(text: string, from: number, noLetterFirst: boolean): Rational | null {
  let span = text.slice(from, from + MAX_SPAN);
  if (from + MAX_SPAN < text.length) {
    // do not read a number cut in two by the window
    const cut = Math.max(span.lastIndexOf(" "), span.lastIndexOf("\n"));
    if (cut > 0) span = span.slice(0, cut);
  }
  for (const [i, whole] of span.split("\n").entries()) {
    // On a line of its own, "- 42" is a list item, not minus 42.
    const raw = i > 0 ? whole.replace(/^\s*[-*+\u2022]\s+(?=\S)/u, "") : whole;
    if (!/[\p{L}\p{N}]/u.test(raw)) continue;
    const end = SENTENCE_END_RE.exec(raw);
    const line = end ? raw.slice(0, end.index) : raw;
    const nums = numbers(line);
    const first = nums[0];
    if (!first) return null;
    if (noLetterFirst && /\p{L}/u.test(line.slice(0, first.index))) return null;
    const eq = line.lastIndexOf("=");
    return (eq >= 0 ? nums.find((n) => n.index > eq) : undefined)?.value ?? first.value;
  }
  return null;
}

// A sentence ends at ".", "!" or "?" followed by white space or the end ("1.5" and "$1,234.50" go on).
const SENTENCE_END_RE = /[.!?](?=\s|$)/u;

/** Strict: the number right after the last `####` that is directly followed by one. */
function strictHash(text: string): Rational | null {
  let last: Rational | null = null;
  for (const m of text.matchAll(STRICT_HASH_RE)) {
    last = tokenValue(m.groups!.sign, m.groups!.body!) ?? last;
  }
  return last;
}

/** The value after the last marker match (of re, in plain text) that yields one. */
function afterLastMarker(plain: string, re: RegExp, noLetterFirst: boolean): Rational | null {
  const ends = [...plain.matchAll(re)].map((m) => m.index + m[0].length);
  for (let i = ends.length - 1; i >= Math.max(0, ends.length - MAX_TRIES); i--) {
    const v = answerLineValue(plain, ends[i]!, noLetterFirst);
    if (v) return v;
  }
  return null;
}

const HASH_RE = /####/g;
// "Final Answer:", "The final answer is", "**Final Answer**:", "## Final Answer" ending its line; not the words
// in passing ("to get the final answer, we …").
const FINAL_RE = new RegExp(
  String.raw`\bfinal\s+answer\b` +
    String.raw`(?:\s*\([^)\n]{0,40}\))?` + // "Final Answer (in dollars):"
    String.raw`(?:\s*,[^,\n]{0,30},)?` + // "The final answer, therefore, is"
    String.raw`[*_ \t]*` +
    String.raw`(?:[:=\u2014\u2013]|-(?=\s)|\bis\b|\bwas\b|\bwould\s+be\b|\bwill\s+be\b` +
    String.raw`|(?=\r?\n|$)` + // a heading on its own line
    String.raw`|(?<=[*_])(?=[ \t]*[$\d\\-]))`, // "**Final Answer** 42"
  "giu",
);
// "The answer is", "answer was", "Answer:", "**Answer**:".
const PHRASE_RE = /\banswer[*_\s]*(?:is\b|was\b|would\s+be\b|will\s+be\b|:|=)/giu;

/**
 * Contents of every `\boxed{…}` / `\fbox{…}` with balanced braces, ordered by
 * where they close (so a box around another comes after it), found in one
 * pass over the braces (raw text).
 */
function boxedContents(text: string): string[] {
  const closed: string[] = [];
  const open: { start: number; depth: number }[] = [];
  let depth = 0;
  for (const m of text.matchAll(/\\(?:boxed|fbox)\s*\{|[{}]/g)) {
    if (m[0] === "{") depth++;
    else if (m[0] === "}") {
      if (depth > 0) depth--;
      if (open.length > 0 && open[open.length - 1]!.depth === depth) {
        const o = open.pop()!;
        closed.push(text.slice(o.start, m.index));
      }
    } else {
      open.push({ start: m.index + m[0].length, depth });
      depth++;
    }
  }
  return closed;
}

/** The last number inside the last `\boxed{}` that holds one. */
function lastBoxed(text: string): Rational | null {
  const boxes = boxedContents(text);
  for (let i = boxes.length - 1; i >= Math.max(0, boxes.length - MAX_TRIES); i--) {
    const nums = numbers(plainText(boxes[i]!));
    if (nums.length > 0) return nums[nums.length - 1]!.value;
  }
  return null;
}

/**
 * The final answer of a completion (see the module doc for the modes, the
 * cascade and why the last marker wins).
 * @example
 * ```ts
 * import { extractAnswer } from "./answer.ts";
 * extractAnswer("3 + 4 = 7\n#### $1,234.50.");
 * // { value: "1234.5", method: "####", marker: true }
 * extractAnswer("So she has 5 apples.", { mode: "strict" });
 * // { value: null, method: null, marker: false }
 * ```
 */
export function extractAnswer(text: string, opts: ExtractOptions = {}): Extraction {
  if (typeof text !== "string") throw new TypeError(`extractAnswer: expected a string, got ${typeof text}`);
  const mode = opts.mode ?? "flexible";
  if (mode !== "strict" && mode !== "flexible") {
    throw new Error(`extractAnswer: mode must be "strict" or "flexible", got ${JSON.stringify(mode)}`);
  }
  if (mode === "strict") {
    const strict = strictHash(text);
    return strict ? found(strict, "####") : NONE;
  }
  // Flexible "####" accepts everything strict does (and markup before the number), so it runs alone here.
  const plain = plainText(text);
  const hash = afterLastMarker(plain, HASH_RE, true);
  if (hash) return found(hash, "####");
  const final = afterLastMarker(plain, FINAL_RE, false);
  if (final) return found(final, "final_answer");
  const boxed = lastBoxed(text);
  if (boxed) return found(boxed, "boxed");
  const phrase = afterLastMarker(plain, PHRASE_RE, false);
  if (phrase) return found(phrase, "answer_phrase");
  const all = numbers(plain);
  const last = all[all.length - 1];
  return last ? found(last.value, "last_number") : NONE;
}

/** How a completion's answer compares with a gold one, under both extraction modes. */
export interface AnswerVerdict {
  /** The `#### n` answer, or null. */
  extracted_strict: string | null;
  /** The flexible cascade's answer, or null. */
  extracted_flexible: string | null;
  /** Which extractor gave the flexible answer. */
  method_flexible: ExtractMethod | null;
  /** Strict answer equals gold. */
  correct_strict: boolean;
  /** Flexible answer equals gold. */
  correct_flexible: boolean;
}

/**
 * A completion judged against a gold answer (a canonical number string, e.g.
 * from {@link parseGold}), strict and flexible: what `deno task score`,
 * `deno task evaluate` and the training loop's evaluations report.
 */
export function judgeAnswer(completion: string, gold: string): AnswerVerdict {
  const strict = extractAnswer(completion, { mode: "strict" });
  const flexible = extractAnswer(completion, { mode: "flexible" });
  return {
    extracted_strict: strict.value,
    extracted_flexible: flexible.value,
    method_flexible: flexible.method,
    correct_strict: answersMatch(strict.value, gold),
    correct_flexible: answersMatch(flexible.value, gold),
  };
}
