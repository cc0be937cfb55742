/**
 * Value tests for linear algebra and NN ops (matmul, bmm, linear, softmax,
 * logSoftmax, layerNorm) and for selection and sampling (topk, sort,
 * multinomial). Runs on MOERL_TEST_DEVICE with float dtype MOERL_TEST_DTYPE
 * (tests/util.ts).
 */
import assert from "node:assert/strict";
import { Generator, layerNorm, linear } from "../ffi/mod.ts";
import { DEVICE } from "./util.ts";
import { expectClose, expectExact, ft, matmulRef, meanOf, step, sumOf } from "./ops_helpers.ts";

Deno.test("linear algebra", async (t) => {
  const A = [1, 2, -1, 0.5, 3, -2]; // [2, 3]
  const B = [2, -1, 0, 1.5, 4, 0.5]; // [3, 2]

  await step(t, "matmul 2-D", () => {
    const y = ft([[1, 2, -1], [0.5, 3, -2]]).matmul(ft([[2, -1], [0, 1.5], [4, 0.5]]));
    expectClose(y, [2, 2], [-2, 1.5, -7, 3]);
    expectClose(y, [2, 2], matmulRef(A, B, 2, 3, 2));
  });

  await step(t, "matmul batched [2,2,3] × [3,2] broadcasts", () => {
    const batch = [A, A.map((v) => -2 * v)];
    const y = ft([[[1, 2, -1], [0.5, 3, -2]], [[-2, -4, 2], [-1, -6, 4]]]).matmul(
      ft([[2, -1], [0, 1.5], [4, 0.5]]),
    );
    expectClose(y, [2, 2, 2], batch.flatMap((a) => matmulRef(a, B, 2, 3, 2)));
  });

  await step(t, "matmul with vectors", () => {
    const m = ft([[1, 2, -1], [0.5, 3, -2]]);
    const v = ft([2, 0.5, -1]);
    expectClose(m.matmul(v), [2], [1 * 2 + 2 * 0.5 + 1, 0.5 * 2 + 3 * 0.5 + 2]); // [4, 4.5]
    expectClose(v.matmul(ft([[2, -1], [0, 1.5], [4, 0.5]])), [2], [4 - 4, -2 + 0.75 - 0.5]);
    expectClose(v.matmul(v), [], [4 + 0.25 + 1]);
  });

  await step(t, "bmm", () => {
    const a = ft([[[1, 2], [3, 4]], [[0.5, -1], [2, 0]]]);
    const b = ft([[[1, 0], [0, 1]], [[2, 1], [-1, 3]]]);
    // batch 0: identity; batch 1: [[0.5·2+1, 0.5-3], [4, 2]]
    expectClose(a.bmm(b), [2, 2, 2], [1, 2, 3, 4, 2, -2.5, 4, 2]);
    assert.throws(() => a.bmm(ft([[1, 0], [0, 1]])), "bmm needs 3-D operands");
  });

  await step(t, "linear with and without bias", () => {
    const x = ft([[1, 2, -1], [0.5, 3, -2]]); // [2, 3]
    const wRows = [[1, 0, 0], [0, 1, 0], [1, 1, 1], [2, -1, 0.5]]; // [4, 3]
    const w = ft(wRows);
    const xs = [[1, 2, -1], [0.5, 3, -2]];
    const noBias = xs.flatMap((r) => wRows.map((wr) => sumOf(r.map((v, i) => v * wr[i]!))));
    expectClose(linear(x, w), [2, 4], noBias);
    expectClose(linear(x, w, null), [2, 4], noBias);
    const bias = [0.5, -1, 2, 0];
    expectClose(linear(x, w, ft(bias)), [2, 4], noBias.map((v, i) => v + bias[i % 4]!));
    // 3-D input applies to the last dim.
    expectClose(linear(ft([xs]), w, ft(bias)), [1, 2, 4], noBias.map((v, i) => v + bias[i % 4]!));
  });
});

