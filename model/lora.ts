/**
 * LoRA (Hu et al. 2021) as PEFT computes it: y = base(x) + dropout(x) Aᵀ Bᵀ · α/r,
 * A [r, in] Kaiming-uniform, B [out, r] zero, the base frozen. Adapters can be
 * switched off (the frozen reference policy is the same weights with adapters
 * off) and merged into / unmerged from full-precision base weights.
 *
 * A and B are float32 whatever the base's dtype, as PEFT keeps them: an AdamW
 * step of ~1e-5 on a bfloat16 weight of ~0.03 (whose spacing there is ~1e-4)
 * rounds back to the same value, so bfloat16 adapters would barely train. The
 * forward pass casts them to the activations' dtype (mixed precision: float32
 * master weights, bfloat16 products), so the activations stay as they were.
 * @module
 */
import { type DType, keep, linear, noGrad, rand, type Tensor, tidy, zeros } from "../ffi/mod.ts";
import { Linear, type LinearLayer } from "./layers.ts";

/** LoRA hyperparameters (PEFT's LoraConfig names in comments). */
export interface LoraOptions {
  /** Rank r. */
  r: number;
  /** Scale numerator: the update is multiplied by alpha / r (lora_alpha). */
  alpha: number;
  /** Dropout on the adapter's input while training (lora_dropout). */
  dropout: number;
}

/** Switches shared by all adapters of a model. */
export class LoraState {
  /** Adapters add their update (false: the frozen base model, e.g. the reference policy). */
  enabled = true;
  /** Training mode: adapter dropout is active. */
  training = false;
}

/** Kaiming-uniform (a = √5) bound for a [rows, fanIn] matrix, as nn.Linear and PEFT initialise lora_A. */
function kaimingBound(fanIn: number): number {
  return 1 / Math.sqrt(fanIn);
}

/** A fresh trainable tensor kept out of every scope. */
function param(t: Tensor): Tensor {
  return keep(t.setRequiresGrad(true));
}

/** The dtype of every adapter weight: float32 (see the module doc). */
export const ADAPTER_DTYPE: DType = "float32";

/** An adapter weight in the activations' dtype: itself when they match (no call per step on a float32 model). */
export function inDtype(w: Tensor, dtype: DType): Tensor {
  return w.dtype === dtype ? w : w.to(dtype);
}

/** Uniform(−b, b) of shape, float32 on like's device. */
function uniform(shape: number[], bound: number, like: Tensor): Tensor {
  return tidy(() => rand(shape, { dtype: ADAPTER_DTYPE, device: like.device }).mul(2 * bound).sub(bound));
}

/** Inverted dropout of x with probability p (a copy of x when p is 0 or not training). */
export function dropout(x: Tensor, p: number, training: boolean): Tensor {
  if (!training || p <= 0) return x.clone();
  return tidy(() => {
    const keepMask = rand(x.shape, { dtype: x.dtype, device: x.device }).ge(p);
    return x.mul(keepMask.to(x.dtype)).div(1 - p);
  });
}

/** What an adapter reads: x itself when no dropout applies (no copy; the caller must not free it), else dropout's. */
export function adapterInput(x: Tensor, p: number, training: boolean): Tensor {
  return training && p > 0 ? dropout(x, p, true) : x;
}

/** A linear layer with a LoRA update on top of a frozen base (plain or 4-bit). */
export class LoraLinear implements LinearLayer {
  /** The frozen layer. */
  readonly base: LinearLayer;
  /** Down-projection [r, in], trainable, float32. */
  readonly A: Tensor;
  /** Up-projection [out, r], trainable, float32. */
  readonly B: Tensor;
  /** α / r. */
  readonly scale: number;
  /** Hyperparameters. */
  readonly opts: LoraOptions;
  /** Shared on/off and training switches. */
  readonly state: LoraState;
  /** True while the update is merged into the base weight. */
  merged = false;

  /**
   * Adds fresh adapters to base. in/out sizes come from the base weight
   * (any layer exposing `weight` [out, in]) or must be given.
   */
  constructor(
    base: LinearLayer,
    dims: { in: number; out: number; like: Tensor },
    opts: LoraOptions,
    state: LoraState,
  ) {
    this.base = base;
    this.opts = opts;
    this.state = state;
    this.scale = opts.alpha / opts.r;
    this.A = param(uniform([opts.r, dims.in], kaimingBound(dims.in), dims.like));
    try {
      this.B = param(zeros([dims.out, opts.r], { dtype: ADAPTER_DTYPE, device: dims.like.device }));
    } catch (e) {
      this.A.dispose(); // out of memory for B: A would be left to no one
      throw e;
    }
  }

  /** base(x) + dropout(x) Aᵀ Bᵀ · α/r (the update skipped when disabled or merged). */
  forward(x: Tensor): Tensor {
    return tidy(() => {
      const y = this.base.forward(x);
      if (!this.state.enabled || this.merged) return y;
      // linear(x, W) is matmul(x, Wᵀ) in libtorch (no bias): the same kernels, two transpose ops fewer.
      const h = linear(adapterInput(x, this.opts.dropout, this.state.training), inDtype(this.A, x.dtype));
      return y.add(linear(h, inDtype(this.B, x.dtype)).mul(this.scale));
    });
  }

  /** The trainable tensors. */
  parameters(): Tensor[] {
    return [this.A, this.B];
  }

  /** Whether {@link merge} can work: the base is a full-precision Linear. */
  get mergeable(): boolean {
    return this.base instanceof Linear;
  }

  /** Adds B A · α/r into the base weight (full-precision Linear bases only). */
  merge(): void {
    if (this.merged) return;
    this.#applyToBase(1);
    this.merged = true;
  }

  /** Subtracts the update again. */
  unmerge(): void {
    if (!this.merged) return;
    this.#applyToBase(-1);
    this.merged = false;
  }

  #applyToBase(sign: 1 | -1): void {
    if (!(this.base instanceof Linear)) {
      throw new TypeError(
        "LoRA merge needs a full-precision base layer (a 4-bit base cannot absorb the update exactly)",
      );
    }
    const w = this.base.weight;
    noGrad(() => tidy(() => w.copy_(w.add(this.B.matmul(this.A).mul(sign * this.scale)))));
  }

  /** Frees A and B (the base belongs to the model). */
  dispose(): void {
    this.A.dispose();
    this.B.dispose();
  }
}
