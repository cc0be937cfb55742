/**
 * The GSM8K reward of one completion: a correctness score, a small bonus for
 * stating the answer behind an explicit marker (so the policy learns to give
 * an unambiguous final answer), and a small penalty for running over length
 * (so it learns to stop). Pure: no tensors, no I/O.
 *
 * reward = (correct ? cfg.correct : cfg.wrong)
 *        + (marker ? cfg.markerBonus : 0)
 *        − (overLength ? cfg.overLengthPenalty : 0)
 *
 * The bonus is paid whether or not the answer is right, like verl's
 * format_score: it rewards the format, correctness is paid separately. By
 * default only the design's markers earn it: `####`, `Final Answer` and
 * `\boxed` (data/answer.ts MARKER_METHODS); "The answer is" does not.
 * @module
 */
import type { FinishReason } from "../model/generate.ts";
import {
  anyNum,
  type Checks,
  checkSection,
  int,
  listOf,
  nullable,
  oneOf,
  throwProblems,
} from "../model/settings.ts";
import {
  EXTRACT_MODES,
  extractAnswer,
  type Extraction,
  type ExtractMethod,
  type ExtractMode,
  MARKER_METHODS,
} from "../data/answer.ts";
import { answersMatch, parseGold } from "../data/numbers.ts";

export type { FinishReason } from "../model/generate.ts";

/** The weights and rules of {@link reward}; every field is configurable. */
export interface RewardConfig {
  /** Reward of a correct answer (default 1.0). */
  correct: number;
  /** Reward of a wrong or missing answer (default 0.0). */
  wrong: number;
  /** Added when the answer came from one of {@link RewardConfig.markerMethods} (default 0.05). */
  markerBonus: number;
  /** Subtracted when the completion is over length ({@link isOverLength}; default 0.05). */
  overLengthPenalty: number;
  /**
   * A length limit below the generation cap, in completion tokens not counting a final EOS
   * token; null (the default) leaves only truncation ({@link isOverLength}).
   */
  maxCompletionTokens: number | null;
  /** How the answer is extracted for correctness and the bonus (default "flexible"). */
  mode: ExtractMode;
  /** Which explicit markers earn the bonus: some of {@link MARKER_METHODS} (default all of them). */
  markerMethods: readonly ExtractMethod[];
}

/** The defaults: 1.0 / 0.0, +0.05 marker bonus, −0.05 over length, flexible extraction. */
export const DEFAULT_REWARD_CONFIG: Readonly<RewardConfig> = Object.freeze({
  correct: 1.0,
  wrong: 0.0,
  markerBonus: 0.05,
  overLengthPenalty: 0.05,
  maxCompletionTokens: null,
  mode: "flexible",
  markerMethods: MARKER_METHODS,
});

/** One generated completion, as model/generate.ts's `generate` returns it per row. */
export interface Completion {
  /** The decoded text. */
  text: string;
  /** The generated token ids, including the EOS token when one was emitted. */
  tokens: readonly number[];
  /** Why generation stopped: "eos", a stop string ("stop"), or the token cap ("length"). */
  finishReason: FinishReason;
}

/** What {@link reward} returns. */
export interface RewardResult {
  /** The scalar reward. */
  reward: number;
  /** The extracted answer equals the gold one. */
  correct: boolean;
  /** The marker bonus was paid. */
  marker: boolean;
  /** The over-length penalty was charged. */
  overLength: boolean;
  /** The extraction the verdict rests on. */
  extracted: Extraction;
}

/**
 * What a score function returns (rl/collect.ts `ScoreFn`): the reward, and what it knows of the verdict. A
 * flag it leaves out counts as false in the rates (accuracy, marker_rate, overlong_rate), and a logged sample's
 * `correct` is then null.
 */
export type ScoreResult = Pick<RewardResult, "reward"> & Partial<Omit<RewardResult, "reward">>;

/** The check of every reward setting (model/settings.ts), shared with deno task train's `reward` section. */
export const REWARD_CHECKS: Checks<RewardConfig> = {
  correct: anyNum,
  wrong: anyNum,
  markerBonus: anyNum,
  overLengthPenalty: anyNum,
  maxCompletionTokens: nullable(int(1)),
  mode: oneOf(...EXTRACT_MODES),
  // Only an explicit marker sets extracted.marker: answer_phrase or last_number here could never earn it.
  markerMethods: listOf(MARKER_METHODS),
};

/**
 * The defaults with overrides applied, checked.
 * @throws {RangeError} naming every bad key ("reward.<key>: expected …, got …")
 */
export function rewardConfig(overrides: Partial<RewardConfig> = {}): RewardConfig {
  const cfg: RewardConfig = { ...DEFAULT_REWARD_CONFIG, ...overrides };
  throwProblems(checkSection("reward", cfg, REWARD_CHECKS));
  return cfg;
}

/**
 * Whether a completion is over length. Precisely: generation stopped at its
 * token cap (finishReason "length", i.e. no EOS and no stop string), or
 * maxCompletionTokens is set and the completion has more tokens than that,
 * not counting the final EOS token of a finishReason "eos" completion.
 */
export function isOverLength(completion: Completion, maxCompletionTokens: number | null): boolean {
  if (completion.finishReason === "length") return true;
  if (maxCompletionTokens === null) return false;
  const content = completion.tokens.length - (completion.finishReason === "eos" ? 1 : 0);
  return content > maxCompletionTokens;
}

/**
 * The reward of a completion against the gold answer (see the module doc).
 * @param gold the gold answer: a number, a number string ("1,000"), or a GSM8K solution ending in `#### n`
 * @param cfg overrides of {@link DEFAULT_REWARD_CONFIG}
 * @throws {Error} when gold is not a number (a data error: scoring it as wrong would hide it), or for a bad
 *   config ({@link rewardConfig})
 * @example
 * ```ts
 * import { reward } from "./reward.ts";
 * const r = reward({ text: "6 * 7 = 42\n#### 42", tokens: [1, 2, 0], finishReason: "eos" }, "42");
 * // r.reward === 1.05, r.correct, r.marker, !r.overLength
 * ```
 */
export function reward(
  completion: Completion,
  gold: string | number,
  cfg: Partial<RewardConfig> = {},
): RewardResult {
  const c = rewardConfig(cfg);
  const goldValue = parseGold(gold);
  if (goldValue === null) {
    throw new Error(`reward: the gold answer ${JSON.stringify(gold)} is not a number`);
  }
  const extracted = extractAnswer(completion.text, { mode: c.mode });
  const correct = answersMatch(extracted.value, goldValue);
  const marker = extracted.marker && extracted.method !== null && c.markerMethods.includes(extracted.method);
  const overLength = isOverLength(completion, c.maxCompletionTokens);
  const value = (correct ? c.correct : c.wrong) + (marker ? c.markerBonus : 0) -
    (overLength ? c.overLengthPenalty : 0);
  return { reward: value, correct, marker, overLength, extracted };
}
