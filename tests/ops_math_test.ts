/**
 * Value tests for elementwise ops (every unary and binary op, clamp) and
 * reductions, against JS formulas. Runs on MOERL_TEST_DEVICE with float dtype
 * MOERL_TEST_DTYPE (tests/util.ts).
 */
import assert from "node:assert/strict";
import type { Tensor } from "../ffi/mod.ts";
import { FLOAT } from "./util.ts";
import {
  bt,
  CPU_BF16,
  erf,
  expectClose,
  expectExact,
  ft,
  ids,
  meanOf,
  reduceRef,
  step,
  sumOf,
  unravel,
  varOf,
} from "./ops_helpers.ts";

type UnaryName =
  | "neg"
  | "exp"
  | "log"
  | "sqrt"
  | "rsqrt"
  | "tanh"
  | "sigmoid"
  | "silu"
  | "relu"
  | "gelu"
  | "abs"
  | "sin"
  | "cos"
  | "reciprocal"
  | "square"
  | "log1p"
  | "floor"
  | "ceil"
  | "round"
  | "sign";

const GENERAL = [-2, -1.5, -0.5, 0, 0.5, 1, 2.5];
const POSITIVE = [0.25, 0.5, 1, 2, 4, 6.5];
const FRACTIONS = [-2.5, -1.25, -0.5, 0, 0.75, 1, 2.5];

/** Each float → float unary op: inputs and the JS formula. */
const UNARY: [UnaryName, number[], (x: number) => number][] = [
  ["neg", GENERAL, (x) => -x],
  ["exp", GENERAL, Math.exp],
  ["log", POSITIVE, Math.log],
  ["sqrt", POSITIVE, Math.sqrt],
  ["rsqrt", POSITIVE, (x) => 1 / Math.sqrt(x)],
  ["tanh", GENERAL, Math.tanh],
  ["sigmoid", GENERAL, (x) => 1 / (1 + Math.exp(-x))],
  ["silu", GENERAL, (x) => x / (1 + Math.exp(-x))],
  ["relu", GENERAL, (x) => Math.max(x, 0)],
  ["gelu", [-3, ...GENERAL, 3], (x) => 0.5 * x * (1 + erf(x / Math.SQRT2))],
  ["abs", GENERAL, Math.abs],
  ["sin", [...GENERAL, 3.25], Math.sin],
  ["cos", [...GENERAL, 3.25], Math.cos],
  ["reciprocal", [-4, -0.5, 0.25, 1, 2, 8], (x) => 1 / x],
  ["square", GENERAL, (x) => x * x],
  ["log1p", [-0.5, 0, 0.25, 1, 3], Math.log1p],
  ["floor", FRACTIONS, Math.floor],
  ["ceil", FRACTIONS, Math.ceil],
  ["sign", [-2.5, -0.25, 0, 0.5, 3], Math.sign],
];

type BinaryName =
  | "add"
  | "sub"
  | "mul"
  | "div"
  | "pow"
  | "maximum"
  | "minimum"
  | "eq"
  | "ne"
  | "lt"
  | "le"
  | "gt"
  | "ge"
  | "rsub"
  | "remainder";

/** Python's modulo: the result takes the divisor's sign. */
const pyRem = (a: number, b: number): number => a - Math.floor(a / b) * b;

/** Each binary op taking a tensor or a scalar: the JS formula, and whether it returns bool. */
const BINARY: [BinaryName, (a: number, b: number) => number, boolean][] = [
  ["add", (a, b) => a + b, false],
  ["sub", (a, b) => a - b, false],
  ["mul", (a, b) => a * b, false],
  ["div", (a, b) => a / b, false],
  ["pow", (a, b) => a ** b, false],
  ["maximum", Math.max, false],
  ["minimum", Math.min, false],
  ["eq", (a, b) => +(a === b), true],
  ["ne", (a, b) => +(a !== b), true],
  ["lt", (a, b) => +(a < b), true],
  ["le", (a, b) => +(a <= b), true],
  ["gt", (a, b) => +(a > b), true],
  ["ge", (a, b) => +(a >= b), true],
  ["rsub", (a, b) => b - a, false],
  ["remainder", pyRem, false],
];

