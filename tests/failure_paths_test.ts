/**
 * Failure paths on the tiny model: what a call that throws leaves behind. learn drops the gradients of a
 * step that threw (the next learn is a clean one) and refuses a non-finite gradient norm before the
 * optimizer steps; a DecodeSession serves one generate call at a time; loadCheckpoint refuses a dtype it
 * cannot load before anything is copied; LoraModel.merge merges nothing over a 4-bit base; ValueHead.load and loadModel
 * (a per-expert gate/up concat) free what they read when a later tensor fails; supervisedWarmup restores
 * the policy's mode. Runs on MOERL_TEST_DEVICE / MOERL_TEST_DTYPE.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  liveTensors,
  manualSeed,
  nativeLiveCount,
  noGrad,
  randn,
  setLeakCheck,
  type Tensor,
  tensor,
  tidy,
  zeros,
} from "../ffi/mod.ts";
import { Checkpoint } from "../model/checkpoint.ts";
import { DecodeSession } from "../model/decode_static.ts";
import { generate, type GenerateOptions } from "../model/generate.ts";
import { DEFAULT_LORA, type LoraConfig } from "../model/lora_apply.ts";
import { LoraLinear, LoraState } from "../model/lora.ts";
import { LoraExperts } from "../model/lora_experts.ts";
import { loadModel } from "../model/model.ts";
import { quantizeModel } from "../model/nf4.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { writeSafetensors } from "../model/safetensors_write.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { VALUE_HEAD_FILE, ValueHead } from "../model/value_head.ts";
import { collect } from "../rl/collect.ts";
import type { RlOverrides } from "../rl/config.ts";
import { learn, type StepOptimizer } from "../rl/learn.ts";
import { valueLoss } from "../rl/losses.ts";
import { ppoObjective } from "../rl/objective.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import type { ObjectiveFn } from "../rl/replaceable.ts";
import type { RolloutBuffer } from "../rl/rollout_buffer.ts";
import { loadCheckpoint, saveCheckpoint } from "../train/checkpoint.ts";
import { supervisedWarmup } from "../train/sft.ts";
import { assertClose, DEVICE, FLOAT, scriptedScore } from "./util.ts";

const TINY = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
const FL = { dtype: FLOAT, device: DEVICE } as const;
const LORA: LoraConfig = { ...DEFAULT_LORA, r: 4, alpha: 8 };
const CFG: RlOverrides = {
  rollout: { k: 2, maxNewTokens: 6 },
  ppo: { klCoef: 0.1, advantage: "token_value" },
};

/** Randomises every adapter so that it changes the outputs (B starts at zero). */
function perturb(policy: Policy): void {
  noGrad(() =>
    tidy(() =>
      policy.policyParameters().forEach((p) => p.copy_(randn(p.shape, { device: p.device }).mul(0.05)))
    )
  );
}

/** Each tensor's values as one string, for comparing before and after. */
const values = (ts: readonly Tensor[]): string[] => tidy(() => ts.map((t) => JSON.stringify(t.toArray())));

/** How many entries differ (assert.deepEqual's diff of whole tensors takes minutes when it fails). */
const changed = (after: readonly string[], before: readonly string[]): number =>
  after.filter((a, i) => a !== before[i]).length;

/**
 * Runs fn, then asserts it left no tensor alive. The finalizer backstop is off meanwhile: a GC during fn
 * would free a leaked tensor (with a warning) and so hide the leak from the counts.
 */
async function assertNoLeakAsync(fn: () => Promise<void>, what: string): Promise<void> {
  const js = liveTensors(), native = nativeLiveCount();
  setLeakCheck("off");
  try {
    await fn();
  } finally {
    const env = Deno.env.get("MOERL_LEAK_CHECK");
    setLeakCheck(env === "0" || env === "off" ? "off" : env === "stack" ? "stack" : "on");
  }
  assert.equal(liveTensors(), js, `${what} leaked ${liveTensors() - js} tensors`);
  assert.equal(nativeLiveCount(), native, `${what} leaked ${nativeLiveCount() - native} native handles`);
}

