/**
 * `deno task bench:rl`: seconds per RL update, by phase, for moerl's
 * collect → learn update, side by side with TRL's `GRPOTrainer`
 * (transformers `generate` + PEFT LoRA, no vLLM) on the same checkpoint,
 * prompts, K, token cap, temperature and KL coefficient, in one run; prints
 * both and their ratio.
 *
 *   deno task bench:rl [--pairs 3] [--updates 5]
 *   deno task bench:rl --device cuda --dtype bfloat16 --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
 *     [--prompts 128 --k 4 --new 256 --micro 32] [--decode graph] [--decode-dispatch dense] [--lora default]
 *     [--variants token_value]
 *
 * bench/rl.py builds a random Qwen3-MoE (the bench:generate shapes by
 * default, or --shapes) and a word-level tokenizer into a temp folder; both
 * sides load that folder. The reward is the parity of the sum of a
 * completion's token ids (the same function on both sides: random weights
 * earn no GSM8K reward, and a reward with spread makes both sides run their
 * backward passes). Each side: one warm-up update, then --updates timed
 * ones; the sides alternate, never run at once. LoRA (r 16, α 32) on
 * q/k/v/o, or with --lora default where the default config puts it (every
 * linear layer and both expert parameters: PEFT's target_parameters) on both
 * sides; an update is --prompts prompts of --prompt-len to --prompt-len + 14
 * tokens × --k completions of up to --new tokens, learnt in --micro
 * micro-batches (TRL: gradient accumulation steps; moerl: forward/backward
 * passes). TRL's router load-balancing loss is switched off, as moerl's is.
 * Not the same work: moerl's policy steps skip groups whose rewards are all
 * equal (no advantage), TRL's train on them; the share is printed. moerl runs its defaults (token
 * critic, routing replay, rollout correction) and, for comparison, the group
 * baseline without a critic (--variants picks either or both). --decode and
 * --decode-dispatch set moerl's rollout.decode and rollout.decodeDispatch
 * (the config's defaults otherwise).
 *
 * Threads: as bench:generate, OMP_NUM_THREADS is set to the logical CPU
 * count unless already set, for both processes.
 *
 * Env: MOERL_BENCH_PYTHON (default python3) needs torch, transformers, peft
 * and trl (scripts/requirements-fixtures.txt plus trl).
 */
import { benchArgs } from "./cli.ts";
import {
  cuda,
  type Device,
  type DType,
  Generator,
  manualSeed,
  torchVersion,
  useAvailableCores,
} from "../ffi/mod.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import type { RolloutPrompt } from "../rl/rollout_buffer.ts";
import { rlConfig, type RlOverrides, type RolloutConfig } from "../rl/config.ts";
import type { DecodeMode } from "../model/decode_static.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { learn } from "../rl/learn.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { parityReward } from "./parity_reward.ts";
import { runPythonJson } from "./python.ts";
import { readShapes, SMALL_SHAPES } from "./shapes.ts";
import { syntheticPrompts } from "./synthetic.ts";

const a = benchArgs("deno task bench:rl", "Seconds per RL update, moerl against TRL (see bench/rl.ts).", {
  pairs: { type: "string", default: "3" },
  updates: { type: "string", default: "5" },
  prompts: { type: "string", default: "8" },
  k: { type: "string", default: "4" },
  new: { type: "string", default: "64" },
  "prompt-len": { type: "string", default: "16" },
  micro: { type: "string", default: "4" },
  device: { type: "string", default: "cpu" },
  dtype: { type: "string", default: "float32" },
  shapes: { type: "string" },
  "skip-trl": { type: "boolean", default: false },
  decode: { type: "string" },
  "decode-dispatch": { type: "string" },
  lora: { type: "string", default: "qkvo" },
  variants: { type: "string", default: "token_value,group" },
});
if (!Deno.env.get("OMP_NUM_THREADS")) Deno.env.set("OMP_NUM_THREADS", String(navigator.hardwareConcurrency));
const PYTHON = Deno.env.get("MOERL_BENCH_PYTHON") ?? "python3";
const device = a.device as Device, dtype = a.dtype as DType, onGpu = device !== "cpu";
const nPrompts = Number(a.prompts), k = Number(a.k), newTokens = Number(a.new), micro = Number(a.micro);
const updates = Number(a.updates), pairs = Number(a.pairs);
const PAD = 0, EOS = 1;
if (a.lora !== "qkvo" && a.lora !== "default") throw new RangeError(`--lora: qkvo or default, got ${a.lora}`);
const variants = a.variants.split(",").map((v) => v.trim());
for (const v of variants) {
  if (v !== "token_value" && v !== "group") {
    throw new RangeError(`--variants: token_value and/or group, got ${v}`);
  }
}
// Checked by rlConfig with the rest of the update's settings (a bad value is a RangeError naming the key).
const rollout: RlOverrides["rollout"] = {
  k,
  maxNewTokens: newTokens,
  ...(a.decode ? { decode: a.decode as DecodeMode } : {}),
  ...(a["decode-dispatch"]
    ? { decodeDispatch: a["decode-dispatch"] as RolloutConfig["decodeDispatch"] }
    : {}),
};
rlConfig({ rollout });

