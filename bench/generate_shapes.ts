/**
 * Generation throughput of a random-weight model with a real model's shapes
 * (bench/shapes/*.json), for GPU runs where the real weights are out of reach.
 *
 *   deno run -A bench/generate_shapes.ts --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
 *     --device cuda --dtype bfloat16 --batch 32 --prompt 64 --new 128
 *
 * Prints prefill time, decode tokens/s for each MoE dispatch mode ("grouped"
 * where libtorch has grouped GEMM), and peak
 * CUDA memory. Random weights make the text meaningless but not the cost:
 * with no EOS every row decodes all --new tokens.
 */
import { parseArgs } from "node:util";
import { cuda, type Device, type DType, groupedMmAvailable, manualSeed } from "../ffi/mod.ts";
import { parseConfig } from "../model/config.ts";
import { generate } from "../model/generate.ts";
import { randomModel } from "../model/model.ts";
import type { MoeDispatch } from "../model/moe.ts";

const { values: a } = parseArgs({
  options: {
    shapes: { type: "string", default: "bench/shapes/huihui-moe-1b-a0.6b.json" },
    device: { type: "string", default: "cpu" },
    dtype: { type: "string", default: "float32" },
    batch: { type: "string", default: "8" },
    prompt: { type: "string", default: "32" },
    new: { type: "string", default: "32" },
    layers: { type: "string" }, // override num_hidden_layers for a quick CPU try
  },
});
const raw = JSON.parse(await Deno.readTextFile(a.shapes!));
if (a.layers) raw.num_hidden_layers = Number(a.layers);
const config = parseConfig(raw, a.shapes);
const device = a.device as Device, dtype = a.dtype as DType;
const batch = Number(a.batch), promptLen = Number(a.prompt), newTokens = Number(a.new);
const onGpu = device.startsWith("cuda");
const sync = (): void => onGpu ? cuda.synchronize(device) : undefined;

manualSeed(0);
const t0 = performance.now();
using model = await randomModel(config, { dtype, device });
sync();
console.log(
  `${a.shapes}: ${config.modelType}, ${config.numHiddenLayers} layers, hidden ${config.hiddenSize}, ` +
    `${config.numExperts} experts top-${config.numExpertsPerTok}; ${dtype} on ${device}; built in ${
      ((performance.now() - t0) / 1000).toFixed(1)
    } s`,
);
if (onGpu) console.log(`weights: ${(cuda.memoryStats(device).allocated / 2 ** 30).toFixed(2)} GiB allocated`);

// Prompts: random ids of the full prompt length (uniform length keeps the
// numbers comparable across runs; padding is exercised by the tests).
const prompts = Array.from(
  { length: batch },
  (_, i) => Array.from({ length: promptLen }, (_, j) => (i * 7919 + j * 104729) % 30000 + 100),
);

async function timeGenerate(dispatch: MoeDispatch, maxNew: number): Promise<number> {
  sync();
  const start = performance.now();
  const out = await generate(model.decoder, prompts, {
    maxNewTokens: maxNew,
    eosTokenIds: [],
    dispatch,
    checkEvery: 16,
  });
  sync();
  if (out.tokens.some((r) => r.length !== maxNew)) throw new Error("a row stopped early");
  return (performance.now() - start) / 1000;
}

const rows: string[] = [];
const modes: MoeDispatch[] = ["dense", "loop", ...(groupedMmAvailable() ? ["grouped" as const] : [])];
for (const dispatch of modes) {
  await timeGenerate(dispatch, 4); // warm-up: allocator, kernels, cuBLAS handles
  if (onGpu) cuda.resetPeakMemoryStats(device);
  const prefill = Math.min(await timeGenerate(dispatch, 1), await timeGenerate(dispatch, 1)); // prefill + 1 step
  const full = await timeGenerate(dispatch, newTokens);
  const decodeRate = (batch * (newTokens - 1)) / (full - prefill);
  const peak = onGpu ? `${(cuda.memoryStats(device).peakAllocated / 2 ** 30).toFixed(2)} GiB` : "-";
  rows.push(
    `${dispatch.padEnd(8)} ${prefill.toFixed(3).padStart(9)} ${full.toFixed(2).padStart(8)} ` +
      `${(batch * newTokens / full).toFixed(1).padStart(12)} ${decodeRate.toFixed(1).padStart(12)} ${
        peak.padStart(10)
      }`,
  );
}
console.log(`batch ${batch}, prompt ${promptLen}, ${newTokens} new tokens (greedy, no EOS)`);
console.log("dispatch  prefill s   total s   overall tok/s  decode tok/s  peak mem");
for (const r of rows) console.log(r);
