/**
 * Autograd: finite-difference gradient checks of the differentiable ops the
 * model uses, and the backward/grad/detach/grad-mode contract.
 *
 * Gradient checks run in float64 on DEVICE whatever FLOAT says: central
 * differences with eps 1e-6 cancel ~10 significant digits, which only float64
 * has to spare. The behavioural tests use FLOAT on DEVICE.
 */
import assert from "node:assert/strict";
import {
  embedding,
  fromTypedArray,
  isGradEnabled,
  layerNorm,
  linear,
  noGrad,
  setGradEnabled,
  type Tensor,
  tensor,
  tidy,
  TorchError,
} from "../ffi/mod.ts";
import { assertClose, assertNoLeak, DEVICE, FLOAT, TOL } from "./util.ts";

const F64 = { dtype: "float64", device: DEVICE } as const;
const FL = { dtype: FLOAT, device: DEVICE } as const;

/** A small seeded PRNG (mulberry32) so every run checks the same points. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return (): number => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** n uniform draws in [lo, hi). */
function uniform(rand: () => number, n: number, lo = -1, hi = 1): number[] {
  return Array.from({ length: n }, () => lo + (hi - lo) * rand());
}

function f64(values: readonly number[], shape: readonly number[]): Tensor {
  return fromTypedArray(Float64Array.from(values), shape, F64);
}

/**
 * Checks the gradients backward() gives f at inputs against central finite
 * differences. f may return any shape: the scalar differentiated is
 * sum(f(x) · w) with fixed random w, so upstream grads are non-trivial.
 * Everything is float64 on DEVICE.
 */
function gradcheck(
  f: (inputs: Tensor[]) => Tensor,
  inputs: number[][],
  shapes: number[][],
  { eps = 1e-6, rtol = 1e-5, atol = 1e-7, seed = 1, what = "gradcheck" } = {},
): void {
  assertNoLeak(() => {
    const rand = rng(seed);
    const outShape = tidy(() => noGrad(() => f(inputs.map((d, i) => f64(d, shapes[i]!))).shape));
    const n = outShape.reduce((a, b) => a * b, 1);
    using w = f64(uniform(rand, n, 0.5, 1.5).map((x, i) => (i % 2 ? -x : x)), outShape);

    const loss = (values: number[][]): number =>
      tidy(() => noGrad(() => f(values.map((d, i) => f64(d, shapes[i]!))).mul(w).sum().item()));

    const analytic = tidy(() => {
      const leaves = inputs.map((d, i) => f64(d, shapes[i]!).setRequiresGrad());
      const out = f(leaves);
      assert.ok(out.requiresGrad, `${what}: output does not require grad`);
      out.mul(w).sum().backward();
      return leaves.map((leaf, i) => {
        using g = leaf.grad;
        assert.ok(g !== null, `${what}: input ${i} got no grad`);
        assert.deepEqual(g.shape, shapes[i], `${what}: grad ${i} shape`);
        assert.equal(g.dtype, "float64");
        return g.toArray();
      });
    });

    for (let i = 0; i < inputs.length; i++) {
      for (let j = 0; j < inputs[i]!.length; j++) {
        const plus = inputs.map((d) => [...d]);
        const minus = inputs.map((d) => [...d]);
        plus[i]![j]! += eps;
        minus[i]![j]! -= eps;
        const numeric = (loss(plus) - loss(minus)) / (2 * eps);
        const a = analytic[i]![j]!;
        assert.ok(
          Math.abs(a - numeric) <= rtol * Math.abs(numeric) + atol,
          `${what}: d/d input${i}[${j}]: backward ${a}, finite difference ${numeric}`,
        );
      }
    }
  }, what);
}

Deno.test("autograd: gradcheck matmul", () => {
  const r = rng(10);
  gradcheck(([a, b]) => a!.matmul(b!), [uniform(r, 12), uniform(r, 8)], [[3, 4], [4, 2]], { what: "matmul" });
  // batched: [2,3,4] @ [4,2] broadcasts the right operand
  gradcheck(([a, b]) => a!.matmul(b!), [uniform(r, 24), uniform(r, 8)], [[2, 3, 4], [4, 2]], {
    what: "batched matmul",
  });
});

