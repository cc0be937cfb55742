/**
 * AdamW with parameter groups, and gradient clipping by global norm. The
 * bookkeeping (groups, state, step counts) is TypeScript; one shim call
 * applies each parameter's update in place.
 * @module
 */
import { zeros } from "./create.ts";
import { isFloating } from "./dtype.ts";
import { c, handles } from "./handle.ts";
import { check, shim } from "./lib.ts";
import { keep } from "./scope.ts";
import { countHostRead, type Tensor } from "./tensor.ts";

/** Parameters sharing one learning rate and weight decay. */
export interface ParamGroup {
  /** Leaf tensors with requiresGrad. */
  params: Tensor[];
  /** Learning rate (may be changed between steps, e.g. by a schedule). */
  lr: number;
  /** Decoupled weight decay (default 0.01, as PyTorch). */
  weightDecay?: number;
  /** Adam's (β1, β2) (default [0.9, 0.999]). */
  betas?: [number, number];
  /** Denominator epsilon (default 1e-8). */
  eps?: number;
}

/** One parameter's optimizer state. */
export interface AdamState {
  /** Number of updates applied. */
  step: number;
  /** First moment estimate. */
  expAvg: Tensor;
  /** Second moment estimate. */
  expAvgSq: Tensor;
}

function checkGroup(g: Required<ParamGroup>, i: number, where: string): void {
  const bad = (what: string, v: unknown, expected: string): never => {
    throw new RangeError(`${where}: group ${i}'s ${what} must be ${expected}, got ${v}`);
  };
  if (!(Number.isFinite(g.lr) && g.lr >= 0)) bad("lr", g.lr, "a finite number >= 0");
  if (!(Number.isFinite(g.weightDecay) && g.weightDecay >= 0)) {
    bad("weightDecay", g.weightDecay, "a finite number >= 0");
  }
  if (!(Array.isArray(g.betas) && g.betas.length === 2 && g.betas.every((b) => b >= 0 && b < 1))) {
    bad("betas", JSON.stringify(g.betas), "two numbers in [0, 1)");
  }
  if (!(Number.isFinite(g.eps) && g.eps > 0)) bad("eps", g.eps, "a finite number > 0");
}

/** A group's defaults, as torch.optim.AdamW's. */
export const ADAMW_DEFAULTS: Readonly<
  { weightDecay: number; betas: readonly [number, number]; eps: number }
> = Object.freeze({ weightDecay: 0.01, betas: Object.freeze([0.9, 0.999] as const), eps: 1e-8 });

/** AdamW (Loshchilov & Hutter), matching torch.optim.AdamW without amsgrad. */
export class AdamW {
  /** The groups, defaults filled in; change `lr` here to schedule. */
  readonly groups: Required<ParamGroup>[];
  #state = new Map<Tensor, AdamState>();

  /**
   * Creates the optimizer; state is allocated on each parameter's first step.
   * @throws {RangeError} naming the group and setting, for a learning rate or weight decay that is not a
   *   finite number ≥ 0 or betas outside [0, 1), as torch.optim refuses them, and an eps that is not > 0
   *   (torch allows 0, which divides by zero wherever a gradient is 0)
   */
  constructor(groups: ParamGroup[]) {
    this.groups = groups.map((g) => ({
      params: g.params,
      lr: g.lr,
      weightDecay: g.weightDecay ?? ADAMW_DEFAULTS.weightDecay,
      betas: g.betas ?? [...ADAMW_DEFAULTS.betas],
      eps: g.eps ?? ADAMW_DEFAULTS.eps,
    }));
    this.groups.forEach((g, i) => checkGroup(g, i, "AdamW"));
  }

