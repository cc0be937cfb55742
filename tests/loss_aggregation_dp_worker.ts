/**
 * One process of tests/loss_aggregation_dp_test.ts: a learn under a loss aggregation, alone (WORLD_SIZE 1) or
 * as one of the ranks of a Gloo group, each rank holding its share of whole prompt groups. Prints the policy
 * gradient of every optimizer step and the metrics as one JSON line.
 *
 *   deno run -A tests/loss_aggregation_dp_worker.ts '<ppo overrides as JSON>' [localS]
 *
 * localS: the control, dividing the per-sequence aggregations by this rank's sequences only.
 */
import { join } from "node:path";
import { manualSeed, ProcessGroup, type Tensor, tidy } from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import type { RlOverrides } from "../rl/config.ts";
import { learn, type StepOptimizer } from "../rl/learn.ts";
import { ppoObjective } from "../rl/objective.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { Replicas } from "../rl/replicas.ts";
import { RolloutBuffer, type RolloutPrompt } from "../rl/rollout_buffer.ts";
import { scriptedScore } from "./util.ts";

const env = (k: string): string => Deno.env.get(k) ?? "";
const world = Number(env("WORLD_SIZE") || 1), rank = Number(env("RANK") || 0);
const localS = Deno.args[1] === "localS";
const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
const cfg: RlOverrides = {
  rollout: { k: 2, maxNewTokens: 8, topK: 50 },
  ppo: { klCoef: 0.1, entropyCoef: 0.01, ...JSON.parse(Deno.args[0]!) },
  moe: { routingReplay: "off" },
};
const group = world > 1
  ? ProcessGroup.init({
    backend: "gloo",
    host: "127.0.0.1",
    port: Number(env("MASTER_PORT")),
    worldSize: world,
    rank,
    timeoutMs: 30000,
  })
  : null;
manualSeed(5);
using model = await loadModel(MODEL, { device: "cpu" });
const tok = await Tokenizer.load(MODEL);
using policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
const PROMPTS: RolloutPrompt[] = [
  [5, 6, 7],
  [8, 9],
  [10, 11, 12],
  [13, 14],
  [15, 16],
  [17, 18, 19],
  [20, 21],
  [
    22,
    23,
  ],
].map((ids, i) => ({ ids, answer: i }));
// Every process collects all 8 prompts alike, then keeps its share of whole groups: completions of 2..8 tokens
// (the aggregations weigh them otherwise), some cut at the cap (left out with maskTruncated), rewards of 0..2.
using got = await collect(policy, tok, PROMPTS, cfg, { seed: 1, score: scriptedScore(() => 0) });
const all = got.sequences.map((s, i) => {
  const n = Math.min(s.tokens.length, 2 + (i * 3) % 7);
  return {
    ...s,
    tokens: s.tokens.slice(0, n),
    logprobs: s.logprobs.slice(0, n),
    finishReason: (i % 5 === 1 ? "length" : "eos") as "length" | "eos",
    reward: { ...s.reward, reward: [0, 1, 2][(i * 7 + (i >> 1)) % 3]! },
  };
});
const per = PROMPTS.length / world;
const mine = all.filter((s) => Math.floor(s.prompt / per) === rank).map((s) => ({
  ...s,
  prompt: s.prompt - rank * per,
}));
using buf = new RolloutBuffer({
  prompts: PROMPTS.slice(rank * per, (rank + 1) * per),
  promptTexts: got.promptTexts.slice(rank * per, (rank + 1) * per),
  k: got.k,
  temperature: got.temperature,
  maxNewTokens: got.maxNewTokens,
  pad: got.pad,
  sequences: mine,
  routing: null,
  routingStart: [],
  device: "cpu",
  timings: got.metrics,
});
using adam = policyOptimizer(policy, { learningRate: 2e-2 });
const steps: number[][] = [];
const recorder: StepOptimizer = {
  step(only: readonly Tensor[]): void {
    steps.push(tidy(() => only.flatMap((p) => p.grad?.toArray() ?? [])));
    adam.step(only);
  },
  zeroGrad(only: readonly Tensor[]): void {
    adam.zeroGrad(only);
  },
};
const metrics = learn(policy, recorder, buf, cfg, {
  replicas: group ? new Replicas(group) : undefined,
  maxGradNorm: 0,
  microBatch: 4 / world,
  seed: 2,
  objective: localS
    ? (out, inputs, c) => ppoObjective(out, { ...inputs, sequences: inputs.sequences! / world }, c)
    : undefined,
});
group?.dispose();
console.log(JSON.stringify({ rank, steps, metrics }));
