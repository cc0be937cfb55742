/**
 * Model shapes for benchmarks with random weights: bench/shapes/*.json, HF
 * config keys, read into what bench/*.py's `Qwen3MoeConfig(**model)` takes.
 * @module
 */

/** The HF config keys of a shapes file, without its comment and the keys the benchmark sets itself. */
export async function readShapes(path: string): Promise<Record<string, unknown>> {
  const raw = JSON.parse(await Deno.readTextFile(path)) as Record<string, unknown>;
  const own = ["_comment", "model_type", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id"];
  return Object.fromEntries(Object.entries(raw).filter(([key]) => !own.includes(key)));
}

/** The small model of bench:generate and bench:rl. */
export const SMALL_SHAPES: string = new URL("./shapes/bench-small.json", import.meta.url).pathname;
