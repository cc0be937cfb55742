/**
 * One PPO step: rollout → reward → advantages → losses → backward.
 *
 * {@link ppoStep} samples K completions per prompt, scores them, computes
 * the reference log-probs (adapters off, no autograd) and back-propagates
 * {@link ppoObjective}'s loss into the adapters and the value head. It does
 * not step an optimizer: the training loop owns the optimizer, gradient
 * accumulation (see `lossScale`) and clipping. {@link ppoUpdate} is the
 * one-call version for notebooks (step, clip, optimizer step).
 *
 * Old log-probs: one update per rollout (μ = 1), so the ratio's denominator
 * is the training forward's own log-probs, detached (TRL's shortcut): the
 * ratio is exactly 1, the clip never bites, and the gradient is the vanilla
 * policy gradient. The generation log-probs are not used as old log-probs:
 * they come from another code path (dense MoE dispatch, KV cache, no
 * dropout), and the train/inference difference would show up as a spurious
 * ratio; it is reported as `logprob_mismatch` instead.
 * @module
 */
import { type AdamW, clipGradNorm, dispose, type Generator, type Tensor, tensor } from "../ffi/mod.ts";
import { groupBaseline, zeroSpreadFraction } from "./advantages.ts";
import type { KlEstimator } from "./losses.ts";
import { OBJECTIVE_PARTS, type ObjectiveConfig, type ObjectivePart, ppoObjective } from "./objective.ts";
import type { Policy } from "./policy.ts";
import { rewardConfig } from "./reward.ts";
import {
  rollout,
  type RolloutCompletion,
  type RolloutConfig,
  type RolloutPrompt,
  type RolloutTokenizer,
} from "./rollout.ts";

/** Everything a PPO step needs (see {@link DEFAULT_PPO_CONFIG} for the defaults). */
export interface PpoConfig extends RolloutConfig, ObjectiveConfig {}

/**
 * The defaults: K 8, 512 new tokens, temperature 1, no top-p/top-k, clip 0.2,
 * k3 KL with coefficient 0.001 (verl's kl_loss_coef), entropy bonus 0.001,
 * value coefficient 1, no router loss, the default reward.
 */
export const DEFAULT_PPO_CONFIG: Readonly<PpoConfig> = Object.freeze({
  k: 8,
  maxNewTokens: 512,
  temperature: 1,
  topP: 1,
  topK: 0,
  clip: 0.2,
  klCoef: 0.001,
  klEstimator: "k3" as KlEstimator,
  entropyCoef: 0.001,
  valueCoef: 1,
  routerAuxCoef: 0,
  reward: {},
});

/**
 * The defaults with overrides applied, checked.
 * @throws {Error} naming the field when a value is out of range
 */
export function ppoConfig(overrides: Partial<PpoConfig> = {}): PpoConfig {
  const cfg: PpoConfig = { ...DEFAULT_PPO_CONFIG, ...overrides };
  const bad = (field: string, v: unknown, want: string): never => {
    throw new Error(`ppo config: "${field}" must be ${want}, got ${JSON.stringify(v)}`);
  };
  for (const f of ["k", "maxNewTokens"] as const) {
    if (!Number.isSafeInteger(cfg[f]) || cfg[f] < 1) bad(f, cfg[f], "an integer >= 1");
  }
  if (!(cfg.temperature > 0)) bad("temperature", cfg.temperature, "> 0");
  if (!(cfg.topP > 0 && cfg.topP <= 1)) bad("topP", cfg.topP, "in (0, 1]");
  if (!Number.isSafeInteger(cfg.topK) || cfg.topK < 0) bad("topK", cfg.topK, "an integer >= 0");
  for (const f of ["clip", "klCoef", "entropyCoef", "valueCoef", "routerAuxCoef"] as const) {
    if (!(typeof cfg[f] === "number" && cfg[f] >= 0 && Number.isFinite(cfg[f]))) {
      bad(f, cfg[f], "a number >= 0");
    }
  }
  if (cfg.klEstimator !== "k1" && cfg.klEstimator !== "k3") {
    bad("klEstimator", cfg.klEstimator, '"k1" or "k3"');
  }
  rewardConfig(cfg.reward);
  return cfg;
}