Deno.test("autograd: gradcheck softmax", () => {
  const r = rng(11);
  gradcheck(([x]) => x!.softmax(-1), [uniform(r, 10, -2, 2)], [[2, 5]], { what: "softmax(-1)" });
  gradcheck(([x]) => x!.softmax(0), [uniform(r, 10, -2, 2)], [[2, 5]], { what: "softmax(0)" });
});

Deno.test("autograd: gradcheck logSoftmax", () => {
  const r = rng(12);
  gradcheck(([x]) => x!.logSoftmax(1), [uniform(r, 15, -3, 3)], [[3, 5]], { what: "logSoftmax" });
});

Deno.test("autograd: gradcheck layerNorm w.r.t. input, weight and bias", () => {
  const r = rng(13);
  gradcheck(
    ([x, w, b]) => layerNorm(x!, [4], w, b),
    [uniform(r, 12, -2, 2), uniform(r, 4, 0.5, 1.5), uniform(r, 4)],
    [[3, 4], [4], [4]],
    { what: "layerNorm" },
  );
  // normalising over the two trailing dims
  gradcheck(
    ([x, w, b]) => layerNorm(x!, [2, 3], w, b),
    [uniform(r, 12, -2, 2), uniform(r, 6, 0.5, 1.5), uniform(r, 6)],
    [[2, 2, 3], [2, 3], [2, 3]],
    { what: "layerNorm 2-D" },
  );
});

