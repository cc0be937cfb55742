/**
 * The PPO step on the tiny model: the batch layout, the objective's parts
 * adding up, the policy and value losses reaching disjoint parameters, and
 * ppoStep running end to end (finite metrics, gradients on the adapters and
 * the value head, no leaked tensors, identical results from the same seed).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  AdamW,
  dispose,
  Generator,
  liveTensors,
  manualSeed,
  nativeLiveCount,
  noGrad,
  randn,
  type Tensor,
  tensor,
  tidy,
} from "../mod.ts";
import { buildPrompt } from "../data/prompt.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { entropyBonus, klPenalty, ppoClippedLoss, valueLoss } from "../rl/losses.ts";
import { OBJECTIVE_PARTS, ppoObjective } from "../rl/objective.ts";
import { Policy, type PolicyOutput, sequenceValues } from "../rl/policy.ts";
import { type PpoConfig, ppoConfig, type PpoMetrics, ppoStep, ppoUpdate } from "../rl/ppo.ts";
import { rollout, type RolloutPrompt, sequenceBatch } from "../rl/rollout.ts";
import { groupBaseline } from "../rl/advantages.ts";
import { assertClose, assertNoLeak, DEVICE } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
const CFG: Partial<PpoConfig> = { k: 2, maxNewTokens: 6, klCoef: 0.1, entropyCoef: 0.01, topK: 50 };
const TIMING = new Set(["rollout_seconds", "train_seconds", "tokens_per_second"]);

Deno.test("ppo: sequence batch layout and config checks", () => {
  assertNoLeak(() => {
    const b = sequenceBatch([[5, 6, 7], [8]], [[9], [10, 11]], 0, DEVICE);
    assert.deepEqual(b.inputIds.tolist(), [[5, 6, 7, 9], [0, 8, 10, 11]]);
    assert.deepEqual(b.attentionMask.tolist(), [[1, 1, 1, 1], [0, 1, 1, 1]]);
    assert.deepEqual(b.positionIds.tolist(), [[0, 1, 2, 3], [1, 0, 1, 2]]);
    assert.deepEqual(b.completionMask.tolist(), [[0, 0, 0, 1], [0, 0, 1, 1]]);
    dispose(b);
  });
  assert.equal(ppoConfig().klEstimator, "k3");
  assert.throws(() => ppoConfig({ k: 0 }), /"k"/);
  assert.throws(() => ppoConfig({ klEstimator: "k2" as "k1" }), /klEstimator/);
  assert.throws(() => ppoConfig({ topP: 0 }), /topP/);
  assert.throws(() => ppoConfig({ reward: { correct: NaN } }), /correct/);
});

/** Synthetic per-token outputs [2, 4] with autograd on logprobs, entropy and values. */
function fakeOutputs(): PolicyOutput {
  const f = { dtype: "float32" as const, device: DEVICE };
  const mask = tensor([[0, 0, 1, 1], [0, 1, 1, 1]], f);
  return {
    logprobs: randn([2, 4], f).sub(1).mul(mask).setRequiresGrad(true),
    entropy: randn([2, 4], f).abs().mul(mask).setRequiresGrad(true),
    values: randn([2, 4], f).setRequiresGrad(true),
    mask,
  };
}

Deno.test("ppo: the objective is the sum of its parts", () => {
  assertNoLeak(() =>
    tidy(() => {
      const out = fakeOutputs();
      const f = { dtype: "float32" as const, device: DEVICE };
      const ref = randn([2, 4], f).sub(1);
      const cfg = { ...ppoConfig(CFG), valueCoef: 0.5 };
      const r = ppoObjective(out, { centered: tensor([0.5, -0.5], f), refLogprobs: ref }, cfg);
      const p = Object.fromEntries(OBJECTIVE_PARTS.map((n, i) => [n, r.parts.toArray()[i]!]));
      const want = p.policy_loss! + cfg.klCoef * p.kl! - cfg.entropyCoef * p.entropy! +
        cfg.valueCoef * p.value_loss!;
      assertClose([r.loss.item()], [want], 1e-5);
      assert.equal(p.clip_fraction, 0, "ratio 1 by default");
      assert.ok(Number.isNaN(p.router_aux_loss!) && Number.isNaN(p.logprob_mismatch!), "off → NaN");
      assert.throws(() => ppoObjective(out, { centered: tensor([0, 0], f) }, cfg), /needs refLogprobs/);
      assert.throws(
        () =>
          ppoObjective(out, { centered: tensor([0, 0], f), refLogprobs: ref }, {
            ...cfg,
            routerAuxCoef: 0.1,
          }),
        /router logits/,
      );
    })
  );
});

