/**
 * The RL update on the tiny model: settings checks that name the key,
 * collect (K samples per prompt, prompt-major; the buffer's batches and
 * routing replay aligned with the tokens; stop at the end of the turn;
 * generation batches), learn (one step: ratio 1, the critic and the policy
 * both move, nothing leaks; several steps: the ratio moves and the clip
 * binds; flat groups cost no backward; micro-batches accumulate to the same
 * gradient), and ppoStep end to end, reproducible from its seed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  Generator,
  hostReadCount,
  liveTensors,
  manualSeed,
  nativeLiveCount,
  noGrad,
  type Tensor,
  tensor,
  tidy,
  tidyAsync,
} from "../ffi/mod.ts";
import { buildPrompt } from "../data/prompt.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect, type ScoreFn } from "../rl/collect.ts";
import { RolloutBuffer, type RolloutPrompt } from "../rl/rollout_buffer.ts";
import { Replicas } from "../rl/replicas.ts";
import { DEFAULT_RL_CONFIG, rlConfig, type RlOverrides } from "../rl/config.ts";
import { learn } from "../rl/learn.ts";
import { LOSS_AGGREGATIONS } from "../rl/losses.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer, ppoStep } from "../rl/ppo.ts";
import { reward, type RewardResult, type ScoreResult } from "../rl/reward.ts";
import { perturbAdapters, tinyPrompts } from "./tiny.ts";
import { assertClose, DEVICE, GradientRecorder, scriptedScore, withSequences } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
const CFG: RlOverrides = {
  rollout: { k: 2, maxNewTokens: 6, topK: 50 },
  ppo: { klCoef: 0.1, entropyCoef: 0.01 },
};
const TIMING = /seconds|per_second/;

Deno.test("rl config: every bad value names its section and key", () => {
  assert.deepEqual(rlConfig(), structuredClone(DEFAULT_RL_CONFIG));
  const bad: [RlOverrides, RegExp][] = [
    [
      { rollout: { k: 4, generationBatch: 3 } },
      /rollout\.generationBatch: 3 is smaller than rollout\.k \(4\)/,
    ],
    [{ ppo: { epochs: 0 } }, /ppo\.epochs: expected an integer ≥ 1, got 0/],
    [{ ppo: { minibatches: 0 } }, /ppo\.minibatches: expected an integer ≥ 1, got 0/],
    [{ ppo: { klEstimator: "k1" as "k2" } }, /ppo\.klEstimator: .*k1's expected gradient is zero/],
    [{ ppo: { clipHigh: -1 } }, /ppo\.clipHigh: expected a number > 0, or null/],
    [
      { ppo: { clipRatioC: 3, ratioLevel: "sequence" } },
      /ppo\.clipRatioC: the dual clip bounds token ratios/,
    ],
    [{ ppo: { rolloutCorrection: 0.5 } }, /ppo\.rolloutCorrection: expected a number ≥ 1, or null, got 0\.5/],
    [{ ppo: { gaeLambda: 2 } }, /ppo\.gaeLambda: expected a number in \[0, 1\], got 2/],
    [{ moe: { routingReplay: "on" as "off" } }, /moe\.routingReplay: expected one of "off", "rollout"/],
    [
      { ppo: { lossAggregation: "dapo" as "token_mean" } },
      /ppo\.lossAggregation: expected one of "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"/,
    ],
    [{ rollout: { temperature: 0 } }, /rollout\.temperature/],
    // A misspelt key in code is an error too, not a setting silently left at its default.
    [
      { rollout: { kk: 3 } as unknown as RlOverrides["rollout"] },
      /rollout\.kk: unknown setting \(known: k, /,
    ],
    // So is a misspelt section; other keys are ignored, so that a whole training config can be given.
    [{ rolout: { k: 1 } } as RlOverrides, /rolout: unknown section \(did you mean rollout\?\)/],
    [{ PPO: { epochs: 2 } } as RlOverrides, /PPO: unknown section \(did you mean ppo\?\)/],
    [{ rewrad: {} } as RlOverrides, /rewrad: unknown section \(did you mean reward\?\)/],
  ];
  for (const [over, re] of bad) assert.throws(() => rlConfig(over), re);
  const whole = { model: {}, train: {}, data: {}, eval: {}, ppo: { epochs: 2 } } as RlOverrides;
  assert.equal(rlConfig(whole).ppo.epochs, 2);
});

Deno.test("rl: collect, learn and ppoStep on the tiny model", async (t) => {
  manualSeed(0);
  const live = liveTensors();
  {
    using model = await loadModel(MODEL, { device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    const prompts = await tinyPrompts(tok);
    const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    perturbAdapters(policy);
    const snapshot = (ps: Tensor[]): number[][] => tidy(() => ps.map((p) => p.toArray()));

    await t.step("collect: K samples per prompt, prompt-major; batches and routing aligned", async () => {
      const js = liveTensors(), native = nativeLiveCount();
      {
        using g = new Generator(1, DEVICE);
        using buf = await collect(policy, tok, prompts, CFG, { generator: g });
        assert.equal(buf.size, 4);
        assert.deepEqual(buf.sequences.map((s) => s.prompt), [0, 0, 1, 1]);
        assert.deepEqual(buf.promptTexts, prompts.map((p) => p.text));
        const m = buf.metrics;
        assert.equal(m.tokens_generated, buf.sequences.reduce((n, s) => n + s.tokens.length, 0));
        const cut = buf.sequences.filter((s) => s.finishReason === "length").length;
        assert.ok(cut > 0, "the random model's completions reach the cap"); // whatever the score says
        assert.equal(m.truncated_fraction, cut / buf.size);
        for (const [k, v] of Object.entries(m)) assert.ok(Number.isFinite(v), `${k} = ${v}`);
        tidy(() => {
          const { batch, replay } = buf.batch([3, 0]);
          const ids = batch.inputIds.tolist() as number[][];
          [3, 0].forEach((i, r) => {
            const s = buf.sequences[i]!, n = s.tokens.length;
            assert.deepEqual(
              ids[r]!.slice(ids[r]!.length - n),
              s.tokens,
              `row ${r} ends with its completion`,
            );
            assert.equal(s.logprobs.length, n);
          });
          // The replayed experts are those of a forward over the same batch (f32: no near-ties flip).
          const own = policy.model.decoder.forward({ ...batch, skipLogits: true, dispatch: "loop" }).experts;
          const mask = batch.attentionMask.reshape([-1]).tolist() as number[];
          const last = batch.inputIds.size(1) - 1;
          replay!.forEach((rep, l) => {
            const got = rep.tolist() as number[][], want = own[l]!.tolist() as number[][];
            got.forEach((e, j) => {
              if (mask[j] === 0) assert.ok(e.every((x) => x === -1), "padding is not replayed");
              else if (j % (last + 1) !== last) {
                assert.deepEqual([...e].sort(), [...want[j]!].sort(), `layer ${l} pos ${j}`);
              }
            });
          });
        });
      }
      assert.equal(liveTensors(), js, "collect + dispose leaves no tensor");
      assert.equal(nativeLiveCount(), native);
    });

    await t.step("collect: generation batches of one prompt group each", async () => {
      using g = new Generator(1, DEVICE);
      using buf = await collect(policy, tok, prompts, {
        ...CFG,
        rollout: { ...CFG.rollout, generationBatch: 3 },
      }, {
        generator: g,
      });
      assert.deepEqual(buf.sequences.map((s) => s.prompt), [0, 0, 1, 1]);
      assert.ok(buf.routing !== null);
    });

    await t.step(
      "buffer: re-scored completions and chosen prompt groups, routing rows included",
      async () => {
        const live = liveTensors();
        {
          using buf = await collect(policy, tok, prompts, CFG, { seed: 2, score: scriptedScore(() => 0) });
          assert.equal(buf.metrics.reward_mean, 0);
          buf.sequences[3]!.reward = scriptedScore(() => 1)(buf.sequences[3]!);
          assert.equal(buf.metrics.reward_mean, 0.25, "the metrics follow a re-scored completion");
          assert.equal(buf.metrics.accuracy, 0.25);
          using second = buf.selectPrompts([1]);
          assert.deepEqual(second.prompts, [prompts[1]]);
          assert.deepEqual(second.sequences.map((s) => [s.prompt, s.tokens]), [
            [0, buf.sequences[2]!.tokens],
            [0, buf.sequences[3]!.tokens],
          ]);
          assert.equal(second.metrics.reward_mean, 0.5);
          assert.equal(
            second.metrics.decode_seconds,
            buf.metrics.decode_seconds,
            "the timings are the collect's",
          );
          tidy(() => {
            const a = buf.batch([3, 2]), b = second.batch([1, 0]);
            assert.deepEqual(b.batch.inputIds.tolist(), a.batch.inputIds.tolist());
            assert.deepEqual(b.replay!.map((r) => r.tolist()), a.replay!.map((r) => r.tolist()));
          });
          using both = buf.selectPrompts([1, 0]);
          tidy(() => {
            const a = buf.batch([0, 1, 2, 3]), b = both.batch([2, 3, 0, 1]);
            assert.deepEqual(b.replay!.map((r) => r.tolist()), a.replay!.map((r) => r.tolist()));
          });
          for (const bad of [[], [2], [0, 0], [0.5]]) assert.throws(() => buf.selectPrompts(bad), RangeError);
          second.sequences[0]!.reward.reward = 7; // a copy: the source buffer keeps its reward
          assert.equal(buf.sequences[2]!.reward.reward, 0);
          using swapped = new RolloutBuffer({
            ...buf,
            sequences: [buf.sequences[2]!, buf.sequences[3]!, buf.sequences[0]!, buf.sequences[1]!],
            routing: null,
            routingStart: [],
            device: DEVICE,
            timings: buf.metrics,
          });
          assert.throws(
            () => swapped.selectPrompts([0]),
            /sequence 0 is not of prompt 0: the buffer is not prompt-major/,
          );
          const m = learn(policy, new GradientRecorder(), second, CFG);
          assert.equal(m.trained_fraction, 1, "the chosen group's rewards differ");
        }
        assert.equal(liveTensors(), live, "each buffer frees its own routing rows");
        // A buffer used after its `using` block ended: named, not "tensor used after dispose()".
        const gone = await collect(policy, tok, prompts, CFG, {
          seed: 2,
          score: scriptedScore((i) => i % 2),
        });
        gone.dispose();
        assert.ok(gone.disposed);
        assert.throws(
          () => learn(policy, new GradientRecorder(), gone, CFG),
          /learn: the rollout buffer was disposed \(at the end of its `using` block\?\)/,
        );
        assert.throws(
          () => tidy(() => gone.batch([0])),
          /RolloutBuffer\.batch: the rollout buffer was disposed/,
        );
        assert.throws(
          () => gone.selectPrompts([0]),
          /RolloutBuffer\.selectPrompts: the rollout buffer was disposed/,
        );
      },
    );

    await t.step("collect: score functions, async or wrong, and buffers returned from a scope", async () => {
      const live = liveTensors();
      const asyncScore = async (c: { tokens: readonly number[] }): Promise<RewardResult> => {
        await new Promise((r) => setTimeout(r, 1));
        return scriptedScore(() => c.tokens.length)(c);
      };
      {
        using buf = await tidyAsync(() => collect(policy, tok, prompts, CFG, { seed: 1, score: asyncScore }));
        assert.deepEqual(buf.rewards, buf.sequences.map((s) => s.tokens.length), "an async score is awaited");
        tidy(() => assert.ok(buf.batch([0, 1]).replay !== null, "the routing record outlived the scope"));
      }
      assert.equal(liveTensors(), live);
      // A score that wraps the library's reward gets the config's reward section, so that it is not dropped.
      {
        const seen: unknown[] = [];
        const penalised: ScoreFn = (c, p, cfg) => {
          seen.push(cfg);
          const r = reward(c, p.answer, cfg);
          return { ...r, reward: r.reward - 0.01 * c.tokens.length };
        };
        const cfg = { ...CFG, reward: { wrong: -1, overLengthPenalty: 0 } };
        using buf = await collect(policy, tok, prompts, cfg, { seed: 1, score: penalised });
        assert.deepEqual(seen[0], rlConfig(cfg).reward);
        buf.sequences.forEach((s) =>
          assertClose([s.reward.reward], [(s.reward.correct ? 1 : -1) - 0.01 * s.tokens.length], 1e-9)
        );
      }
      // A score that only gives a reward (a reward model): its verdict flags count as false, and a logged
      // sample says nothing of its correctness.
      {
        const bare: ScoreFn = (c) => ({ reward: c.tokens.length / 100 });
        using buf = await collect(policy, tok, prompts, CFG, { seed: 1, score: bare });
        assert.deepEqual(buf.rewards, buf.sequences.map((s) => s.tokens.length / 100));
        const m = buf.metrics;
        assert.deepEqual([m.accuracy, m.marker_rate, m.overlong_rate], [0, 0, 0]);
        assert.ok(buf.samples(2).every((x) => x.correct === null));
      }
      const wrong = [
        [
          () => ({ reward: 1, correct: "yes" }),
          /gave correct "yes" \(a string\) for sample 0 of prompt 0 \(true, false, or left out\)/,
        ],
        [() => Promise.resolve(undefined), /gave undefined for sample 0 of prompt 0/],
        [() => ({ reward: NaN }), /gave a reward of NaN for sample 0 of prompt 0/],
        // A verifier's text: shown as a string, not as the number it reads like.
        [
          () => Promise.resolve({ reward: "1" }),
          /gave a reward of "1" \(a string\) for sample 0 of prompt 0/,
        ],
        [() => "0.5", /gave "0\.5" \(a string\) for sample 0 of prompt 0/],
        [() => {
          throw new Error("verifier down");
        }, /collect: the score function threw on sample 0 of prompt 0: verifier down/],
        // Which completion a scorer failed on, sync or async, is named with the scorer's own message.
        [
          (() => {
            let calls = 0;
            return (_c: unknown, p: RolloutPrompt) =>
              p === prompts[1] && ++calls === 2
                ? Promise.reject(new TypeError("no answer in the text"))
                : Promise.resolve(scriptedScore(() => 1)());
          })(),
          /collect: the score function threw on sample 1 of prompt 1: no answer in the text/,
        ],
      ] as const;
      for (const [score, message] of wrong) {
        await assert.rejects(
          collect(policy, tok, prompts, CFG, { seed: 1, score: score as () => ScoreResult }),
          message,
        );
        assert.equal(liveTensors(), live, `nothing left after ${message}`);
      }
      const generated = hostReadCount();
      await assert.rejects(
        collect(policy, tok, [prompts[0]!, { ...prompts[1]!, answer: "seven" }], CFG, { seed: 1 }),
        /prompt 1's gold answer "seven" is not a number/,
      );
      assert.equal(hostReadCount(), generated, "refused before generating");
      // Questions as text, as TRL takes them, or a prompt without its ids: named, with what a prompt is.
      const unrendered = [
        ["What is 2 + 3?", /prompt 1 is "What is 2 \+ 3\?" \(a string\)/],
        [{ answer: "5" }, /prompt 1's ids: expected token ids, got nothing/],
      ] as const;
      for (const [bad, shown] of unrendered) {
        await assert.rejects(
          collect(policy, tok, [prompts[0]!, bad as unknown as RolloutPrompt], CFG, { seed: 1 }),
          (e: Error) =>
            e instanceof TypeError && shown.test(e.message) &&
            /a prompt is \{ ids, answer \}/.test(e.message),
        );
      }
      assert.equal(hostReadCount(), generated, "refused before generating");
    });

    await t.step(
      "learn, one step: ratio 1, the critic and the policy both move, no leak, no grads left",
      async () => {
        using g = new Generator(2, DEVICE);
        using buf = await collect(policy, tok, prompts, CFG, {
          generator: g,
          score: scriptedScore((i) => i % 2), // every group has signal
        });
        using opt = policyOptimizer(policy, { learningRate: 1e-2, valueLearningRate: 1e-2 });
        const before = snapshot([...policy.policyParameters(), ...policy.valueParameters()]);
        const js = liveTensors();
        const m = learn(policy, opt, buf, CFG, { microBatch: 3 });
        const moments = 2 * (policy.policyParameters().length + policy.valueParameters().length);
        assert.equal(liveTensors(), js + moments, "only Adam's moments remain");
        assertClose([m.ratio_mean, m.clip_fraction, m.approx_kl], [1, 0, 0], 1e-6, "one step: ratio 1");
        assert.equal(m.optimizer_steps, 1);
        assert.equal(m.trained_fraction, 1);
        assert.ok(
          m.kl > 0 && Number.isFinite(m.kl_k1),
          "perturbed adapters: the policy differs from the reference",
        );
        assert.ok(m.mismatch_mean < 1e-4, `generation and training log-probs agree (${m.mismatch_mean})`);
        assertClose([m.is_weight_mean], [1], 1e-4);
        assert.ok(m.value_loss > 0 && Number.isFinite(m.value_grad_norm), "the critic trained");
        const after = snapshot([...policy.policyParameters(), ...policy.valueParameters()]);
        const moved = after.map((a, i) => a.some((x, j) => x !== before[i]![j]));
        const nLora = policy.policyParameters().length;
        assert.ok(moved.slice(0, nLora).every(Boolean), "every adapter moved");
        // Two critic steps (one per prompt group): the first moves the output layer, which starts at zero,
        // and the second the hidden layer too.
        assert.ok(moved.slice(nLora).every(Boolean), "every critic tensor moved");
        assert.ok(
          [...policy.policyParameters(), ...policy.valueParameters()].every((p) =>
            tidy(() => p.grad === null)
          ),
          "no gradient left behind",
        );
      },
    );

    await t.step(
      "learn, several steps: old log-probs from a pass first, the ratio moves, the clip binds",
      async () => {
        using g = new Generator(3, DEVICE);
        using buf = await collect(policy, tok, prompts, CFG, {
          generator: g,
          score: scriptedScore((i) => i % 2),
        });
        using opt = policyOptimizer(policy, { learningRate: 5e-2 });
        const cfg = { ...CFG, ppo: { ...CFG.ppo, epochs: 3, minibatches: 2 } };
        const m = learn(policy, opt, buf, cfg, { microBatch: 1 });
        assert.equal(m.optimizer_steps, 6);
        assert.ok(m.old_seconds > 0);
        assert.ok(Math.abs(m.ratio_mean - 1) > 1e-3, `the ratio moved: ${m.ratio_mean}`);
        assert.ok(m.clip_fraction > 0, `the clip binds: ${m.clip_fraction}`);
        assert.throws(
          () => learn(policy, opt, buf, { ppo: { minibatches: 3 } }),
          /ppo\.minibatches \(3\) must divide the update's 4 sequences/,
        );
        assert.throws(
          () => learn(policy, opt, buf, CFG, { seed: 1.5 }),
          /learn: seed must be an integer >= 0/,
        );
        await assert.rejects(
          () => collect(policy, tok, prompts, CFG, { seed: NaN }),
          /collect: seed must be an integer >= 0, got NaN/,
        );
        for (const maxGradNorm of [NaN, -1]) {
          assert.throws(
            () => learn(policy, opt, buf, CFG, { maxGradNorm }),
            /learn: maxGradNorm must be a finite number >= 0 \(0: no clipping\)/,
          );
        }
      },
    );

    await t.step("learn: groups whose rewards are all equal cost no backward", async () => {
      using g = new Generator(4, DEVICE);
      using buf = await collect(policy, tok, prompts, CFG, { generator: g, score: scriptedScore(() => 1) });
      const rec = new GradientRecorder();
      const m = learn(policy, rec, buf, CFG);
      assert.deepEqual([m.trained_fraction, m.optimizer_steps, m.frac_zero_std_groups], [0, 0, 1]);
      assert.equal(rec.steps.length, 1, "only the critic stepped");
      assert.equal(rec.steps[0]!.length, policy.valueParameters().length);
    });

    await t.step(
      "learn: micro-batches accumulate to the gradient of one pass, under every loss aggregation",
      async () => {
        using g = new Generator(5, DEVICE);
        using got = await collect(policy, tok, prompts, CFG, {
          generator: g,
          score: scriptedScore((i) => (i * 7) % 3),
        });
        // Completions cut to 2..6 tokens (the tiny model seldom stops early): the aggregations weigh them otherwise.
        const cut = got.sequences.map((s, i) => {
          const n = Math.min(s.tokens.length, 2 + (i * 3) % 5);
          return { ...s, tokens: s.tokens.slice(0, n), logprobs: s.logprobs.slice(0, n) };
        });
        using buf = withSequences(got, cut);
        const policyGrad = (steps: number[][][]): number[][] => steps.at(-1)!;
        const byAggregation: number[][] = [];
        for (const lossAggregation of LOSS_AGGREGATIONS) {
          const cfg = {
            ...CFG,
            ppo: { ...CFG.ppo, lossAggregation },
            moe: { routingReplay: "off" as const },
          };
          const grads = (microBatch: number): number[][][] => {
            const rec = new GradientRecorder();
            learn(policy, rec, buf, cfg, { microBatch, maxGradNorm: 0 });
            return rec.steps;
          };
          // The critic steps once per micro-batch of prompt groups; the policy once per minibatch.
          const whole = grads(4), single = grads(1);
          assert.deepEqual([whole.length, single.length], [2, 3], "critic steps, then one policy step");
          policyGrad(whole).forEach((gr, i) => {
            assert.ok(gr.length > 0 && gr.some((x) => x !== 0));
            assertClose(policyGrad(single)[i]!, gr, 1e-5, `${lossAggregation}: param ${i}`);
          });
          byAggregation.push(policyGrad(whole).flat());
        }
        // Each aggregation weighs the tokens otherwise (completions of different lengths).
        for (let a = 1; a < byAggregation.length; a++) {
          assert.ok(
            byAggregation[a]!.some((x, i) => Math.abs(x - byAggregation[0]![i]!) > 1e-6 * (1 + Math.abs(x))),
            `${LOSS_AGGREGATIONS[a]} gives token_mean's gradient`,
          );
        }
        // Dr. GRPO's divisor is the cap the buffer was sampled with (6), whatever learn's config says ...
        assert.equal(got.maxNewTokens, 6);
        const drGrpo = {
          rollout: { ...CFG.rollout, maxNewTokens: 1 },
          ppo: { ...CFG.ppo, lossAggregation: "seq_mean_token_sum_norm" as const },
          moe: { routingReplay: "off" as const },
        };
        const rec = new GradientRecorder();
        learn(policy, rec, buf, drGrpo, { microBatch: 4, maxGradNorm: 0 });
        assertClose(
          policyGrad(rec.steps).flat(),
          byAggregation[2]!,
          1e-6,
          "the buffer's cap, not the config's",
        );
        // ... and a buffer made by hand, which does not know its cap, takes the config's, and refuses a longer one.
        using unknown = new RolloutBuffer({
          ...buf,
          maxNewTokens: null,
          routing: null,
          routingStart: [],
          device: DEVICE,
          timings: buf.metrics,
        });
        assert.throws(
          () => learn(policy, new GradientRecorder(), unknown, drGrpo),
          /ppo\.lossAggregation "seq_mean_token_sum_norm" divides by the token cap \(1\), but a completion has \d+ tokens/,
        );
      },
    );

    await t.step(
      "learn at the rollout's temperature: the training pass scores what the sampler drew",
      async () => {
        const hot: RlOverrides = { ...CFG, rollout: { ...CFG.rollout, temperature: 0.6 } };
        using g = new Generator(8, DEVICE);
        using buf = await collect(policy, tok, prompts, hot, {
          generator: g,
          score: scriptedScore((i) => i % 2),
        });
        const m = learn(policy, new GradientRecorder(), buf, hot);
        assert.ok(m.mismatch_mean < 1e-4, `log-probs at T = 0.6 on both sides: |Δ| ${m.mismatch_mean}`);
        // Scored at temperature 1 instead, the same tokens would look off-policy.
        const cold = tidy(() => {
          const { batch } = buf.batch([0]);
          const lp = noGrad(() => policy.forward(batch)).logprobs.toArray();
          return lp.slice(lp.length - buf.sequences[0]!.tokens.length);
        });
        const gap = cold.reduce((s, x, j) => s + Math.abs(x - buf.sequences[0]!.logprobs[j]!), 0) /
          cold.length;
        assert.ok(gap > 100 * m.mismatch_mean, `temperature 1 differs: ${gap}`);
      },
    );

    await t.step(
      "learn with K = 1: the prompt-level critic is the baseline, every completion trains",
      async () => {
        const one: RlOverrides = {
          ...CFG,
          rollout: { ...CFG.rollout, k: 1 },
          ppo: { ...CFG.ppo, advantage: "prompt_value" },
        };
        using g = new Generator(9, DEVICE);
        using buf = await collect(policy, tok, prompts, one, {
          generator: g,
          score: scriptedScore((i) => i % 2),
        });
        const rec = new GradientRecorder();
        const m = learn(policy, rec, buf, one);
        assert.deepEqual([m.trained_fraction, m.frac_zero_std_groups, m.optimizer_steps], [1, 1, 1]);
        assert.ok(Number.isFinite(m.value_loss) && m.value_loss > 0);
        assert.equal(rec.steps.length, 2, "a critic step, then the policy's");
      },
    );

    await t.step(
      "learn: an empty completion (a re-scored or filtered buffer) trains under every estimator",
      async () => {
        using g = new Generator(10, DEVICE);
        using got = await collect(policy, tok, prompts, CFG, {
          generator: g,
          score: scriptedScore((i) => i % 2),
        });
        const sequences = got.sequences.map((s, i) => (i === 1 ? { ...s, tokens: [], logprobs: [] } : s));
        using buf = withSequences(got, sequences);
        for (const advantage of ["group", "token_value", "prompt_value"] as const) {
          const cfg: RlOverrides = { ...CFG, ppo: { ...CFG.ppo, advantage }, moe: { routingReplay: "off" } };
          const m = learn(policy, new GradientRecorder(), buf, cfg);
          assert.ok(Number.isFinite(m.loss), `${advantage}: loss ${m.loss}`);
          if (advantage !== "group") assert.ok(Number.isFinite(m.value_loss), `${advantage}: value loss`);
        }
      },
    );

    await t.step(
      "learn: routing replay on a model without MoE layers, and aux loss with checkpointing, are errors",
      async () => {
        using g = new Generator(6, DEVICE);
        using buf = await collect(policy, tok, prompts, CFG, { generator: g });
        const dense = {
          model: { decoder: { moeLayers: 0 }, dir: "dense-model" },
          checkAlive: (): void => {},
        } as unknown as Policy;
        assert.throws(
          () => learn(dense, new GradientRecorder(), buf, CFG),
          /routingReplay "rollout" needs an MoE model: dense-model/,
        );
        // A conflict of settings is refused before the critic steps (its optimizer state would be made).
        const opt = new GradientRecorder();
        policy.checkpointing = true;
        try {
          assert.throws(
            () => learn(policy, opt, buf, { ...CFG, ppo: { ...CFG.ppo, routerAuxCoef: 0.01 } }),
            /routerAuxCoef > 0 needs router logits, which a checkpointed backward does not keep/,
          );
        } finally {
          policy.checkpointing = false;
        }
        assert.equal(opt.steps.length, 0);
      },
    );

    const params = (): Tensor[] => [...policy.policyParameters(), ...policy.valueParameters()];
    const restore = (values: number[][]): void =>
      noGrad(() =>
        tidy(() =>
          params().forEach((p, i) =>
            p.copy_(tensor(values[i]!, { dtype: p.dtype, device: p.device }).reshape(p.shape))
          )
        )
      );
    const run = async (): Promise<
      { metrics: Record<string, number>; texts: string[]; params: number[][] }
    > => {
      using g = new Generator(7, DEVICE);
      using opt = policyOptimizer(policy, { learningRate: 1e-2 });
      const start = snapshot(params());
      const js = liveTensors(), native = nativeLiveCount();
      const { metrics, samples } = await ppoStep(policy, opt, tok, prompts, CFG, {
        generator: g,
        seed: 3, // with a generator: the minibatches' seed only
        score: scriptedScore((i) => i % 2),
      });
      const moments = 2 * params().length;
      assert.equal(liveTensors(), js + moments, "ppoStep leaked tensors");
      assert.equal(nativeLiveCount(), native + moments, "ppoStep leaked native handles");
      const after = snapshot(params());
      restore(start); // so that the second run starts where the first did
      return {
        metrics: metrics as unknown as Record<string, number>,
        texts: samples.map((s) => s.completion),
        params: after,
      };
    };

    await t.step("ppoStep: collect then learn, finite metrics, reproducible from its seed", async () => {
      const a = await run();
      for (const [k, v] of Object.entries(a.metrics)) {
        if (k === "router_aux_loss" || k === "dual_clip_fraction") assert.ok(Number.isNaN(v), `${k} is off`);
        else assert.ok(Number.isFinite(v), `${k} = ${v}`);
      }
      assert.ok(!policy.lora.state.training, "train mode restored");
      const b = await run();
      assert.deepEqual(b.texts, a.texts, "same samples");
      for (const [k, v] of Object.entries(a.metrics)) {
        if (!TIMING.test(k)) assert.ok(Object.is(b.metrics[k], v), `${k}: ${v} vs ${b.metrics[k]}`);
      }
      assert.deepEqual(b.params, a.params, "same weights after the step");
    });

    policy.dispose();
  }
  assert.equal(liveTensors(), live, "policy and model freed");
});

Deno.test("collect: a completion ends at the end-of-turn token, not only at generation_config's EOS", async () => {
  // The tiny model's generation_config names only id 2; its chat template ends a turn with <|im_end|>.
  // With a zero LM head every token is equally likely, so some samples draw <|im_end|> early.
  using model = await loadModel(MODEL, { device: DEVICE });
  const tok = await Tokenizer.load(MODEL);
  const imEnd = tok.tokenToId("<|im_end|>")!;
  noGrad(() => (model.decoder.lmHead as unknown as { weight: Tensor }).weight.fill_(0));
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 2, alpha: 4 } });
  try {
    const p = await buildPrompt(tok, "What is 1 + 1?", { instruction: "" });
    using g = new Generator(11, DEVICE);
    using buf = await collect(policy, tok, [{ ids: p.ids, answer: 2 }, { ids: p.ids, answer: 2 }], {
      rollout: { k: 32, maxNewTokens: 32 },
    }, { generator: g, recordRouting: false });
    const stops = new Set(tok.stopTokenIds);
    const atEnd = buf.sequences.filter((s) => s.tokens.at(-1) === imEnd);
    assert.ok(atEnd.length > 0, "some samples drew <|im_end|>");
    for (const s of buf.sequences) {
      assert.ok(s.tokens.slice(0, -1).every((id) => !stops.has(id)), "nothing runs past a stop token");
      assert.equal(s.finishReason, stops.has(s.tokens.at(-1)!) ? "eos" : "length");
      assert.equal(
        s.text,
        await tok.decode(s.tokens, { skipSpecialTokens: true }),
        "text of the kept tokens",
      );
      assert.equal(s.reward.overLength, s.finishReason === "length");
    }
  } finally {
    policy.dispose();
  }
});

/** Four short prompts of plain token ids: 8 sequences with K 2. */
const FOUR_PROMPTS: RolloutPrompt[] = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]].map((ids) => ({
  ids,
  answer: 0,
}));