/** Runs fn on a perturbed policy over the tiny model with a seeded buffer of 2 prompts × 2 samples. */
async function withRollouts(fn: (policy: Policy, buffer: RolloutBuffer) => void): Promise<void> {
  manualSeed(0);
  using model = await loadModel(TINY, FL);
  const tok = await Tokenizer.load(TINY);
  const policy = new Policy(model, { lora: LORA });
  try {
    perturb(policy);
    const score = scriptedScore((i) => i % 2); // rewards 0, 1 in every group: every sequence is trained
    const prompts = [{ ids: [1, 2, 3, 4], answer: "1" }, { ids: [5, 6], answer: "2" }];
    using buffer = await collect(policy, tok, prompts, CFG, { seed: 1, score });
    fn(policy, buffer);
  } finally {
    policy.dispose();
  }
}

/** An optimizer that applies nothing (the parameters stay put, so two learns compare) and drops gradients. */
class NoStep implements StepOptimizer {
  step(_only: readonly Tensor[]): void {}
  zeroGrad(only: readonly Tensor[]): void {
    only.forEach((p) => p.clearGrad());
  }
}

/** f, throwing on its second call (a later micro-batch). */
function failingSecond<A extends unknown[], R>(f: (...a: A) => R): (...a: A) => R {
  let calls = 0;
  return (...a: A): R => {
    if (++calls === 2) throw new Error("injected failure");
    return f(...a);
  };
}

Deno.test("failure paths: learn that throws on a later micro-batch leaves no gradient; the next learn is clean", async () => {
  await withRollouts((policy, buffer) => {
    const params = [...policy.policyParameters(), ...policy.valueParameters()];
    const clean = learn(policy, new NoStep(), buffer, CFG, { microBatch: 1 });
    for (
      const failing of [{ objective: failingSecond(ppoObjective) }, { valueLoss: failingSecond(valueLoss) }]
    ) {
      const what = Object.keys(failing)[0]!;
      assert.throws(
        () => learn(policy, new NoStep(), buffer, CFG, { microBatch: 1, ...failing }),
        /injected/,
      );
      const left = params.filter((p) => {
        using g = p.grad;
        return g !== null;
      });
      assert.equal(left.length, 0, `${what} threw: ${left.length} parameters kept a gradient`);
      // Stale gradients would be summed into the next update's (a larger norm).
      const next = learn(policy, new NoStep(), buffer, CFG, { microBatch: 1 });
      assertClose(
        [next.grad_norm, next.value_grad_norm],
        [clean.grad_norm, clean.value_grad_norm],
        1e-4,
        what,
      );
    }
  });
});

Deno.test("failure paths: a non-finite gradient norm throws before the optimizer steps", async () => {
  await withRollouts((policy, buffer) => {
    using opt = policyOptimizer(policy);
    const adapters = policy.policyParameters();
    const before = values(adapters);
    const nan: ObjectiveFn = (out, batch, c) => {
      const r = ppoObjective(out, batch, c);
      return { ...r, loss: r.loss.mul(Number.NaN) };
    };
    assert.throws(
      () => learn(policy, opt, buffer, CFG, { objective: nan }),
      /the policy's gradient norm is NaN \(the objective's loss or an input to it is not finite\).*no step taken/,
    );
    assert.equal(changed(values(adapters), before), 0, "adapter tensors moved (to NaN)");
    // The critic's says so: the two losses are replaced apart, and either may be the one at fault.
    const critic = values(policy.valueParameters());
    assert.throws(
      () => learn(policy, opt, buffer, CFG, { valueLoss: (...a) => valueLoss(...a).mul(Number.NaN) }),
      /the critic's gradient norm is NaN \(the valueLoss's loss or an input to it is not finite\).*no step taken/,
    );
    assert.equal(changed(values(policy.valueParameters()), critic), 0, "critic tensors moved (to NaN)");
    assert.ok(adapters.every((p) => opt.state(p) === undefined), "AdamW has moments for the adapters");
    const finite = [...adapters, ...policy.valueParameters()].every((p) =>
      tidy(() => p.isfinite().all().item() === 1)
    );
    assert.ok(finite, "a parameter is not finite");
  });
});

