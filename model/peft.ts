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
import { type Tensor, tidy } from "../ffi/mod.ts";
import type { MoeConfig } from "./config.ts";
import { isFile, readJsonObject } from "./json.ts";
import { LORA_CHECKS, type LoraConfig, LoraModel } from "./lora_apply.ts";
import type { Check } from "./settings.ts";
import type { CausalLM } from "./model.ts";
import { writeAtomic } from "./atomic_write.ts";
import { SafetensorsFile } from "./safetensors.ts";
import { applyEntries, checkEntries, likeTensor, type RestoreEntry, wholeEntry } from "./safetensors_copy.ts";
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

/** One adapter tensor under PEFT's key and layout: how to read it out and copy it back in. */
export interface AdapterEntry extends RestoreEntry {
  /** Our tensor in PEFT's layout (a new tensor, detached). */
  read(): Tensor;
  /** What adapter_config.json lists it under: a target module (leaf name) or a target parameter. */
  target: { kind: "module" | "parameter"; name: string };
}

/**
 * Every tensor of lora's adapters under PEFT's key names and layouts: the
 * one walk of the adapter layout, used to save, load and restore.
 * - Linears as they are, named as transformers v5 names the module (their
 *   4.x name accepted when loading). Dense MLP projections are listed as
 *   target parameters (PEFT rewrites gate/up/down_proj target modules into
 *   expert targets on v5 MoE models).
 * - Fused experts: A [r·E, in] (rows expert-major) and B [out, r·E]
 *   (column j·E + e for expert e, rank j); the gate/up adapter is nested as
 *   `experts.base_layer`.
 * - Split experts (PEFT on transformers 4.x): one module per expert.
 */
export function adapterEntries(lora: LoraModel, cfg: MoeConfig): AdapterEntry[] {
  const out: AdapterEntry[] = [];
  const key = (mod: string, ab: "A" | "B"): string => `${PREFIX}${mod}.lora_${ab}.weight`;
  const whole = (k: string, legacy: string, dst: Tensor, target: AdapterEntry["target"]): AdapterEntry => ({
    ...wholeEntry(k, dst),
    ...(legacy === k ? {} : { legacyKey: legacy }),
    read: () => dst.detach(),
    target,
  });
  for (const [name, l] of lora.linears) {
    const hf = v5Name(name, cfg), leaf = hf.slice(hf.lastIndexOf(".") + 1); // the module PEFT will look for
    const target = /\.mlp\.(gate|up|down)_proj$/.test(name)
      ? { kind: "parameter" as const, name: `mlp.${leaf}.weight` }
      : { kind: "module" as const, name: leaf };
    for (const ab of ["A", "B"] as const) {
      out.push(whole(key(v5Name(name, cfg), ab), key(name, ab), ab === "A" ? l.A : l.B, target));
    }
  }
  for (const [name, ex] of lora.experts) {
    if (ex.form === "fused") {
      const mod = v5Name(name, cfg);
      const pairs: [string, { A: Tensor; B: Tensor }, string][] = [
        [`${mod}.base_layer`, ex.gateUpAdapters[0]!, "mlp.experts.gate_up_proj"],
        [mod, ex.downAdapter, "mlp.experts.down_proj"],
      ];
      for (const [m, ad, param] of pairs) {
        const [e, r, inp] = ad.A.shape as [number, number, number];
        const size = ad.B.size(1);
        const target = { kind: "parameter" as const, name: param };
        out.push({
          key: key(m, "A"),
          shape: [e * r, inp],
          like: likeTensor(ad.A),
          read: () => tidy(() => ad.A.detach().reshape([e * r, inp])),
          assign: (src) => void ad.A.copy_(src.reshape([e, r, inp])),
          target,
        });
        out.push({
          key: key(m, "B"),
          shape: [size, r * e],
          like: likeTensor(ad.B),
          read: () => tidy(() => ad.B.detach().permute([1, 2, 0]).reshape([size, r * e])),
          assign: (src) => void ad.B.copy_(src.reshape([size, r, e]).permute([2, 0, 1])),
          target,
        });
      }
      continue;
    }
    const n = ex.names;
    const parts: [string, { A: Tensor; B: Tensor }][] = [
      [n.gate, ex.gateUpAdapters[0]!],
      [n.up, ex.gateUpAdapters[1]!],
      [n.down, ex.downAdapter],
    ];
    for (const [leaf, ad] of parts) {
      const target = { kind: "module" as const, name: leaf };
      for (let e = 0; e < ex.count; e++) {
        for (const ab of ["A", "B"] as const) {
          const t = ab === "A" ? ad.A : ad.B;
          out.push({
            key: key(`${name}.${e}.${leaf}`, ab),
            shape: t.shape.slice(1),
            like: likeTensor(t),
            read: () => tidy(() => t.detach().select(0, e)),
            assign: (src) => void t.select(0, e).copy_(src),
            target,
          });
        }
      }
    }
  }
  return out;
}

