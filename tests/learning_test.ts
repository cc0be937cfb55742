/**
 * Does the pipeline learn? On the CPU, the tiny MoE is warmed up on part of a
 * GSM8K-format addition task (train/sft.ts), saved as a model folder, then
 * trained with the real loop (train/loop.ts: rollouts, rewards, PPO, AdamW);
 * greedy accuracy on the problems it trains on must rise clearly.
 *
 * What this does not show: a rise on held-out problems. The 64-wide tiny
 * model memorises problems rather than learning addition, so neither the
 * warm-up nor RL moves held-out accuracy (it stays near 0.04 here); the
 * held-out proof needs a task or model that generalises (see the README).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { manualSeed } from "../mod.ts";
import { arithmeticSplit } from "../data/arithmetic.ts";
import { loadModel } from "../model/model.ts";
import { saveModel } from "../model/save.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { Policy } from "../rl/policy.ts";
import { loadConfig } from "../train/config.ts";
import { train } from "../train/loop.ts";
import { greedyAccuracy, supervisedWarmup } from "../train/sft.ts";

const ROOT = join(import.meta.dirname!, "..");

Deno.test("learning: RL with deno task train's loop lifts accuracy after a warm-up", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_learn_" });
  try {
    const { train: problems } = arithmeticSplit(0.25, 1);
    const data = join(tmp, "train.jsonl");
    await Deno.writeTextFile(
      data,
      problems.map((e) => JSON.stringify({ question: e.question, answer: e.solution })).join("\n"),
    );
    const prompt = { instruction: "" };

    // 1. Supervised warm-up, kept as a new base model.
    const base = join(tmp, "sft");
    let warm: number;
    {
      manualSeed(0);
      using model = await loadModel(join(ROOT, "tests", "fixtures", "models", "qwen3-moe-tiny"));
      const tok = await Tokenizer.load(model.dir);
      const policy = new Policy(model, {
        lora: { r: 16, alpha: 32, dropout: 0, targetModules: "all-linear", targetExperts: true },
      });
      await supervisedWarmup(policy, tok, problems, { steps: 100, batchSize: 16, lr: 3e-3, seed: 1, prompt });
      warm = await greedyAccuracy(policy, tok, problems, { maxNewTokens: 10, prompt });
      policy.lora.merge();
      await saveModel(model, base);
      policy.dispose();
    }

    // 2. RL with the training loop, evaluated greedily on the same problems at the end.
    const cfg = await loadConfig(join(ROOT, "configs", "tiny.yaml"), [
      `model.id=${base}`,
      `data.source=${data}`,
      `data.instruction=""`,
      `eval.source=${data}`,
      "eval.limit=null",
      "eval.every=10",
      "eval.batchSize=32",
      "eval.maxNewTokens=10",
      `output.dir=${join(tmp, "run")}`,
      "output.checkpointEvery=0",
      "train.updates=60",
      "train.microBatch=16",
      "train.gradAccum=1",
      "train.learningRate=3e-4",
      "train.valueLearningRate=1e-3",
      "train.warmupUpdates=0",
      "rollout.k=8",
      "rollout.maxNewTokens=10",
      "ppo.klCoef=0",
      "ppo.entropyCoef=0",
      "lora.r=16",
      "lora.alpha=32",
      "lora.targetModules=all-linear",
    ]);
    const run = await train(cfg, { quiet: true });
    const curve = run.records.filter((r) => "eval_accuracy_flexible" in r).map((r) =>
      r.eval_accuracy_flexible as number
    );
    const final = curve[curve.length - 1]!;
    console.log(
      `  greedy accuracy on the training problems: warm-up ${warm.toFixed(3)}; every 10 updates ` +
        curve.map((a) => a.toFixed(3)).join(" "),
    );
    assert.equal(curve.length, 6);
    // Bars with room for other CPUs' rounding (the run is deterministic on one machine).
    const mean = curve.reduce((x, y) => x + y, 0) / curve.length;
    assert.ok(final >= warm + 0.05, `RL should lift accuracy: ${warm} → ${final}`);
    assert.ok(mean > warm + 0.03, `the evaluations during RL average above the warm-up: ${curve}`);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
