/**
 * The PPO losses as pure tensor functions, each usable and tested on its own.
 * Per-token inputs are [B, T] aligned with the tokens (rl/policy.ts
 * `PolicyOutput`); `mask` is 1 on completion tokens and 0 on prompt and
 * padding tokens, which therefore contribute nothing, not even NaNs.
 *
 * Aggregation ("token mean"): a per-token quantity x is reduced to
 * `Σ mask·x / n`, with n the number of valid tokens: by default those of the
 * given batch ({@link maskedMean}); pass `tokens` to divide by the valid
 * tokens of a whole minibatch instead, so that micro-batches accumulate to
 * the minibatch's token mean (TRL's `dapo` aggregation; verl's `token-mean`).
 * Each token weighs the same, so long completions are not down-weighted as
 * with GRPO's per-sequence mean (docs/rl-update.md). {@link lossWeights}
 * gives the other aggregations, as per-token weights for {@link weightedSum}.
 *
 * All functions allocate only inside `tidy`; the tensors they return are the
 * caller's. Metrics (clip fractions, approximate KL, ...) carry no autograd
 * history.
 * @module
 */
import { type Tensor, tidy } from "../ffi/mod.ts";
import { loadBalancingLoss } from "../model/moe.ts";

/**
 * KL estimators (Schulman's k1, k2, k3) of KL(π_θ ‖ π_ref) on sampled tokens.
 * Only k2 and k3 belong in a loss: k1's expected gradient is zero.
 */
export type KlEstimator = "k1" | "k2" | "k3";

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
 * `Σ mask·x / n`: the mean of x over the tokens where mask is nonzero, n
 * being their number (at least 1), or `tokens` when given (see the module
 * doc). Masked positions are zeroed with masked_fill, so a NaN or ±inf there
 * does not leak in. Returns a scalar.
 */
export function maskedMean(x: Tensor, mask: Tensor, tokens?: number): Tensor {
  if (tokens !== undefined && !(tokens > 0)) {
    throw new RangeError(`maskedMean: tokens must be > 0, got ${tokens}`);
  }
  return tidy(() => {
    const m = mask.to("float32");
    const sum = x.maskedFill(m.eq(0), 0).mul(m).sum();
    return tokens === undefined ? sum.div(m.sum().clamp(1)) : sum.div(tokens);
  });
}

/**
 * How per-token loss terms add up to a minibatch's loss (verl's `loss_agg_mode`; TRL's `loss_type` in
 * brackets), n being the minibatch's trained tokens, S its trained sequences, |o_i| sequence i's trained tokens
 * and L the completion token cap:
 * - "token_mean": Σ x / n, every token alike (TRL "dapo", verl "token-mean");
 * - "seq_mean_token_mean": Σ_i (Σ_t x / |o_i|) / S, every sequence alike, so a long completion's tokens weigh
 *   less (TRL "grpo", the GRPO paper; GSPO's setup with the sequence ratio);
 * - "seq_mean_token_sum_norm": Σ x / (S·L), a constant divisor, without GRPO's length bias (TRL "dr_grpo",
 *   Dr. GRPO, Liu et al. 2025).
 */
export const LOSS_AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] as const;

/** One of {@link LOSS_AGGREGATIONS}. */
export type LossAggregation = typeof LOSS_AGGREGATIONS[number];

/** What {@link lossWeights} divides by: the whole minibatch's counts, so that micro-batches add up to it. */
export interface AggregationCounts {
  /** Trained tokens of the minibatch ("token_mean"; default: the batch's). */
  tokens?: number;
  /** Trained sequences of the minibatch (the "seq_mean" modes; default: the batch's rows). */
  sequences?: number;
  /** The completion token cap L ("seq_mean_token_sum_norm", required). */
  maxTokens?: number;
}

/**
 * Each token's weight [B, T] (float32, 0 off the mask) in the minibatch's loss under `aggregation`: the loss
 * is {@link weightedSum}(x, weights).
 * @throws {RangeError} for an unknown aggregation, a count that is not > 0, or "seq_mean_token_sum_norm"
 *   without maxTokens
 */
