/**
 * What a training config sets up, read one way for `deno task train` and
 * `deno task evaluate` alike: the model (dtype, device, NF4 base), the policy
 * and optimizer over it, how its data is read and prompted, and how it is
 * evaluated.
 * @module
 */
import {
  type Gsm8kData,
  type Gsm8kSplit,
  loadGsm8k,
  type LoadGsm8kOptions,
  sameProblems,
  splitContradiction,
} from "../data/gsm8k.ts";
import type { PromptOptions } from "../data/prompt.ts";
import type { AdamW } from "../ffi/mod.ts";
import { type CausalLM, loadModel, missingCudaDevice } from "../model/model.ts";
import { quantizeModel } from "../model/nf4.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import type { EvaluateOptions } from "../rl/evaluate.ts";
import type { Replicas } from "../rl/replicas.ts";
import type { DeepReadonly, ModelSettings, TrainConfig } from "./config.ts";

/**
 * Loads cfg.id (Hub id or folder) in cfg.dtype on cfg.device with cfg.attention, and quantises its base to
 * NF4 when asked.
 */
export async function loadConfiguredModel(cfg: DeepReadonly<ModelSettings>): Promise<CausalLM> {
  const missing = missingCudaDevice(cfg.device); // said before a checkpoint is read, naming the setting
  if (missing) {
    throw new Error(`model.device "${cfg.device}": ${missing}; set model.device=cpu or run where the GPU is`);
  }
  const model = await loadModel(cfg.id, { dtype: cfg.dtype, device: cfg.device, attention: cfg.attention });
  try {
    if (cfg.quantize4bit) quantizeModel(model, { doubleQuant: cfg.doubleQuant });
  } catch (e) {
    model.dispose();
    throw e;
  }
  return model;
}

/** The policy over model as cfg sets it up: its LoRA, gradient checkpointing and LM-head chunk. */
export function configuredPolicy(model: CausalLM, cfg: DeepReadonly<TrainConfig>): Policy {
  return new Policy(model, {
    lora: { ...cfg.lora },
    checkpointing: cfg.train.gradientCheckpointing,
    headChunk: cfg.train.headChunk,
  });
}

/** AdamW over the policy's adapters and value head with cfg.train's rates, decay, betas and eps. */
export function configuredOptimizer(policy: Policy, cfg: DeepReadonly<TrainConfig>): AdamW {
  const t = cfg.train;
  return policyOptimizer(policy, {
    learningRate: t.learningRate,
    valueLearningRate: t.valueLearningRate,
    weightDecay: t.weightDecay,
    valueWeightDecay: t.valueWeightDecay,
    betas: [...t.betas] as [number, number],
    eps: t.eps,
  });
}

/**
 * Reads cfg's GSM8K problems: for training (`data.source`, `data.split`) or evaluation (`eval.source` and split),
 * as cfg says (`data.onBadRecord`, `data.config`); a failure names the key.
 * @param limit at most this many problems (default all)
 */
export async function loadConfiguredData(
  cfg: DeepReadonly<TrainConfig>,
  key: "data" | "eval",
  split: Gsm8kSplit,
  limit?: number,
): Promise<Gsm8kData> {
  const opts: LoadGsm8kOptions = { split, onBadRecord: cfg.data.onBadRecord, config: cfg.data.config, limit };
  try {
    return await loadGsm8k(cfg[key].source, opts);
  } catch (e) {
    throw new Error(`${key}.source: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * What a user should know about cfg's data before trusting its accuracies: a local file labelled as the other
 * split, and evaluation on the training problems themselves.
 * @param reads what is read: the training problems (`data.*`) or not, and the evaluation's split (null: none)
 */
export function dataWarnings(
  cfg: DeepReadonly<TrainConfig>,
  reads: { training: boolean; evalSplit: Gsm8kSplit | null },
): string[] {
  const { training, evalSplit } = reads;
  const warnings = [
    training ? splitContradiction(cfg.data.source, cfg.data.split) : null,
    evalSplit === null ? null : splitContradiction(cfg.eval.source, evalSplit),
  ].filter((w): w is string => w !== null);
  if (evalSplit !== null && sameProblems({ source: cfg.eval.source, split: evalSplit }, cfg.data)) {
    warnings.push(
      `evaluation reads the training problems (${cfg.eval.source}): its accuracy is not held out`,
    );
  }
  return warnings;
}

/**
 * A warning for a model dtype that trains less reliably than its name suggests, or null: float16 with
 * `train.lossScale: off`, whose activation gradients below its range (~6e-8) flush to zero.
 */
export function precisionWarning(cfg: DeepReadonly<TrainConfig>): string | null {
  return cfg.model.dtype === "float16" && cfg.train.lossScale === "off"
    ? "model.dtype float16 with train.lossScale off: gradients below ~6e-8 become zero (lossScale auto scales " +
      "them into range; bfloat16, with float32's range, does not need it)"
    : null;
}

/** How cfg renders a problem as a prompt (`data.instruction`, `data.system`). */
export function configuredPrompt(cfg: DeepReadonly<TrainConfig>): PromptOptions {
  return {
    instruction: cfg.data.instruction,
    ...(cfg.data.system === null ? {} : { system: cfg.data.system }),
  };
}

/** How cfg evaluates: greedy up to `eval.maxNewTokens` (else the rollouts' cap), decoding as its rollouts do. */
export function configuredEvaluation(cfg: DeepReadonly<TrainConfig>): EvaluateOptions {
  return {
    maxNewTokens: cfg.eval.maxNewTokens ?? cfg.rollout.maxNewTokens,
    batchSize: cfg.eval.batchSize,
    prompt: configuredPrompt(cfg),
    decodeMode: cfg.rollout.decode,
    decodeDispatch: cfg.rollout.decodeDispatch,
    samples: cfg.eval.samples,
    sampling: cfg.eval.temperature > 0
      ? { temperature: cfg.eval.temperature, topP: cfg.eval.topP, seed: cfg.seed }
      : null,
  };
}

/** The indices of n problems this rank evaluates: every size-th from its rank (merged back in that order). */
export function rankShare(n: number, dp: Replicas): number[] {
  return Array.from({ length: n }, (_, i) => i).filter((i) => i % dp.size === dp.rank);
}
