/**
 * learn's replaceable pieces on the tiny model: the advantages, objective and critic loss a notebook passes
 * in, what each must give back, and the errors that name a piece that gives something else.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Generator, liveTensors, manualSeed, type Tensor, tensor } from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import type { RlOverrides } from "../rl/config.ts";
import { learn, type LearnOptions } from "../rl/learn.ts";
import { groupScaledAdvantages, updateAdvantages } from "../rl/advantages.ts";
import { valueLoss } from "../rl/losses.ts";
import { type ObjectiveResult, ppoObjective } from "../rl/objective.ts";
import type { AdvantagesFn, ObjectiveFn, ValueLossFn } from "../rl/replaceable.ts";
import { Policy } from "../rl/policy.ts";
import { perturbAdapters, tinyPrompts } from "./tiny.ts";
import { assertClose, DEVICE, GradientRecorder, scriptedScore } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
const CFG: RlOverrides = {
  rollout: { k: 2, maxNewTokens: 6, topK: 50 },
  ppo: { klCoef: 0.1, entropyCoef: 0.01 },
};
Deno.test("learn: the advantages, objective and critic loss can be replaced", async () => {
  manualSeed(0);
  const live = liveTensors();
  {
    using model = await loadModel(MODEL, { device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    const prompts = await tinyPrompts(tok);
    const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    perturbAdapters(policy);

    using g = new Generator(5, DEVICE);
    using buf = await collect(policy, tok, prompts, CFG, {
      generator: g,
      score: scriptedScore((i) => i % 2),
    });
    const grads = (opts: LearnOptions): number[][][] => {
      const rec = new GradientRecorder();
      learn(policy, rec, buf, CFG, { microBatch: 4, maxGradNorm: 0, ...opts });
      return rec.steps;
    };
    const calls = { advantages: 0, objective: 0, valueLoss: 0 };
    const base = grads({});
    const scaled = grads({
      advantages: (...args) => {
        calls.advantages++;
        const a = updateAdvantages(...args);
        return { ...a, advantages: a.advantages.map((row) => row.map((x) => 2 * x)) };
      },
      objective: (out, inputs, cfg) => {
        calls.objective++;
        const r = ppoObjective(out, inputs, { ...cfg, klCoef: 0, entropyCoef: 0 });
        return { ...r, loss: r.loss.mul(1.5) };
      },
      valueLoss: (...args) => {
        calls.valueLoss++;
        return valueLoss(...args).mul(3);
      },
    });
    assert.deepEqual(
      calls,
      { advantages: 1, objective: 1, valueLoss: 1 },
      "one critic and one policy step",
    );
    const plain = grads({
      objective: (out, inputs, cfg) => ppoObjective(out, inputs, { ...cfg, klCoef: 0, entropyCoef: 0 }),
    });
    assert.equal(scaled.length, base.length);
    base.slice(0, -1).forEach((step, s) =>
      step.forEach((gr, i) => assertClose(scaled[s]![i]!, gr.map((x) => 3 * x), 1e-5, `critic ${s}.${i}`))
    );
    plain.at(-1)!.forEach((gr, i) => {
      assert.ok(gr.some((x) => x !== 0));
      assertClose(
        scaled.at(-1)![i]!,
        gr.map((x) => 3 * x),
        1e-5,
        `policy param ${i}: advantages ×2, loss ×1.5`,
      );
    });
    // A mean over sequences (verl's GSPO "seq-mean-token-mean") divides by the minibatch's sequences, so
    // that micro-batches add up to it as they add up to the token mean.
    const seqMean: ObjectiveFn = (out, inputs, cfg) => {
      const r = ppoObjective(out, inputs, { ...cfg, klCoef: 0, entropyCoef: 0 });
      const m = out.mask;
      const perSeq = out.logprobs.mul(inputs.advantages).neg().mul(m).sum(1).div(m.sum(1).clamp(1));
      return { ...r, loss: perSeq.sum().div(inputs.sequences!) };
    };
    const [whole, single] = [4, 1].map((microBatch) => grads({ objective: seqMean, microBatch }).at(-1)!);
    whole!.forEach((gr, i) => {
      assert.ok(gr.some((x) => x !== 0));
      assertClose(single![i]!, gr, 1e-5, `sequence mean, param ${i}`);
    });
    // TRL's default GRPO scaling, as a replacement: each group's centred rewards over its own std.
    const grpo = learn(policy, new GradientRecorder(), buf, {
      ...CFG,
      ppo: { ...CFG.ppo, advantage: "group" },
    }, {
      advantages: groupScaledAdvantages,
    });
    assert.ok(Number.isFinite(grpo.loss) && grpo.trained_fraction === 1, JSON.stringify(grpo));
    // A replacement may not train what the reference pass left out: here a group whose rewards are equal.
    using flat = await collect(policy, tok, prompts, CFG, {
      generator: g,
      score: scriptedScore((i) => (i < 2 ? 1 : i)),
    });
    const everything = (
      ...args: Parameters<typeof updateAdvantages>
    ): ReturnType<typeof updateAdvantages> => {
      const a = updateAdvantages(...args);
      return {
        ...a,
        trained: a.trained.map(() => true),
        advantages: args[2].map((n) => new Array(n).fill(1)),
      };
    };
    assert.throws(
      () => learn(policy, new GradientRecorder(), flat, CFG, { advantages: everything }),
      /advantages function trains sequence 0, whose group's rewards are all equal/,
    );
    // One number per sequence instead of one per token, or an async function: named as such.
    const perSequence: AdvantagesFn = (...args) => {
      const a = updateAdvantages(...args);
      return { ...a, advantages: a.centered as unknown as number[][] };
    };
    assert.throws(
      () => learn(policy, new GradientRecorder(), buf, CFG, { advantages: perSequence }),
      /advantages function gave sequence 0 -?[\d.]+ \(a number\), not a list of its \d+ completion tokens' advantages/,
    );
    assert.throws(
      () =>
        learn(policy, new GradientRecorder(), buf, CFG, {
          advantages: ((...args: Parameters<AdvantagesFn>) =>
            Promise.resolve(updateAdvantages(...args))) as unknown as AdvantagesFn,
        }),
      /advantages function returned a Promise \(it must not be async\)/,
    );
    assert.throws(
      () =>
        learn(policy, new GradientRecorder(), buf, CFG, {
          objective: (...args) => ({ ...ppoObjective(...args), parts: tensor([0, 0]) }),
        }),
      /objective function gave 2 parts, not the 11 of OBJECTIVE_PARTS/,
    );
    // A result of the wrong kind is named, not met as a TypeError or a torch error inside learn.
    const wrong: [LearnOptions, RegExp][] = [
      [
        {
          objective: ((...a: Parameters<ObjectiveFn>) => ppoObjective(...a).loss) as unknown as ObjectiveFn,
        },
        /objective function must return \{ loss, parts \} .*, got a Tensor of shape \[\]/,
      ],
      [
        {
          objective:
            ((...a: Parameters<ObjectiveFn>) =>
              Promise.resolve(ppoObjective(...a))) as unknown as ObjectiveFn, // as an async function does
        },
        /objective function must return \{ loss, parts \} .*, got a Promise \(it must not be async\)/,
      ],
      [
        {
          objective: (...a) => ({ loss: ppoObjective(...a).loss }) as ObjectiveResult,
        },
        /objective function's parts must be a Tensor of the 11 OBJECTIVE_PARTS .*, got nothing/,
      ],
      [
        { objective: (out, i, c) => ({ ...ppoObjective(out, i, c), loss: out.logprobs.neg() }) },
        /objective function's loss must be a scalar \(a mean over the tokens\), got shape \[4, \d+\]/,
      ],
      [
        { objective: (...a) => ({ ...ppoObjective(...a), loss: tensor(0.5) }) },
        /objective function's loss carries no gradient \(detached, or made under noGrad\)/,
      ],
      [
        { valueLoss: ((v: Tensor) => v.sum().item()) as unknown as ValueLossFn },
        /valueLoss function's loss must be a Tensor, got -?[\d.e-]+ \(a number\)/,
      ],
      [
        { valueLoss: (v, t, m) => v.sub(t.unsqueeze(1)).square().mul(m) },
        /valueLoss function's loss must be a scalar \(a mean over the tokens\), got shape \[4, \d+\]/,
      ],
    ];
    for (const [opts, re] of wrong) {
      assert.throws(() => learn(policy, new GradientRecorder(), buf, CFG, opts), re);
    }
    // Without a critic ("group") a critic loss would never be called: refused before any step.
    const none = new GradientRecorder();
    assert.throws(
      () => learn(policy, none, buf, { ...CFG, ppo: { ...CFG.ppo, advantage: "group" } }, { valueLoss }),
      /a valueLoss function was given, but ppo\.advantage "group" trains no critic/,
    );
    assert.equal(none.steps.length, 0);
    policy.dispose();
  }
  assert.equal(liveTensors(), live, "policy and model freed");
});
