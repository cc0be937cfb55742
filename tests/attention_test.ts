/**
 * Fused attention (ffi/attention.ts, model/layers.ts): where libtorch has
 * scaled_dot_product_attention (≥ 2.1), it gives the eager path's outputs and
 * gradients within float32 rounding: prefill with left padding (query rows
 * that see no key included), decode against a KV cache, GQA, boolean masks,
 * and whole models (logits at every position, greedy generation, gradients of
 * a training pass). Where libtorch lacks it, "auto" falls back to eager and
 * "sdpa" fails clearly. The op's errors are TorchErrors and nothing leaks.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  manualSeed,
  randn,
  sdpa,
  sdpaBackend,
  sdpaSupport,
  type Tensor,
  tensor,
  tidy,
  TorchError,
  torchVersion,
} from "../ffi/mod.ts";
import { generate } from "../model/generate.ts";
import {
  attention,
  type AttentionImpl,
  causalMask,
  eagerAttention,
  type Linear,
  resolveAttention,
} from "../model/layers.ts";
import { loadModel } from "../model/model.ts";
import { DEFAULTS } from "../train/config.ts";
import { loadConfiguredModel } from "../train/model.ts";
import { leftPad } from "../model/padding.ts";
import { assertNoLeak, DEVICE, FLOAT } from "./util.ts";

const MODELS = join(import.meta.dirname!, "fixtures", "models");
const [major, minor] = torchVersion().split(".").map(Number) as [number, number];
const HAS_SDPA = major > 2 || (major === 2 && minor >= 1);
const opts = { dtype: FLOAT, device: DEVICE };
// f32: the bar. Half precision: eager rounds the probabilities to the model dtype before × V, the
// fused kernels keep them in float32, so the two differ by the dtype's rounding.
const TOL = FLOAT === "float32" ? 1e-5 : 3e-2;

/** max |a − b| over every element, and whether either holds a NaN. */
function maxDiff(a: Tensor, b: Tensor): number {
  return tidy(() => {
    const nan = a.isnan().any().item() || b.isnan().any().item();
    return nan ? NaN : a.to("float32").sub(b.to("float32")).abs().amax().item();
  });
}

/** max |a|. */
function maxAbs(a: Tensor): number {
  return tidy(() => a.to("float32").abs().amax().item());
}

/** Keys valid [2, T]: row 0 full, row 1 left-padded by `pads`. */
function keyValid(t: number, pads: number): Tensor {
  const row = (p: number): number[] => Array.from({ length: t }, (_, i) => (i < p ? 0 : 1));
  return tensor([row(0), row(pads)], { dtype: "int64", device: DEVICE });
}

Deno.test("sdpa: support follows the libtorch version", () => {
  const s = sdpaSupport();
  assert.equal(s.available, HAS_SDPA, `libtorch ${torchVersion()}`);
  assert.equal(s.nativeGqa, major > 2 || (major === 2 && minor >= 5));
  assert.equal(resolveAttention("auto"), HAS_SDPA ? "sdpa" : "eager");
  assert.equal(resolveAttention("eager"), "eager");
});

Deno.test("attention setting: loadModel and the training config pass it to the decoder, and check it", async () => {
  const dir = join(MODELS, "qwen3-moe-tiny");
  {
    using m = await loadConfiguredModel({
      ...DEFAULTS.model,
      id: dir,
      dtype: "float32",
      device: DEVICE,
      attention: "eager",
    });
    assert.equal(m.decoder.attention, "eager");
  }
  await assert.rejects(
    loadModel(dir, { attention: "flash" as AttentionImpl }),
    /attention: expected one of "auto", "sdpa", "eager", got "flash"/,
  );
});

