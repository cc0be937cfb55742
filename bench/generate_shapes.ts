/**
 * Generation throughput of a random-weight model with a real model's shapes
 * (bench/shapes/*.json), for GPU runs where the real weights are out of reach.
 *
 *   deno run -A bench/generate_shapes.ts --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
 *     --device cuda --dtype bfloat16 --batch 32 --prompt 64 --new 128
 *
 * Prints prefill time, decode tokens/s for each MoE dispatch mode and decode
 * mode, and peak CUDA memory. Random weights make the text meaningless but not
 * the cost: with no EOS every row decodes all --new tokens.
 *
 * Decode modes (model/generate.ts `decodeMode`), compared in one run:
 *
 *   deno run -A bench/generate_shapes.ts --device cuda --dtype bfloat16 --dispatch dense \
 *     --decode eager,static,graph --batch 16,64,256 --prompt 128 --new 128
 *
 * "static" and "graph" keep one DecodeSession per row of the table, so the
 * graphs are captured in the warm-up run (its time is the "first s" column)
 * and the timed runs replay them. On a CPU "graph" runs the static-buffer steps without graphs (= static).
 *
 * With LoRA adapters (--lora R: rank R, α = 2R, on every linear layer and expert, as the default config), a
 * bfloat16 model casts its float32 adapters in each forward. Collect holds those casts for all its decode steps
 * (model/lora.ts AdapterCasts); `--casts held,fresh` times both ways, and the last lines give held / fresh:
 *
 *   deno run -A bench/generate_shapes.ts --device cuda --dtype bfloat16 --lora 16 --casts held,fresh \
 *     --dispatch dense --decode eager,graph --batch 64,256
 */
import { benchArgs } from "./cli.ts";
import { cuda, type Device, type DType, manualSeed } from "../ffi/mod.ts";
import { parseConfig } from "../model/config.ts";
import { modelLine } from "./shapes.ts";
import { BANDWIDTH_FORMULA, boundTokensPerSecond, decodeStepBytes } from "./bandwidth.ts";
import { DECODE_MODES, type DecodeMode, DecodeSession } from "../model/decode_static.ts";
import { generate } from "../model/generate.ts";
import { DEFAULT_LORA, LoraModel } from "../model/lora_apply.ts";
import { ATTENTION_CHECK, type AttentionImpl } from "../model/layers.ts";
import { randomModel } from "../model/model.ts";
import type { MoeDispatch } from "../model/moe.ts";

const a = benchArgs(
  "deno run -A bench/generate_shapes.ts",
  "Decode tokens/s and bandwidth use at a real model's shapes (see bench/generate_shapes.ts).",
  {
    shapes: { type: "string", default: "bench/shapes/huihui-moe-1b-a0.6b.json" },
    device: { type: "string", default: "cpu" },
    dtype: { type: "string", default: "float32" },
    batch: { type: "string", default: "8" }, // a comma list runs each size
    dispatch: { type: "string", default: "dense,loop" }, // and grouped, where libtorch has it
    decode: { type: "string", default: "eager" }, // eager,static,graph
    prompt: { type: "string", default: "32" },
    new: { type: "string", default: "32" },
    layers: { type: "string" }, // override num_hidden_layers for a quick CPU try
    attention: { type: "string", default: "auto" }, // auto | sdpa | eager (bench/attention.ts compares them)
    bandwidth: { type: "string" }, // GB/s of the device's memory, for the bound (default 4800, an H200, on CUDA)
    lora: { type: "string", default: "0" }, // adapter rank (0: none)
    casts: { type: "string", default: "held" }, // held,fresh: adapter casts kept across steps or made per step
  },
);
const raw = JSON.parse(await Deno.readTextFile(a.shapes!));
if (a.layers) raw.num_hidden_layers = Number(a.layers);
raw.model_type ??= "qwen3_moe"; // bench-small.json, the small model of bench:generate, leaves it to the bench
const config = parseConfig(raw, a.shapes);
const device = a.device as Device, dtype = a.dtype as DType;
const batches = a.batch!.split(",").map(Number), promptLen = Number(a.prompt), newTokens = Number(a.new);
const dispatches = a.dispatch!.split(",") as MoeDispatch[];
const decodes = a.decode!.split(",") as DecodeMode[];
if (decodes.some((d) => !(DECODE_MODES as readonly string[]).includes(d))) {
  throw new Error(`--decode ${a.decode}`);
}
if (dispatches.some((d) => !["loop", "dense", "grouped"].includes(d))) {
  throw new Error(`--dispatch ${a.dispatch}`);
}
const rank = Number(a.lora);
if (!Number.isSafeInteger(rank) || rank < 0) {
  throw new Error(`--lora: expected an integer >= 0, got ${a.lora}`);
}
const castModes = a.casts!.split(",");
if (castModes.some((c) => c !== "held" && c !== "fresh")) throw new Error(`--casts ${a.casts}: held, fresh`);
const onGpu = device.startsWith("cuda");
const bandwidth = a.bandwidth ? Number(a.bandwidth) : onGpu ? 4800 : null;
const elementBytes = dtype === "float32" ? 4 : 2;
const sync = (): void => onGpu ? cuda.synchronize(device) : undefined;

