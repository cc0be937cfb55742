/** The tiny fixture model in tests: the RL tests' prompts, adapters that are not zero, a training checkpoint. */
import { join } from "node:path";
import { AdamW, manualSeed, noGrad, randn, tidy } from "../ffi/mod.ts";
import { buildPrompt } from "../data/prompt.ts";
import type { Tokenizer } from "../model/tokenizer.ts";
import type { RolloutPrompt } from "../rl/rollout_buffer.ts";
import { DEFAULT_LORA, type LoraConfig } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Policy } from "../rl/policy.ts";
import { saveCheckpoint } from "../train/checkpoint.ts";

/** The tiny Qwen3-MoE fixture's folder. */
export const TINY_MODEL: string = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");

/** Two GSM8K-style problems rendered for tok without an instruction, gold answers as a number and as `#### n`. */
export async function tinyPrompts(tok: Tokenizer): Promise<RolloutPrompt[]> {
  const questions = [["What is 3 + 4?", "7"], ["Tom has 2 apples and buys 5. How many?", "#### 7"]];
  const prompts: RolloutPrompt[] = [];
  for (const [q, answer] of questions) {
    const p = await buildPrompt(tok, q!, { instruction: "" });
    prompts.push({ ids: p.ids, text: p.text, answer: answer! });
  }
  return prompts;
}

/** Small random values (std 0.05) in every adapter of policy: a fresh LoRA's update is zero. */
export function perturbAdapters(policy: Policy): void {
  noGrad(() =>
    tidy(() =>
      policy.policyParameters().forEach((p) => p.copy_(randn(p.shape, { device: p.device }).mul(0.05)))
    )
  );
}

/**
 * Saves `<run>/checkpoint-<step>` of a policy over the tiny model (LoRA r 4, alpha 8, seed 0). Its adapters
 * are the zero update a fresh LoRA starts from, unless perturbed (small random values everywhere).
 */
export async function saveTinyCheckpoint(
  run: string,
  step: number,
  opts: { lora?: Partial<LoraConfig>; perturbed?: boolean } = {},
): Promise<void> {
  manualSeed(0);
  using model = await loadModel(TINY_MODEL);
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8, ...opts.lora } });
  try {
    if (opts.perturbed) perturbAdapters(policy);
    using opt = new AdamW([{ params: policy.policyParameters(), lr: 1e-3 }, {
      params: policy.valueParameters(),
      lr: 1e-3,
    }]);
    await saveCheckpoint(run, {
      policy,
      optimizer: opt,
      step,
      rng: { seed: 0, step, batcherPosition: { epoch: 0, index: 2 * step } },
    });
  } finally {
    policy.dispose();
  }
}
