/**
 * Writing a model back to a Hugging Face folder: the current weights (with
 * any merged LoRA update) under the checkpoint's own names and expert layout,
 * plus the config, generation config and tokenizer files copied from the
 * folder it was loaded from. Used to keep a supervised warm-up as a new base.
 * @module
 */
import { join } from "node:path";
import { type Tensor, tidy } from "../ffi/mod.ts";
import { INDEX_FILE, SINGLE_FILE } from "./checkpoint.ts";
import { MODEL_FILES } from "./hub.ts";
import { isFile } from "./json.ts";
import { LayerNorm, Linear, type LinearLayer, type Norm, RmsNorm } from "./layers.ts";
import { LoraExperts } from "./lora_experts.ts";
import { LoraLinear } from "./lora.ts";
import type { CausalLM } from "./model.ts";
import { type ExpertBank, StackedExperts } from "./moe.ts";
import { expertSlots, linearSlots } from "./modules.ts";
import { writeSafetensors } from "./safetensors_write.ts";

function dense(l: LinearLayer, name: string): Linear {
  const base = l instanceof LoraLinear ? l.base : l;
  if (l instanceof LoraLinear && !l.merged) {
    throw new Error(`saveModel: ${name} has an unmerged adapter; merge first`);
  }
  if (!(base instanceof Linear)) throw new Error(`saveModel: ${name} is not a full-precision layer`);
  return base;
}

function stacked(b: ExpertBank, name: string): StackedExperts {
  const base = b instanceof LoraExperts ? b.base : b;
  if (b instanceof LoraExperts && !b.merged) {
    throw new Error(`saveModel: ${name} has unmerged adapters; merge first`);
  }
  if (!(base instanceof StackedExperts)) throw new Error(`saveModel: ${name} is not full-precision experts`);
  return base;
}

function norm(n: Norm, name: string, out: Record<string, Tensor>): void {
  if (n instanceof RmsNorm) out[`${name}.weight`] = n.weight;
  else if (n instanceof LayerNorm) {
    Object.assign(out, { [`${name}.weight`]: n.weight, [`${name}.bias`]: n.bias });
  } else throw new Error(`saveModel: unknown norm at ${name}`);
}

/** The real path of dir, or null when it does not exist. */
async function realDir(dir: string): Promise<string | null> {
  try {
    return await Deno.realPath(dir);
  } catch {
    return null;
  }
}

/** The weights file dir holds, when it holds a model's ("model.safetensors" or a sharded index), else null. */
export async function modelWeightsIn(dir: string): Promise<string | null> {
  for (const f of [SINGLE_FILE, INDEX_FILE]) {
    if (await isFile(join(dir, f))) return f;
  }
  return null;
}

/**
 * Writes model's weights and metadata files to dir (new, or without a model in it).
 * @throws {Error} before writing anything, when dir is the folder the model was loaded from or already holds
 *   a model's weights (a sharded index there would keep pointing at the old shards)
 */
export async function saveModel(model: CausalLM, dir: string): Promise<void> {
  const real = await realDir(dir);
  if (real !== null && model.dir && real === await realDir(model.dir)) {
    throw new Error(`saveModel: ${dir} is the folder the model was loaded from: write to a new folder`);
  }
  const held = await modelWeightsIn(dir);
  if (held) throw new Error(`saveModel: ${dir} already holds a model (${held}): write to a new folder`);
  const dec = model.decoder;
  const owned: Tensor[] = []; // views made for the per-expert layout
  const out: Record<string, Tensor> = { "model.embed_tokens.weight": dec.embed };
  try {
    for (const slot of linearSlots(dec)) {
      const l = dense(slot.get(), slot.name);
      // A tied head's weight is the embedding, stored once; its bias (PhiMoE's lm_head_bias) is its own.
      if (!(slot.name === "lm_head" && model.config.tieWordEmbeddings)) out[`${slot.name}.weight`] = l.weight;
      if (l.bias) out[`${slot.name}.bias`] = l.bias;
    }
    for (const layer of dec.layers) {
      norm(layer.inputNorm, `${layer.name}.input_layernorm`, out);
      norm(layer.postNorm, `${layer.name}.post_attention_layernorm`, out);
      if (layer.attn.qNorm) norm(layer.attn.qNorm, `${layer.name}.self_attn.q_norm`, out);
      if (layer.attn.kNorm) norm(layer.attn.kNorm, `${layer.name}.self_attn.k_norm`, out);
    }
    norm(dec.finalNorm, "model.norm", out);
    for (const slot of expertSlots(dec)) {
      const b = stacked(slot.get(), slot.name), n = b.names;
      if (n.layout === "fused") {
        out[`${n.prefix}.gate_up_proj`] = b.gateUpWeight;
        out[`${n.prefix}.down_proj`] = b.downWeight;
        continue;
      }
      const i = b.gateUpWeight.size(1) / 2;
      for (let e = 0; e < b.count; e++) {
        const [g, u, d] = tidy(() => {
          const gu = b.gateUpWeight.select(0, e);
          return [gu.narrow(0, 0, i), gu.narrow(0, i, i), b.downWeight.select(0, e)];
        });
        owned.push(g, u, d);
        out[`${n.prefix}.${e}.${n.gate}.weight`] = g;
        out[`${n.prefix}.${e}.${n.up}.weight`] = u;
        out[`${n.prefix}.${e}.${n.down}.weight`] = d;
      }
    }
    await Deno.mkdir(dir, { recursive: true });
    // The weights last, written atomically: a folder holds them only once it is whole, so a save cut short
    // is saved again into the same folder rather than refused as "already holds a model".
    for (const f of MODEL_FILES) {
      if (model.dir && await isFile(join(model.dir, f))) {
        await Deno.copyFile(join(model.dir, f), join(dir, f));
      }
    }
    await writeSafetensors(join(dir, SINGLE_FILE), out, { format: "pt" });
  } finally {
    for (const t of owned) t.dispose();
  }
}