// The bench:generate model unless --shapes names a real model's (random weights either way).
const model = await readShapes(a.shapes ?? SMALL_SHAPES);
const vocab = model.vocab_size as number;
/** Prompts of random ids (never PAD or EOS), lengths --prompt-len to --prompt-len + 14. */
const promptLen = Number(a["prompt-len"]);
if (!(Number.isSafeInteger(promptLen) && promptLen >= 1)) throw new RangeError(`--prompt-len: expected >= 1`);
const prompts: RolloutPrompt[] = syntheticPrompts(nPrompts, vocab, (i) => promptLen + (i * 2) % 16);
const promptIds = prompts.map((p) => p.ids);
const dir = await Deno.makeTempDir({ prefix: "moerl_bench_rl_" });
const common = {
  dir,
  seed: 1234,
  padTokenId: PAD,
  eosTokenId: EOS,
  initStd: 0.1,
  dtype,
  device,
  model,
  prompts: promptIds,
  k,
  newTokens,
  microBatches: micro,
  updates,
  klCoef: 0.04,
  learningRate: 1e-5,
  lora: a.lora === "default"
    ? {
      r: 16,
      alpha: 32,
      targetModules: [...DEFAULT_LORA.targetModules],
      targetParameters: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    }
    : { r: 16, alpha: 32, targetModules: ["q_proj", "k_proj", "v_proj", "o_proj"], targetParameters: [] },
};

interface Phases {
  [phase: string]: number;
}

/** One moerl run: a warm-up update and `updates` timed ones; mean seconds per phase. */
async function moerl(
  advantage: "token_value" | "group",
): Promise<{ phases: Phases; peak: number | null; tokS: number; flat: number }> {
  manualSeed(1234);
  using m = await loadModel(dir, { dtype, device });
  const tok = await Tokenizer.load(dir);
  const lora = a.lora === "default"
    ? { ...DEFAULT_LORA, targetModules: [...DEFAULT_LORA.targetModules] }
    : { r: 16, alpha: 32, dropout: 0, targetModules: common.lora.targetModules, targetExperts: false };
  const policy = new Policy(m, { lora });
  using opt = policyOptimizer(policy, { learningRate: 1e-5 });
  const cfg: RlOverrides = {
    rollout,
    ppo: { klCoef: common.klCoef, entropyCoef: 0, advantage },
  };
  const sums: Phases = {};
  let tokens = 0, decodeSeconds = 0, flat = 0;
  if (onGpu) cuda.resetPeakMemoryStats(device);
  try {
    for (let u = 0; u <= updates; u++) {
      const t0 = performance.now();
      using g = new Generator(100 + u, device);
      using buf = await collect(policy, tok, prompts, cfg, {
        generator: g,
        score: parityReward,
        stopTokenIds: [EOS],
      });
      const l = learn(policy, opt, buf, cfg, { microBatch: (nPrompts * k) / micro, seed: u });
      if (onGpu) cuda.synchronize(device);
      const total = (performance.now() - t0) / 1000;
      if (u === 0) continue; // warm-up
      const mm = buf.metrics;
      const phases: Phases = {
        prefill: mm.prefill_seconds,
        decode: mm.decode_seconds,
        scoring: mm.scoring_seconds,
        "reference+critic": l.reference_seconds,
        old: l.old_seconds,
        learn: l.learn_seconds,
        total,
      };
      for (const [p, s] of Object.entries(phases)) sums[p] = (sums[p] ?? 0) + s / updates;
      tokens += mm.tokens_generated;
      flat += l.frac_zero_std_groups / updates;
      decodeSeconds += mm.prefill_seconds + mm.decode_seconds;
    }
    return {
      phases: sums,
      peak: onGpu ? cuda.memoryStats(device).peakAllocated : null,
      tokS: tokens / decodeSeconds,
      flat,
    };
  } finally {
    policy.dispose();
  }
}

