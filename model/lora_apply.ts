/**
 * Putting LoRA adapters on a loaded model by module name, PEFT style, and
 * handling them as one set: parameters, trainable count, on/off, merge, removal.
 * @module
 */
import type { Tensor } from "../ffi/mod.ts";
import { isMoeLayer, type MoeConfig } from "./config.ts";
import type { Decoder } from "./decoder.ts";
import type { LinearLayer } from "./layers.ts";
import { type ExpertLoraForm, LoraExperts } from "./lora_experts.ts";
import { LoraLinear, type LoraOptions, LoraState } from "./lora.ts";
import type { ExpertBank } from "./moe.ts";
import { expertSlots, type LinearSlot, linearSlots } from "./modules.ts";
import { bool, type Checks, checkSection, int, num, throwProblems } from "./settings.ts";

/** Which modules get adapters, and the adapter hyperparameters. */
export interface LoraConfig extends LoraOptions {
  /**
   * PEFT's target_modules: module-name suffixes (["q_proj", "v_proj"]: a name
   * matches if it is, or ends with ".", the entry), one regular expression
   * matched against the whole name, or "all-linear" (every linear layer but
   * the routers and the LM head).
   */
  targetModules: readonly string[] | string;
  /** Adapters on every expert's gate, up and down projections. */
  targetExperts: boolean;
  /** One adapter over gate+up per expert ("fused", default: current PEFT) or one each ("split": PEFT on transformers 4.x). */
  expertForm?: ExpertLoraForm;
}

/** The defaults of the design: rank 16, α 32, no dropout, attention, dense MLPs and every expert. */
export const DEFAULT_LORA: Readonly<Required<LoraConfig>> = Object.freeze({
  r: 16,
  alpha: 32,
  dropout: 0,
  targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  targetExperts: true,
  expertForm: "fused" as const,
});

/** The check of every LoRA setting (model/settings.ts), shared with deno task train's `lora` section. */
export const LORA_CHECKS: Checks<LoraConfig> = {
  r: int(1),
  alpha: num(0, Infinity, true),
  dropout: { expected: "a number in [0, 1)", ok: (v) => typeof v === "number" && v >= 0 && v < 1 },
  targetModules: {
    expected:
      'a list of module names (empty: the experts only), or one string (a regular expression or "all-linear")',
    ok: (v) =>
      (typeof v === "string" && v !== "") ||
      (Array.isArray(v) && v.every((s) => typeof s === "string" && s !== "")),
  },
  targetExperts: bool,
  expertForm: {
    expected: '"fused" or "split"',
    ok: (v) => v === undefined || v === "fused" || v === "split",
  },
};

/**
 * Problems between LoRA settings: PEFT adapts fused expert parameters with a ParamWrapper, which refuses
 * dropout, so such an adapter saved with dropout could not be loaded by PEFT.
 */
export function loraConflicts(config: LoraConfig): string[] {
  const fused = config.targetExperts && (config.expertForm ?? "fused") === "fused";
  return fused && config.dropout > 0
    ? [
      `lora.dropout ${config.dropout} with targetExperts in the fused form: PEFT cannot load such an adapter ` +
      '(its ParamWrapper refuses dropout); use dropout 0, or expertForm "split"',
    ]
    : [];
}

/** Whether a linear slot is targeted (routers and the LM head only when named). */
export function isTarget(slot: LinearSlot, target: LoraConfig["targetModules"]): boolean {
  if (target === "all-linear") return slot.role === "linear";
  if (typeof target === "string") return new RegExp(`^(?:${target})$`).test(slot.name);
  return target.some((t) => slot.name === t || slot.name.endsWith(`.${t}`));
}

/** [out, in] of each linear module moerl's models have, by its last name part, from the config. */
const LEAF_SHAPES: Readonly<Record<string, (cfg: MoeConfig) => [number, number]>> = {
  q_proj: (c) => [c.numAttentionHeads * c.headDim, c.hiddenSize],
  k_proj: (c) => [c.numKeyValueHeads * c.headDim, c.hiddenSize],
  v_proj: (c) => [c.numKeyValueHeads * c.headDim, c.hiddenSize],
  o_proj: (c) => [c.hiddenSize, c.numAttentionHeads * c.headDim],
  gate_proj: (c) => [c.intermediateSize, c.hiddenSize], // Qwen3's dense layers (PhiMoE has none)
  up_proj: (c) => [c.intermediateSize, c.hiddenSize],
  down_proj: (c) => [c.hiddenSize, c.intermediateSize],
  gate: (c) => [c.numExperts, c.hiddenSize],
  router: (c) => [c.numExperts, c.hiddenSize],
  lm_head: (c) => [c.vocabSize, c.hiddenSize],
};

