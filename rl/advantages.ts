/**
 * Baselines and advantages for sequence-level rewards, computed on the host
 * over a whole update (one rollout buffer) before any gradient is taken.
 *
 * - {@link groupBaseline}: each completion's reward minus the mean reward of
 *   the K completions of its prompt (GRPO's group baseline, without its
 *   division by the group std); the raw rewards when K = 1.
 * - {@link tokenAdvantages}: one sequence's advantages per completion token,
 *   from its centred reward and (optionally) the critic's values.
 * - {@link updateAdvantages}: all of an update's advantages, normalised over
 *   the update; groups whose rewards are all equal carry none.
 * @module
 */

/** How advantages are estimated (see {@link tokenAdvantages}). */
export type AdvantageEstimator = "group" | "token_value" | "prompt_value";

/** Every estimator, for config checks. */
export const ADVANTAGE_ESTIMATORS: readonly AdvantageEstimator[] = ["group", "token_value", "prompt_value"];

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
 * For each completion, whether its group's K rewards are all equal (within
 * tol): its centred reward is then 0 and it carries no policy-gradient
 * signal. Never true when k = 1 (a single reward is its own signal).
 * @throws {RangeError} as {@link groupBaseline}
 */
export function flatGroups(rewards: readonly number[], k: number, tol = 1e-9): boolean[] {
  checkGroups(rewards, k, "flatGroups");
  if (k === 1) return rewards.map(() => false);
  const out: boolean[] = [];
  for (let g = 0; g < rewards.length; g += k) {
    const group = rewards.slice(g, g + k);
    const flat = Math.max(...group) - Math.min(...group) <= tol;
    for (let i = 0; i < k; i++) out.push(flat);
  }
  return out;
}

/**
 * The fraction of prompt groups whose K rewards are all equal (within tol).
 * Every group counts when k = 1 (a single reward has no spread). TRL logs
 * the same as `frac_reward_zero_std`.
 * @throws {RangeError} as {@link groupBaseline}
 */
export function zeroSpreadFraction(rewards: readonly number[], k: number, tol = 1e-9): number {
  checkGroups(rewards, k, "zeroSpreadFraction");
  const groups = rewards.length / k;
  if (groups === 0) return 0;
  if (k === 1) return 1;
  return flatGroups(rewards, k, tol).filter((f, i) => f && i % k === 0).length / groups;
}

/**
 * One sequence's advantage for each of its n completion tokens, before
 * normalisation. `target` is its centred reward (the raw reward when K = 1);
 * `values[t]` the critic's V(s_t), the value of the state before token t.
 * - "group": the centred reward on every token (no critic);
 * - "prompt_value": target − V(s_0), the value of the prompt's last state, on every token;
 * - "token_value": GAE(λ) with γ = 1 and the reward on the last token:
 *   δ_t = V(s_t+1) − V(s_t), δ_(n−1) = target − V(s_(n−1)), A_t = Σ_l λ^l·δ_(t+l);
 *   λ = 1 gives target − V(s_t), λ = 0 the one-step TD error.
 * @throws {RangeError} when a critic estimator gets no values, or values of another length
 */
export function tokenAdvantages(
  target: number,
  n: number,
  values: readonly number[] | null,
  estimator: AdvantageEstimator,
  gaeLambda = 1,
): number[] {
  if (estimator === "group") return new Array<number>(n).fill(target);
  if (!values || values.length !== n) {
    throw new RangeError(
      `tokenAdvantages: "${estimator}" needs ${n} values, got ${values?.length ?? "none"}`,
    );
  }
  if (estimator === "prompt_value") return new Array<number>(n).fill(target - (values[0] ?? 0));
  const out = new Array<number>(n);
  let acc = 0;
  for (let t = n - 1; t >= 0; t--) {
    const next = t === n - 1 ? target : values[t + 1]!;
    acc = next - values[t]! + gaeLambda * acc;
    out[t] = acc;
  }
  return out;
}

/** What {@link updateAdvantages} returns. */
export interface UpdateAdvantages {
  /**
   * The centred rewards, one per completion. learn trains its critic on the buffer's own group baseline before
   * the advantages are computed, so a replacement's values here must be an array but are not used.
   */
  centered: number[];
  /** Whether each completion takes part in the policy update (false: a group with all rewards equal). */
  trained: boolean[];
  /** Per completion, one advantage per completion token, normalised (all 0 where not trained). */
  advantages: number[][];
  /** Mean and std of the raw token advantages over the trained tokens, before normalisation. */
  mean: number;
  /** See mean. */
  std: number;
}

/**
 * An update's advantages: {@link groupBaseline}, then {@link tokenAdvantages}
 * for each completion, then normalisation over the tokens of every trained
 * completion of the update. Completions in a group whose rewards are all
 * equal (K > 1) carry zero advantage and are marked untrained: they cost no
 * backward pass.
 *
 * Normalisation: with a critic, whitening (subtract the mean, divide by the
 * std: PPO's convention); with "group", division by the std alone, since the
 * group mean is the baseline already (with K = 1 the mean is subtracted too).
 * That std is one for the update, of the centred rewards over the trained
 * tokens: not TRL's `scale_rewards="batch"` (the raw rewards' std over
 * completions) nor `"group"` (each group's own std). Below a std of
 * minStd only the centring applies. With `normalize: false` the raw
 * advantages are kept (Dr. GRPO).
 * @param lengths completion tokens of each completion
 * @param values per completion, V(s_t) for each completion token (null for "group")
 * @throws {RangeError} as {@link groupBaseline} and {@link tokenAdvantages}, or for lengths of another count
 */