Deno.test("ppo: rollout and ppoStep on the tiny model", async (t) => {
  manualSeed(0);
  const live = liveTensors();
  {
    using model = await loadModel(MODEL, { device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    const questions = [["What is 3 + 4?", "7"], ["Tom has 2 apples and buys 5. How many?", "#### 7"]];
    const prompts: RolloutPrompt[] = [];
    for (const [q, answer] of questions) {
      const p = await buildPrompt(tok, q!, { instruction: "" });
      prompts.push({ ids: p.ids, text: p.text, answer: answer! });
    }
    const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    noGrad(() =>
      tidy(() =>
        policy.policyParameters().forEach((p) => p.copy_(randn(p.shape, { device: p.device }).mul(0.05)))
      )
    );
    const params = [...policy.policyParameters(), ...policy.valueParameters()];
    const clearGrads = (): void => params.forEach((p) => p.clearGrad());
    const grads = (ps: Tensor[]): (number[] | null)[] => ps.map((p) => tidy(() => p.grad?.toArray() ?? null));

    const ro = await (async () => {
      using g = new Generator(1, DEVICE);
      return await rollout(policy, tok, prompts, ppoConfig(CFG), g);
    })();
    await t.step("rollout: k completions per prompt, prompt-major, batch aligned", () => {
      assert.equal(ro.completions.length, 4);
      assert.deepEqual(ro.completions.map((c) => c.prompt), [0, 0, 1, 1]);
      const ids = ro.batch.inputIds.tolist() as number[][],
        comp = ro.batch.completionMask.tolist() as number[][];
      ro.completions.forEach((c, i) => {
        const row = ids[i]!, n = c.tokens.length;
        assert.deepEqual(row.slice(row.length - n), c.tokens, `row ${i} ends with its completion`);
        assert.equal(comp[i]!.reduce((a, b) => a + b), n);
        assert.equal(c.logprobs.length, n);
        assert.ok(c.tokens.length <= 6 && ["eos", "length"].includes(c.finishReason));
      });
      assert.equal(ro.tokensGenerated, ro.completions.reduce((s, c) => s + c.tokens.length, 0));
      assert.deepEqual(ro.promptTexts, prompts.map((p) => p.text));
    });

    await t.step("the policy terms reach only the adapters, the value loss only the value head", () => {
      const f = { dtype: "float32" as const, device: DEVICE };
      const centered = tensor(groupBaseline(ro.rewards, 2), f);
      const ref = policy.referenceLogprobs(ro.batch);
      policy.backward(ro.batch, (out) =>
        tidy(() => {
          const adv = tensor([0.5, -1, 1, -0.5], f);
          const pg = ppoClippedLoss(out.logprobs, out.logprobs.detach(), adv, out.mask).loss;
          return pg.add(klPenalty(out.logprobs, ref, out.mask).mean).sub(
            entropyBonus(out.entropy, out.mask),
          );
        }));
      assert.ok(grads(policy.valueParameters()).every((g) => g === null), "policy loss reached the critic");
      assert.ok(grads(policy.policyParameters()).every((g) => g !== null));
      clearGrads();
      policy.backward(ro.batch, (out) => valueLoss(sequenceValues(out), centered));
      assert.ok(
        grads(policy.policyParameters()).every((g) => g === null),
        "value loss reached the adapters",
      );
      assert.ok(grads(policy.valueParameters()).every((g) => g !== null));
      clearGrads();
      dispose([centered, ref]);
    });
    dispose(ro.batch);

    const run = async (): Promise<{ metrics: PpoMetrics; grads: (number[] | null)[]; texts: string[] }> => {
      using g = new Generator(7, DEVICE);
      const js = liveTensors(), native = nativeLiveCount();
      const { metrics, samples } = await ppoStep(policy, tok, prompts, CFG, { generator: g });
      assert.equal(liveTensors(), js, "ppoStep leaked tensors");
      assert.equal(nativeLiveCount(), native, "ppoStep leaked native handles");
      const out = { metrics, grads: grads(params), texts: samples.map((s) => s.completion) };
      clearGrads();
      return out;
    };

    await t.step("ppoStep: finite metrics, gradients everywhere, no leaks, reproducible", async () => {
      const a = await run();
      const m = a.metrics;
      for (const [k, v] of Object.entries(m)) {
        if (k === "router_aux_loss") assert.ok(Number.isNaN(v), "router loss is off");
        else assert.ok(Number.isFinite(v), `${k} = ${v}`);
      }
      assert.ok(m.kl > 0, "perturbed adapters: the policy differs from the reference");
      assert.equal(m.clip_fraction, 0);
      assertClose([m.ratio_mean, m.approx_kl], [1, 0], 1e-6, "μ = 1: ratio 1");
      assert.ok(m.logprob_mismatch < 1e-3, `generation and training log-probs agree (${m.logprob_mismatch})`);
      assert.equal(m.tokens_generated, m.completion_len_mean * 4);
      assert.ok(
        a.grads.every((g) => g !== null && g.every(Number.isFinite)),
        "every parameter has a gradient",
      );
      assert.ok(a.grads.some((g) => g!.some((x) => x !== 0)));
      assert.ok(!policy.lora.state.training, "train mode restored");

      const b = await run();
      assert.deepEqual(b.texts, a.texts, "same samples");
      for (const [k, v] of Object.entries(a.metrics)) {
        if (!TIMING.has(k)) {
          assert.ok(
            Object.is(b.metrics[k as keyof PpoMetrics], v),
            `${k}: ${v} vs ${b.metrics[k as keyof PpoMetrics]}`,
          );
        }
      }
      assert.deepEqual(b.grads, a.grads, "same gradients");
    });

    await t.step("ppoUpdate: one optimizer step, gradients cleared, only Adam's moments left", async () => {
      const opt = new AdamW([
        { params: policy.policyParameters(), lr: 1e-2, weightDecay: 0 },
        { params: policy.valueParameters(), lr: 1e-2, weightDecay: 0 },
      ]);
      const before = tidy(() => params.map((p) => p.toArray()));
      const js = liveTensors();
      using g = new Generator(7, DEVICE);
      const r = await ppoUpdate(policy, opt, tok, prompts, CFG, { generator: g, maxGradNorm: 1 });
      assert.ok(r.gradNorm !== null && r.gradNorm > 0 && Number.isFinite(r.metrics.loss));
      assert.equal(liveTensors(), js + params.length * 2, "only Adam's moments remain");
      assert.ok(grads(params).every((x) => x === null), "gradients cleared");
      const after = tidy(() => params.map((p) => p.toArray()));
      assert.ok(after.some((a, i) => a.some((x, j) => x !== before[i]![j])), "parameters moved");
      opt.dispose();
    });

    policy.dispose();
  }
  assert.equal(liveTensors(), live, "policy and model freed");
});
