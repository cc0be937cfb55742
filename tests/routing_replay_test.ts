/**
 * MoE routing replay: both routers (Qwen3's softmax top-k, top-1 and top-2,
 * and PhiMoE's sparsemixer, top-2) take replayed experts and weight them by
 * the current router; the training forward uses exactly the experts recorded
 * at rollout even after the routers were perturbed; and replay does not
 * widen the rollout/training log-prob mismatch (with a small router
 * perturbation standing in for the numeric differences that flip near-tie
 * routes between a GPU's sampler and trainer).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Generator, manualSeed, noGrad, randn, tensor, tidy } from "../ffi/mod.ts";
import { Linear } from "../model/layers.ts";
import { loadModel } from "../model/model.ts";
import { softmaxTopK, sparsemixer } from "../model/moe.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { collect, type RolloutTokenizer, type ScoreFn } from "../rl/collect.ts";
import type { Decoder } from "../model/decoder.ts";
import { Policy } from "../rl/policy.ts";
import { assertClose, DEVICE, scriptedScore } from "./util.ts";

const FIXTURES = join(import.meta.dirname!, "fixtures", "models");
const f32 = { dtype: "float32" as const, device: DEVICE };

/** A tokenizer for prompts of bare ids: stops at id 0, pads with 0, decodes ids as text. */
const IDS: RolloutTokenizer = {
  stopTokenIds: [0],
  padTokenId: 0,
  decode: (ids) => Promise.resolve(ids.join(" ")),
};

/** Scores every completion 0: these tests look at routes, not rewards. */
const zero: ScoreFn = scriptedScore(() => 0);

/** Adds N(0, scale²) noise to every router's weights. */
function perturbRouters(decoder: Decoder, scale: number): void {
  noGrad(() =>
    decoder.layers.forEach((l) => {
      if (l.mlp.kind !== "moe") return;
      const w = (l.mlp.router as Linear).weight;
      tidy(() => w.copy_(w.add(randn(w.shape, { dtype: w.dtype, device: w.device }).mul(scale))));
    })
  );
}
const i64 = { dtype: "int64" as const, device: DEVICE };

Deno.test("routing replay: the routers use the replayed experts, weighted by the current router", () => {
  tidy(() => {
    // Router logits = x itself (identity weights): token 0 prefers expert 2, token 1 expert 0.
    const x = tensor([[0.1, 0.5, 2.0, -1.0], [3.0, 0.2, 0.1, 0.0]], f32);
    const router = new Linear(tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], f32));
    const probs = x.softmax(-1).tolist() as number[][];
    for (const norm of [false, true]) {
      const own = softmaxTopK(x, router, 2, norm);
      const same = softmaxTopK(x, router, 2, norm, own.experts);
      assert.deepEqual(same.experts.toArray(), own.experts.toArray());
      assertClose(
        same.weights.toArray(),
        own.weights.toArray(),
        1e-7,
        "replaying its own choice changes nothing",
      );
      // Token 0 replays experts [1, 3]; token 1 (−1) routes freely.
      const rep = softmaxTopK(x, router, 2, norm, tensor([[1, 3], [-1, -1]], i64));
      assert.deepEqual(rep.experts.tolist(), [[1, 3], (own.experts.tolist() as number[][])[1]]);
      const w = [probs[0]![1]!, probs[0]![3]!];
      const want = norm ? w.map((v) => v / (w[0]! + w[1]!)) : w;
      assertClose((rep.weights.tolist() as number[][])[0]!, want, 1e-6, `token 0's weights (norm ${norm})`);
    }
    const top1 = softmaxTopK(x, router, 1, true, tensor([[3], [-1]], i64));
    assert.deepEqual(top1.experts.tolist(), [[3], [0]]);
    assertClose(top1.weights.toArray(), [1, 1], 1e-6, "top-1 renormalised");

    const eps = 0.5;
    const own = sparsemixer(x, router, eps);
    const same = sparsemixer(x, router, eps, own.experts);
    assert.deepEqual(same.experts.toArray(), own.experts.toArray());
    assertClose(
      same.weights.toArray(),
      own.weights.toArray(),
      1e-7,
      "sparsemixer: its own choice changes nothing",
    );
    // Token 0 replays [1, 0]: slot 1's weight is the softmax over scores within the band around score 0.5.
    const rep = sparsemixer(x, router, eps, tensor([[1, 0], [-1, -1]], i64));
    assert.deepEqual((rep.experts.tolist() as number[][])[0], [1, 0]);
    const s = [0.1, 0.5, 2.0, -1.0];
    const band = (top: number, skip: number[]): number => {
      const inBand = s.map((v, i) => !skip.includes(i) && (top - v) / Math.max(Math.abs(v), top) <= 2 * eps);
      const z = s.reduce((a, v, i) => a + (inBand[i] ? Math.exp(v) : 0), 0);
      return Math.exp(top) / z;
    };
    assertClose((rep.weights.tolist() as number[][])[0]!, [band(0.5, []), band(0.1, [1])], 1e-6, "band rule");
    assert.deepEqual((rep.experts.tolist() as number[][])[1], (own.experts.tolist() as number[][])[1]);
    assert.throws(
      () => softmaxTopK(x, router, 2, true, tensor([[1]], i64)),
      /routing replay: expected experts/,
    );
  });
});