  /**
   * Applies one update to every parameter that has a gradient, or only to
   * those of `only` (e.g. the critic's, stepped apart from the policy's).
   * @throws {Error} when a parameter of `only` is in none of the groups, or a parameter's state holds moments
   *   of another shape, not floating-point or on another device (before that parameter changes)
   */
  step(only?: readonly Tensor[]): void {
    const chosen = only ? new Set(only) : null;
    if (only) { // a parameter in no group would silently never train (and zeroGrad would then drop its gradient)
      const held = new Set(this.groups.flatMap((g) => g.params));
      const i = only.findIndex((p) => !held.has(p));
      if (i >= 0) {
        throw new Error(
          `AdamW.step: parameter ${i} of the ${only.length} to update ([${
            only[i]!.shape.join(", ")
          }]) is in none ` +
            `of the optimizer's groups`,
        );
      }
    }
    // Settings may have changed since construction (a schedule sets lr): a NaN would poison every parameter.
    this.groups.forEach((g, i) => checkGroup(g, i, "AdamW.step"));
    for (const g of this.groups) {
      for (const p of g.params) {
        if (chosen && !chosen.has(p)) continue;
        using grad = p.grad;
        if (grad === null) continue; // as PyTorch: no grad, no state, no step
        const st = this.initState(p);
        // Checked first: the shim updates p and the moments in place, so a failure midway would leave them half done
        // (p already decayed).
        const shape = p.shape.join(",");
        if (st.expAvg.shape.join(",") !== shape || st.expAvgSq.shape.join(",") !== shape) {
          throw new Error(
            `AdamW.step: the state of a [${p.shape.join(", ")}] parameter holds moments of shapes ` +
              `[${st.expAvg.shape.join(", ")}] and [${st.expAvgSq.shape.join(", ")}]`,
          );
        }
        const moments = [st.expAvg, st.expAvgSq];
        if (moments.some((m) => !isFloating(m.dtype) || m.device !== p.device)) {
          throw new Error(
            `AdamW.step: the moments of a [${
              p.shape.join(", ")
            }] parameter on ${p.device} must be floating-point ` +
              `tensors on its device; they are ${
                moments.map((m) => `${m.dtype} on ${m.device}`).join(" and ")
              }`,
          );
        }
        const status = shim().mt_adamw_step(
          c(),
          p.ptr,
          st.expAvg.ptr,
          st.expAvgSq.ptr,
          BigInt(st.step + 1),
          g.lr,
          g.betas[0],
          g.betas[1],
          g.eps,
          g.weightDecay,
        );
        check(status, "adamw_step", () => [p.shape, st.expAvg.shape]);
        st.step++;
      }
    }
  }

  /**
   * The state of p, allocated as zero moments at step 0 if it has none yet
   * (as on p's first step). For restoring checkpoints: fill it, then set step.
   */
  initState(p: Tensor): AdamState {
    const have = this.#state.get(p);
    if (have) return have;
    const opts = { dtype: p.dtype, device: p.device };
    const st = { step: 0, expAvg: keep(zeros(p.shape, opts)), expAvgSq: keep(zeros(p.shape, opts)) };
    this.#state.set(p, st);
    return st;
  }

  /** The state of p, if it has taken a step (for checkpoints). */
  state(p: Tensor): AdamState | undefined {
    return this.#state.get(p);
  }

  /** Drops every parameter's gradient, or only those of `only`. */
  zeroGrad(only?: readonly Tensor[]): void {
    if (only) only.forEach((p) => p.clearGrad());
    else for (const g of this.groups) for (const p of g.params) p.clearGrad();
  }

  /** Frees the moment tensors. */
  dispose(): void {
    for (const s of this.#state.values()) {
      s.expAvg.dispose();
      s.expAvgSq.dispose();
    }
    this.#state.clear();
  }

  /** Frees the moment tensors at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * Scales the gradients of params in place so that their global L2 norm is at
 * most maxNorm (torch.nn.utils.clip_grad_norm_). Returns the norm before
 * clipping.
 */
export function clipGradNorm(params: readonly Tensor[], maxNorm: number): number {
  const out = new Float64Array(1);
  countHostRead();
  const status = shim().mt_clip_grad_norm(c(), handles(params), params.length, maxNorm, out);
  check(status, "clip_grad_norm", () => params.map((p) => p.shape));
  return out[0]!;
}
