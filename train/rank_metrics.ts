/**
 * The metrics of a data-parallel update over all ranks: each rank measured
 * its own prompts; rank 0 logs the whole update's numbers (the learn phase's
 * are global already, rl/learn.ts).
 * @module
 */
import type { CollectMetrics } from "../rl/rollout_buffer.ts";
import { type EvalTotals, evalTotalsFromCounts } from "../rl/evaluate.ts";
import type { Replicas } from "../rl/replicas.ts";

/** The collect metrics of every rank's sequences: means weighted by sequences, seconds the slowest rank's. */
export function collectMetricsOverRanks(m: CollectMetrics, sequences: number, dp: Replicas): CollectMetrics {
  if (dp.size === 1) return m;
  const n = sequences;
  const second = m.reward_std ** 2 + m.reward_mean ** 2;
  const [total, rewardSum, secondSum, acc, marker, overlong, truncated, tokens] = dp.sum([
    n,
    m.reward_mean * n,
    second * n,
    m.accuracy * n,
    m.marker_rate * n,
    m.overlong_rate * n,
    m.truncated_fraction * n,
    m.tokens_generated,
  ]) as number[];
  const [prefill, decode, scoring, generating] = dp.max([
    m.prefill_seconds,
    m.decode_seconds,
    m.scoring_seconds,
    m.prefill_seconds + m.decode_seconds,
  ]) as number[];
  const mean = rewardSum! / total!;
  return {
    reward_mean: mean,
    reward_std: Math.sqrt(Math.max(0, secondSum! / total! - mean * mean)),
    accuracy: acc! / total!,
    marker_rate: marker! / total!,
    overlong_rate: overlong! / total!,
    truncated_fraction: truncated! / total!,
    completion_len_mean: tokens! / total!,
    tokens_generated: tokens!,
    prefill_seconds: prefill!,
    decode_seconds: decode!,
    scoring_seconds: scoring!,
    tokens_per_second: tokens! / Math.max(generating!, 1e-9),
  };
}

/** Evaluation totals over every rank's share of the problems (each rank's problems with all their samples). */
export function evalTotalsOverRanks(t: EvalTotals, dp: Replicas): EvalTotals {
  if (dp.size === 1) return t;
  // Back to counts (the fractions times what they are fractions of), summed over the ranks.
  const m = t.n * t.samples;
  const mine = [
    t.n,
    t.correct_strict,
    t.correct_flexible,
    t.pass_at_k_strict * t.n,
    t.pass_at_k_flexible * t.n,
    t.maj_at_k_strict * t.n,
    t.maj_at_k_flexible * t.n,
    t.completion_tokens_mean * m,
    t.truncated_fraction * m,
  ];
  const [
    n,
    correctStrict,
    correctFlexible,
    passStrict,
    passFlexible,
    majStrict,
    majFlexible,
    tokens,
    truncated,
  ] = dp.sum(mine).map((x) => Math.round(x)) as number[];
  return evalTotalsFromCounts({
    n: n!,
    samples: t.samples,
    correctStrict: correctStrict!,
    correctFlexible: correctFlexible!,
    passStrict: passStrict!,
    passFlexible: passFlexible!,
    majStrict: majStrict!,
    majFlexible: majFlexible!,
    tokens: tokens!,
    truncated: truncated!,
  }, dp.max([t.seconds])[0]!);
}
