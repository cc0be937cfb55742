/**
 * Inputs for the benches that run moerl's own RL update on a random model
 * (bench:dp, bench:update): the model's config from a shapes file, prompts of
 * random ids, and a tokenizer that stops nothing and decodes to "" (the
 * reward, bench/parity_reward.ts, reads token ids).
 * @module
 */
import { parseConfig } from "../model/config.ts";
import type { MoeConfig } from "../model/config.ts";
import type { RolloutTokenizer } from "../rl/collect.ts";
import type { RolloutPrompt } from "../rl/rollout_buffer.ts";

/**
 * The model config of a bench/shapes file: its family (Qwen3-MoE where it names none), with RoPE's base and
 * the dense MLP width filled in where it leaves them out.
 */
export async function shapesModelConfig(path: string): Promise<MoeConfig> {
  const raw = JSON.parse(await Deno.readTextFile(path)) as Record<string, unknown>;
  const config = {
    model_type: "qwen3_moe",
    rope_theta: 10000,
    intermediate_size: raw.moe_intermediate_size,
    ...raw,
  };
  return parseConfig(config, path);
}

/** n prompts of random ids in [2, vocab) (never 0 or 1, the benches' pad and EOS), prompt i `length(i)` long. */
export function syntheticPrompts(n: number, vocab: number, length: (i: number) => number): RolloutPrompt[] {
  return Array.from({ length: n }, (_, i) => ({
    ids: Array.from({ length: length(i) }, (_, j) => 2 + (i * 7919 + j * 104729) % (vocab - 2)),
    answer: 0,
  }));
}

/** No stop tokens (every completion runs to the cap), pad id 0, every text "". */
export const SILENT_TOKENIZER: RolloutTokenizer = {
  stopTokenIds: [],
  padTokenId: 0,
  decode: (): Promise<string> => Promise.resolve(""),
};
