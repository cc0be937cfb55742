/**
 * Fused attention: libtorch's `scaled_dot_product_attention`, which runs the
 * flash, memory-efficient, cuDNN or math kernel it finds best for the inputs.
 * Builds against libtorch older than 2.1 do not have it:
 * {@link sdpaAvailable} says so, and the model keeps its eager path
 * (model/layers.ts).
 * @module
 */
import { c } from "./handle.ts";
import { check, shim } from "./lib.ts";
import { type Tensor, wrap } from "./tensor.ts";

/** What this build's libtorch offers. */
export interface SdpaSupport {
  /** `sdpa` works (libtorch ≥ 2.1). */
  available: boolean;
  /** Query heads share key/value heads through libtorch's `enable_gqa` (≥ 2.5); otherwise they are repeated. */
  nativeGqa: boolean;
}

/** Whether {@link sdpa} works with the loaded libtorch, and how it handles GQA. */
export function sdpaSupport(): SdpaSupport {
  const bits = shim().mt_sdpa_available();
  return { available: (bits & 1) !== 0, nativeGqa: (bits & 2) !== 0 };
}

/** True when {@link sdpa} works with the loaded libtorch (≥ 2.1). */
export function sdpaAvailable(): boolean {
  return sdpaSupport().available;
}

/** Options of {@link sdpa}. */
export interface SdpaOptions {
  /** Multiplies q·kᵀ (default 1/√d). */
  scale?: number;
  /** A causal mask aligned at the top left, for S = T and no `mask`. */
  causal?: boolean;
}

/**
 * softmax(q·kᵀ·scale + mask)·v for q [B, nH, S, d] and k, v [B, nKV, T, d],
 * where nKV divides nH and query head h reads key/value head h / (nH/nKV).
 * Returns [B, nH, S, d] in q's dtype.
 *
 * The mask (or null) broadcasts to [B, nH, S, T]: additive in q's dtype, or
 * boolean with true where a key is visible. A boolean mask is turned into an
 * additive one with the dtype's most negative finite value, so a query row
 * that sees no key gives the mean of the values, as an additive mask does,
 * never NaN.
 * @throws {TorchError} on shape or dtype mismatches, and when this libtorch has no SDPA
 */
export function sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | null, opts: SdpaOptions = {}): Tensor {
  const scale = opts.scale ?? 1 / Math.sqrt(q.size(-1));
  const p = shim().mt_sdpa(c(), q.ptr, k.ptr, v.ptr, mask ? mask.ptr : null, scale, opts.causal ? 1 : 0);
  return wrap("sdpa", p, q, k, v, ...(mask ? [mask] : []));
}

/** A kernel libtorch's SDPA can run. */
export type SdpaBackend = "math" | "flash" | "memory-efficient" | "cudnn" | "overrideable" | "none";

const BACKENDS: readonly SdpaBackend[] = ["math", "flash", "memory-efficient", "cudnn", "overrideable"];

/**
 * The kernel {@link sdpa} would run for these arguments (libtorch's own
 * choice, from shapes, dtypes, device and mask alone; nothing is computed).
 * @throws {TorchError} when this libtorch has no SDPA
 */
export function sdpaBackend(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  mask: Tensor | null,
  opts: SdpaOptions = {},
): SdpaBackend {
  const scale = opts.scale ?? 1 / Math.sqrt(q.size(-1));
  const out = new Int32Array(1);
  const status = shim().mt_sdpa_backend(
    c(),
    q.ptr,
    k.ptr,
    v.ptr,
    mask ? mask.ptr : null,
    scale,
    opts.causal ? 1 : 0,
    out,
  );
  check(status, "sdpa_backend", () => [q.shape, k.shape, v.shape, ...(mask ? [mask.shape] : [])]);
  return BACKENDS[out[0]!] ?? "none";
}
