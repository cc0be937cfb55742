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
import {
  type DType,
  inGraphFunction,
  isGradEnabled,
  keep,
  linear,
  noGrad,
  rand,
  type Tensor,
  tidy,
  zeros,
} from "../ffi/mod.ts";
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
  /** The held casts of the adapters while {@link holdCasts} holds them, else null. */
  casts: AdapterCasts | null = null;

  /**
   * Holds the adapters' casts to the activations' dtype until the returned handle is disposed: no-grad
   * forwards meanwhile cast each adapter once, not on every call (see {@link AdapterCasts}). Nested holds share
   * the outer one.
   */
  holdCasts(): Disposable {
    if (this.casts) return { [Symbol.dispose]: () => {} };
    const casts = this.casts = new AdapterCasts();
    return {
      [Symbol.dispose]: () => {
        casts.dispose();
        if (this.casts === casts) this.casts = null;
      },
    };
  }
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

/**
 * Casts of adapter weights to the activations' dtype, reused by no-grad forwards while the weights are
 * unchanged: a decode step would otherwise launch two cast kernels per adapter (336 per step at Huihui's
 * shapes). A weight's version (bumped by every in-place write: an optimizer step, a load) tells a held cast
 * from a stale one. Made by {@link LoraState.holdCasts} for a phase that runs many no-grad forwards
 * (generation, the learn phase's old-policy pass), and freed at its end.
 */
export class AdapterCasts {
  readonly #held = new Map<Tensor, { cast: Tensor; version: number }>();

  /** How many casts are held. */
  get size(): number {
    return this.#held.size;
  }

  /** w in dtype, held until w changes (borrowed: do not dispose it). */
  of(w: Tensor, dtype: DType): Tensor {
    const version = w.version;
    let held = this.#held.get(w);
    if (held?.version !== version || held.cast.dtype !== dtype) {
      this.#held.delete(w); // first: a cast that fails (out of memory) must not leave the freed one held
      held?.cast.dispose();
      held = { cast: keep(w.to(dtype)), version };
      this.#held.set(w, held);
    }
    return held.cast;
  }

  /** Frees the held casts. */
  dispose(): void {
    for (const { cast } of this.#held.values()) cast.dispose();
    this.#held.clear();
  }
}

/**
 * w (or its slice `expert` along dim 0) in the activations' dtype, for an adapter's forward: w itself when the
 * dtypes match (no call at all on a float32 model); a held cast in a no-grad forward while `casts` is held;
 * else a fresh cast. A forward that records autograd needs its cast in the graph, and a CUDA graph's function
 * must not read a held cast: its recording would keep reading that tensor after it went stale.
 */
export function adapterWeight(w: Tensor, dtype: DType, casts: AdapterCasts | null, expert?: number): Tensor {
  const pick = (t: Tensor): Tensor => (expert === undefined ? t : t.select(0, expert));
  if (w.dtype === dtype) return pick(w);
  if (casts && !isGradEnabled() && !inGraphFunction()) return pick(casts.of(w, dtype));
  return pick(w).to(dtype); // the expert's slice alone: casting its whole bank per expert would cost E times
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
      const h = linear(
        adapterInput(x, this.opts.dropout, this.state.training),
        adapterWeight(this.A, x.dtype, this.state.casts),
      );
      return y.add(linear(h, adapterWeight(this.B, x.dtype, this.state.casts)).mul(this.scale));
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
