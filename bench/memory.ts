/**
 * Peak memory of one LoRA training step (forward + backward through the
 * policy, PPO-shaped loss) on a small random-weight MoE: full precision or a
 * 4-bit base (whose backward keeps the dequantised weights, as before, or
 * decodes them again), the LM head's log-softmax over all tokens at once or
 * in chunks, with and without gradient checkpointing. Every ratio is to a
 * variant measured in the same run.
 *
 *   deno task bench:memory                      # CPU: peak resident memory, each variant in its own process
 *   deno task bench:memory --device cuda        # GPU: the CUDA allocator's peak
 *   deno task bench:memory --head-chunk 64      # tokens per LM-head chunk in the chunked variants
 *
 * On the CPU each variant runs in a fresh child process (with glibc told to
 * return large freed blocks to the OS, so RSS follows live memory) and
 * reports its peak RSS (VmHWM) during the measured step above the RSS just
 * before it, so variants cannot inherit each other's high-water mark.
 */
import { benchArgs } from "./cli.ts";
import { cuda, type Device, dispose, type DType, manualSeed, tensor } from "../ffi/mod.ts";
import { parseConfig } from "../model/config.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { randomModel } from "../model/model.ts";
import { type Nf4Backward, quantizeModel } from "../model/nf4.ts";
import { Policy } from "../rl/policy.ts";

const a = benchArgs(
  "deno task bench:memory",
  "Peak memory of a training step, by variant (see bench/memory.ts).",
  {
    device: { type: "string", default: "cpu" },
    dtype: { type: "string", default: "float32" },
    shapes: { type: "string" },
    batch: { type: "string", default: "4" },
    seq: { type: "string", default: "256" },
    // The default policy chunk (512) would cover this bench's 512 completion tokens in one piece.
    "head-chunk": { type: "string", default: "128" },
    variant: { type: "string" }, // internal: run one variant and print JSON
  },
);
const device = a.device as Device, dtype = a.dtype as DType;
const onGpu = device.startsWith("cuda");
const headChunk = Number(a["head-chunk"]);
interface Variant {
  name: string;
  /** null: full precision. */
  nf4: Nf4Backward | null;
  checkpointing: boolean;
  /** LM-head chunk in tokens (0: all at once, the path before chunking). */
  headChunk: number;
}
const variant = (
  name: string,
  nf4: Nf4Backward | null,
  checkpointing: boolean,
  chunked: boolean,
): Variant => ({
  name,
  nf4,
  checkpointing,
  headChunk: chunked ? headChunk : 0,
});
// The first four are the variants as they ran before re-dequantising and chunking (the baselines).
const VARIANTS: Variant[] = [
  variant("full precision", null, false, false),
  variant("full precision + ckpt", null, true, false),
  variant("4-bit, keep dequantised", "keep", false, false),
  variant("4-bit, keep dequantised + ckpt", "keep", true, false),
  variant("4-bit, re-dequantising", "redequantize", false, false),
  variant("full precision, chunked head", null, false, true),
  variant("4-bit, re-dequantising, chunked head", "redequantize", false, true),
  variant("4-bit, re-deq., chunked head + ckpt", "redequantize", true, true),
];

/** A small MoE (Qwen3-MoE layout) unless --shapes names a bench/shapes file. */
function config(): ReturnType<typeof parseConfig> {
  if (a.shapes) return parseConfig(JSON.parse(Deno.readTextFileSync(a.shapes)), a.shapes);
  return parseConfig({
    model_type: "qwen3_moe",
    vocab_size: 8192,
    hidden_size: 512,
    intermediate_size: 1024,
    moe_intermediate_size: 512,
    num_hidden_layers: 8,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    head_dim: 64,
    num_experts: 8,
    num_experts_per_tok: 2,
    norm_topk_prob: true,
    rope_theta: 10000,
  }, "bench/memory.ts");
}

function rssKiB(field: "VmRSS" | "VmHWM"): number {
  const m = Deno.readTextFileSync("/proc/self/status").match(new RegExp(`${field}:\\s+(\\d+) kB`));
  return Number(m![1]);
}

