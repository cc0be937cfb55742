/**
 * The learn and collect phases' bookkeeping on the tiny model, each against
 * what the design says rather than a recorded run: minibatches of one epoch
 * take π_old from a pass, every trained sequence is in exactly one minibatch
 * of an epoch, and the reported parts are means over the steps; the critic
 * learns the centred rewards, as a mean over each step's tokens (one per
 * sequence for the prompt-level critic); the optimizer sees gradients clipped
 * to maxGradNorm; the rollout/training mismatch counts |Δ log p| beyond
 * log C; each completion is scored against its own prompt; with a seed a
 * prompt draws the same completions in any generation batch, or alone;
 * and under data parallelism advantages are normalised over every rank's
 * tokens.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { manualSeed } from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import { updateAdvantages } from "../rl/advantages.ts";
import type { AdvantagesFn } from "../rl/replaceable.ts";
import type { RlOverrides } from "../rl/config.ts";
import { learn } from "../rl/learn.ts";
import { valueLoss } from "../rl/losses.ts";
import { Mismatch } from "../rl/mismatch.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { Replicas } from "../rl/replicas.ts";
import type { RolloutBuffer, RolloutPrompt } from "../rl/rollout_buffer.ts";
import { assertClose, DEVICE, GradientRecorder, scriptedScore, withSequences } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
const CFG: RlOverrides = {
  rollout: { k: 2, maxNewTokens: 6, topK: 50 },
  ppo: { klCoef: 0.1, entropyCoef: 0.01 },
  moe: { routingReplay: "off" },
};

/** Four short prompts of plain token ids (8 sequences with K 2), each with its own gold answer. */
const PROMPTS: RolloutPrompt[] = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]].map((ids, i) => ({
  ids,
  answer: 10 + i,
}));

/** The global L2 norm of one recorded step's gradients. */
const norm = (step: number[][]): number => Math.sqrt(step.flat().reduce((s, x) => s + x * x, 0));

/** Runs fn on a fresh tiny model and policy (rank-4 adapters), freed after. */
async function withPolicy(fn: (policy: Policy, tok: Tokenizer) => Promise<void>): Promise<void> {
  manualSeed(5);
  using model = await loadModel(MODEL, { device: DEVICE });
  const tok = await Tokenizer.load(MODEL);
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
  try {
    await fn(policy, tok);
  } finally {
    policy.dispose();
  }
}

Deno.test("learn: one epoch in 4 minibatches: π_old from a pass, each sequence once, parts are step means", async () => {
  await withPolicy(async (policy, tok) => {
    using buf = await collect(policy, tok, PROMPTS, CFG, { seed: 1, score: scriptedScore((i) => i % 2) });
    const rows: number[] = [];
    const real = policy.backwardLoss.bind(policy);
    policy.backwardLoss = (batch, ...rest) => {
      rows.push(batch.inputIds.size(0));
      return real(batch, ...rest);
    };
    using opt = policyOptimizer(policy, { learningRate: 5e-2 });
    const cfg = { ...CFG, ppo: { ...CFG.ppo, epochs: 1, minibatches: 4 } };
    const m = learn(policy, opt, buf, cfg, { microBatch: 8, seed: 0 });
    assert.equal(m.trained_fraction, 1, "every group has signal");
    assert.equal(m.optimizer_steps, 4);
    assert.deepEqual(rows, [2, 2, 2, 2], "8 sequences dealt into 4 minibatches of 2, each trained once");
    // Steps 2–4 run after the adapters moved: against a π_old from before the first step their ratio moves.
    assert.ok(m.old_seconds > 0, "an old pass ran");
    assert.ok(Math.abs(m.ratio_mean - 1) > 1e-4, `the ratio moved: ${m.ratio_mean}`);
    // Reported parts are means over the 4 steps, not their sums.
    assert.ok(m.ratio_mean > 0.5 && m.ratio_mean < 1.5, `ratio_mean ${m.ratio_mean} is a mean ratio`);
    assert.ok(m.is_weight_mean > 0 && m.is_weight_mean <= 2 + 1e-6, `is_weight_mean ${m.is_weight_mean} ≤ C`);
    assert.ok(m.clip_fraction >= 0 && m.clip_fraction <= 1, `clip_fraction ${m.clip_fraction}`);
  });
});

