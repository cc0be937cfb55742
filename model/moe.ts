/**
 * Sparse mixture-of-experts: routers (Qwen3's softmax top-k and PhiMoE's
 * sparsemixer), expert banks, token dispatch, and the load-balancing loss.
 * @module
 */
import {
  arange,
  cat,
  type DType,
  ELEMENT_SIZE,
  groupedMm,
  groupedMmAvailable,
  linear,
  ones,
  type Tensor,
  tensor,
  tidy,
  where,
  zeros,
} from "../ffi/mod.ts";
import type { LinearLayer } from "./layers.ts";

/** Which experts each token uses, and with what weight. */
export interface Routing {
  /** Expert ids [T, k], int64. */
  experts: Tensor;
  /** Weights [T, k] in the activation dtype. */
  weights: Tensor;
  /** Router logits [T, E] (for the load-balancing loss). */
  logits: Tensor;
}

/** How a family names its expert projections, and how the checkpoint stored them. */
export interface ExpertNames {
  /** Module path of the experts, e.g. "model.layers.0.mlp.experts". */
  prefix: string;
  /** Per-expert gate/up/down module names: Qwen3 gate_proj/up_proj/down_proj, PhiMoE w1/w3/w2. */
  gate: string;
  /** See gate. */
  up: string;
  /** See gate. */
  down: string;
  /** "per-expert" (one module per expert) or "fused" (v5's 3-D gate_up_proj / down_proj). */
  layout: "per-expert" | "fused";
}

/**
 * A set of SwiGLU experts, exposed projection by projection so adapters
 * (LoRA) and quantised storage (NF4) can change one projection and keep the
 * rest: expert e computes down(silu(gate(x)) · up(x)).
 */
export interface ExpertBank {
  /** Number of experts. */
  readonly count: number;
  /** Names and stored layout, for adapters and checkpoints. */
  readonly names: ExpertNames;
  /** Expert e's gate and up projections of x [n, H], concatenated: [n, 2I]. */
  gateUp(e: number, x: Tensor): Tensor;
  /** Expert e's down projection of h [n, I]: [n, H]. */
  down(e: number, h: Tensor): Tensor;
  /** Every expert's gate/up projection of x [E, T, H]: [E, T, 2I]. */
  gateUpAll(x: Tensor): Tensor;
  /** Every expert's down projection of h [E, T, I]: [E, T, H]. */
  downAll(h: Tensor): Tensor;
  /** Whether {@link gateUpGrouped} and {@link downGrouped} work (this libtorch has grouped GEMM). */
  readonly groupable?: boolean;
  /** Gate/up of x [N, H] whose rows are sorted by expert, offs int32 [E] the cumulative row ends: [N, 2I]. */
  gateUpGrouped?(x: Tensor, offs: Tensor): Tensor;
  /** Down of h [N, I], rows sorted by expert as in {@link gateUpGrouped}: [N, H]. */
  downGrouped?(h: Tensor, offs: Tensor): Tensor;
}

/**
 * Whether grouped GEMM takes operands with these inner widths: libtorch's
 * kernels want every row stride a multiple of 16 bytes (e.g. a LoRA rank of
 * 16, not 2, in float32).
 */
export function groupedMmFits(widths: readonly number[], dtype: DType): boolean {
  return widths.every((w) => (w * ELEMENT_SIZE[dtype]) % 16 === 0);
}

/** The ways an MoE layer sends tokens to experts (see {@link dispatch}). */
export const MOE_DISPATCHES = ["loop", "dense", "grouped"] as const;

/** How an MoE layer sends tokens to experts (see {@link dispatch}): "loop", "dense" or "grouped". */
export type MoeDispatch = typeof MOE_DISPATCHES[number];

/** Expert e on tokens x [n, H] → [n, H]. */
export function expertForward(bank: ExpertBank, e: number, x: Tensor): Tensor {
  return tidy(() => bank.down(e, swiglu(bank.gateUp(e, x))));
}

