/**
 * LoRA adapters in PEFT's format: `adapter_config.json` and
 * `adapter_model.safetensors` with PEFT's key names
 * (`base_model.model.<module>.lora_{A,B}.weight`), so Python's
 * `PeftModel.from_pretrained` loads ours and we load theirs.
 *
 * Experts follow PEFT 0.21 on transformers v5, whose experts are 3-D
 * parameters targeted with `target_parameters`: per projection one A
 * [r·E, in] (rows expert-major) and B [out, r·E] (column j·E + e for expert
 * e, rank j). When both are targeted the gate/up adapter is nested as
 * `experts.base_layer.lora_*` and the down adapter is `experts.lora_*`. The
 * older per-expert form (`experts.<e>.gate_proj.lora_*`, transformers 4.x)
 * is read and written too ("split" adapters).
 * @module
 */
import { join } from "node:path";
import { noGrad, type Tensor, tidy } from "../ffi/mod.ts";
import type { MoeConfig } from "./config.ts";
import { isFile } from "./json.ts";
import type { LoraExperts } from "./lora_experts.ts";
import { type LoraConfig, LoraModel } from "./lora_apply.ts";
import type { CausalLM } from "./model.ts";
import { writeAtomic } from "./atomic_write.ts";
import { SafetensorsFile } from "./safetensors.ts";
import { writeSafetensors } from "./safetensors_write.ts";

/** PEFT's file names. */
export const ADAPTER_CONFIG = "adapter_config.json";
/** See {@link ADAPTER_CONFIG}. */
export const ADAPTER_WEIGHTS = "adapter_model.safetensors";
const PREFIX = "base_model.model.";

/** Our module name as transformers v5 names it (PhiMoE's block_sparse_moe became mlp, its gate the router). */
function v5Name(name: string, cfg: MoeConfig): string {
  if (cfg.modelType !== "phimoe") return name;
  return name.replace(".block_sparse_moe.", ".mlp.").replace(/\.mlp\.gate$/, ".mlp.router");
}

/** PEFT's [r·E, in] / [out, r·E] from our [E, r, in] / [E, out, r]. */
function toPeft(A: Tensor, B: Tensor): [Tensor, Tensor] {
  const [e, r, inp] = A.shape as [number, number, number];
  const out = B.size(1);
  return tidy(() => [A.detach().reshape([e * r, inp]), B.detach().permute([1, 2, 0]).reshape([out, r * e])]);
}

/** Ours from PEFT's (the inverse of {@link toPeft}). */
function fromPeft(A: Tensor, B: Tensor, experts: number): [Tensor, Tensor] {
  const [re, inp] = A.shape as [number, number];
  const r = re / experts;
  return [A.reshape([experts, r, inp]), B.reshape([B.size(0), r, experts]).permute([2, 0, 1])];
}

/** Writes lora's adapters in PEFT's format to dir (files written atomically). */
export async function savePeftAdapter(
  lora: LoraModel,
  cfg: MoeConfig,
  dir: string,
  baseModel = "",
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const tensors: Record<string, Tensor> = {};
  const targetModules = new Set<string>(), targetParameters = new Set<string>();
  {
    for (const [name, l] of lora.linears) {
      const leaf = name.slice(name.lastIndexOf(".") + 1);
      const dense = /\.mlp\.(gate|up|down)_proj$/.test(name);
      // PEFT rewrites gate/up/down_proj in target_modules into expert targets on v5 MoE models;
      // as parameters they keep plain nn.Linear LoRA semantics and key names.
      if (dense) targetParameters.add(`mlp.${leaf}.weight`);
      else targetModules.add(leaf);
      tensors[`${PREFIX}${v5Name(name, cfg)}.lora_A.weight`] = l.A.detach();
      tensors[`${PREFIX}${v5Name(name, cfg)}.lora_B.weight`] = l.B.detach();
    }
    for (const [name, ex] of lora.experts) {
      writeExperts(ex, name, cfg, tensors, targetModules, targetParameters);
    }
  }
  const config = {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: baseModel,
    r: lora.config.r,
    lora_alpha: lora.config.alpha,
    lora_dropout: lora.config.dropout,
    target_modules: [...targetModules].sort(),
    target_parameters: targetParameters.size ? [...targetParameters].sort() : null,
    bias: "none",
    fan_in_fan_out: false,
    use_rslora: false,
    use_dora: false,
    lora_bias: false,
    init_lora_weights: true,
    inference_mode: true,
    modules_to_save: null,
    rank_pattern: {},
    alpha_pattern: {},
    layers_to_transform: null,
    layers_pattern: null,
    revision: null,
  };
  try {
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS), tensors, { format: "pt" });
  } finally {
    for (const t of Object.values(tensors)) t.dispose();
  }
  await writeAtomic(join(dir, ADAPTER_CONFIG), JSON.stringify(config, null, 2) + "\n");
}

