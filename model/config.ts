/**
 * Typed model configs for `qwen3_moe` and `phimoe`, parsed from a Hugging
 * Face config.json written by transformers v4 or v5 (v5 renames
 * `num_experts` → `num_local_experts` and `rope_theta`/`rope_scaling` →
 * `rope_parameters`; both spellings are read).
 *
 * Keys default as HF's config classes do, except the sizes that fix tensor
 * shapes (vocab, hidden, layers, heads, KV heads, experts): HF would fall
 * back to its 30B / Phi-3.5 sizes, and a config.json without them is broken,
 * so they are required. Unknown keys are ignored (real configs carry many).
 * @module
 */
import { join } from "node:path";
import type { DType } from "../ffi/dtype.ts";
import { ConfigReader, ModelConfigError } from "./config_reader.ts";
import { isDirectory, type JsonObject, readJsonObject } from "./json.ts";

export { ModelConfigError } from "./config_reader.ts";

/** The model types this library runs. */
export type ModelType = "qwen3_moe" | "phimoe";

/** The supported `model_type` values. */
export const SUPPORTED_MODEL_TYPES: readonly ModelType[] = ["qwen3_moe", "phimoe"];

/** Keys both families share. */
export interface CommonConfig {
  /** The config file this came from. */
  source: string;
  /** `vocab_size`: embedding rows (≥ the tokenizer's ids). */
  vocabSize: number;
  /** `hidden_size`. */
  hiddenSize: number;
  /** `num_hidden_layers`. */
  numHiddenLayers: number;
  /** `num_attention_heads`. */
  numAttentionHeads: number;
  /** `num_key_value_heads`. */
  numKeyValueHeads: number;
  /** `head_dim`, default hidden_size / num_attention_heads (Phi-tiny: 128 ≠ 256). */
  headDim: number;
  /** `hidden_act`: "silu" (or its alias "swish"); others are refused. */
  hiddenAct: string;
  /** `max_position_embeddings`. */
  maxPositionEmbeddings: number;
  /** `rms_norm_eps` (PhiMoE: the LayerNorm eps). */
  rmsNormEps: number;
  /** `initializer_range`. */
  initializerRange: number;
  /** `tie_word_embeddings`. */
  tieWordEmbeddings: boolean;
  /** RoPE base: v4 `rope_theta` or v5 `rope_parameters.rope_theta`. */
  ropeTheta: number;
  /** RoPE type: "default", or the scaling's `rope_type` / `type` (e.g. "longrope"). */
  ropeType: string;
  /** The RoPE scaling parameters as written (v4 `rope_scaling`, or v5 `rope_parameters` when not default); null for plain RoPE. */
  ropeScaling: JsonObject | null;
  /** `attention_bias`: q/k/v/o projections have biases. */
  attentionBias: boolean;
  /** `attention_dropout`. */
  attentionDropout: number;
  /** `sliding_window` (null when off). */
  slidingWindow: number | null;
  /** `num_experts_per_tok` (top-k). */
  numExpertsPerTok: number;
  /** Experts per MoE layer: Qwen3 `num_experts` (v5: `num_local_experts`), PhiMoE `num_local_experts`. */
  numExperts: number;
  /** `output_router_logits`. */
  outputRouterLogits: boolean;
  /** `router_aux_loss_coef`. */
  routerAuxLossCoef: number;
  /** `bos_token_id`. */
  bosTokenId: number | null;
  /** `eos_token_id`: one id or a list. */
  eosTokenId: number | number[] | null;
  /** `pad_token_id`. */
  padTokenId: number | null;
  /** Stored weight dtype: v4 `torch_dtype` or v5 `dtype`; null when absent. */
  dtype: DType | null;
}

/** A `qwen3_moe` config (HF `Qwen3MoeConfig`). */
export interface Qwen3MoeConfig extends CommonConfig {
  /** Discriminator. */
  modelType: "qwen3_moe";
  /** `intermediate_size`: width of dense (non-MoE) MLP layers. */
  intermediateSize: number;
  /** `moe_intermediate_size`: width of each expert. */
  moeIntermediateSize: number;
  /** `decoder_sparse_step`: every step-th layer is MoE. */
  decoderSparseStep: number;
  /** `mlp_only_layers` (null → []): layers forced dense. */
  mlpOnlyLayers: number[];
  /** `norm_topk_prob`: renormalise the top-k probabilities. */
  normTopkProb: boolean;
  /** `use_sliding_window`. */
  useSlidingWindow: boolean;
}