/** Writes lora's adapters in PEFT's format to dir (files written atomically). */
export async function savePeftAdapter(
  lora: LoraModel,
  cfg: MoeConfig,
  dir: string,
  baseModel = "",
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const entries = adapterEntries(lora, cfg);
  const targets = (kind: "module" | "parameter"): string[] =>
    [...new Set(entries.filter((e) => e.target.kind === kind).map((e) => e.target.name))].sort();
  const config = {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: baseModel,
    r: lora.config.r,
    lora_alpha: lora.config.alpha,
    lora_dropout: lora.config.dropout,
    target_modules: targets("module"),
    target_parameters: targets("parameter").length ? targets("parameter") : null,
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
  const tensors = Object.fromEntries(entries.map((e) => [e.key, e.read()]));
  try {
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS), tensors, { format: "pt" });
  } finally {
    for (const t of Object.values(tensors)) t.dispose();
  }
  await writeAtomic(join(dir, ADAPTER_CONFIG), JSON.stringify(config, null, 2) + "\n");
}

/** What moerl reads of a PEFT adapter_config.json, PEFT's defaults filled in. */
export interface AdapterConfig {
  /** The file read. */
  path: string;
  /** Rank (r). */
  r: number;
  /** lora_alpha (PEFT's default 8 when absent). */
  alpha: number;
  /** lora_dropout (default 0). */
  dropout: number;
  /** base_model_name_or_path: the model it was trained on (a Hub id or a path), when the file says. */
  baseModel: string | null;
}

/**
 * Reads and checks dir/adapter_config.json: a LoRA adapter with the options
 * moerl implements (the one reading of the file, for loading and resuming).
 * @throws {Error} naming the file when it is missing or not JSON, for another peft_type, a non-numeric r,
 *   lora_alpha or lora_dropout, and for unsupported options (DoRA, rsLoRA, fan_in_fan_out, rank/alpha patterns)
 */
export async function readAdapterConfig(dir: string): Promise<AdapterConfig> {
  const path = join(dir, ADAPTER_CONFIG);
  if (!(await isFile(path))) throw new Error(`${dir}: no ${ADAPTER_CONFIG} (not a PEFT adapter folder)`);
  const pc = await readJsonObject(path, "adapter config");
  if (pc.peft_type !== "LORA") {
    throw new Error(`${path}: peft_type ${JSON.stringify(pc.peft_type)}, only LORA is supported`);
  }
  const r = pc.r, alpha = pc.lora_alpha ?? 8, dropout = pc.lora_dropout ?? 0; // PEFT's defaults
  // The checks a LoRA setting gets anywhere (model/lora_apply.ts), named by the file's keys.
  const checks: [string, unknown, Check][] = [
    ["r", r, LORA_CHECKS.r],
    ["lora_alpha", alpha, LORA_CHECKS.alpha],
    ["lora_dropout", dropout, LORA_CHECKS.dropout],
  ];
  for (const [k, v, check] of checks) {
    if (!check.ok(v)) throw new Error(`${path}: ${k} must be ${check.expected}, got ${JSON.stringify(v)}`);
  }
  for (const k of ["use_dora", "use_rslora", "fan_in_fan_out"]) {
    if (pc[k]) throw new Error(`${path}: ${k} is not supported`);
  }
  for (const k of ["rank_pattern", "alpha_pattern"]) {
    if (pc[k] && Object.keys(pc[k] as object).length) throw new Error(`${path}: ${k} is not supported`);
  }
  const base = pc.base_model_name_or_path;
  const baseModel = typeof base === "string" && base.trim() !== "" ? base : null;
  return { path, r: r as number, alpha: alpha as number, dropout: dropout as number, baseModel };
}