Deno.test("failure paths: two generate calls at once on one DecodeSession: the second is refused", async () => {
  using model = await loadModel(TINY, FL);
  const tok = await Tokenizer.load(TINY);
  const d = model.decoder;
  const A = [[1, 2, 3, 4], [5, 6, 7]], B = [[9, 10], [11, 12, 13, 14, 15]];
  // An async decode with stop strings makes the calls await between steps, so that they interleave.
  const o: GenerateOptions = {
    maxNewTokens: 16,
    checkEvery: 2,
    stopStrings: ["never-matches"],
    decode: (ids: number[]): Promise<string> => tok.decode(ids),
  };
  for (const mode of ["static", "graph"] as const) {
    const want = (await generate(d, A, { ...o, decodeMode: mode })).tokens; // its own session
    using session = new DecodeSession(d, { graphs: mode === "graph" });
    const shared: GenerateOptions = { ...o, decodeMode: mode, session };
    const [a, b] = await Promise.allSettled([generate(d, A, shared), generate(d, B, shared)]);
    assert.equal(b.status, "rejected", `${mode}: the second call decoded into the first's buffers`);
    assert.match(String(b.reason), /in use by another generate call/);
    assert.equal(a.status, "fulfilled", `${mode}: ${a.status === "rejected" ? a.reason : ""}`);
    assert.deepEqual(a.value.tokens, want, `${mode}: the first call's tokens`);
    // Released once settled: the session serves the next call.
    assert.deepEqual((await generate(d, A, shared)).tokens, want, `${mode}: the session after both settled`);
  }
});

Deno.test("failure paths: loadCheckpoint refuses a dtype it cannot load before anything is copied", async () => {
  manualSeed(0);
  using model = await loadModel(TINY, FL);
  const policy = new Policy(model, { lora: LORA });
  const run = await Deno.makeTempDir();
  try {
    using opt = policyOptimizer(policy);
    const params = [...policy.policyParameters(), ...policy.valueParameters()];
    tidy(() => params.forEach((p) => p.square().sum().add(p.sum()).backward()));
    opt.step();
    opt.zeroGrad();
    const rng = { seed: 1, step: 1, batcherPosition: { epoch: 0, index: 0 } };
    const ck = await saveCheckpoint(run, { policy, optimizer: opt, step: 1, rng });
    // The optimizer file (restored last) gets an int64 moment of the right shape.
    const path = join(ck, "optimizer.safetensors");
    const f = await SafetensorsFile.open(path);
    const saved: Record<string, Tensor> = {};
    try {
      for (const n of f.names()) saved[n] = await f.load(n);
      const last = f.names().at(-1)!;
      const moment = saved[last]!;
      saved[last] = zeros(moment.shape, { dtype: "int64" });
      moment.dispose();
      await writeSafetensors(path, saved, f.metadata);
    } finally {
      f.close();
      Object.values(saved).forEach((t) => t.dispose());
    }
    // Move the live weights, moments and step counts away from the checkpoint's, then try to restore it.
    noGrad(() =>
      tidy(() =>
        params.forEach((p) => {
          p.copy_(p.add(1));
          const s = opt.state(p);
          if (!s) return;
          s.step += 1;
          s.expAvg.copy_(s.expAvg.add(1));
          s.expAvgSq.copy_(s.expAvgSq.add(1));
        })
      )
    );
    const state = (): string[] =>
      tidy(() =>
        params.map((p) => {
          const s = opt.state(p);
          return JSON.stringify(s ? [s.step, s.expAvg.toArray(), s.expAvgSq.toArray()] : null);
        })
      );
    const weights = values(params), moments = state();
    await assert.rejects(loadCheckpoint(ck, policy, opt), /I64/);
    assert.equal(changed(values(params), weights), 0, "tensors changed by the failed restore");
    assert.equal(changed(state(), moments), 0, "optimizer states changed by the failed restore");
  } finally {
    policy.dispose();
    await Deno.remove(run, { recursive: true });
  }
});

