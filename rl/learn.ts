/**
 * The learn phase of an update, on a {@link RolloutBuffer} from rl/collect.ts:
 *
 * 1. **Reference and critic pass** (adapters off, no autograd through the
 *    model): the reference log-probs of the trained sequences (for the KL
 *    penalty) and the base model's states, on which the critic computes
 *    V(s_t) for every completion token. The pass runs in micro-batches of
 *    whole prompt groups, and the critic takes one optimizer step on each
 *    (½·(V − centred reward)²): the values a group's advantages use come
 *    from a critic that has not yet seen that group's rewards.
 * 2. **Advantages** over the whole update (rl/advantages.ts): group
 *    baseline per prompt, minus the critic's values, normalised over the
 *    update. Groups whose rewards are all equal carry none and are skipped
 *    from here on.
 * 3. **Old pass** (only when the policy takes several optimizer steps per
 *    update): log-probs of the training path with the adapters as they are,
 *    so that the ratio moves, and the clip binds, in later steps.
 * 4. **Policy steps**: `epochs` passes over the trained sequences, each in
 *    `minibatches` optimizer steps (gradients accumulated over micro-batches
 *    of `microBatch` sequences), with the PPO objective of rl/objective.ts.
 *
 * Every pass computes log-probs at the rollout's temperature and, with
 * `moe.routingReplay: rollout`, uses the experts the rollout chose. The
 * rollout/training mismatch is measured on the old log-probs (or, with one
 * step, on the training pass's own): mean and max |Δ log p| and the fraction
 * of tokens whose ratio π_old / π_rollout lies beyond [1/C, C]
 * (C = ppo.rolloutCorrection, else 2).
 * @module
 */
