/**
 * The policy: LoRA adapters (placement, counts, on/off, merge), log-probs and
 * entropy against a direct computation from full logits (at temperature 1
 * and 0.7), the reference policy as the adapters-off model and its states as
 * the base model's, the value head's gradient isolation,
 * gradient checkpointing giving the same gradients, and no leaks over 100
 * training steps.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  AdamW,
  dispose,
  liveTensors,
  manualSeed,
  noGrad,
  randn,
  type Tensor,
  tensor,
  tidy,
} from "../ffi/mod.ts";
import { leftPad } from "../model/padding.ts";
import { DEFAULT_LORA, type LoraConfig, LoraModel, loraParamCount } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Policy, type SequenceBatch } from "../rl/policy.ts";
import { collect } from "../rl/collect.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { assertClose, DEVICE } from "./util.ts";

const FIXTURES = join(import.meta.dirname!, "fixtures", "models");
const LORA: LoraConfig = { ...DEFAULT_LORA, r: 4, alpha: 8 };

/** Prompts of different lengths with completions, left-padded. */
function batch(): SequenceBatch {
  const prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]];
  const completions = [[20, 21, 22], [23, 24, 25, 26], [27]];
  const seqs = prompts.map((p, i) => [...p, ...completions[i]!]);
  const pad = leftPad(seqs, 0);
  const width = pad.inputIds[0]!.length;
  const comp = completions.map((c) => [...Array(width - c.length).fill(0), ...Array(c.length).fill(1)]);
  const i64 = { dtype: "int64" as const, device: DEVICE };
  return {
    inputIds: tensor(pad.inputIds, i64),
    attentionMask: tensor(pad.attentionMask, i64),
    positionIds: tensor(pad.positionIds, i64),
    completionMask: tensor(comp, i64),
  };
}

/** Randomises every adapter so that it changes the outputs (B starts at zero). */
function perturb(policy: Policy): void {
  noGrad(() =>
    tidy(() =>
      policy.policyParameters().forEach((p) => p.copy_(randn(p.shape, { device: p.device }).mul(0.05)))
    )
  );
}

function grads(ps: Tensor[]): number[][] {
  return ps.map((p) => tidy(() => p.grad?.toArray() ?? []));
}

Deno.test("policy: a target name that is no module is refused (it used to leave that module untrained)", async () => {
  using model = await loadModel(join(FIXTURES, "phimoe-tiny"), { device: DEVICE });
  const live = liveTensors();
  for (
    const [targetModules, reason] of [
      [["q_prj", "v_proj"], /target_modules "q_prj" matches no linear layer of this model/],
      [["Q_PROJ"], /"Q_PROJ" matches no linear layer/],
      [["mlp"], /"mlp" matches no linear layer/],
      ["q_proj", /"q_proj" \(a regular expression over full names\) matches no linear layer/],
    ] as const
  ) {
    assert.throws(() => new Policy(model, { lora: { ...LORA, targetModules } }), (e: Error) => {
      assert.match(e.message, reason);
      assert.match(e.message, /its linear layers are named q_proj, k_proj, v_proj, o_proj, gate, lm_head/);
      return true;
    });
    assert.equal(liveTensors(), live, "the refused adapters are freed");
  }
  // A disposed policy is refused: its model would run without the adapters, as the base model, in silence.
  {
    const policy = new Policy(model, { lora: LORA });
    policy.dispose();
    policy.dispose(); // twice is fine
    assert.ok(policy.disposed);
    assert.throws(
      () => tidy(() => policy.forward(batch())),
      /Policy: the policy was disposed \(its adapters are gone\)/,
    );
    assert.throws(() => tidy(() => policy.reference(batch())), /the policy was disposed/);
    const tok = await Tokenizer.load(join(FIXTURES, "qwen3-moe-tiny")); // any: refused before it is used
    await assert.rejects(
      () => collect(policy, tok, [{ ids: [5, 6], answer: "1" }]),
      /collect: the policy was disposed/,
    );
    assert.equal(liveTensors(), live);
  }
  // Held with `using`, as the model and the optimizer are: freed at the end of the block.
  let held: Policy;
  {
    using policy = new Policy(model, { lora: LORA });
    held = policy;
    assert.ok(liveTensors() > live);
  }
  assert.ok(held.disposed);
  {
    using _adapters = new LoraModel(model.decoder, model.config, LORA); // as loadPeftAdapter returns them
  }
  assert.equal(liveTensors(), live, "policy and adapters freed by using");
  // A name of the family that this model lacks (PhiMoE has no dense MLP) is fine, as is a regular expression.
  for (const targetModules of [["q_proj", "gate_proj"], ".*\\.(q|v)_proj"]) {
    const policy = new Policy(model, { lora: { ...LORA, targetModules } });
    assert.deepEqual(
      [...policy.lora.linears.keys()].map((n) => n.slice(n.lastIndexOf(".") + 1)).filter((n, i, a) =>
        a.indexOf(n) === i
      ),
      typeof targetModules === "string" ? ["q_proj", "v_proj"] : ["q_proj"],
    );
    policy.dispose();
  }
});

