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
 *
 * **Data parallel** (`opts.replicas`): each rank holds whole prompt groups
 * (an equal number of sequences) and the update is the one a single process
 * holding all of them would make: ranks share every sequence's length and
 * reward, so that the critic's micro-batches (whole groups, W × microBatch
 * sequences, longest first), the minibatches and the token counts of the
 * loss means are the global ones; gradients are summed over the ranks before
 * clipping and each optimizer step, and the advantage normalisation and the
 * metrics are reduced. Every rank then takes the same steps.
 * @module
 */
import { clipGradNorm, dispose, type Tensor, tensor, tidy, TorchError } from "../ffi/mod.ts";
import type { LossScaler } from "./loss_scale.ts";
import { mulberry32, shuffleInPlace } from "../data/batches.ts";
import { flatGroups, groupBaseline, type UpdateAdvantages, zeroSpreadFraction } from "./advantages.ts";
import type { RolloutBuffer } from "./rollout_buffer.ts";
import { type PpoConfig, rlConfig, type RlOverrides } from "./config.ts";
import { OBJECTIVE_PARTS, type ObjectivePart } from "./objective.ts";
import {
  checkAdvantages,
  checkLoss,
  checkObjective,
  checkUsedFunctions,
  type LearnFunctions,
  learnFunctions,
} from "./replaceable.ts";
import type { Policy, SequenceBatch } from "./policy.ts";
import { type GlobalView, globalView, Replicas } from "./replicas.ts";
import { chunks, DeferredReads, groupChunks, rowTails } from "./micro_batches.ts";
import { Mismatch } from "./mismatch.ts";

/** What {@link learn} needs of an optimizer: ffi/optim.ts's AdamW (e.g. rl/ppo.ts `policyOptimizer`). */
export interface StepOptimizer {
  /** Updates the given parameters from their gradients. */
  step(only: readonly Tensor[]): void;
  /** Drops the given parameters' gradients. */
  zeroGrad(only: readonly Tensor[]): void;
}

/** The global gradient norm each group is clipped to unless {@link LearnOptions.maxGradNorm} says otherwise. */
export const DEFAULT_MAX_GRAD_NORM = 1;

/** Options of {@link learn}, with the functions it may use instead of the library's (rl/replaceable.ts). */
export interface LearnOptions extends LearnFunctions {
  /** Sequences per forward/backward pass (default 16); gradients accumulate over them. */
  microBatch?: number;
  /** Clip each group's gradient (adapters; critic) to this global L2 norm (default 1; 0: no clipping). */
  maxGradNorm?: number;
  /** Seeds how sequences are dealt into minibatches (default 0). */
  seed?: number;
  /** The ranks of a data-parallel update (default: a single process); see the module doc. */
  replicas?: Replicas;
  /**
   * Scales the policy's loss (rl/loss_scale.ts), for a float16 model; keep one across updates. A step whose
   * gradients overflow is skipped and the scale backed off, instead of the error a non-finite norm gives;
   * one that overflows at a scale of 1 or less has a loss that is not finite, and gives that error.
   */
  lossScaler?: LossScaler;
}

/** The numbers of a learn phase (NaN where a quantity does not apply, e.g. kl without a KL penalty). */
export type LearnMetrics = Record<ObjectivePart, number> & {
  /** The policy's total loss (the objective of rl/objective.ts), mean over its steps (skipped ones too). */
  loss: number;
  /** The critic's loss, mean over its steps (each before its update). */
  value_loss: number;
  /** The mean of its values over all completion tokens. */
  value_mean: number;
  /** The policy's gradient norm before clipping, mean over the steps taken (not skipped). */
  grad_norm: number;
  /** The critic's gradient norm before clipping, mean over its steps. */
  value_grad_norm: number;
  /** Std of the raw token advantages over the trained tokens, before normalisation. */
  advantage_std: number;
  /** Fraction of prompt groups whose rewards are all equal (skipped when K > 1; with K = 1 all, none skipped). */
  frac_zero_std_groups: number;
  /** Fraction of sequences in the policy update. */
  trained_fraction: number;
  /** Rollout/training mismatch over the trained tokens: mean |log π_old − log π_rollout|. */
  mismatch_mean: number;
  /** Its max. */
  mismatch_max: number;
  /**
   * Fraction of trained tokens whose π_old / π_rollout lies beyond [1/C, C], C being ppo.rolloutCorrection
   * (2 when that is null).
   */
  mismatch_frac: number;
  /** Policy optimizer steps taken. */
  optimizer_steps: number;
  /** Policy steps skipped because their scaled gradients overflowed ({@link LearnOptions.lossScaler}). */
  skipped_steps: number;
  /** The policy loss's scale after the update (1 without a loss scaler). */
  loss_scale: number;
  /** Seconds in the reference/critic pass. */
  reference_seconds: number;
  /** Seconds in the old pass. */
  old_seconds: number;
  /** Seconds in the policy steps. */
  learn_seconds: number;
};

