/**
 * Adapter casts (model/lora.ts AdapterCasts): a no-grad forward on a bfloat16
 * base reuses each float32 adapter's bfloat16 cast until the adapter changes;
 * a grad-mode forward, and a CUDA graph's function, cast afresh.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  AdamW,
  CudaGraph,
  liveTensors,
  manualSeed,
  noGrad,
  randn,
  type Tensor,
  tidy,
  zeros,
} from "../ffi/mod.ts";
import { Linear } from "../model/layers.ts";
import { AdapterCasts, adapterWeight, LoraLinear, LoraState } from "../model/lora.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import { learn } from "../rl/learn.ts";
import { ppoObjective } from "../rl/objective.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { Policy } from "../rl/policy.ts";
import { assertNoLeak, DEVICE, scriptedScore } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");

const bf16 = { dtype: "bfloat16" as const, device: DEVICE };

const same = (a: Tensor, b: Tensor): boolean =>
  tidy(() => a.to("float32").sub(b.to("float32")).abs().amax().item() === 0);

Deno.test("tensor version: in-place writes and optimizer steps bump it, other ops do not", () => {
  assertNoLeak(() => {
    using w = randn([4, 3], { device: DEVICE }).setRequiresGrad(true);
    const v0 = w.version;
    tidy(() => void w.add(1).mul(2).to("bfloat16"));
    assert.equal(w.version, v0, "out-of-place ops leave it");
    noGrad(() => tidy(() => void w.copy_(zeros([4, 3], { device: DEVICE }))));
    const v1 = w.version;
    assert.ok(v1 > v0, "copy_ bumps it");
    const opt = new AdamW([{ params: [w], lr: 1e-3 }]);
    tidy(() => w.square().sum().backward());
    opt.step();
    assert.ok(w.version > v1, "an AdamW step bumps it");
    opt.dispose();
    w.dispose();
    assert.throws(() => w.version, /after dispose/);
  });
});

Deno.test("adapter casts: no-grad reuses the held cast until the weight changes; grad mode casts afresh", () => {
  manualSeed(0);
  assertNoLeak(() => {
    using w = randn([8, 5], { device: DEVICE }).setRequiresGrad(true);
    const casts = new AdapterCasts();
    try {
      const first = noGrad(() => adapterWeight(w, "bfloat16", casts));
      assert.equal(first.dtype, "bfloat16");
      tidy(() => assert.ok(same(first, w.detach().to("bfloat16"))));
      assert.equal(
        noGrad(() => adapterWeight(w, "bfloat16", casts)),
        first,
        "the same tensor: no second cast",
      );
      assert.equal(casts.size, 1);
      assert.equal(noGrad(() => adapterWeight(w, "float32", casts)), w, "no cast to the weight's own dtype");
      // An expert's slice comes from the held cast of the whole bank.
      tidy(() => assert.ok(same(noGrad(() => adapterWeight(w, "bfloat16", casts, 2)), first.select(0, 2))));
      tidy(() =>
        assert.ok(noGrad(() => adapterWeight(w, "bfloat16", null)) !== first, "no casts held: afresh")
      );

      noGrad(() => tidy(() => void w.copy_(w.mul(3))));
      const after = noGrad(() => adapterWeight(w, "bfloat16", casts));
      assert.notEqual(after, first, "a write to the weight makes a new cast");
      assert.ok(first.disposed, "the stale cast is freed");
      assert.equal(casts.size, 1);
      tidy(() => assert.ok(same(after, w.detach().to("bfloat16"))));

      tidy(() => {
        const fresh = adapterWeight(w, "bfloat16", casts); // grad mode: part of autograd
        assert.notEqual(fresh, after);
        assert.ok(fresh.requiresGrad);
        fresh.to("float32").sum().backward();
        assert.ok(same(w.grad!, zeros([8, 5], { device: DEVICE }).add(1)), "d(sum)/dw = 1 through the cast");
        const slice = adapterWeight(w, "bfloat16", casts, 1);
        assert.deepEqual([slice.shape, slice.requiresGrad], [[5], true]);
      });
      w.clearGrad();
    } finally {
      casts.dispose();
    }
    assert.equal(casts.size as number, 0, "dispose frees them all");
  });
});

Deno.test("adapter casts: a CUDA graph's function casts afresh (a recording must not read the cache)", () => {
  manualSeed(1);
  assertNoLeak(() => {
    using w = randn([6, 4], { device: DEVICE });
    const casts = new AdapterCasts();
    using out = zeros([6, 4], bf16);
    const held = noGrad(() => adapterWeight(w, "bfloat16", casts));
    const seen: Tensor[] = [];
    using g = new CudaGraph(DEVICE);
    const step = (): void => {
      const c = adapterWeight(w, "bfloat16", casts);
      seen.push(c);
      out.copy_(c);
    };
    noGrad(() => {
      g.warmup(step);
      g.capture(step);
      g.replay();
    });
    assert.ok(seen.length >= 1 && seen.every((c) => c !== held), "never the held cast");
    assert.ok(same(out, held));
    casts.dispose();
  });
});

Deno.test("adapter casts: held by LoraState.holdCasts and freed at its end; nested holds share it", () => {
  const state = new LoraState();
  assert.equal(state.casts, null);
  {
    using _outer = state.holdCasts();
    const held = state.casts!;
    assert.ok(held instanceof AdapterCasts);
    {
      using _inner = state.holdCasts();
      assert.equal(state.casts, held);
    }
    assert.equal(state.casts, held, "the inner hold's end leaves the outer one");
  }
  assert.equal(state.casts, null);
});

Deno.test("adapter casts: a bfloat16 LoRA layer's no-grad forward follows its adapters' updates", () => {
  manualSeed(2);
  assertNoLeak(() => {
    using w = tidy(() => randn([16, 32], bf16).mul(0.05));
    const state = new LoraState();
    const lora = new LoraLinear(
      new Linear(w),
      { in: 32, out: 16, like: w },
      { r: 4, alpha: 8, dropout: 0 },
      state,
    );
    try {
      noGrad(() => tidy(() => void lora.B.copy_(randn(lora.B.shape, { device: DEVICE }).mul(0.1))));
      using x = randn([3, 32], bf16);
      using _casts = state.holdCasts();
      const opt = new AdamW([{ params: lora.parameters(), lr: 1e-2, weightDecay: 0 }]);
      for (let step = 0; step < 3; step++) {
        tidy(() => {
          // The no-grad forward (held casts) equals the grad-mode forward (fresh casts), bit for bit.
          const cached = noGrad(() => lora.forward(x));
          const fresh = lora.forward(x);
          assert.ok(same(cached, fresh), `step ${step}: the no-grad forward used stale casts`);
          fresh.to("float32").square().mean().backward();
        });
        opt.step();
        opt.zeroGrad();
      }
      opt.dispose();
    } finally {
      lora.dispose();
    }
  });
});

Deno.test("adapter casts: collect on a bfloat16 model holds every adapter's cast while it decodes, then frees them", async () => {
  const live = liveTensors();
  manualSeed(4);
  {
    using model = await loadModel(MODEL, bf16);
    const tok = await Tokenizer.load(MODEL);
    using policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    const adapters = policy.policyParameters().length;
    const held: number[] = [];
    const scripted = scriptedScore(() => 1);
    const score = (...args: unknown[]): ReturnType<typeof scripted> => {
      held.push(policy.lora.state.casts?.size ?? -1); // scored after each generation batch, inside collect
      return scripted(...args);
    };
    const prompts = [[5, 6, 7], [8, 9]].map((ids, i) => ({ ids, answer: i }));
    const cfg = { rollout: { k: 2, maxNewTokens: 6 } };
    using _buf = await collect(policy, tok, prompts, cfg, { seed: 1, score });
    assert.ok(held.length > 0);
    assert.ok(held.every((n) => n === adapters), `held casts ${held}, adapter weights ${adapters}`);
    assert.equal(policy.lora.state.casts, null, "freed when collect returns");
  }
  assert.equal(liveTensors(), live);
});

Deno.test("adapter casts: learn frees the old pass's held casts before its training passes", async () => {
  const live = liveTensors();
  manualSeed(5);
  {
    using model = await loadModel(MODEL, bf16);
    const tok = await Tokenizer.load(MODEL);
    using policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    const prompts = [[5, 6, 7], [8, 9]].map((ids, i) => ({ ids, answer: i }));
    // Two epochs: an old pass, then training passes.
    const cfg = { rollout: { k: 2, maxNewTokens: 4 }, ppo: { epochs: 2 } };
    using buf = await collect(policy, tok, prompts, cfg, { seed: 2, score: scriptedScore((i) => i % 2) });
    using opt = policyOptimizer(policy);
    const during: (number | null)[] = [];
    const m = learn(policy, opt, buf, cfg, {
      objective: (out, inputs, c) => {
        during.push(policy.lora.state.casts?.size ?? null);
        return ppoObjective(out, inputs, c);
      },
    });
    assert.ok(m.optimizer_steps === 2 && during.length >= 2);
    assert.ok(during.every((x) => x === null), `casts held in the training passes: ${during}`);
    assert.equal(policy.lora.state.casts, null);
  }
  assert.equal(liveTensors(), live);
});
