/**
 * Fused attention (libtorch's scaled_dot_product_attention) against the eager
 * path, on a random-weight model with a real model's shapes, in one run:
 *
 *   deno run -A bench/attention.ts --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
 *     --device cuda --dtype bfloat16 --batch 16 --prompt 512 --new 64 [--runs 3]
 *
 * Same model and prompts; the two paths alternate round by round (--runs
 * rounds, medians): prefill seconds, decode tokens/s (dense dispatch) and a
 * training pass (forward and backward over prompt + new tokens); prints the
 * sdpa / eager ratios. Needs a libtorch with SDPA (2.1 or later).
 */
import { benchArgs } from "./cli.ts";
import { cuda, type Device, type DType, manualSeed, tensor, tidy } from "../ffi/mod.ts";
import { parseConfig } from "../model/config.ts";
import { modelLine } from "./shapes.ts";
import { generate } from "../model/generate.ts";
import { type Linear, resolveAttention } from "../model/layers.ts";
import { randomModel } from "../model/model.ts";

const a = benchArgs(
  "deno run -A bench/attention.ts",
  "Fused attention against the eager path (see bench/attention.ts).",
  {
    shapes: { type: "string", default: "bench/shapes/huihui-moe-1b-a0.6b.json" },
    device: { type: "string", default: "cpu" },
    dtype: { type: "string", default: "float32" },
    batch: { type: "string", default: "8" },
    prompt: { type: "string", default: "32" },
    new: { type: "string", default: "32" },
    layers: { type: "string" }, // override num_hidden_layers for a quick CPU try
    runs: { type: "string", default: "3" }, // rounds, alternating the two paths
  },
);
const raw = JSON.parse(await Deno.readTextFile(a.shapes!));
if (a.layers) raw.num_hidden_layers = Number(a.layers);
raw.model_type ??= "qwen3_moe"; // bench-small.json, the small model of bench:generate, leaves it to the bench
const config = parseConfig(raw, a.shapes);
const device = a.device as Device, dtype = a.dtype as DType;
const batch = Number(a.batch), promptLen = Number(a.prompt), newTokens = Number(a.new);
const onGpu = device.startsWith("cuda");
const sync = (): void => onGpu ? cuda.synchronize(device) : undefined;

manualSeed(0);
const t0 = performance.now();
using model = await randomModel(config, {
  dtype,
  device,
  attention: "auto",
});
sync();
console.log(modelLine(a.shapes!, config, dtype, device, (performance.now() - t0) / 1000));

// Prompts: random ids of the full prompt length (uniform length keeps the
// numbers comparable across runs; padding is exercised by the tests).
const prompts = Array.from(
  { length: batch },
  (_, i) =>
    Array.from(
      { length: promptLen },
      (_, j) => (i * 7919 + j * 104729) % (Math.min(config.vocabSize, 30100) - 100) + 100,
    ),
);

async function timeGenerate(dispatch: "loop" | "dense", maxNew: number): Promise<number> {
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

/** Seconds of one training pass: forward over prompt + new tokens and backward into every q projection. */
function timeTrainPass(): number {
  const len = promptLen + newTokens;
  const ids = prompts.map((p) => Array.from({ length: len }, (_, j) => p[j % promptLen]!));
  const params = model.decoder.layers.map((l) => (l.attn.q as Linear).weight);
  sync();
  const start = performance.now();
  tidy(() => {
    params.forEach((p) => p.setRequiresGrad(true));
    try {
      const opts = { dtype: "int64" as const, device };
      const out = model.decoder.forward({
        inputIds: tensor(ids, opts),
        positionIds: tensor(ids.map((r) => r.map((_, j) => j)), opts),
        attentionMask: tensor(ids.map((r) => r.map(() => 1)), opts),
        skipLogits: true, // the LM head's cost is the same on both paths
        dispatch: "dense",
      });
      out.hidden.square().mean().backward();
    } finally {
      params.forEach((p) => {
        p.clearGrad();
        p.setRequiresGrad(false);
      });
    }
  });
  sync();
  return (performance.now() - start) / 1000;
}

const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;

// Same model, same prompts, the two paths alternating round by round so drift in the machine's speed
// falls on both.
const impls = ["eager", "sdpa"] as const;
resolveAttention("sdpa"); // fails clearly on a libtorch without SDPA
const m = new Map(
  impls.map((i) => [i, { prefill: [] as number[], decode: [] as number[], train: [] as number[] }]),
);
for (const impl of impls) {
  model.decoder.attention = impl;
  await timeGenerate("dense", 2); // warm-up
  timeTrainPass();
}
for (let r = 0; r < Number(a.runs); r++) {
  for (const impl of impls) {
    model.decoder.attention = impl;
    const prefill = await timeGenerate("dense", 1), full = await timeGenerate("dense", newTokens);
    const e = m.get(impl)!;
    e.prefill.push(prefill);
    e.decode.push((batch * (newTokens - 1)) / (full - prefill));
    e.train.push(timeTrainPass());
  }
}
console.log(
  `batch ${batch}, prompt ${promptLen}, ${newTokens} new tokens (greedy, no EOS, dense dispatch)`,
);
console.log("attention  prefill s  decode tok/s  train pass s   (medians of " + a.runs + " rounds)");
const med = (i: "eager" | "sdpa") => {
  const e = m.get(i)!;
  return { prefill: median(e.prefill), decode: median(e.decode), train: median(e.train) };
};
for (const impl of impls) {
  const x = med(impl);
  console.log(
    `${impl.padEnd(9)} ${x.prefill.toFixed(3).padStart(10)} ${x.decode.toFixed(1).padStart(13)} ${
      x.train.toFixed(3).padStart(13)
    }`,
  );
}
const [e, f] = [med("eager"), med("sdpa")];
console.log(
  `sdpa / eager: prefill time ×${(f.prefill / e.prefill).toFixed(2)}, decode tok/s ×${
    (f.decode / e.decode).toFixed(2)
  }, train pass time ×${(f.train / e.train).toFixed(2)}`,
);