/** What the phases of one learn call share. */
interface Run {
  policy: Policy;
  optimizer: StepOptimizer;
  buffer: RolloutBuffer;
  ppo: PpoConfig;
  /** The completion token cap (the buffer's, else rollout.maxNewTokens). */
  maxTokens: number;
  micro: number;
  /** This rank's sequences' completion lengths. */
  lengths: number[];
  temperature: number;
  dp: Replicas;
  all: GlobalView;
  /** The advantages, objective and critic loss in use. */
  fns: Required<LearnFunctions>;
  /** This rank's indices of the global indices it holds, in order. */
  local(ids: readonly number[]): number[];
  /** A batch of the chosen sequences and, with routing replay, their experts. */
  open(ids: readonly number[]): { batch: SequenceBatch; replay: Tensor[] | null };
  /** The policy's loss scale, if any. */
  scaler: LossScaler | null;
  /**
   * One optimizer step of a parameter group: its gradients summed over the ranks (and the policy's divided by
   * its loss scale), clipped to maxGradNorm (when set), applied and zeroed. Returns the norm before clipping;
   * null for a policy step skipped because its scaled gradients overflowed. `group` names it in errors.
   */
  step(params: Tensor[], group: "policy" | "critic"): number | null;
}

/** Each row's log-probs of the chosen sequences' completion tokens, on the host. */
function tails(run: Run, lp: Tensor, ids: readonly number[]): number[][] {
  return rowTails(lp, ids.map((i) => run.lengths[i]!));
}

/** What the reference pass gives: per sequence, reference log-probs and the critic's values. */
interface ReferenceResult {
  ref: number[][];
  values: number[][];
  valueLoss: number;
  valueGradNorm: number;
}

/**
 * Phase 1: reference log-probs of the sequences with signal (for the KL) and,
 * with a critic, its values of every sequence, one critic step per micro-batch
 * of whole prompt groups (each group's values read before the step that sees it).
 */
function referencePass(run: Run, signal: readonly boolean[]): ReferenceResult {
  const { buffer, ppo: c, policy, dp, all } = run;
  const critic = c.advantage !== "group";
  const ref: number[][] = [], values: number[][] = [];
  let lossSum = 0, normSum = 0, steps = 0;
  if (!critic && c.klCoef === 0) return { ref, values, valueLoss: NaN, valueGradNorm: NaN };
  const centered = groupBaseline(buffer.rewards, buffer.k);
  // The critic steps once per global micro-batch of whole groups; each rank computes its share of it.
  const passes = critic
    ? groupChunks(all.lengths.length, buffer.k, all.lengths, run.micro * dp.size).map((g) => ({
      chunk: run.local(g),
      tokens: c.advantage === "prompt_value"
        ? g.filter((i) => all.lengths[i]! > 0).length
        : g.reduce((s, i) => s + all.lengths[i]!, 0),
    }))
    : chunks(signal.flatMap((s, i) => (s ? [i] : [])), run.lengths, run.micro).map((chunk) => ({
      chunk,
      tokens: 0,
    }));
  // Read after each critic step (or at the end, without a critic); values read after the step that learns
  // from them are still those computed before it.
  using later = new DeferredReads();
  for (const { chunk: share, tokens } of passes) {
    // A rank's share of a global micro-batch can be larger than a micro-batch (the longest groups may all
    // be on one rank): it runs in micro-batches, whose gradients add up before the step.
    for (const chunk of share.length > run.micro ? chunks(share, run.lengths, run.micro) : [share]) {
      if (!chunk.length) continue;
      tidy(() => {
        const { batch, replay } = run.open(chunk);
        const wantRef = c.klCoef > 0 && chunk.some((i) => signal[i]);
        const r = policy.reference(batch, { temperature: run.temperature, replay, logprobs: wantRef });
        if (wantRef) {
          later.read(r.logprobs!, (lp) => tails(run, lp, chunk).forEach((row, j) => (ref[chunk[j]!] = row)));
        }
        if (!critic) return;
        const v = policy.values(r.states, batch);
        later.read(v, (x) => tails(run, x, chunk).forEach((row, j) => (values[chunk[j]!] = row)));
        const mask = c.advantage === "prompt_value"
          ? buffer.perToken(
            chunk,
            batch.inputIds.size(1),
            (i) => (run.lengths[i]! > 0 ? [1, ...new Array<number>(run.lengths[i]! - 1).fill(0)] : []),
          )
          : batch.completionMask.to("float32");
        const target = tensor(chunk.map((i) => centered[i]!), { dtype: "float32", device: v.device });
        // This rank's share of the mean over the global micro-batch's tokens.
        const loss = checkLoss(run.fns.valueLoss(v, target, mask, tokens), "valueLoss");
        loss.backward();
        later.read(loss, (x) => (lossSum += x.item()));
      });
    }
    if (!critic) continue;
    normSum += run.step(policy.valueParameters(), "critic")!; // null only for a scaled policy
    steps++;
    later.flush();
  }
  later.flush();
  lossSum = dp.sum([lossSum])[0]!;
  return {
    ref,
    values,
    valueLoss: steps ? lossSum / steps : NaN,
    valueGradNorm: steps ? normSum / steps : NaN,
  };
}

