/**
 * `deno task bench:update`: the RL update `deno task train` makes with a config (its LoRA, critic, KL,
 * routing replay, micro-batches, 4-bit base if set), on a random model with prompts of random ids (the
 * shapes of --shapes, default bench:generate's small model; bench/shapes/ holds real models'): seconds per
 * update by phase and, on a GPU, the update's peak memory, for each decode mode asked for (--decode, default
 * the config's rollout.decode), with each mode's time as a ratio to the first's (measured in the same run).
 *
 *   deno task bench:update --device cuda --dtype bfloat16 --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
 *     --decode eager,graph                     # the default update: 128 prompts × K 4 × 256 tokens
 *   deno task bench:update --device cuda --dtype bfloat16 --shapes bench/shapes/phi-tiny-moe.json \
 *     --set model.quantize4bit=true --decode graph
 *   deno task bench:update --device cpu --dtype float32 --set train.gradAccum=2 --set rollout.maxNewTokens=16
 *
 * --config and --set are `deno task train`'s (default: configs/default.yaml's values); --device and --dtype
 * override the config's model.device and model.dtype. No completion stops early (no stop tokens), so every one
 * has rollout.maxNewTokens tokens: the update the targets speak of. The reward is the parity of the
 * token ids (bench/parity_reward.ts). Each mode runs a short warm-up update (32 new tokens) first, then
 * --updates timed ones; on a GPU the peak is the CUDA allocator's over the timed updates, allocated (what the
 * tensors needed) and reserved (what the caching allocator held from the driver: what has to fit the device).
 */
import { cuda, type Device, type DType, manualSeed, torchVersion, useAvailableCores } from "../ffi/mod.ts";
import type { DecodeMode } from "../model/decode_static.ts";
import { randomModel } from "../model/model.ts";
import { quantizeModel } from "../model/nf4.ts";
import { collect } from "../rl/collect.ts";
import { learn } from "../rl/learn.ts";
import { parseCommandLine } from "../train/cli.ts";
import { loadTrainConfig, promptsPerUpdate } from "../train/config.ts";
import { configuredOptimizer, configuredPolicy } from "../train/model.ts";
import { parityReward } from "./parity_reward.ts";
import { SMALL_SHAPES } from "./shapes.ts";
import { shapesModelConfig, SILENT_TOKENIZER, syntheticPrompts } from "./synthetic.ts";

const USAGE = "usage: deno task bench:update [--config F] [--set key=value ...] [--shapes F] [--device D] " +
  "[--dtype T] [--decode eager,static,graph] [--prompt-len 160] [--updates 1]";
const parsed = parseCommandLine("bench:update", USAGE, Deno.args, {
  config: { type: "string" },
  set: { type: "string", multiple: true },
  shapes: { type: "string" },
  device: { type: "string" },
  dtype: { type: "string" },
  decode: { type: "string" },
  // GSM8K questions in the chat template with the default instruction run to about this many tokens.
  "prompt-len": { type: "string", default: "160" },
  updates: { type: "string", default: "1" },
});
if (typeof parsed === "number") Deno.exit(parsed);
const a = parsed.values;

const cfg = await loadTrainConfig(a.config, a.set ?? []);
const device = (a.device ?? cfg.model.device) as Device, dtype = (a.dtype ?? cfg.model.dtype) as DType;
const onGpu = device.startsWith("cuda");
if (onGpu && !cuda.isAvailable()) {
  console.error(
    `bench:update: device ${device} (--device, else the config's model.device), but CUDA is not ` +
      "available here: pass --device cpu --dtype float32",
  );
  Deno.exit(2);
}
const modes = (a.decode ?? cfg.rollout.decode).split(",").map((m) => m.trim()) as DecodeMode[];
const updates = Number(a.updates), promptLen = Number(a["prompt-len"]);
if (!(Number.isSafeInteger(updates) && updates > 0)) throw new RangeError(`--updates: expected >= 1`);
if (!(Number.isSafeInteger(promptLen) && promptLen > 0)) throw new RangeError(`--prompt-len: expected >= 1`);
const shapesPath = a.shapes ?? SMALL_SHAPES;
const config = await shapesModelConfig(shapesPath);
const threads = useAvailableCores();
const gib = (bytes: number): string => (bytes / 2 ** 30).toFixed(2);
const sync = (): void => onGpu ? cuda.synchronize(device) : undefined;

