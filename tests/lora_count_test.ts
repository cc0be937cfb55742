/**
 * Trainable LoRA parameters for the two target models at r = 16, from their
 * configs alone (bench/shapes/*.json), against counts worked out by hand:
 *
 * Huihui-MoE-1B-A0.6B (28 layers, H 1024, 16×128 query heads, 8×128 KV heads,
 * 3 experts of width 3072): attention per layer r·[(1024+2048) + 2·(1024+1024)
 * + (2048+1024)] = 163,840; experts per layer 3 · r·[(1024+2·3072) + (3072+1024)]
 * = 540,672. Phi-tiny-MoE (32 layers, H 4096, 16×128 / 4×128 heads, 16 experts
 * of width 448): attention r·[(4096+2048) + 2·(4096+512) + (2048+4096)] = 344,064;
 * experts 16 · r·[(4096+896) + (448+4096)] = 2,441,216.
 */
import assert from "node:assert/strict";
import { parseConfig } from "../model/config.ts";
import { DEFAULT_LORA, loraParamCount } from "../model/lora_apply.ts";

const shapes = (name: string) =>
  parseConfig(
    JSON.parse(Deno.readTextFileSync(new URL(`../bench/shapes/${name}.json`, import.meta.url))),
    name,
  );

Deno.test("lora: trainable parameters of the real configs at r = 16", () => {
  const huihui = loraParamCount(shapes("huihui-moe-1b-a0.6b"), DEFAULT_LORA);
  assert.deepEqual(huihui, { linear: 28 * 163_840, experts: 28 * 540_672, total: 28 * (163_840 + 540_672) });
  const phi = loraParamCount(shapes("phi-tiny-moe"), DEFAULT_LORA);
  assert.deepEqual(phi, { linear: 32 * 344_064, experts: 32 * 2_441_216, total: 32 * (344_064 + 2_441_216) });
  // Share of the full models (1,280,200,704 and 3,755,220,288 parameters, from the models' configs).
  console.log(
    `  Huihui-MoE-1B-A0.6B: ${huihui.total} trainable (${(100 * huihui.total / 1_280_200_704).toFixed(2)}%)`,
  );
  console.log(
    `  Phi-tiny-MoE:        ${phi.total} trainable (${(100 * phi.total / 3_755_220_288).toFixed(2)}%)`,
  );
  const attnOnly = loraParamCount(shapes("huihui-moe-1b-a0.6b"), { ...DEFAULT_LORA, targetExperts: false });
  assert.equal(attnOnly.total, 28 * 163_840);
});