/**
 * Why target names cannot be what the user meant, or null: a listed name that is no module of this model
 * nor of its family (a typo would otherwise leave that module untrained, as long as anything else matched;
 * a family's name this model lacks, as dense MLPs in an MoE, is fine), or a regular expression that matches
 * no linear layer.
 */
function unmatchedTargets(target: LoraConfig["targetModules"], slots: readonly LinearSlot[]): string | null {
  if (target === "all-linear") return null;
  const bad = typeof target === "string"
    ? (slots.some((s) => isTarget(s, target)) ? [] : [target])
    : target.filter((t) => !slots.some((s) => isTarget(s, [t])) && !Object.hasOwn(LEAF_SHAPES, t));
  if (bad.length === 0) return null;
  const leaves = [...new Set(slots.map((s) => s.name.slice(s.name.lastIndexOf(".") + 1)))];
  return `LoRA: target_modules ${bad.map((t) => JSON.stringify(t)).join(", ")} ` +
    `${typeof target === "string" ? "(a regular expression over full names) " : ""}matches no linear layer ` +
    `of this model; its linear layers are named ${
      leaves.join(", ")
    } (an empty list adapts the experts alone)`;
}

/** [out, in] of a linear slot, from the config (no weights needed). */
export function slotShape(cfg: MoeConfig, name: string): [number, number] {
  const leaf = name.slice(name.lastIndexOf(".") + 1);
  if (!Object.hasOwn(LEAF_SHAPES, leaf)) {
    throw new Error(`${name}: no known shape for a module named "${leaf}"`);
  }
  return LEAF_SHAPES[leaf]!(cfg);
}

/** Width of each expert. */
export function expertWidth(cfg: MoeConfig): number {
  return cfg.modelType === "qwen3_moe" ? cfg.moeIntermediateSize : cfg.intermediateSize;
}

/** The adapters of one model. */
export class LoraModel {
  /** Shared switches: `enabled` (false = the frozen base, the reference policy) and `training` (dropout). */
  readonly state: LoraState;
  /** The configuration applied. */
  readonly config: LoraConfig;
  /** Adapted linear layers by module name. */
  readonly linears: Map<string, LoraLinear> = new Map();
  /** Adapted expert banks by module name. */
  readonly experts: Map<string, LoraExperts> = new Map();
  readonly #restore: (() => void)[] = [];

  /** Adds adapters to decoder's matching modules; sizes come from cfg. */
  constructor(decoder: Decoder, cfg: MoeConfig, config: LoraConfig) {
    throwProblems(checkSection("lora", config, LORA_CHECKS));
    throwProblems(loraConflicts(config));
    this.state = new LoraState();
    this.config = config;
    const like = decoder.embed;
    // Adapters over adapters would make the "adapters off" reference another policy, and disposing the outer
    // ones first would put back layers already freed.
    const taken = [...linearSlots(decoder), ...expertSlots(decoder)].find((s) => {
      const layer: unknown = s.get();
      return layer instanceof LoraLinear || layer instanceof LoraExperts;
    });
    if (taken) {
      throw new Error(
        `LoRA: ${taken.name} already has an adapter (a Policy or loadPeftAdapter on this model); ` +
          `dispose that one first, or load the model again`,
      );
    }
    try {
      for (const slot of linearSlots(decoder)) {
        if (!isTarget(slot, config.targetModules)) continue;
        const [out, inp] = slotShape(cfg, slot.name);
        const base: LinearLayer = slot.get();
        const lora = new LoraLinear(base, { in: inp, out, like }, config, this.state);
        slot.set(lora);
        this.linears.set(slot.name, lora);
        this.#restore.push(() => slot.set(base));
      }
      if (config.targetExperts) {
        for (const slot of expertSlots(decoder)) {
          const base: ExpertBank = slot.get();
          const dims = { hidden: cfg.hiddenSize, inter: expertWidth(cfg), like };
          const lora = new LoraExperts(base, dims, config, this.state, config.expertForm ?? "fused");
          slot.set(lora);
          this.experts.set(slot.name, lora);
          this.#restore.push(() => slot.set(base));
        }
      }
      if (this.linears.size + this.experts.size === 0) {
        throw new Error(`LoRA: target_modules ${JSON.stringify(config.targetModules)} matched no module`);
      }
      const typo = unmatchedTargets(config.targetModules, linearSlots(decoder));
      if (typo) throw new Error(typo);
    } catch (e) {
      this.dispose(); // the layers adapted so far go back
      throw e;
    }
  }

