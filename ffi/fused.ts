/**
 * Fused ops: custom autograd functions in the shim (ffi/shim/fused.cpp) that
 * recompute a large intermediate in the backward pass instead of letting
 * autograd keep it. {@link nf4Linear} decodes a 4-bit weight again in
 * backward (as bitsandbytes' 4-bit matmul does); {@link tokenStats} computes
 * log-probs and entropy from hidden states a chunk of tokens at a time, so no
 * [tokens, vocab] logits outlive a chunk ({@link tokenLogprobs}: log-probs only).
 * @module
 */
import { c, i64, int64, outPtr, pair } from "./handle.ts";
import { check, shim } from "./lib.ts";
import { Tensor, wrap } from "./tensor.ts";

/** The stored parts of a 4-bit NF4 weight, in model/nf4_codec.ts's layout (all borrowed). */
export interface Nf4LinearParts {
  /** uint8 [rows, ⌈n/2⌉]: two codes per byte, the first in the high nibble. */
  packed: Tensor;
  /** float32 [rows, ⌈n/64⌉], or null when double quantised. */
  absmax: Tensor | null;
  /** The double-quantised absmax (codes uint8 [rows, nb], absmax, offset), or null. */
  dq: { codes: Tensor; absmax: Tensor; offset: Tensor } | null;
  /** float32 [256, 2]: the two NF4 values each byte decodes to. */
  pairs: Tensor;
  /** float32 [256, 1]: the 8-bit dynamic map of the double-quantised absmax. */
  dynamic: Tensor;
  /** [out, in], or [E, out, in] for stacked experts (rows = E). */
  shape: readonly number[];
  /** Values decoded per piece, a multiple of 64: bounds the decoder's temporaries. */
  chunk: number;
}

/**
 * y = x·Wᵀ + b for an NF4 weight W [out, in] (or x.bmm(Wᵀ) for stacked W [E,
 * out, in] and x [E, N, in]), W decoded in x's dtype. Autograd keeps only the
 * 4-bit parts; the backward pass decodes W again for ∂x. W is frozen (no
 * gradient); bias, if given, is a plain tensor and gets one if it asks.
 */
export function nf4Linear(x: Tensor, w: Nf4LinearParts, bias: Tensor | null = null): Tensor {
  const dq = w.dq ?? { codes: null, absmax: null, offset: null };
  const parts = [w.packed, w.absmax, dq.codes, dq.absmax, dq.offset, w.pairs, w.dynamic];
  const buf = BigUint64Array.from(parts, (t) => (t ? BigInt(Deno.UnsafePointer.value(t.ptr)) : 0n)); // 0: NULL
  const p = shim().mt_nf4_linear(
    c(),
    x.ptr,
    buf,
    i64(w.shape, "nf4_linear"),
    w.shape.length,
    bias ? bias.ptr : null,
    int64(w.chunk, "nf4Linear"),
  );
  return wrap("nf4_linear", p, x, w.packed, ...(bias ? [bias] : []));
}

/** Per-token log-probs and entropies, float32 [N] each. */
export interface TokenStats {
  /** log π(target) under softmax(logits / temperature). */
  logprobs: Tensor;
  /** Entropy of that distribution. */
  entropy: Tensor;
}

/**
 * Log-prob of each target and entropy of softmax((x·Wᵀ + b) / temperature),
 * for states x [N, H] and an LM head W [V, H] (bias [V] or null), computed
 * `chunk` tokens at a time in float32. Autograd keeps x, W and two [N]
 * vectors; the backward pass recomputes each chunk's logits, so the full [N,
 * V] logits never exist. Gradients reach x, and W and the bias if they ask.
 */
export function tokenStats(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  targets: Tensor,
  temperature: number,
  chunk: number,
): TokenStats {
  const [logprobs, entropy] = headStats(x, weight, bias, targets, temperature, chunk, true);
  return { logprobs, entropy: entropy! };
}

/**
 * The log-probs alone of {@link tokenStats}, the same bits: each chunk skips
 * the [chunk, V] passes that only the entropy needs (log-softmax, exp,
 * product), work that passes reading log-probs only (the reference and
 * old-policy passes) would throw away. `deno task bench:head` times both.
 */
export function tokenLogprobs(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  targets: Tensor,
  temperature: number,
  chunk: number,
): Tensor {
  return headStats(x, weight, bias, targets, temperature, chunk, false)[0];
}

function headStats(
  x: Tensor,
  weight: Tensor,
  bias: Tensor | null,
  targets: Tensor,
  temperature: number,
  chunk: number,
  entropy: boolean,
): [Tensor, Tensor | null] {
  const name = entropy ? "tokenStats" : "tokenLogprobs";
  if (!Number.isInteger(chunk) || chunk < 1) {
    throw new RangeError(`${name}: chunk must be a whole number of tokens ≥ 1, got ${chunk}`);
  }
  const status = shim().mt_token_stats(
    c(),
    x.ptr,
    weight.ptr,
    bias ? bias.ptr : null,
    targets.ptr,
    temperature,
    int64(chunk, name),
    entropy ? 1 : 0,
    pair,
  );
  check(status, "token_stats", () => [x.shape, weight.shape, targets.shape]);
  return [new Tensor(outPtr(pair, 0)), entropy ? new Tensor(outPtr(pair, 1)) : null];
}