Deno.test("autograd: gradcheck embedding w.r.t. weight, repeated index", () => {
  const r = rng(14);
  using idx = tensor([[1, 3], [1, 4], [0, 1]], { dtype: "int64", device: DEVICE }); // row 1 used 3 times
  gradcheck(([w]) => embedding(w!, idx), [uniform(r, 15)], [[5, 3]], { what: "embedding" });
  // and the repeated row really accumulates: with unit upstream grads its grad is 3 per element
  assertNoLeak(() => {
    using w = f64(uniform(r, 15), [5, 3]).setRequiresGrad();
    tidy(() => embedding(w, idx).sum().backward());
    using g = w.grad!;
    assert.deepEqual(g.toArray(), [1, 1, 1, 3, 3, 3, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
  });
});

Deno.test("autograd: gradcheck small MLP (linear, tanh, linear, sum of squares), all 4 params", () => {
  const r = rng(15);
  using x = f64(uniform(r, 12), [4, 3]);
  gradcheck(
    ([w1, b1, w2, b2]) => tidy(() => linear(linear(x, w1!, b1).tanh(), w2!, b2).square().sum()),
    [uniform(r, 15), uniform(r, 5), uniform(r, 10), uniform(r, 2)],
    [[5, 3], [5], [2, 5], [2]],
    { what: "mlp" },
  );
});

Deno.test("autograd: backward with an explicit grad for a non-scalar output", () => {
  assertNoLeak(() => {
    using x = tensor([[1, -2, 0.5], [3, 1.5, -1]], FL).setRequiresGrad();
    using g = tensor([[1, 2, 3], [-1, 0.5, 2]], FL);
    tidy(() => x.square().backward(g));
    using grad = x.grad!;
    const xs = x.toArray(), gs = g.toArray();
    assert.deepEqual(grad.shape, [2, 3]);
    assertClose(grad.toArray(), xs.map((v, i) => 2 * v * gs[i]!), TOL, "2·x·g");
  });
});

Deno.test("autograd: retainGraph allows a second backward and grads accumulate", () => {
  assertNoLeak(() => {
    using x = tensor([0.5, -1, 1], FL).setRequiresGrad();
    tidy(() => {
      const loss = x.exp().sum(); // exp saves its output: a second pass needs retainGraph
      loss.backward(undefined, { retainGraph: true });
      {
        using g1 = x.grad!;
        assertClose(g1.toArray(), x.toArray().map(Math.exp), TOL, "first pass");
      }
      loss.backward();
    });
    using g2 = x.grad!;
    assertClose(g2.toArray(), x.toArray().map((v) => 2 * Math.exp(v)), TOL, "accumulated 2×");
  });
});

Deno.test("autograd: a second backward without retainGraph throws TorchError; next op works", () => {
  assertNoLeak(() => {
    using x = tensor([1, 2, 3], FL).setRequiresGrad();
    tidy(() => {
      const loss = x.mul(x).sum(); // mul saves both inputs, freed after the first pass
      loss.backward();
      assert.throws(
        () => loss.backward(),
        (e: unknown) => {
          assert.ok(e instanceof TorchError, `expected TorchError, got ${e}`);
          assert.equal(e.op, "backward");
          assert.match(e.message, /^backward\(\[\]\): /);
          assert.match(e.message, /second time|retain_graph/);
          assert.doesNotMatch(e.message, /Exception raised from|frame #/);
          return true;
        },
      );
    });
    using g = x.grad!;
    assertClose(g.toArray(), [2, 4, 6], TOL, "grad from the one successful pass");
    using y = tensor([1, 2], FL);
    using z = y.add(1);
    assertClose(z.toArray(), [2, 3], TOL, "op after the failure");
  });
});

Deno.test("autograd: grad is null before backward; clearGrad drops it", () => {
  assertNoLeak(() => {
    using x = tensor([1, 2], FL).setRequiresGrad();
    assert.equal(x.grad === null, true, "no grad before backward"); // (not assert.equal(x.grad, null): that narrows x.grad to null)
    tidy(() => x.mul(3).sum().backward());
    {
      using g = x.grad;
      assert.ok(g !== null);
      assertClose(g.toArray(), [3, 3]);
    }
    x.clearGrad();
    assert.equal(x.grad === null, true, "clearGrad drops the grad");
    // a fresh backward after clearGrad starts from zero, not from the old grad
    tidy(() => x.mul(5).sum().backward());
    using g2 = x.grad!;
    assertClose(g2.toArray(), [5, 5]);
  });
});

Deno.test("autograd: detach cuts the graph", () => {
  assertNoLeak(() => {
    using x = tensor([1, -2, 3], FL).setRequiresGrad();
    using d = x.detach();
    assert.equal(d.requiresGrad, false);
    assertClose(d.toArray(), x.toArray(), 0, "same values");
    tidy(() => {
      const viaDetach = d.mul(2); // no history at all
      assert.equal(viaDetach.requiresGrad, false);
      x.mul(d).sum().backward(); // d is a constant: d(x·d)/dx = d, not 2x
    });
    using g = x.grad!;
    assertClose(g.toArray(), d.toArray(), TOL, "grad = detached value");
  });
});

Deno.test("autograd: noGrad results do not require grad; mode restored, also on throw", () => {
  assertNoLeak(() => {
    using x = tensor([1, 2], FL).setRequiresGrad();
    assert.equal(isGradEnabled(), true);
    using y = noGrad(() => {
      assert.equal(isGradEnabled(), false);
      return tidy(() => x.mul(2).add(1));
    });
    assert.equal(y.requiresGrad, false);
    assert.equal(isGradEnabled(), true);
    assert.throws(() =>
      noGrad(() => {
        throw new Error("boom");
      }), /boom/);
    assert.equal(isGradEnabled(), true, "restored after a throw");
    using z = x.mul(2);
    assert.equal(z.requiresGrad, true, "grad recording is back on");
  }, "noGrad");
});

Deno.test("autograd: setGradEnabled turns recording off and restores", () => {
  assertNoLeak(() => {
    using x = tensor([1, 2], FL).setRequiresGrad();
    const prev = setGradEnabled(false);
    try {
      assert.equal(prev, true);
      assert.equal(isGradEnabled(), false);
      using y = x.mul(2);
      assert.equal(y.requiresGrad, false);
      assert.equal(setGradEnabled(false), false, "returns the previous setting");
    } finally {
      setGradEnabled(prev);
    }
    assert.equal(isGradEnabled(), true);
    using z = x.mul(2);
    assert.equal(z.requiresGrad, true);
  });
});
