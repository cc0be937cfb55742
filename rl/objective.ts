/**
 * The policy's PPO objective on one forward pass: the pieces of rl/losses.ts
 * put together as the design has them.
 *
 * loss = policyLoss + klCoef·KL − entropyCoef·entropy (+ routerAuxCoef·routerAux)
 *
 * - policyLoss: the PPO-clipped surrogate with the update's (constant)
 *   advantages, weighted per token by the rollout correction
 *   w = min(π_old / π_rollout, C) when C is set;
 * - KL: k3 or k2 to the reference (adapters off), in the loss;
 * - policyLoss and KL aggregated as `lossAggregation` says (rl/losses.ts
 *   `LOSS_AGGREGATIONS`): a token-mean over the trained tokens of the
 *   minibatch, GRPO's per-sequence mean or Dr. GRPO's constant divisor; the
 *   entropy a token-mean always (as TRL's); the router loss, a per-forward
 *   mean, weighted by the batch's share of the tokens.
 *
 * The critic is not here: rl/learn.ts trains it on its own, on the frozen
 * base's states, so the policy loss reaches only the adapters.
 * @module
 */
import { stack, type Tensor, tidy } from "../ffi/mod.ts";
import type { PpoConfig } from "./config.ts";
import {
  entropyBonus,
  klPenalty,
  lossWeights,
  maskedMean,
  ppoClippedLoss,
  routerAuxLoss,
  weightedSum,
} from "./losses.ts";
import type { PolicyOutput } from "./policy.ts";

/** The settings the objective uses. */
export type ObjectiveConfig = Pick<
  PpoConfig,
  | "clip"
  | "clipHigh"
  | "clipRatioC"
  | "ratioLevel"
  | "klCoef"
  | "klEstimator"
  | "entropyCoef"
  | "rolloutCorrection"
  | "routerAuxCoef"
  | "lossAggregation"
>;

/** The constants the objective needs besides the policy's outputs. */
export interface ObjectiveInputs {
  /** Advantages per token [B, T] (rl/advantages.ts), constants. */
  advantages: Tensor;
  /** Old log-probs [B, T] for the ratio (default: the outputs' own, detached: ratio 1). */
  oldLogprobs?: Tensor | null;
  /** Reference log-probs [B, T]; required when klCoef > 0, also gives kl_k1. */
  refLogprobs?: Tensor | null;
  /** Log-probs the rollout sampled with [B, T]; required when rolloutCorrection is set. */
  rolloutLogprobs?: Tensor | null;
  /** Token-mean denominator: the trained tokens of the whole minibatch (default: this batch's). */
  tokens?: number;
  /**
   * The trained sequences of the whole minibatch (over all ranks; learn sets it): the divisor of the
   * per-sequence aggregations, so that micro-batches add up to the minibatch's mean (default: this batch's rows).
   */
  sequences?: number;
  /** The completion token cap (rollout.maxNewTokens; learn sets it): "seq_mean_token_sum_norm"'s divisor. */
  maxTokens?: number;
  /** Attention mask [B, T] and experts per token, for the router loss. */
  attentionMask?: Tensor;
  /** Experts per token, for the router loss. */
  routerTopK?: number;
}

/** Names of the scalars {@link ppoObjective} reports. */
export const OBJECTIVE_PARTS = [
  "policy_loss",
  "kl",
  "kl_k1",
  "entropy",
  "router_aux_loss",
  "clip_fraction",
  "clip_low_fraction",
  "approx_kl",
  "ratio_mean",
  "is_weight_mean",
  "dual_clip_fraction",
] as const;

/** One of {@link OBJECTIVE_PARTS}. */
export type ObjectivePart = (typeof OBJECTIVE_PARTS)[number];

/** What {@link ppoObjective} returns. */
export interface ObjectiveResult {
  /** The total loss (with autograd). */
  loss: Tensor;
  /**
   * Detached scalars, one per {@link OBJECTIVE_PARTS} in that order ([parts]): read them with one
   * `toArray()`. policy_loss is the loss's term, aggregated as `lossAggregation` says; the others are token
   * means over the denominator of the token-mean loss (kl too: the loss's KL term follows lossAggregation, the
   * logged kl stays comparable across aggregations). kl and kl_k1 are NaN without
   * reference log-probs, router_aux_loss and dual_clip_fraction NaN when off, is_weight_mean 1 without a
   * correction.
   */
  parts: Tensor;
}

/**
 * The rollout correction's per-token weight min(exp(old − rollout), cap): how
 * much more likely the training path finds a token than the sampler did,
 * truncated (TIS). Detached.
 */