export function updateAdvantages(
  rewards: readonly number[],
  k: number,
  lengths: readonly number[],
  values: readonly (readonly number[])[] | null,
  cfg: {
    estimator: AdvantageEstimator;
    gaeLambda: number;
    normalize?: boolean;
    /** Sums [count, sum, sum of squares] over data-parallel ranks (rl/replicas.ts), so that all normalise alike. */
    reduce?: (stats: number[]) => number[];
  },
  minStd = 1e-6,
): UpdateAdvantages {
  if (lengths.length !== rewards.length) {
    throw new RangeError(`updateAdvantages: ${lengths.length} lengths for ${rewards.length} rewards`);
  }
  const centered = groupBaseline(rewards, k);
  const trained = flatGroups(rewards, k).map((f, i) => !f && lengths[i]! > 0);
  const raw = centered.map((c, i) =>
    trained[i] ? tokenAdvantages(c, lengths[i]!, values?.[i] ?? null, cfg.estimator, cfg.gaeLambda) : []
  );
  let n = 0, sum = 0, sq = 0;
  for (const a of raw) for (const x of a) [n, sum, sq] = [n + 1, sum + x, sq + x * x];
  if (cfg.reduce) [n, sum, sq] = cfg.reduce([n, sum, sq]) as [number, number, number];
  const mean = n ? sum / n : 0, std = unbiasedStd(n, sum, sq);
  // The group mean is the baseline already, unless K = 1 leaves the raw reward: then the update's mean is.
  const normalize = cfg.normalize ?? true;
  const shift = !normalize || (cfg.estimator === "group" && k > 1) ? 0 : mean;
  const scale = normalize && std > minStd ? 1 / std : 1;
  const advantages = raw.map((a, i) =>
    trained[i] ? a.map((x) => (x - shift) * scale) : new Array<number>(lengths[i]!).fill(0)
  );
  return { centered, trained, advantages, mean, std };
}

/**
 * The unnormalised group-baseline advantages the GRPO scalings below start from; `name` is the caller's, for
 * errors. A group std, or a group mean to centre on, needs K ≥ 2 (TRL needs 2 generations per prompt too).
 */
function unscaledGroupAdvantages(
  name: string,
  ...args: Parameters<typeof updateAdvantages>
): UpdateAdvantages {
  const [rewards, k, lengths, values, cfg] = args;
  if (cfg.estimator !== "group") {
    throw new RangeError(`${name}: needs ppo.advantage "group", got "${cfg.estimator}"`);
  }
  if (k < 2) throw new RangeError(`${name}: a group baseline needs rollout.k >= 2, got ${k}`);
  return updateAdvantages(rewards, k, lengths, values, { ...cfg, normalize: false });
}

/**
 * GRPO's advantages as TRL computes them by default (`scale_rewards="group"`): each completion's centred
 * reward divided by its group's std (unbiased, as torch's `std`) plus 1e-4, on every token; groups whose
 * rewards are all equal are left out, as {@link updateAdvantages} leaves them. Not a setting: pass it to
 * learn as a replacement, `learn(policy, opt, buffer, { ppo: { advantage: "group" } }, { advantages:
 * groupScaledAdvantages })` (or to ppoStep or train). Each group's own std needs no data-parallel reduction.
 * @throws {RangeError} for an estimator other than "group", K < 2, or as {@link updateAdvantages}
 */
export function groupScaledAdvantages(
  rewards: readonly number[],
  k: number,
  lengths: readonly number[],
  values: readonly (readonly number[])[] | null,
  cfg: Parameters<typeof updateAdvantages>[4],
): UpdateAdvantages {
  const raw = unscaledGroupAdvantages("groupScaledAdvantages", rewards, k, lengths, values, cfg);
  const scale = Array.from({ length: rewards.length / k }, (_, g) => {
    const centered = raw.centered.slice(g * k, g * k + k); // the group's mean is 0
    return 1 / (Math.sqrt(centered.reduce((s, c) => s + c * c, 0) / (k - 1)) + 1e-4);
  });
  return scaled(raw, (i) => scale[Math.floor(i / k)]!);
}

/**
 * GRPO's advantages with TRL's `scale_rewards="batch"`: each completion's centred reward divided by the
 * std (unbiased) of all the update's raw rewards plus 1e-4, on every token, so the spread between prompts
 * counts; flat groups are left out. Under data parallelism `cfg.reduce` makes the std the whole update's.
 * A replacement for learn's `advantages`, as {@link groupScaledAdvantages}.
 * @throws {RangeError} for an estimator other than "group", K < 2, or as {@link updateAdvantages}
 */
export function batchScaledAdvantages(
  rewards: readonly number[],
  k: number,
  lengths: readonly number[],
  values: readonly (readonly number[])[] | null,
  cfg: Parameters<typeof updateAdvantages>[4],
): UpdateAdvantages {
  const raw = unscaledGroupAdvantages("batchScaledAdvantages", rewards, k, lengths, values, cfg);
  const local = [rewards.length, rewards.reduce((a, b) => a + b, 0), rewards.reduce((a, b) => a + b * b, 0)];
  const [n, sum, sq] = (cfg.reduce ? cfg.reduce(local) : local) as [number, number, number];
  const scale = 1 / (unbiasedStd(n, sum, sq) + 1e-4);
  return scaled(raw, () => scale);
}

/** raw with sequence i's advantages multiplied by scale(i). */
function scaled(raw: UpdateAdvantages, scale: (i: number) => number): UpdateAdvantages {
  return { ...raw, advantages: raw.advantages.map((a, i) => a.map((x) => x * scale(i))) };
}

/** The unbiased std of n values from their sum and sum of squares (0 for fewer than two). */
function unbiasedStd(n: number, sum: number, sumSquares: number): number {
  const mean = n ? sum / n : 0;
  return n > 1 ? Math.sqrt(Math.max(0, (sumSquares - n * mean * mean) / (n - 1))) : 0;
}
