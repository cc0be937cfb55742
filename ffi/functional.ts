/**
 * Ops over several tensors that read better as functions than as methods.
 * @module
 */
import type { Shape } from "./dtype.ts";
import { c, handles, i64, int64 } from "./handle.ts";
import { shim } from "./lib.ts";
import { type Tensor, wrap } from "./tensor.ts";

/** Joins tensors along an existing dim. */
export function cat(ts: readonly Tensor[], dim = 0): Tensor {
  return wrap("cat", shim().mt_cat(c(), handles(ts), ts.length, int64(dim, "cat")), ...ts);
}

/** Joins tensors along a new dim. */
export function stack(ts: readonly Tensor[], dim = 0): Tensor {
  return wrap("stack", shim().mt_stack(c(), handles(ts), ts.length, int64(dim, "stack")), ...ts);
}

/** Elementwise cond ? a : b (broadcasting). */
export function where(cond: Tensor, a: Tensor, b: Tensor): Tensor {
  return wrap("where", shim().mt_where(c(), cond.ptr, a.ptr, b.ptr), cond, a, b);
}

/** y = x Wᵀ + b, with W of shape [out, in]. */
export function linear(x: Tensor, weight: Tensor, bias?: Tensor | null): Tensor {
  const p = shim().mt_linear(c(), x.ptr, weight.ptr, bias ? bias.ptr : null);
  return bias ? wrap("linear", p, x, weight, bias) : wrap("linear", p, x, weight);
}

/** Rows of weight picked by the int64 ids in index. */
export function embedding(weight: Tensor, index: Tensor): Tensor {
  return wrap("embedding", shim().mt_embedding(c(), weight.ptr, index.ptr), weight, index);
}

/** LayerNorm over the trailing dims given by normalizedShape, with optional affine weight and bias. */
export function layerNorm(
  x: Tensor,
  normalizedShape: Shape,
  weight?: Tensor | null,
  bias?: Tensor | null,
  eps = 1e-5,
): Tensor {
  const p = shim().mt_layer_norm(
    c(),
    x.ptr,
    i64(normalizedShape, "layer_norm"),
    normalizedShape.length,
    weight ? weight.ptr : null,
    bias ? bias.ptr : null,
    eps,
  );
  const inputs = [x, ...(weight ? [weight] : []), ...(bias ? [bias] : [])];
  return wrap("layer_norm", p, ...inputs);
}

let groupedMm_: boolean | undefined; // one library per process: ask it once

/** Whether this libtorch has the grouped matrix product ({@link groupedMm}; libtorch 2.8 and later). */
export function groupedMmAvailable(): boolean {
  return groupedMm_ ??= shim().mt_grouped_mm_available() === 1;
}

/**
 * Grouped matrix product: rows `offs[g−1] .. offs[g]` of a [N, K] times b[g] [K, M], for each group g.
 * a's rows are sorted by group; offs is int32 [G], the cumulative row ends. Differentiable.
 * @throws {TorchError} where libtorch lacks it ({@link groupedMmAvailable}) or for mismatched shapes
 */
export function groupedMm(a: Tensor, b: Tensor, offs: Tensor): Tensor {
  return wrap("grouped_mm", shim().mt_grouped_mm(c(), a.ptr, b.ptr, offs.ptr), a, b, offs);
}