/** Phase 3: log π_old of the trained sequences from a no-grad training-path pass. */
function oldPass(run: Run, trained: readonly number[], mismatch: Mismatch): number[][] {
  // Its micro-batches share the adapters' casts, freed before the training passes (which cast in autograd).
  using _casts = run.policy.lora.state.holdCasts();
  const old: number[][] = [];
  using later = new DeferredReads();
  for (const chunk of chunks(trained, run.lengths, run.micro)) {
    tidy(() => {
      const { batch, replay } = run.open(chunk);
      const lp = run.policy.logprobs(batch, { temperature: run.temperature, replay });
      later.read(lp, (x) =>
        tails(run, x, chunk).forEach((row, j) => {
          old[chunk[j]!] = row;
          mismatch.add(row, run.buffer.sequences[chunk[j]!]!.logprobs);
        }));
    });
  }
  later.flush();
  return old;
}

/**
 * Phase 4: `epochs` passes over the sequences, dealt (seeded) into
 * `minibatches` optimizer steps each; within a step, micro-batches of the
 * trained sequences accumulate the token-mean objective over the step's tokens.
 */
function policySteps(
  run: Run,
  adv: UpdateAdvantages & { trainedAll: boolean[] },
  ref: readonly number[][],
  old: readonly number[][] | null,
  mismatch: Mismatch,
  seed: number,
): { parts: Record<ObjectivePart, number>; steps: number; skipped: number; loss: number; gradNorm: number } {
  const { buffer, ppo: c, policy, dp, all } = run;
  const n = all.lengths.length, seqs = buffer.sequences;
  const sums = new Array<number>(OBJECTIVE_PARTS.length).fill(0);
  let steps = 0, skipped = 0, normSum = 0, lossSum = 0;
  const rand = mulberry32(seed);
  const params = policy.policyParameters();
  policy.train(true);
  for (let epoch = 0; epoch < c.epochs; epoch++) {
    const order = shuffleInPlace(all.lengths.map((_, i) => i), rand);
    const size = n / c.minibatches;
    for (let m = 0; m < c.minibatches; m++) {
      const global = order.slice(m * size, (m + 1) * size).filter((i) => adv.trainedAll[i]);
      if (global.length === 0) continue;
      const tokens = global.reduce((s, i) => s + all.lengths[i]!, 0);
      const ids = run.local(global);
      const scale = run.scaler?.scale ?? 1; // the same on every rank: the ranks' overflows are summed
      // Losses, objective parts and log-probs are read once the step is queued.
      using later = new DeferredReads();
      for (const chunk of chunks(ids, run.lengths, run.micro)) {
        tidy(() => {
          const { batch, replay } = run.open(chunk);
          const per = (f: (i: number) => readonly number[]): Tensor =>
            buffer.perToken(chunk, batch.inputIds.size(1), f);
          const inputs = {
            advantages: per((i) => adv.advantages[i]!),
            oldLogprobs: old ? per((i) => old[i]!) : null,
            refLogprobs: c.klCoef > 0 ? per((i) => ref[i]!) : null,
            rolloutLogprobs: per((i) => seqs[i]!.logprobs),
            tokens,
            sequences: global.length,
            maxTokens: run.maxTokens,
            attentionMask: batch.attentionMask,
            routerTopK: policy.model.config.numExpertsPerTok,
          };
          policy.backwardLoss(batch, (out) => {
            const r = checkObjective(run.fns.objective(out, inputs, c));
            later.read(r.parts, (x) => x.toArray().forEach((v, p) => (sums[p] = sums[p]! + v)));
            later.read(r.loss, (x) => (lossSum += x.item())); // unscaled: a scaled one may overflow
            // With one step the training pass is π_old: measure the sampler's mismatch on it.
            if (!old) {
              later.read(
                out.logprobs,
                (lp) =>
                  tails(run, lp, chunk).forEach((row, j) => mismatch.add(row, seqs[chunk[j]!]!.logprobs)),
              );
            }
            return scale === 1 ? r.loss : r.loss.mul(scale);
          }, { temperature: run.temperature, replay });
        });
      }
      const norm = run.step(params, "policy");
      if (norm === null) skipped++;
      else normSum += norm;
      steps++;
      later.flush();
    }
  }
  // Each rank summed its share of every token mean: the totals are the global means.
  const [loss, ...totals] = dp.sum([lossSum, ...sums]) as [number, ...number[]];
  const parts = Object.fromEntries(OBJECTIVE_PARTS.map((p, i) => [p, steps ? totals[i]! / steps : NaN]));
  return {
    parts: parts as Record<ObjectivePart, number>,
    steps: steps - skipped,
    skipped,
    loss: steps ? loss / steps : NaN,
    gradNorm: steps > skipped ? normSum / (steps - skipped) : NaN,
  };
}

