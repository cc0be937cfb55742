/**
 * moerl: PPO-style RL fine-tuning of Mixture-of-Experts language models, in
 * Deno, on libtorch through a thin C shim.
 *
 * - The tensor layer ({@link Tensor}, scopes, autograd, AdamW, CUDA): `ffi/mod.ts`.
 * - Models (Qwen3-MoE, PhiMoE), checkpoints, tokenizers, generation, LoRA,
 *   4-bit weights and the value head: `model/mod.ts`.
 * - The policy, rewards, and the RL update (collect → learn, ppoStep) with
 *   its settings, advantages and losses: `rl/mod.ts`.
 * - GSM8K loading, prompts and seeded micro-batches: `data/mod.ts`.
 *
 * @example
 * ```ts ignore
 * import { generate, loadModel, Policy, DEFAULT_LORA } from "jsr:@moerl/moerl";
 * using model = await loadModel("huihui-ai/Huihui-MoE-1B-A0.6B-SFT", { dtype: "bfloat16", device: "cuda" });
 * const policy = new Policy(model, { lora: DEFAULT_LORA });
 * ```
 * @module
 */
export * from "./ffi/mod.ts";
export * from "./model/mod.ts";
export * from "./rl/mod.ts";
export * from "./data/mod.ts";
