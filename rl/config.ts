/**
 * The RL update's settings, in the sections of a training config file:
 * `rollout` (sampling), `ppo` (the objective and the learn phase), `reward`
 * (rl/reward.ts) and `moe`. Each section has one set of defaults, here, and
 * one checker; `deno task train`'s config (train/config.ts) is built from
 * them, and configs/default.yaml restates them with the reasons.
 * @module
 */
import { ADVANTAGE_ESTIMATORS, type AdvantageEstimator } from "./advantages.ts";
import { DECODE_MODES, type DecodeMode } from "../model/decode_static.ts";
import { MOE_DISPATCHES, type MoeDispatch } from "../model/moe.ts";
import {
  type KlEstimator,
  LOSS_AGGREGATIONS,
  type LossAggregation,
  RATIO_LEVELS,
  type RatioLevel,
} from "./losses.ts";
import {
  bool,
  type Checks,
  checkSection,
  editDistance,
  foldKey,
  int,
  nullable,
  num,
  oneOf,
  throwProblems,
} from "../model/settings.ts";
import { DEFAULT_REWARD_CONFIG, REWARD_CHECKS, type RewardConfig } from "./reward.ts";

/** How completions are sampled (the `rollout` section). */
export interface RolloutConfig {
  /** Completions sampled per prompt (the group size K). */
  k: number;
  /** Token cap per completion. */
  maxNewTokens: number;
  /** Sampling temperature; the learn phase computes every log-prob at the same temperature. */
  temperature: number;
  /** Nucleus sampling mass (1 = off). Log-probs are of the tempered distribution, untruncated. */
  topP: number;
  /** Top-k sampling (0 = off). */
  topK: number;
  /**
   * Sequences per generation batch (null: all of an update's prompts × K at once). Rounded down to whole
   * prompt groups; smaller batches need less memory for the KV cache.
   */
  generationBatch: number | null;
  /**
   * MoE dispatch of the decode steps (model/moe.ts): "dense" (the default), "loop", "grouped", or "measured":
   * the fastest of them at each generation batch's size, timed once (model/dispatch_choice.ts).
   */
  decodeDispatch: MoeDispatch | "measured";
  /**
   * How decode steps run (model/generate.ts `decodeMode`): "eager" (per-step shapes), "static" (static
   * buffers) or "graph" (static buffers replayed as CUDA graphs; where graphs are unavailable, e.g. on a CPU,
   * the static-buffer steps run without them, as in "static").
   * The training loop's and `deno task evaluate`'s evaluations decode the same way.
   */
  decode: DecodeMode;
}

/** The objective and the learn phase (the `ppo` section). */
export interface PpoConfig {
  /** Passes over the update's rollouts. */
  epochs: number;
  /** Optimizer steps per pass; the update's sequences are split evenly among them. */
  minibatches: number;
  /** ε: the probability ratio is clipped below at 1 − ε. */
  clip: number;
  /** ε_high: clipped above at 1 + ε_high (null: ε). */
  clipHigh: number | null;
  /** Dual clip c > 1: a negative-advantage token's loss is at most −c·A (verl's clip_ratio_c; null: off). */
  clipRatioC: number | null;
  /** "token" (PPO) or "sequence" (GSPO's length-normalised sequence ratio). */
  ratioLevel: RatioLevel;
  /** Weight of the per-token KL penalty to the reference (adapters-off) policy; 0 skips its log-probs. */
  klCoef: number;
  /** The KL estimator in the loss: k3 (clamped) or k2. k1 is only logged (its expected gradient is zero). */
  klEstimator: Exclude<KlEstimator, "k1">;
  /** Weight of the entropy bonus. */
  entropyCoef: number;
  /** "group" (no critic), "token_value" (V(s_t) per token) or "prompt_value" (V of the prompt). */
  advantage: AdvantageEstimator;
  /** GAE's λ for "token_value" (1: centred reward − V(s_t)). */
  gaeLambda: number;
  /** Normalise the advantages over the update (false: Dr. GRPO's unscaled advantages). */
  normalizeAdvantages: boolean;
  /**
   * Leave completions cut at the token cap out of the policy loss (DAPO's overlong filtering, TRL's
   * `mask_truncated_completions`): their rewards still count in their group's baseline and the critic still
   * learns from them.
   */
  maskTruncated: boolean;
  /** Cap C of the per-token importance weight min(π_old / π_rollout, C) (null: no correction). */
  rolloutCorrection: number | null;
  /** Weight of the MoE load-balancing loss (0: off). */
  routerAuxCoef: number;
  /**
   * How the per-token terms add up to the loss: "token_mean" (TRL's dapo, verl's token-mean),
   * "seq_mean_token_mean" (GRPO's per-sequence mean) or "seq_mean_token_sum_norm" (Dr. GRPO's Σ / (S·L), L
   * being rollout.maxNewTokens); see rl/losses.ts `LOSS_AGGREGATIONS`.
   */
  lossAggregation: LossAggregation;
}

/** Mixture-of-experts handling (the `moe` section). */
export interface MoeRoutingConfig {
  /** "rollout": replay the experts chosen at rollout in the old, reference and training passes; "off". */
  routingReplay: "off" | "rollout";
}

/** Every section of an RL update's settings. */
export interface RlConfig {
  /** Sampling. */
  rollout: RolloutConfig;
  /** The objective and the learn phase. */
  ppo: PpoConfig;
  /** The reward. */
  reward: RewardConfig;
  /** Mixture-of-experts handling. */
  moe: MoeRoutingConfig;
}

