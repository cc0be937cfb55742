/**
 * AdamW against a plain-JS float64 implementation of PyTorch's update rule,
 * and clipGradNorm.
 *
 * The AdamW comparisons run in float64 on DEVICE whatever FLOAT says: they
 * compare to 1e-10, which only float64 can hold. clipGradNorm uses FLOAT.
 */
import assert from "node:assert/strict";
import {
  AdamW,
  clipGradNorm,
  fromTypedArray,
  keep,
  type ParamGroup,
  type Tensor,
  tensor,
  tidy,
} from "../ffi/mod.ts";
import { assertClose, assertNoLeak, DEVICE, FLOAT, TOL } from "./util.ts";

const F64 = { dtype: "float64", device: DEVICE } as const;

function param(values: readonly number[]): Tensor {
  return fromTypedArray(Float64Array.from(values), [values.length], F64).setRequiresGrad();
}

/** One parameter as the reference sees it: values, moments, step count, and loss coefficients c. */
interface RefParam {
  p: number[];
  m: number[];
  v: number[];
  t: number;
  c: number[];
}

/** PyTorch's AdamW (no amsgrad), written out in float64 JS. g is the gradient. */
function refStep(
  s: RefParam,
  g: readonly number[],
  lr: number,
  wd: number,
  b1: number,
  b2: number,
  eps: number,
): void {
  s.t++;
  for (let i = 0; i < s.p.length; i++) {
    s.p[i] = s.p[i]! - lr * wd * s.p[i]!;
    s.m[i] = b1 * s.m[i]! + (1 - b1) * g[i]!;
    s.v[i] = b2 * s.v[i]! + (1 - b2) * g[i]! * g[i]!;
    const mHat = s.m[i]! / (1 - b1 ** s.t);
    const vHat = s.v[i]! / (1 - b2 ** s.t);
    s.p[i] = s.p[i]! - (lr * mHat) / (Math.sqrt(vHat) + eps);
  }
}

function refParam(p: number[], c: number[]): RefParam {
  return { p: [...p], m: p.map(() => 0), v: p.map(() => 0), t: 0, c };
}

/** |a - e| <= rtol·|e| elementwise (plus a floor far below float64 noise of O(1) values). */
function assertRel(actual: readonly number[], expected: readonly number[], rtol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!, e = expected[i]!;
    assert.ok(
      Math.abs(a - e) <= rtol * Math.abs(e) + 1e-14,
      `${what}[${i}]: got ${a}, expected ${e} (rel err ${Math.abs(a - e) / Math.abs(e)})`,
    );
  }
}

/** loss = Σ_params Σ p² · c, whose gradient is 2·c·p; runs backward and frees the graph. */
function lossBackward(params: readonly Tensor[], cs: readonly Tensor[]): void {
  tidy(() => {
    let loss = params[0]!.square().mul(cs[0]!).sum();
    for (let i = 1; i < params.length; i++) loss = loss.add(params[i]!.square().mul(cs[i]!).sum());
    loss.backward();
  });
}

Deno.test("optim: AdamW matches PyTorch's update formula over 5 steps, two groups", () => {
  assertNoLeak(() => {
    const init = [[1.5, -2, 1.2, 3], [-1.1, 2.5], [2, -1.7, 1.3]];
    const coef = [[0.5, 1, 2, 0.25], [3, 0.7], [1, 1.5, 0.2]];
    const params = init.map(param);
    const cs = coef.map((c) => fromTypedArray(Float64Array.from(c), [c.length], F64));
    const groups: ParamGroup[] = [
      { params: [params[0]!, params[1]!], lr: 0.1, weightDecay: 0.01 },
      { params: [params[2]!], lr: 0.03, weightDecay: 0.2, betas: [0.8, 0.95], eps: 1e-6 },
    ];
    const opt = new AdamW(groups);
    const hyper = [
      { lr: 0.1, wd: 0.01, b1: 0.9, b2: 0.999, eps: 1e-8 },
      { lr: 0.1, wd: 0.01, b1: 0.9, b2: 0.999, eps: 1e-8 },
      { lr: 0.03, wd: 0.2, b1: 0.8, b2: 0.95, eps: 1e-6 },
    ];
    assert.deepEqual(opt.groups[0]!.betas, [0.9, 0.999], "default betas");
    assert.equal(opt.groups[0]!.eps, 1e-8, "default eps");
    const ref = init.map((p, i) => refParam(p, coef[i]!));
    try {
      for (let step = 1; step <= 5; step++) {
        lossBackward(params, cs);
        // the gradient backward() produced is the one the reference assumes
        for (let i = 0; i < params.length; i++) {
          using g = params[i]!.grad!;
          assertRel(
            g.toArray(),
            ref[i]!.p.map((p, j) => 2 * ref[i]!.c[j]! * p),
            1e-12,
            `step ${step} grad ${i}`,
          );
        }
        opt.step();
        opt.zeroGrad();
        for (let i = 0; i < params.length; i++) {
          const h = hyper[i]!, s = ref[i]!;
          refStep(s, s.p.map((p, j) => 2 * s.c[j]! * p), h.lr, h.wd, h.b1, h.b2, h.eps);
          assertRel(params[i]!.toArray(), s.p, 1e-10, `step ${step} param ${i}`);
          const st = opt.state(params[i]!)!;
          assert.equal(st.step, step);
          assertRel(st.expAvg.toArray(), s.m, 1e-10, `step ${step} exp_avg ${i}`);
          assertRel(st.expAvgSq.toArray(), s.v, 1e-10, `step ${step} exp_avg_sq ${i}`);
          assert.equal(params[i]!.dtype, "float64");
        }
      }
    } finally {
      opt.dispose();
      for (const t of [...params, ...cs]) t.dispose();
    }
  }, "AdamW 5 steps");
});