function writeExperts(
  ex: LoraExperts,
  name: string,
  cfg: MoeConfig,
  out: Record<string, Tensor>,
  targetModules: Set<string>,
  targetParameters: Set<string>,
): void {
  const n = ex.names;
  if (ex.form === "fused") {
    const mod = `${PREFIX}${v5Name(name, cfg)}`;
    const [gA, gB] = toPeft(ex.gateUpAdapters[0]!.A, ex.gateUpAdapters[0]!.B);
    const [dA, dB] = toPeft(ex.downAdapter.A, ex.downAdapter.B);
    Object.assign(out, {
      [`${mod}.base_layer.lora_A.weight`]: gA,
      [`${mod}.base_layer.lora_B.weight`]: gB,
      [`${mod}.lora_A.weight`]: dA,
      [`${mod}.lora_B.weight`]: dB,
    });
    targetParameters.add("mlp.experts.gate_up_proj").add("mlp.experts.down_proj");
    return;
  }
  const parts: [string, { A: Tensor; B: Tensor }][] = [
    [n.gate, ex.gateUpAdapters[0]!],
    [n.up, ex.gateUpAdapters[1]!],
    [n.down, ex.downAdapter],
  ];
  for (const [leaf, ad] of parts) {
    targetModules.add(leaf);
    for (let e = 0; e < ex.count; e++) {
      out[`${PREFIX}${name}.${e}.${leaf}.lora_A.weight`] = tidy(() => ad.A.detach().select(0, e));
      out[`${PREFIX}${name}.${e}.${leaf}.lora_B.weight`] = tidy(() => ad.B.detach().select(0, e));
    }
  }
}

/**
 * Loads a PEFT LoRA adapter from dir onto model, returning its adapters.
 * @throws {Error} naming the file and key for unsupported options (DoRA, rsLoRA,
 *   rank/alpha patterns), keys that match no module, missing or mis-shaped tensors.
 */
export async function loadPeftAdapter(dir: string, model: CausalLM): Promise<LoraModel> {
  const cfgPath = join(dir, ADAPTER_CONFIG), wPath = join(dir, ADAPTER_WEIGHTS);
  if (!(await isFile(cfgPath))) throw new Error(`${dir}: no ${ADAPTER_CONFIG} (not a PEFT adapter folder)`);
  const pc = JSON.parse(await Deno.readTextFile(cfgPath)) as Record<string, unknown>;
  if (pc.peft_type !== "LORA") {
    throw new Error(`${cfgPath}: peft_type ${JSON.stringify(pc.peft_type)}, only LORA is supported`);
  }
  for (const k of ["use_dora", "use_rslora", "fan_in_fan_out"]) {
    if (pc[k]) throw new Error(`${cfgPath}: ${k} is not supported`);
  }
  for (const k of ["rank_pattern", "alpha_pattern"]) {
    if (pc[k] && Object.keys(pc[k] as object).length) throw new Error(`${cfgPath}: ${k} is not supported`);
  }
  const f = await SafetensorsFile.open(wPath);
  try {
    const plan = planLoad(f.names(), model, wPath);
    const config: LoraConfig = {
      r: Number(pc.r),
      alpha: Number(pc.lora_alpha),
      dropout: Number(pc.lora_dropout ?? 0),
      targetModules: plan.linears.map((l) => l.name),
      targetExperts: plan.experts.length > 0,
      expertForm: plan.split ? "split" : "fused",
    };
    const lora = new LoraModel(model.decoder, model.config, config);
    try {
      await copyWeights(f, plan, lora, model.config, wPath);
    } catch (e) {
      lora.dispose();
      throw e;
    }
    return lora;
  } finally {
    f.close();
  }
}

interface LoadPlan {
  linears: { name: string; key: string }[];
  experts: string[];
  split: boolean;
}

