/**
 * Dynamic loss scaling (rl/loss_scale.ts): the scale's moves, a scaled learn phase that takes the unscaled
 * one's steps bit for bit (powers of two), an overflow that skips the step and backs the scale off instead of
 * failing (its gradients dropped, the next steps taken), which models train.lossScale scales, and the scale
 * kept across a checkpoint and --resume.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { type DType, liveTensors, manualSeed, randn, tidy } from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import { learn, type LearnMetrics } from "../rl/learn.ts";
import { LossScaler } from "../rl/loss_scale.ts";
import { ppoObjective } from "../rl/objective.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import type { RolloutPrompt } from "../rl/rollout_buffer.ts";
import { loadTrainConfig } from "../train/config.ts";
import { latestCheckpoint, readTrainerState } from "../train/checkpoint.ts";
import { train } from "../train/loop.ts";
import { DEVICE, scriptedScore } from "./util.ts";

const ROOT = join(import.meta.dirname!, "..");
const MODEL = join(ROOT, "tests", "fixtures", "models", "qwen3-moe-tiny");
const PROMPTS: RolloutPrompt[] = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]].map((ids, i) => ({
  ids,
  answer: 10 + i,
}));
const CFG = {
  rollout: { k: 2, maxNewTokens: 6, topK: 50 },
  ppo: { klCoef: 0.1, entropyCoef: 0.01, epochs: 1, minibatches: 4 },
  moe: { routingReplay: "off" as const },
};

Deno.test("LossScaler: backs off on an overflow, grows after growthInterval good steps, and round-trips", () => {
  const s = new LossScaler({ initScale: 1024, growthInterval: 3 });
  s.update(false);
  s.update(false);
  assert.deepEqual(s.state(), { scale: 1024, goodSteps: 2 });
  s.update(true);
  assert.deepEqual(
    [s.state(), s.skipped],
    [{ scale: 512, goodSteps: 0 }, 1],
    "an overflow restarts the count",
  );
  for (let i = 0; i < 3; i++) s.update(false);
  assert.deepEqual(s.state(), { scale: 1024, goodSteps: 0 });
  const t = new LossScaler();
  assert.equal(t.scale, 2 ** 16, "GradScaler's first scale");
  t.restore({ scale: 8, goodSteps: 5 });
  assert.deepEqual(t.state(), { scale: 8, goodSteps: 5 });
  for (
    const [opts, reason] of [
      [{ initScale: 0 }, /initScale must be a finite number > 0, got 0/],
      [{ growthFactor: 1 }, /growthFactor must be a finite number > 1, got 1/],
      [{ backoffFactor: 1 }, /backoffFactor must be in \(0, 1\), got 1/],
      [{ growthInterval: 0.5 }, /growthInterval must be an integer >= 1, got 0\.5/],
    ] as const
  ) assert.throws(() => new LossScaler(opts), reason);
  assert.throws(() => t.restore({ scale: NaN, goodSteps: 0 }), /a saved state holds scale NaN/);
});

/** How {@link learnWith} runs. */
interface LearnSetup {
  scaler?: LossScaler;
  dtype?: DType;
  /** Multiplies the objective's loss (small: as a large batch's token divisor). */
  lossFactor?: number;
  /** Policy steps (minibatches of one epoch). */
  steps?: number;
}

/** Collects the same rollouts on a fresh policy and learns from them; returns the adapters before and after. */
async function learnWith(
  { scaler, dtype = "float32", lossFactor = 1, steps = 4 }: LearnSetup = {},
): Promise<{ m: LearnMetrics; before: number[][]; adapters: number[][]; gradsLeft: number }> {
  manualSeed(5);
  using model = await loadModel(MODEL, { device: DEVICE, dtype });
  const tok = await Tokenizer.load(MODEL);
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
  try {
    using buf = await collect(policy, tok, PROMPTS, CFG, { seed: 1, score: scriptedScore((i) => i % 2) });
    using opt = policyOptimizer(policy, { learningRate: 5e-2 });
    const before = policy.policyParameters().map((p) => tidy(() => p.toArray()));
    const m = learn(policy, opt, buf, { ...CFG, ppo: { ...CFG.ppo, minibatches: steps } }, {
      microBatch: 4,
      seed: 0,
      lossScaler: scaler,
      objective: (out, inputs, c) => {
        const r = ppoObjective(out, inputs, c);
        return lossFactor === 1 ? r : { ...r, loss: r.loss.mul(lossFactor) };
      },
    });
    const params = [...policy.policyParameters(), ...policy.valueParameters()];
    const gradsLeft = params.filter((p) => tidy(() => p.grad !== null)).length;
    return { m, before, adapters: policy.policyParameters().map((p) => tidy(() => p.toArray())), gradsLeft };
  } finally {
    policy.dispose();
  }
}

