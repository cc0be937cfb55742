/**
 * How far the training path's log-probs are from the sampler's, token by
 * token (rl/learn.ts reports them; docs/rl-update.md, rollout correction).
 * @module
 */
import type { Replicas } from "./replicas.ts";

/** Running |Δ log p| statistics between the training path and the sampler. */
export class Mismatch {
  #sum = 0;
  #max = 0;
  #beyond = 0;
  #n = 0;
  /** Counts |Δ| above bound as beyond it. */
  constructor(readonly bound: number) {}
  /** Adds one sequence's tokens: the training path's log-probs and the sampler's. */
  add(old: readonly number[], rollout: readonly number[]): void {
    old.forEach((o, t) => {
      const d = Math.abs(o - rollout[t]!);
      [this.#sum, this.#n] = [this.#sum + d, this.#n + 1];
      this.#max = Math.max(this.#max, d);
      if (d > this.bound) this.#beyond++;
    });
  }
  /** Mean, max and fraction beyond the bound, over every rank's tokens. */
  stats(dp: Replicas): { mean: number; max: number; frac: number } {
    const [sum, n, beyond] = dp.sum([this.#sum, this.#n, this.#beyond]) as [number, number, number];
    const max = dp.max([this.#max])[0]!;
    return n ? { mean: sum / n, max, frac: beyond / n } : { mean: NaN, max: NaN, frac: NaN };
  }
}
