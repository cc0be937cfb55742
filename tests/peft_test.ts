/**
 * PEFT compatibility (fixtures from scripts/make_peft_fixtures.py, PEFT 0.21 on
 * transformers 5): loading PEFT-saved adapters reproduces PEFT's logits, with
 * adapters on, off and merged; our saved adapters have PEFT's keys and
 * shapes, reload to the same logits, and — when a Python with peft is at hand
 * (MOERL_TEST_PYTHON) — load into PEFT with the same logits.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors, manualSeed, noGrad, randn, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import { LoraModel } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { loadPeftAdapter, savePeftAdapter } from "../model/peft.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { writeSafetensors } from "../model/safetensors_write.ts";
import type { CausalLM } from "../model/model.ts";
import { PYTHON, pythonHas } from "./util.ts";

const FX = join(import.meta.dirname!, "fixtures");
const hasPeft = pythonHas("peft", "transformers");

interface Batch {
  ids: Tensor;
  mask: Tensor;
  pos: Tensor;
}

async function readAll(path: string): Promise<Record<string, Tensor>> {
  const f = await SafetensorsFile.open(path);
  try {
    const out: Record<string, Tensor> = {};
    for (const n of f.names()) out[n] = await f.load(n);
    return out;
  } finally {
    f.close();
  }
}

function logits(model: CausalLM, b: Batch): Tensor {
  return noGrad(() =>
    tidy(() => model.decoder.forward({ inputIds: b.ids, positionIds: b.pos, attentionMask: b.mask }).logits!)
  );
}

/** Max |a − b| over real (unpadded) positions. */
function maxDiff(a: Tensor, b: Tensor, mask: Tensor): number {
  return tidy(() => a.sub(b).abs().maskedFill(mask.eq(0).unsqueeze(-1), 0).amax().item());
}

for (const name of ["qwen3-moe-tiny", "qwen3-moe-fused", "phimoe-tiny", "qwen3-moe-fused-v4-per-expert"]) {
  Deno.test(`peft: ${name}`, async (t) => {
    const live = liveTensors();
    const meta = JSON.parse(await Deno.readTextFile(join(FX, "peft", `${name}.json`))) as {
      model_dir: string;
    };
    const rec = await readAll(join(FX, "peft", `${name}.safetensors`));
    const b = { ids: rec.input_ids!, mask: rec.attention_mask!, pos: rec.position_ids! };
    {
      using model = await loadModel(join(FX, meta.model_dir));
      const lora = await loadPeftAdapter(join(FX, "peft", name), model);

      await t.step("PEFT's adapter gives PEFT's logits", () => {
        using ours = logits(model, b);
        const d = maxDiff(ours, rec.logits!, b.mask);
        assert.ok(d < 1e-4, `max |Δlogits| ${d}`);
        assert.equal(lora.experts.size > 0, true, "the experts carry adapters");
      });

      if (rec.logits_base) {
        await t.step("adapters off give the base model's logits", () => {
          lora.state.enabled = false;
          using off = logits(model, b);
          lora.state.enabled = true;
          assert.ok(maxDiff(off, rec.logits_base!, b.mask) < 1e-4);
        });
        await t.step("merged adapters give PEFT's merge_and_unload logits", () => {
          lora.merge();
          using merged = logits(model, b);
          lora.unmerge();
          assert.ok(maxDiff(merged, rec.logits_merged!, b.mask) < 1e-4);
        });
      }

      await t.step(
        "our saved adapter has PEFT's keys and shapes and reloads to the same logits",
        async () => {
          const dir = await Deno.makeTempDir({ prefix: "moerl_peft_" });
          try {
            await savePeftAdapter(lora, model.config, dir, meta.model_dir);
            const theirs = await SafetensorsFile.open(join(FX, "peft", name, "adapter_model.safetensors"));
            const ours = await SafetensorsFile.open(join(dir, "adapter_model.safetensors"));
            const shapes = (f: SafetensorsFile): string[] =>
              f.names().map((n) => `${n} [${f.info(n).shape.join(",")}]`);
            assert.deepEqual(shapes(ours), shapes(theirs));
            theirs.close();
            ours.close();
            { // the saved copy on a fresh copy of the base model (a model takes one set of adapters)
              using fresh = await loadModel(join(FX, meta.model_dir));
              const again = await loadPeftAdapter(dir, fresh);
              using reloaded = logits(fresh, b);
              assert.ok(maxDiff(reloaded, rec.logits!, b.mask) < 1e-4);
              again.dispose();
            }

            if (hasPeft) {
              const batch = join(dir, "batch.safetensors"), out = join(dir, "peft_logits.safetensors");
              await writeSafetensors(batch, {
                input_ids: b.ids,
                attention_mask: b.mask,
                position_ids: b.pos,
              });
              const script = join(import.meta.dirname!, "..", "scripts", "make_peft_fixtures.py");
              const r = await new Deno.Command(PYTHON, {
                args: [script, "--check", join(FX, meta.model_dir), dir, batch, out],
                stdout: "piped",
                stderr: "piped",
              }).output();
              assert.ok(r.success, new TextDecoder().decode(r.stderr));
              const py = await readAll(out);
              assert.ok(
                maxDiff(py.logits!, rec.logits!, b.mask) < 1e-4,
                "PEFT loads our adapter to the same logits",
              );
              Object.values(py).forEach((x) => x.dispose());
            }
          } finally {
            await Deno.remove(dir, { recursive: true });
          }
        },
      );
      lora.dispose();
    }
    Object.values(rec).forEach((x) => x.dispose());
    assert.equal(liveTensors(), live, "nothing leaked");
  });
}