manualSeed(cfg.seed);
const t0 = performance.now();
using model = await randomModel(config, { dtype, device, attention: cfg.model.attention });
if (cfg.model.quantize4bit) quantizeModel(model, { doubleQuant: cfg.model.doubleQuant });
const policy = configuredPolicy(model, cfg);
using opt = configuredOptimizer(policy, cfg);
sync();
const nPrompts = promptsPerUpdate(cfg), k = cfg.rollout.k, newTokens = cfg.rollout.maxNewTokens;
const prompts = syntheticPrompts(nPrompts, config.vocabSize, () => promptLen);
console.log(
  `bench:update — ${shapesPath}: ${config.modelType}, ${config.numHiddenLayers} layers, hidden ${config.hiddenSize}, ` +
    `${config.numExperts} experts top-${config.numExpertsPerTok}; ${dtype} on ${device}` +
    `${cfg.model.quantize4bit ? ", 4-bit base" : ""}; libtorch ${torchVersion()}, ${threads} threads`,
);
console.log(
  `${nPrompts} prompts of ${promptLen} tokens × K ${k} × ${newTokens} new tokens, passes of ${cfg.train.microBatch} ` +
    `prompts; LoRA r${cfg.lora.r} on ${[cfg.lora.targetModules].flat().join("/")}` +
    `${
      cfg.lora.targetExperts ? " + experts" : ""
    }; ppo.advantage ${cfg.ppo.advantage}, KL ${cfg.ppo.klCoef}; ` +
    `model and policy ready in ${((performance.now() - t0) / 1000).toFixed(1)} s` +
    (onGpu ? `, ${gib(cuda.memoryStats(device).allocated)} GiB allocated` : ""),
);

/** One collect → learn update as the training loop makes it; seconds by phase. */
async function update(
  decode: DecodeMode,
  maxNewTokens: number,
  seed: number,
): Promise<Record<string, number>> {
  const rl = {
    rollout: { ...cfg.rollout, decode, maxNewTokens },
    ppo: cfg.ppo,
    reward: cfg.reward,
    moe: cfg.moe,
  };
  const start = performance.now();
  using buffer = await collect(policy, SILENT_TOKENIZER, prompts, rl, { seed, score: parityReward });
  const learned = learn(policy, opt, buffer, rl, {
    microBatch: cfg.train.microBatch * k,
    maxGradNorm: cfg.train.maxGradNorm,
    seed,
  });
  sync();
  const m = buffer.metrics;
  return {
    prefill: m.prefill_seconds,
    decode: m.decode_seconds,
    scoring: m.scoring_seconds,
    "reference+critic": learned.reference_seconds,
    old: learned.old_seconds,
    learn: learned.learn_seconds,
    total: (performance.now() - start) / 1000,
    tokS: m.tokens_per_second,
  };
}

const rows: { mode: DecodeMode; phases: Record<string, number>; peak: [number, number] | null }[] = [];
try {
  for (const mode of modes) {
    await update(mode, Math.min(32, newTokens), 1); // warm-up: kernels, allocator, first captures
    if (onGpu) cuda.resetPeakMemoryStats(device);
    const sums: Record<string, number> = {};
    for (let u = 0; u < updates; u++) {
      for (const [p, s] of Object.entries(await update(mode, newTokens, 100 + u))) {
        sums[p] = (sums[p] ?? 0) + s / updates;
      }
    }
    const stats = onGpu ? cuda.memoryStats(device) : null;
    rows.push({ mode, phases: sums, peak: stats && [stats.peakAllocated, stats.peakReserved] });
  }
} finally {
  policy.dispose();
}
const first = rows[0]!.phases.total!;
const phases = ["prefill", "decode", "scoring", "reference+critic", "old", "learn"];
console.log(
  [
    "decode",
    "s/update",
    "× first",
    ...phases.map((p) => `${p} s`),
    "generation tok/s",
    "peak GiB (allocated/reserved)",
  ].join(
    " | ",
  ),
);
for (const r of rows) {
  const p = r.phases;
  console.log(
    [
      r.mode,
      p.total!.toFixed(2),
      (p.total! / first).toFixed(2),
      ...phases.map((ph) => p[ph]!.toFixed(2)),
      p.tokS!.toFixed(0),
      r.peak === null ? "-" : `${gib(r.peak[0])}/${gib(r.peak[1])}`,
    ].join(" | "),
  );
}
