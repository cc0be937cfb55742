/**
 * The metrics of a data-parallel update over its ranks (train/rank_metrics.ts):
 * combined from two ranks' own numbers as one process holding all their
 * sequences (or problems) would compute them.
 */
import assert from "node:assert/strict";
import type { CollectMetrics } from "../rl/rollout_buffer.ts";
import { evalTotals, type Prediction } from "../rl/evaluate.ts";
import { Replicas } from "../rl/replicas.ts";
import { collectMetricsOverRanks, evalTotalsOverRanks } from "../train/rank_metrics.ts";
import { assertClose } from "./util.ts";

/** Rank 0 of two, whose peer's reductions are played by a queue of its inputs. */
class PeerOf extends Replicas {
  constructor(private readonly peer: number[][]) {
    super(null);
  }
  override get size(): number {
    return 2;
  }
  override sum(xs: readonly number[]): number[] {
    const other = this.peer.shift()!;
    return xs.map((x, i) => x + other[i]!);
  }
  override max(xs: readonly number[]): number[] {
    const other = this.peer.shift()!;
    return xs.map((x, i) => Math.max(x, other[i]!));
  }
}

/** What collect() reports for these rewards, correctness flags and lengths, over prefill/decode seconds. */
function metrics(
  rewards: number[],
  correct: boolean[],
  lengths: number[],
  prefill: number,
  decode: number,
): CollectMetrics {
  const n = rewards.length, mean = rewards.reduce((a, b) => a + b, 0) / n;
  const tokens = lengths.reduce((a, b) => a + b, 0);
  return {
    reward_mean: mean,
    reward_std: Math.sqrt(rewards.reduce((s, r) => s + (r - mean) ** 2, 0) / n),
    accuracy: correct.filter(Boolean).length / n,
    marker_rate: 0.25,
    overlong_rate: 0.5,
    truncated_fraction: 0.25,
    completion_len_mean: tokens / n,
    tokens_generated: tokens,
    prefill_seconds: prefill,
    decode_seconds: decode,
    scoring_seconds: 0.1,
    tokens_per_second: tokens / (prefill + decode),
  };
}

Deno.test("rank metrics: collect metrics of two ranks equal those of all their sequences", () => {
  const a = { r: [1, 0, 0.05, 1.05], c: [true, false, false, true], l: [3, 5, 7, 9] };
  const b = { r: [0, 0, -0.05, 1], c: [false, false, false, true], l: [2, 2, 16, 4] };
  const mine = metrics(a.r, a.c, a.l, 0.5, 2);
  const theirs = metrics(b.r, b.c, b.l, 0.25, 3);
  const peer = [
    // The peer's sums: sequences, rewards, squares, correct, marker, over-length, truncated (3 of 4), tokens.
    [4, theirs.reward_mean * 4, (theirs.reward_std ** 2 + theirs.reward_mean ** 2) * 4, 1, 1, 2, 3, 24],
    [0.25, 3, 0.1, 3.25],
  ];
  const got = collectMetricsOverRanks(mine, 4, new PeerOf(peer));
  const all = metrics([...a.r, ...b.r], [...a.c, ...b.c], [...a.l, ...b.l], 0.5, 3);
  assertClose([got.reward_mean, got.reward_std, got.accuracy], [
    all.reward_mean,
    all.reward_std,
    all.accuracy,
  ], 1e-12);
  assert.equal(got.tokens_generated, 48);
  assert.equal(got.truncated_fraction, (1 + 3) / 8);
  assert.equal(got.completion_len_mean, 6);
  assert.deepEqual([got.prefill_seconds, got.decode_seconds], [0.5, 3], "seconds: the slowest rank's");
  assertClose([got.tokens_per_second], [48 / 3.25], 1e-12);
});

/** Rank 1's side of the reductions: records what it contributes (and answers with its own numbers). */
class Contributions extends Replicas {
  readonly seen: number[][] = [];
  constructor() {
    super(null);
  }
  override get size(): number {
    return 2;
  }
  override sum(xs: readonly number[]): number[] {
    this.seen.push([...xs]);
    return [...xs];
  }
  override max(xs: readonly number[]): number[] {
    return this.sum(xs);
  }
}

/** A judged completion: its strict and flexible answers against gold "7". */
function judged(
  id: string,
  sample: number,
  strict: string | null,
  flexible: string | null,
  tokens: number,
): Prediction {
  return {
    id,
    sample,
    question: "q",
    answer_gold: "7",
    completion: "c",
    completion_tokens: tokens,
    finish_reason: tokens >= 30 ? "length" : "stop",
    extracted_strict: strict,
    extracted_flexible: flexible,
    method_flexible: flexible === null ? null : "last_number",
    correct_strict: strict === "7",
    correct_flexible: flexible === "7",
  };
}

Deno.test("rank metrics: evaluation totals of two ranks' problems, sampled, equal those of all problems", () => {
  // Three samples per problem; ranks hold problems 0, 2, 4 and 1, 3 (train/model.ts rankShare).
  const problems: Prediction[][] = [
    [judged("p0", 0, "7", "7", 10), judged("p0", 1, "3", "3", 12), judged("p0", 2, "3", "3", 30)], // maj wrong
    [judged("p1", 0, null, "7", 8), judged("p1", 1, null, "7", 9), judged("p1", 2, "5", "5", 30)], // strict none
    [judged("p2", 0, "7", "7", 11), judged("p2", 1, "7", "7", 11), judged("p2", 2, "1", "1", 11)],
    [judged("p3", 0, "2", "2", 5), judged("p3", 1, "4", "4", 6), judged("p3", 2, "7", "7", 7)], // a tie: first
    [judged("p4", 0, null, null, 30), judged("p4", 1, null, null, 30), judged("p4", 2, null, null, 30)],
  ];
  const share = (r: number): Prediction[] => problems.filter((_, i) => i % 2 === r).flat();
  const mine = evalTotals(share(0), 3, 2), theirs = evalTotals(share(1), 3, 5);
  const peer = new Contributions();
  evalTotalsOverRanks(theirs, peer);
  const got = evalTotalsOverRanks(mine, new PeerOf(peer.seen));
  const want = evalTotals(problems.flat(), 3, 5);
  assert.deepEqual(got, { ...want, tokens_per_second: got.tokens_per_second });
  assertClose([got.tokens_per_second], [want.tokens_per_second], 1e-12);
  // The numbers themselves, counted by hand.
  assert.deepEqual([got.n, got.samples, got.correct_strict, got.correct_flexible], [5, 3, 4, 6]);
  assertClose([got.pass_at_k_strict, got.pass_at_k_flexible, got.maj_at_k_strict, got.maj_at_k_flexible], [
    3 / 5,
    4 / 5,
    1 / 5,
    2 / 5,
  ], 1e-12);
  assertClose([got.accuracy_strict, got.truncated_fraction], [4 / 15, 5 / 15], 1e-12);
});
