/**
 * One RL update in the test dtype and device (MOERL_TEST_DTYPE, MOERL_TEST_DEVICE: bfloat16 on CUDA in the GPU
 * check), at the default learning rates: the other RL tests run in float32 on the CPU, where precision bugs of
 * the default GPU run (bfloat16) cannot show. The metrics are finite, a single PPO step has a ratio of exactly
 * 1, the adapters and the value head are float32, and the weights that get a gradient in a first step move.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors, manualSeed, noGrad, tidy } from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import { learn } from "../rl/learn.ts";
import { Policy } from "../rl/policy.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { DEVICE, FLOAT, scriptedScore } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");

Deno.test(`rl dtype: one update in ${FLOAT} on ${DEVICE} at the default learning rates moves the weights`, async () => {
  const live = liveTensors();
  manualSeed(3);
  {
    using model = await loadModel(MODEL, { dtype: FLOAT, device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    using policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    const params = [...policy.policyParameters(), ...policy.valueParameters()];
    assert.ok(params.every((p) => p.dtype === "float32"), "adapters and value head are float32");
    const prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]].map((ids, i) => ({ ids, answer: 10 + i }));
    const cfg = { rollout: { k: 2, maxNewTokens: 6 }, moe: { routingReplay: "rollout" as const } };
    using buf = await collect(policy, tok, prompts, cfg, { seed: 1, score: scriptedScore((i) => i % 2) });
    using opt = policyOptimizer(policy); // lr 1e-5 (adapters), 5e-5 (value head): the defaults
    const before = params.map((p) => tidy(() => p.clone()));
    const m = learn(policy, opt, buf, cfg);
    for (const [k, v] of Object.entries(m)) {
      if (typeof v === "number" && !k.endsWith("_seconds")) {
        assert.ok(Number.isFinite(v) || k === "dual_clip_fraction" || k === "router_aux_loss", `${k} = ${v}`);
      }
    }
    assert.equal(m.ratio_mean, 1, "one step: π_old is the training pass's own log-probs");
    // B starts at zero, so A has no gradient in the first step; every B moves.
    const moved = params.map((p, i) =>
      noGrad(() => tidy(() => p.sub(before[i]!).abs().gt(0).to("float32").mean().item()))
    );
    const lora = policy.policyParameters().length;
    const bs = moved.slice(0, lora).filter((_, i) => i % 2 === 1);
    assert.ok(bs.every((f) => f > 0.99), `fractions of each B moved: ${bs.map((f) => f.toFixed(2))}`);
    // The value head's output layer starts at zero too: its first layer has no gradient in the first step.
    const head = moved.slice(lora).slice(-2);
    assert.ok(head.every((f) => f > 0.99), `value head output layer: ${head.map((f) => f.toFixed(2))}`);
    before.forEach((t) => t.dispose());
  }
  assert.equal(liveTensors(), live);
});