Deno.test("learn: nothing is read back to the host between a pass's micro-batches", async () => {
  // A read waits for the device's queued work: between micro-batches it would leave the device idle while the
  // host prepares the next. The reference pass (no critic) and the step's micro-batches read once, afterwards.
  manualSeed(3);
  using model = await loadModel(MODEL, { device: DEVICE });
  const tok = await Tokenizer.load(MODEL);
  const prompts = FOUR_PROMPTS;
  // Dense dispatch: "loop" reads each layer's routing back by design (CPU builds without grouped GEMM use it).
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 }, dispatch: "dense" });
  try {
    using opt = policyOptimizer(policy, { learningRate: 1e-3 });
    const cfg: RlOverrides = { ...CFG, ppo: { ...CFG.ppo, advantage: "group" } };
    using buf = await collect(policy, tok, prompts, cfg, { seed: 1, score: scriptedScore((i) => i % 2) });
    const calls: Record<string, [number, number][]> = { reference: [], backwardLoss: [] };
    for (const name of ["reference", "backwardLoss"] as const) {
      const real = policy[name].bind(policy) as (...a: unknown[]) => unknown;
      (policy as unknown as Record<string, unknown>)[name] = (...args: unknown[]): unknown => {
        const before = hostReadCount();
        const out = real(...args);
        calls[name]!.push([before, hostReadCount()]);
        return out;
      };
    }
    learn(policy, opt, buf, cfg, { microBatch: 2, seed: 0 });
    for (const [name, list] of Object.entries(calls)) {
      assert.equal(list.length, 4, `${name}: 8 sequences in micro-batches of 2`);
      list.forEach(([before, after], i) => {
        assert.equal(after, before, `${name} ${i} reads nothing back`);
        if (i > 0) assert.equal(before, list[i - 1]![1], `nothing is read between ${name} ${i - 1} and ${i}`);
      });
    }
  } finally {
    policy.dispose();
  }
});

