/**
 * The training loop: each update takes microBatch × gradAccum prompts,
 * collects rollout.k completions for each (rl/collect.ts: generation,
 * rewards, routing records), learns from them (rl/learn.ts: reference and
 * critic pass, advantages over the update, PPO steps), and logs. Every
 * update is seeded from (seed, update) and the data order from (seed,
 * epoch), so a resumed run repeats an uninterrupted one.
 *
 * Data parallel (`opts.replicas`, train/launch.ts): every rank draws the
 * same prompts and takes its contiguous share (whole prompt groups), each
 * prompt's samples drawn from streams keyed by its update-wide position;
 * learn() reduces what must be global. The update is the one a single
 * process would make from the same prompts in generation batches of the
 * same shape (docs/data-parallel.md). Rank 0
 * alone writes the run folder; evaluation is split over the ranks.
 * @module
 */
import { join } from "node:path";
import { type Device, manualSeed } from "../ffi/mod.ts";
import { MicroBatcher } from "../data/batches.ts";
import { buildPrompts } from "../data/prompt.ts";
import { resolveModel } from "../model/hub.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect, type ScoreFn } from "../rl/collect.ts";
import { checkUsedFunctions, type LearnFunctions } from "../rl/replaceable.ts";
import type { RolloutPrompt } from "../rl/rollout_buffer.ts";
import { evaluateExamples } from "../rl/evaluate.ts";
import { learn } from "../rl/learn.ts";
import { LossScaler } from "../rl/loss_scale.ts";
import { Replicas } from "../rl/replicas.ts";
import { collectMetricsOverRanks, evalTotalsOverRanks } from "./rank_metrics.ts";
import {
  latestCheckpoint,
  loadCheckpoint,
  readTrainerState,
  saveCheckpoint,
  tidyRunDir,
  updateSeed,
} from "./checkpoint.ts";
import { formatConfig, RUN_CONFIG_FILE, runDir, type TrainConfig } from "./config.ts";
import { writeAtomic } from "../model/atomic_write.ts";
import { isFile } from "../model/json.ts";
import { JsonlLog, METRICS_FILE, SAMPLES_FILE, type StepRecord } from "./metrics.ts";
import { TensorBoardLog } from "./tensorboard.ts";
import { ProgressBar } from "./progress.ts";
import { writeReport } from "./report.ts";
import {
  configuredEvaluation,
  configuredOptimizer,
  configuredPolicy,
  configuredPrompt,
  dataWarnings,
  loadConfiguredData,
  loadConfiguredModel,
  precisionWarning,
  rankShare,
} from "./model.ts";
import {
  checkNewRunDir,
  checkNotCheckpoint,
  checkResumable,
  lockRunDir,
  nothingToResume,
  RUN_LOCK_FILE,
} from "./resume.ts";
import { lrFactor } from "./schedule.ts";
import { checkSameConfig, fetchFirst } from "./launch.ts";

/** What a finished (or resumed and finished) run returns. */
export interface TrainResult {
  /** The run folder. */
  dir: string;
  /** Every update's metrics record written by this process. */
  records: StepRecord[];
}

/** Options of {@link train}. */
export interface TrainOptions extends LearnFunctions {
  /**
   * Scores completions instead of the config's GSM8K reward (rl/collect.ts `ScoreFn`); with `advantages`,
   * `objective` and `valueLoss` (rl/replaceable.ts), for a notebook's own pieces. None of them is recorded in
   * the run folder: resume with the same ones.
   */
  score?: ScoreFn;
  /** Continue from the run folder's latest checkpoint. */
  resume?: boolean;
  /** No progress bar or messages. */
  quiet?: boolean;
  /** The ranks of a data-parallel run (train/launch.ts `joinReplicas`; default: one process). */
  replicas?: Replicas;
  /** This rank's device, when it differs from the config's (e.g. `cuda:LOCAL_RANK`). */
  device?: Device;
  /** This rank's LOCAL_RANK (default: its rank): local rank 0 downloads for its machine. */
  localRank?: number;
}

