/**
 * One rank of tests/dist_test.ts's process groups: joins the group named by
 * the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), runs
 * the scenario named by its first argument and prints one JSON line.
 * Scenario "adapter" takes a temporary folder as its second argument.
 * Scenario "launch" joins as `deno task train` does (train/launch.ts, so
 * also through torchrun's agent store) instead of with a plain group.
 */
import { ProcessGroup, type Tensor, tensor } from "../ffi/mod.ts";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { loadAdapterOnRanks } from "../eval/adapter.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { updateAdvantages } from "../rl/advantages.ts";
import { collect } from "../rl/collect.ts";
import { learn } from "../rl/learn.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { scriptedScore } from "./util.ts";
import { Replicas } from "../rl/replicas.ts";
import { joinReplicas, launchEnv } from "../train/launch.ts";

const env = (k: string): string => Deno.env.get(k) ?? "";
const rank = Number(env("RANK")), world = Number(env("WORLD_SIZE"));
const scenario = Deno.args[0];
const timeoutMs = Number(env("MOERL_DIST_TIMEOUT_MS") || 10000);
const out: Record<string, unknown> = { rank };
const t0 = performance.now();
if (scenario === "launch") {
  try {
    const launch = launchEnv()!;
    using replicas = joinReplicas(launch, "cpu", timeoutMs / 1000);
    Object.assign(out, {
      world: replicas.size,
      localRank: launch.localRank,
      agentStore: launch.agentStore,
      gathered: replicas.gather([launch.rank, launch.localRank]),
      summed: replicas.sum([launch.rank + 1]),
    });
  } catch (e) {
    out.error = (e as Error).message;
  }
  console.log(JSON.stringify(out));
  Deno.exit(0);
}
try {
  using g = ProcessGroup.init({
    backend: "gloo",
    host: env("MASTER_ADDR"),
    port: Number(env("MASTER_PORT")),
    worldSize: world,
    rank,
    timeoutMs,
  });
  if (scenario === "collectives") {
    const f = tensor([rank + 1, -(rank + 1) * 2.5], { dtype: "float32" });
    const i = tensor([rank * 3, 7], { dtype: "int64" });
    const sum = f.clone(), avg = f.clone(), max = f.clone(), min = f.clone();
    g.allReduce([sum, i]);
    g.allReduce([avg], "avg");
    g.allReduce([max], "max");
    g.allReduce([min], "min");
    // "avg" divides in place: integers are refused before the collective, left as they were.
    const ia = tensor([rank, 1], { dtype: "int64" });
    let intAvg = "";
    try {
      g.allReduce([ia], "avg");
    } catch (e) {
      intAvg = (e as Error).message;
    }
    const b = tensor([[rank, rank + 0.5]], { dtype: "float32" });
    const version = b.version;
    g.broadcast([b], world - 1);
    const bumped = b.version > version; // the backend wrote b in place: held casts of it must go stale
    const gathered = g.allGather(tensor([rank, rank * rank], { dtype: "float64" }));
    g.barrier();
    Object.assign(out, {
      sum: sum.tolist(),
      ints: i.tolist(),
      avg: avg.tolist(),
      max: max.tolist(),
      min: min.tolist(),
      intAvg,
      intAvgAfter: ia.tolist(),
      broadcast: b.tolist(),
      bumped,
      gathered: gathered.tolist(),
    });
  } else if (scenario === "gradients") {
    // a: a gradient on rank 0 only; b: on no rank; c: on every rank; d: float64, on every rank.
    const leaf = (): Tensor => tensor([1, 2, 3], { dtype: "float32" }).setRequiresGrad();
    const a = leaf(), b = leaf(), c = leaf();
    const d = tensor([[1, 2]], { dtype: "float64" }).setRequiresGrad();
    const loss = (rank === 0 ? a.sum().mul(rank + 1) : tensor(0)).add(c.mul(c).sum().mul(rank + 1)).add(
      d.sum().mul(10 * (rank + 1)).to("float32"),
    );
    loss.backward();
    const replicas = new Replicas(g);
    replicas.sumGradients([a, b, c, d]);
    Object.assign(out, {
      a: a.grad?.tolist() ?? null,
      b: b.grad?.tolist() ?? null,
      c: c.grad?.tolist() ?? null,
      d: d.grad?.tolist() ?? null,
      gathered: replicas.gather([rank, 10 + rank]),
      summed: replicas.sum([rank + 0.5]),
      texts: replicas.gatherText(rank === 0 ? "héllo, wörld" : ""),
    });
  } else if (scenario === "adapter") {
    // Rank r names its own run folder (run-r, checkpoint-10·(r+1)); rank 1's first load finds rank 0's
    // choice pruned (as keepLast does when run-0 saves checkpoint-20).
    const base = Deno.args[1]!, seen: string[] = [];
    const run = (r: number): string => join(base, `run-${r}`);
    const { dir } = await loadAdapterOnRanks(run(rank), new Replicas(g), async (d) => {
      seen.push(d.slice(base.length + 1));
      if (rank === 1 && seen.length === 1) {
        await Deno.mkdir(join(run(0), "checkpoint-20", "adapter"), { recursive: true });
        await Deno.writeTextFile(join(run(0), "checkpoint-20", "adapter", "adapter_config.json"), "{}");
        await Deno.writeTextFile(join(run(0), "checkpoint-20", "trainer_state.json"), "{}");
        await Deno.writeTextFile(join(run(0), "latest"), "checkpoint-20");
        await Deno.remove(join(run(0), "checkpoint-10"), { recursive: true });
        throw new Error("gone");
      }
      return { dispose(): void {} };
    });
    Object.assign(out, { dir: dir.slice(base.length + 1), seen });
  } else if (scenario === "advantages-refused") {
    // Rank 1's replacement advantages function gives a sequence too few advantages: both ranks must throw
    // (rank 1 its own error, rank 0 naming rank 1), neither waiting in a collective for the other.
    const dir = fileURLToPath(new URL("./fixtures/models/qwen3-moe-tiny", import.meta.url));
    using model = await loadModel(dir);
    const tok = await Tokenizer.load(dir);
    const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 2, alpha: 4 } });
    try {
      const prompts = [{ ids: [5, 6, 7], answer: 1 }, { ids: [8, 9], answer: 2 }];
      const score = scriptedScore((i) => i % 2);
      const cfg = { rollout: { k: 2, maxNewTokens: 4 }, moe: { routingReplay: "off" as const } };
      using buf = await collect(policy, tok, prompts, cfg, { seed: rank, score, recordRouting: false });
      using opt = policyOptimizer(policy);
      learn(policy, opt, buf, cfg, {
        replicas: new Replicas(g),
        advantages: (...args) => {
          const a = updateAdvantages(...args);
          return rank === 1 ? { ...a, advantages: a.advantages.map((row) => row.slice(1)) } : a;
        },
      });
    } finally {
      policy.dispose();
    }
  } else if (scenario === "peer-dies") {
    g.barrier();
    if (rank === world - 1) Deno.exit(3); // dies without leaving the group
    const at = performance.now();
    try {
      g.allReduce([tensor([1], { dtype: "float32" })]);
      out.error = null;
    } catch (e) {
      Object.assign(out, { error: (e as Error).message, seconds: (performance.now() - at) / 1000 });
    }
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
} catch (e) {
  Object.assign(out, { error: (e as Error).message, seconds: (performance.now() - t0) / 1000 });
}
console.log(JSON.stringify(out));
