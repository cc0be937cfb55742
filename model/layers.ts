/**
 * Building blocks shared by the decoder families, written to match the
 * Hugging Face transformers numerics (docs/numerics.md).
 * @module
 */
import {
  arange,
  cat,
  full,
  layerNorm,
  linear,
  sdpa,
  sdpaAvailable,
  type Tensor,
  tidy,
  torchVersion,
} from "../ffi/mod.ts";
import { type Check, oneOf } from "./settings.ts";

/** A linear layer y = x Wᵀ + b; LoRA and 4-bit layers implement the same shape. */
export interface LinearLayer {
  /** Applies the layer to x [..., in] → [..., out]. */
  forward(x: Tensor): Tensor;
}

/** A plain dense linear layer over borrowed weight (and bias) tensors. */
export class Linear implements LinearLayer {
  /** Weight [out, in]. */
  readonly weight: Tensor;
  /** Bias [out], if any. */
  readonly bias: Tensor | null;
  /** Wraps existing tensors; the caller keeps ownership. */
  constructor(weight: Tensor, bias: Tensor | null = null) {
    this.weight = weight;
    this.bias = bias;
  }
  /** y = x Wᵀ + b. */
  forward(x: Tensor): Tensor {
    return linear(x, this.weight, this.bias);
  }
}

/** Normalises the last dim: Qwen's RMSNorm or Phi's LayerNorm with bias. */
export interface Norm {
  /** Applies the norm over the last dim. */
  forward(x: Tensor): Tensor;
}

/** RMSNorm as Qwen3: float32 statistics, cast back to the input dtype before the weight. */
export class RmsNorm implements Norm {
  /** Per-channel scale. */
  readonly weight: Tensor;
  /** Variance epsilon. */
  readonly eps: number;
  /** Wraps an existing weight; the caller keeps ownership. */
  constructor(weight: Tensor, eps: number) {
    this.weight = weight;
    this.eps = eps;
  }
  /** weight · to_input_dtype(x · rsqrt(mean(x²) + eps)). */
  forward(x: Tensor): Tensor {
    return tidy(() => {
      const f32 = x.dtype === "float32"; // skip two no-op casts (two FFI calls) per norm
      const xf = f32 ? x : x.to("float32");
      const normed = xf.mul(xf.square().mean(-1, true).add(this.eps).rsqrt());
      return this.weight.mul(f32 ? normed : normed.to(x.dtype));
    });
  }
}

/** LayerNorm over the last dim with weight and bias (PhiMoE). */
export class LayerNorm implements Norm {
  /** Scale. */
  readonly weight: Tensor;
  /** Shift. */
  readonly bias: Tensor;
  /** Variance epsilon. */
  readonly eps: number;
  /** Wraps existing tensors; the caller keeps ownership. */
  constructor(weight: Tensor, bias: Tensor, eps: number) {
    this.weight = weight;
    this.bias = bias;
    this.eps = eps;
  }
  /** (x − mean)/√(var + eps)·w + b. */
  forward(x: Tensor): Tensor {
    return layerNorm(x, [x.size(-1)], this.weight, this.bias, this.eps);
  }
}

/**
 * RoPE cos and sin [B, S, headDim] for integer positions [B, S], computed as
 * transformers does: inv_freq = 1/θ^(2i/d) in float32, freqs = pos·inv_freq,
 * emb = [freqs, freqs], cast to dtype.
 */
export function ropeCosSin(
  positions: Tensor,
  headDim: number,
  theta: number,
  dtype: Tensor["dtype"],
): [Tensor, Tensor] {
  return tidy(() => {
    const device = positions.device;
    const exponents = arange(0, headDim, 2, { dtype: "int64", device }).to("float32").div(headDim);
    const invFreq = full([1], theta, { device }).pow(exponents).reciprocal(); // [d/2]
    const freqs = positions.to("float32").unsqueeze(-1).mul(invFreq); // [B, S, d/2]
    const emb = cat([freqs, freqs], -1);
    return dtype === "float32" ? [emb.cos(), emb.sin()] : [emb.cos().to(dtype), emb.sin().to(dtype)];
  });
}

/** Applies rotary embeddings to x [B, heads, S, d] with cos/sin broadcastable to it ([B, 1, S, d]). */
export function applyRope(x: Tensor, cos: Tensor, sin: Tensor): Tensor {
  return tidy(() => {
    const half = x.size(-1) / 2;
    const rotated = cat([x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)], -1);
    return x.mul(cos).add(rotated.mul(sin));
  });
}

/** How attention is computed: "sdpa" (libtorch's fused kernels), "eager" (plain ops), "auto" (SDPA where available). */
export type AttentionImpl = "auto" | "sdpa" | "eager";