/** The numbers of one step (all finite except as noted). */
export type PpoMetrics = Record<ObjectivePart, number> & {
  /** Total loss (before lossScale). */
  loss: number;
  /** Mean and std (population) of the rewards over all completions. */
  reward_mean: number;
  reward_std: number;
  /** Fraction of completions whose answer is correct. */
  accuracy: number;
  /** Fraction paid the final-answer marker bonus. */
  marker_rate: number;
  /** Fraction charged the over-length penalty. */
  overlong_rate: number;
  /** Mean completion length in tokens (EOS included). */
  completion_len_mean: number;
  /** Mean and std (unbiased; 0 for one sequence) of the advantages. */
  advantage_mean: number;
  advantage_std: number;
  /** Fraction of prompt groups whose K rewards are all equal (1 when K = 1). */
  frac_zero_std_groups: number;
  /** Generated tokens in all. */
  tokens_generated: number;
  /** Generation and scoring time. */
  rollout_seconds: number;
  /** Reference pass and backward time. */
  train_seconds: number;
  /** tokens_generated / rollout_seconds. */
  tokens_per_second: number;
};

/** One completion, for logging. */
export interface PpoSample {
  /** The prompt's text. */
  prompt: string;
  /** The completion's text. */
  completion: string;
  /** Its reward. */
  reward: number;
  /** Whether its answer was right. */
  correct: boolean;
}

/** What {@link ppoStep} returns. */
export interface PpoStepResult {
  /** The step's metrics (kl NaN when klCoef is 0, router_aux_loss NaN when off). */
  metrics: PpoMetrics;
  /** Every completion, prompt-major. */
  samples: PpoSample[];
}

/** Options of {@link ppoStep}. */
export interface PpoStepOptions {
  /** Random source for sampling (seed it for reproducible steps). */
  generator?: Generator;
  /** Multiplies the loss before backward (e.g. 1/accumulation steps); metrics are unscaled. */
  lossScale?: number;
}

const mean = (xs: readonly number[]): number => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);
const popStd = (xs: readonly number[]): number => Math.sqrt(mean(xs.map((x) => (x - mean(xs)) ** 2)));

/** Generation log-probs laid out like the batch [B, T]: right-aligned, 0 elsewhere. */
function rolloutLogprobs(
  completions: readonly RolloutCompletion[],
  width: number,
  device: Tensor["device"],
): Tensor {
  const rows = completions.map((c) => [...Array(width - c.logprobs.length).fill(0), ...c.logprobs]);
  return tensor(rows, { dtype: "float32", device });
}

/**
 * One PPO step on a batch of prompts (see the module doc): accumulates
 * gradients into `policy.policyParameters()` and `policy.valueParameters()`
 * and returns the metrics and samples. Frees everything it allocates; the
 * policy's train/eval mode is restored afterwards.
 * @param cfg overrides of {@link DEFAULT_PPO_CONFIG}
 */
