/**
 * The PPO losses as pure tensor functions, each usable and tested on its own.
 * Per-token inputs are [B, T] aligned with the tokens (rl/policy.ts
 * `PolicyOutput`); `mask` is 1 on completion tokens and 0 on prompt and
 * padding tokens, which therefore contribute nothing, not even NaNs.
 *
 * Aggregation ("token mean"): a per-token quantity x is reduced to
 * `Σ mask·x / Σ mask`, the sum over the valid tokens of the batch divided by
 * their number ({@link maskedMean}). This is verl's default `token-mean` and
 * TRL's `bnpo`; TRL's default `dapo` divides by the valid tokens of the whole
 * accumulated batch instead, which equals this when there is no gradient
 * accumulation. Each token weighs the same, so long completions are not
 * down-weighted as with GRPO's per-sequence mean (see rl-notes §3).
 *
 * All functions allocate only inside `tidy`; the tensors they return are the
 * caller's. Metrics (clip fraction, approximate KL, ...) carry no autograd
 * history.
 * @module
 */
import { type Tensor, tidy } from "../ffi/mod.ts";
import { loadBalancingLoss } from "../model/moe.ts";

/** Which KL estimator {@link klPenalty} uses (rl-notes §2). */
export type KlEstimator = "k1" | "k3";

function sameShape(what: string, ...ts: Tensor[]): void {
  const s = ts[0]!.shape.join(", ");
  for (const t of ts) {
    if (t.shape.join(", ") !== s) {
      throw new RangeError(
        `${what}: shapes differ: ${ts.map((x) => `[${x.shape.join(", ")}]`).join(" vs ")}`,
      );
    }
  }
}

/**
 * `Σ mask·x / max(Σ mask, 1)`: the mean of x over the tokens where mask is
 * nonzero (0 when there are none). Masked positions are zeroed with
 * masked_fill, so a NaN or ±inf there does not leak in. Returns a scalar.
 */
export function maskedMean(x: Tensor, mask: Tensor): Tensor {
  return tidy(() => {
    const m = mask.to("float32");
    return x.maskedFill(m.eq(0), 0).mul(m).sum().div(m.sum().clamp(1));
  });
}

/** What {@link ppoClippedLoss} returns: scalars; only `loss` has autograd history. */
export interface PpoLossResult {
  /** The clipped surrogate loss, token-mean. */
  loss: Tensor;
  /** Fraction of valid tokens where the clip is active (its gradient is cut off). */
  clipFraction: Tensor;
  /** Token-mean of `(r − 1) − log r`, an estimate of KL(old ‖ new) (Schulman's k3). */
  approxKl: Tensor;
  /** Token-mean of the ratio r. */
  ratioMean: Tensor;
}

/**
 * PPO's clipped surrogate loss:
 * `r = exp(logp − old)`, per token `−min(r·A, clip(r, 1−ε, 1+ε)·A)`, token-mean
 * over the mask. The clip is active (zero gradient) where r < 1−ε with A < 0
 * or r > 1+ε with A > 0.
 *
 * With old = logprobs.detach() (one update per rollout, μ = 1) r = 1 and
 * the gradient is the vanilla policy gradient `−Σ mask·A·∇logp / Σ mask`.
 * @param logprobs log π_θ of the tokens [B, T], with autograd
 * @param oldLogprobs log π_old [B, T] (detached here)
 * @param advantages per sequence [B] (broadcast to its tokens) or per token [B, T] (detached here)
 * @param mask 1 on tokens that count [B, T]
 * @param clip ε (default 0.2)
 * @throws {RangeError} for mismatched shapes or a negative clip
 */
export function ppoClippedLoss(
  logprobs: Tensor,
  oldLogprobs: Tensor,
  advantages: Tensor,
  mask: Tensor,
  clip = 0.2,
): PpoLossResult {
  sameShape("ppoClippedLoss", logprobs, oldLogprobs, mask);
  const [b, t] = logprobs.shape;
  const a = advantages.shape;
  if (!((a.length === 1 && a[0] === b) || (a.length === 2 && a[0] === b && a[1] === t))) {
    throw new RangeError(`ppoClippedLoss: advantages must be [${b}] or [${b}, ${t}], got [${a.join(", ")}]`);
  }
  if (!(clip >= 0)) throw new RangeError(`ppoClippedLoss: clip must be >= 0, got ${clip}`);
  return tidy(() => {
    const valid = mask.ne(0);
    const adv = (a.length === 1 ? advantages.unsqueeze(1) : advantages).detach().to("float32");
    const logRatio = logprobs.sub(oldLogprobs.detach()).maskedFill(valid.logicalNot(), 0);
    const ratio = logRatio.exp();
    const unclipped = ratio.mul(adv);
    const clipped = ratio.clamp(1 - clip, 1 + clip).mul(adv);
    const loss = maskedMean(unclipped.minimum(clipped).neg(), mask);
    const r = ratio.detach(), lr = logRatio.detach();
    const low = r.lt(1 - clip).logicalAnd(adv.lt(0).expand([b!, t!]));
    const high = r.gt(1 + clip).logicalAnd(adv.gt(0).expand([b!, t!]));
    return {
      loss,
      clipFraction: maskedMean(low.logicalOr(high).to("float32"), mask),
      approxKl: maskedMean(r.sub(1).sub(lr), mask),
      ratioMean: maskedMean(r, mask),
    };
  });
}