/** A `phimoe` config (HF `PhimoeConfig`, and Microsoft's SlimMoE remote-code config). */
export interface PhiMoeConfig extends CommonConfig {
  /** Discriminator. */
  modelType: "phimoe";
  /** `intermediate_size`: width of each expert. */
  intermediateSize: number;
  /** `router_jitter_noise`: the sparsemixer's ε. */
  routerJitterNoise: number;
  /** `input_jitter_noise` (training only). */
  inputJitterNoise: number;
  /** `lm_head_bias`. */
  lmHeadBias: boolean;
  /** SlimMoE `expert_dropout` (0 when absent). */
  expertDropout: number;
  /** SlimMoE `hidden_dropout` (0 when absent). */
  hiddenDropout: number;
}

/** Either supported config. */
export type MoeConfig = Qwen3MoeConfig | PhiMoeConfig;

const DTYPES: Readonly<Record<string, DType>> = {
  bfloat16: "bfloat16",
  float16: "float16",
  float32: "float32",
  float64: "float64",
};

function readDtype(r: ConfigReader): DType | null {
  const pick = (key: string): DType | null => {
    if (!r.has(key) || r.raw[key] === null) return null;
    const v = r.raw[key];
    if (typeof v !== "string" || !Object.hasOwn(DTYPES, v.replace(/^torch\./, ""))) {
      throw r.error(key, `must be one of ${Object.keys(DTYPES).join(", ")}, got ${JSON.stringify(v)}`);
    }
    return DTYPES[v.replace(/^torch\./, "")]!;
  };
  const a = pick("torch_dtype"), b = pick("dtype");
  if (a && b && a !== b) throw r.error("dtype", `(${b}) disagrees with "torch_dtype" (${a})`);
  return b ?? a;
}

/** hidden_act: both families' MLPs and experts compute SwiGLU with SiLU (transformers' "silu", alias "swish"). */
function readAct(r: ConfigReader): string {
  const act = r.str("hidden_act", "silu");
  if (act !== "silu" && act !== "swish") {
    throw r.error("hidden_act", `is "${act}", which is not supported (the MLPs compute SiLU: "silu")`);
  }
  return act;
}

type Rope = Pick<CommonConfig, "ropeTheta" | "ropeType" | "ropeScaling">;

function readRope(r: ConfigReader, defaultTheta: number, headDim: number, maxPos: number): Rope {
  // v5 semantics: rope_scaling, if set, replaces rope_parameters; rope_theta inside wins over the top-level key.
  const scaling = r.objOrNull("rope_scaling");
  const params = scaling ?? r.objOrNull("rope_parameters") ?? {};
  const key = scaling ? "rope_scaling" : "rope_parameters";
  const inner = params.rope_theta;
  const outer = r.has("rope_theta") ? r.num("rope_theta", undefined, Number.MIN_VALUE) : undefined;
  if (inner !== undefined && (typeof inner !== "number" || !(inner > 0))) {
    throw r.error(`${key}.rope_theta`, `must be a positive number, got ${JSON.stringify(inner)}`);
  }
  if (inner !== undefined && outer !== undefined && inner !== outer) {
    throw r.error("rope_theta", `(${outer}) disagrees with ${key}.rope_theta (${inner})`);
  }
  const ropeTheta = (inner as number | undefined) ?? outer ?? defaultTheta;
  const type = params.rope_type ?? params.type ?? "default";
  if (typeof type !== "string") {
    throw r.error(`${key}.rope_type`, `must be a string, got ${JSON.stringify(type)}`);
  }
  if (type === "default") return { ropeTheta, ropeType: type, ropeScaling: null };
  const ropeScaling: JsonObject = { ...params };
  if (type === "longrope") {
    for (const f of ["short_factor", "long_factor"]) {
      const v = ropeScaling[f];
      if (!Array.isArray(v) || v.length !== headDim / 2 || !v.every((x) => typeof x === "number")) {
        throw r.error(`${key}.${f}`, `must be ${headDim / 2} numbers (head_dim / 2) for longrope`);
      }
    }
    for (const f of ["short_mscale", "long_mscale"]) {
      if (typeof ropeScaling[f] !== "number") throw r.error(`${key}.${f}`, "must be a number for longrope");
    }
    // As HF: a top-level original_max_position_embeddings (Phi-3 style) takes priority.
    ropeScaling.original_max_position_embeddings = r.int(
      "original_max_position_embeddings",
      typeof ropeScaling.original_max_position_embeddings === "number"
        ? ropeScaling.original_max_position_embeddings
        : maxPos,
    );
  }
  return { ropeTheta, ropeType: type, ropeScaling };
}

