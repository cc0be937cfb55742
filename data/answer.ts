/**
 * Final answers of GSM8K-style completions: finding the number a completion
 * commits to, and comparing numbers exactly.
 *
 * Two extraction modes (the conventions of lm-evaluation-harness and verl, docs/rl-update.md "Reward"):
 *
 * - **strict**: only `#### <number>`, the number right after the marker
 *   (spaces and `$` allowed), as lm-evaluation-harness' and verl's
 *   strict-match regex `#### (\-?[0-9\.\,]+)`.
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
 * Numbers: commas between digits (`1,234`; dropped wherever they stand), `$`, a leading `-` or `−` (U+2212),
 * decimals (`.5`, `1234.50`), simple fractions (`3/4`, `\frac{3}{4}`), mixed
 * numbers (`1 1/2`); units, `%` and a trailing period are ignored. Every
 * number is normalised to one canonical string (see {@link normalizeNumber}),
 * so equal numbers give equal strings, and {@link answersMatch} compares them
 * as exact rationals (no floating-point tolerance).
 * @module
 */

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
// Numbers

/** An exact number: num/den, den > 0, reduced. */
interface Rational {
  num: bigint;
  den: bigint;
}

// Digits with commas between them, all dropped: "1,234" and, as lm-evaluation-harness and verl read it,
// "1,0000" → 10000 (so "3,4,5" reads as 345; a comma followed by a space separates numbers).
const UINT = String.raw`\d+(?:,\d+)*`;
const UDEC = String.raw`(?:${UINT}(?:\.\d+)?|\.\d+)`;
// Mixed number ("1 1/2", one space), fraction ("3/4", "1.5/2"), or decimal; longest first.
const BODY = String.raw`(?:\d+ \d+\/\d+(?![\d.\/])|${UDEC}\/${UDEC}|${UDEC})`;
const MINUS = "[-\u2212\uFF0D]";
// Not glued to a preceding letter or digit: the "2" of "x2" and the "19" of "COVID19" are not numbers.
const TOKEN = String.raw`(?<![\p{L}\p{N}_])(?:\\?\$\s?)?(?<sign>${MINUS}\s?)?(?:\\?\$\s?)?(?<body>${BODY})`;

const TOKEN_RE = new RegExp(TOKEN, "gu");
const WHOLE_NUMBER_RE = new RegExp(String.raw`^\s*${TOKEN}\s*%?\s*\.?\s*$`, "u");
const LEADING_NUMBER_RE = new RegExp(String.raw`^[ \t]*${TOKEN}`, "u");
const STRICT_HASH_RE = new RegExp(String.raw`####[ \t]*${TOKEN}`, "gu");

function gcd(a: bigint, b: bigint): bigint {
  a = a < 0n ? -a : a;
  b = b < 0n ? -b : b;
  while (b !== 0n) [a, b] = [b, a % b];
  return a;
}

function reduce(num: bigint, den: bigint): Rational | null {
  if (den === 0n) return null;
  if (den < 0n) [num, den] = [-num, -den];
  const g = gcd(num, den);
  return g > 1n ? { num: num / g, den: den / g } : { num, den };
}

/** "1,234.50" → 123450/100; "" or malformed → null. */
function decimal(s: string): Rational | null {
  const m = /^(\d*)(?:\.(\d+))?$/.exec(s.replaceAll(",", ""));
  if (!m || (m[1] === "" && m[2] === undefined)) return null;
  const frac = m[2] ?? "";
  return reduce(BigInt((m[1] || "0") + frac), 10n ** BigInt(frac.length));
}

function divide(a: Rational, b: Rational): Rational | null {
  return reduce(a.num * b.den, a.den * b.num);
}

/** The value of a TOKEN match's body with its sign. */
function tokenValue(sign: string | undefined, body: string): Rational | null {
  let r: Rational | null;
  const mixed = /^(\d+) (\d+)\/(\d+)$/.exec(body);
  if (mixed) {
    const frac = reduce(BigInt(mixed[2]!), BigInt(mixed[3]!));
    r = frac && reduce(BigInt(mixed[1]!) * frac.den + frac.num, frac.den);
  } else if (body.includes("/")) {
    const [a, b] = body.split("/").map(decimal);
    r = a && b ? divide(a, b) : null;
  } else {
    r = decimal(body);
  }
  if (r && sign) r = { num: -r.num, den: r.den };
  return r;
}

/**
 * The canonical string of a rational: a finite decimal without trailing zeros when there is one
 * ("0.75", "1234.5", "-3"), else the reduced fraction ("1/3"); zero is "0".
 */
