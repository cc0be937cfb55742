/**
 * The RL losses and advantages on small hand-computed tensors: masking of
 * prompt and padding tokens (even when they hold NaN or huge values), PPO
 * clipping on both sides for positive and negative advantages, k1/k3 values
 * and gradients, the ratio-1 policy gradient, whitening, the group baseline,
 * and no leaked tensors.
 */
import assert from "node:assert/strict";
import { liveTensors, randn, type Tensor, tensor, tidy } from "../mod.ts";
import { loadBalancingLoss } from "../model/moe.ts";
import { advantages, groupBaseline, zeroSpreadFraction } from "../rl/advantages.ts";
import {
  entropyBonus,
  klPenalty,
  maskedMean,
  ppoClippedLoss,
  routerAuxLoss,
  valueLoss,
} from "../rl/losses.ts";
import { assertClose, assertNoLeak, DEVICE } from "./util.ts";

const f32 = { dtype: "float32" as const, device: DEVICE };
const t = (x: number[] | number[][]): Tensor => tensor(x, f32);
const leaf = (x: number[] | number[][]): Tensor => t(x).setRequiresGrad(true);
/** The gradient of a leaf as a flat array (freed). */
const gradOf = (x: Tensor): number[] => tidy(() => x.grad!.toArray());

Deno.test("losses: masked token mean", () => {
  assertNoLeak(() =>
    tidy(() => {
      const x = t([[1, 2, NaN], [Infinity, 5, 6]]);
      const mask = t([[1, 1, 0], [0, 1, 1]]);
      assertClose([maskedMean(x, mask).item()], [3.5]); // (1 + 2 + 5 + 6) / 4
      assertClose([maskedMean(x, t([[0, 0, 0], [0, 0, 0]])).item()], [0], 0, "no valid token");
    })
  );
});

Deno.test("losses: PPO clipped loss by hand, all four clip cases, prompt and padding masked", () => {
  const clip = 0.2;
  // Row 0 A = +1: r 1.5 (clipped high), r 0.5 (below 1 − ε but A > 0: not clipped).
  // Row 1 A = −2: r 0.5 (clipped low); its last token is padding (NaN).
  // Row 2 A = −1: r 1.5 (above 1 + ε but A < 0: not clipped), r 1.
  // Column 0 is prompt; row 0 holds a huge log-ratio there.
  const r = [[1, 1.5, 0.5], [1, 0.5, 1], [1, 1.5, 1]];
  const old = [[0, -1, -2], [0, -0.5, -1], [0, -3, -0.25]];
  const logp = old.map((row, i) => row.map((o, j) => o + Math.log(r[i]![j]!)));
  logp[0]![0] = 50;
  logp[1]![2] = NaN;
  const mask = [[0, 1, 1], [0, 1, 0], [0, 1, 1]];
  const adv = [1, -2, -1];
  const expectTok = [-Math.min(1.5, 1.2), -Math.min(0.5, 0.8), -Math.min(-1, -1.6), -Math.min(-1.5, -1.2), 1];
  const valid = [[0, 1], [0, 2], [1, 1], [2, 1], [2, 2]] as const;
  const k3 = (x: number): number => x - 1 - Math.log(x);
  assertNoLeak(() =>
    tidy(() => {
      const lp = leaf(logp);
      const out = ppoClippedLoss(lp, t(old), t(adv), t(mask), clip);
      assertClose([out.loss.item()], [expectTok.reduce((a, b) => a + b) / 5], 1e-5, "loss = 2.4 / 5");
      assertClose([out.clipFraction.item()], [2 / 5], 1e-6, "clip fraction");
      assertClose([out.ratioMean.item()], [(1.5 + 0.5 + 0.5 + 1.5 + 1) / 5], 1e-5, "ratio mean");
      const kl = valid.reduce((s, [i, j]) => s + k3(r[i]![j]!), 0) / 5;
      assertClose([out.approxKl.item()], [kl], 1e-5, "approx KL");
      assert.ok(!out.clipFraction.requiresGrad && !out.approxKl.requiresGrad, "metrics carry no graph");
      out.loss.backward();
      // d/dlogp: −A·r/5 where the unclipped term is the minimum, 0 where the clip is active or masked.
      assertClose(gradOf(lp), [0, 0, -0.5 / 5, 0, 0, 0, 0, 1.5 / 5, 1 / 5], 1e-5, "gradient");
    })
  );
});