Deno.test("softmax and normalisation", async (t) => {
  const ROWS = [[1, 2, 3, 0.5], [-1, 0, 4, -2.5], [0, 0, 0, 0]];
  const softmaxRef = (r: number[]) => {
    const m = Math.max(...r);
    const e = r.map((v) => Math.exp(v - m));
    const s = sumOf(e);
    return e.map((v) => v / s);
  };
  const logSoftmaxRef = (r: number[]) => softmaxRef(r).map(Math.log);
  const colsOf = (rows: number[][]) => rows[0]!.map((_, j) => rows.map((r) => r[j]!));

  await step(t, "softmax over the last dim and over dim 0", () => {
    const x = ft(ROWS);
    const y = x.softmax(-1);
    expectClose(y, [3, 4], ROWS.flatMap(softmaxRef));
    expectClose(y.sum(-1), [3], [1, 1, 1], { what: "rows sum to 1" });
    expectClose(x.softmax(1), [3, 4], ROWS.flatMap(softmaxRef));
    // Over columns: transpose the JS result back.
    const cols = colsOf(ROWS).map(softmaxRef);
    expectClose(x.softmax(0), [3, 4], ROWS.flatMap((_, i) => cols.map((c) => c[i]!)));
    expectClose(x.softmax(0).sum(0), [4], [1, 1, 1, 1]);
  });

  await step(t, "logSoftmax", () => {
    const x = ft(ROWS);
    expectClose(x.logSoftmax(-1), [3, 4], ROWS.flatMap(logSoftmaxRef));
    expectClose(x.logSoftmax(-1).exp().sum(-1), [3], [1, 1, 1]);
    const cols = colsOf(ROWS).map(logSoftmaxRef);
    expectClose(x.logSoftmax(0), [3, 4], ROWS.flatMap((_, i) => cols.map((c) => c[i]!)));
  });

  await step(t, "softmax / logSoftmax with dtype float32 on a FLOAT input", () => {
    // The input is cast first, so the result is float32-accurate even for bf16 inputs.
    const x = ft(ROWS);
    const y = x.softmax(-1, "float32");
    expectClose(y, [3, 4], ROWS.flatMap(softmaxRef), { dtype: "float32", tol: 1e-5 });
    const l = x.logSoftmax(1, "float32");
    expectClose(l, [3, 4], ROWS.flatMap(logSoftmaxRef), { dtype: "float32", tol: 1e-5 });
  });

  const layerNormRef = (xs: number[], w?: number[], b?: number[], eps = 1e-5) => {
    const m = meanOf(xs);
    const v = meanOf(xs.map((x) => (x - m) ** 2)); // biased
    return xs.map((x, i) => ((x - m) / Math.sqrt(v + eps)) * (w ? w[i]! : 1) + (b ? b[i]! : 0));
  };
  const LN_ROWS = [[1, 2, 3, 6], [-2, 0.5, 0.5, 4], [3, 3, 3, 3]];

  await step(t, "layerNorm without weight/bias", () => {
    const y = layerNorm(ft(LN_ROWS), [4]);
    expectClose(y, [3, 4], LN_ROWS.flatMap((r) => layerNormRef(r)));
    // A constant row normalises to zeros (variance 0, eps keeps it finite).
    assert.deepEqual(y.select(0, 2).toArray(), [0, 0, 0, 0]);
    expectClose(layerNorm(ft(LN_ROWS), [4], null, null), [3, 4], LN_ROWS.flatMap((r) => layerNormRef(r)));
  });

  await step(t, "layerNorm with weight and bias, and with a large eps", () => {
    const w = [1, 0.5, -2, 1.5], b = [0, 1, -0.5, 0.25];
    const y = layerNorm(ft(LN_ROWS), [4], ft(w), ft(b));
    expectClose(y, [3, 4], LN_ROWS.flatMap((r) => layerNormRef(r, w, b)));
    // The eps argument is used: eps = 1 visibly shrinks the result.
    const e = layerNorm(ft(LN_ROWS), [4], ft(w), ft(b), 1);
    expectClose(e, [3, 4], LN_ROWS.flatMap((r) => layerNormRef(r, w, b, 1)));
    // Weight only.
    expectClose(layerNorm(ft(LN_ROWS), [4], ft(w)), [3, 4], LN_ROWS.flatMap((r) => layerNormRef(r, w)));
  });

  await step(t, "layerNorm over the last two dims", () => {
    // [2, 2, 2] normalised over [2, 2]: each batch is one group of 4.
    const batches = [[1, 2, 3, 6], [-2, 0.5, 0.5, 4]];
    const y = layerNorm(ft([[[1, 2], [3, 6]], [[-2, 0.5], [0.5, 4]]]), [2, 2]);
    expectClose(y, [2, 2, 2], batches.flatMap((r) => layerNormRef(r)));
  });
});

