/**
 * Baselines and advantages for sequence-level rewards.
 *
 * - {@link groupBaseline}: each completion's reward minus the mean reward of
 *   the K completions of its prompt (GRPO's group baseline, without its
 *   division by the group std); the raw rewards when K = 1.
 * - {@link advantages}: the centred reward minus the critic's value (a
 *   constant: the value is detached), whitened over the batch.
 *
 * Advantages are one number per sequence [N]; the token losses
 * (rl/losses.ts) broadcast them to every completion token.
 * @module
 */
import { type Tensor, tidy, where } from "../ffi/mod.ts";

function checkGroups(rewards: readonly number[], k: number, what: string): void {
  if (!Number.isSafeInteger(k) || k < 1) throw new RangeError(`${what}: k must be an integer >= 1, got ${k}`);
  if (rewards.length % k !== 0) {
    throw new RangeError(`${what}: ${rewards.length} rewards do not split into groups of k = ${k}`);
  }
  const bad = rewards.findIndex((r) => typeof r !== "number" || !Number.isFinite(r));
  if (bad >= 0) throw new RangeError(`${what}: reward ${bad} is not a finite number (${rewards[bad]})`);
}

/**
 * The group baseline: `rewards_centered[i] = rewards[i] − mean(rewards of i's group)`.
 * @param rewards one reward per completion, prompt-major: `[p0c0, p0c1, …, p0c(k−1), p1c0, …]`
 * @param k completions per prompt; with k = 1 the rewards are returned unchanged (a copy)
 * @throws {RangeError} when k is not a positive integer, the rewards do not split into groups of k, or a
 *   reward is not finite
 * @example
 * ```ts
 * import { groupBaseline } from "./advantages.ts";
 * groupBaseline([1, 0, 0, 1, 1, 1], 3); // ≈ [2/3, -1/3, -1/3, 0, 0, 0]
 * ```
 */
export function groupBaseline(rewards: readonly number[], k: number): number[] {
  checkGroups(rewards, k, "groupBaseline");
  if (k === 1) return [...rewards];
  const out: number[] = [];
  for (let g = 0; g < rewards.length; g += k) {
    const group = rewards.slice(g, g + k);
    const mean = group.reduce((a, b) => a + b, 0) / k;
    for (const r of group) out.push(r - mean);
  }
  return out;
}

/**
 * The fraction of prompt groups whose K rewards are all equal (within tol):
 * such a group's centred rewards are all 0, so it carries no policy-gradient
 * signal beyond the critic's. Every group counts when k = 1 (a single reward
 * has no spread). TRL logs the same as `frac_reward_zero_std`.
 * @throws {RangeError} as {@link groupBaseline}
 */
export function zeroSpreadFraction(rewards: readonly number[], k: number, tol = 1e-9): number {
  checkGroups(rewards, k, "zeroSpreadFraction");
  const groups = rewards.length / k;
  if (groups === 0) return 0;
  let flat = 0;
  for (let g = 0; g < rewards.length; g += k) {
    const group = rewards.slice(g, g + k);
    if (Math.max(...group) - Math.min(...group) <= tol) flat++;
  }
  return flat / groups;
}

/**
 * Advantages `whiten(centered − values.detach())`, one per sequence.
 *
 * Whitening: `(x − mean(x)) / (std(x) + eps)`, mean and unbiased std over the
 * N sequences of the batch (as TRL's `masked_whiten`), giving mean 0 and std
 * 1. When whitening is undefined or would only amplify rounding noise (N = 1,
 * or std ≤ minStd, e.g. every reward and value equal) the advantages are
 * only centred (`x − mean(x)`, so all 0 when N = 1). The test runs on the
 * device: no host synchronisation.
 *
 * The value is detached, so the advantages are constants: the policy loss
 * built from them sends no gradient into the critic.
 * @param centered the group-centred rewards [N] ({@link groupBaseline}), float
 * @param values the critic's value of each sequence [N] (e.g. rl/policy.ts `sequenceValues`)
 * @param eps added to the std before dividing
 * @param minStd at or below this std the advantages are only centred
 * @returns a new float32 tensor [N] without autograd history
 * @throws {RangeError} when the shapes are not both [N]
 */
export function advantages(centered: Tensor, values: Tensor, eps = 1e-8, minStd = 1e-6): Tensor {
  const n = centered.shape;
  if (n.length !== 1 || values.ndim !== 1 || values.size(0) !== n[0]) {
    throw new RangeError(
      `advantages: centered and values must both be [N], got [${n.join(", ")}] and [${
        values.shape.join(", ")
      }]`,
    );
  }
  return tidy(() => {
    const x = centered.detach().to("float32").sub(values.detach().to("float32"));
    const centred = x.sub(x.mean());
    if (n[0]! < 2) return centred;
    const std = x.std();
    return where(std.gt(minStd), centred.div(std.add(eps)), centred);
  });
}