Deno.test({
  name: "sdpa: without it in libtorch, 'sdpa' fails clearly and 'auto' stays eager",
  ignore: HAS_SDPA,
  fn: async () => {
    assert.throws(() => resolveAttention("sdpa"), /not available in libtorch 1\.13.*"auto" or "eager"/);
    assertNoLeak(() => {
      using q = randn([1, 2, 3, 4], opts);
      assert.throws(
        () => sdpa(q, q, q, null),
        (e) => e instanceof TorchError && /not available in this libtorch/.test(e.message),
      );
      assert.throws(() => sdpaBackend(q, q, q, null), TorchError);
      using a = attention(q, q, q, null, 0.5, "auto"), b = eagerAttention(q, q, q, null, 0.5);
      assert.equal(maxDiff(a, b), 0);
    });
    await assert.rejects(
      loadModel(join(MODELS, "qwen3-moe-tiny"), { attention: "sdpa" }),
      /not available in libtorch/,
    );
  },
});

Deno.test({
  name: "sdpa: prefill with left padding, GQA, additive and boolean masks equal eager",
  ignore: !HAS_SDPA,
  fn: () => {
    manualSeed(3);
    assertNoLeak(() => {
      const t = 7, d = 16;
      for (const [nH, nKV] of [[4, 4], [4, 2], [6, 1]] as const) {
        tidy(() => {
          const q = randn([2, nH, t, d], opts),
            k = randn([2, nKV, t, d], opts),
            v = randn([2, nKV, t, d], opts);
          const valid = keyValid(t, 3); // row 1's first 3 query rows see no key at all
          const mask = causalMask(valid, 0, t, FLOAT);
          const eager = eagerAttention(q, k, v, mask, 0.25);
          const fused = attention(q, k, v, mask, 0.25, "sdpa");
          const err = maxDiff(fused, eager);
          assert.ok(err <= TOL, `${nH}/${nKV} heads: max |sdpa − eager| ${err}`);
          // The fully masked rows: the mean of every value, as the eager path, not NaN or 0.
          const padRows = fused.select(0, 1).narrow(0, 0, 3); // [3, nH·d]
          const meanV = v.select(0, 1).mean(1).reshape([1, nKV, 1, d]).expand([1, nKV, nH / nKV, d])
            .reshape([1, nH * d]);
          assert.ok(maxDiff(padRows, meanV.expand([3, nH * d])) <= TOL, "a pad row is the mean of V");
          // A boolean mask (true: visible) gives the same, also in the rows that see nothing.
          const visible = mask.eq(0);
          const viaBool = sdpa(q, k, v, visible, { scale: 0.25 }).transpose(1, 2).reshape(fused.shape);
          assert.ok(maxDiff(viaBool, fused) <= TOL, "bool mask = additive mask");
          // No mask, causal flag: the plain causal mask.
          const causal = sdpa(q, k, v, null, { scale: 0.25, causal: true }).transpose(1, 2).reshape(
            fused.shape,
          );
          const full = eagerAttention(q, k, v, causalMask(keyValid(t, 0), 0, t, FLOAT), 0.25);
          assert.ok(maxDiff(causal, full) <= TOL, "causal flag = causal mask");
          const backend = sdpaBackend(q, k, v, mask, { scale: 0.25 });
          assert.notEqual(backend, "none");
          console.log(
            `  ${nH}/${nKV} heads, ${FLOAT} on ${DEVICE}: max |Δ| ${err.toExponential(2)} (${backend})`,
          );
        });
      }
    });
  },
});