/** Every expert on every token, x [T, H] → [E, T, H]: static shapes, no host sync. */
export function expertForwardAll(bank: ExpertBank, x: Tensor): Tensor {
  return tidy(() => {
    const xe = x.unsqueeze(0).expand([bank.count, ...x.shape]);
    return bank.downAll(swiglu(bank.gateUpAll(xe)));
  });
}

/**
 * Experts held as stacked weights, whatever the checkpoint layout:
 * gateUp [E, 2I, H] (gate rows, then up rows) and down [E, H, I].
 */
export class StackedExperts implements ExpertBank {
  /** [E, 2I, H]. */
  readonly gateUpWeight: Tensor;
  /** [E, H, I]. */
  readonly downWeight: Tensor;
  /** Names and stored layout. */
  readonly names: ExpertNames;
  /** Wraps existing tensors; the caller keeps ownership. */
  constructor(gateUp: Tensor, down: Tensor, names: ExpertNames) {
    this.gateUpWeight = gateUp;
    this.downWeight = down;
    this.names = names;
  }
  /** Number of experts. */
  get count(): number {
    return this.gateUpWeight.size(0);
  }
  /** x W_gu[e]ᵀ. */
  gateUp(e: number, x: Tensor): Tensor {
    return tidy(() => linear(x, this.gateUpWeight.select(0, e)));
  }
  /** h W_d[e]ᵀ. */
  down(e: number, h: Tensor): Tensor {
    return tidy(() => linear(h, this.downWeight.select(0, e)));
  }
  /** Batched over experts. */
  gateUpAll(x: Tensor): Tensor {
    return tidy(() => x.bmm(this.gateUpWeight.transpose(1, 2)));
  }
  /** Batched over experts. */
  downAll(h: Tensor): Tensor {
    return tidy(() => h.bmm(this.downWeight.transpose(1, 2)));
  }
  /** Where libtorch has grouped GEMM and the widths suit it ({@link groupedMmFits}). */
  get groupable(): boolean {
    const [, , h] = this.gateUpWeight.shape, i = this.downWeight.size(2);
    return groupedMmAvailable() && groupedMmFits([h!, i], this.gateUpWeight.dtype);
  }
  /** One grouped product over the experts' rows. */
  gateUpGrouped(x: Tensor, offs: Tensor): Tensor {
    return tidy(() => groupedMm(x, this.gateUpWeight.transpose(1, 2), offs));
  }
  /** One grouped product over the experts' rows. */
  downGrouped(h: Tensor, offs: Tensor): Tensor {
    return tidy(() => groupedMm(h, this.downWeight.transpose(1, 2), offs));
  }
}

/** silu(gate)·up for gate and up concatenated in the last dim. */
export function swiglu(gateUp: Tensor): Tensor {
  return tidy(() => {
    const i = gateUp.size(-1) / 2;
    return gateUp.narrow(-1, 0, i).silu().mul(gateUp.narrow(-1, i, i));
  });
}

/**
 * The experts a router uses: `replay`'s where it holds an id (routing replay:
 * "R3", arXiv 2510.11370), the router's own choice where it holds −1 or is absent.
 */
function chosen(own: Tensor, replay: Tensor | null | undefined): Tensor {
  if (!replay) return own;
  if (replay.ndim !== 2 || replay.size(0) !== own.size(0) || replay.size(1) !== own.size(1)) {
    throw new RangeError(
      `routing replay: expected experts [${own.shape.join(", ")}], got [${replay.shape.join(", ")}]`,
    );
  }
  return tidy(() => {
    const r = replay.to("int64");
    return where(r.ge(0), r, own);
  });
}

/**
 * Qwen3-MoE routing: softmax over all experts in float32, top-k, optional
 * renormalisation, weights cast to the activation dtype (transformers' Qwen3MoeSparseMoeBlock; docs/numerics.md "Routing").
 * With `replay` ([T, k] expert ids, −1 = choose freely) those experts are
 * used instead of the top-k, weighted by the current router's probabilities
 * of them (renormalised over them when normTopK), so the gradient still flows through the router's logits.
 */
