/**
 * The PPO objective on one forward pass of the policy: the pieces of
 * rl/losses.ts and rl/advantages.ts put together as the design has them.
 *
 * loss = policyLoss + klCoef·KL − entropyCoef·entropy + valueCoef·valueLoss
 *        (+ routerAuxCoef·routerAux)
 *
 * - advantages = whiten(centered − value.detach()), one per sequence;
 * - policyLoss = PPO-clipped surrogate, token-mean over completion tokens;
 * - KL = k1 or k3 to the reference (adapters off), token-mean, in the loss;
 * - valueLoss = ½·mean((value − centered)²), value = the critic at each
 *   sequence's first completion token (rl/policy.ts `sequenceValues`).
 *
 * The policy terms touch only the adapters (advantages are detached
 * constants), the value loss only the value head (it runs on detached hidden
 * states), so both are summed into one backward pass without interfering.
 * @module
 */
import { stack, type Tensor, tidy } from "../ffi/mod.ts";
import { advantages } from "./advantages.ts";
import {
  entropyBonus,
  type KlEstimator,
  klPenalty,
  maskedMean,
  ppoClippedLoss,
  routerAuxLoss,
  valueLoss,
} from "./losses.ts";
import { type PolicyOutput, sequenceValues } from "./policy.ts";

/** Coefficients of the objective. */
export interface ObjectiveConfig {
  /** PPO clip ε. */
  clip: number;
  /** Weight of the KL penalty (0: no reference pass is needed). */
  klCoef: number;
  /** KL estimator. */
  klEstimator: KlEstimator;
  /** Weight of the entropy bonus (subtracted). */
  entropyCoef: number;
  /** Weight of the value loss (only scales the critic's gradient: its parameters are separate). */
  valueCoef: number;
  /** Weight of the router load-balancing loss (0 = off; needs router logits from the forward). */
  routerAuxCoef: number;
}

/** The constants the objective needs besides the policy's outputs. */
export interface ObjectiveInputs {
  /** Group-centred rewards [B] (rl/advantages.ts `groupBaseline`), the critic's targets. */
  centered: Tensor;
  /** Reference log-probs [B, T] (Policy.referenceLogprobs); required when klCoef > 0. */
  refLogprobs?: Tensor | null;
  /** Old log-probs [B, T] for the ratio (default: the outputs' own, detached: ratio 1). */
  oldLogprobs?: Tensor | null;
  /** Log-probs from generation [B, T], zero off the completions: reported as the train/inference mismatch. */
  rolloutLogprobs?: Tensor | null;
  /** Attention mask [B, T], for the router loss. */
  attentionMask?: Tensor;
  /** Experts per token, for the router loss. */
  routerTopK?: number;
}

/** Names of the scalars {@link ppoObjective} reports. */
export const OBJECTIVE_PARTS = [
  "policy_loss",
  "kl",
  "entropy",
  "value_loss",
  "router_aux_loss",
  "clip_fraction",
  "approx_kl",
  "ratio_mean",
  "value_mean",
  "logprob_mismatch",
] as const;

/** One of {@link OBJECTIVE_PARTS}. */
export type ObjectivePart = (typeof OBJECTIVE_PARTS)[number];

/** What {@link ppoObjective} returns. */
export interface ObjectiveResult {
  /** The total loss (with autograd). */
  loss: Tensor;
  /** The advantages used [B] (constants). */
  advantages: Tensor;
  /**
   * Detached scalars, one per {@link OBJECTIVE_PARTS} in that order ([parts]): read them with one
   * `toArray()`. kl is NaN without reference log-probs, router_aux_loss NaN when off, logprob_mismatch
   * NaN without rollout log-probs.
   */
  parts: Tensor;
}

/** Policy outputs that may also carry the router logits of the forward (one [B·T, E] per MoE layer). */
export type PolicyOutputWithRouter = PolicyOutput & { routerLogits?: readonly Tensor[] };

/**
 * The total PPO loss of one forward pass and its parts (see the module doc).
 * @throws {Error} when klCoef > 0 without refLogprobs, or routerAuxCoef > 0 when the outputs carry no
 *   router logits (rl/policy.ts's forward does not return them yet)
 */
export function ppoObjective(
  out: PolicyOutputWithRouter,
  inputs: ObjectiveInputs,
  cfg: ObjectiveConfig,
): ObjectiveResult {
  if (cfg.klCoef > 0 && !inputs.refLogprobs) throw new Error("ppoObjective: klCoef > 0 needs refLogprobs");
  if (cfg.routerAuxCoef > 0 && !(out.routerLogits?.length && inputs.routerTopK)) {
    throw new Error(
      "ppoObjective: routerAuxCoef > 0 needs router logits in the policy's outputs and routerTopK " +
        "(rl/policy.ts's forward does not return router logits)",
    );
  }
  return tidy(() => {
    const nan = (): Tensor => out.mask.sum().mul(Number.NaN);
    const values = sequenceValues(out);
    const adv = advantages(inputs.centered, values);
    const old = inputs.oldLogprobs ?? out.logprobs.detach();
    const pg = ppoClippedLoss(out.logprobs, old, adv, out.mask, cfg.clip);
    const kl = inputs.refLogprobs
      ? klPenalty(out.logprobs, inputs.refLogprobs, out.mask, cfg.klEstimator).mean
      : null;
    const entropy = entropyBonus(out.entropy, out.mask);
    const vLoss = valueLoss(values, inputs.centered);
    const aux = cfg.routerAuxCoef > 0
      ? routerAuxLoss(out.routerLogits!, inputs.routerTopK!, inputs.attentionMask)
      : null;
    let loss = pg.loss.sub(entropy.mul(cfg.entropyCoef)).add(vLoss.mul(cfg.valueCoef));
    if (kl && cfg.klCoef > 0) loss = loss.add(kl.mul(cfg.klCoef));
    if (aux) loss = loss.add(aux.mul(cfg.routerAuxCoef));
    const mismatch = inputs.rolloutLogprobs
      ? maskedMean(out.logprobs.detach().sub(inputs.rolloutLogprobs).abs(), out.mask)
      : nan();
    const parts: Record<ObjectivePart, Tensor> = {
      policy_loss: pg.loss,
      kl: kl ?? nan(),
      entropy,
      value_loss: vLoss,
      router_aux_loss: aux ?? nan(),
      clip_fraction: pg.clipFraction,
      approx_kl: pg.approxKl,
      ratio_mean: pg.ratioMean,
      value_mean: values.mean(),
      logprob_mismatch: mismatch,
    };
    const stacked = stack(OBJECTIVE_PARTS.map((p) => parts[p].detach().to("float32").reshape([]))).detach();
    return { loss, advantages: adv, parts: stacked };
  });
}
