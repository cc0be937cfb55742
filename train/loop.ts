/**
 * The training loop: each update takes microBatch × gradAccum prompts,
 * collects rollout.k completions for each (rl/collect.ts: generation,
 * rewards, routing records), learns from them (rl/learn.ts: reference and
 * critic pass, advantages over the update, PPO steps), and logs. Every
 * update is seeded from (seed, update) and the data order from (seed,
 * epoch), so a resumed run repeats an uninterrupted one.
 * @module
 */
import { join } from "node:path";
import { Generator, manualSeed } from "../ffi/mod.ts";
import { MicroBatcher } from "../data/batches.ts";
import { loadGsm8k } from "../data/gsm8k.ts";
import { buildPrompts } from "../data/prompt.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect, type RolloutPrompt } from "../rl/collect.ts";
import { evaluateExamples } from "../rl/evaluate.ts";
import { learn } from "../rl/learn.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { latestCheckpoint, loadCheckpoint, saveCheckpoint, updateSeed } from "./checkpoint.ts";
import { formatConfig, RUN_CONFIG_FILE, runDir, type TrainConfig } from "./config.ts";
import { writeAtomic } from "../model/atomic_write.ts";
import { JsonlLog, METRICS_FILE, SAMPLES_FILE, type StepRecord } from "./metrics.ts";
import { ProgressBar } from "./progress.ts";
import { writeReport } from "./report.ts";
import { loadConfiguredModel } from "./model.ts";
import { lrFactor } from "./schedule.ts";

/** What a finished (or resumed and finished) run returns. */
export interface TrainResult {
  /** The run folder. */
  dir: string;
  /** Every update's metrics record written by this process. */
  records: StepRecord[];
}

/** Runs (or resumes) the training described by cfg. */
export async function train(
  cfg: TrainConfig,
  opts: { resume?: boolean; quiet?: boolean } = {},
): Promise<TrainResult> {
  const dir = runDir(cfg);
  await Deno.mkdir(dir, { recursive: true });
  await writeAtomic(join(dir, RUN_CONFIG_FILE), formatConfig(cfg));

  using model = await loadConfiguredModel(cfg.model);
  const tok = await Tokenizer.load(model.dir);
  manualSeed(cfg.seed); // adapter and value-head initialisation
  const policy = new Policy(model, {
    lora: { ...cfg.lora },
    checkpointing: cfg.train.gradientCheckpointing,
    headChunk: cfg.train.headChunk,
  });
  const t = cfg.train;
  using opt = policyOptimizer(policy, {
    learningRate: t.learningRate,
    valueLearningRate: t.valueLearningRate,
    weightDecay: t.weightDecay,
    valueWeightDecay: t.valueWeightDecay,
    betas: [...t.betas] as [number, number],
    eps: t.eps,
  });
  try {
    const promptOpts = { instruction: cfg.data.instruction, system: cfg.data.system ?? undefined };
    const data = await loadGsm8k(cfg.data.source, {
      split: cfg.data.split,
      onBadRecord: cfg.data.onBadRecord,
      limit: cfg.data.limit ?? undefined,
      config: cfg.data.config,
    });
    for (const s of data.skipped) console.warn(`data: skipped line ${s.line}: ${s.reason}`);
    const rendered = await buildPrompts(tok, data.examples.map((e) => e.question), promptOpts);
    const items: RolloutPrompt[] = data.examples.map((e, i) => ({ ids: rendered[i]!.ids, answer: e.answer }));
    const batcher = new MicroBatcher(items, { batchSize: t.microBatch, seed: cfg.seed });
    const evalSet = cfg.eval.every > 0
      ? (await loadGsm8k(cfg.eval.source, { split: cfg.eval.split, limit: cfg.eval.limit ?? undefined }))
        .examples
      : [];

    let start = 0, pos = { epoch: 0, index: 0 };
    if (opts.resume) {
      const latest = await latestCheckpoint(dir);
      if (latest) {
        const state = await loadCheckpoint(latest, policy, opt);
        start = state.step;
        pos = state.rng.batcherPosition;
        if (!opts.quiet) console.log(`resuming from ${latest} (update ${start})`);
      }
    }
    const metrics =
      (await JsonlLog.open(join(dir, METRICS_FILE), opts.resume ? { keepUpTo: start } : {})).log;
    const samples =
      (await JsonlLog.open(join(dir, SAMPLES_FILE), opts.resume ? { keepUpTo: start } : {})).log;
    const bar = opts.quiet ? null : new ProgressBar(t.updates, { start });
    const records: StepRecord[] = [];
    const rl = { rollout: cfg.rollout, ppo: cfg.ppo, reward: cfg.reward, moe: cfg.moe };
    try {
      for (let u = start; u < t.updates; u++) {
        const t0 = performance.now();
        const seed = updateSeed(cfg.seed, u);
        manualSeed(seed);
        using gen = new Generator(seed, cfg.model.device);
        const factor = lrFactor(u, t);
        opt.groups[0]!.lr = t.learningRate * factor;
        opt.groups[1]!.lr = t.valueLearningRate * factor;
        const prompts: RolloutPrompt[] = [];
        for (let m = 0; m < t.gradAccum; m++) {
          const batch = batcher.batch(pos);
          pos = batch.next;
          prompts.push(...batch.items);
        }
        using buffer = await collect(policy, tok, prompts, rl, { generator: gen });
        const learned = learn(policy, opt, buffer, rl, {
          microBatch: t.microBatch * cfg.rollout.k,
          maxGradNorm: t.maxGradNorm,
          seed,
        });
        const record: StepRecord = {
          step: u + 1,
          ...buffer.metrics,
          ...learned,
          lr: opt.groups[0]!.lr,
          update_seconds: (performance.now() - t0) / 1000,
        };
        const logged = buffer.samples(cfg.logging.samplesToLog);
        if (cfg.eval.every > 0 && ((u + 1) % cfg.eval.every === 0 || u + 1 === t.updates)) {
          const ev = await evaluateExamples(model.decoder, tok, evalSet, {
            maxNewTokens: cfg.eval.maxNewTokens ?? cfg.rollout.maxNewTokens,
            batchSize: cfg.eval.batchSize,
            prompt: promptOpts,
          });
          record.eval_accuracy_strict = ev.totals.accuracy_strict;
          record.eval_accuracy_flexible = ev.totals.accuracy_flexible;
        }
        await metrics.append(record);
        records.push(record);
        if (cfg.logging.sampleEvery > 0 && (u + 1) % cfg.logging.sampleEvery === 0) {
          await samples.append({ step: u + 1, samples: logged });
        }
        bar?.update(u + 1, {
          reward: record.reward_mean as number,
          acc: record.accuracy as number,
          kl: record.kl as number,
          "tok/s": record.tokens_per_second as number,
        });
        const last = u + 1 === t.updates;
        if (last || (cfg.output.checkpointEvery > 0 && (u + 1) % cfg.output.checkpointEvery === 0)) {
          await saveCheckpoint(dir, {
            policy,
            optimizer: opt,
            step: u + 1,
            rng: { seed: cfg.seed, step: u + 1, batcherPosition: pos },
            metricsTail: records.slice(-5),
            config: cfg,
            baseModel: cfg.model.id,
            keepLast: cfg.output.keepLast,
          });
          await writeReport(dir, cfg.name);
        }
      }
    } finally {
      bar?.done();
      metrics.close();
      samples.close();
    }
    return { dir, records };
  } finally {
    policy.dispose();
  }
}