export function softmaxTopK(
  x: Tensor,
  router: LinearLayer,
  k: number,
  normTopK: boolean,
  replay?: Tensor | null,
): Routing {
  return tidy(() => {
    const logits = router.forward(x);
    const probs = logits.softmax(-1, "float32");
    const experts = chosen(probs.topk(k, -1).indices, replay);
    const values = probs.gather(-1, experts);
    const w = normTopK ? values.div(values.sum(-1, true)) : values;
    return { experts, weights: w.to(x.dtype), logits };
  });
}

/**
 * PhiMoE's sparsemixer in eval mode (transformers' PhiMoE `sparsemixer`; docs/numerics.md "Routing"): two slots, each the
 * argmax of a softmax over the logits within a relative 2·eps band of the
 * slot's maximum; weights not renormalised. Deterministic: the train-mode
 * Gumbel sampling and jitter are deliberately not implemented.
 *
 * With `replay` ([T, 2], −1 = choose freely) each slot takes the replayed
 * expert instead of the argmax, and its weight is the softmax over the
 * scores within the band around that expert's score (the same rule, centred
 * on the replayed expert instead of the maximum): identical to the plain
 * rule when the replayed expert is the argmax.
 */
export function sparsemixer(
  x: Tensor,
  router: LinearLayer,
  jitterEps: number,
  replay?: Tensor | null,
): Routing {
  return tidy(() => {
    const scores = router.forward(x);
    const neg = (t: Tensor, mask: Tensor): Tensor => t.maskedFill(mask, -Infinity);
    const slot = (masked: Tensor, slotReplay: Tensor | null): [Tensor, Tensor] => {
      const indices = chosen(masked.max(-1, true).indices, slotReplay);
      const top = masked.gather(-1, indices);
      const factor = scores.abs().maximum(top);
      const outside = top.sub(scores).div(factor).gt(2 * jitterEps);
      const gate = neg(masked, outside).softmax(-1);
      return [gate.gather(-1, indices), indices];
    };
    const [w1, i1] = slot(scores, replay ? replay.narrow(1, 0, 1) : null);
    const first = arange(0, scores.size(-1), 1, { device: scores.device }).eq(i1);
    const [w2, i2] = slot(neg(scores, first), replay ? replay.narrow(1, 1, 1) : null);
    return { experts: cat([i1, i2], -1), weights: cat([w1, w2], -1), logits: scores };
  });
}

/**
 * Combines expert outputs for tokens x [T, H].
 * "loop" runs each used expert on its tokens in ascending expert order, as
 * transformers does (one host sync to read the routing). "dense" runs every
 * expert on every token and masks, with static shapes and no sync: cheaper
 * when experts are few or all are hit anyway (small E/k, large batches).
 * "grouped" sorts the token–expert pairs by expert on the device and runs
 * each projection as one grouped GEMM: only the chosen experts' work, no
 * sync; it needs a bank that is {@link ExpertBank.groupable} and falls back
 * to "loop" otherwise. By default: "grouped" where possible, else "loop".
 */
export function dispatch(x: Tensor, routing: Routing, bank: ExpertBank, mode?: MoeDispatch): Tensor {
  const grouped = bank.groupable === true;
  const m = mode === "grouped" && !grouped ? "loop" : mode ?? (grouped ? "grouped" : "loop");
  return tidy(() =>
    m === "dense"
      ? dispatchDense(x, routing, bank)
      : m === "grouped"
      ? dispatchGrouped(x, routing, bank)
      : dispatchLoop(x, routing, bank)
  );
}

function dispatchGrouped(x: Tensor, routing: Routing, bank: ExpertBank): Tensor {
  const k = routing.experts.size(-1), device = x.device;
  const experts = routing.experts.reshape([-1]);
  const { indices: slots } = experts.sort(0); // token–expert pairs by expert
  // Pair i belongs to token ⌊i / k⌋: read from an integer table (float division is exact only below 2^24).
  const tokenOf = arange(0, routing.experts.size(0), 1, { device }).unsqueeze(1).expand([-1, k]).reshape([
    -1,
  ]);
  const tokens = tokenOf.indexSelect(0, slots);
  const counts = zeros([bank.count], { dtype: "int64", device }).indexAdd(
    0,
    experts,
    ones(experts.shape, {
      dtype: "int64",
      device,
    }),
  );
  const offs = counts.cumsum(0).to("int32");
  const h = swiglu(bank.gateUpGrouped!(x.indexSelect(0, tokens), offs));
  const y = bank.downGrouped!(h, offs).mul(routing.weights.reshape([-1]).indexSelect(0, slots).unsqueeze(-1));
  return zeros(x.shape, { dtype: x.dtype, device }).indexAdd(0, tokens, y);
}

