/**
 * `deno task bench:dp`: seconds per RL update (collect + learn) with the
 * update's prompts split over 1 or more processes, in one run, against a
 * single process without a process group measured in the same run; and the
 * time the update spends in its collectives, measured inside one more update.
 *
 *   deno task bench:dp [--procs 1,2] [--updates 4] [--prompts 8] [--k 4] [--new 32] [--micro 4]
 *   deno task bench:dp --device cuda --dtype bfloat16 --shapes bench/shapes/huihui-moe-1b-a0.6b.json --procs 1
 *
 * Each variant starts its processes with `train/launch.ts spawnLocal` (the
 * `--nproc` launcher): "none" is one process with no group, "N" is N ranks
 * joined over Gloo (CPU) or NCCL (GPU, one device each), so "1" shows what
 * the group itself costs. Every process builds the same random model (the
 * bench:generate shapes unless --shapes) and the training default's LoRA (r 16,
 * α 32 on every linear layer and expert; `--lora qkvo` for attention only),
 * and draws the same prompts; ranks split them.
 *
 * Collectives: after the timed updates, one more update runs with every
 * `Replicas` call (sums, maxima, all-gathers, gradient sums, broadcasts)
 * timed between device synchronisations: their count, total milliseconds and
 * the gradient bytes summed (by each parameter's dtype) are printed, as is
 * their share of the update. With one rank this is the group's fixed cost per
 * call; with several, the transfers and the waiting for the slowest rank. The reward is the parity of
 * a completion's token ids (random weights earn no GSM8K reward; a reward
 * with spread makes every rank run its backward passes); no stop token, so
 * every completion has --new tokens. CPU threads: the machine's cores
 * shared evenly by the processes of a variant (OMP_NUM_THREADS overrides).
 */
import { join } from "node:path";
import { benchArgs } from "./cli.ts";
import {
  cuda,
  type Device,
  type DType,
  ELEMENT_SIZE,
  manualSeed,
  type Tensor,
  torchVersion,
  useAvailableCores,
} from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import type { Replicas } from "../rl/replicas.ts";
import { randomModel } from "../model/model.ts";
import { collect } from "../rl/collect.ts";
import type { RlOverrides } from "../rl/config.ts";
import { learn } from "../rl/learn.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { parityReward } from "./parity_reward.ts";
import { distTimeoutSeconds, joinReplicas, launchEnv, rankDevice } from "../train/launch.ts";
import { spawnLocal } from "../train/spawn.ts";
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
    lora: { type: "string", default: "default" },
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
  /** The instrumented update's collectives: calls, milliseconds in all, and gradient bytes summed. */
  collectiveCalls: number;
  collectiveMs: number;
  gradBytes: number;
  /** Seconds of the instrumented update (its syncs make it a little slower than the timed ones). */
  instrumented: number;
}

/** Times every collective of replicas between device syncs; returns the running totals. */
function instrument(replicas: Replicas, device: Device): { calls: number; ms: number; gradBytes: number } {
  const totals = { calls: 0, ms: 0, gradBytes: 0 };
  const sync = (): void => device.startsWith("cuda") ? cuda.synchronize(device) : undefined;
  let depth = 0; // calls made inside another (sumGradients' max, gather's sizes) are part of it
  for (const name of ["sum", "max", "gather", "gatherText", "sumGradients", "broadcastFromFirst"] as const) {
    const real = (replicas[name] as (...args: unknown[]) => unknown).bind(replicas);
    (replicas as unknown as Record<string, unknown>)[name] = (...args: unknown[]): unknown => {
      if (depth > 0) return real(...args);
      sync();
      const t0 = performance.now();
      depth++;
      try {
        return real(...args);
      } finally {
        depth--;
        sync();
        totals.ms += performance.now() - t0;
        totals.calls++;
        // The flat buffer holds every parameter (zeros for one without a gradient here).
        if (name === "sumGradients") {
          for (const p of args[0] as Tensor[]) totals.gradBytes += p.numel * ELEMENT_SIZE[p.dtype];
        }
      }
    };
  }
  return totals;
}

async function worker(out: string): Promise<void> {
  const env = launchEnv();
  const threads = useAvailableCores(env?.localWorldSize ?? 1);
  const device = rankDevice(a.device as Device, env);
  using replicas = joinReplicas(env, device, distTimeoutSeconds());
  const config = await shapesModelConfig(a.shapes ?? SMALL_SHAPES);
  manualSeed(1234);
  using model = await randomModel(config, { dtype: a.dtype as DType, device });
  const lora = a.lora === "qkvo"
    ? { ...DEFAULT_LORA, targetModules: ["q_proj", "k_proj", "v_proj", "o_proj"], targetExperts: false }
    : DEFAULT_LORA;
  const policy = new Policy(model, { lora });
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
  let total = 0, instrumented = 0;
  let collectives = { calls: 0, ms: 0, gradBytes: 0 };
  for (let u = 0; u <= updates + 1; u++) {
    if (u === updates + 1) collectives = instrument(replicas, device); // the extra, instrumented update
    const t0 = performance.now();
    using buf = await collect(policy, SILENT_TOKENIZER, mine, cfg, {
      seed: 100 + u,
      firstPrompt: replicas.rank * share,
      score: parityReward,
    });
    const m = learn(policy, opt, buf, cfg, { microBatch: Number(a.micro) * k, seed: u, replicas });
    if (device.startsWith("cuda")) cuda.synchronize(device);
    const seconds = (performance.now() - t0) / 1000;
    if (u === 0) continue; // warm-up
    if (u === updates + 1) {
      instrumented = seconds;
      continue;
    }
    total += seconds;
    const phases = {
      prefill: buf.metrics.prefill_seconds,
      decode: buf.metrics.decode_seconds,
      reference_critic: m.reference_seconds,
      learn: m.learn_seconds,
    };
    for (const [p, s] of Object.entries(phases)) sums[p] = (sums[p] ?? 0) + s;
  }
  if (replicas.rank !== 0) return;
  const result: Result = {
    processes: replicas.size,
    group: replicas.group?.backend ?? "none",
    threads,
    update: total / updates,
    phases: Object.fromEntries(Object.entries(sums).map(([p, s]) => [p, s / updates])),
    collectiveCalls: replicas.group ? collectives.calls : 0,
    collectiveMs: replicas.group ? collectives.ms : 0,
    gradBytes: collectives.gradBytes,
    instrumented,
  };
  await Deno.writeTextFile(out, JSON.stringify(result));
  policy.dispose();
}

async function main(): Promise<void> {
  const variants = ["none", ...a.procs!.split(",").map((s) => s.trim())];
  const tmp = await Deno.makeTempDir({ prefix: "moerl_bench_dp_" });
  const forward = ["updates", "prompts", "k", "new", "micro", "device", "dtype", "shapes", "lora"]
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
      "collectives",
      "collective ms",
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
        r.collectiveCalls,
        r.collectiveMs.toFixed(1),
      ].join(" | "),
    );
  }
  for (const r of results.filter((r) => r.group !== "none")) {
    console.log(
      `${r.processes} process${
        r.processes === 1 ? "" : "es"
      } (${r.group}): ${r.collectiveCalls} collectives in ` +
        `the instrumented update, ${r.collectiveMs.toFixed(1)} ms in all (${
          (100 * r.collectiveMs / 1000 / r.instrumented).toFixed(1)
        }% of its ${r.instrumented.toFixed(3)} s), ${
          (r.gradBytes / 2 ** 20).toFixed(2)
        } MiB of gradients summed`,
    );
  }
}

if (a.out) await worker(a.out);
else await main();