/**
 * Loads a PEFT LoRA adapter from dir onto model, returning its adapters.
 * @throws {Error} naming the file and key for unsupported options (DoRA, rsLoRA,
 *   rank/alpha patterns), keys that match no module, missing or mis-shaped tensors.
 */
export async function loadPeftAdapter(dir: string, model: CausalLM): Promise<LoraModel> {
  const pc = await readAdapterConfig(dir), wPath = join(dir, ADAPTER_WEIGHTS);
  const f = await SafetensorsFile.open(wPath);
  try {
    const plan = planLoad(f.names(), model, wPath);
    const config: LoraConfig = {
      r: pc.r,
      alpha: pc.alpha,
      dropout: pc.dropout,
      targetModules: plan.linears,
      targetExperts: plan.experts,
      expertForm: plan.split ? "split" : "fused",
    };
    const lora = new LoraModel(model.decoder, model.config, config);
    try {
      const entries = adapterEntries(lora, model.config);
      checkEntries(f, entries);
      await applyEntries(f, entries);
    } catch (e) {
      lora.dispose();
      throw e;
    }
    return lora;
  } finally {
    f.close();
  }
}

/** Which of the model's modules a file's keys adapt. */
interface LoadPlan {
  /** Our names of the adapted linear layers. */
  linears: string[];
  /** Whether any expert bank is adapted. */
  experts: boolean;
  /** Experts in the per-expert (4.x) form. */
  split: boolean;
}

/** Maps every key to one of the model's modules, or throws naming the key. */
function planLoad(keys: string[], model: CausalLM, file: string): LoadPlan {
  const cfg = model.config, dec = model.decoder;
  const linears = new Map<string, string>(), experts = new Set<string>();
  const both = (ours: string, add: (name: string) => void): void => [ours, v5Name(ours, cfg)].forEach(add);
  for (const l of dec.layers) {
    for (const k of ["q", "k", "v", "o"]) {
      linears.set(`${l.name}.self_attn.${k}_proj`, `${l.name}.self_attn.${k}_proj`);
    }
    if (l.mlp.kind === "dense") {
      for (const k of ["gate", "up", "down"]) {
        const ours = `${l.name}.${l.mlpName}.${k}_proj`;
        both(ours, (n) => linears.set(n, ours));
        linears.set(`${l.name}.mlp.${k}_proj`, ours);
      }
    } else {
      const router = l.mlp.routerName, prefix = l.mlp.experts.names.prefix;
      both(router, (n) => linears.set(n, router));
      both(prefix, (n) => experts.add(n));
    }
  }
  const plan: LoadPlan = { linears: [], experts: false, split: false };
  const levels = new Map<string, Set<"outer" | "nested">>(); // fused banks: which nesting levels have keys
  for (const key of keys) {
    const m = /^base_model\.model\.(.+)\.lora_([AB])\.weight$/.exec(key);
    if (!m) throw new Error(`${file}: unexpected key "${key}" (not a LoRA A/B weight)`);
    const mod = m[1]!;
    const split = /^(.+)\.(\d+)\.[^.]+$/.exec(mod);
    if (linears.has(mod)) {
      const name = linears.get(mod)!;
      if (!plan.linears.includes(name)) plan.linears.push(name);
    } else if (experts.has(mod.replace(/\.base_layer$/, ""))) {
      plan.experts = true;
      const bank = mod.replace(/\.base_layer$/, "");
      if (!levels.has(bank)) levels.set(bank, new Set());
      levels.get(bank)!.add(mod === bank ? "outer" : "nested");
    } else if (split && experts.has(split[1]!)) {
      plan.experts = plan.split = true;
    } else {
      throw new Error(`${file}: key "${key}" matches no module of this ${cfg.modelType} model`);
    }
  }
  // PEFT nests the adapter of a bank's second parameter inside the first's: one level means one parameter.
  for (const [bank, seen] of levels) {
    if (seen.size === 1) {
      throw new Error(
        `${file}: ${bank} is adapted in one of its two expert parameters only; moerl adapts gate_up_proj and ` +
          "down_proj together (target_parameters naming both)",
      );
    }
  }
  if (plan.linears.length === 0 && !plan.experts) throw new Error(`${file}: holds no LoRA weights`);
  return plan;
}
