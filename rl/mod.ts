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
export { advantages, groupBaseline, zeroSpreadFraction } from "./advantages.ts";
export {
  entropyBonus,
  type KlEstimator,
  klPenalty,
  type KlResult,
  maskedMean,
  ppoClippedLoss,
  type PpoLossResult,
  routerAuxLoss,
  valueLoss,
} from "./losses.ts";
export {
  type Rollout,
  rollout,
  type RolloutCompletion,
  type RolloutConfig,
  type RolloutPrompt,
  type RolloutTokenizer,
  sequenceBatch,
  specialIds,
} from "./rollout.ts";
export {
  OBJECTIVE_PARTS,
  type ObjectiveConfig,
  type ObjectiveInputs,
  type ObjectivePart,
  type ObjectiveResult,
  type PolicyOutputWithRouter,
  ppoObjective,
} from "./objective.ts";
export {
  DEFAULT_PPO_CONFIG,
  type PpoConfig,
  ppoConfig,
  type PpoMetrics,
  type PpoSample,
  ppoStep,
  type PpoStepOptions,
  type PpoStepResult,
  ppoUpdate,
  type PpoUpdateOptions,
} from "./ppo.ts";