Deno.test("losses: per-token advantages [B, T] and shape checks", () => {
  assertNoLeak(() =>
    tidy(() => {
      const lp = t([[0, -1], [0, -2]]);
      const mask = t([[0, 1], [1, 1]]);
      const perSeq = ppoClippedLoss(lp, lp, t([2, -4]), mask).loss.item(); // (−2 + 4 + 4) / 3
      const perTok = ppoClippedLoss(lp, lp, t([[5, 3], [-1, -4]]), mask).loss.item(); // (−3 + 1 + 4) / 3
      assertClose([perSeq, perTok], [2, 2 / 3], 1e-6);
      assert.throws(() => ppoClippedLoss(lp, lp, t([1, 2, 3]), t([[1, 1], [1, 1]])), /advantages must be/);
      assert.throws(() => ppoClippedLoss(lp, t([[0, 0, 0]]), t([1, 2]), lp), /shapes differ/);
    })
  );
});

Deno.test("losses: with old = logp.detach() the ratio is 1 and the gradient is the vanilla policy gradient", () => {
  assertNoLeak(() =>
    tidy(() => {
      const lp = randn([3, 5], f32).sub(2).setRequiresGrad(true);
      const adv = t([0.7, -1.3, 0.2]);
      const mask = t([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0]]);
      const out = ppoClippedLoss(lp, lp.detach(), adv, mask, 0.2);
      assertClose([out.ratioMean.item(), out.clipFraction.item(), out.approxKl.item()], [1, 0, 0], 1e-6);
      out.loss.backward();
      const g = gradOf(lp);
      const a = adv.toArray(), m = mask.toArray(), n = m.reduce((x, y) => x + y);
      assertClose(g, m.map((mi, i) => -a[Math.floor(i / 5)]! * mi / n), 1e-6, "−A·mask/n");
      // the same as differentiating −maskedMean(A·logp)
      const vanilla = lp.detach().setRequiresGrad(true);
      maskedMean(vanilla.mul(adv.unsqueeze(1)), mask).neg().backward();
      assertClose(g, gradOf(vanilla), 1e-6);
    })
  );
});

Deno.test("losses: KL k1 and k3 values, masking and gradients", () => {
  // δ = ref − logp = [·, −0.5, 1]; column 0 is masked (ref −inf there).
  const logp = [[0, -1, -2]], ref = [[-Infinity, -1.5, -1]], mask = [[0, 1, 1]];
  const d = [-0.5, 1];
  assertNoLeak(() =>
    tidy(() => {
      const lp1 = leaf(logp);
      const k1 = klPenalty(lp1, t(ref), t(mask), "k1");
      assertClose(k1.perToken.toArray(), [0, 0.5, -1], 1e-6, "k1 per token");
      assertClose([k1.mean.item()], [-0.25], 1e-6);
      k1.mean.backward();
      assertClose(gradOf(lp1), [0, 0.5, 0.5], 1e-6, "k1 gradient: 1/n");

      const lp3 = leaf(logp);
      const k3 = klPenalty(lp3, t(ref), t(mask), "k3");
      const want = d.map((x) => Math.exp(x) - x - 1);
      assertClose(k3.perToken.toArray(), [0, ...want], 1e-6, "k3 per token");
      assertClose([k3.mean.item()], [(want[0]! + want[1]!) / 2], 1e-6);
      k3.mean.backward();
      assertClose(gradOf(lp3), [0, ...d.map((x) => (1 - Math.exp(x)) / 2)], 1e-6, "k3 gradient: (1 − r)/n");

      const a = randn([4, 6], f32), b = randn([4, 6], f32);
      const ones = t(Array.from({ length: 4 }, () => Array(6).fill(1)));
      assert.ok(klPenalty(a, b, ones, "k3").perToken.amin().item() >= 0, "k3 ≥ 0");
      assert.equal(klPenalty(a, a, ones, "k3").mean.item(), 0);
      assert.throws(() => klPenalty(a, b, ones, "k2" as "k1"), /estimator/);
    })
  );
});