function common(
  r: ConfigReader,
  d: {
    theta: number;
    maxPos: number;
    eps: number;
    bos: number | null;
    eos: number | null;
    kvNullIsHeads: boolean;
    experts: number;
  },
): CommonConfig {
  const hiddenSize = r.int("hidden_size");
  const numAttentionHeads = r.int("num_attention_heads");
  const numKeyValueHeads = d.kvNullIsHeads && r.raw.num_key_value_heads === null
    ? numAttentionHeads
    : r.int("num_key_value_heads");
  if (numAttentionHeads % numKeyValueHeads !== 0) {
    throw r.error(
      "num_key_value_heads",
      `(${numKeyValueHeads}) must divide num_attention_heads (${numAttentionHeads})`,
    );
  }
  let headDim: number;
  if (r.has("head_dim") && r.raw.head_dim !== null) headDim = r.int("head_dim");
  else if (hiddenSize % numAttentionHeads !== 0) {
    throw r.error(
      "head_dim",
      `is missing and hidden_size ${hiddenSize} is not divisible by num_attention_heads ${numAttentionHeads}`,
    );
  } else headDim = hiddenSize / numAttentionHeads;
  const maxPositionEmbeddings = r.int("max_position_embeddings", d.maxPos);
  const numExpertsPerTok = r.int("num_experts_per_tok");
  if (d.experts > 0 && numExpertsPerTok > d.experts) {
    throw r.error(
      "num_experts_per_tok",
      `(${numExpertsPerTok}) exceeds the number of experts (${d.experts})`,
    );
  }
  return {
    source: r.source,
    vocabSize: r.int("vocab_size"),
    hiddenSize,
    numHiddenLayers: r.int("num_hidden_layers"),
    numAttentionHeads,
    numKeyValueHeads,
    headDim,
    hiddenAct: readAct(r),
    maxPositionEmbeddings,
    rmsNormEps: r.num("rms_norm_eps", d.eps, Number.MIN_VALUE),
    initializerRange: r.num("initializer_range", 0.02),
    tieWordEmbeddings: r.bool("tie_word_embeddings", false),
    ...readRope(r, d.theta, headDim, maxPositionEmbeddings),
    attentionBias: r.bool("attention_bias", false),
    attentionDropout: r.num("attention_dropout", 0),
    slidingWindow: null, // set per family
    numExpertsPerTok,
    numExperts: d.experts,
    outputRouterLogits: r.bool("output_router_logits", false),
    routerAuxLossCoef: r.num("router_aux_loss_coef", 0.001),
    bosTokenId: r.intOrNull("bos_token_id", d.bos),
    eosTokenId: r.ids("eos_token_id", d.eos),
    padTokenId: r.intOrNull("pad_token_id", null),
    dtype: readDtype(r),
  };
}

