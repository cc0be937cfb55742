/**
 * The metrics of a data-parallel update over all ranks: each rank measured
 * its own prompts; rank 0 logs the whole update's numbers (the learn phase's
 * are global already, rl/learn.ts).
 * @module
 */
import type { CollectMetrics } from "../rl/rollout_buffer.ts";
import type { EvalTotals } from "../rl/evaluate.ts";
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
  const completions = t.n * t.samples;
  const [n, strict, flexible, passS, passF, majS, majF, tokens, truncated] = dp.sum([
    t.n,
    t.correct_strict,
    t.correct_flexible,
    t.pass_at_k_strict * t.n,
    t.pass_at_k_flexible * t.n,
    t.maj_at_k_strict * t.n,
    t.maj_at_k_flexible * t.n,
    t.completion_tokens_mean * completions,
    t.truncated_fraction * completions,
  ]).map((x) => Math.round(x)) as number[];
  const seconds = dp.max([t.seconds])[0]!;
  const m = n! * t.samples;
  return {
    n: n!,
    samples: t.samples,
    correct_strict: strict!,
    correct_flexible: flexible!,
    accuracy_strict: m ? strict! / m : 0,
    accuracy_flexible: m ? flexible! / m : 0,
    pass_at_k_strict: n ? passS! / n : 0,
    pass_at_k_flexible: n ? passF! / n : 0,
    maj_at_k_strict: n ? majS! / n : 0,
    maj_at_k_flexible: n ? majF! / n : 0,
    completion_tokens_mean: m ? tokens! / m : 0,
    truncated_fraction: m ? truncated! / m : 0,
    seconds,
    tokens_per_second: tokens! / Math.max(seconds, 1e-9),
  };
}
