/**
 * The RL side: the policy (LoRA-adapted model + critic), rewards for GSM8K,
 * the settings of an update, its collect and learn phases, the advantage and
 * loss functions they are built from, and greedy GSM8K evaluation.
 * @module
 */
export {
  DEFAULT_HEAD_CHUNK,
  type PassOptions,
  Policy,
  type PolicyOptions,
  type PolicyOutput,
  type ReferenceOutput,
  type SequenceBatch,
} from "./policy.ts";
export {
  type Completion,
  DEFAULT_REWARD_CONFIG,
  isOverLength,
  reward,
  type RewardConfig,
  rewardConfig,
  type RewardResult,
  type ScoreResult,
} from "./reward.ts";
export {
  DEFAULT_RL_CONFIG,
  type MoeRoutingConfig,
  type PpoConfig,
  type RlConfig,
  rlConfig,
  type RlOverrides,
  type RolloutConfig,
} from "./config.ts";
export {
  ADVANTAGE_ESTIMATORS,
  type AdvantageEstimator,
  batchScaledAdvantages,
  flatGroups,
  groupBaseline,
  groupScaledAdvantages,
  tokenAdvantages,
  type UpdateAdvantages,
  updateAdvantages,
  zeroSpreadFraction,
} from "./advantages.ts";
export {
  type AggregationCounts,
  type ClipOptions,
  entropyBonus,
  type KlEstimator,
  klPenalty,
  type KlResult,
  LOSS_AGGREGATIONS,
  type LossAggregation,
  lossWeights,
  maskedMean,
  ppoClippedLoss,
  type PpoLossResult,
  RATIO_LEVELS,
  type RatioLevel,
  routerAuxLoss,
  valueLoss,
  weightedSum,
} from "./losses.ts";
export { collect, type CollectOptions, type RolloutTokenizer, type ScoreFn } from "./collect.ts";
export {
  type CollectMetrics,
  type CollectTimings,
  RolloutBuffer,
  type RolloutPrompt,
  type RolloutSequence,
  type Sample,
  sequenceBatch,
} from "./rollout_buffer.ts";
export {
  OBJECTIVE_PARTS,
  type ObjectiveConfig,
  type ObjectiveInputs,
  type ObjectivePart,
  type ObjectiveResult,
  ppoObjective,
  rolloutWeights,
} from "./objective.ts";
export {
  DEFAULT_MAX_GRAD_NORM,
  learn,
  type LearnMetrics,
  type LearnOptions,
  type StepOptimizer,
} from "./learn.ts";
export { isLossScaleState, LossScaler, type LossScalerOptions, type LossScaleState } from "./loss_scale.ts";
export { type AdvantagesFn, type LearnFunctions, type ObjectiveFn, type ValueLossFn } from "./replaceable.ts";
export {
  DEFAULT_POLICY_OPTIMIZER,
  policyOptimizer,
  type PolicyOptimizerOptions,
  type PpoMetrics,
  ppoStep,
  type PpoStepOptions,
  type PpoStepResult,
} from "./ppo.ts";
export {
  type EvalCounts,
  type EvalSampling,
  type EvalTokenizer,
  type EvalTotals,
  evalTotals,
  evalTotalsFromCounts,
  evaluateExamples,
  type EvaluateOptions,
  type Prediction,
} from "./evaluate.ts";
export { Replicas } from "./replicas.ts";