Deno.test("selection and sampling", async (t) => {
  await step(t, "topk largest and smallest, sorted", () => {
    const x = ft([[1, 5, 3, 4], [8, 2, 7, 6]]);
    const top = x.topk(2);
    expectExact(top.values, [2, 2], [5, 4, 8, 7]);
    expectExact(top.indices, [2, 2], [1, 3, 0, 2], "int64");
    const low = x.topk(3, -1, false);
    expectExact(low.values, [2, 3], [1, 3, 4, 2, 6, 7]);
    expectExact(low.indices, [2, 3], [0, 2, 3, 1, 3, 2], "int64");
    const col = x.topk(1, 0);
    expectExact(col.values, [1, 4], [8, 5, 7, 6]);
    expectExact(col.indices, [1, 4], [1, 0, 1, 1], "int64");
    // Unsorted: the same set, in some order.
    const u = x.topk(2, -1, true, false);
    const pairs = (vals: number[], idx: number[]) => vals.map((v, i) => `${v}@${idx[i]}`);
    const uv = u.values.toArray(), ui = u.indices.toArray();
    assert.deepEqual(pairs(uv.slice(0, 2), ui.slice(0, 2)).sort(), ["4@3", "5@1"]);
    assert.deepEqual(pairs(uv.slice(2), ui.slice(2)).sort(), ["7@2", "8@0"]);
  });

  await step(t, "sort ascending / descending with indices", () => {
    const x = ft([[3, -1, 2.5, 0], [-4, 6, 1, 0.5]]);
    const asc = x.sort();
    expectExact(asc.values, [2, 4], [-1, 0, 2.5, 3, -4, 0.5, 1, 6]);
    expectExact(asc.indices, [2, 4], [1, 3, 2, 0, 0, 3, 2, 1], "int64");
    const desc = x.sort(-1, true);
    expectExact(desc.values, [2, 4], [3, 2.5, 0, -1, 6, 1, 0.5, -4]);
    expectExact(desc.indices, [2, 4], [0, 2, 3, 1, 1, 2, 3, 0], "int64");
    const d0 = x.sort(0);
    expectExact(d0.values, [2, 4], [-4, -1, 1, 0, 3, 6, 2.5, 0.5]);
    expectExact(d0.indices, [2, 4], [1, 0, 1, 0, 0, 1, 0, 1], "int64");
  });

  await step(t, "multinomial: seeded, reproducible", () => {
    using g1 = new Generator(11, DEVICE);
    using g2 = new Generator(11, DEVICE);
    const p = ft([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]);
    const a = p.multinomial(50, true, g1);
    const b = p.multinomial(50, true, g2);
    assert.deepEqual(a.shape, [2, 50]);
    assert.equal(a.dtype, "int64");
    assert.deepEqual(a.toArray(), b.toArray());
    for (const v of a.toArray()) assert.ok(Number.isInteger(v) && v >= 0 && v < 4);
    const again = p.multinomial(50, true, g1);
    assert.notDeepEqual(a.toArray(), again.toArray(), "a generator advances");
  });

  await step(t, "multinomial: one-hot rows, replacement, distinct draws", () => {
    using g = new Generator(3, DEVICE);
    const oneHot = ft([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 5]]); // unnormalised is fine
    const draws = oneHot.multinomial(6, true, g);
    expectExact(draws, [3, 6], [2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 3], "int64");
    expectExact(oneHot.multinomial(1, false, g), [3, 1], [2, 0, 3], "int64");

    // With replacement more draws than categories works.
    const many = ft([[1, 1, 1]]).multinomial(10, true, g);
    assert.deepEqual(many.shape, [1, 10]);
    // Without replacement, all categories with n = cols: a permutation.
    const perm = ft([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]).multinomial(5, false, g).tolist() as number[][];
    for (const row of perm) assert.deepEqual([...row].sort(), [0, 1, 2, 3, 4]);
    // Without replacement never repeats; zero-probability categories are never drawn.
    for (let i = 0; i < 10; i++) {
      const row = ft([0, 1, 1, 0, 2, 1]).multinomial(3, false, g).toArray();
      assert.equal(new Set(row).size, 3, `distinct draws ${row}`);
      for (const v of row) assert.ok(v !== 0 && v !== 3, `drew zero-probability ${v}`);
    }
    // A 1-D probability vector gives a 1-D result.
    assert.deepEqual(ft([0, 1]).multinomial(2, true, g).toArray(), [1, 1]);
    // Too many draws without replacement is an error.
    assert.throws(() => ft([[1, 1]]).multinomial(3, false, g));
  });
});