Deno.test("learn with a loss scale of 2^16 takes the unscaled steps bit for bit", async () => {
  const live = liveTensors();
  const plain = await learnWith();
  const scaled = await learnWith({ scaler: new LossScaler() }); // 2^16, as train.lossScale gives
  assert.equal(plain.m.optimizer_steps, 4);
  assert.notDeepEqual(plain.adapters, plain.before, "the adapters moved");
  assert.deepEqual(scaled.adapters, plain.adapters, "the same adapters after 4 steps");
  const { loss_scale: _a, ...rest } = scaled.m, { loss_scale: _b, ...want } = plain.m;
  const timeless = (m: Record<string, number>) => Object.entries(m).filter(([k]) => !k.endsWith("_seconds"));
  assert.deepEqual(timeless(rest), timeless(want), "the same metrics: loss, gradient norm, parts");
  assert.deepEqual([scaled.m.loss_scale, scaled.m.skipped_steps, plain.m.loss_scale], [2 ** 16, 0, 1]);
  assert.equal(liveTensors(), live);
});

Deno.test("learn: an overflowing loss scale skips the step and backs off, instead of failing", async () => {
  // 2^140 × the loss is beyond float32: every step's gradients are inf or NaN.
  const scaler = new LossScaler({ initScale: 2 ** 140 });
  const over = await learnWith({ scaler });
  assert.deepEqual([over.m.optimizer_steps, over.m.skipped_steps], [0, 4]);
  assert.equal(scaler.scale, 2 ** 136, "halved at each of the 4 steps");
  assert.deepEqual([over.m.loss_scale, scaler.skipped], [2 ** 136, 4]);
  assert.ok(Number.isNaN(over.m.grad_norm), "no step, no norm");
  assert.ok(Number.isFinite(over.m.loss), `the loss is read unscaled: ${over.m.loss}`);
  assert.deepEqual(over.adapters, over.before, "no step was taken");
  assert.equal(over.gradsLeft, 0, "the overflowed gradients are dropped");
});

Deno.test("learn: after an overflow the scale backs off and the next steps are taken", async () => {
  // 2^140 overflows at the first step; backed off by 2^-132 it is 2^8, which does not.
  const live = liveTensors();
  const scaler = new LossScaler({ initScale: 2 ** 140, backoffFactor: 2 ** -132 });
  const r = await learnWith({ scaler });
  assert.deepEqual([r.m.optimizer_steps, r.m.skipped_steps, r.m.loss_scale], [3, 1, 256]);
  assert.ok(Number.isFinite(r.m.grad_norm) && r.m.grad_norm > 0, `the taken steps' norm: ${r.m.grad_norm}`);
  assert.notDeepEqual(r.adapters, r.before, "the adapters moved");
  assert.equal(r.gradsLeft, 0);
  assert.equal(liveTensors(), live);
});

Deno.test("learn: a loss that is not finite still fails once the scale is down to 1, naming the scale", async () => {
  // Scale 4, then 2: skipped as overflows; at 1 the gradients are NaN at the loss's own size.
  const scaler = new LossScaler({ initScale: 4 });
  await assert.rejects(
    () => learnWith({ scaler, lossFactor: NaN }),
    /learn: the policy's gradient norm is NaN even at a loss scale of 1 \(the objective's loss or an input to it is not finite\); no step taken/,
  );
  assert.equal(scaler.skipped, 3);
});

/** Whether this libtorch computes float16 matmuls on DEVICE (libtorch 1.13 has none on the CPU). */
function float16Computes(): boolean {
  try {
    tidy(() => {
      const a = randn([2, 2], { device: DEVICE }).to("float16");
      a.matmul(a);
    });
    return true;
  } catch {
    return false;
  }
}

