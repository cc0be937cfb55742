/**
 * The RL side: the policy (LoRA-adapted model + value head), answer
 * extraction and rewards for GSM8K, and (as they land) advantages, losses
 * and the PPO step.
 * @module
 */
export {
  Policy,
  type PolicyOptions,
  type PolicyOutput,
  type SequenceBatch,
  sequenceValues,
} from "./policy.ts";
export {
  answersMatch,
  extractAnswer,
  type Extraction,
  type ExtractMethod,
  type ExtractMode,
  type ExtractOptions,
  MARKER_METHODS,
  normalizeNumber,
  parseGold,
  plainText,
} from "./answer.ts";
export {
  type Completion,
  DEFAULT_REWARD_CONFIG,
  isOverLength,
  reward,
  type RewardConfig,
  rewardConfig,
  type RewardResult,
} from "./reward.ts";
