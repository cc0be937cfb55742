/**
 * `deno task bench:dp`: seconds per RL update (collect + learn) with the
 * update's prompts split over 1 or more processes, in one run, against a
 * single process without a process group measured in the same run; and the
 * cost of the collectives alone (the summed gradient buffers per update).
 *
 *   deno task bench:dp [--procs 1,2] [--updates 4] [--prompts 8] [--k 4] [--new 32] [--micro 4]
 *   deno task bench:dp --device cuda --dtype bfloat16 --shapes bench/shapes/huihui-moe-1b-a0.6b.json --procs 1
 *
 * Each variant starts its processes with `train/launch.ts spawnLocal` (the
 * `--nproc` launcher): "none" is one process with no group, "N" is N ranks
 * joined over Gloo (CPU) or NCCL (GPU, one device each), so "1" shows what
 * the group itself costs. Every process builds the same random model (the
 * bench:generate shapes unless --shapes) and LoRA (r 16, α 32 on q/k/v/o),
 * and draws the same prompts; ranks split them. The reward is the parity of
 * a completion's token ids (random weights earn no GSM8K reward; a reward
 * with spread makes every rank run its backward passes); no stop token, so
 * every completion has --new tokens. CPU threads: the machine's cores
 * shared evenly by the processes of a variant (OMP_NUM_THREADS overrides).
 */
import { join } from "node:path";
import { benchArgs } from "./cli.ts";
import { type Device, type DType, manualSeed, tidy, torchVersion, useAvailableCores } from "../ffi/mod.ts";
import { randomModel } from "../model/model.ts";
import { collect } from "../rl/collect.ts";
import type { RlOverrides } from "../rl/config.ts";
import { learn } from "../rl/learn.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { parityReward } from "./parity_reward.ts";
import { distTimeoutSeconds, joinReplicas, launchEnv, rankDevice, spawnLocal } from "../train/launch.ts";
import { SMALL_SHAPES } from "./shapes.ts";
import { shapesModelConfig, SILENT_TOKENIZER, syntheticPrompts } from "./synthetic.ts";

const a = benchArgs(
  "deno task bench:dp",
  "Seconds per RL update with 1 and more processes (see bench/data_parallel.ts).",
  {
    procs: { type: "string", default: "1,2" },
    updates: { type: "string", default: "4" },
    prompts: { type: "string", default: "8" },
    k: { type: "string", default: "4" },
    new: { type: "string", default: "32" },
    micro: { type: "string", default: "4" },
    device: { type: "string", default: "cpu" },
    dtype: { type: "string", default: "float32" },
    shapes: { type: "string" },
    out: { type: "string" }, // internal: a worker writes its JSON here
  },
);

/** What rank 0 of a variant measured. */
interface Result {
  processes: number;
  group: string;
  threads: number;
  /** Mean seconds per update after a warm-up, and per phase. */
  update: number;
  phases: Record<string, number>;
  /** Summed-gradient calls per update (critic steps + policy steps) and ms per call. */
  reduceCalls: number;
  reduceMs: number;
  gradBytes: number;
}