/** Runs one variant in this process: build, quantise, one warm-up and one measured step. */
async function runVariant(v: Variant): Promise<Record<string, number>> {
  manualSeed(0);
  const shapes = config();
  using model = await randomModel(shapes, { dtype, device });
  let weightBytes = 0;
  if (v.nf4) weightBytes = quantizeModel(model, { backward: v.nf4 }).bytesAfter;
  const opts = { lora: { ...DEFAULT_LORA }, checkpointing: v.checkpointing, headChunk: v.headChunk };
  const policy = new Policy(model, opts);
  const b = Number(a.batch), t = Number(a.seq), half = Math.floor(t / 2);
  const ids = Array.from(
    { length: b },
    (_, i) => Array.from({ length: t }, (_, j) => (i * 131 + j * 31) % (shapes.vocabSize - 10) + 10),
  );
  const i64 = { dtype: "int64" as const, device };
  const batch = {
    inputIds: tensor(ids, i64),
    attentionMask: tensor(ids.map((r) => r.map(() => 1)), i64),
    positionIds: tensor(ids.map((r) => r.map((_, j) => j)), i64),
    completionMask: tensor(ids.map((r) => r.map((_, j) => (j >= half ? 1 : 0))), i64),
  };
  const lossFn = (out: Parameters<Parameters<Policy["backward"]>[1]>[0]) =>
    out.logprobs.mul(out.mask).sum().neg().div(out.mask.sum());
  policy.backward(batch, lossFn); // warm-up: allocator pools, kernels
  [...policy.policyParameters(), ...policy.valueParameters()].forEach((p) => p.clearGrad());
  if (onGpu) {
    cuda.synchronize(device);
    cuda.resetPeakMemoryStats(device);
  } else Deno.writeTextFileSync("/proc/self/clear_refs", "5"); // reset VmHWM
  const base = onGpu ? cuda.memoryStats(device).allocated : rssKiB("VmRSS") * 1024;
  const t0 = performance.now();
  policy.backward(batch, lossFn);
  if (onGpu) cuda.synchronize(device);
  const seconds = (performance.now() - t0) / 1000;
  const peak = onGpu ? cuda.memoryStats(device).peakAllocated : rssKiB("VmHWM") * 1024;
  policy.dispose();
  dispose(batch);
  return { base, peak, stepPeak: peak - base, seconds, weightBytes };
}

if (a.variant !== undefined) {
  console.log(JSON.stringify(await runVariant(VARIANTS[Number(a.variant)]!)));
  Deno.exit(0);
}

const cfg = config();
console.log(
  `model: ${cfg.modelType}, ${cfg.numHiddenLayers} layers, hidden ${cfg.hiddenSize}, ${cfg.numExperts} experts ` +
    `top-${cfg.numExpertsPerTok}, vocab ${cfg.vocabSize}; ${dtype} on ${device}; batch ${a.batch} × ${a.seq} tokens ` +
    `(half completion); LoRA r=${DEFAULT_LORA.r} on attention + experts; chunked head: ${headChunk} tokens`,
);
console.log(
  `${"variant".padEnd(38)} ${"step peak".padStart(12)} ${"× first".padStart(8)} ${
    "total peak".padStart(12)
  } ` +
    `${"step s".padStart(7)}`,
);
const mib = (x: number): string => `${(x / 2 ** 20).toFixed(1)} MiB`;
const results = new Map<string, Record<string, number>>();
for (const [i, v] of VARIANTS.entries()) {
  let r: Record<string, number>;
  if (onGpu) {
    r = await runVariant(v);
  } else {
    const args = ["run", "-A", import.meta.filename!, ...Deno.args, `--variant=${i}`];
    // Large blocks from mmap go back to the OS when freed, so RSS follows live memory
    // (glibc would otherwise keep freed heap pages and hide the step's own peak).
    const env = { MALLOC_MMAP_THRESHOLD_: "65536", MALLOC_TRIM_THRESHOLD_: "0" };
    const out = await new Deno.Command(Deno.execPath(), { args, env, stdout: "piped", stderr: "inherit" })
      .output();
    if (!out.success) throw new Error(`variant "${v.name}" failed`);
    r = JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").pop()!);
  }
  results.set(v.name, r);
  const rel = r.stepPeak! / results.get(VARIANTS[0]!.name)!.stepPeak!;
  console.log(
    `${v.name.padEnd(38)} ${mib(r.stepPeak!).padStart(12)} ${rel.toFixed(2).padStart(7)}× ` +
      `${mib(r.peak!).padStart(12)} ${r.seconds!.toFixed(2).padStart(7)}`,
  );
}
/** Step peak of variant a over that of b, both from this run. */
const ratio = (a: string, b: string): string =>
  `${(results.get(a)!.stepPeak! / results.get(b)!.stepPeak!).toFixed(2)}×`;
console.log(
  `checkpointing:                step peak ${ratio("full precision + ckpt", "full precision")} of without`,
);
console.log(
  `4-bit, re-dequantising:       step peak ${
    ratio("4-bit, re-dequantising", "4-bit, keep dequantised")
  } of keeping the dequantised weights`,
);
console.log(
  `chunked head (full precision): step peak ${
    ratio("full precision, chunked head", "full precision")
  } of the unchunked head`,
);
console.log(
  `both (4-bit):                 step peak ${
    ratio("4-bit, re-dequantising, chunked head", "4-bit, keep dequantised")
  } of the 4-bit step before`,
);