export async function ppoStep(
  policy: Policy,
  tokenizer: RolloutTokenizer,
  prompts: readonly RolloutPrompt[],
  cfg: Partial<PpoConfig> = {},
  opts: PpoStepOptions = {},
): Promise<PpoStepResult> {
  const c = ppoConfig(cfg);
  const lossScale = opts.lossScale ?? 1;
  if (!(lossScale > 0 && Number.isFinite(lossScale))) {
    throw new RangeError(`ppoStep: bad lossScale ${lossScale}`);
  }
  const wasTraining = policy.lora.state.training;
  let ro: Awaited<ReturnType<typeof rollout>> | null = null;
  const owned: Tensor[] = [];
  try {
    policy.train(false);
    ro = await rollout(policy, tokenizer, prompts, c, opts.generator);
    const { batch, completions, rewards } = ro;
    const trainStart = performance.now();
    const device = batch.inputIds.device;
    const centered = groupBaseline(rewards, c.k);
    const centeredT = tensor(centered, { dtype: "float32", device });
    owned.push(centeredT);
    const ref = c.klCoef > 0 ? policy.referenceLogprobs(batch) : null;
    if (ref) owned.push(ref);
    const genLp = rolloutLogprobs(completions, batch.inputIds.size(1), device);
    owned.push(genLp);
    policy.train(true);
    let parts: number[] = [], adv: number[] = [];
    const inputs = { centered: centeredT, refLogprobs: ref, rolloutLogprobs: genLp };
    const loss = policy.backward(batch, (out) => {
      const r = ppoObjective(out, {
        ...inputs,
        attentionMask: batch.attentionMask,
        routerTopK: policy.model.config.numExpertsPerTok,
      }, c);
      parts = r.parts.toArray();
      adv = r.advantages.toArray();
      return lossScale === 1 ? r.loss : r.loss.mul(lossScale);
    }) / lossScale;
    const trainSeconds = (performance.now() - trainStart) / 1000;
    const advMean = mean(adv);
    const metrics = {
      ...Object.fromEntries(OBJECTIVE_PARTS.map((p, i) => [p, parts[i]!])) as Record<ObjectivePart, number>,
      loss,
      reward_mean: mean(rewards),
      reward_std: popStd(rewards),
      accuracy: mean(completions.map((x) => (x.reward.correct ? 1 : 0))),
      marker_rate: mean(completions.map((x) => (x.reward.marker ? 1 : 0))),
      overlong_rate: mean(completions.map((x) => (x.reward.overLength ? 1 : 0))),
      completion_len_mean: mean(completions.map((x) => x.tokens.length)),
      advantage_mean: advMean,
      advantage_std: adv.length < 2
        ? 0
        : Math.sqrt(adv.reduce((s, a) => s + (a - advMean) ** 2, 0) / (adv.length - 1)),
      frac_zero_std_groups: zeroSpreadFraction(rewards, c.k),
      tokens_generated: ro.tokensGenerated,
      rollout_seconds: ro.seconds,
      train_seconds: trainSeconds,
      tokens_per_second: ro.tokensGenerated / Math.max(ro.seconds, 1e-9),
    };
    const samples = completions.map((x) => ({
      prompt: ro!.promptTexts[x.prompt]!,
      completion: x.text,
      reward: x.reward.reward,
      correct: x.reward.correct,
    }));
    return { metrics, samples };
  } finally {
    policy.train(wasTraining);
    dispose(owned);
    if (ro) dispose(ro.batch);
  }
}

/** Options of {@link ppoUpdate}. */
export interface PpoUpdateOptions extends PpoStepOptions {
  /** Clip the global gradient norm of all trainable tensors to this (default: no clipping). */
  maxGradNorm?: number;
}

/**
 * {@link ppoStep}, then (optionally) gradient clipping, one optimizer step
 * and zeroed gradients: a complete update without accumulation, for
 * notebooks. The optimizer should hold `policy.policyParameters()` and
 * `policy.valueParameters()` (e.g. as two groups).
 * @returns the step's result, with the gradient norm before clipping (null without maxGradNorm)
 */
export async function ppoUpdate(
  policy: Policy,
  optimizer: AdamW,
  tokenizer: RolloutTokenizer,
  prompts: readonly RolloutPrompt[],
  cfg: Partial<PpoConfig> = {},
  opts: PpoUpdateOptions = {},
): Promise<PpoStepResult & { gradNorm: number | null }> {
  const result = await ppoStep(policy, tokenizer, prompts, cfg, opts);
  const params = [...policy.policyParameters(), ...policy.valueParameters()];
  const gradNorm = opts.maxGradNorm !== undefined ? clipGradNorm(params, opts.maxGradNorm) : null;
  optimizer.step();
  optimizer.zeroGrad();
  return { ...result, gradNorm };
}