/** Runs (or resumes) the training described by cfg. */
export async function train(cfg: TrainConfig, opts: TrainOptions = {}): Promise<TrainResult> {
  const dp = opts.replicas ?? Replicas.single();
  const lead = dp.rank === 0; // writes the run folder
  const perUpdate = cfg.train.microBatch * cfg.train.gradAccum;
  if (perUpdate % dp.size !== 0) {
    throw new RangeError(
      `train.microBatch × train.gradAccum = ${perUpdate} prompts per update do not split over ${dp.size} ranks`,
    );
  }
  checkUsedFunctions(opts, cfg.ppo.advantage, "train"); // before the first rollout, not at its learn
  const share = perUpdate / dp.size, first = dp.rank * share;
  const dir = runDir(cfg);
  // Checked before the model loads or config.yaml is written: a refused run changes nothing.
  await checkNotCheckpoint(dir);
  // One writer per run folder: a second trainer (a requeued job, an orphaned rank 0) is refused here.
  const lock = lead ? await lockRunDir(dir) : null;
  try {
    return await trainLocked(cfg, opts, dp, dir, share, first, lock?.lockedBefore ?? false);
  } catch (e) {
    // A start refused before anything was written leaves no folder behind (a failure here hides nothing), and
    // no lock file of its own: a later --resume would take that for a run started there.
    if (lock && !lock.lockedBefore) await removeOwnLock(dir, lock.created).catch(() => {});
    throw e;
  } finally {
    lock?.file?.close();
  }
}

/**
 * After a failed start whose lock file this process made: unless the run wrote its config.yaml (its first
 * output, once the model and data have loaded), the lock file goes, and the folder too when this process made
 * it and nothing else is in it.
 */
async function removeOwnLock(dir: string, created: boolean): Promise<void> {
  if (await isFile(join(dir, RUN_CONFIG_FILE))) return;
  await Deno.remove(join(dir, RUN_LOCK_FILE));
  if (!created) return;
  for await (const _ of Deno.readDir(dir)) return;
  await Deno.remove(dir);
}