function qwen3Moe(r: ConfigReader): Qwen3MoeConfig {
  // v5 saves num_experts under its attribute_map name, num_local_experts.
  const a = r.has("num_experts") ? r.int("num_experts", undefined, 0) : undefined;
  const b = r.has("num_local_experts") ? r.int("num_local_experts", undefined, 0) : undefined;
  if (a !== undefined && b !== undefined && a !== b) {
    throw r.error("num_experts", `(${a}) disagrees with "num_local_experts" (${b})`);
  }
  const experts = a ?? b ?? r.int("num_experts");
  const base = common(r, {
    theta: 10000,
    maxPos: 32768,
    eps: 1e-6,
    bos: null,
    eos: null,
    kvNullIsHeads: false,
    experts,
  });
  const useSlidingWindow = r.bool("use_sliding_window", false);
  const mlpOnlyLayers = r.intList("mlp_only_layers", []);
  const bad = mlpOnlyLayers.find((i) => i >= base.numHiddenLayers);
  if (bad !== undefined) {
    throw r.error("mlp_only_layers", `names layer ${bad} but the model has ${base.numHiddenLayers} layers`);
  }
  return {
    ...base,
    modelType: "qwen3_moe",
    // HF: sliding_window is None unless use_sliding_window.
    slidingWindow: useSlidingWindow ? r.intOrNull("sliding_window", 4096, 1) : null,
    intermediateSize: r.int("intermediate_size", 6144),
    moeIntermediateSize: r.int("moe_intermediate_size"),
    decoderSparseStep: r.int("decoder_sparse_step", 1),
    mlpOnlyLayers,
    normTopkProb: r.bool("norm_topk_prob", false),
    useSlidingWindow,
  };
}

function phiMoe(r: ConfigReader): PhiMoeConfig {
  const experts = r.int("num_local_experts");
  const base = common(r, {
    theta: 1e6,
    maxPos: 131072,
    eps: 1e-5,
    bos: 1,
    eos: 2,
    kvNullIsHeads: true,
    experts,
  });
  if (base.numExpertsPerTok !== 2) {
    throw r.error(
      "num_experts_per_tok",
      `is ${base.numExpertsPerTok}, but PhiMoE's sparsemixer routing supports only 2`,
    );
  }
  return {
    ...base,
    modelType: "phimoe",
    slidingWindow: r.intOrNull("sliding_window", null, 1),
    intermediateSize: r.int("intermediate_size"),
    routerJitterNoise: r.num("router_jitter_noise", 0.01),
    inputJitterNoise: r.num("input_jitter_noise", 0),
    lmHeadBias: r.bool("lm_head_bias", false),
    expertDropout: r.num("expert_dropout", 0),
    hiddenDropout: r.num("hidden_dropout", 0),
  };
}

/**
 * Parses a config.json object.
 * @param raw the parsed JSON
 * @param source the file it came from, for messages
 * @throws {ModelConfigError} for an unsupported model_type (naming it and the supported ones), or a
 *   required key missing or any key of the wrong type (naming the key and the file)
 */
export function parseConfig(raw: unknown, source = "config.json"): MoeConfig {
  const r = new ConfigReader(raw, source);
  const type = r.str("model_type");
  if (type === "qwen3_moe") return qwen3Moe(r);
  if (type === "phimoe") return phiMoe(r);
  throw new ModelConfigError(
    `${source}: model_type "${type}" is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(", ")})`,
  );
}

/**
 * Reads and parses config.json from a model folder (or a path to the file itself).
 * @throws {Error} when the file is missing or not JSON; {@link ModelConfigError} as {@link parseConfig}
 */
export async function loadModelConfig(pathOrDir: string): Promise<MoeConfig> {
  const path = (await isDirectory(pathOrDir)) ? join(pathOrDir, "config.json") : pathOrDir;
  return parseConfig(await readJsonObject(path, "model config"), path);
}

/**
 * Whether decoder layer i has a sparse MoE block (else a dense MLP).
 * Qwen3-MoE: `i ∉ mlp_only_layers` and `num_experts > 0` and `(i + 1) % decoder_sparse_step == 0`.
 * PhiMoE: every layer.
 * @throws {RangeError} if i is not a layer index of the model
 */
export function isMoeLayer(cfg: MoeConfig, i: number): boolean {
  if (!Number.isInteger(i) || i < 0 || i >= cfg.numHiddenLayers) {
    throw new RangeError(
      `isMoeLayer: layer ${i} is out of range (${cfg.source} has ${cfg.numHiddenLayers} layers)`,
    );
  }
  if (cfg.modelType === "phimoe") return true;
  return !cfg.mlpOnlyLayers.includes(i) && cfg.numExperts > 0 && (i + 1) % cfg.decoderSparseStep === 0;
}