Deno.test("optim: a parameter without a grad is skipped", () => {
  assertNoLeak(() => {
    using used = param([1, 2]);
    using unused = param([3, -4]);
    using c = tensor([1, 1], F64);
    using opt = new AdamW([{ params: [used, unused], lr: 0.1, weightDecay: 0.5 }]);
    for (let i = 0; i < 3; i++) {
      lossBackward([used], [c]);
      opt.step();
      opt.zeroGrad();
    }
    assert.equal(opt.state(used)?.step, 3);
    assert.equal(opt.state(unused)?.step ?? 0, 0, "no step counted for a grad-less param");
    // weight decay 0.5 would have shrunk it had it been touched
    assert.deepEqual(unused.toArray(), [3, -4]);
    assert.notDeepEqual(used.toArray(), [1, 2]);
  });
});

Deno.test("optim: step(only) refuses a parameter the optimizer does not hold, before updating any", () => {
  assertNoLeak(() => {
    using held = param([1, 2]);
    using stray = param([3, -4, 5]);
    using c = tensor([1, 1], F64);
    using c3 = tensor([1, 1, 1], F64);
    using opt = new AdamW([{ params: [held], lr: 0.1 }]);
    lossBackward([held, stray], [c, c3]);
    assert.throws(
      () => opt.step([held, stray]),
      /parameter 1 of the 2 to update \(\[3\]\) is in none of the optimizer's groups/,
    );
    assert.deepEqual(held.toArray(), [1, 2], "nothing updated");
    opt.step([held]);
    assert.equal(opt.state(held)?.step, 1);
    opt.zeroGrad([held, stray]);
  });
});