/** What {@link klPenalty} returns. */
export interface KlResult {
  /** The estimator's value per token [B, T], 0 at masked positions (with autograd). */
  perToken: Tensor;
  /** Its token-mean (with autograd): add `klCoef · mean` to the loss. */
  mean: Tensor;
}

/**
 * A per-token estimate of KL(π_θ ‖ π_ref) on the sampled tokens, in the loss
 * (as TRL's GRPO: the gradient flows through logprobs; refLogprobs is
 * detached). With δ = ref − logp:
 * - "k1": `−δ = logp − ref`; unbiased but can be negative and noisy, and its
 *   gradient `∇logp` only lowers the likelihood of whatever was sampled;
 * - "k3" (default): `exp(δ) − δ − 1 ≥ 0`; unbiased, low variance; gradient
 *   `(1 − π_ref/π_θ)·∇logp` pulls toward the reference.
 * @throws {RangeError} for mismatched shapes or an unknown estimator
 */
export function klPenalty(
  logprobs: Tensor,
  refLogprobs: Tensor,
  mask: Tensor,
  estimator: KlEstimator = "k3",
): KlResult {
  sameShape("klPenalty", logprobs, refLogprobs, mask);
  if (estimator !== "k1" && estimator !== "k3") {
    throw new RangeError(`klPenalty: estimator must be "k1" or "k3", got ${JSON.stringify(estimator)}`);
  }
  return tidy(() => {
    const delta = refLogprobs.detach().sub(logprobs).maskedFill(mask.eq(0), 0);
    const perToken = estimator === "k1" ? delta.neg() : delta.exp().sub(delta).sub(1);
    return { perToken, mean: maskedMean(perToken, mask) };
  });
}

/**
 * The token-mean entropy of the policy over the mask (a scalar with autograd).
 * It is a bonus: the loss subtracts `entropyCoef · entropyBonus(...)`.
 */
export function entropyBonus(entropy: Tensor, mask: Tensor): Tensor {
  sameShape("entropyBonus", entropy, mask);
  return maskedMean(entropy, mask);
}

/**
 * The critic's loss `mean(0.5·(v − target)²)` over the N sequences. The ½
 * (as TRL's PPO and verl) makes the gradient `v − target`. Targets are the
 * group-centred rewards, constants (detached here).
 * @param values the critic's value per sequence [N], with autograd
 * @param targets the regression targets [N]
 * @throws {RangeError} when the shapes are not both [N]
 */
export function valueLoss(values: Tensor, targets: Tensor): Tensor {
  if (values.ndim !== 1) {
    throw new RangeError(`valueLoss: values must be [N], got [${values.shape.join(", ")}]`);
  }
  sameShape("valueLoss", values, targets);
  return tidy(() => values.sub(targets.detach().to(values.dtype)).square().mean().mul(0.5));
}

/**
 * The router load-balancing loss (Switch/Mixtral auxiliary loss,
 * model/moe.ts `loadBalancingLoss`) over every MoE layer's router logits of
 * a forward pass, counting only tokens where attentionMask is 1. rl/ppo.ts
 * adds `routerAuxCoef` times it when the policy's forward returns router
 * logits (rl-notes §4.4: off in verl and OpenRLHF, 0.001 in TRL).
 * @param routerLogits one [B·S, E] tensor per MoE layer (decoder.forward's `routerLogits`)
 * @param k experts per token (config `numExpertsPerTok`)
 * @param attentionMask [B, S], 1 for real tokens
 */
export function routerAuxLoss(routerLogits: readonly Tensor[], k: number, attentionMask?: Tensor): Tensor {
  if (routerLogits.length === 0) throw new RangeError("routerAuxLoss: no router logits (no MoE layer)");
  return loadBalancingLoss(routerLogits, k, attentionMask);
}