Deno.test({
  name: "sdpa: decode steps against a KV cache's filled slots equal eager",
  ignore: !HAS_SDPA,
  fn: () => {
    manualSeed(4);
    assertNoLeak(() => {
      const nH = 4, nKV = 2, d = 8, slots = 12, past = 5, pads = 2;
      tidy(() => {
        // A cache buffer [B, nKV, slots, d] read through narrow views, as KVCache.update returns them.
        const kc = randn([2, nKV, slots, d], opts), vc = randn([2, nKV, slots, d], opts);
        let worst = 0;
        for (let step = 0; step < 3; step++) {
          const t = past + step + 1;
          const k = kc.narrow(2, 0, t), v = vc.narrow(2, 0, t);
          const q = randn([2, nH, 1, d], opts);
          const mask = causalMask(keyValid(t, pads), t - 1, 1, FLOAT);
          const err = maxDiff(attention(q, k, v, mask, 0.3, "sdpa"), eagerAttention(q, k, v, mask, 0.3));
          assert.ok(err <= TOL, `step ${step}: max |sdpa − eager| ${err}`);
          worst = Math.max(worst, err);
        }
        // Two new tokens at once (a chunk after the prompt): S = 2 queries over T = 8 keys.
        const q2 = randn([2, nH, 2, d], opts), k = kc.narrow(2, 0, 8), v = vc.narrow(2, 0, 8);
        const mask = causalMask(keyValid(8, pads), 6, 2, FLOAT);
        const err = maxDiff(attention(q2, k, v, mask, 0.3, "sdpa"), eagerAttention(q2, k, v, mask, 0.3));
        assert.ok(err <= TOL, `two-token step: max |sdpa − eager| ${err}`);
        worst = Math.max(worst, err);
        if (DEVICE === "cpu") console.log(`  decode: max |Δ| ${worst.toExponential(2)}`);
      });
    });
  },
});

Deno.test({
  name: "sdpa: gradients of q, k and v equal eager's where a loss can reach them",
  ignore: !HAS_SDPA,
  fn: () => {
    manualSeed(5);
    assertNoLeak(() => {
      const t = 6, d = 8, pads = 2;
      tidy(() => {
        const q = randn([2, 4, t, d], opts), k = randn([2, 2, t, d], opts), v = randn([2, 2, t, d], opts);
        const mask = causalMask(keyValid(t, pads), 0, t, FLOAT);
        // Upstream gradients: zero at row 1's pad queries, as every loss of ours (log-probs, values, the
        // load-balancing loss) reads real tokens only. Into a query row that sees no key the two paths send
        // different gradients (eager differentiates a dependence its rounding has already removed, libtorch's
        // CPU flash backward something else); neither reaches a loss.
        const real = keyValid(t, pads).to(FLOAT).reshape([2, t, 1]);
        const w = randn([2, t, 4 * d], opts);
        const grads = (impl: "sdpa" | "eager", upstream: Tensor): Tensor[] =>
          tidy(() => {
            const leaves = [q, k, v].map((x) => x.detach().setRequiresGrad());
            const [ql, kl, vl] = leaves as [Tensor, Tensor, Tensor];
            attention(ql, kl, vl, mask, 0.35, impl).mul(upstream).sum().backward();
            return leaves.map((x) => x.grad!);
          });
        const [a, b] = [grads("sdpa", w.mul(real)), grads("eager", w.mul(real))];
        ["q", "k", "v"].forEach((n, i) => {
          const err = maxDiff(a[i]!, b[i]!);
          assert.ok(err <= TOL, `∂${n}: max |sdpa − eager| ${err}`);
          if (DEVICE === "cpu") console.log(`  ∂${n}: max |Δ| ${err.toExponential(2)}`);
        });
        // With gradient sent into the pad rows too, nothing becomes NaN or infinite.
        for (const g of grads("sdpa", w)) assert.ok(g.isfinite().all().item(), "finite gradients");
      });
    });
  },
});

Deno.test({
  name: "sdpa: shape errors are TorchErrors naming the op",
  ignore: !HAS_SDPA,
  fn: () => {
    assertNoLeak(() => {
      using q = randn([1, 3, 4, 8], opts), k = randn([1, 2, 4, 8], opts), k3 = randn([1, 2, 8], opts);
      assert.throws(
        () => sdpa(q, k, k, null),
        (e) => e instanceof TorchError && e.op === "sdpa" && /3 query heads, 2 and 2/.test(e.message),
      );
      assert.throws(() => sdpa(q, k3, k3, null), (e) => e instanceof TorchError && /4-D/.test(e.message));
      using bad = randn([1, 2, 4, 4], opts); // d = 4 keys against d = 8 queries
      using q2 = randn([1, 2, 4, 8], opts);
      assert.throws(() => sdpa(q2, bad, bad, null), TorchError);
    });
  },
});

