/**
 * moerl: PPO-style RL fine-tuning of Mixture-of-Experts language models on
 * GSM8K, in Deno, on libtorch through a thin C shim.
 *
 * This module holds the names a user starts from; the rest is in the
 * subpath modules: `@moerl/moerl/ffi` (tensors, scopes, autograd, AdamW,
 * CUDA), `/model` (checkpoints, configs, tokenizers, generation, LoRA, NF4,
 * PEFT adapters), `/data` (GSM8K, answers, prompts, batches), `/rl` (policy,
 * rewards, collect, learn, advantages, losses), `/train` (the training job)
 * and `/eval` (evaluation and scoring).
 *
 * @example
 * ```ts ignore
 * import { buildPrompts, DEFAULT_LORA, loadGsm8k, loadModel, Policy, policyOptimizer, ppoStep, Tokenizer }
 *   from "jsr:@moerl/moerl";
 * using model = await loadModel("huihui-ai/Huihui-MoE-1B-A0.6B-SFT", { dtype: "bfloat16", device: "cuda" });
 * const tok = await Tokenizer.load(model.dir);
 * // A prompt is token ids and a gold answer, not text.
 * const { examples } = await loadGsm8k("openai/gsm8k", { limit: 8 });
 * const rendered = await buildPrompts(tok, examples.map((e) => e.question));
 * const prompts = rendered.map((p, i) => ({ ...p, answer: examples[i]!.answer }));
 * const policy = new Policy(model, { lora: DEFAULT_LORA });
 * using opt = policyOptimizer(policy);
 * const { metrics } = await ppoStep(policy, opt, tok, prompts, { rollout: { k: 4 } });
 * ```
 * @module
 */

// Tensors and native memory.
export {
  AdamW,
  cuda,
  type Device,
  dispose,
  type DType,
  Generator,
  keep,
  liveTensors,
  manualSeed,
  nativeLiveCount,
  noGrad,
  Tensor,
  tensor,
  tidy,
  tidyAsync,
  TorchError,
  useAvailableCores,
} from "./ffi/mod.ts";

// Models.
export {
  type CausalLM,
  DEFAULT_LORA,
  generate,
  type GenerateOptions,
  type GenerateResult,
  loadModel,
  loadPeftAdapter,
  type LoraConfig,
  quantizeModel,
  savePeftAdapter,
  Tokenizer,
} from "./model/mod.ts";

// The task.
export { buildPrompts, extractAnswer, type Gsm8kExample, judgeAnswer, loadGsm8k } from "./data/mod.ts";

// The RL update and its pieces.
export {
  type AdvantagesFn,
  batchScaledAdvantages,
  collect,
  type CollectOptions,
  type Completion,
  DEFAULT_RL_CONFIG,
  entropyBonus,
  evaluateExamples,
  groupBaseline,
  groupScaledAdvantages,
  type KlEstimator,
  klPenalty,
  learn,
  type LearnMetrics,
  type LearnOptions,
  maskedMean,
  OBJECTIVE_PARTS,
  type ObjectiveFn,
  type ObjectiveInputs,
  type ObjectiveResult,
  Policy,
  policyOptimizer,
  type PolicyOptions,
  type PolicyOutput,
  ppoClippedLoss,
  type PpoMetrics,
  ppoObjective,
  ppoStep,
  type PpoStepOptions,
  reward,
  type RewardResult,
  type RlConfig,
  rlConfig,
  type RlOverrides,
  RolloutBuffer,
  type RolloutPrompt,
  type RolloutSequence,
  type ScoreFn,
  type ScoreResult,
  type SequenceBatch,
  type UpdateAdvantages,
  updateAdvantages,
  valueLoss,
  type ValueLossFn,
} from "./rl/mod.ts";

// The training job and evaluation.
export { loadTrainConfig, train, type TrainConfig } from "./train/mod.ts";
export { type EvalSummary, runEvaluation } from "./eval/mod.ts";
