/**
 * Does the pipeline learn? On the CPU: the tiny MoE is first taught single-
 * digit addition in GSM8K format by a supervised warm-up (train/sft.ts) whose
 * solutions end half the time in "#### n" and half the time in "The answer is
 * n." — so it can add, but often answers in a form GSM8K's strict scoring
 * rejects. Saved as a model folder, it is then trained with the real loop
 * (train/loop.ts: rollouts, strict-mode rewards, PPO with a KL penalty,
 * AdamW) on 75 of the 100 problems. Strict accuracy must rise clearly on the
 * 25 held-out problems, which RL never sees.
 *
 * What the rise shows: RL changes behaviour on prompts it did not train on
 * (the answer format), in the direction of the reward. What it does not
 * show: new arithmetic on unseen problems — the warm-up saw all 100 problems,
 * since a 64-wide model memorises sums rather than learning addition.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { manualSeed } from "../mod.ts";
import { arithmeticSplit } from "../data/arithmetic.ts";
import type { Gsm8kExample } from "../data/gsm8k.ts";
import { evaluateExamples } from "../eval/evaluate.ts";
import { loadModel } from "../model/model.ts";
import { saveModel } from "../model/save.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { Policy } from "../rl/policy.ts";
import { loadConfig } from "../train/config.ts";
import { train } from "../train/loop.ts";
import { supervisedWarmup } from "../train/sft.ts";

const ROOT = join(import.meta.dirname!, "..");
const jsonl = (es: readonly Gsm8kExample[]): string =>
  es.map((e) => JSON.stringify({ question: e.question, answer: e.solution })).join("\n");

Deno.test("learning: RL through deno task train's loop lifts held-out strict accuracy", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_learn_" });
  try {
    const { train: problems, heldOut } = arithmeticSplit(0.25, 1, { plainAnswerFraction: 0.5 });
    await Deno.writeTextFile(join(tmp, "train.jsonl"), jsonl(problems));
    await Deno.writeTextFile(join(tmp, "heldout.jsonl"), jsonl(heldOut));
    const prompt = { instruction: "" };

    // 1. Supervised warm-up on every problem, kept as a new base model.
    const base = join(tmp, "sft");
    let before: { strict: number; flexible: number };
    {
      manualSeed(0);
      using model = await loadModel(join(ROOT, "tests", "fixtures", "models", "qwen3-moe-tiny"));
      const tok = await Tokenizer.load(model.dir);
      const policy = new Policy(model, {
        lora: { r: 16, alpha: 32, dropout: 0, targetModules: "all-linear", targetExperts: true },
      });
      await supervisedWarmup(policy, tok, [...problems, ...heldOut], {
        steps: 300,
        batchSize: 16,
        lr: 3e-3,
        seed: 1,
        prompt,
      });
      const ev = await evaluateExamples(model.decoder, tok, heldOut, {
        maxNewTokens: 20,
        batchSize: 32,
        prompt,
      });
      before = { strict: ev.totals.accuracy_strict, flexible: ev.totals.accuracy_flexible };
      policy.lora.merge();
      await saveModel(model, base);
      policy.dispose();
    }

    // 2. RL on the 75 training problems; evaluation on the 25 held-out ones.
    const cfg = await loadConfig(join(ROOT, "configs", "tiny.yaml"), [
      `model.id=${base}`,
      `data.source=${join(tmp, "train.jsonl")}`,
      `data.instruction=""`,
      `eval.source=${join(tmp, "heldout.jsonl")}`,
      "eval.limit=null",
      "eval.every=5",
      "eval.batchSize=32",
      "eval.maxNewTokens=20",
      `output.dir=${join(tmp, "run")}`,
      "output.checkpointEvery=0",
      "train.updates=20",
      "train.microBatch=16",
      "train.gradAccum=1",
      "train.learningRate=3e-4",
      "train.valueLearningRate=1e-3",
      "train.warmupUpdates=0",
      "rollout.k=8",
      "rollout.maxNewTokens=20",
      "reward.mode=strict",
      "ppo.klCoef=0.1",
      "ppo.entropyCoef=0",
      "lora.r=16",
      "lora.alpha=32",
      "lora.targetModules=all-linear",
    ]);
    const run = await train(cfg, { quiet: true });
    const curve = run.records.filter((r) => "eval_accuracy_strict" in r).map((r) =>
      r.eval_accuracy_strict as number
    );
    console.log(
      `  held-out (never in RL) strict accuracy: after the warm-up ${before.strict.toFixed(2)} ` +
        `(flexible ${before.flexible.toFixed(2)}); every 5 RL updates ${
          curve.map((a) => a.toFixed(2)).join(" ")
        }`,
    );
    assert.equal(curve.length, 4);
    assert.ok(before.flexible > before.strict + 0.2, "the warm-up left a format gap for RL to close");
    assert.ok(
      curve[curve.length - 1]! >= before.strict + 0.3,
      `held-out strict accuracy ${before.strict} → ${curve}`,
    );
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
