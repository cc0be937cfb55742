/**
 * One RL update in one call, for notebooks: {@link collect} (rl/collect.ts)
 * then {@link learn} (rl/learn.ts), with the samples and every metric
 * returned. `deno task train` runs the same two phases (train/loop.ts);
 * call them yourself to look at, re-score or filter the rollouts between
 * (rl/rollout_buffer.ts).
 * @module
 */
import { AdamW, ADAMW_DEFAULTS } from "../ffi/mod.ts";
import { collect, type CollectOptions, type RolloutTokenizer } from "./collect.ts";
import type { CollectMetrics, RolloutPrompt, Sample } from "./rollout_buffer.ts";
import type { RlOverrides } from "./config.ts";
import { learn, type LearnMetrics, type LearnOptions } from "./learn.ts";
import type { Policy } from "./policy.ts";

/** Options of {@link ppoStep}: those of collect and learn. */
export interface PpoStepOptions extends CollectOptions, LearnOptions {
  /**
   * Seeds the learn phase's minibatches and, unless a `generator` is given, the sampling (collect's
   * `seed`); with a generator, the generator draws the samples.
   */
  seed?: number;
}

/** The numbers of one update: the collect phase's and the learn phase's. */
export type PpoMetrics = CollectMetrics & LearnMetrics;

/** What {@link ppoStep} returns. */
export interface PpoStepResult {
  /** The update's metrics. */
  metrics: PpoMetrics;
  /** Every completion, prompt-major. */
  samples: Sample[];
}

/**
 * One update: samples rollout.k completions for each prompt, scores them,
 * and steps the critic and the policy (see rl/learn.ts). The optimizer must
 * hold the policy's and the critic's parameters, e.g. {@link policyOptimizer}.
 * @param cfg overrides of rl/config.ts's defaults, by section
 */
export async function ppoStep(
  policy: Policy,
  optimizer: AdamW,
  tokenizer: RolloutTokenizer,
  prompts: readonly RolloutPrompt[],
  cfg: RlOverrides = {},
  opts: PpoStepOptions = {},
): Promise<PpoStepResult> {
  using buffer = await collect(
    policy,
    tokenizer,
    prompts,
    cfg,
    opts.generator ? { ...opts, seed: undefined } : opts,
  );
  const metrics = { ...buffer.metrics, ...learn(policy, optimizer, buffer, cfg, opts) };
  const samples = buffer.samples();
  return { metrics, samples };
}

/** Learning rates and decay of {@link policyOptimizer}. */
export interface PolicyOptimizerOptions {
  /** The adapters' learning rate (default 1e-5). */
  learningRate?: number;
  /** The critic's learning rate (default 5e-5). */
  valueLearningRate?: number;
  /** Decoupled weight decay of the adapters and of the critic (default 0 both). */
  weightDecay?: number;
  /** See weightDecay. */
  valueWeightDecay?: number;
  /** AdamW's (β1, β2) (default [0.9, 0.999]). */
  betas?: [number, number];
  /** AdamW's epsilon (default 1e-8). */
  eps?: number;
}

/** {@link policyOptimizer}'s defaults (configs/default.yaml's `train` takes them from here). */
export const DEFAULT_POLICY_OPTIMIZER: Readonly<Required<PolicyOptimizerOptions>> = Object.freeze({
  learningRate: 1e-5,
  valueLearningRate: 5e-5,
  weightDecay: 0,
  valueWeightDecay: 0,
  betas: [...ADAMW_DEFAULTS.betas] as [number, number],
  eps: ADAMW_DEFAULTS.eps,
});

/** AdamW over the policy's adapters (group 0) and its critic (group 1), each with its own learning rate. */
export function policyOptimizer(policy: Policy, opts: PolicyOptimizerOptions = {}): AdamW {
  const d = DEFAULT_POLICY_OPTIMIZER;
  const common = { betas: [...opts.betas ?? d.betas] as [number, number], eps: opts.eps ?? d.eps };
  return new AdamW([
    {
      params: policy.policyParameters(),
      lr: opts.learningRate ?? d.learningRate,
      weightDecay: opts.weightDecay ?? d.weightDecay,
      ...common,
    },
    {
      params: policy.valueParameters(),
      lr: opts.valueLearningRate ?? d.valueLearningRate,
      weightDecay: opts.valueWeightDecay ?? d.valueWeightDecay,
      ...common,
    },
  ]);
}