/**
 * The update's advantages (`compute`, checked) and every rank's trained flags in global order (an advantages
 * function may leave out more than the flat groups). A rank whose advantages are refused must not throw alone,
 * or the others would wait in the next collective: its flags travel behind an ok flag, and every rank throws.
 */
function advantagesOnRanks(
  dp: Replicas,
  n: number,
  compute: () => UpdateAdvantages,
): { adv: UpdateAdvantages; trainedAll: boolean[] } {
  if (dp.size === 1) {
    const adv = compute();
    return { adv, trainedAll: adv.trained };
  }
  let adv: UpdateAdvantages | null = null, refused: unknown = null;
  try {
    adv = compute();
  } catch (e) {
    refused = e;
  }
  const rows = dp.gather([adv ? 1 : 0, ...(adv?.trained ?? new Array<boolean>(n).fill(false)).map(Number)]);
  if (refused !== null) throw refused;
  const failed = rows.findIndex((r) => r[0] !== 1);
  if (failed >= 0) throw new Error(`learn: rank ${failed}'s advantages were refused (its log says why)`);
  return { adv: adv!, trainedAll: rows.flatMap((r) => r.slice(1)).map((t) => t === 1) };
}

/**
 * Learns from a buffer (see the module doc): steps the critic once per
 * micro-batch of groups and the policy `epochs × minibatches` times through
 * `optimizer`, which must hold `policy.policyParameters()` and
 * `policy.valueParameters()` (their own groups, for their own learning
 * rates). Leaves no gradients behind.
 * @param cfg overrides of rl/config.ts's defaults (the `ppo` and `moe` sections are used, and
 *   `rollout.maxNewTokens` for a buffer that does not record its token cap)
 * @throws {RangeError} for a bad config, a minibatch count that does not divide the buffer's sequences,
 *   a bad micro-batch size, or Dr. GRPO's aggregation with a completion longer than the token cap;
 *   {@link Error} for routing replay on a model without MoE layers, the router loss with gradient
 *   checkpointing, a valueLoss function without a critic (ppo.advantage "group"), or (after the critic's
 *   steps, which the advantages need) a replacement advantages, objective or critic loss function whose result
 *   does not fit (every rank throws)
 */