manualSeed(0);
const t0 = performance.now();
if (!ATTENTION_CHECK.ok(a.attention)) throw new Error(`--attention: expected ${ATTENTION_CHECK.expected}`);
using model = await randomModel(config, { dtype, device, attention: a.attention as AttentionImpl });
sync();
console.log(modelLine(a.shapes!, config, dtype, device, (performance.now() - t0) / 1000));
using lora = rank > 0
  ? new LoraModel(model.decoder, config, { ...DEFAULT_LORA, r: rank, alpha: 2 * rank })
  : null;
if (lora) console.log(`LoRA r${rank}: ${lora.trainableCount().toLocaleString("en-US")} float32 parameters`);

// Prompts: random ids of the full prompt length (uniform length keeps the
// numbers comparable across runs; padding is exercised by the tests).
const promptsOf = (batch: number): number[][] =>
  Array.from(
    { length: batch },
    (_, i) =>
      Array.from({ length: promptLen }, (_, j) => 2 + (i * 7919 + j * 104729) % (config.vocabSize - 2)),
  );

interface Setting {
  prompts: number[][];
  dispatch: MoeDispatch;
  decodeMode: DecodeMode;
  session: DecodeSession | null;
  casts: string;
}

async function timeGenerate(x: Setting, maxNew: number): Promise<number> {
  sync();
  using _casts = x.casts === "held" ? lora?.state.holdCasts() ?? null : null;
  const start = performance.now();
  const out = await generate(model.decoder, x.prompts, {
    maxNewTokens: maxNew,
    eosTokenIds: [],
    dispatch: x.dispatch,
    checkEvery: 16,
    decodeMode: x.decodeMode,
    session: x.session ?? undefined,
  });
  sync();
  if (out.tokens.some((r) => r.length !== maxNew)) throw new Error("a row stopped early");
  return (performance.now() - start) / 1000;
}

const rows: string[] = [];
const rates = new Map<string, number>(); // decode tok/s by batch/dispatch/decode/casts
for (const batch of batches) {
  for (const dispatch of dispatches) {
    for (const decodeMode of decodes) {
      for (const casts of lora ? castModes : ["-"]) {
        if (decodeMode === "graph" && dispatch === "loop" && onGpu) continue; // loop syncs: not capturable
        using session = decodeMode === "eager"
          ? null
          : new DecodeSession(model.decoder, { graphs: decodeMode === "graph" });
        const x: Setting = { prompts: promptsOf(batch), dispatch, decodeMode, session, casts };
        // Warm-up at the full length: allocator, kernels, cuBLAS handles, and every graph's capture.
        const first = await timeGenerate(x, newTokens);
        if (onGpu) cuda.resetPeakMemoryStats(device);
        const prefill = Math.min(await timeGenerate(x, 1), await timeGenerate(x, 1)); // prefill + 1 step
        const full = await timeGenerate(x, newTokens);
        const decodeRate = (batch * (newTokens - 1)) / (full - prefill);
        rates.set(`${batch}/${dispatch}/${decodeMode}/${casts}`, decodeRate);
        const peak = onGpu ? `${(cuda.memoryStats(device).peakAllocated / 2 ** 30).toFixed(2)} GiB` : "-";
        const graphs = session ? String(session.stats.captures) : "-";
        // The bound at the mean context of the decode steps.
        const bytes = decodeStepBytes(config, batch, promptLen + newTokens / 2, elementBytes);
        const bound = bandwidth === null ? null : boundTokensPerSecond(bytes, batch, bandwidth);
        const mbu = bound === null ? "-" : `${(100 * decodeRate / bound).toFixed(1)}%`;
        rows.push(
          `${String(batch).padStart(5)}  ${dispatch.padEnd(8)} ${decodeMode.padEnd(7)} ${casts.padEnd(6)} ${
            first.toFixed(2).padStart(7)
          } ` +
            `${prefill.toFixed(3).padStart(9)} ${full.toFixed(2).padStart(8)} ` +
            `${(batch * newTokens / full).toFixed(1).padStart(13)} ${decodeRate.toFixed(1).padStart(12)} ` +
            `${graphs.padStart(6)} ${peak.padStart(10)} ${
              (bound === null ? "-" : bound.toFixed(0)).padStart(11)
            } ` +
            `${mbu.padStart(6)}`,
        );
        console.log(rows.at(-1));
      }
    }
  }
}
console.log(
  `prompt ${promptLen}, ${newTokens} new tokens (greedy, no EOS); first = warm-up run incl. captures`,
);
console.log(
  "batch  dispatch decode  casts    first s  prefill s  total s  overall tok/s  decode tok/s graphs  peak mem " +
    "bound tok/s    MBU",
);
console.log(
  `bound: ${BANDWIDTH_FORMULA}, at BW = ${bandwidth ?? "(give --bandwidth)"} GB/s, b = ${elementBytes}, ` +
    `ctx = prompt + new/2 = ${promptLen + newTokens / 2}`,
);
for (const r of rows) console.log(r);
if (lora && dtype === "float32") {
  console.log("float32 model: its float32 adapters need no cast, held or fresh");
}
for (const [key, held] of rates) {
  const fresh = key.endsWith("/held") ? rates.get(key.replace(/held$/, "fresh")) : undefined;
  if (fresh !== undefined) {
    console.log(
      `held / fresh casts, decode tok/s at ${key.replace(/\/held$/, "")}: ${(held / fresh).toFixed(2)}x`,
    );
  }
}