Deno.test("optim: settings torch.optim refuses are refused, at construction and when a schedule sets them", () => {
  assertNoLeak(() => {
    using p = param([1, 2]);
    for (
      const [group, reason] of [
        [{ lr: NaN }, /AdamW: group 0's lr must be a finite number >= 0, got NaN/],
        [{ lr: -1 }, /lr must be a finite number >= 0, got -1/],
        [{ lr: 1, weightDecay: -0.1 }, /weightDecay must be a finite number >= 0/],
        [{ lr: 1, betas: [1.5, 0.9] }, /betas must be two numbers in \[0, 1\), got \[1\.5,0\.9\]/],
        [{ lr: 1, eps: 0 }, /eps must be a finite number > 0, got 0/],
      ] as const
    ) {
      assert.throws(() => new AdamW([{ params: [p], ...group } as ParamGroup]), reason);
    }
    using c = tensor([1, 1], F64);
    using opt = new AdamW([{ params: [p], lr: 0.1 }]);
    lossBackward([p], [c]);
    opt.groups[0]!.lr = NaN; // a schedule gone wrong
    assert.throws(() => opt.step(), /AdamW\.step: group 0's lr must be a finite number >= 0, got NaN/);
    assert.deepEqual(p.toArray(), [1, 2], "nothing updated");
    opt.zeroGrad();
  });
});

Deno.test("optim: moments of the wrong shape are refused before anything changes", () => {
  assertNoLeak(() => {
    using w = param([1, 2]);
    using c = tensor([1, 1], F64);
    using opt = new AdamW([{ params: [w], lr: 0.1 }]);
    const st = opt.initState(w);
    st.expAvg.dispose();
    st.expAvg = keep(tensor([0, 0, 0], F64)); // as a bad restore would leave it
    lossBackward([w], [c]);
    assert.throws(() => opt.step(), /state of a \[2\] parameter holds moments of shapes \[3\] and \[2\]/);
    assert.equal(st.step, 0, "no step counted");
    assert.deepEqual(w.toArray(), [1, 2], "the parameter is untouched");
    opt.zeroGrad();
  });
});

Deno.test("optim: integer moments are refused before anything changes (so would moments on another device)", () => {
  assertNoLeak(() => {
    using w = param([1, 2]);
    using c = tensor([1, 1], F64);
    using opt = new AdamW([{ params: [w], lr: 0.1, weightDecay: 0.5 }]);
    const st = opt.initState(w);
    st.expAvgSq.dispose();
    st.expAvgSq = keep(tensor([0, 0], { dtype: "int64", device: DEVICE })); // as a bad restore would leave it
    lossBackward([w], [c]);
    const dev = w.device;
    assert.throws(
      () => opt.step(),
      new RegExp(
        `moments of a \\[2\\] parameter on ${dev} must be floating-point tensors on its device; ` +
          `they are float64 on ${dev} and int64 on ${dev}`,
      ),
    );
    assert.equal(st.step, 0, "no step counted");
    assert.deepEqual(w.toArray(), [1, 2], "the parameter is untouched (weight decay included)");
    opt.zeroGrad();
  });
});

Deno.test("optim: zeroGrad clears every parameter's grad", () => {
  assertNoLeak(() => {
    using a = param([1, 2]);
    using b = param([3]);
    using ca = tensor([1, 1], F64);
    using cb = tensor([2], F64);
    using opt = new AdamW([{ params: [a], lr: 0.1 }, { params: [b], lr: 0.2 }]);
    lossBackward([a, b], [ca, cb]);
    for (const p of [a, b]) {
      using g = p.grad;
      assert.ok(g !== null);
    }
    opt.zeroGrad();
    assert.equal(a.grad === null, true);
    assert.equal(b.grad === null, true);
    // step with no grads changes nothing and counts nothing
    opt.step();
    assert.deepEqual(a.toArray(), [1, 2]);
    assert.equal(opt.state(a)?.step ?? 0, 0);
  });
});

Deno.test("optim: changing a group's lr between steps takes effect", () => {
  assertNoLeak(() => {
    const init = [1.5, -2, 0.8];
    const coef = [1, 0.5, 2];
    using p = param(init);
    using c = fromTypedArray(Float64Array.from(coef), [3], F64);
    using opt = new AdamW([{ params: [p], lr: 0.1, weightDecay: 0.05 }]);
    const ref = refParam(init, coef);
    const schedule = [0.1, 0, 0.02, 0.3];
    for (const [k, lr] of schedule.entries()) {
      opt.groups[0]!.lr = lr;
      const before = p.toArray();
      lossBackward([p], [c]);
      opt.step();
      opt.zeroGrad();
      refStep(ref, ref.p.map((x, j) => 2 * coef[j]! * x), lr, 0.05, 0.9, 0.999, 1e-8);
      assertRel(p.toArray(), ref.p, 1e-10, `step ${k + 1} (lr ${lr})`);
      if (lr === 0) assert.deepEqual(p.toArray(), before, "lr 0 leaves the values alone");
    }
    assert.equal(opt.state(p)!.step, schedule.length, "an lr-0 step still counts");
  });
});

Deno.test("optim: clipGradNorm scales grads to maxNorm and returns the pre-clip norm", () => {
  assertNoLeak(() => {
    const FL = { dtype: FLOAT, device: DEVICE } as const;
    using p1 = tensor([0.5, -1], FL).setRequiresGrad();
    using p2 = tensor([2], FL).setRequiresGrad();
    using noGradParam = tensor([7, 7], FL).setRequiresGrad(); // never used: no grad, ignored
    using k1 = tensor([3, 4], FL);
    using k2 = tensor([12], FL);
    // loss = p1·[3,4] + p2·[12]: grads are exactly [3,4] and [12], total norm 13
    tidy(() => p1.mul(k1).sum().add(p2.mul(k2).sum()).backward());
    const grads = (): number[][] =>
      [p1, p2].map((p) => {
        using g = p.grad!;
        return g.toArray();
      });
    const all = [p1, p2, noGradParam];

    assertClose([clipGradNorm(all, 100)], [13], TOL, "norm (no clip)");
    assertClose(grads().flat(), [3, 4, 12], TOL, "maxNorm 100 leaves grads unchanged");

    assertClose([clipGradNorm(all, 6.5)], [13], TOL, "returns the norm before clipping");
    // PyTorch scales by maxNorm / (total + 1e-6): half, to ~1e-7
    assertClose(grads().flat(), [1.5, 2, 6], Math.max(TOL, 1e-6), "maxNorm 6.5 halves the grads");

    assertClose([clipGradNorm(all, 100)], [6.5], Math.max(TOL, 1e-6), "norm after clipping");
    assert.equal(noGradParam.grad === null, true);
    assert.equal(clipGradNorm([noGradParam], 1), 0, "no grads at all: norm 0");
  });
});
