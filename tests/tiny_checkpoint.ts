/** A training checkpoint of the tiny fixture model, for tests of what reads one (evaluate, merge). */
import { join } from "node:path";
import { AdamW, manualSeed, randn, tidy } from "../ffi/mod.ts";
import { DEFAULT_LORA, type LoraConfig } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Policy } from "../rl/policy.ts";
import { saveCheckpoint } from "../train/checkpoint.ts";

/** The tiny Qwen3-MoE fixture's folder. */
export const TINY_MODEL: string = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");

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
    if (opts.perturbed) {
      for (const p of policy.policyParameters()) tidy(() => void p.copy_(randn(p.shape).mul(0.05)));
    }
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