export function rolloutWeights(
  oldLogprobs: Tensor,
  rolloutLogprobs: Tensor,
  mask: Tensor,
  cap: number,
): Tensor {
  return tidy(() =>
    oldLogprobs.detach().sub(rolloutLogprobs).maskedFill(mask.eq(0), 0).clamp(-30, Math.log(cap)).exp().mul(
      mask,
    )
  );
}

/**
 * The total objective of one forward pass and its parts (see the module doc).
 * @throws {Error} when klCoef > 0 without refLogprobs, rolloutCorrection without rolloutLogprobs, or
 *   routerAuxCoef > 0 when the outputs carry no router logits (as with gradient checkpointing)
 */
export function ppoObjective(
  out: PolicyOutput,
  inputs: ObjectiveInputs,
  cfg: ObjectiveConfig,
): ObjectiveResult {
  if (cfg.klCoef > 0 && !inputs.refLogprobs) throw new Error("ppoObjective: klCoef > 0 needs refLogprobs");
  if (cfg.rolloutCorrection !== null && !inputs.rolloutLogprobs) {
    throw new Error("ppoObjective: rolloutCorrection needs rolloutLogprobs");
  }
  if (cfg.routerAuxCoef > 0 && !(out.routerLogits?.length && inputs.routerTopK)) {
    throw new Error(
      "ppoObjective: routerAuxCoef > 0 needs router logits in the policy's outputs and routerTopK " +
        "(a checkpointed backward does not return them)",
    );
  }
  return tidy(() => {
    const n = inputs.tokens;
    const nan = (): Tensor => out.mask.sum().mul(Number.NaN);
    const old = inputs.oldLogprobs ?? out.logprobs.detach();
    const weights = cfg.rolloutCorrection === null
      ? null
      : rolloutWeights(old, inputs.rolloutLogprobs!, out.mask, cfg.rolloutCorrection);
    const pg = ppoClippedLoss(out.logprobs, old, inputs.advantages, out.mask, {
      clip: cfg.clip,
      clipHigh: cfg.clipHigh ?? cfg.clip,
      clipRatioC: cfg.clipRatioC,
      ratioLevel: cfg.ratioLevel,
      weights,
      tokens: n,
    });
    const ref = inputs.refLogprobs;
    const klTerms = ref ? klPenalty(out.logprobs, ref, out.mask, cfg.klEstimator, n) : null;
    // Token-mean as the parts' own means; another aggregation weighs the same per-token terms otherwise. The
    // entropy bonus stays a token mean (as TRL's), so that its coefficient means the same under every one.
    const agg = cfg.lossAggregation;
    const w = agg === "token_mean"
      ? null
      : lossWeights(out.mask, agg, { sequences: inputs.sequences, maxTokens: inputs.maxTokens });
    const policyLoss = w ? weightedSum(pg.perToken, w) : pg.loss;
    const kl = klTerms ? (w ? weightedSum(klTerms.perToken, w) : klTerms.mean) : null; // the loss's term
    const entropy = entropyBonus(out.entropy, out.mask, n);
    // The router loss is a per-forward mean: weighted by this batch's share of the minibatch's tokens
    // (on the device: reading the count back would wait for the queued work).
    const aux = cfg.routerAuxCoef > 0
      ? routerAuxLoss(out.routerLogits!, inputs.routerTopK!, inputs.attentionMask).mul(
        n === undefined ? 1 : out.mask.sum().div(n),
      )
      : null;
    let loss = policyLoss.sub(entropy.mul(cfg.entropyCoef));
    if (kl && cfg.klCoef > 0) loss = loss.add(kl.mul(cfg.klCoef));
    if (aux) loss = loss.add(aux.mul(cfg.routerAuxCoef));
    const parts: Record<ObjectivePart, Tensor> = {
      policy_loss: policyLoss,
      kl: klTerms?.mean ?? nan(), // a token mean, whatever the aggregation (as kl_k1)
      kl_k1: ref ? klPenalty(out.logprobs, ref, out.mask, "k1", n).mean : nan(),
      entropy,
      router_aux_loss: aux ?? nan(),
      clip_fraction: pg.clipFraction,
      clip_low_fraction: pg.clipLowFraction,
      dual_clip_fraction: pg.dualClipFraction ?? nan(),
      approx_kl: pg.approxKl,
      ratio_mean: pg.ratioMean,
      is_weight_mean: weights ? maskedMean(weights, out.mask, n) : maskedMean(out.mask, out.mask, n),
    };
    const stacked = stack(OBJECTIVE_PARTS.map((p) => parts[p].detach().to("float32").reshape([]))).detach();
    return { loss, parts: stacked };
  });
}