async function worker(out: string): Promise<void> {
  const env = launchEnv();
  const threads = useAvailableCores(env?.localWorldSize ?? 1);
  const device = rankDevice(a.device as Device, env);
  using replicas = joinReplicas(env, device, distTimeoutSeconds());
  const config = await shapesModelConfig(a.shapes ?? SMALL_SHAPES);
  manualSeed(1234);
  using model = await randomModel(config, { dtype: a.dtype as DType, device });
  const policy = new Policy(model, {
    lora: {
      r: 16,
      alpha: 32,
      dropout: 0,
      targetModules: ["q_proj", "k_proj", "v_proj", "o_proj"],
      targetExperts: false,
    },
  });
  using opt = policyOptimizer(policy, { learningRate: 1e-5 });
  const trainable = [...policy.policyParameters(), ...policy.valueParameters()];
  replicas.broadcastFromFirst(trainable);
  const n = Number(a.prompts), k = Number(a.k), share = n / replicas.size;
  if (!Number.isInteger(share)) {
    throw new RangeError(`--prompts ${n} does not split over ${replicas.size} processes`);
  }
  const prompts = syntheticPrompts(n, config.vocabSize, (i) => 16 + (i * 2) % 16);
  const mine = prompts.slice(replicas.rank * share, (replicas.rank + 1) * share);
  const cfg: RlOverrides = {
    rollout: { k, maxNewTokens: Number(a.new) },
    ppo: { klCoef: 0.04, entropyCoef: 0 },
  };
  const updates = Number(a.updates);
  const sums: Record<string, number> = {};
  let total = 0;
  for (let u = 0; u <= updates; u++) {
    const t0 = performance.now();
    using buf = await collect(policy, SILENT_TOKENIZER, mine, cfg, {
      seed: 100 + u,
      firstPrompt: replicas.rank * share,
      score: parityReward,
    });
    const m = learn(policy, opt, buf, cfg, { microBatch: Number(a.micro) * k, seed: u, replicas });
    const seconds = (performance.now() - t0) / 1000;
    if (u === 0) continue; // warm-up
    total += seconds;
    const phases = {
      prefill: buf.metrics.prefill_seconds,
      decode: buf.metrics.decode_seconds,
      reference_critic: m.reference_seconds,
      learn: m.learn_seconds,
    };
    for (const [p, s] of Object.entries(phases)) sums[p] = (sums[p] ?? 0) + s;
  }
  // The collectives alone: the gradient sums an update makes (one per critic step, one per policy step).
  const critic = Math.ceil((n * k) / (Number(a.micro) * k * replicas.size));
  const reduceCalls = critic + 1;
  for (const p of trainable) tidy(() => p.setGrad(p.detach().mul(0)));
  const reps = 20, t0 = performance.now();
  for (let i = 0; i < reps; i++) replicas.sumGradients(trainable);
  const reduceMs = (performance.now() - t0) / reps;
  opt.zeroGrad(trainable);
  const gradBytes = trainable.reduce((s, p) => s + p.numel * 4, 0);
  if (replicas.rank !== 0) return;
  const result: Result = {
    processes: replicas.size,
    group: replicas.group?.backend ?? "none",
    threads,
    update: total / updates,
    phases: Object.fromEntries(Object.entries(sums).map(([p, s]) => [p, s / updates])),
    reduceCalls,
    reduceMs: replicas.group ? reduceMs : 0,
    gradBytes,
  };
  await Deno.writeTextFile(out, JSON.stringify(result));
  policy.dispose();
}

async function main(): Promise<void> {
  const variants = ["none", ...a.procs!.split(",").map((s) => s.trim())];
  const tmp = await Deno.makeTempDir({ prefix: "moerl_bench_dp_" });
  const forward = ["updates", "prompts", "k", "new", "micro", "device", "dtype", "shapes"]
    .flatMap((
      key,
    ) => (a[key as keyof typeof a] === undefined ? [] : [`--${key}`, String(a[key as keyof typeof a])]));
  const self = import.meta.filename!;
  console.log(
    `bench:dp: libtorch ${torchVersion()}, ${navigator.hardwareConcurrency} CPUs, ${a.device} ${a.dtype}; ` +
      `${a.prompts} prompts × K ${a.k} × ${a.new} tokens per update, micro-batches of ${a.micro} prompts, ` +
      `${a.updates} timed updates after a warm-up`,
  );
  const results: Result[] = [];
  try {
    for (const v of variants) {
      const out = join(tmp, `${v}.json`);
      const args = ["run", "-A", self, "--out", out, ...forward];
      const code = v === "none"
        ? (await new Deno.Command(Deno.execPath(), { args, stdout: "inherit", stderr: "inherit" }).output())
          .code
        : await spawnLocal(Number(v), args);
      if (code !== 0) throw new Error(`variant ${v} failed (exit ${code})`);
      results.push(JSON.parse(await Deno.readTextFile(out)));
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  const base = results[0]!;
  const phases = Object.keys(base.phases);
  console.log(
    [
      "processes",
      "group",
      "threads each",
      "s/update",
      "updates/s ×none",
      ...phases.map((p) => `${p} s`),
      "grad sum ms",
      "sums/update",
    ]
      .join(" | "),
  );
  for (const r of results) {
    console.log(
      [
        r.processes,
        r.group,
        r.threads,
        r.update.toFixed(3),
        (base.update / r.update).toFixed(2),
        ...phases.map((p) => (r.phases[p] ?? NaN).toFixed(3)),
        r.reduceMs.toFixed(3),
        r.reduceCalls,
      ].join(" | "),
    );
  }
  for (const r of results.filter((r) => r.group !== "none")) {
    const overhead = (r.reduceMs * r.reduceCalls) / 1000;
    console.log(
      `${r.processes} process${r.processes === 1 ? "" : "es"} (${r.group}): gradient sums ${
        (overhead * 1000).toFixed(1)
      } ms per update (${r.reduceCalls} × ${r.reduceMs.toFixed(2)} ms, ${
        (r.gradBytes / 2 ** 20).toFixed(2)
      } MiB each), ` +
        `${(100 * overhead / r.update).toFixed(1)}% of the update`,
    );
  }
}

if (a.out) await worker(a.out);
else await main();