for (const name of ["qwen3-moe-tiny", "phimoe-tiny"]) {
  Deno.test(`routing replay (${name}): the training forward uses the recorded experts after the routers moved`, async () => {
    manualSeed(0);
    using model = await loadModel(join(FIXTURES, name), { device: DEVICE });
    const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 2, alpha: 4 } });
    try {
      using g = new Generator(3, DEVICE);
      using buf = await collect(
        policy,
        IDS,
        [{ ids: [5, 6, 7, 8], answer: 1 }, { ids: [9, 10], answer: 2 }],
        {
          rollout: { k: 3, maxNewTokens: 8 },
        },
        {
          generator: g,
          score: zero,
        },
      );
      perturbRouters(model.decoder, 2); // far enough that their own choices change
      tidy(() => {
        const ids = Array.from({ length: buf.size }, (_, i) => i);
        const { batch, replay } = buf.batch(ids);
        const input = { ...batch, skipLogits: true, dispatch: "loop" as const };
        const replayed = noGrad(() => model.decoder.forward({ ...input, replay }).experts);
        const free = noGrad(() => model.decoder.forward(input).experts);
        let recorded = 0, changed = 0;
        replay!.forEach((rep, l) => {
          const want = rep.tolist() as number[][], got = replayed[l]!.tolist() as number[][];
          const own = free[l]!.tolist() as number[][];
          want.forEach((e, j) => {
            if (e[0]! < 0) return;
            recorded++;
            assert.deepEqual(got[j], e, `layer ${l} position ${j} uses the recorded experts`);
            if (own[j]!.join() !== e.join()) changed++;
          });
        });
        assert.ok(recorded > 0);
        assert.ok(changed > 0, "the perturbed routers would have chosen other experts");
      });
    } finally {
      policy.dispose();
    }
  });
}

Deno.test("routing replay (phimoe-tiny): the rollout/training mismatch is no larger with replay", async () => {
  manualSeed(0);
  using model = await loadModel(join(FIXTURES, "phimoe-tiny"), { device: DEVICE });
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 2, alpha: 4 } });
  try {
    const prompts = Array.from({ length: 16 }, (_, i) => ({
      ids: Array.from({ length: 6 + i }, (_, j) => 1 + ((i * 37 + j * 11) % 200)),
      answer: 0,
    }));
    using g = new Generator(5, DEVICE);
    using buf = await collect(policy, IDS, prompts, { rollout: { k: 4, maxNewTokens: 32 } }, {
      generator: g,
      score: zero,
    });
    const ids = Array.from({ length: buf.size }, (_, i) => i);
    const gap = (withReplay: boolean): { mean: number; flips: number } =>
      tidy(() => {
        const { batch, replay } = buf.batch(ids);
        const out = noGrad(() => policy.forward(batch, { replay: withReplay ? replay : null }));
        const rollout = buf.perToken(ids, batch.inputIds.size(1), (i) => buf.sequences[i]!.logprobs);
        const mean = out.logprobs.sub(rollout).abs().mul(out.mask).sum().div(out.mask.sum()).item();
        const own = noGrad(() => model.decoder.forward({ ...batch, skipLogits: true }).experts);
        let flips = 0;
        replay!.forEach((rep, l) => {
          const r = rep.tolist() as number[][], o = own[l]!.tolist() as number[][];
          r.forEach((e, j) => {
            if (e[0]! >= 0 && e.join() !== o[j]!.join()) flips++; // order matters: the slots' weights differ
          });
        });
        return { mean, flips };
      });
    // On the CPU in float32 the sampler's and the trainer's paths agree on every route: replay changes nothing.
    const same = [gap(false), gap(true)];
    assert.equal(same[0]!.flips, 0);
    assert.equal(same[1]!.mean, same[0]!.mean);
    // A GPU's sampler and trainer compute router logits slightly differently and flip near-tie routes; a
    // small perturbation of every router stands in for that difference here.
    perturbRouters(model.decoder, 0.0003);
    const without = gap(false), withReplay = gap(true);
    console.log(
      `  mean |Δ log p| rollout vs training after a 0.0003 router perturbation: ${
        without.mean.toExponential(3)
      } ` +
        `without replay (${without.flips} recorded routes flip), ${withReplay.mean.toExponential(3)} with`,
    );
    assert.ok(without.flips > 0, "the perturbation flips some routes");
    assert.ok(withReplay.mean <= without.mean, `${withReplay.mean} > ${without.mean}`);
  } finally {
    policy.dispose();
  }
});