Deno.test("peft: bad adapters are rejected with the file and key named", async () => {
  using model = await loadModel(join(FX, "models", "qwen3-moe-tiny"));
  const dir = await Deno.makeTempDir({ prefix: "moerl_peft_bad_" });
  try {
    await assert.rejects(() => loadPeftAdapter(dir, model), /no adapter_config\.json/);
    const src = join(FX, "peft", "qwen3-moe-tiny");
    const cfg = JSON.parse(await Deno.readTextFile(join(src, "adapter_config.json")));
    await Deno.writeTextFile(join(dir, "adapter_config.json"), JSON.stringify({ ...cfg, use_dora: true }));
    await Deno.copyFile(join(src, "adapter_model.safetensors"), join(dir, "adapter_model.safetensors"));
    await assert.rejects(() => loadPeftAdapter(dir, model), /use_dora is not supported/);
    // an adapter for another model: phimoe keys do not exist in qwen3-moe-tiny
    await Deno.writeTextFile(join(dir, "adapter_config.json"), JSON.stringify(cfg));
    await Deno.copyFile(
      join(FX, "peft", "phimoe-tiny", "adapter_model.safetensors"),
      join(dir, "adapter_model.safetensors"),
    );
    await assert.rejects(() => loadPeftAdapter(dir, model), /has shape|matches no module/);
    // adapter_config.json itself: named when it is not JSON, not an object, or r is not a number.
    const cfgFile = join(dir, "adapter_config.json");
    for (
      const [text, reason] of [
        ["{", /adapter_config\.json is not valid JSON/],
        ["null", /adapter_config\.json must hold a JSON object/],
        [JSON.stringify({ ...cfg, r: "4" }), /adapter_config\.json: r must be an integer ≥ 1, got "4"/],
        [JSON.stringify({ ...cfg, r: 0 }), /adapter_config\.json: r must be an integer ≥ 1, got 0/],
        [
          JSON.stringify({ ...cfg, lora_dropout: 1 }),
          /adapter_config\.json: lora_dropout must be a number in \[0, 1\)/,
        ],
      ] as const
    ) {
      await Deno.writeTextFile(cfgFile, text);
      await assert.rejects(() => loadPeftAdapter(dir, model), reason);
    }
    // A weights file without a LoRA tensor is named as such (it read as "target_modules [] matched no module").
    await Deno.writeTextFile(cfgFile, JSON.stringify(cfg));
    await writeSafetensors(join(dir, "adapter_model.safetensors"), {});
    await assert.rejects(
      () => loadPeftAdapter(dir, model),
      /adapter_model\.safetensors: holds no LoRA weights/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("peft: an adapter of the experts alone saves and loads back", async () => {
  using model = await loadModel(join(FX, "models", "qwen3-moe-fused"));
  manualSeed(5);
  const cfg = { r: 4, alpha: 8, dropout: 0, targetModules: [], targetExperts: true };
  const lora = new LoraModel(model.decoder, model.config, cfg);
  noGrad(() => lora.parameters().forEach((p) => tidy(() => p.copy_(randn(p.shape).mul(0.3)))));
  const [ids, pos, mask] = [[[3, 4, 5, 6]], [[0, 1, 2, 3]], [[1, 1, 1, 1]]].map((x) =>
    tensor(x, { dtype: "int64" })
  );
  const forward = (): Tensor =>
    noGrad(() =>
      tidy(() => model.decoder.forward({ inputIds: ids!, positionIds: pos!, attentionMask: mask! }).logits!)
    );
  const dir = await Deno.makeTempDir({ prefix: "moerl_peft_experts_" });
  try {
    using want = forward();
    await savePeftAdapter(lora, model.config, dir, "qwen3-moe-fused");
    lora.dispose(); // the model as it was
    const again = await loadPeftAdapter(dir, model);
    assert.equal(again.linears.size, 0);
    assert.ok(again.experts.size > 0);
    using got = forward();
    assert.ok(maxDiff(got, want, mask!) < 1e-6);
    again.dispose();
  } finally {
    [ids, pos, mask].forEach((x) => x!.dispose());
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("peft: experts adapted in one of their two parameters are refused, saying so", async () => {
  using model = await loadModel(join(FX, "models", "qwen3-moe-fused"));
  const src = join(FX, "peft", "qwen3-moe-fused");
  const dir = await Deno.makeTempDir({ prefix: "moerl_peft_half_" });
  const f = await SafetensorsFile.open(join(src, "adapter_model.safetensors"));
  try {
    // Only the outer level: PEFT's layout when target_parameters names one expert parameter.
    const kept: Record<string, Tensor> = {};
    for (const n of f.names().filter((n) => !n.includes(".experts.base_layer."))) kept[n] = await f.load(n);
    await writeSafetensors(join(dir, "adapter_model.safetensors"), kept);
    Object.values(kept).forEach((t) => t.dispose());
    await Deno.copyFile(join(src, "adapter_config.json"), join(dir, "adapter_config.json"));
    await assert.rejects(
      () => loadPeftAdapter(dir, model),
      /model\.layers\.0\.mlp\.experts is adapted in one of its two expert parameters only/,
    );
  } finally {
    f.close();
    await Deno.remove(dir, { recursive: true });
  }
});