export function lossWeights(
  mask: Tensor,
  aggregation: LossAggregation,
  counts: AggregationCounts = {},
): Tensor {
  if (!LOSS_AGGREGATIONS.includes(aggregation)) {
    throw new RangeError(
      `lossWeights: aggregation must be one of ${LOSS_AGGREGATIONS.join(", ")}, got ${
        JSON.stringify(aggregation)
      }`,
    );
  }
  for (const [k, v] of Object.entries(counts)) {
    if (v !== undefined && !(v > 0)) throw new RangeError(`lossWeights: ${k} must be > 0, got ${v}`);
  }
  if (aggregation === "seq_mean_token_sum_norm" && counts.maxTokens === undefined) {
    throw new RangeError('lossWeights: "seq_mean_token_sum_norm" divides by the token cap: give maxTokens');
  }
  return tidy(() => {
    const m = mask.to("float32");
    if (aggregation === "token_mean") return m.div(counts.tokens ?? Math.max(1, m.sum().item()));
    const sequences = counts.sequences ?? m.size(0);
    if (aggregation === "seq_mean_token_sum_norm") return m.div(counts.maxTokens! * sequences);
    return m.div(m.sum(1, true).clamp(1).mul(sequences));
  });
}

/** `Σ w·x` over the positions where w is nonzero (a NaN or ±inf elsewhere does not leak in). A scalar. */
export function weightedSum(x: Tensor, weights: Tensor): Tensor {
  sameShape("weightedSum", x, weights);
  return tidy(() => x.maskedFill(weights.eq(0), 0).mul(weights).sum());
}

/** Where the PPO ratio is taken: "token" (PPO) or "sequence" (GSPO); see {@link ClipOptions.ratioLevel}. */
export const RATIO_LEVELS = ["token", "sequence"] as const;

/** One of {@link RATIO_LEVELS}. */
export type RatioLevel = typeof RATIO_LEVELS[number];

/** Options of {@link ppoClippedLoss}. */
export interface ClipOptions {
  /** ε: the ratio is clipped below at 1 − ε (default 0.2). */
  clip?: number;
  /** ε_high: the ratio is clipped above at 1 + ε_high (default: clip; DAPO's "clip higher" is 0.28). */
  clipHigh?: number;
  /**
   * Dual clip c > 1 (null or absent: off): where A < 0 the token's loss is at most −c·A (times its weight),
   * so a token whose ratio has run far above 1 stops pushing (verl's `clip_ratio_c`, Ye et al. 2020).
   */
  clipRatioC?: number | null;
  /**
   * "token" (PPO): one ratio per token. "sequence" (GSPO): each sequence's
   * length-normalised ratio exp(mean_t(log π − log π_old)), the same for all
   * its tokens, with each token's gradient flowing through its own log-prob.
   */
  ratioLevel?: RatioLevel;
  /** Per-token weights [B, T] multiplying the loss (detached): the rollout correction. */
  weights?: Tensor | null;
  /** Divide by this many tokens instead of the batch's (see the module doc). */
  tokens?: number;
}

/** What {@link ppoClippedLoss} returns: scalars but perToken; only `loss` and `perToken` have autograd history. */
export interface PpoLossResult {
  /** The clipped surrogate loss, token-mean. */
  loss: Tensor;
  /** Each token's (weighted) term of it [B, T], 0 off the mask: for another aggregation ({@link lossWeights}). */
  perToken: Tensor;
  /** Fraction of valid tokens where the clip is active (its gradient is cut off). */
  clipFraction: Tensor;
  /** The part of clipFraction below 1 − ε (negative advantages). */
  clipLowFraction: Tensor;
  /** With a dual clip, the fraction of valid tokens it bounds (A < 0 and r > c); else null. */
  dualClipFraction: Tensor | null;
  /** Token-mean of `(r − 1) − log r`, an estimate of KL(old ‖ new) (Schulman's k3). */
  approxKl: Tensor;
  /** Token-mean of the ratio r. */
  ratioMean: Tensor;
}

/**
 * PPO's clipped surrogate loss:
 * `r = exp(logp − old)`, per token `−w·min(r·A, clip(r, 1−ε, 1+ε_high)·A)`,
 * token-mean over the mask (w: optional weights, 1 by default). The clip is
 * active (zero gradient) where r < 1−ε with A < 0 or r > 1+ε_high with A > 0.
 * With a dual clip c the loss of a token with A < 0 is at most −c·A.
 *
 * With old = logprobs.detach() (one optimizer step per rollout) r = 1 and the
 * gradient is the vanilla policy gradient `−Σ mask·w·A·∇logp / n`.
 * @param logprobs log π_θ of the tokens [B, T], with autograd
 * @param oldLogprobs log π_old [B, T] (detached here)
 * @param advantages per sequence [B] (broadcast to its tokens) or per token [B, T] (detached here)
 * @param mask 1 on tokens that count [B, T]
 * @throws {RangeError} for mismatched shapes, a negative clip or an unknown ratio level
 */