Deno.test("elementwise unary", async (t) => {
  for (const [name, xs, fn] of UNARY) {
    await step(t, name, () => {
      const x = ft(xs);
      const y = (x[name] as () => Tensor).call(x);
      expectClose(y, [xs.length], xs.map(fn), { what: name });
      // Shape is kept for higher-rank inputs.
      const x2 = ft([xs.slice(0, 2), xs.slice(2, 4)]);
      expectClose((x2[name] as () => Tensor).call(x2), [2, 2], xs.slice(0, 4).map(fn), {
        what: `${name} 2-D`,
      });
    });
  }

  await step(t, "round (half to even)", () => {
    const y = ft([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.25, -1.75, 3.75]).round();
    expectClose(y, [9], [-2, -2, -0, 0, 2, 2, 0, -2, 4]);
  });

  await step(t, "logicalNot, isnan, isfinite (bool results)", () => {
    expectExact(ft([0, 1.5, -2, 0]).logicalNot(), [4], [1, 0, 0, 1], "bool");
    expectExact(bt([true, false]).logicalNot(), [2], [0, 1], "bool");
    const special = ft([NaN, Infinity, -Infinity, 1, 0]);
    expectExact(special.isnan(), [5], [1, 0, 0, 0, 0], "bool");
    expectExact(special.isfinite(), [5], [0, 0, 0, 1, 1], "bool");
    expectExact(ids([3, 0]).isfinite(), [2], [1, 1], "bool");
  });

  await step(t, "special values: log 0, sqrt of negative, 1/0", () => {
    expectClose(ft([0, -1]).log(), [2], [-Infinity, NaN]);
    expectClose(ft([-1, 0]).sqrt(), [2], [NaN, 0]);
    expectClose(ft([0, -0]).reciprocal(), [2], [Infinity, -Infinity]);
    expectClose(ft([-Infinity, Infinity]).exp(), [2], [0, Infinity]);
    expectClose(ft([-Infinity, Infinity]).sigmoid(), [2], [0, 1]);
  });

  await step(t, "integer inputs keep their dtype", () => {
    expectExact(ids([-3, 4, 0]).neg(), [3], [3, -4, 0], "int64");
    expectExact(ids([-3, 4, 0]).abs(), [3], [3, 4, 0], "int64");
    expectExact(ids([-3, 4, 0]).sign(), [3], [-1, 1, 0], "int64");
    expectExact(ids([-3, 4]).square(), [2], [9, 16], "int64");
  });
});