export function learn(
  policy: Policy,
  optimizer: StepOptimizer,
  buffer: RolloutBuffer,
  cfg: RlOverrides = {},
  opts: LearnOptions = {},
): LearnMetrics {
  policy.checkAlive("learn");
  buffer.checkAlive("learn");
  const { ppo: c, moe, rollout } = rlConfig(cfg);
  const dp = opts.replicas ?? Replicas.single();
  const k = buffer.k;
  const lengths = buffer.sequences.map((s) => s.tokens.length);
  const all = globalView(dp, lengths, buffer.rewards);
  const n = all.lengths.length;
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
  // Dr. GRPO's divisor: the cap the completions were sampled with, else (a buffer made by hand) the config's.
  const cap = buffer.maxNewTokens ?? rollout.maxNewTokens;
  const longest = Math.max(0, ...all.lengths);
  if (c.lossAggregation === "seq_mean_token_sum_norm" && longest > cap) {
    throw new RangeError(
      `ppo.lossAggregation "seq_mean_token_sum_norm" divides by the token cap (${cap}), but a completion has ` +
        `${longest} tokens: give the buffer the cap it was sampled with (maxNewTokens)`,
    );
  }
  if (c.routerAuxCoef > 0 && policy.checkpointing) { // checked before any step, not at the first objective
    throw new Error(
      "ppo.routerAuxCoef > 0 needs router logits, which a checkpointed backward does not keep " +
        "(policy.checkpointing): set one of them off",
    );
  }
  checkUsedFunctions(opts, c.advantage, "learn");
  const maxNorm = opts.maxGradNorm ?? DEFAULT_MAX_GRAD_NORM;
  if (opts.seed !== undefined && !(Number.isSafeInteger(opts.seed) && opts.seed >= 0)) {
    throw new RangeError(`learn: seed must be an integer >= 0, got ${opts.seed}`);
  }
  if (!(Number.isFinite(maxNorm) && maxNorm >= 0)) { // NaN or a negative would switch clipping off unseen
    throw new RangeError(`learn: maxGradNorm must be a finite number >= 0 (0: no clipping), got ${maxNorm}`);
  }
  const run: Run = {
    policy,
    optimizer,
    buffer,
    ppo: c,
    maxTokens: cap,
    micro,
    lengths,
    temperature: buffer.temperature,
    dp,
    all,
    fns: learnFunctions(opts),
    local: (ids) =>
      ids.flatMap((g) => (g >= all.offset && g < all.offset + buffer.size ? [g - all.offset] : [])),
    open(ids): { batch: SequenceBatch; replay: Tensor[] | null } {
      const { batch, replay } = buffer.batch(ids);
      if (replayOn) return { batch, replay };
      if (replay) dispose(replay);
      return { batch, replay: null };
    },
    scaler: opts.lossScaler ?? null,
    step(params, group): number | null {
      dp.sumGradients(params);
      const scaler = group === "policy" ? run.scaler : null;
      if (scaler && scaler.scale !== 1) unscale(params, scaler.scale);
      const norm = clipGradNorm(params, maxNorm > 0 ? maxNorm : Number.MAX_VALUE);
      scaler?.update(!Number.isFinite(norm)); // the same on every rank (summed gradients)
      // Gradients that overflow below a scale of 1 are not a float16 overflow: the loss itself is not finite.
      if (scaler && !Number.isFinite(norm) && scaler.scale >= 1) {
        optimizer.zeroGrad(params);
        return null;
      }
      if (!Number.isFinite(norm)) { // the same on every rank (summed gradients): every rank throws
        const loss = group === "policy" ? "objective" : "valueLoss";
        const scaled = scaler ? ` even at a loss scale of ${scaler.scale * 2}` : "";
        throw new Error(
          `learn: the ${group}'s gradient norm is ${norm}${scaled} (the ${loss}'s loss or an input to it is not ` +
            "finite); no step taken",
        );
      }
      optimizer.step(params);
      optimizer.zeroGrad(params);
      return norm;
    },
  };
  const rewards = buffer.rewards;
  const signal = flatGroups(rewards, k).map((f, i) => !f && run.lengths[i]! > 0);
  // ppo.maskTruncated: a completion cut at the cap keeps its advantage (and its place in the baseline and the
  // normalisation, as TRL's mask_truncated_completions) but is not trained.
  const cut = buffer.sequences.map((s) => c.maskTruncated && s.finishReason === "length");
  const wasTraining = policy.lora.state.training;
  const t0 = performance.now();
  policy.train(false);
  try {
    const first = referencePass(run, signal.map((s, i) => s && !cut[i])); // no KL for what is not trained
    const t1 = performance.now();
    const { adv, trainedAll } = advantagesOnRanks(dp, run.lengths.length, () => {
      const checked = checkAdvantages(
        run.fns.advantages(rewards, k, run.lengths, c.advantage === "group" ? null : first.values, {
          estimator: c.advantage,
          gaeLambda: c.gaeLambda,
          normalize: c.normalizeAdvantages,
          reduce: (stats) => dp.sum(stats),
        }),
        run.lengths,
        signal,
      );
      return { ...checked, trained: checked.trained.map((t, i) => t && !cut[i]) };
    });
    const trained = adv.trained.flatMap((t, i) => (t ? [i] : []));
    const mismatch = new Mismatch(Math.log(c.rolloutCorrection ?? 2));
    const old = c.epochs * c.minibatches > 1 ? oldPass(run, trained, mismatch) : null;
    const t2 = performance.now();
    const steps = policySteps(run, { ...adv, trainedAll }, first.ref, old, mismatch, opts.seed ?? 0);
    const t3 = performance.now();
    const values = first.values.flat(), mm = mismatch.stats(dp);
    const [valueSum, valueCount] = dp.sum([values.reduce((a, b) => a + b, 0), values.length]);
    return {
      ...steps.parts,
      loss: steps.loss,
      value_loss: first.valueLoss,
      value_mean: valueCount ? valueSum! / valueCount : NaN,
      grad_norm: steps.gradNorm,
      value_grad_norm: first.valueGradNorm,
      advantage_std: adv.std,
      frac_zero_std_groups: zeroSpreadFraction(all.rewards, k),
      trained_fraction: trainedAll.filter(Boolean).length / n,
      mismatch_mean: mm.mean,
      mismatch_max: mm.max,
      mismatch_frac: mm.frac,
      optimizer_steps: steps.steps,
      skipped_steps: steps.skipped,
      loss_scale: run.scaler?.scale ?? 1,
      reference_seconds: (t1 - t0) / 1000,
      old_seconds: (t2 - t1) / 1000,
      learn_seconds: (t3 - t2) / 1000,
    };
  } catch (e) {
    // A step that failed midway leaves its micro-batches' gradients: drop them, or the next update applies them.
    for (const p of [...policy.policyParameters(), ...policy.valueParameters()]) p.clearGrad();
    throw outOfMemoryHint(e, run.micro, c.advantage);
  } finally {
    policy.train(wasTraining);
  }
}