export function ppoClippedLoss(
  logprobs: Tensor,
  oldLogprobs: Tensor,
  advantages: Tensor,
  mask: Tensor,
  opts: ClipOptions = {},
): PpoLossResult {
  sameShape("ppoClippedLoss", logprobs, oldLogprobs, mask);
  if (opts.weights) sameShape("ppoClippedLoss weights", logprobs, opts.weights);
  const [b, t] = logprobs.shape;
  const a = advantages.shape;
  if (!((a.length === 1 && a[0] === b) || (a.length === 2 && a[0] === b && a[1] === t))) {
    throw new RangeError(`ppoClippedLoss: advantages must be [${b}] or [${b}, ${t}], got [${a.join(", ")}]`);
  }
  const low = opts.clip ?? 0.2, high = opts.clipHigh ?? low, dual = opts.clipRatioC ?? null;
  if (!(low >= 0 && high >= 0)) {
    throw new RangeError(`ppoClippedLoss: clip must be >= 0, got ${low}, ${high}`);
  }
  if (dual !== null && !(dual > 1)) {
    throw new RangeError(`ppoClippedLoss: clipRatioC must be > 1, got ${dual}`);
  }
  const level = opts.ratioLevel ?? "token";
  if (!RATIO_LEVELS.includes(level)) {
    throw new RangeError(
      `ppoClippedLoss: ratioLevel must be one of ${RATIO_LEVELS.join(", ")}, got ${JSON.stringify(level)}`,
    );
  }
  return tidy(() => {
    const valid = mask.ne(0);
    const adv = (a.length === 1 ? advantages.unsqueeze(1) : advantages).detach().to("float32").expand([
      b!,
      t!,
    ]);
    let logRatio = logprobs.sub(oldLogprobs.detach()).maskedFill(valid.logicalNot(), 0);
    if (level === "sequence") {
      const m = mask.to("float32");
      const seq = logRatio.mul(m).sum(1, true).div(m.sum(1, true).clamp(1)).detach();
      logRatio = seq.add(logprobs.sub(logprobs.detach())).maskedFill(valid.logicalNot(), 0);
    }
    // ±20 as verl: a token the policy has moved e^20-fold gets a finite ratio (and the clips a zero gradient)
    // rather than an infinite one whose backward is NaN.
    const ratio = logRatio.clamp(-20, 20).exp();
    let surrogate = ratio.mul(adv).minimum(ratio.clamp(1 - low, 1 + high).mul(adv)).neg();
    // Dual clip: at most −c·A where A < 0 (a constant there, so no gradient); no bound where A ≥ 0.
    if (dual !== null) surrogate = surrogate.minimum(adv.mul(-dual).maskedFill(adv.ge(0), Infinity));
    const weighted = (opts.weights ? surrogate.mul(opts.weights.detach()) : surrogate).maskedFill(
      valid.logicalNot(),
      0,
    );
    const loss = maskedMean(weighted, mask, opts.tokens);
    const r = ratio.detach(), lr = logRatio.detach();
    const below = r.lt(1 - low).logicalAnd(adv.lt(0));
    const above = r.gt(1 + high).logicalAnd(adv.gt(0));
    return {
      loss,
      perToken: weighted,
      clipFraction: maskedMean(below.logicalOr(above).to("float32"), mask, opts.tokens),
      clipLowFraction: maskedMean(below.to("float32"), mask, opts.tokens),
      dualClipFraction: dual === null
        ? null
        : maskedMean(r.gt(dual).logicalAnd(adv.lt(0)).to("float32"), mask, opts.tokens),
      approxKl: maskedMean(r.sub(1).sub(lr), mask, opts.tokens),
      ratioMean: maskedMean(r, mask, opts.tokens),
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
 * A per-token estimate of KL(π_θ ‖ π_ref) on the sampled tokens, with
 * δ = ref − logp (refLogprobs detached; the gradient flows through logprobs):
 * - "k1": `−δ`; unbiased, but its expected gradient is zero: log it, do not
 *   put it in a loss;
 * - "k2": `½·δ²`; biased, but its gradient `−δ·∇logp` is, in expectation,
 *   the gradient of the true KL;
 * - "k3" (default): `exp(δ) − δ − 1 ≥ 0`; unbiased, low variance; δ is
 *   clamped to ±20 and the value to at most 10 (verl's low_var_kl; TRL does
 *   not clamp), so one token the reference finds impossible cannot blow the
 *   loss up. The cap also zeroes the gradient where δ > 2.61 (the policy finds
 *   the token over 13.6× less likely than the reference) and where δ < −11.0
 *   (over e^11 ≈ 60,000× more likely), as in verl. Its value
 *   estimates KL(π_θ ‖ π_ref), but its gradient `(1 − π_ref/π_θ)·∇logp` is,
 *   in expectation, that of the reverse KL(π_ref ‖ π_θ) (as in TRL and verl,
 *   which put k3 in the loss too).
 * @throws {RangeError} for mismatched shapes or an unknown estimator
 */
export function klPenalty(
  logprobs: Tensor,
  refLogprobs: Tensor,
  mask: Tensor,
  estimator: KlEstimator = "k3",
  tokens?: number,
): KlResult {
  sameShape("klPenalty", logprobs, refLogprobs, mask);
  if (estimator !== "k1" && estimator !== "k2" && estimator !== "k3") {
    throw new RangeError(`klPenalty: estimator must be "k1", "k2" or "k3", got ${JSON.stringify(estimator)}`);
  }
  return tidy(() => {
    const delta = refLogprobs.detach().sub(logprobs).maskedFill(mask.eq(0), 0);
    let perToken: Tensor;
    if (estimator === "k1") perToken = delta.neg();
    else if (estimator === "k2") perToken = delta.square().mul(0.5);
    else {
      const d = delta.clamp(-20, 20);
      perToken = d.exp().sub(d).sub(1).clamp(-10, 10);
    }
    return { perToken, mean: maskedMean(perToken, mask, tokens) };
  });
}

/**
 * The token-mean entropy of the policy over the mask (a scalar with autograd).
 * It is a bonus: the loss subtracts `entropyCoef · entropyBonus(...)`.
 */
export function entropyBonus(entropy: Tensor, mask: Tensor, tokens?: number): Tensor {
  sameShape("entropyBonus", entropy, mask);
  return maskedMean(entropy, mask, tokens);
}

/**
 * The critic's loss `½·(v − target)²`, token-mean over the mask. The ½ (as
 * TRL's PPO and verl) makes the gradient `v − target`. Targets are constants
 * (detached here).
 * @param values the critic's values [B, T], with autograd
 * @param targets per sequence [B] (broadcast to its tokens) or per token [B, T]
 * @param mask 1 on the tokens whose value is trained [B, T]
 * @throws {RangeError} for mismatched shapes
 */
export function valueLoss(values: Tensor, targets: Tensor, mask: Tensor, tokens?: number): Tensor {
  sameShape("valueLoss", values, mask);
  const [b, t] = values.shape;
  const ts = targets.shape;
  if (!((ts.length === 1 && ts[0] === b) || (ts.length === 2 && ts[0] === b && ts[1] === t))) {
    throw new RangeError(`valueLoss: targets must be [${b}] or [${b}, ${t}], got [${ts.join(", ")}]`);
  }
  return tidy(() => {
    const target = (ts.length === 1 ? targets.unsqueeze(1) : targets).detach().to(values.dtype);
    return maskedMean(values.sub(target).square().mul(0.5), mask, tokens);
  });
}

/**
 * The router load-balancing loss (Switch/Mixtral auxiliary loss,
 * model/moe.ts `loadBalancingLoss`) over every MoE layer's router logits of
 * a forward pass, counting only tokens where attentionMask is 1 (off by
 * default in verl and OpenRLHF, 0.001 in TRL).
 * @param routerLogits one [B·S, E] tensor per MoE layer (decoder.forward's `routerLogits`)
 * @param k experts per token (config `numExpertsPerTok`)
 * @param attentionMask [B, S], 1 for real tokens
 */
export function routerAuxLoss(routerLogits: readonly Tensor[], k: number, attentionMask?: Tensor): Tensor {
  if (routerLogits.length === 0) throw new RangeError("routerAuxLoss: no router logits (no MoE layer)");
  return loadBalancingLoss(routerLogits, k, attentionMask);
}