Deno.test("learn: the critic's targets are the centred rewards, its loss a mean over each step's tokens", async () => {
  await withPolicy(async (policy, tok) => {
    using buf = await collect(policy, tok, PROMPTS, CFG, { seed: 1, score: scriptedScore((i) => i % 2) });
    const lengths = buf.sequences.map((s) => s.tokens.length);
    assert.ok(lengths.some((n) => n > 1), "some completion has several tokens");
    for (const advantage of ["token_value", "prompt_value"] as const) {
      const calls: { targets: number[]; masked: number; tokens: number }[] = [];
      learn(policy, new GradientRecorder(), buf, { ...CFG, ppo: { ...CFG.ppo, advantage } }, {
        microBatch: 4,
        valueLoss: (v, targets, mask, tokens) => {
          calls.push({ targets: targets.toArray(), masked: mask.sum().item(), tokens: tokens! });
          return valueLoss(v, targets, mask, tokens);
        },
      });
      assert.equal(calls.length, 2, `${advantage}: two critic steps of two prompt groups`);
      // Rewards 0, 1 in every group of two: centred, −0.5 and 0.5.
      assert.deepEqual(
        calls.flatMap((c) => c.targets).sort(),
        [-0.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5],
        `${advantage}: the targets are the rewards minus their group's mean`,
      );
      for (const c of calls) {
        assert.equal(c.masked, c.tokens, `${advantage}: the mean is over the step's tokens`);
      }
      const trainedTokens = calls.reduce((s, c) => s + c.tokens, 0);
      assert.equal(
        trainedTokens,
        advantage === "prompt_value" ? 8 : lengths.reduce((a, b) => a + b, 0),
        `${advantage}: ${advantage === "prompt_value" ? "one token per sequence" : "every completion token"}`,
      );
    }
  });
});

Deno.test("learn: the optimizer sees gradients clipped to maxGradNorm; grad_norm is the norm before", async () => {
  await withPolicy(async (policy, tok) => {
    using buf = await collect(policy, tok, PROMPTS, CFG, { seed: 1, score: scriptedScore((i) => i % 2) });
    const max = 1e-4;
    const rec = new GradientRecorder();
    const m = learn(policy, rec, buf, CFG, { microBatch: 8, maxGradNorm: max });
    assert.ok(
      m.grad_norm > 10 * max && m.value_grad_norm > 10 * max,
      "the raw norms are far above the bound",
    );
    assert.equal(rec.steps.length, 2, "a critic step, then the policy's");
    for (const [i, step] of rec.steps.entries()) {
      assert.ok(norm(step) <= max * (1 + 1e-3), `step ${i}: norm ${norm(step)} > ${max}`);
    }
  });
});

Deno.test("mismatch: |Δ log p| mean, max and the fraction beyond the bound", () => {
  const mm = new Mismatch(Math.log(2));
  mm.add([-1, -2, -3], [-1, -2.5, -4]); // |Δ| 0, 0.5, 1
  mm.add([0], [-0.25]); // 0.25
  const s = mm.stats(Replicas.single());
  assertClose([s.mean, s.max, s.frac], [(0 + 0.5 + 1 + 0.25) / 4, 1, 1 / 4], 1e-12, "one of 4 beyond log 2");
  assert.ok(Object.values(new Mismatch(1).stats(Replicas.single())).every(Number.isNaN), "no token: NaN");
});

