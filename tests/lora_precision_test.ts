/**
 * LoRA adapters on a bfloat16 base are float32 (as PEFT keeps them): AdamW at
 * the default learning rate moves every adapter weight, where bfloat16
 * weights would round most steps away; the forward pass still runs in the
 * base's dtype, and merging adds the float32 update into the base once.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { AdamW, manualSeed, noGrad, randn, type Tensor, tidy } from "../ffi/mod.ts";
import { Linear } from "../model/layers.ts";
import { LoraLinear, LoraState } from "../model/lora.ts";
import { DEFAULT_LORA, LoraModel } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { assertNoLeak, DEVICE } from "./util.ts";

const bf16 = { dtype: "bfloat16" as const, device: DEVICE };

Deno.test("lora precision: on a bfloat16 base, AdamW at lr 1e-5 moves every adapter weight", () => {
  manualSeed(0);
  assertNoLeak(() => {
    using w = tidy(() => randn([64, 256], bf16).mul(0.02));
    const base = new Linear(w);
    const state = new LoraState();
    state.training = true;
    const lora = new LoraLinear(base, { in: 256, out: 64, like: w }, { r: 16, alpha: 32, dropout: 0 }, state);
    try {
      assert.deepEqual([lora.A.dtype, lora.B.dtype], ["float32", "float32"]);
      const opt = new AdamW([{ params: lora.parameters(), lr: 1e-5, weightDecay: 0 }]);
      using a0 = tidy(() => lora.A.clone());
      using x = tidy(() => randn([32, 256], bf16));
      for (let step = 0; step < 30; step++) {
        tidy(() => {
          const y = lora.forward(x);
          assert.equal(y.dtype, "bfloat16", "the activations keep the base's dtype");
          y.to("float32").sub(1).square().mean().backward();
        });
        opt.step();
        opt.zeroGrad();
      }
      // B starts at zero, so A moves from the second step on: ~29 steps of ~1e-5 each.
      const moved = tidy(() => lora.A.sub(a0).abs().gt(0).to("float32").mean().item());
      assert.ok(moved > 0.99, `only ${(100 * moved).toFixed(1)}% of A's weights moved`);
      opt.dispose();
    } finally {
      lora.dispose();
    }
  });
});

Deno.test("lora precision: a bfloat16 model's adapters are float32; merging adds their update once", async () => {
  manualSeed(1);
  const dir = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
  using model = await loadModel(dir, bf16);
  const lora = new LoraModel(model.decoder, model.config, { ...DEFAULT_LORA, r: 4, alpha: 8 });
  try {
    const params = lora.parameters();
    assert.ok(params.length > 0 && params.every((p) => p.dtype === "float32"));
    noGrad(() => tidy(() => params.forEach((p) => p.copy_(randn(p.shape, { device: DEVICE }).mul(0.05)))));
    const first = [...lora.linears.values()].find((l) => l.mergeable)!;
    const w = (first.base as Linear).weight;
    using before = tidy(() => w.clone());
    // The update in float32, rounded into the bfloat16 weight once.
    using want = tidy(() =>
      before.to("float32").add(first.B.matmul(first.A).mul(first.scale)).to("bfloat16")
    );
    lora.merge();
    assert.equal(w.dtype, "bfloat16");
    const same = (a: Tensor, b: Tensor): boolean =>
      tidy(() => a.to("float32").sub(b.to("float32")).abs().amax().item() === 0);
    assert.ok(same(w, want), "merged weight = round(base + B A · α/r)");
    lora.unmerge();
  } finally {
    lora.dispose();
  }
});
