/**
 * The RL update's settings, in the sections of a training config file:
 * `rollout` (sampling), `ppo` (the objective and the learn phase), `reward`
 * (rl/reward.ts) and `moe`. Each section has one set of defaults, here, and
 * one checker; `deno task train`'s config (train/config.ts) is built from
 * them, and configs/default.yaml restates them with the reasons.
 * @module
 */
import { ADVANTAGE_ESTIMATORS, type AdvantageEstimator } from "./advantages.ts";
import type { KlEstimator } from "./losses.ts";
import { DEFAULT_REWARD_CONFIG, type RewardConfig, rewardConfig } from "./reward.ts";

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
  /** "token" (PPO) or "sequence" (GSPO's length-normalised sequence ratio). */
  ratioLevel: "token" | "sequence";
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
  /** Cap C of the per-token importance weight min(π_old / π_rollout, C) (null: no correction). */
  rolloutCorrection: number | null;
  /** Weight of the MoE load-balancing loss (0: off). */
  routerAuxCoef: number;
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

/** Overrides of some keys of some sections, as a notebook passes them. */
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
  }),
  ppo: Object.freeze({
    epochs: 1,
    minibatches: 1,
    clip: 0.2,
    clipHigh: null,
    ratioLevel: "token" as const,
    klCoef: 0.04,
    klEstimator: "k3" as const,
    entropyCoef: 0.001,
    advantage: "token_value" as const,
    gaeLambda: 1,
    normalizeAdvantages: true,
    rolloutCorrection: 2,
    routerAuxCoef: 0,
  }),
  reward: DEFAULT_REWARD_CONFIG,
  moe: Object.freeze({ routingReplay: "rollout" as const }),
});

const isInt = (v: unknown, min: number): boolean => Number.isSafeInteger(v) && (v as number) >= min;
const isNum = (v: unknown, min: number): boolean => typeof v === "number" && Number.isFinite(v) && v >= min;

/**
 * The defaults with overrides applied, every key checked.
 * @throws {RangeError} naming the section and key of the first bad value
 */
export function rlConfig(overrides: RlOverrides = {}): RlConfig {
  const d = DEFAULT_RL_CONFIG;
  const cfg: RlConfig = {
    rollout: { ...d.rollout, ...overrides.rollout },
    ppo: { ...d.ppo, ...overrides.ppo },
    reward: rewardConfig({ ...d.reward, ...overrides.reward }),
    moe: { ...d.moe, ...overrides.moe },
  };
  const bad = (key: string, v: unknown, want: string): never => {
    throw new RangeError(`${key} must be ${want}, got ${JSON.stringify(v)}`);
  };
  const r = cfg.rollout, p = cfg.ppo;
  if (!isInt(r.k, 1)) bad("rollout.k", r.k, "an integer >= 1");
  if (!isInt(r.maxNewTokens, 1)) bad("rollout.maxNewTokens", r.maxNewTokens, "an integer >= 1");
  if (!(isNum(r.temperature, 0) && r.temperature > 0)) {
    bad("rollout.temperature", r.temperature, "a number > 0");
  }
  if (!(isNum(r.topP, 0) && r.topP > 0 && r.topP <= 1)) bad("rollout.topP", r.topP, "in (0, 1]");
  if (!isInt(r.topK, 0)) bad("rollout.topK", r.topK, "an integer >= 0");
  if (r.generationBatch !== null && !isInt(r.generationBatch, r.k)) {
    bad(
      "rollout.generationBatch",
      r.generationBatch,
      `null or an integer >= rollout.k (${r.k}): a prompt's K samples are generated together`,
    );
  }
  if (!isInt(p.epochs, 1)) bad("ppo.epochs", p.epochs, "an integer >= 1");
  if (!isInt(p.minibatches, 1)) bad("ppo.minibatches", p.minibatches, "an integer >= 1");
  if (!(isNum(p.clip, 0) && p.clip > 0)) bad("ppo.clip", p.clip, "a number > 0");
  if (p.clipHigh !== null && !(isNum(p.clipHigh, 0) && p.clipHigh > 0)) {
    bad("ppo.clipHigh", p.clipHigh, "null or a number > 0");
  }
  if (p.ratioLevel !== "token" && p.ratioLevel !== "sequence") {
    bad("ppo.ratioLevel", p.ratioLevel, '"token" or "sequence"');
  }
  if (!isNum(p.klCoef, 0)) bad("ppo.klCoef", p.klCoef, "a number >= 0");
  if ((p.klEstimator as string) === "k1") {
    bad(
      "ppo.klEstimator",
      p.klEstimator,
      '"k2" or "k3" (k1\'s expected gradient is zero; it is logged as kl_k1)',
    );
  }
  if (p.klEstimator !== "k2" && p.klEstimator !== "k3") bad("ppo.klEstimator", p.klEstimator, '"k2" or "k3"');
  if (!isNum(p.entropyCoef, 0)) bad("ppo.entropyCoef", p.entropyCoef, "a number >= 0");
  if (!ADVANTAGE_ESTIMATORS.includes(p.advantage)) {
    bad("ppo.advantage", p.advantage, `one of ${ADVANTAGE_ESTIMATORS.map((e) => `"${e}"`).join(", ")}`);
  }
  if (!(isNum(p.gaeLambda, 0) && p.gaeLambda <= 1)) bad("ppo.gaeLambda", p.gaeLambda, "in [0, 1]");
  if (typeof p.normalizeAdvantages !== "boolean") {
    bad("ppo.normalizeAdvantages", p.normalizeAdvantages, "true or false");
  }
  if (p.rolloutCorrection !== null && !isNum(p.rolloutCorrection, 1)) {
    bad("ppo.rolloutCorrection", p.rolloutCorrection, "null or a number >= 1");
  }
  if (!isNum(p.routerAuxCoef, 0)) bad("ppo.routerAuxCoef", p.routerAuxCoef, "a number >= 0");
  if (cfg.moe.routingReplay !== "off" && cfg.moe.routingReplay !== "rollout") {
    bad("moe.routingReplay", cfg.moe.routingReplay, '"off" or "rollout"');
  }
  return cfg;
}