Deno.test("learn: the mismatch counts the tokens whose π_old / π_rollout lies beyond [1/C, C]", async () => {
  await withPolicy(async (policy, tok) => {
    using got = await collect(policy, tok, PROMPTS, CFG, { seed: 1, score: scriptedScore((i) => i % 2) });
    // The sampler's log-probs shifted: by 1 (a ratio of e, beyond 2) on sequences 0–3, by 0.25 on 4–7.
    const shift = (i: number): number => (i < 4 ? 1 : 0.25);
    const sequences = got.sequences.map((s, i) => ({ ...s, logprobs: s.logprobs.map((x) => x - shift(i)) }));
    using buf = withSequences(got, sequences);
    const lengths = sequences.map((s) => s.tokens.length);
    const far = lengths.slice(0, 4).reduce((a, b) => a + b, 0), all = lengths.reduce((a, b) => a + b, 0);
    assert.ok(far > 0 && far < all);
    const m = learn(policy, new GradientRecorder(), buf, CFG); // C = ppo.rolloutCorrection's default, 2
    assertClose([m.mismatch_frac, m.mismatch_max], [far / all, 1], 1e-4, "beyond log 2: the shift by 1");
    assertClose([m.mismatch_mean], [(far + 0.25 * (all - far)) / all], 1e-4);
    const wide = learn(policy, new GradientRecorder(), buf, {
      ...CFG,
      ppo: { ...CFG.ppo, rolloutCorrection: 4 },
    });
    assert.equal(wide.mismatch_frac, 0, "C = 4: a ratio of e is within [1/4, 4]");
  });
});

Deno.test("collect: each completion is scored against its own prompt", async () => {
  await withPolicy(async (policy, tok) => {
    const seen: number[] = [];
    using buf = await collect(policy, tok, PROMPTS, CFG, {
      seed: 1,
      score: (_c, p) => {
        seen.push(Number(p.answer));
        return scriptedScore(() => Number(p.answer))();
      },
    });
    assert.deepEqual(buf.sequences.map((s) => s.prompt), [0, 0, 1, 1, 2, 2, 3, 3]);
    assert.deepEqual(seen, [10, 10, 11, 11, 12, 12, 13, 13]);
    assert.deepEqual(buf.rewards, [10, 10, 11, 11, 12, 12, 13, 13]);
  });
});

Deno.test("collect with a seed: a prompt draws the same completions in any generation batch, or alone", async () => {
  await withPolicy(async (policy, tok) => {
    const score = scriptedScore(() => 0);
    // Top-k 8 keeps the draws far from token boundaries, where another build's rounding of another batch size
    // could flip one (tests/generate_test.ts).
    const run = (prompts: RolloutPrompt[], generationBatch: number | null, firstPrompt?: number, seed = 7) =>
      collect(policy, tok, prompts, { ...CFG, rollout: { ...CFG.rollout, topK: 8, generationBatch } }, {
        seed,
        firstPrompt,
        score,
        recordRouting: false,
      });
    const tokens = (b: RolloutBuffer): number[][] => b.sequences.map((s) => s.tokens);
    // K = 2: all prompts at once, then batches of one and of three prompts.
    using together = await run(PROMPTS, null);
    for (const g of [2, 6]) {
      using split = await run(PROMPTS, g);
      assert.deepEqual(tokens(split), tokens(together), `generationBatch ${g}`);
    }
    for (const [p, prompt] of PROMPTS.entries()) {
      using alone = await run([prompt], null, p);
      assert.deepEqual(tokens(alone), tokens(together).slice(2 * p, 2 * p + 2), `prompt ${p}`);
    }
    using other = await run(PROMPTS, null, 0, 8);
    assert.notDeepEqual(tokens(other), tokens(together), "another seed draws others");
  });
});

/**
 * Rank 0 of two whose peer holds the very same sequences: every sum over the ranks is twice this rank's,
 * every gather holds this rank's row twice. Gradients are left as they are (no process group).
 */
