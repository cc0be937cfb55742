/**
 * Model shapes for benchmarks with random weights: bench/shapes/*.json, HF
 * config keys, read into what bench/*.py's `Qwen3MoeConfig(**model)` takes.
 * @module
 */
import { fileURLToPath } from "node:url";
import { cuda, type Device, type DType } from "../ffi/mod.ts";
import type { MoeConfig } from "../model/config.ts";

/** The HF config keys of a shapes file, without its comment and the keys the benchmark sets itself. */
export async function readShapes(path: string): Promise<Record<string, unknown>> {
  const raw = JSON.parse(await Deno.readTextFile(path)) as Record<string, unknown>;
  const own = ["_comment", "model_type", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id"];
  return Object.fromEntries(Object.entries(raw).filter(([key]) => !own.includes(key)));
}

/**
 * What a random model built from a shapes file is: family, sizes, dtype, device and build time, and on a GPU
 * the memory its weights took.
 */
export function modelLine(path: string, c: MoeConfig, dtype: DType, device: Device, seconds: number): string {
  const line = `${path}: ${c.modelType}, ${c.numHiddenLayers} layers, hidden ${c.hiddenSize}, ` +
    `${c.numExperts} experts top-${c.numExpertsPerTok}; ${dtype} on ${device}; built in ${
      seconds.toFixed(1)
    } s`;
  if (!device.startsWith("cuda")) return line;
  return `${line}\nweights: ${(cuda.memoryStats(device).allocated / 2 ** 30).toFixed(2)} GiB allocated`;
}

/** The small model of bench:generate and bench:rl. */
export const SMALL_SHAPES: string = fileURLToPath(new URL("./shapes/bench-small.json", import.meta.url));