/** Maps every key to one of the model's modules, or throws naming the key. */
function planLoad(keys: string[], model: CausalLM, file: string): LoadPlan {
  const cfg = model.config, dec = model.decoder;
  const linearByV5 = new Map<string, string>();
  const expertByV5 = new Map<string, string>();
  for (const l of dec.layers) {
    for (const k of ["q", "k", "v", "o"]) {
      linearByV5.set(`${l.name}.self_attn.${k}_proj`, `${l.name}.self_attn.${k}_proj`);
    }
    if (l.mlp.kind === "dense") {
      for (const k of ["gate", "up", "down"]) {
        linearByV5.set(`${l.name}.mlp.${k}_proj`, `${l.name}.${l.mlpName}.${k}_proj`);
      }
    } else {
      linearByV5.set(v5Name(l.mlp.routerName, cfg), l.mlp.routerName);
      linearByV5.set(l.mlp.routerName, l.mlp.routerName);
      expertByV5.set(v5Name(l.mlp.experts.names.prefix, cfg), l.mlp.experts.names.prefix);
      expertByV5.set(l.mlp.experts.names.prefix, l.mlp.experts.names.prefix);
    }
  }
  const plan: LoadPlan = { linears: [], experts: [], split: false };
  const seen = new Set<string>();
  for (const key of keys) {
    const m = /^base_model\.model\.(.+)\.lora_([AB])\.weight$/.exec(key);
    if (!m) throw new Error(`${file}: unexpected key "${key}" (not a LoRA A/B weight)`);
    const mod = m[1]!;
    const split = /^(.+)\.(\d+)\.[^.]+$/.exec(mod);
    const fusedMod = mod.replace(/\.base_layer$/, "");
    if (linearByV5.has(mod)) {
      const name = linearByV5.get(mod)!;
      if (!seen.has(name)) plan.linears.push({ name, key: `${PREFIX}${mod}` });
      seen.add(name);
    } else if (expertByV5.has(fusedMod)) {
      const name = expertByV5.get(fusedMod)!;
      if (!seen.has(name)) plan.experts.push(name);
      seen.add(name);
    } else if (split && expertByV5.has(split[1]!)) {
      const name = expertByV5.get(split[1]!)!;
      if (!seen.has(name)) plan.experts.push(name);
      seen.add(name);
      plan.split = true;
    } else {
      throw new Error(`${file}: key "${key}" matches no module of this ${cfg.modelType} model`);
    }
  }
  return plan;
}

async function copyWeights(
  f: SafetensorsFile,
  plan: LoadPlan,
  lora: LoraModel,
  cfg: MoeConfig,
  file: string,
): Promise<void> {
  const device = lora.parameters()[0]!.device, dtype = lora.parameters()[0]!.dtype;
  const read = async (key: string): Promise<Tensor> => {
    if (!f.has(key)) throw new Error(`${file}: missing tensor "${key}"`);
    return await f.load(key, { device, dtype });
  };
  const put = (dst: Tensor, src: Tensor, key: string): void => {
    const [a, b] = [dst.shape, src.shape];
    if (a.length !== b.length || a.some((s, i) => s !== b[i])) {
      throw new Error(`${file}: "${key}" has shape [${b.join(", ")}], the adapter needs [${a.join(", ")}]`);
    }
    noGrad(() => dst.copy_(src));
  };
  for (const { name, key } of plan.linears) {
    const l = lora.linears.get(name)!;
    using A = await read(`${key}.lora_A.weight`);
    using B = await read(`${key}.lora_B.weight`);
    put(l.A, A, `${key}.lora_A.weight`);
    put(l.B, B, `${key}.lora_B.weight`);
  }
  for (const name of plan.experts) {
    const ex = lora.experts.get(name)!;
    if (ex.form === "fused") {
      const mod = `${PREFIX}${v5Name(name, cfg)}`;
      const pairs: [string, { A: Tensor; B: Tensor }][] = [[`${mod}.base_layer`, ex.gateUpAdapters[0]!], [
        mod,
        ex.downAdapter,
      ]];
      for (const [k, ad] of pairs) {
        using A = await read(`${k}.lora_A.weight`);
        using B = await read(`${k}.lora_B.weight`);
        tidy(() => {
          const [a, b] = fromPeft(A, B, ex.count);
          put(ad.A, a, `${k}.lora_A.weight`);
          put(ad.B, b, `${k}.lora_B.weight`);
        });
      }
      continue;
    }
    const n = ex.names;
    const parts: [string, { A: Tensor; B: Tensor }][] = [[n.gate, ex.gateUpAdapters[0]!], [
      n.up,
      ex.gateUpAdapters[1]!,
    ], [n.down, ex.downAdapter]];
    for (const [leaf, ad] of parts) {
      for (let e = 0; e < ex.count; e++) {
        const k = `${PREFIX}${name}.${e}.${leaf}`;
        using A = await read(`${k}.lora_A.weight`);
        using B = await read(`${k}.lora_B.weight`);
        tidy(() => {
          put(ad.A.select(0, e), A, `${k}.lora_A.weight`);
          put(ad.B.select(0, e), B, `${k}.lora_B.weight`);
        });
      }
    }
  }
}
