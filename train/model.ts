/**
 * The model a training config names, loaded as it says (dtype, device, NF4
 * base): what `deno task train` trains and `deno task evaluate` evaluates.
 * @module
 */
import { type CausalLM, loadModel } from "../model/model.ts";
import { quantizeModel } from "../model/nf4.ts";
import type { DeepReadonly, ModelSettings } from "./config.ts";

/**
 * Loads cfg.id (Hub id or folder) in cfg.dtype on cfg.device with cfg.attention, and quantises its base to
 * NF4 when asked.
 */
export async function loadConfiguredModel(cfg: DeepReadonly<ModelSettings>): Promise<CausalLM> {
  const model = await loadModel(cfg.id, { dtype: cfg.dtype, device: cfg.device, attention: cfg.attention });
  try {
    if (cfg.quantize4bit) quantizeModel(model, { doubleQuant: cfg.doubleQuant });
  } catch (e) {
    model.dispose();
    throw e;
  }
  return model;
}