Deno.test("policy: adapters, outputs and gradients", async (t) => {
  manualSeed(0);
  const live = liveTensors();
  {
    using model = await loadModel(join(FIXTURES, "qwen3-moe-tiny"), { device: DEVICE });
    const b = batch();
    const policy = new Policy(model, { lora: LORA });

    await t.step("adapters sit on attention, dense MLP and every expert, not on the router", () => {
      const names = [...policy.lora.linears.keys()];
      assert.ok(
        names.includes("model.layers.0.self_attn.q_proj") && names.includes("model.layers.1.mlp.down_proj"),
      );
      assert.ok(!names.some((n) => n.endsWith("mlp.gate") || n === "lm_head"), names.join(", "));
      assert.deepEqual([...policy.lora.experts.keys()], [
        "model.layers.0.mlp.experts",
        "model.layers.2.mlp.experts",
      ]);
      assert.equal(policy.lora.trainableCount(), loraParamCount(model.config, LORA).total);
    });

    await t.step("a second policy on the same model is refused, and leaves the first one as it was", () => {
      const before = liveTensors();
      assert.throws(
        () => new Policy(model, { lora: LORA }),
        /model\.layers\.0\.self_attn\.q_proj already has an adapter .*dispose that one first/,
      );
      assert.equal(liveTensors(), before, "nothing made for the refused policy is left");
      assert.ok(
        model.decoder.layers[0]!.attn.q === policy.lora.linears.get("model.layers.0.self_attn.q_proj"),
      );
    });

    await t.step("fresh adapters do not change the model (B = 0)", () => {
      tidy(() => {
        const out = noGrad(() => policy.forward(b));
        assertClose(out.logprobs.toArray(), policy.reference(b).logprobs!.toArray(), 1e-6);
      });
    });

    perturb(policy);
    for (const temperature of [1, 0.7]) {
      await t.step(`log-probs and entropy at temperature ${temperature} equal a direct computation`, () => {
        tidy(() => {
          const out = noGrad(() => policy.forward(b, { temperature }));
          const logits = noGrad(() =>
            model.decoder.forward({
              inputIds: b.inputIds,
              positionIds: b.positionIds,
              attentionMask: b.attentionMask,
            })
              .logits!
          );
          const logp = logits.to("float32").div(temperature).logSoftmax(-1); // [B, T, V]
          const ids = b.inputIds.tolist() as number[][], comp = b.completionMask.tolist() as number[][];
          const lp = logp.tolist() as number[][][];
          const ours = out.logprobs.tolist() as number[][], ent = out.entropy.tolist() as number[][];
          for (let i = 0; i < ids.length; i++) {
            for (let j = 1; j < ids[i]!.length; j++) {
              const want = comp[i]![j] ? lp[i]![j - 1]![ids[i]![j]!]! : 0;
              assert.ok(
                Math.abs(ours[i]![j]! - want) < 1e-5,
                `logprob [${i},${j}] ${ours[i]![j]} vs ${want}`,
              );
              const h = comp[i]![j] ? -lp[i]![j - 1]!.reduce((s, l) => s + Math.exp(l) * l, 0) : 0;
              assert.ok(Math.abs(ent[i]![j]! - h) < 1e-4, `entropy [${i},${j}]`);
            }
          }
          // completions never start at position 0 here, so the mask is the completion mask
          assert.deepEqual(out.mask.toArray(), b.completionMask.to("float32").toArray());
        });
      });
    }

    await t.step("the reference policy is the adapters-off model and differs from the policy", () => {
      tidy(() => {
        const r = policy.reference(b);
        const pol = noGrad(() => policy.forward(b)).logprobs;
        assert.ok(
          pol.sub(r.logprobs!).abs().amax().item() > 1e-3,
          "perturbed adapters must change log-probs",
        );
        policy.lora.state.enabled = false;
        const off = noGrad(() => policy.forward(b)).logprobs;
        const hidden = noGrad(() =>
          model.decoder.forward({
            inputIds: b.inputIds,
            positionIds: b.positionIds,
            attentionMask: b.attentionMask,
            skipLogits: true,
          }).hidden
        );
        policy.lora.state.enabled = true;
        assertClose(r.logprobs!.toArray(), off.toArray(), 1e-6);
        assert.ok(policy.lora.state.enabled, "reference restores the adapters");
        // The critic's inputs: the base model's states right before each completion token, row by row.
        const comp = b.completionMask.tolist() as number[][], h = hidden.tolist() as number[][][];
        const want = comp.flatMap((row, i) => row.flatMap((m, j) => (m && j > 0 ? [h[i]![j - 1]!] : [])));
        assertClose(r.states.toArray(), want.flat(), 1e-6);
        assert.equal(policy.reference(b, { logprobs: false }).logprobs, null);
      });
    });

    await t.step("merge and unmerge keep the outputs and restore the base weights", () => {
      tidy(() => {
        const before = noGrad(() => policy.forward(b)).logprobs.toArray();
        const w = model.decoder.layers[0]!.attn.q;
        const base = (w as unknown as { base: { weight: Tensor } }).base.weight.toArray();
        policy.lora.merge();
        assertClose(noGrad(() => policy.forward(b)).logprobs.toArray(), before, 1e-4);
        policy.lora.unmerge();
        assertClose((w as unknown as { base: { weight: Tensor } }).base.weight.toArray(), base, 1e-6);
      });
    });

    await t.step("the value loss reaches only the value head; the policy loss only the adapters", () => {
      tidy(() => {
        const v = policy.values(policy.reference(b).states, b);
        assert.deepEqual(v.shape, b.inputIds.shape);
        assert.equal(v.abs().sum().item(), 0, "a fresh critic predicts 0 (its output layer starts at zero)");
        v.sub(1).square().mul(b.completionMask).sum().backward();
      });
      assert.ok(policy.valueParameters().every((p) => tidy(() => p.grad !== null)));
      assert.ok(
        policy.policyParameters().every((p) => tidy(() => p.grad === null)),
        "value loss leaked into LoRA",
      );
      policy.valueParameters().forEach((p) => p.clearGrad());
      policy.backward(b, (out) => out.logprobs.mul(out.mask).sum().neg());
      assert.ok(
        policy.valueParameters().every((p) => tidy(() => p.grad === null)),
        "policy loss leaked into the critic",
      );
      assert.ok(policy.policyParameters().some((p) => tidy(() => p.grad !== null)));
      policy.policyParameters().forEach((p) => p.clearGrad());
    });

    await t.step("gradient checkpointing gives the same gradients", () => {
      const loss = (out: Parameters<Parameters<Policy["backward"]>[1]>[0]): Tensor =>
        out.logprobs.mul(out.mask).sum().neg().add(out.entropy.mul(out.mask).sum().mul(0.1));
      const l1 = policy.backward(b, loss, { temperature: 0.8 });
      const g1 = grads(policy.policyParameters());
      policy.policyParameters().forEach((p) => p.clearGrad());
      policy.checkpointing = true;
      const l2 = policy.backward(b, loss, { temperature: 0.8 });
      policy.checkpointing = false;
      const g2 = grads(policy.policyParameters());
      assert.ok(Math.abs(l1 - l2) < 1e-5, `loss ${l1} vs ${l2}`);
      assert.ok(g1.every((g) => g.length > 0), "every parameter got a gradient");
      g1.forEach((g, i) => assertClose(g2[i]!, g, 1e-4, `param ${i}`));
      policy.policyParameters().forEach((p) => p.clearGrad());
    });

    await t.step("100 training steps leak no tensor", () => {
      const opt = new AdamW([
        { params: policy.policyParameters(), lr: 1e-3, weightDecay: 0 },
        { params: policy.valueParameters(), lr: 1e-3, weightDecay: 0 },
      ]);
      policy.train(true);
      const start = liveTensors();
      let first = 0, last = 0;
      for (let step = 0; step < 100; step++) {
        const loss = policy.backward(b, (out) => out.logprobs.mul(out.mask).sum().neg().div(out.mask.sum()));
        tidy(() => policy.values(policy.reference(b).states, b).square().mean().backward());
        if (step === 1) first = loss;
        last = loss;
        opt.step();
        opt.zeroGrad();
        if (step === 1) assert.equal(liveTensors(), start + opt.groups.flatMap((g) => g.params).length * 2);
      }
      assert.equal(
        liveTensors(),
        start + opt.groups.flatMap((g) => g.params).length * 2,
        "only Adam's moments remain",
      );
      assert.ok(last < first, `maximising log-likelihood lowers the loss: ${first} → ${last}`);
      opt.dispose();
      policy.train(false);
    });

    policy.dispose();
    dispose(b);
  }
  assert.equal(liveTensors(), live, "policy, model and batch freed");
});