interface TrlRun {
  torch: string;
  transformers: string;
  trl: string;
  threads: number;
  experts: string | null;
  seconds: number[];
  peak_bytes: number | null;
}

const fail = (msg: string): never => {
  throw new Error(
    `${msg}\nIt needs a Python with torch, transformers, peft and trl:\n` +
      "  python3 -m venv ../moerl-venv && ../moerl-venv/bin/pip install -r scripts/requirements-fixtures.txt trl\n" +
      "  MOERL_BENCH_PYTHON=../moerl-venv/bin/python deno task bench:rl",
  );
};
let status = 0;
try {
  const built = await runPythonJson<{ built: string }>(PYTHON, "rl.py", { ...common, mode: "build" });
  if (typeof built === "string") fail(built);
  const threads = useAvailableCores();
  const mean = (xs: number[]): number => xs.reduce((s, x) => s + x, 0) / xs.length;
  const fmt = (s: number): string => s.toFixed(2).padStart(7);
  console.log(
    `bench:rl — ${nPrompts} prompts × K ${k} × ≤ ${newTokens} tokens per update, ${micro} micro-batches, ` +
      `prompts of ${promptLen}-${promptLen + 14} tokens, ` +
      `LoRA r16 ${a.lora === "default" ? "on every linear layer and expert" : "on q/k/v/o"} (both sides), ` +
      `KL ${common.klCoef}; decode ${
        rlConfig({ rollout }).rollout.decode
      }; ${updates} timed updates after a warm-up, ${pairs} pair(s); ` +
      `${a.shapes ?? "bench:generate shapes"}; ${dtype} on ${device}`,
  );
  console.log(`moerl: libtorch ${torchVersion()}, ${threads} threads`);
  const ratios: number[] = [];
  for (let p = 0; p < pairs; p++) {
    // moerl first: a run cut short by a time limit still has its figures.
    const totals = new Map<string, number>();
    for (const advantage of variants as ("token_value" | "group")[]) {
      const r = await moerl(advantage);
      const line = Object.entries(r.phases).map(([ph, s]) => `${ph} ${s.toFixed(2)}`).join(", ");
      const peak = r.peak === null ? "" : `, peak ${(r.peak / 2 ** 30).toFixed(2)} GiB`;
      totals.set(advantage, r.phases.total!);
      console.log(
        `pair ${p + 1}: moerl (${advantage.padEnd(11)}) ${fmt(r.phases.total!)} s/update  ` +
          `[${line}; generation ${r.tokS.toFixed(0)} tok/s${peak}; ` +
          `${(100 * r.flat).toFixed(0)}% of groups without reward spread, skipped by moerl's policy steps, ` +
          "trained on by TRL's]",
      );
    }
    if (a["skip-trl"]) continue;
    const trl = await runPythonJson<TrlRun>(PYTHON, "rl.py", { ...common, mode: "run" });
    if (typeof trl === "string") fail(trl);
    const t = trl as TrlRun;
    const trlMean = mean(t.seconds);
    if (p === 0) {
      console.log(
        `TRL ${t.trl}: torch ${t.torch}, transformers ${t.transformers}, ${t.threads} threads, experts ${t.experts}`,
      );
    }
    const peak = t.peak_bytes === null ? "" : `, peak ${(t.peak_bytes / 2 ** 30).toFixed(2)} GiB`;
    console.log(
      `pair ${p + 1}: TRL GRPOTrainer ${fmt(trlMean)} s/update (${
        t.seconds.map((s) => s.toFixed(2)).join(", ")
      })${peak}`,
    );
    for (const [advantage, total] of totals) {
      if (advantage === variants[0]) ratios.push(total / trlMean);
      console.log(`pair ${p + 1}: moerl (${advantage.padEnd(11)}) = ${(total / trlMean).toFixed(2)} × TRL`);
    }
  }
  if (ratios.length) {
    console.log(
      `moerl (${variants[0]}) / TRL seconds per update: ${ratios.map((r) => r.toFixed(2)).join(", ")}`,
    );
  }
} catch (e) {
  console.error(`bench:rl: ${(e as Error).message}`);
  status = 1;
} finally {
  await Deno.remove(dir, { recursive: true });
}
Deno.exit(status);