  /** Every trainable tensor, in module order. */
  parameters(): Tensor[] {
    return [
      ...[...this.linears.values()].flatMap((l) => l.parameters()),
      ...[...this.experts.values()].flatMap((e) => e.parameters()),
    ];
  }

  /** Number of trainable scalars. */
  trainableCount(): number {
    return this.parameters().reduce((n, t) => n + t.numel, 0);
  }

  /** Merges every adapter into the base weights (generation without adapter overhead). */
  merge(): void {
    // Checked first: undoing merges is exact only up to rounding (W + BA − BA).
    const stuck = [...this.linears, ...this.experts].find(([, m]) => !m.merged && !m.mergeable);
    if (stuck) {
      throw new TypeError(
        `LoRA merge: ${
          stuck[0]
        } has a 4-bit base, which cannot absorb the update exactly; nothing was merged`,
      );
    }
    const done: (LoraLinear | LoraExperts)[] = [];
    try {
      for (const m of [...this.linears.values(), ...this.experts.values()]) {
        if (m.merged) continue;
        m.merge();
        done.push(m);
      }
    } catch (e) {
      // All or nothing: a half-merged model's "adapters off" is no longer the base (the reference policy).
      for (const m of done) m.unmerge();
      throw e;
    }
  }

  /** Undoes {@link merge}. */
  unmerge(): void {
    for (const m of [...this.linears.values(), ...this.experts.values()]) m.unmerge();
  }

  /** Puts the original layers back and frees the adapters. */
  dispose(): void {
    this.unmerge();
    for (const r of this.#restore.splice(0)) r();
    for (const m of [...this.linears.values(), ...this.experts.values()]) m.dispose();
    this.linears.clear();
    this.experts.clear();
    this.state.casts?.dispose(); // a hold still open when the model goes: its casts would outlive the adapters
  }

  /** {@link dispose} at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** The linear modules a config implies, by Hugging Face name (what {@link linearSlots} would list). */
export function moduleNames(cfg: MoeConfig): LinearSlot[] {
  const out: LinearSlot[] = [];
  const slot = (name: string, role: LinearSlot["role"]): LinearSlot => ({
    name,
    role,
    get: () => {
      throw new Error("moduleNames: a name only");
    },
    set: () => {
      throw new Error("moduleNames: a name only");
    },
  });
  for (let i = 0; i < cfg.numHiddenLayers; i++) {
    const p = `model.layers.${i}`;
    for (const k of ["q", "k", "v", "o"]) out.push(slot(`${p}.self_attn.${k}_proj`, "linear"));
    if (!isMoeLayer(cfg, i)) {
      for (const k of ["gate", "up", "down"]) out.push(slot(`${p}.mlp.${k}_proj`, "linear"));
    } else {
      out.push(slot(cfg.modelType === "phimoe" ? `${p}.block_sparse_moe.gate` : `${p}.mlp.gate`, "router"));
    }
  }
  out.push(slot("lm_head", "lm_head"));
  return out;
}

/**
 * Trainable LoRA parameters for a config, computed from sizes alone (no
 * weights): what {@link LoraModel} would add.
 */
export function loraParamCount(
  cfg: MoeConfig,
  config: LoraConfig,
): { linear: number; experts: number; total: number } {
  const r = config.r;
  let linear = 0;
  for (const slot of moduleNames(cfg)) {
    if (!isTarget(slot, config.targetModules)) continue;
    const [out, inp] = slotShape(cfg, slot.name);
    linear += r * (inp + out);
  }
  let experts = 0;
  if (config.targetExperts) {
    const h = cfg.hiddenSize, i = expertWidth(cfg), e = cfg.numExperts;
    const moeLayers = Array.from({ length: cfg.numHiddenLayers }, (_, l) =>
      isMoeLayer(cfg, l)).filter(Boolean).length;
    const gateUp = (config.expertForm ?? "fused") === "fused" ? r * (h + 2 * i) : 2 * r * (h + i);
    experts = moeLayers * e * (gateUp + r * (i + h));
  }
  return { linear, experts, total: linear + experts };
}