Deno.test({
  name: "float16: a small loss's gradients flush to zero unscaled; scaled, they match float32's",
  ignore: !float16Computes(),
  async fn(): Promise<void> {
    // × 1e-6: the size of a per-token gradient in a large batch. One step, from the same float16 rollouts: the
    // reference is the step at the loss's own size.
    const ref = await learnWith({ dtype: "float16", steps: 1 });
    const plain = await learnWith({ dtype: "float16", steps: 1, lossFactor: 1e-6 });
    const scaled = await learnWith({
      scaler: new LossScaler(),
      dtype: "float16",
      steps: 1,
      lossFactor: 1e-6,
    });
    const moved = (r: typeof ref): number =>
      r.adapters.flat().filter((x, i) => x !== r.before.flat()[i]).length / r.adapters.flat().length;
    assert.ok(moved(ref) > 0.3, `at the loss's size, ${moved(ref)} of the weights moved`);
    assert.ok(moved(plain) < 0.5 * moved(ref), `float16 unscaled moved ${moved(plain)} of the weights`);
    assert.ok(Math.abs(moved(scaled) - moved(ref)) < 0.01, `scaled ${moved(scaled)} against ${moved(ref)}`);
    assert.ok(
      Math.abs(scaled.m.grad_norm / (1e-6 * ref.m.grad_norm) - 1) < 0.01,
      `gradient norms ${scaled.m.grad_norm} (scaled) and 1e-6 × ${ref.m.grad_norm}`,
    );
  },
});

Deno.test("train.lossScale auto scales a float16 model's loss alone; off scales none", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_lossscale_" });
  try {
    const run = async (dtype: DType, lossScale: string) => {
      const cfg = await loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), [
        `output.dir=${join(tmp, `${dtype}-${lossScale}`)}`,
        "train.updates=1",
        "output.checkpointEvery=1",
        "eval.every=0",
        `model.dtype=${dtype}`,
        `train.lossScale=${lossScale}`,
      ]);
      const r = await train(cfg, { quiet: true });
      return [r.records[0]!.loss_scale, (await readTrainerState((await latestCheckpoint(r.dir))!)).lossScale];
    };
    assert.deepEqual(await run("float32", "auto"), [1, undefined], "float32: not scaled, nothing kept");
    if (!float16Computes()) return; // libtorch 1.13 on a CPU: loadModel refuses float16
    const [scale, kept] = await run("float16", "auto");
    assert.ok(
      (scale as number) > 1 && kept !== undefined,
      `float16 auto: scale ${scale}, kept ${JSON.stringify(kept)}`,
    );
    assert.deepEqual(await run("float16", "off"), [1, undefined], "float16 off: not scaled");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("train.lossScale: the scale is logged, kept in the checkpoint and restored by --resume", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_lossscale_" });
  try {
    const cfg = (updates: number) =>
      loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), [
        `output.dir=${tmp}`,
        `train.updates=${updates}`,
        "output.checkpointEvery=1",
        "eval.every=0",
        "train.lossScale=dynamic",
      ]);
    const first = await train(await cfg(1), { quiet: true });
    assert.equal(first.records[0]!.loss_scale, 2 ** 16);
    const ckpt = (await latestCheckpoint(first.dir))!;
    const state = await readTrainerState(ckpt);
    assert.equal(state.lossScale?.scale, 2 ** 16);
    // A scale the run could have reached (after overflows): the resumed update scales by it.
    const file = join(ckpt, "trainer_state.json");
    await Deno.writeTextFile(file, JSON.stringify({ ...state, lossScale: { scale: 1024, goodSteps: 7 } }));
    const resumed = await train(await cfg(2), { quiet: true, resume: true });
    assert.equal(resumed.records.at(-1)!.loss_scale, 1024);
    assert.equal((await readTrainerState((await latestCheckpoint(first.dir))!)).lossScale?.scale, 1024);
    await Deno.writeTextFile(file, JSON.stringify({ ...state, lossScale: { scale: -1, goodSteps: 0 } }));
    await assert.rejects(() => readTrainerState(ckpt), /trainer_state\.json: corrupt lossScale/);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