Deno.test("elementwise binary", async (t) => {
  // a is [2, 1], b is [3]: results broadcast to [2, 3].
  const A = [1.5, -2.5];
  const B = [2, 1.5, -1, -2.5];
  const SCALARS = [2, 1.5, -2.5, 0.5];
  const X = [1.5, -2.5, 0, 4, -1];

  for (const [name, fn, isBool] of BINARY) {
    await step(t, `${name} (tensor, broadcast [2,1] with [4])`, () => {
      const a = ft([[A[0]!], [A[1]!]]);
      const b = ft(B);
      const y = (a[name] as (o: Tensor) => Tensor).call(a, b);
      const expected = A.flatMap((av) => B.map((bv) => fn(av, bv)));
      if (isBool) expectExact(y, [2, 4], expected, "bool", name);
      else expectClose(y, [2, 4], expected, { what: name });
      // Broadcasting the other way round: [4] op [2, 1].
      const y2 = (b[name] as (o: Tensor) => Tensor).call(b, a);
      const expected2 = A.flatMap((av) => B.map((bv) => fn(bv, av)));
      if (isBool) expectExact(y2, [2, 4], expected2, "bool", `${name} reversed`);
      else expectClose(y2, [2, 4], expected2, { what: `${name} reversed` });
    });
    await step(t, `${name} (scalar)`, () => {
      const x = ft([X.slice(0, 2), X.slice(2, 4)]);
      for (const s of SCALARS) {
        const y = (x[name] as (o: number) => Tensor).call(x, s);
        const expected = X.slice(0, 4).map((v) => fn(v, s));
        if (isBool) expectExact(y, [2, 2], expected, "bool", `${name} ${s}`);
        else expectClose(y, [2, 2], expected, { what: `${name} ${s}` });
      }
    });
  }

  await step(t, "remainder takes the divisor's sign (literal values)", () => {
    expectClose(ft([-7, 7, -7, 7, 5.5, -5.5]).remainder(ft([3, -3, -3, 3, 2, 2])), [6], [
      2,
      -2,
      -1,
      1,
      1.5,
      0.5,
    ]);
    expectClose(ft([-7, 7, 5.5]).remainder(3), [3], [2, 1, 2.5]);
  });

  await step(t, "logicalAnd, logicalOr (broadcast)", () => {
    const a = ft([[0], [1.5]]);
    const b = ft([2, 0, -1]);
    expectExact(a.logicalAnd(b), [2, 3], [0, 0, 0, 1, 0, 1], "bool");
    expectExact(a.logicalOr(b), [2, 3], [1, 0, 1, 1, 1, 1], "bool");
    const p = bt([true, true, false, false]);
    const q = bt([true, false, true, false]);
    expectExact(p.logicalAnd(q), [4], [1, 0, 0, 0], "bool");
    expectExact(p.logicalOr(q), [4], [1, 1, 1, 0], "bool");
  });

  await step(t, "integer tensors: scalar ops keep int64 or promote like PyTorch", () => {
    const i = ids([7, -7]);
    expectExact(i.add(2), [2], [9, -5], "int64");
    expectExact(i.mul(3), [2], [21, -21], "int64");
    expectExact(i.remainder(3), [2], [1, 2], "int64");
    expectExact(i.pow(2), [2], [49, 49], "int64");
    expectExact(i.rsub(10), [2], [3, 17], "int64");
    expectExact(i.div(2), [2], [3.5, -3.5], "float32"); // true division
    expectExact(i.mul(2.5), [2], [17.5, -17.5], "float32");
    expectExact(i.add(ids([1, 2])), [2], [8, -5], "int64");
    expectExact(i.eq(7), [2], [1, 0], "bool");
    expectExact(i.add(ft([0.5, 0.5])), [2], [7.5, -6.5], FLOAT);
  });

  await step(t, "clamp: min only, max only, both", () => {
    const x = ft([-3, -1, 0, 0.5, 2, 5]);
    expectClose(x.clamp(-1), [6], [-1, -1, 0, 0.5, 2, 5]);
    expectClose(x.clamp(undefined, 2), [6], [-3, -1, 0, 0.5, 2, 2]);
    expectClose(x.clamp(-1, 2), [6], [-1, -1, 0, 0.5, 2, 2]);
    expectClose(x.clamp(0), [6], [0, 0, 0, 0.5, 2, 5]); // 0 is a bound, not "absent"
    expectClose(x.clamp(undefined, 0), [6], [-3, -1, 0, 0, 0, 0]);
    expectClose(x.clamp(0.5, 0.5), [6], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]);
  });
});