function canonical(r: Rational): string {
  if (r.num === 0n) return "0";
  let twos = 0, fives = 0, d = r.den;
  while (d % 2n === 0n) [d, twos] = [d / 2n, twos + 1];
  while (d % 5n === 0n) [d, fives] = [d / 5n, fives + 1];
  const neg = r.num < 0n ? "-" : "";
  const abs = r.num < 0n ? -r.num : r.num;
  if (d !== 1n) return `${neg}${abs}/${r.den}`;
  const k = Math.max(twos, fives);
  const scaled = (abs * 10n ** BigInt(k) / r.den).toString().padStart(k + 1, "0");
  const int = scaled.slice(0, scaled.length - k), frac = scaled.slice(scaled.length - k);
  return k === 0 ? `${neg}${int}` : `${neg}${int}.${frac}`;
}

/** A JS number as a decimal string without exponent notation, or null when not finite. */
function numberText(n: number): string | null {
  if (!Number.isFinite(n)) return null;
  if (Number.isInteger(n)) return BigInt(n).toString();
  const s = String(n);
  return s.includes("e") ? n.toFixed(20) : s;
}

/**
 * Rewrites the LaTeX and markup a model wraps numbers in into plain text:
 * `\frac{3}{4}` → `3/4`, `1{,}000` → `1,000`, `\$` → `$`, other commands → a space
 * (so `\boxed{17}` scans as `{17}`).
 */
export function plainText(text: string): string {
  const NUM = String.raw`\s*(${MINUS}?\s*[\d.,]+)\s*`;
  return text
    .replace(new RegExp(String.raw`\\[dt]?frac\s*\{${NUM}\}\s*\{${NUM}\}`, "gu"), "$1/$2")
    .replaceAll("{,}", ",")
    .replace(/\\[,!;:]/g, "")
    .replace(/\\([$%])/g, "$1")
    .replace(/\\[A-Za-z]+/g, " ");
}

/** Every number token of plain text, in order, as rationals with their spans. */
function numbers(text: string): { value: Rational; index: number; end: number }[] {
  const out: { value: Rational; index: number; end: number }[] = [];
  for (const m of text.matchAll(TOKEN_RE)) {
    const value = tokenValue(m.groups!.sign, m.groups!.body!);
    if (value) out.push({ value, index: m.index, end: m.index + m[0].length });
  }
  return out;
}

/**
 * The canonical string of the first number in raw (after {@link plainText}):
 * no `$`, commas, units or trailing period; `-` for any minus sign; no trailing
 * zeros after the point; a fraction whose value is a finite decimal becomes
 * that decimal ("3/4" → "0.75"), others are reduced ("2/6" → "1/3").
 * A JS number is taken as is. Null when there is no number.
 * @example
 * ```ts
 * import { normalizeNumber } from "./answer.ts";
 * normalizeNumber("$1,234.50."); // "1234.5"
 * normalizeNumber("\\frac{3}{4}"); // "0.75"
 * ```
 */
export function normalizeNumber(raw: string | number): string | null {
  const r = rational(raw);
  return r ? canonical(r) : null;
}

function rational(raw: string | number): Rational | null {
  const text = typeof raw === "number" ? numberText(raw) : plainText(raw);
  if (text === null) return null;
  return numbers(text)[0]?.value ?? null;
}

/**
 * A gold answer as a canonical number string: a number; a string that is one
 * number (optionally with `$`, commas, `%` or a trailing period, e.g. "1,000");
 * or a GSM8K solution, whose last `#### ` must be followed by such a number,
 * whole ("#### 5 apples" is 5; "#### 1e400" and "#### 1.5.6" are no number).
 * Null when it is none of these.
 */
export function parseGold(gold: string | number): string | null {
  if (typeof gold === "number") return normalizeNumber(gold);
  if (typeof gold !== "string") return null;
  let m: RegExpExecArray | null;
  if (gold.includes("####")) {
    // The last marker is the answer; one without a number makes the gold malformed, not an earlier one right.
    const tail = gold.slice(gold.lastIndexOf("####") + 4);
    m = LEADING_NUMBER_RE.exec(tail);
    // A number that goes on ("1e400", "1.5.6", "5x") would be read as its start: 1, 1.5, 5.
    if (m && /^(?:[.,]?\p{N}|[\p{L}_])/u.test(tail.slice(m[0].length))) m = null;
  } else m = WHOLE_NUMBER_RE.exec(gold);
  const r = m && tokenValue(m.groups!.sign, m.groups!.body!);
  return r ? canonical(r) : null;
}

/**
 * Whether two answers are the same number, compared exactly as rationals:
 * "1,000" = "1000" = "1000.0" = "$1000"; "3/4" = "0.75"; "−5" = "-5";
 * "5 dollars" = 5; "42." = "42". Each side's first number is compared
 * ({@link normalizeNumber}); false when either has none.
 */
export function answersMatch(pred: string | number | null, gold: string | number): boolean {
  if (pred === null) return false;
  const a = rational(pred), b = rational(gold);
  return a !== null && b !== null && a.num === b.num && a.den === b.den;
}

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