class TwinPeer extends Replicas {
  constructor() {
    super(null);
  }
  override get size(): number {
    return 2;
  }
  override sum(xs: readonly number[]): number[] {
    return xs.map((x) => 2 * x);
  }
  override gather(xs: readonly number[]): number[][] {
    return [[...xs], [...xs]];
  }
}

Deno.test("learn, data parallel: advantages are normalised with every rank's tokens", async () => {
  await withPolicy(async (policy, tok) => {
    const cfg: RlOverrides = { ...CFG, ppo: { ...CFG.ppo, advantage: "group" } };
    using buf = await collect(policy, tok, PROMPTS, cfg, {
      seed: 1,
      score: scriptedScore((i) => (i * 5) % 3),
    });
    // The raw advantages of "group": each trained sequence's centred reward on each of its tokens.
    const raw = buf.sequences.flatMap((s, i) => {
      const mate = buf.sequences[i ^ 1]!; // K = 2: the other sequence of the group
      const centred = (s.reward.reward - mate.reward.reward) / 2;
      return centred === 0 ? [] : new Array<number>(s.tokens.length).fill(centred);
    });
    const std = (xs: number[]): number => {
      const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
      return Math.sqrt(xs.reduce((a, x) => a + (x - mean) ** 2, 0) / (xs.length - 1));
    };
    assert.ok(raw.length > 2, "some groups have signal");
    const alone = learn(policy, new GradientRecorder(), buf, cfg);
    assertClose([alone.advantage_std], [std(raw)], 1e-9, "one process");
    const twins = learn(policy, new GradientRecorder(), buf, cfg, { replicas: new TwinPeer() });
    assertClose([twins.advantage_std], [std([...raw, ...raw])], 1e-9, "over both ranks' tokens");
  });
});

Deno.test("learn: ppo.maskTruncated leaves completions cut at the cap out of the policy loss, as untrained ones", async () => {
  await withPolicy(async (policy, tok) => {
    using got = await collect(policy, tok, PROMPTS, CFG, { seed: 1, score: scriptedScore((i) => i % 2) });
    const cut = new Set([0, 5]); // these two ran to the cap
    const sequences = got.sequences.map((s, i) => ({
      ...s,
      finishReason: cut.has(i) ? "length" as const : "stop" as const,
    }));
    using buf = withSequences(got, sequences);
    const masked = new GradientRecorder();
    const m = learn(policy, masked, buf, { ...CFG, ppo: { ...CFG.ppo, maskTruncated: true } }, { seed: 3 });
    assert.equal(m.trained_fraction, 6 / 8);
    // The same steps as an advantages function that marks them untrained (their advantages kept).
    const untrained: AdvantagesFn = (rewards, k, lengths, values, cfg) => {
      const adv = updateAdvantages(rewards, k, lengths, values, cfg);
      return { ...adv, trained: adv.trained.map((t, i) => t && !cut.has(i)) };
    };
    const byHand = new GradientRecorder();
    learn(policy, byHand, buf, CFG, { seed: 3, advantages: untrained });
    assert.deepEqual(masked.steps, byHand.steps);
    // Off (the default), they are trained, and the policy's gradient differs.
    const all = new GradientRecorder();
    assert.equal(learn(policy, all, buf, CFG, { seed: 3 }).trained_fraction, 1);
    assert.notDeepEqual(all.steps.at(-1), masked.steps.at(-1));
    // Without a critic the reference pass reads only what is trained: the cut sequences are not in it.
    const rows: number[] = [];
    const real = policy.reference.bind(policy);
    policy.reference = (batch, opts) => {
      rows.push(batch.inputIds.size(0));
      return real(batch, opts);
    };
    const group = { ...CFG, ppo: { ...CFG.ppo, advantage: "group" as const, maskTruncated: true } };
    learn(policy, new GradientRecorder(), buf, group, { microBatch: 8 });
    assert.deepEqual(rows, [6]);
  });
});
