/**
 * Numbers in GSM8K answers, read exactly: a number token's value as a
 * reduced rational, its one canonical string, gold answers, and comparison
 * (data/answer.ts extracts the answer a completion commits to).
 *
 * Numbers: commas between digits (`1,234`; dropped wherever they stand), `$`, a leading `-` or `−` (U+2212),
 * decimals (`.5`, `1234.50`), exponents (`1e3`, `2.5E-2`; past ±100 no number), simple fractions (`3/4`, `\frac{3}{4}`), mixed
 * numbers (`1 1/2`); units, `%` and a trailing period are ignored. Every
 * number is normalised to one canonical string (see {@link normalizeNumber}),
 * so equal numbers give equal strings, and {@link answersMatch} compares them
 * as exact rationals (no floating-point tolerance).
 * @module
 */

/** An exact number: num/den, den > 0, reduced. */
export interface Rational {
  num: bigint;
  den: bigint;
}

// Digits with commas between them, all dropped: "1,234" and, as lm-evaluation-harness and verl read it,
// "1,0000" → 10000 (so "3,4,5" reads as 345; a comma followed by a space separates numbers).
const UINT = String.raw`\d+(?:,\d+)*`;
const UDEC = String.raw`(?:${UINT}(?:\.\d+)?|\.\d+)`;
// Mixed number ("1 1/2", one space), fraction ("3/4", "1.5/2"), or decimal with an optional exponent
// ("1e3", "2.5E-2": read exactly, so "1e3" is 1000, not the 1 a unit rule would give); longest first.
const BODY = String.raw`(?:\d+ \d+\/\d+(?![\d.\/])|${UDEC}\/${UDEC}|${UDEC}(?:[eE][-+]?\d+)?)`;
// An exponent past this reads as no number: 10^k must stay a small exact integer.
const MAX_EXPONENT = 100;
const MINUS = "[-\u2212\uFF0D]";
// Not glued to a preceding letter or digit: the "2" of "x2" and the "19" of "COVID19" are not numbers.
const TOKEN = String.raw`(?<![\p{L}\p{N}_])(?:\\?\$\s?)?(?<sign>${MINUS}\s?)?(?:\\?\$\s?)?(?<body>${BODY})`;

const TOKEN_RE = new RegExp(TOKEN, "gu");
const WHOLE_NUMBER_RE = new RegExp(String.raw`^\s*${TOKEN}\s*%?\s*\.?\s*$`, "u");
const LEADING_NUMBER_RE = new RegExp(String.raw`^[ \t]*${TOKEN}`, "u");
export const STRICT_HASH_RE = new RegExp(String.raw`####[ \t]*${TOKEN}`, "gu");

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

/** r × 10^k, or null when |k| > {@link MAX_EXPONENT}. */
function scaled(r: Rational, k: number): Rational | null {
  if (Math.abs(k) > MAX_EXPONENT) return null;
  const p = 10n ** BigInt(Math.abs(k));
  return k >= 0 ? reduce(r.num * p, r.den) : reduce(r.num, r.den * p);
}

/** The value of a TOKEN match's body with its sign. */
export function tokenValue(sign: string | undefined, body: string): Rational | null {
  let r: Rational | null;
  const mixed = /^(\d+) (\d+)\/(\d+)$/.exec(body);
  if (mixed) {
    const frac = reduce(BigInt(mixed[2]!), BigInt(mixed[3]!));
    r = frac && reduce(BigInt(mixed[1]!) * frac.den + frac.num, frac.den);
  } else if (body.includes("/")) {
    const [a, b] = body.split("/").map(decimal);
    r = a && b ? divide(a, b) : null;
  } else {
    const [mantissa, exponent] = body.split(/[eE]/);
    r = decimal(mantissa!);
    if (r && exponent !== undefined) r = scaled(r, Number(exponent));
  }
  if (r && sign) r = { num: -r.num, den: r.den };
  return r;
}

/**
 * The canonical string of a rational: a finite decimal without trailing zeros when there is one
 * ("0.75", "1234.5", "-3"), else the reduced fraction ("1/3"); zero is "0".
 */
export function canonical(r: Rational): string {
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
export function numbers(text: string): { value: Rational; index: number; end: number }[] {
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
 * import { normalizeNumber } from "./numbers.ts";
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
    // A number that goes on ("1.5.6", "5x", "1e3e4") would be read as its start: 1.5, 5, 1000.
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
