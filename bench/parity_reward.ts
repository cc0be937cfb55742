/**
 * The benches' reward: the parity of the sum of a completion's token ids.
 * Random weights earn no GSM8K reward; this one has spread within every
 * group, so every backward pass runs. bench/rl.py computes the same.
 * @module
 */
import type { RewardResult } from "../rl/reward.ts";

/** 1 when the token ids sum to an odd number, else 0. */
export function parityReward(c: { tokens: readonly number[] }): RewardResult {
  const r = c.tokens.reduce((s, t) => s + t, 0) % 2;
  return {
    reward: r,
    correct: r === 1,
    marker: false,
    overLength: false,
    extracted: { value: null, method: null, marker: false },
  };
}
