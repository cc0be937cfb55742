/**
 * The replaceable parts of a decoder under their Hugging Face module names
 * (`model.layers.0.self_attn.q_proj`, `model.layers.0.mlp.experts`, ...), so
 * adapters and quantisation can be applied by name pattern, as PEFT does.
 * @module
 */
import type { Decoder } from "./decoder.ts";
import type { LinearLayer } from "./layers.ts";
import type { ExpertBank } from "./moe.ts";

/** A named, replaceable linear layer of a decoder. */
export interface LinearSlot {
  /** Hugging Face module name, e.g. "model.layers.3.self_attn.v_proj". */
  name: string;
  /** "router" for MoE routers, "lm_head" for the output layer, else "linear". */
  role: "linear" | "router" | "lm_head";
  /** The current layer. */
  get(): LinearLayer;
  /** Replaces it. */
  set(layer: LinearLayer): void;
}

/** A named, replaceable expert bank of a decoder. */
export interface ExpertSlot {
  /** Hugging Face module name of the experts, e.g. "model.layers.3.mlp.experts". */
  name: string;
  /** The current bank. */
  get(): ExpertBank;
  /** Replaces it. */
  set(bank: ExpertBank): void;
}

/** Every linear layer of the decoder, in layer order, with the LM head last. */
export function linearSlots(decoder: Decoder): LinearSlot[] {
  const out: LinearSlot[] = [];
  for (const layer of decoder.layers) {
    const attn = layer.attn;
    for (const key of ["q", "k", "v", "o"] as const) {
      out.push({
        name: `${layer.name}.self_attn.${key}_proj`,
        role: "linear",
        get: () => attn[key],
        set: (l) => (attn[key] = l),
      });
    }
    const mlp = layer.mlp;
    if (mlp.kind === "dense") {
      for (const key of ["gate", "up", "down"] as const) {
        out.push({
          name: `${layer.name}.${layer.mlpName}.${key}_proj`,
          role: "linear",
          get: () => mlp[key],
          set: (l) => (mlp[key] = l),
        });
      }
    } else {
      out.push({ name: mlp.routerName, role: "router", get: () => mlp.router, set: (l) => (mlp.router = l) });
    }
  }
  out.push({ name: "lm_head", role: "lm_head", get: () => decoder.lmHead, set: (l) => (decoder.lmHead = l) });
  return out;
}

/** Every MoE layer's expert bank, in layer order. */
export function expertSlots(decoder: Decoder): ExpertSlot[] {
  const out: ExpertSlot[] = [];
  for (const layer of decoder.layers) {
    const mlp = layer.mlp;
    if (mlp.kind !== "moe") continue;
    out.push({ name: mlp.experts.names.prefix, get: () => mlp.experts, set: (b) => (mlp.experts = b) });
  }
  return out;
}