Deno.test("reductions", async (t) => {
  // 24 distinct integers in [-10, 13], shape [2, 3, 4].
  const SHAPE = [2, 3, 4];
  const DATA = Array.from({ length: 24 }, (_, i) => ((i * 7) % 24) - 10);
  const x = () => ft(DATA).reshape(SHAPE);
  const DIMS: (number | number[] | undefined)[] = [undefined, 0, 1, -1, [0, 2], [1, 2], [0, 1, 2]];
  const lse = (xs: number[]) => {
    const m = Math.max(...xs);
    return m + Math.log(sumOf(xs.map((v) => Math.exp(v - m))));
  };
  type RName = "sum" | "mean" | "amax" | "amin" | "var" | "std" | "norm" | "logsumexp";
  const REDUCTIONS: [RName, (xs: number[]) => number][] = [
    ["sum", sumOf],
    ["mean", meanOf],
    ["amax", (xs) => Math.max(...xs)],
    ["amin", (xs) => Math.min(...xs)],
    ["var", varOf],
    ["std", (xs) => Math.sqrt(varOf(xs))],
    ["norm", (xs) => Math.sqrt(sumOf(xs.map((v) => v * v)))],
    ["logsumexp", lse],
  ];

  for (const [name, fn] of REDUCTIONS) {
    await step(t, `${name} over all dims, one dim, several dims, keepdim`, () => {
      for (const dims of DIMS) {
        if (dims === undefined && name === "logsumexp") continue; // needs dims
        const keeps = dims === undefined ? [false] : [false, true];
        for (const keepdim of keeps) {
          const d = dims === undefined ? undefined : typeof dims === "number" ? [dims] : dims;
          const ref = reduceRef(DATA, SHAPE, d, keepdim, fn);
          const xx = x();
          const y = (xx[name] as (d: number | number[] | undefined, k: boolean) => Tensor).call(
            xx,
            dims,
            keepdim,
          );
          expectClose(y, ref.shape, ref.values, { what: `${name}(${JSON.stringify(dims)}, ${keepdim})` });
        }
      }
    });
  }

  // libtorch 1.13 has no CPU prod kernel for bf16 ("prod_cpu" not implemented for 'BFloat16').
  await step(t, "prod over all / one dim", () => {
    const y = ft([[1, -2, 0.5], [3, 1.5, -1]]);
    expectClose(y.prod(), [], [4.5]);
    expectClose(y.prod(0), [3], [3, -3, -0.5]);
    expectClose(y.prod(1), [2], [-1, -4.5]);
    expectClose(y.prod(-1, true), [2, 1], [-1, -4.5]);
    expectClose(y.prod(0, true), [1, 3], [3, -3, -0.5]);
    const ref = reduceRef(DATA, SHAPE, [1], false, (xs) => xs.reduce((a, b) => a * b, 1));
    expectClose(x().prod(1), ref.shape, ref.values);
  }, { ignore: CPU_BF16 });

  await step(t, "any / all over all / one dim", () => {
    const b = bt([[true, false, false], [false, false, false]]);
    expectExact(b.any(), [], [1], "bool");
    expectExact(b.all(), [], [0], "bool");
    expectExact(b.any(1), [2], [1, 0], "bool");
    expectExact(b.any(0), [3], [1, 0, 0], "bool");
    expectExact(b.any(1, true), [2, 1], [1, 0], "bool");
    const c = bt([[true, true], [true, false]]);
    expectExact(c.all(1), [2], [1, 0], "bool");
    expectExact(c.all(0, true), [1, 2], [1, 0], "bool");
    expectExact(c.all(-1, true), [2, 1], [1, 0], "bool");
    // Float inputs count non-zero as true.
    const f = ft([[0, 0.5], [0, 0]]);
    expectExact(f.any(1), [2], [1, 0], "bool");
    expectExact(f.all(), [], [0], "bool");
    expectExact(ft([[1, -2], [0.5, 3]]).all(), [], [1], "bool");
  });

  await step(t, "max / min (dim): values and indices", () => {
    const argOf = (pick: (xs: number[]) => number) => (xs: number[]) => xs.indexOf(pick(xs));
    const mx = (xs: number[]) => Math.max(...xs), mn = (xs: number[]) => Math.min(...xs);
    for (const dim of [0, 1, 2, -1]) {
      for (const keepdim of [false, true]) {
        const what = `(${dim}, ${keepdim})`;
        const { values, indices } = x().max(dim, keepdim);
        const vref = reduceRef(DATA, SHAPE, [dim], keepdim, mx);
        const iref = reduceRef(DATA, SHAPE, [dim], keepdim, argOf(mx));
        expectClose(values, vref.shape, vref.values, { what: `max values ${what}` });
        expectExact(indices, iref.shape, iref.values, "int64", `max indices ${what}`);
        const min = x().min(dim, keepdim);
        expectClose(min.values, vref.shape, reduceRef(DATA, SHAPE, [dim], keepdim, mn).values, {
          what: `min ${what}`,
        });
        expectExact(
          min.indices,
          iref.shape,
          reduceRef(DATA, SHAPE, [dim], keepdim, argOf(mn)).values,
          "int64",
        );
      }
    }
    // Literal check of the same thing.
    const m = ft([[3, 9, -1], [4, -6, 8]]);
    const r = m.max(1);
    expectExact(r.values, [2], [9, 8]);
    expectExact(r.indices, [2], [1, 2], "int64");
    const r0 = m.min(0, true);
    expectExact(r0.values, [1, 3], [3, -6, -1]);
    expectExact(r0.indices, [1, 3], [0, 1, 0], "int64");
  });

  await step(t, "argmax / argmin", () => {
    const m = ft([[3, 9, -1], [4, -6, 8]]);
    expectExact(m.argmax(1), [2], [1, 2], "int64");
    expectExact(m.argmin(1), [2], [2, 1], "int64");
    expectExact(m.argmax(0), [3], [1, 0, 1], "int64");
    expectExact(m.argmin(0, true), [1, 3], [0, 1, 0], "int64");
    expectExact(m.argmax(-1, true), [2, 1], [1, 2], "int64");
    for (const dim of [0, 1, 2]) {
      const ref = reduceRef(DATA, SHAPE, [dim], false, (xs) => xs.indexOf(Math.max(...xs)));
      expectExact(x().argmax(dim), ref.shape, ref.values, "int64", `argmax ${dim}`);
    }
  });

  await step(t, "cumsum", () => {
    const m = ft([[1, 2, 3], [4, -5, 6.5]]);
    expectClose(m.cumsum(1), [2, 3], [1, 3, 6, 4, -1, 5.5]);
    expectClose(m.cumsum(-1), [2, 3], [1, 3, 6, 4, -1, 5.5]);
    expectClose(m.cumsum(0), [2, 3], [1, 2, 3, 5, -3, 9.5]);
    expectExact(ids([1, 2, 3, 4]).cumsum(0), [4], [1, 3, 6, 10], "int64");
    // 3-D, middle dim, against a JS running sum.
    const expected = DATA.map((_, o) => {
      const [i, j, k] = unravel(o, SHAPE) as [number, number, number];
      let s = 0;
      for (let jj = 0; jj <= j; jj++) s += DATA[i * 12 + jj * 4 + k]!;
      return s;
    });
    expectClose(x().cumsum(1), SHAPE, expected);
  });

  await step(t, "keepdim with no dims keeps every dim as size 1", () => {
    // amax/amin honour keepdim when reducing over all dims; the other reductions must too.
    const ref = reduceRef(DATA, SHAPE, undefined, true, sumOf);
    assert.deepEqual(ref.shape, [1, 1, 1]);
    const shapes: Record<string, number[]> = {};
    const xx = x();
    const names = ["amax", "amin", "sum", "mean", "var", "std", "norm", "prod", "any", "all"] as const;
    // No CPU prod kernel for bf16 in libtorch 1.13 (see the prod step).
    for (const name of names.filter((n) => !(CPU_BF16 && n === "prod"))) {
      shapes[name] = (xx[name] as (d: undefined, k: boolean) => Tensor).call(xx, undefined, true).shape;
    }
    const expected = Object.fromEntries(Object.keys(shapes).map((k) => [k, [1, 1, 1]]));
    assert.deepEqual(shapes, expected);
  });
});