function dispatchLoop(x: Tensor, routing: Routing, bank: ExpertBank): Tensor {
  const k = routing.experts.size(-1), device = x.device;
  const ids = routing.experts.toArray(); // the one host sync
  const slots: number[][] = Array.from({ length: bank.count }, () => []);
  ids.forEach((e, i) => slots[e]!.push(i));
  // Every expert's token–expert pairs, expert after expert: one upload of each index, not one per expert.
  const flat = slots.flat();
  const slotIdx = tensor(flat, { dtype: "int64", device });
  const tokIdx = tensor(flat.map((i) => Math.floor(i / k)), { dtype: "int64", device });
  const weights = routing.weights.reshape([-1]);
  const ys: Tensor[] = [], toks: Tensor[] = [];
  let start = 0;
  for (let e = 0; e < bank.count; e++) {
    const n = slots[e]!.length;
    if (n > 0) {
      const tok = tokIdx.narrow(0, start, n);
      const w = weights.indexSelect(0, slotIdx.narrow(0, start, n)).unsqueeze(-1);
      ys.push(expertForward(bank, e, x.indexSelect(0, tok)).mul(w));
      toks.push(tok);
    }
    start += n;
  }
  // A token's rows are added in ascending expert order. On a CPU one index_add of them all does that (it adds
  // row after row) without a copy of the output per expert; a GPU's atomic adds keep no order, so there each
  // expert's rows are added by an index_add of their own.
  let out = zeros(x.shape, { dtype: x.dtype, device });
  if (device === "cpu") return ys.length ? out.indexAdd(0, tokIdx, cat(ys, 0)) : out;
  ys.forEach((y, j) => (out = out.indexAdd(0, toks[j]!, y)));
  return out;
}

function dispatchDense(x: Tensor, routing: Routing, bank: ExpertBank): Tensor {
  const t = x.size(0);
  const dense = zeros([t, bank.count], { dtype: x.dtype, device: x.device }).scatter(
    1,
    routing.experts,
    routing.weights,
  );
  return expertForwardAll(bank, x).mul(dense.transpose(0, 1).unsqueeze(-1)).sum(0);
}

/**
 * The Switch/Mixtral load-balancing loss over every MoE layer's router
 * logits [B·S, E], as transformers' load_balancing_loss_func: E · Σ f·P with
 * f the fraction of tokens routed to each (slot, expert) and P the mean
 * router probability, both over real tokens when attentionMask [B, S] is given.
 */
export function loadBalancingLoss(
  routerLogits: readonly Tensor[],
  k: number,
  attentionMask?: Tensor,
): Tensor {
  return tidy(() => {
    const logits = cat(routerLogits.map((l) => l.to("float32")), 0); // [L·B·S, E]
    const e = logits.size(-1);
    const probs = logits.softmax(-1);
    const { indices } = probs.topk(k, -1);
    const onehot = indices.unsqueeze(-1).eq(arange(0, e, 1, { device: logits.device })).to("float32"); // [N, k, E]
    if (!attentionMask) {
      return onehot.mean(0).mul(probs.mean(0).unsqueeze(0)).sum().mul(e);
    }
    const layers = routerLogits.length;
    const m = attentionMask.to("float32").reshape([1, -1]).expand([layers, -1]).reshape([-1, 1]); // [N, 1]
    const f = onehot.mul(m.unsqueeze(-1)).sum(0).div(m.sum()); // [k, E]
    const p = probs.mul(m).sum(0).div(m.sum()); // [E]
    return f.mul(p.unsqueeze(0)).sum().mul(e);
  });
}
