/** saveModel writes a folder that loads back to the same model, with merged adapters baked in. */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors, manualSeed, noGrad, randn, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import { parseConfig } from "../model/config.ts";
import type { Linear } from "../model/layers.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { LoraModel } from "../model/lora_apply.ts";
import { type CausalLM, loadModel, randomModel } from "../model/model.ts";
import { saveModel } from "../model/save.ts";

const MODELS = join(import.meta.dirname!, "fixtures", "models");

function logits(model: CausalLM): Tensor {
  return noGrad(() =>
    tidy(() => {
      const ids = tensor([[5, 6, 7, 8, 9]], { dtype: "int64" });
      const pos = tensor([[0, 1, 2, 3, 4]], { dtype: "int64" });
      return model.decoder.forward({
        inputIds: ids,
        positionIds: pos,
        attentionMask: tensor([[1, 1, 1, 1, 1]]),
      })
        .logits!;
    })
  );
}

for (const name of ["qwen3-moe-tiny", "qwen3-moe-fused", "phimoe-tiny"]) {
  Deno.test(`saveModel: ${name} round-trips, with a merged adapter`, async () => {
    const live = liveTensors();
    const dir = await Deno.makeTempDir({ prefix: "moerl_save_" });
    try {
      {
        using model = await loadModel(join(MODELS, name));
        const lora = new LoraModel(model.decoder, model.config, {
          r: 2,
          alpha: 4,
          dropout: 0,
          targetModules: ["q_proj", "o_proj"],
          targetExperts: true,
        });
        noGrad(() => tidy(() => lora.parameters().forEach((p) => p.copy_(randn(p.shape).mul(0.1)))));
        using want = logits(model);
        lora.merge();
        await saveModel(model, dir);
        lora.dispose(); // unmerges: the in-memory model is the base again
        using reloaded = await loadModel(dir);
        using got = logits(reloaded);
        const d = tidy(() => got.sub(want).abs().amax().item());
        assert.ok(d < 1e-4, `max |Δlogits| ${d}`);
        using base = logits(model);
        assert.ok(tidy(() => base.sub(want).abs().amax().item()) > 1e-3, "the adapter mattered");
        for (const f of ["config.json", "generation_config.json"]) await Deno.stat(join(dir, f));
        // Never over a model: not its own folder, not a folder that holds weights already.
        const before = await Deno.readFile(join(dir, "model.safetensors"));
        await assert.rejects(() => saveModel(reloaded, dir), /is the folder the model was loaded from/);
        await assert.rejects(() => saveModel(model, dir), /already holds a model \(model\.safetensors\)/);
        assert.deepEqual(await Deno.readFile(join(dir, "model.safetensors")), before);
      }
      assert.equal(liveTensors(), live);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("saveModel: a tied LM head keeps its own bias (PhiMoE's lm_head_bias), as transformers does", async () => {
  const raw = JSON.parse(await Deno.readTextFile(join(MODELS, "phimoe-tiny", "config.json")));
  const config = parseConfig({ ...raw, tie_word_embeddings: true, lm_head_bias: true }, "tied/config.json");
  const dir = await Deno.makeTempDir({ prefix: "moerl_save_tied_" });
  try {
    manualSeed(3);
    using model = await randomModel(config);
    assert.ok((model.decoder.lmHead as Linear).bias, "the random model has its bias");
    await saveModel(model, dir);
    await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify({ ...raw, tie_word_embeddings: true }));
    const names = await SafetensorsFile.open(join(dir, "model.safetensors"));
    assert.ok(names.names().includes("lm_head.bias") && !names.names().includes("lm_head.weight"));
    names.close();
    using again = await loadModel(dir);
    using a = logits(model), b = logits(again);
    assert.ok(tidy(() => a.sub(b).abs().amax().item()) < 1e-6);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("saveModel: the weights land last, so a save cut short holds no model and can be made again", async () => {
  const dir = await Deno.makeTempDir({ prefix: "moerl_save_cut_" });
  try {
    using model = await loadModel(join(MODELS, "qwen3-moe-tiny"));
    // A copy that fails partway (here: a folder where tokenizer.json goes) stands in for a crash.
    await Deno.mkdir(join(dir, "tokenizer.json"));
    await assert.rejects(() => saveModel(model, dir));
    await assert.rejects(() => Deno.stat(join(dir, "model.safetensors")), Deno.errors.NotFound);
    await Deno.remove(join(dir, "tokenizer.json"));
    await saveModel(model, dir); // not refused as "already holds a model"
    using again = await loadModel(dir);
    using a = logits(model), b = logits(again);
    assert.ok(tidy(() => a.sub(b).abs().amax().item()) < 1e-6);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