for (const name of ["qwen3-moe-tiny", "phimoe-tiny"]) {
  Deno.test({
    name: `sdpa: ${name} logits, greedy generation and training gradients equal eager`,
    // In half precision a rounding difference can flip an MoE route, and whole models drift apart;
    // model_parity_test.ts bounds each path's error against transformers there.
    ignore: !HAS_SDPA || FLOAT !== "float32",
    fn: async () => {
      using model = await loadModel(join(MODELS, name), opts);
      assert.equal(model.decoder.attention, "auto");
      const dec = model.decoder;
      const batch = leftPad([[5, 9, 3, 17, 2, 8], [11, 4], [7, 7, 1, 30]], 0);
      const ids = () => tensor(batch.inputIds, { dtype: "int64", device: DEVICE });
      const pos = () => tensor(batch.positionIds, { dtype: "int64", device: DEVICE });
      const am = () => tensor(batch.attentionMask, { dtype: "int64", device: DEVICE });
      const forward = (impl: "sdpa" | "eager"): { logits: Tensor; grads: Tensor[] } =>
        tidy(() => {
          dec.attention = impl;
          // Gradients into every attention projection, from every real position (see the test above).
          const params = dec.layers.flatMap((l) => [l.attn.q, l.attn.k, l.attn.v, l.attn.o])
            .map((p) => (p as Linear).weight);
          params.forEach((p) => p.setRequiresGrad(true));
          try {
            const out = dec.forward({ inputIds: ids(), positionIds: pos(), attentionMask: am() });
            const real = am().to(FLOAT).unsqueeze(-1);
            out.logits!.mul(out.logits!.detach().sin()).mul(real).sum().backward();
            const grads = params.map((p) => p.grad!);
            return { logits: out.logits!.detach(), grads };
          } finally {
            params.forEach((p) => {
              p.clearGrad();
              p.setRequiresGrad(false);
            });
          }
        });
      assertNoLeak(() => {
        tidy(() => {
          const a = forward("sdpa"), b = forward("eager");
          // Relative to the largest magnitude: the gradients reach the thousands.
          const err = maxDiff(a.logits, b.logits) / maxAbs(b.logits);
          // Not bit for bit: the fused kernel sums in another order, so equal bits would mean one path ran twice.
          assert.ok(err > 0, "the two settings took different paths");
          assert.ok(err <= TOL, `logits at every position: max |sdpa − eager| / max |eager| ${err}`);
          let gErr = 0;
          a.grads.forEach((g, i) => (gErr = Math.max(gErr, maxDiff(g, b.grads[i]!) / maxAbs(b.grads[i]!))));
          assert.ok(gErr <= TOL, `attention weight gradients: max |sdpa − eager| / max |eager| ${gErr}`);
          console.log(
            `  ${name}: relative max |Δ| logits ${err.toExponential(2)}, gradients ${gErr.toExponential(2)}`,
          );
        });
      }, "forward and backward");
      const run = async (impl: "sdpa" | "eager") => {
        dec.attention = impl;
        return await generate(dec, [[5, 9, 3, 17, 2, 8], [11, 4], [7, 7, 1, 30]], {
          maxNewTokens: 8,
          checkEvery: 3,
        });
      };
      const a = await run("sdpa"), b = await run("eager");
      assert.deepEqual(a.tokens, b.tokens, "greedy tokens");
      let worst = 0;
      a.logprobs.forEach((row, i) =>
        row.forEach((lp, j) => (worst = Math.max(worst, Math.abs(lp - b.logprobs[i]![j]!))))
      );
      assert.ok(worst <= 10 * TOL, `greedy log-probs: max |sdpa − eager| ${worst}`);
      console.log(`  ${name}: greedy tokens equal, max |Δ log-prob| ${worst.toExponential(2)}`);
      dec.attention = "auto";
    },
  });
}
