/**
 * A small arithmetic task in GSM8K's format ("What is 3 + 5?" with a solution
 * ending in "#### 8"), for proving on a CPU that the training pipeline learns:
 * a tiny model is warmed up on part of it and RL-trained, and accuracy is
 * measured on held-out problems it never saw.
 * @module
 */
import { mulberry32, shuffleInPlace } from "./batches.ts";
import type { Gsm8kExample } from "./gsm8k.ts";

/** Which problems exist. */
export interface ArithmeticOptions {
  /** Operands range over 0..maxOperand (default 9). */
  maxOperand?: number;
  /** Operators (default ["+"]); "-" keeps results non-negative by ordering the operands. */
  ops?: ("+" | "-")[];
  /**
   * Fraction of solutions that end "The answer is n." instead of "#### n"
   * (default 0), chosen per problem: a warm-up on such data leaves a format
   * habit that strict (####) scoring punishes and RL can fix.
   */
  plainAnswerFraction?: number;
}

/** Every problem of the task, in a fixed order. */
export function arithmeticProblems(opts: ArithmeticOptions = {}): Gsm8kExample[] {
  const max = opts.maxOperand ?? 9, ops = opts.ops ?? ["+"];
  const out: Gsm8kExample[] = [];
  for (const op of ops) {
    for (let a = 0; a <= max; a++) {
      for (let b = 0; b <= max; b++) {
        const [x, y] = op === "-" && a < b ? [b, a] : [a, b];
        const value = op === "+" ? x + y : x - y;
        const plain =
          ((x * 31 + y * 17 + (op === "-" ? 7 : 0)) % 100) / 100 < (opts.plainAnswerFraction ?? 0);
        out.push({
          id: `${x}${op}${y}`,
          question: `What is ${x} ${op} ${y}?`,
          solution: `${x} ${op} ${y} = ${value}\n${plain ? `The answer is ${value}.` : `#### ${value}`}`,
          answer: String(value),
          answerValue: value,
        });
      }
    }
  }
  return [...new Map(out.map((e) => [e.id, e])).values()]; // "-" can repeat a problem
}

/** A seeded split of the problems into disjoint train and held-out sets. */
export function arithmeticSplit(
  heldOutFraction: number,
  seed: number,
  opts: ArithmeticOptions = {},
): { train: Gsm8kExample[]; heldOut: Gsm8kExample[] } {
  const all = shuffleInPlace(arithmeticProblems(opts), mulberry32(seed));
  const n = Math.round(all.length * heldOutFraction);
  return { heldOut: all.slice(0, n), train: all.slice(n) };
}