/** Divides each parameter's gradient by the loss scale, in place (a power of two: exactly). */
function unscale(params: readonly Tensor[], scale: number): void {
  for (const p of params) {
    using g = p.grad;
    if (g) tidy(() => void g.copy_(g.mul(1 / scale)));
  }
}

/**
 * A pass that ran out of memory, as an error naming the settings that bound it (other errors as they are).
 * The micro-batch also sets the critic's steps (one per micro-batch of prompt groups): with a critic, a smaller
 * one changes the update, not only the passes.
 */
function outOfMemoryHint(e: unknown, micro: number, advantage: PpoConfig["advantage"]): unknown {
  if (!(e instanceof TorchError) || !e.outOfMemory) return e;
  const advice = advantage === "group"
    ? "Fewer sequences per pass change the passes, not the update: lower train.microBatch and raise " +
      "train.gradAccum as much, or set train.gradientCheckpointing: true, or a smaller train.headChunk."
    : "train.gradientCheckpointing: true or a smaller train.headChunk change the passes, not the update; a " +
      "lower train.microBatch (train.gradAccum raised as much) also gives the critic (ppo.advantage " +
      `${JSON.stringify(advantage)}) more, smaller steps: it steps once per micro-batch of prompt groups.`;
  return new Error(
    `learn: out of memory in a pass of up to ${micro} sequences (LearnOptions.microBatch; deno task train ` +
      `passes train.microBatch × rollout.k). ${advice} (${e.message})`,
    { cause: e },
  );
}