/**
 * Overrides of some keys of some sections, as a notebook passes them. Other top-level keys are ignored, so
 * that a whole training config can be passed, except near-misses of the four section names ("rolout", "PPO"),
 * which {@link rlConfig} refuses: a misspelt section would otherwise leave its settings at their defaults.
 */
export type RlOverrides = { [S in keyof RlConfig]?: Partial<RlConfig[S]> };

/** The defaults (configs/default.yaml). */
export const DEFAULT_RL_CONFIG: Readonly<RlConfig> = Object.freeze({
  rollout: Object.freeze({
    k: 4,
    maxNewTokens: 256,
    temperature: 1,
    topP: 1,
    topK: 0,
    generationBatch: null,
    decodeDispatch: "dense",
    decode: "eager" as const,
  }),
  ppo: Object.freeze({
    epochs: 1,
    minibatches: 1,
    clip: 0.2,
    clipHigh: null,
    clipRatioC: null,
    ratioLevel: "token" as const,
    klCoef: 0.04,
    klEstimator: "k3" as const,
    entropyCoef: 0.001,
    advantage: "token_value" as const,
    gaeLambda: 1,
    normalizeAdvantages: true,
    maskTruncated: false,
    rolloutCorrection: 2,
    routerAuxCoef: 0,
    lossAggregation: "token_mean" as const,
  }),
  reward: DEFAULT_REWARD_CONFIG,
  moe: Object.freeze({ routingReplay: "rollout" as const }),
});

/** The check of every `rollout` setting (model/settings.ts), shared with deno task train's config. */
export const ROLLOUT_CHECKS: Checks<RolloutConfig> = {
  k: int(1),
  maxNewTokens: int(1),
  temperature: num(0, Infinity, true),
  topP: num(0, 1, true),
  topK: int(0),
  generationBatch: nullable(int(1)),
  decodeDispatch: oneOf(...MOE_DISPATCHES, "measured"),
  decode: oneOf(...DECODE_MODES),
};

/** The check of every `ppo` setting. */
export const PPO_CHECKS: Checks<PpoConfig> = {
  epochs: int(1),
  minibatches: int(1),
  clip: num(0, Infinity, true),
  clipHigh: nullable(num(0, Infinity, true)),
  clipRatioC: nullable(num(1, Infinity, true)),
  ratioLevel: oneOf(...RATIO_LEVELS),
  klCoef: num(0),
  klEstimator: {
    expected: '"k2" or "k3" (k1\'s expected gradient is zero: it is only logged, as kl_k1)',
    ok: (v) => v === "k2" || v === "k3",
  },
  entropyCoef: num(0),
  advantage: oneOf(...ADVANTAGE_ESTIMATORS),
  gaeLambda: num(0, 1),
  normalizeAdvantages: bool,
  maskTruncated: bool,
  rolloutCorrection: nullable(num(1)),
  routerAuxCoef: num(0),
  lossAggregation: oneOf(...LOSS_AGGREGATIONS),
};

/** The check of every `moe` setting. */
export const MOE_CHECKS: Checks<MoeRoutingConfig> = { routingReplay: oneOf("off", "rollout") };

const RL_SECTIONS = ["rollout", "ppo", "reward", "moe"] as const;

/**
 * The defaults with overrides applied, every key checked.
 * @throws {RangeError} naming the section and key of every bad value
 */
export function rlConfig(overrides: RlOverrides = {}): RlConfig {
  const d = DEFAULT_RL_CONFIG;
  for (const key of Object.keys(overrides)) {
    const meant = RL_SECTIONS.find((s) => key !== s && editDistance(foldKey(key), s) <= 1); // "rolout", "PPO"
    if (meant) throw new RangeError(`${key}: unknown section (did you mean ${meant}?)`);
  }
  const cfg: RlConfig = {
    rollout: { ...d.rollout, ...overrides.rollout },
    ppo: { ...d.ppo, ...overrides.ppo },
    reward: { ...d.reward, ...overrides.reward },
    moe: { ...d.moe, ...overrides.moe },
  };
  const problems = [
    ...checkSection("rollout", cfg.rollout, ROLLOUT_CHECKS),
    ...checkSection("ppo", cfg.ppo, PPO_CHECKS),
    ...checkSection("reward", cfg.reward, REWARD_CHECKS),
    ...checkSection("moe", cfg.moe, MOE_CHECKS),
  ];
  const g = cfg.rollout.generationBatch;
  if (problems.length === 0 && g !== null && g < cfg.rollout.k) {
    problems.push(
      `rollout.generationBatch: ${g} is smaller than rollout.k (${cfg.rollout.k}): a prompt's K samples are ` +
        "generated together",
    );
  }
  if (problems.length === 0 && cfg.ppo.clipRatioC !== null && cfg.ppo.ratioLevel === "sequence") {
    problems.push(
      'ppo.clipRatioC: the dual clip bounds token ratios; with ppo.ratioLevel "sequence" (GSPO, which has none ' +
        "in verl either) set it to null",
    );
  }
  if (problems.length === 0 && cfg.rollout.decode === "graph" && cfg.rollout.decodeDispatch === "loop") {
    problems.push(
      'rollout.decodeDispatch: "loop" reads the routing back to the host every step, which rollout.decode ' +
        '"graph" cannot record: use "dense", "grouped" or "measured"',
    );
  }
  throwProblems(problems);
  return cfg;
}