/** {@link train}, once rank 0 holds the run folder's lock. */
async function trainLocked(
  cfg: TrainConfig,
  opts: TrainOptions,
  dp: Replicas,
  dir: string,
  share: number,
  first: number,
  lockedBefore: boolean,
): Promise<TrainResult> {
  const lead = dp.rank === 0;
  const quiet = opts.quiet || !lead;
  const t = cfg.train;
  const resumeFrom = opts.resume ? await latestCheckpoint(dir) : null;
  if (resumeFrom) checkResumable(resumeFrom, await readTrainerState(resumeFrom), cfg, dp.size);
  else if (opts.resume) {
    const started = dp.sum([lockedBefore ? 1 : 0])[0]! > 0; // rank 0 alone took the lock, so it alone knows
    const notice = await nothingToResume(dir, started);
    if (!quiet) console.log(notice);
  } else if (lead) await checkNewRunDir(dir);

  checkSameConfig(dp, formatConfig(cfg)); // a rank with other settings would silently diverge
  const evalSplit = cfg.eval.every > 0 ? cfg.eval.split : null;
  if (!quiet) {
    for (const w of dataWarnings(cfg, { training: true, evalSplit })) {
      console.warn(`data: ${w}`);
    }
    const precision = precisionWarning(cfg);
    if (precision) console.warn(`model: ${precision}`);
  }
  await fetchFirst(dp, opts.localRank ?? dp.rank, async () => {
    await resolveModel(cfg.model.id);
    await loadConfiguredData(cfg, "data", cfg.data.split);
    if (cfg.eval.every > 0) await loadConfiguredData(cfg, "eval", cfg.eval.split);
  });
  using model = await loadConfiguredModel({ ...cfg.model, device: opts.device ?? cfg.model.device });
  const tok = await Tokenizer.load(model.dir);
  manualSeed(cfg.seed); // adapter and value-head initialisation
  const policy = configuredPolicy(model, cfg);
  const trainable = (): ReturnType<typeof policy.policyParameters> => [
    ...policy.policyParameters(),
    ...policy.valueParameters(),
  ];
  using opt = configuredOptimizer(policy, cfg);
  try {
    const data = await loadConfiguredData(cfg, "data", cfg.data.split, cfg.data.limit ?? undefined);
    for (const s of data.skipped) console.warn(`data: skipped line ${s.line}: ${s.reason}`);
    const rendered = await buildPrompts(tok, data.examples.map((e) => e.question), configuredPrompt(cfg));
    const items: RolloutPrompt[] = data.examples.map((e, i) => ({ ids: rendered[i]!.ids, answer: e.answer }));
    if (items.length < t.microBatch) {
      throw new RangeError(
        `${cfg.data.source}: ${items.length} problems, fewer than train.microBatch (${t.microBatch})`,
      );
    }
    // Every update gets its full microBatch × gradAccum prompts (an epoch's short last micro-batch is dropped), so
    // it splits evenly over the ranks and ppo.minibatches divides it, as the config check assumes.
    const batcher = new MicroBatcher(items, { batchSize: t.microBatch, seed: cfg.seed, dropLast: true });
    let evalSet: typeof data.examples = [];
    if (cfg.eval.every > 0) { // read as `deno task evaluate` reads it
      const ev = await loadConfiguredData(cfg, "eval", cfg.eval.split, cfg.eval.limit ?? undefined);
      for (const s of ev.skipped) console.warn(`eval data: skipped line ${s.line}: ${s.reason}`);
      evalSet = ev.examples;
      if (evalSet.length === 0) { // an accuracy of 0 from nothing would be logged as a result
        throw new RangeError(
          `${cfg.eval.source} (${cfg.eval.split}): no problems to evaluate (eval.every is ${cfg.eval.every}; ` +
            "0 trains without evaluating)",
        );
      }
    }

    let start = 0, pos = { epoch: 0, index: 0 };
    // float16 flushes small gradients to zero: its policy loss is scaled (train.lossScale "auto").
    const scaler = t.lossScale === "dynamic" || (t.lossScale === "auto" && cfg.model.dtype === "float16")
      ? new LossScaler()
      : null;
    if (resumeFrom) {
      const state = await loadCheckpoint(resumeFrom, policy, opt);
      if (scaler && state.lossScale) scaler.restore(state.lossScale);
      start = state.step;
      pos = state.rng.batcherPosition;
      // A checkpoint from before short micro-batches were dropped may point at one: the next epoch's start.
      if (pos.index >= batcher.batchesPerEpoch) pos = { epoch: pos.epoch + 1, index: 0 };
      if (!quiet) console.log(`resuming from ${resumeFrom} (update ${start})`);
      if (!quiet && start >= t.updates) {
        console.log(`nothing left to train: train.updates is ${t.updates} (raise it to train on)`);
      }
    }
    // Every rank starts from rank 0's weights (the same seed makes them equal already; this makes sure).
    dp.broadcastFromFirst(trainable());
    // What interrupted writes left (temporary files, half-removed checkpoints, checkpoints past keepLast),
    // also where a run killed before its first checkpoint starts over. The lock says nothing else writes here.
    if (lead) await tidyRunDir(dir, resumeFrom ? cfg.output.keepLast : null);
    if (lead) { // once the model and data have loaded: a start that fails leaves no run folder behind
      await Deno.mkdir(dir, { recursive: true });
      await writeAtomic(join(dir, RUN_CONFIG_FILE), formatConfig(cfg));
    }
    const open = async (file: string): Promise<JsonlLog | null> =>
      lead ? (await JsonlLog.open(join(dir, file), opts.resume ? { keepUpTo: start } : {})).log : null;
    let metrics: JsonlLog | null = null, samples: JsonlLog | null = null, board: TensorBoardLog | null = null;
    const bar = quiet ? null : new ProgressBar(t.updates, { start });
    const records: StepRecord[] = [];
    const rl = { rollout: cfg.rollout, ppo: cfg.ppo, reward: cfg.reward, moe: cfg.moe };
    try { // opened within: one that fails closes those opened before it
      metrics = await open(METRICS_FILE);
      samples = await open(SAMPLES_FILE);
      // A new event file per start; a resume's session start makes TensorBoard drop the old file's later steps.
      board = lead && cfg.logging.tensorboard
        ? await TensorBoardLog.open(dir, opts.resume ? { resumeStep: start + 1 } : {})
        : null;
      for (let u = start; u < t.updates; u++) {
        const t0 = performance.now();
        const seed = updateSeed(cfg.seed, u);
        manualSeed(seed);
        const factor = lrFactor(u, t);
        opt.groups[0]!.lr = t.learningRate * factor;
        opt.groups[1]!.lr = t.valueLearningRate * factor;
        const prompts: RolloutPrompt[] = [];
        for (let m = 0; m < t.gradAccum; m++) {
          const batch = batcher.batch(pos);
          pos = batch.next;
          prompts.push(...batch.items);
        }
        const mine = prompts.slice(first, first + share);
        using buffer = await collect(policy, tok, mine, rl, {
          seed,
          firstPrompt: first,
          recordRouting: cfg.moe.routingReplay !== "off", // the record serves replay only
          score: opts.score,
        });
        const learned = learn(policy, opt, buffer, rl, {
          microBatch: t.microBatch * cfg.rollout.k,
          maxGradNorm: t.maxGradNorm,
          seed,
          replicas: dp,
          advantages: opts.advantages,
          objective: opts.objective,
          valueLoss: opts.valueLoss,
          lossScaler: scaler ?? undefined,
        });
        const record: StepRecord = {
          step: u + 1,
          ...collectMetricsOverRanks(buffer.metrics, buffer.size, dp),
          ...learned,
          lr: opt.groups[0]!.lr,
          update_seconds: (performance.now() - t0) / 1000,
        };
        const logged = buffer.samples(cfg.logging.samplesToLog);
        if (cfg.eval.every > 0 && ((u + 1) % cfg.eval.every === 0 || u + 1 === t.updates)) {
          const part = rankShare(evalSet.length, dp).map((i) => evalSet[i]!);
          using _casts = policy.lora.state.holdCasts();
          const ev = await evaluateExamples(model.decoder, tok, part, configuredEvaluation(cfg));
          const totals = evalTotalsOverRanks(ev.totals, dp);
          record.eval_accuracy_strict = totals.accuracy_strict;
          record.eval_accuracy_flexible = totals.accuracy_flexible;
          if (totals.samples > 1) { // greedy: each equals the accuracy
            record.eval_pass_at_k_strict = totals.pass_at_k_strict;
            record.eval_pass_at_k_flexible = totals.pass_at_k_flexible;
            record.eval_maj_at_k_strict = totals.maj_at_k_strict;
            record.eval_maj_at_k_flexible = totals.maj_at_k_flexible;
          }
        }
        await metrics?.append(record);
        await board?.scalars(record.step, { ...record, step: undefined });
        records.push(record);
        if (cfg.logging.sampleEvery > 0 && (u + 1) % cfg.logging.sampleEvery === 0) {
          for (const sample of logged) await samples?.append({ step: u + 1, ...sample }); // a line each
        }
        bar?.update(u + 1, {
          reward: record.reward_mean as number,
          acc: record.accuracy as number,
          kl: record.kl as number,
          "tok/s": record.tokens_per_second as number,
        });
        const last = u + 1 === t.updates;
        const due = last || (cfg.output.checkpointEvery > 0 && (u + 1) % cfg.output.checkpointEvery === 0);
        if (lead && due) {
          await saveCheckpoint(dir, {
            policy,
            optimizer: opt,
            step: u + 1,
            rng: { seed: cfg.seed, step: u + 1, batcherPosition: pos },
            metricsTail: records.slice(-5),
            config: cfg,
            baseModel: cfg.model.id,
            keepLast: cfg.output.keepLast,
            worldSize: dp.size,
            lossScale: scaler?.state(),
          });
          await writeReport(dir, cfg.name);
        }
      }
    } finally {
      bar?.done();
      metrics?.close();
      samples?.close();
      board?.close();
    }
    // A resumed run that was already finished (killed after its last save) still gets its report.
    if (lead && start >= t.updates) await writeReport(dir, cfg.name);
    return { dir, records };
  } finally {
    policy.dispose();
  }
}