/** The {@link AttentionImpl} values, for settings checks. */
export const ATTENTION_IMPLS: readonly AttentionImpl[] = ["auto", "sdpa", "eager"];

/** The settings check of an {@link AttentionImpl} (train config `model.attention`, `loadModel`'s option). */
export const ATTENTION_CHECK: Check = oneOf(...ATTENTION_IMPLS);

let hasSdpa: boolean | undefined; // one library per process: ask it once

/**
 * The path an {@link AttentionImpl} takes with the loaded libtorch: "auto" is
 * "sdpa" when libtorch has it (≥ 2.1), else "eager".
 * @throws {Error} for "sdpa" when this libtorch has no SDPA
 */
export function resolveAttention(impl: AttentionImpl): "sdpa" | "eager" {
  if (impl === "eager") return "eager";
  hasSdpa ??= sdpaAvailable();
  if (hasSdpa) return "sdpa";
  if (impl === "auto") return "eager";
  throw new Error(
    `attention "sdpa": scaled_dot_product_attention is not available in libtorch ${torchVersion()} ` +
      '(it needs 2.1 or later); use "auto" or "eager"',
  );
}

/**
 * Grouped-query attention: q [B, nH, S, d], k and v [B, nKV, T, d], additive
 * mask [B, 1, S, T] (or null). Returns [B, S, nH·d]. `impl` picks libtorch's
 * fused SDPA or the eager ops ({@link eagerAttention}); both give a query row
 * that sees no key (a left pad) the mean of the values, never NaN.
 */
export function attention(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  mask: Tensor | null,
  scale: number,
  impl: AttentionImpl = "auto",
): Tensor {
  if (resolveAttention(impl) === "eager") return eagerAttention(q, k, v, mask, scale);
  return tidy(() => {
    const [b, nH, s, d] = q.shape as [number, number, number, number];
    return sdpa(q, k, v, mask, { scale }).transpose(1, 2).reshape([b, s, nH * d]);
  });
}

/**
 * Eager grouped-query attention: q [B, nH, S, d], k and v [B, nKV, T, d],
 * additive mask [B, 1, S, T] (or null). Softmax in float32, cast back before
 * × V, as transformers' eager path. Returns [B, S, nH·d].
 */
export function eagerAttention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | null, scale: number): Tensor {
  return tidy(() => {
    const [b, nH, s, d] = q.shape as [number, number, number, number];
    const [, nKV, t] = k.shape as [number, number, number];
    const rep = nH / nKV;
    // GQA without copying keys and values: the rep query heads that share a KV head are folded into that
    // head's query rows ([B, nKV, rep·S, d]), and the mask is repeated for them instead.
    const qg = q.reshape([b, nKV, rep * s, d]);
    let scores = qg.matmul(k.transpose(-1, -2)).mul(scale); // [B, nKV, rep·S, T]
    if (mask) {
      scores = rep === 1 || s === 1
        ? scores.add(mask)
        : scores.add(mask.unsqueeze(2).expand([b, 1, rep, s, t]).reshape([b, 1, rep * s, t]));
    }
    const p32 = scores.softmax(-1, "float32");
    const probs = q.dtype === "float32" ? p32 : p32.to(q.dtype);
    return probs.matmul(v).reshape([b, nH, s, d]).transpose(1, 2).reshape([b, s, nH * d]);
  });
}

/** The most negative finite value of a float dtype (transformers masks with torch.finfo(dtype).min). */
export function dtypeMin(dtype: Tensor["dtype"]): number {
  if (dtype === "bfloat16") return -3.3895313892515355e38;
  if (dtype === "float16") return -65504;
  if (dtype === "float64") return -Number.MAX_VALUE;
  return -3.4028234663852886e38;
}

/**
 * Additive attention mask [B, 1, S, T] for queries at cache slots
 * start..start+S−1 over key slots 0..T−1: a key is visible if it is at or
 * before the query and keyValid [B, T] (nonzero = real token) is set.
 */
export function causalMask(keyValid: Tensor, start: number, queries: number, dtype: Tensor["dtype"]): Tensor {
  return tidy(() => {
    const device = keyValid.device;
    const [b, t] = keyValid.shape as [number, number];
    const qPos = arange(start, start + queries, 1, { device }).unsqueeze(1); // [S, 1]
    const kPos = arange(0, t, 1, { device }).unsqueeze(0); // [1, T]
    const visible = kPos.le(qPos).unsqueeze(0).logicalAnd(keyValid.ne(0).unsqueeze(1)); // [B, S, T]
    return full([b, queries, t], 0, { dtype, device }).maskedFill(visible.logicalNot(), dtypeMin(dtype))
      .unsqueeze(1);
  });
}
