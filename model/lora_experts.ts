/**
 * LoRA on MoE experts, batched over experts: per expert e and projection p,
 * Δ_p(x) = dropout(x) A_p[e]ᵀ B_p[e]ᵀ · α/r with A_p [E, r, in], B_p [E, out, r].
 *
 * The gate/up projection carries one adapter over both ("fused") or one each
 * ("split"); the down projection carries one (see {@link ExpertLoraForm}).
 * The adapters are float32 and cast to the activations' dtype in the forward
 * pass, as model/lora.ts's.
 * @module
 */
import {
  cat,
  type DType,
  groupedMm,
  keep,
  linear,
  noGrad,
  rand,
  type Tensor,
  tidy,
  zeros,
} from "../ffi/mod.ts";
import { ADAPTER_DTYPE, adapterInput, adapterWeight, type LoraOptions, type LoraState } from "./lora.ts";
import { type ExpertBank, type ExpertNames, groupedMmFits, StackedExperts } from "./moe.ts";

/**
 * "fused": one rank-r adapter over the whole gate/up projection, as PEFT's
 * target_parameters on transformers v5's gate_up_proj (the current format);
 * "split": separate gate and up adapters, as PEFT on transformers 4.x's one
 * module per expert.
 */
export type ExpertLoraForm = "fused" | "split";

/** One adapter over an output slice of a projection: A [E, r, in], B [E, size, r]. */
export interface ExpertAdapter {
  /** First output row of the slice. */
  offset: number;
  /** Rows in the slice. */
  size: number;
  /** [E, r, in], trainable, float32. */
  A: Tensor;
  /** [E, size, r], trainable, float32. */
  B: Tensor;
}

function adapter(
  e: number,
  r: number,
  inDim: number,
  offset: number,
  size: number,
  like: Tensor,
): ExpertAdapter {
  const o = { dtype: ADAPTER_DTYPE, device: like.device };
  const bound = 1 / Math.sqrt(inDim); // Kaiming-uniform(a=√5), as lora_A
  const A = keep(tidy(() => rand([e, r, inDim], o).mul(2 * bound).sub(bound)).setRequiresGrad(true));
  try {
    return { offset, size, A, B: keep(zeros([e, size, r], o).setRequiresGrad(true)) };
  } catch (err) {
    A.dispose(); // out of memory for B: A would be left to no one
    throw err;
  }
}

/** Experts with LoRA adapters on a frozen bank (full precision or 4-bit). */
export class LoraExperts implements ExpertBank {
  /** The frozen experts. */
  readonly base: ExpertBank;
  /** Adapters on the gate/up projection (two for separate gate and up modules, one when fused). */
  readonly gateUpAdapters: ExpertAdapter[];
  /** The adapter on the down projection. */
  readonly downAdapter: ExpertAdapter;
  /** α / r. */
  readonly scale: number;
  /** Hyperparameters. */
  readonly opts: LoraOptions;
  /** Shared switches. */
  readonly state: LoraState;
  /** One adapter over gate and up ("fused") or one each ("split"). */
  readonly form: ExpertLoraForm;
  /** True while merged into the base weights. */
  merged = false;
  /** The activations' dtype (the base's): what the adapters are cast to in the forward pass. */
  readonly #compute: DType;

  /**
   * Adds fresh adapters to base, whose experts have input width `hidden` and
   * expert width `inter`; `like` gives dtype and device.
   */
  constructor(
    base: ExpertBank,
    dims: { hidden: number; inter: number; like: Tensor },
    opts: LoraOptions,
    state: LoraState,
    form: ExpertLoraForm = "fused",
  ) {
    const { hidden: h, inter: i, like } = dims;
    const e = base.count, r = opts.r;
    this.base = base;
    this.opts = opts;
    this.state = state;
    this.form = form;
    this.scale = opts.alpha / r;
    this.#compute = like.dtype;
    const made: ExpertAdapter[] = [];
    const make = (inDim: number, offset: number, size: number): ExpertAdapter => {
      const a = adapter(e, r, inDim, offset, size, like);
      made.push(a);
      return a;
    };
    try {
      this.gateUpAdapters = form === "fused" ? [make(h, 0, 2 * i)] : [make(h, 0, i), make(h, i, i)];
      this.downAdapter = make(i, 0, h);
    } catch (err) {
      for (const a of made) [a.A, a.B].forEach((t) => t.dispose()); // those made before the one that failed
      throw err;
    }
  }

  /** Number of experts. */
  get count(): number {
    return this.base.count;
  }
  /** The base bank's names and layout. */
  get names(): ExpertNames {
    return this.base.names;
  }