Deno.test("failure paths: LoraModel.merge over a partly 4-bit base merges nothing", async () => {
  manualSeed(0);
  using model = await loadModel(TINY, FL);
  // Attention stays full precision (mergeable), the rest goes 4-bit (not): merge fails partway.
  quantizeModel(model, { skip: (name) => name === "lm_head" || name.includes("self_attn") });
  const policy = new Policy(model, { lora: LORA });
  try {
    perturb(policy);
    const logitsOff = (): number[] => {
      policy.lora.state.enabled = false;
      try {
        return noGrad(() =>
          tidy(() => {
            const i64 = { dtype: "int64", device: DEVICE } as const;
            const ids = tensor([[1, 2, 3, 4, 5]], i64);
            return model.decoder.forward({
              inputIds: ids,
              positionIds: tensor([[0, 1, 2, 3, 4]], i64),
              attentionMask: tensor([[1, 1, 1, 1, 1]], i64),
            }).logits!.toArray().flat(2) as number[];
          })
        );
      } finally {
        policy.lora.state.enabled = true;
      }
    };
    const base = logitsOff();
    assert.throws(
      () => policy.lora.merge(),
      /LoRA merge: model\.layers\.\d+\.\S+ has a 4-bit base, which cannot absorb the update exactly; nothing/,
    );
    const adapters = [...policy.lora.linears.values(), ...policy.lora.experts.values()];
    assert.equal(adapters.filter((m) => m.merged).length, 0, "adapters left merged");
    // Refused before any merge, so the base is bit for bit as it was (an adapter left merged moves it by ~0.8).
    assert.deepEqual(logitsOff(), base, "adapters-off logits");
  } finally {
    policy.dispose();
  }
});

Deno.test("failure paths: ValueHead.load frees the tensors it read when a later one is missing", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const vh = ValueHead.create(16, FL);
    try {
      await writeSafetensors(join(dir, VALUE_HEAD_FILE), { w1: vh.w1, b1: vh.b1, w2: vh.w2 }); // no b2
    } finally {
      vh.dispose();
    }
    await assertNoLeakAsync(async () => {
      await assert.rejects(ValueHead.load(dir, { device: DEVICE }), /"b2"/);
    }, "ValueHead.load");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("failure paths: loadModel frees a per-expert gate_proj when its up_proj is bad or missing", async () => {
  const bad = "model.layers.2.mlp.experts.3.up_proj.weight";
  for (const broken of ["mis-shaped", "missing"] as const) {
    const dir = await Deno.makeTempDir();
    try {
      await Deno.copyFile(join(TINY, "config.json"), join(dir, "config.json"));
      {
        using ck = await Checkpoint.open(TINY);
        const ts: Record<string, Tensor> = {};
        try {
          for (const n of ck.names()) ts[n] = await ck.load(n);
          ts[bad]!.dispose();
          if (broken === "missing") delete ts[bad];
          else ts[bad] = zeros([5, 64]); // the config implies [32, 64]
          await writeSafetensors(join(dir, "model.safetensors"), ts);
        } finally {
          Object.values(ts).forEach((t) => t.dispose());
        }
      }
      await assertNoLeakAsync(async () => {
        await assert.rejects(loadModel(dir, FL), /up_proj/);
      }, `loadModel (${broken} up_proj)`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("failure paths: supervisedWarmup restores the policy's train/eval mode", async () => {
  using model = await loadModel(TINY, FL);
  const tok = await Tokenizer.load(TINY);
  const policy = new Policy(model, { lora: LORA });
  try {
    const examples = [{ id: "a", question: "1+1?", solution: "1+1=2\n#### 2", answer: "2", answerValue: 2 }];
    for (const training of [true, false]) {
      policy.train(training);
      await supervisedWarmup(policy, tok, examples, { steps: 1, batchSize: 1, lr: 1e-3, seed: 1 });
      assert.equal(
        policy.lora.state.training,
        training,
        `mode after a warm-up begun with train(${training})`,
      );
    }
  } finally {
    policy.dispose();
  }
});

Deno.test("failure paths: adapters that cannot be allocated free the halves made before", async () => {
  using model = await loadModel(TINY, FL);
  const like = model.decoder.embed, state = new LoraState();
  const bank = model.decoder.layers.find((l) => l.mlp.kind === "moe")!.mlp;
  if (bank.kind !== "moe") throw new Error("the tiny model has an MoE layer");
  await assertNoLeakAsync(async () => {
    // A is small and made first; B [2^40, r] cannot be had, as when memory runs out midway.
    assert.throws(() =>
      new LoraLinear(model.decoder.layers[0]!.attn.q, { in: 4, out: 2 ** 40, like }, LORA, state)
    );
    for (const form of ["fused", "split"] as const) {
      assert.throws(() =>
        new LoraExperts(
          bank.experts,
          { hidden: model.config.hiddenSize, inter: 2 ** 38, like },
          LORA,
          state,
          form,
        )
      );
    }
    await Promise.resolve();
  }, "adapters whose allocation failed");
});
