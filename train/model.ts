/**
 * The model a training config names, loaded as it says (dtype, device, NF4
 * base): what `deno task train` trains and `deno task evaluate` evaluates;
 * and the policy and optimizer the config puts over it.
 * @module
 */
import { type AdamW, cuda, torchVersion } from "../ffi/mod.ts";
import { type CausalLM, loadModel } from "../model/model.ts";
import { quantizeModel } from "../model/nf4.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import type { DeepReadonly, ModelSettings, TrainConfig } from "./config.ts";

/**
 * Loads cfg.id (Hub id or folder) in cfg.dtype on cfg.device with cfg.attention, and quantises its base to
 * NF4 when asked.
 */
export async function loadConfiguredModel(cfg: DeepReadonly<ModelSettings>): Promise<CausalLM> {
  if (cfg.device.startsWith("cuda")) { // said before a checkpoint is read, naming the setting
    const index = Number(cfg.device.split(":")[1] ?? 0), count = cuda.isAvailable() ? cuda.deviceCount() : 0;
    if (index >= count) {
      throw new Error(
        `model.device "${cfg.device}": ${
          count ? `this machine has CUDA devices 0..${count - 1}` : "CUDA is not available here"
        } ` +
          `(libtorch ${torchVersion()}); set model.device=cpu or run where the GPU is`,
      );
    }
  }
  const model = await loadModel(cfg.id, { dtype: cfg.dtype, device: cfg.device, attention: cfg.attention });
  try {
    if (cfg.quantize4bit) quantizeModel(model, { doubleQuant: cfg.doubleQuant });
  } catch (e) {
    model.dispose();
    throw e;
  }
  return model;
}

/** The policy over model as cfg sets it up: its LoRA, gradient checkpointing and LM-head chunk. */
export function configuredPolicy(model: CausalLM, cfg: DeepReadonly<TrainConfig>): Policy {
  return new Policy(model, {
    lora: { ...cfg.lora },
    checkpointing: cfg.train.gradientCheckpointing,
    headChunk: cfg.train.headChunk,
  });
}

/** AdamW over the policy's adapters and value head with cfg.train's rates, decay, betas and eps. */
export function configuredOptimizer(policy: Policy, cfg: DeepReadonly<TrainConfig>): AdamW {
  const t = cfg.train;
  return policyOptimizer(policy, {
    learningRate: t.learningRate,
    valueLearningRate: t.valueLearningRate,
    weightDecay: t.weightDecay,
    valueWeightDecay: t.valueWeightDecay,
    betas: [...t.betas] as [number, number],
    eps: t.eps,
  });
}