  #active(): boolean {
    return this.state.enabled && !this.merged;
  }

  /** The gate/up adapters' updates side by side; a single (fused) adapter's as it is, without a cat copy. */
  #joined(f: (ad: ExpertAdapter) => Tensor): Tensor {
    const [only, ...more] = this.gateUpAdapters;
    return more.length === 0 ? f(only!) : cat(this.gateUpAdapters.map(f), -1);
  }

  #delta(ad: ExpertAdapter, x: Tensor, e: number | null): Tensor {
    const xd = adapterInput(x, this.opts.dropout, this.state.training);
    const [a, b] = [
      adapterWeight(ad.A, x.dtype, this.state.casts, e ?? undefined),
      adapterWeight(ad.B, x.dtype, this.state.casts, e ?? undefined),
    ];
    if (e === null) return xd.bmm(a.transpose(1, 2)).bmm(b.transpose(1, 2)).mul(this.scale);
    return linear(linear(xd, a), b).mul(this.scale); // matmul(·, Wᵀ)
  }

  /** base gate/up of expert e plus the adapters' updates. */
  gateUp(e: number, x: Tensor): Tensor {
    return tidy(() => {
      const y = this.base.gateUp(e, x);
      if (!this.#active()) return y;
      return y.add(this.#joined((ad) => this.#delta(ad, x, e)));
    });
  }
  /** base down of expert e plus the adapter's update. */
  down(e: number, h: Tensor): Tensor {
    return tidy(() => {
      const y = this.base.down(e, h);
      return this.#active() ? y.add(this.#delta(this.downAdapter, h, e)) : y;
    });
  }
  /** Batched over experts. */
  gateUpAll(x: Tensor): Tensor {
    return tidy(() => {
      const y = this.base.gateUpAll(x);
      if (!this.#active()) return y;
      return y.add(this.#joined((ad) => this.#delta(ad, x, null)));
    });
  }
  /** Where the frozen bank has grouped products and the rank suits them. */
  get groupable(): boolean {
    return this.base.groupable === true && groupedMmFits([this.opts.r], this.#compute);
  }

  #deltaGrouped(ad: ExpertAdapter, x: Tensor, offs: Tensor): Tensor {
    const xd = adapterInput(x, this.opts.dropout, this.state.training);
    const [a, b] = [
      adapterWeight(ad.A, x.dtype, this.state.casts),
      adapterWeight(ad.B, x.dtype, this.state.casts),
    ];
    return groupedMm(groupedMm(xd, a.transpose(1, 2), offs), b.transpose(1, 2), offs).mul(this.scale);
  }
  /** Grouped over the experts' rows: base plus the adapters' updates. */
  gateUpGrouped(x: Tensor, offs: Tensor): Tensor {
    return tidy(() => {
      const y = this.base.gateUpGrouped!(x, offs);
      if (!this.#active()) return y;
      return y.add(this.#joined((ad) => this.#deltaGrouped(ad, x, offs)));
    });
  }
  /** Grouped over the experts' rows: base plus the adapter's update. */
  downGrouped(h: Tensor, offs: Tensor): Tensor {
    return tidy(() => {
      const y = this.base.downGrouped!(h, offs);
      return this.#active() ? y.add(this.#deltaGrouped(this.downAdapter, h, offs)) : y;
    });
  }
  /** Batched over experts. */
  downAll(h: Tensor): Tensor {
    return tidy(() => {
      const y = this.base.downAll(h);
      return this.#active() ? y.add(this.#delta(this.downAdapter, h, null)) : y;
    });
  }

  /** The trainable tensors. */
  parameters(): Tensor[] {
    return [...this.gateUpAdapters.flatMap((a) => [a.A, a.B]), this.downAdapter.A, this.downAdapter.B];
  }

  /** Whether {@link merge} can work: the experts are full precision. */
  get mergeable(): boolean {
    return this.base instanceof StackedExperts;
  }

  /** Adds every adapter's B A · α/r into the stacked base weights. */
  merge(): void {
    if (this.merged) return;
    this.#apply(1);
    this.merged = true;
  }

  /** Subtracts the updates again. */
  unmerge(): void {
    if (!this.merged) return;
    this.#apply(-1);
    this.merged = false;
  }

  #apply(sign: 1 | -1): void {
    const base = this.base;
    if (!(base instanceof StackedExperts)) {
      throw new TypeError(
        "LoRA merge needs full-precision experts (a 4-bit base cannot absorb the update exactly)",
      );
    }
    noGrad(() =>
      tidy(() => {
        const add = (w: Tensor, ad: ExpertAdapter): void => {
          const rows = w.narrow(1, ad.offset, ad.size);
          rows.copy_(rows.add(ad.B.bmm(ad.A).mul(sign * this.scale)));
        };
        for (const ad of this.gateUpAdapters) add(base.gateUpWeight, ad);
        add(base.downWeight, this.downAdapter);
      })
    );
  }

  /** Frees the adapters (the base belongs to the model). */
  dispose(): void {
    for (const t of this.parameters()) t.dispose();
  }
}