import { clipGradNorm, dispose, noGrad, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import { mulberry32 } from "../data/batches.ts";
import { flatGroups, groupBaseline, updateAdvantages, zeroSpreadFraction } from "./advantages.ts";
import type { RolloutBuffer } from "./collect.ts";
import { rlConfig, type RlOverrides } from "./config.ts";
import { valueLoss } from "./losses.ts";
import { OBJECTIVE_PARTS, type ObjectivePart, ppoObjective } from "./objective.ts";
import type { Policy, SequenceBatch } from "./policy.ts";

/** What {@link learn} needs of an optimizer: ffi/optim.ts's AdamW (e.g. rl/ppo.ts `policyOptimizer`). */
export interface StepOptimizer {
  /** Updates the given parameters from their gradients. */
  step(only: readonly Tensor[]): void;
  /** Drops the given parameters' gradients. */
  zeroGrad(only: readonly Tensor[]): void;
}

/** Options of {@link learn}. */
export interface LearnOptions {
  /** Sequences per forward/backward pass (default 16); gradients accumulate over them. */
  microBatch?: number;
  /** Clip each group's gradient (adapters; critic) to this global L2 norm (default 1; 0: no clipping). */
  maxGradNorm?: number;
  /** Seeds how sequences are dealt into minibatches (default 0). */
  seed?: number;
}

/** The numbers of a learn phase (NaN where a quantity does not apply, e.g. kl without a KL penalty). */
export type LearnMetrics = Record<ObjectivePart, number> & {
  /** The policy's total loss (the objective of rl/objective.ts), mean over its optimizer steps. */
  loss: number;
  /** The critic's loss, mean over its steps (each before its update). */
  value_loss: number;
  /** The mean of its values over all completion tokens. */
  value_mean: number;
  /** The policy's gradient norm before clipping, mean over its steps. */
  grad_norm: number;
  /** The critic's gradient norm before clipping, mean over its steps. */
  value_grad_norm: number;
  /** Std of the raw token advantages over the trained tokens, before normalisation. */
  advantage_std: number;
  /** Fraction of prompt groups whose rewards are all equal (skipped). */
  frac_zero_std_groups: number;
  /** Fraction of sequences in the policy update. */
  trained_fraction: number;
  /** Rollout/training mismatch over the trained tokens: mean |log π_old − log π_rollout|. */
  mismatch_mean: number;
  /** Its max. */
  mismatch_max: number;
  /** Fraction of trained tokens whose π_old / π_rollout lies beyond [1/C, C]. */
  mismatch_frac: number;
  /** Policy optimizer steps taken. */
  optimizer_steps: number;
  /** Seconds in the reference/critic pass. */
  reference_seconds: number;
  /** Seconds in the old pass. */
  old_seconds: number;
  /** Seconds in the policy steps. */
  learn_seconds: number;
};

/** Sequence ids in chunks of at most size, longest first (similar lengths pad less). */
function chunks(ids: readonly number[], lengths: readonly number[], size: number): number[][] {
  const sorted = [...ids].sort((a, b) => lengths[b]! - lengths[a]! || a - b);
  const out: number[][] = [];
  for (let i = 0; i < sorted.length; i += size) out.push(sorted.slice(i, i + size));
  return out;
}

/**
 * Whole prompt groups (K consecutive sequences) in chunks of at most size
 * sequences (at least one group), longest groups first.
 */
function groupChunks(n: number, k: number, lengths: readonly number[], size: number): number[][] {
  const groups = Array.from({ length: n / k }, (_, g) => Array.from({ length: k }, (_, j) => g * k + j));
  const longest = (g: number[]): number => Math.max(...g.map((i) => lengths[i]!));
  groups.sort((a, b) => longest(b) - longest(a) || a[0]! - b[0]!);
  const per = Math.max(1, Math.floor(size / k));
  const out: number[][] = [];
  for (let i = 0; i < groups.length; i += per) out.push(groups.slice(i, i + per).flat());
  return out;
}

/** Each row's last n[r] entries of a [B, T] tensor, on the host. */
function rowTails(x: Tensor, n: readonly number[]): number[][] {
  const rows = x.tolist() as number[][];
  return rows.map((r, i) => r.slice(r.length - n[i]!));
}

/** Running |Δ log p| statistics between the training path and the sampler. */
class Mismatch {
  #sum = 0;
  #max = 0;
  #beyond = 0;
  #n = 0;
  constructor(readonly bound: number) {}
  add(old: readonly number[], rollout: readonly number[]): void {
    old.forEach((o, t) => {
      const d = Math.abs(o - rollout[t]!);
      [this.#sum, this.#n] = [this.#sum + d, this.#n + 1];
      this.#max = Math.max(this.#max, d);
      if (d > this.bound) this.#beyond++;
    });
  }
  get stats(): { mean: number; max: number; frac: number } {
    const n = this.#n;
    return n
      ? { mean: this.#sum / n, max: this.#max, frac: this.#beyond / n }
      : { mean: NaN, max: NaN, frac: NaN };
  }
}

/**
 * Learns from a buffer (see the module doc): steps the critic once per
 * micro-batch of groups and the policy `epochs × minibatches` times through `optimizer`, which must hold
 * `policy.policyParameters()` and `policy.valueParameters()` (their own
 * groups, for their own learning rates). Leaves no gradients behind.
 * @param cfg overrides of rl/config.ts's defaults (the `ppo` and `moe` sections are used)
 * @throws {RangeError} for a bad config, a minibatch count that does not divide the buffer's sequences,
 *   or a bad micro-batch size; {@link Error} for routing replay on a model without MoE layers
 */
export function learn(
  policy: Policy,
  optimizer: StepOptimizer,
  buffer: RolloutBuffer,
  cfg: RlOverrides = {},
  opts: LearnOptions = {},
): LearnMetrics {
  const { ppo: c, moe } = rlConfig(cfg);
  const n = buffer.size, k = buffer.k;
  if (n % c.minibatches !== 0) {
    throw new RangeError(
      `ppo.minibatches (${c.minibatches}) must divide the update's ${n} sequences (prompts × rollout.k)`,
    );
  }
  const micro = opts.microBatch ?? 16;
  if (!Number.isSafeInteger(micro) || micro < 1) {
    throw new RangeError(`learn: microBatch must be >= 1, got ${micro}`);
  }
  const replayOn = moe.routingReplay === "rollout";
  if (replayOn && policy.model.decoder.moeLayers === 0) {
    throw new Error(
      `moe.routingReplay "rollout" needs an MoE model: ${policy.model.dir} has no MoE layer (set "off")`,
    );
  }
  if (replayOn && !buffer.routing) {
    throw new Error(
      'moe.routingReplay "rollout": the rollouts carry no routing record (collect with recordRouting)',
    );
  }
  const maxNorm = opts.maxGradNorm ?? 1;
  const seqs = buffer.sequences, rewards = buffer.rewards;
  const lengths = seqs.map((s) => s.tokens.length);
  const temperature = buffer.temperature;
  const critic = c.advantage !== "group";
  const wasTraining = policy.lora.state.training;
  const open = (ids: readonly number[]): { batch: SequenceBatch; replay: Tensor[] | null } => {
    const { batch, replay } = buffer.batch(ids);
    if (replayOn) return { batch, replay };
    if (replay) dispose(replay);
    return { batch, replay: null };
  };
  const clip = (params: Tensor[]): number =>
    maxNorm > 0 ? clipGradNorm(params, maxNorm) : clipGradNorm(params, Number.MAX_VALUE);

  const all = seqs.map((_, i) => i);
  const signal = flatGroups(rewards, k).map((f, i) => !f && lengths[i]! > 0);
  const t0 = performance.now();
  policy.train(false);
  try {
    // 1. Reference log-probs (trained sequences) and the critic (all sequences, whole groups per step).
    const ref: number[][] = [], values: number[][] = [];
    let valueLossSum = 0, valueGradNormSum = 0, valueSteps = 0;
    const centered = groupBaseline(rewards, k);
    const passes = critic
      ? groupChunks(n, k, lengths, micro)
      : chunks(all.filter((i) => signal[i]), lengths, micro);
    if (critic || c.klCoef > 0) {
      for (const chunk of passes) {
        tidy(() => {
          const { batch, replay } = open(chunk);
          const wantRef = c.klCoef > 0 && chunk.some((i) => signal[i]);
          const r = policy.reference(batch, { temperature, replay, logprobs: wantRef });
          const tails = chunk.map((i) => lengths[i]!);
          if (wantRef) rowTails(r.logprobs!, tails).forEach((row, j) => (ref[chunk[j]!] = row));
          if (!critic) return;
          // Values before this step's update: the critic has seen other prompts' groups, never this one.
          const v = policy.values(r.states, batch);
          rowTails(v.detach(), tails).forEach((row, j) => (values[chunk[j]!] = row));
          const mask = c.advantage === "prompt_value"
            ? buffer.perToken(
              chunk,
              batch.inputIds.size(1),
              (i) => [1, ...new Array<number>(lengths[i]! - 1).fill(0)],
            )
            : batch.completionMask.to("float32");
          const target = tensor(chunk.map((i) => centered[i]!), { dtype: "float32", device: v.device });
          const loss = valueLoss(v, target, mask);
          loss.backward();
          valueLossSum += loss.item();
        });
        if (!critic) continue;
        const params = policy.valueParameters();
        valueGradNormSum += clip(params);
        optimizer.step(params);
        optimizer.zeroGrad(params);
        valueSteps++;
      }
    }
    const t1 = performance.now();

    // 2. Advantages over the update.
    const adv = updateAdvantages(rewards, k, lengths, critic ? values : null, {
      estimator: c.advantage,
      gaeLambda: c.gaeLambda,
      normalize: c.normalizeAdvantages,
    });
    const trainedIds = all.filter((i) => adv.trained[i]);

    // 3. Old log-probs, when the policy moves between its steps.
    const mismatch = new Mismatch(Math.log(c.rolloutCorrection ?? 2));
    const steps = c.epochs * c.minibatches;
    const old: number[][] = [];
    if (steps > 1) {
      for (const chunk of chunks(trainedIds, lengths, micro)) {
        tidy(() => {
          const { batch, replay } = open(chunk);
          const lp = noGrad(() => policy.forward(batch, { temperature, replay }).logprobs);
          rowTails(lp, chunk.map((i) => lengths[i]!)).forEach((row, j) => {
            old[chunk[j]!] = row;
            mismatch.add(row, seqs[chunk[j]!]!.logprobs);
          });
        });
      }
    }
    const t2 = performance.now();

    // 4. Policy steps: epochs × minibatches.
    const sums = new Array<number>(OBJECTIVE_PARTS.length).fill(0);
    let stepCount = 0, gradNormSum = 0, lossSum = 0;
    const rand = mulberry32(opts.seed ?? 0);
    const params = policy.policyParameters();
    policy.train(true);
    for (let epoch = 0; epoch < c.epochs; epoch++) {
      const order = [...all];
      for (let i = order.length - 1; i > 0; i--) {
        const j = Math.floor(rand() * (i + 1));
        [order[i], order[j]] = [order[j]!, order[i]!];
      }
      const size = n / c.minibatches;
      for (let m = 0; m < c.minibatches; m++) {
        const ids = order.slice(m * size, (m + 1) * size).filter((i) => adv.trained[i]);
        if (ids.length === 0) continue;
        const tokens = ids.reduce((s, i) => s + lengths[i]!, 0);
        for (const chunk of chunks(ids, lengths, micro)) {
          tidy(() => {
            const { batch, replay } = open(chunk);
            const width = batch.inputIds.size(1);
            const per = (f: (i: number) => readonly number[]): Tensor => buffer.perToken(chunk, width, f);
            const inputs = {
              advantages: per((i) => adv.advantages[i]!),
              oldLogprobs: steps > 1 ? per((i) => old[i]!) : null,
              refLogprobs: c.klCoef > 0 ? per((i) => ref[i]!) : null,
              rolloutLogprobs: per((i) => seqs[i]!.logprobs),
              tokens,
              attentionMask: batch.attentionMask,
              routerTopK: policy.model.config.numExpertsPerTok,
            };
            lossSum += policy.backward(batch, (out) => {
              const r = ppoObjective(out, inputs, c);
              r.parts.toArray().forEach((x, p) => (sums[p] = sums[p]! + x));
              if (steps === 1) {
                rowTails(out.logprobs.detach(), chunk.map((i) => lengths[i]!)).forEach((row, j) =>
                  mismatch.add(row, seqs[chunk[j]!]!.logprobs)
                );
              }
              return r.loss;
            }, { temperature, replay });
          });
        }
        gradNormSum += clip(params);
        optimizer.step(params);
        optimizer.zeroGrad(params);
        stepCount++;
      }
    }
    const t3 = performance.now();

    const mm = mismatch.stats;
    const allValues = values.flat();
    const parts = Object.fromEntries(
      OBJECTIVE_PARTS.map((p, i) => [p, stepCount ? sums[i]! / stepCount : NaN]),
    ) as Record<ObjectivePart, number>;
    return {
      ...parts,
      loss: stepCount ? lossSum / stepCount : NaN,
      value_loss: valueSteps ? valueLossSum / valueSteps : NaN,
      value_mean: critic && allValues.length ? allValues.reduce((a, b) => a + b, 0) / allValues.length : NaN,
      grad_norm: stepCount ? gradNormSum / stepCount : NaN,
      value_grad_norm: valueSteps ? valueGradNormSum / valueSteps : NaN,
      advantage_std: adv.std,
      frac_zero_std_groups: zeroSpreadFraction(rewards, k),
      trained_fraction: trainedIds.length / n,
      mismatch_mean: mm.mean,
      mismatch_max: mm.max,
      mismatch_frac: mm.frac,
      optimizer_steps: stepCount,
      reference_seconds: (t1 - t0) / 1000,
      old_seconds: (t2 - t1) / 1000,
      learn_seconds: (t3 - t2) / 1000,
    };
  } finally {
    policy.train(wasTraining);
  }
}