Deno.test("losses: entropy bonus and value loss", () => {
  assertNoLeak(() =>
    tidy(() => {
      const ent = leaf([[9, 1, 2], [9, 3, 9]]);
      const e = entropyBonus(ent, t([[0, 1, 1], [0, 1, 0]]));
      assertClose([e.item()], [2]); // (1 + 2 + 3) / 3
      e.backward();
      assertClose(gradOf(ent), [0, 1, 1, 0, 1, 0].map((m) => m / 3), 1e-6);

      const v = leaf([1, -1, 0.5]), target = leaf([0, 1, 0.5]);
      const l = valueLoss(v, target);
      assertClose([l.item()], [0.5 * (1 + 4 + 0) / 3], 1e-6, "½·mean((v − t)²)");
      l.backward();
      assertClose(gradOf(v), [1 / 3, -2 / 3, 0], 1e-6, "gradient (v − t)/N");
      assert.equal(tidy(() => target.grad), null, "targets are constants");
      assert.throws(() => valueLoss(t([[1]]), t([[1]])), /\[N\]/);
    })
  );
});

Deno.test("losses: router aux loss is the model's load-balancing loss", () => {
  assertNoLeak(() =>
    tidy(() => {
      const logits = [randn([6, 4], f32), randn([6, 4], f32)];
      const am = tensor([[1, 1, 1], [0, 1, 1]], { dtype: "int64", device: DEVICE });
      assertClose([routerAuxLoss(logits, 2, am).item()], [loadBalancingLoss(logits, 2, am).item()], 1e-6);
      assert.throws(() => routerAuxLoss([], 2), /no router logits/);
    })
  );
});

Deno.test("advantages: group baseline", () => {
  assert.deepEqual(groupBaseline([1.05, 0, -0.05], 1), [1.05, 0, -0.05], "K = 1: raw rewards");
  assertClose(groupBaseline([1, 0, 0, 1, 1, 1], 3), [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], 1e-12);
  assertClose(groupBaseline([1.05, 0, 0.95, -0.05], 2), [0.525, -0.525, 0.5, -0.5], 1e-12);
  assert.throws(() => groupBaseline([1, 2, 3], 2), /groups of k = 2/);
  assert.throws(() => groupBaseline([1, 2], 0), /k must be/);
  assert.throws(() => groupBaseline([1, NaN], 1), /finite/);
  assert.equal(zeroSpreadFraction([1, 1, 0, 1, 0.5, 0.5], 2), 2 / 3);
  assert.equal(zeroSpreadFraction([1, 0], 1), 1, "K = 1: every group has zero spread");
});

Deno.test("advantages: centred − value, whitened; value detached; degenerate cases only centred", () => {
  const live = liveTensors();
  tidy(() => {
    const values = leaf([0.5, 0, -0.5, 0]);
    const a = advantages(t([1, 0, 0, -1]), values);
    // x = [0.5, 0, 0.5, −1], mean 0, unbiased std √0.5
    assertClose(a.toArray(), [0.5, 0, 0.5, -1].map((x) => x / Math.sqrt(0.5)), 1e-6);
    assertClose([a.mean().item(), a.std().item()], [0, 1], 1e-6, "mean 0, std 1");
    assert.ok(!a.requiresGrad, "no gradient into the critic");
    assert.deepEqual(advantages(t([0.7]), t([0.2])).toArray(), [0], "N = 1: centred only");
    assert.deepEqual(advantages(t([1, 1, 1]), t([0, 0, 0])).toArray(), [0, 0, 0], "std 0: centred only");
    const tiny = advantages(t([1, 1 + 1e-7]), t([0, 0])).toArray();
    assert.ok(tiny.every((x) => Math.abs(x) < 1e-6), `std ≤ minStd: not blown up (${tiny})`);
    assert.throws(() => advantages(t([1, 2]), t([1, 2, 3])), /both be \[N\]/);
  });
  assert.equal(liveTensors(), live);
});
