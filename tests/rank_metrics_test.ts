/**
 * The metrics of a data-parallel update over its ranks (train/rank_metrics.ts):
 * combined from two ranks' own numbers as one process holding all their
 * sequences (or problems) would compute them.
 */
import assert from "node:assert/strict";
import type { CollectMetrics } from "../rl/rollout_buffer.ts";
import type { EvalTotals } from "../rl/evaluate.ts";
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

Deno.test("rank metrics: evaluation totals of two ranks' problems", () => {
  const totals = (
    n: number,
    strict: number,
    flexible: number,
    meanLen: number,
    truncated: number,
  ): EvalTotals => ({
    n,
    correct_strict: strict,
    correct_flexible: flexible,
    accuracy_strict: strict / n,
    accuracy_flexible: flexible / n,
    completion_tokens_mean: meanLen,
    truncated_fraction: truncated / n,
    seconds: 2,
    tokens_per_second: (meanLen * n) / 2,
  });
  const mine = totals(5, 2, 3, 10, 1), theirs = totals(4, 1, 4, 20, 2);
  const peer = [[4, 1, 4, 80, 2], [4]];
  const got = evalTotalsOverRanks(mine, new PeerOf(peer));
  assert.deepEqual([got.n, got.correct_strict, got.correct_flexible], [9, 3, 7]);
  assertClose([got.accuracy_strict, got.accuracy_flexible], [3 / 9, 7 / 9], 1e-12);
  assertClose([got.completion_tokens_mean, got.truncated_fraction], [130 / 9, 3 / 9], 1e-12);
  assert.equal(got.seconds, 4);
  assert.equal(theirs.n, 4);
});