/** Rank 0 of two whose peer holds as many groups, all empty: every global statistic is rank 0's own. */
class EmptyPeer extends Replicas {
  constructor() {
    super(null);
  }
  override get size(): number {
    return 2;
  }
  override gather(xs: readonly number[]): number[][] {
    // [ok, trained…] (odd length): the peer's advantages pass and train nothing.
    if (xs.length % 2 === 1) return [[...xs], [1, ...new Array<number>(xs.length - 1).fill(0)]];
    const n = xs.length / 2; // lengths, then rewards
    return [[...xs], [...new Array<number>(n).fill(0), ...xs.slice(n)]];
  }
}

Deno.test("learn: a rank's share of a critic micro-batch runs in micro-batches, however large", async () => {
  // The critic steps once per global micro-batch of whole groups, longest first: here all of them are
  // rank 0's, twice a micro-batch, which must not become one forward of twice the rows.
  manualSeed(4);
  using model = await loadModel(MODEL, { device: DEVICE });
  const tok = await Tokenizer.load(MODEL);
  const prompts = FOUR_PROMPTS;
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
  try {
    const cfg: RlOverrides = { ...CFG, moe: { routingReplay: "off" } }; // token_value: a critic
    using buf = await collect(policy, tok, prompts, cfg, { seed: 1, score: scriptedScore((i) => i % 2) });
    const rows: number[] = [];
    const real = policy.reference.bind(policy);
    policy.reference = (batch, opts) => {
      rows.push(batch.inputIds.size(0));
      return real(batch, opts);
    };
    const m = learn(policy, new GradientRecorder(), buf, cfg, {
      microBatch: 2,
      seed: 0,
      replicas: new EmptyPeer(),
    });
    assert.deepEqual(rows, [2, 2, 2, 2], "8 sequences: 2 global micro-batches of 4, each run as 2 of 2");
    assert.ok(Number.isFinite(m.value_loss));
  } finally {
    policy.dispose();
  }
});
