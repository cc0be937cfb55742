/**
 * Loading a causal LM from a Hugging Face repo id or local folder: config,
 * weights (either expert layout, sharded or not) and the decoder.
 * @module
 */
import { join } from "node:path";
import { cuda, type Device, type DType, linear, ones, tidy, TorchError, torchVersion } from "../ffi/mod.ts";
import { Checkpoint } from "./checkpoint.ts";
import { loadModelConfig, type MoeConfig } from "./config.ts";
import type { Decoder } from "./decoder.ts";
import { ATTENTION_CHECK, type AttentionImpl, resolveAttention } from "./layers.ts";
import { describe } from "./settings.ts";
import { resolveModel, type ResolveOptions } from "./hub.ts";
import { buildPhiMoe } from "./phimoe.ts";
import { buildQwen3Moe } from "./qwen3_moe.ts";
import {
  CheckpointSource,
  RandomSource,
  type TensorSource,
  WeightLoader,
  type WeightOptions,
} from "./weights.ts";

/** Options for {@link loadModel} and {@link randomModel}. */
export interface ModelOptions extends WeightOptions {
  /** How attention is computed (default "auto": libtorch's fused SDPA where available); see {@link Decoder.attention}. */
  attention?: AttentionImpl;
}

/** Options for {@link loadModel}. */
export interface LoadModelOptions extends ModelOptions {
  /** Hub resolution options (revision, token, cache dir). */
  hub?: ResolveOptions;
}

/** A loaded model: its config, decoder, and the folder it came from. Dispose to free the weights. */
export class CausalLM {
  /** The parsed config.json. */
  readonly config: MoeConfig;
  /** The network. */
  readonly decoder: Decoder;
  /** The local folder holding the files. */
  readonly dir: string;
  readonly #weights: WeightLoader;
  readonly #adopted: { dispose(): void }[] = [];

  /** Wraps built parts; use {@link loadModel}. */
  constructor(config: MoeConfig, decoder: Decoder, dir: string, weights: WeightLoader) {
    this.config = config;
    this.decoder = decoder;
    this.dir = dir;
    this.#weights = weights;
  }

  /** Frees every weight tensor, and whatever was adopted. */
  dispose(): void {
    for (const d of this.#adopted.splice(0)) d.dispose();
    this.#weights.dispose();
  }

  /** Takes ownership of something holding model weights (e.g. NF4 weights), freed with the model. */
  adopt(d: { dispose(): void }): void {
    this.#adopted.push(d);
  }

  /** Frees the weights at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * Loads a Qwen3-MoE or PhiMoE model from a local folder or a Hub repo id
 * (downloaded into the standard Hugging Face cache).
 * @example
 * ```ts ignore
 * using model = await loadModel("huihui-ai/Huihui-MoE-1B-A0.6B-SFT", { dtype: "bfloat16", device: "cuda" });
 * ```
 */
export async function loadModel(idOrPath: string, opts: LoadModelOptions = {}): Promise<CausalLM> {
  const missing = missingCudaDevice(opts.device); // before a download, not at the first weight's copy
  if (missing) throw new Error(`loadModel: device "${opts.device}": ${missing}`);
  const dir = await resolveModel(idOrPath, opts.hub);
  const config = await loadModelConfig(join(dir, "config.json"));
  using ckpt = await Checkpoint.open(dir);
  const src = new CheckpointSource(ckpt);
  const model = await build(config, src, dir, opts);
  // As transformers warns: weights the config does not use usually mean config.json does not match them.
  const unused = src.unread().filter((n) => !n.endsWith("rotary_emb.inv_freq")); // a buffer, not a weight
  if (unused.length) {
    console.warn(
      `moerl: ${dir}: ${unused.length} tensor${unused.length === 1 ? " is" : "s are"} not used by its ` +
        `config.json (first: ${unused[0]}); does the config match the weights (num_hidden_layers, ` +
        "tie_word_embeddings, num_local_experts)?",
    );
  }
  return model;
}

/** Why device is a CUDA device this machine lacks (no CUDA, or not that index), or null when it is not one. */
export function missingCudaDevice(device: Device | undefined): string | null {
  if (!device?.startsWith("cuda")) return null;
  const index = Number(device.split(":")[1] ?? 0), count = cuda.isAvailable() ? cuda.deviceCount() : 0;
  if (!(index >= count)) return null; // "cuda:x" is the tensor calls' error to name
  return `${count ? `this machine has CUDA devices 0..${count - 1}` : "CUDA is not available here"} ` +
    `(libtorch ${torchVersion()})`;
}

/**
 * A model of config's shapes with random weights (no checkpoint): for
 * measuring speed and memory at real model sizes. Seed with manualSeed().
 */
export async function randomModel(config: MoeConfig, opts: ModelOptions = {}): Promise<CausalLM> {
  return await build(config, new RandomSource(), "", opts);
}

/**
 * Refuses a dtype whose matmul this libtorch lacks on the CPU (float16 in libtorch 1.13), which
 * would otherwise fail deep in the first forward (or the LoRA initialisation) naming a kernel, not the setting.
 */
function checkDtypeRuns(dtype: DType | undefined, device: Device | undefined): void {
  // CPU only: there the gaps are (CUDA libtorch has every float dtype; its errors would be the device's).
  if (dtype === undefined || dtype === "float32" || (device ?? "cpu") !== "cpu") return;
  try {
    tidy(() => void linear(ones([1, 2], { dtype, device }), ones([2, 2], { dtype, device }))); // returns nothing: all freed
  } catch (e) {
    if (!(e instanceof TorchError)) throw e;
    throw new Error(
      `dtype ${dtype} on ${
        device ?? "cpu"
      }: libtorch ${torchVersion()} cannot compute a matmul in it there ` +
        `(${e.message}); choose another dtype (float32, or bfloat16)`,
      { cause: e },
    );
  }
}

async function build(
  config: MoeConfig,
  src: TensorSource,
  dir: string,
  opts: ModelOptions,
): Promise<CausalLM> {
  if (config.ropeType !== "default") {
    // Scaled RoPE (yarn, longrope, ...) is parsed but not computed: refuse rather than give wrong logits.
    throw new Error(
      `${config.source}: RoPE scaling "${config.ropeType}" is not implemented (moerl computes plain RoPE with ` +
        "rope_theta); this model's logits would be wrong",
    );
  }
  const impl = opts.attention ?? "auto";
  if (!ATTENTION_CHECK.ok(impl)) {
    throw new RangeError(`attention: expected ${ATTENTION_CHECK.expected}, got ${describe(impl)}`);
  }
  resolveAttention(impl); // "sdpa" on a libtorch without it fails here, before any weight is read
  checkDtypeRuns(opts.dtype, opts.device);
  const weights = new WeightLoader(src, { dtype: opts.dtype, device: opts.device });
  try {
    const decoder = config.modelType === "qwen3_moe"
      ? await buildQwen3Moe(config, weights)
      : await buildPhiMoe(config, weights);
    decoder.attention = impl;
    return new CausalLM(config, decoder, dir, weights);
  } catch (e) {
    weights.dispose();
    throw e;
  }
}
