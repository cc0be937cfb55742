/**
 * Value tests for views and shape ops, indexing, joining and in-place writes.
 * Runs on MOERL_TEST_DEVICE with float dtype MOERL_TEST_DTYPE (tests/util.ts).
 */
import assert from "node:assert/strict";
import { arange, cat, embedding, stack, where, zeros } from "../ffi/mod.ts";
import { FLOAT } from "./util.ts";
import { bt, expectExact, F, ft, I64, ids, numel, step, strides, unravel } from "./ops_helpers.ts";

/** 0, 1, ..., n-1 as a FLOAT tensor of shape. */
const seq = (shape: number[]) => arange(0, numel(shape), 1, F).reshape(shape);
const range = (n: number) => Array.from({ length: n }, (_, i) => i);

Deno.test("views and shape ops", async (t) => {
  await step(t, "reshape (with -1)", () => {
    const x = seq([2, 3]);
    expectExact(x.reshape([3, 2]), [3, 2], range(6));
    expectExact(x.reshape([-1]), [6], range(6));
    expectExact(x.reshape([3, -1]), [3, 2], range(6));
    expectExact(x.reshape([1, -1, 2]), [1, 3, 2], range(6));
    assert.throws(() => x.reshape([4, -1]));
  });

  await step(t, "permute and transpose", () => {
    const shape = [2, 3, 4];
    const x = seq(shape);
    const p = x.permute([2, 0, 1]); // p[k][i][j] = x[i][j][k]
    const pShape = [4, 2, 3];
    const st = strides(shape);
    const expected = range(24).map((o) => {
      const [k, i, j] = unravel(o, pShape) as [number, number, number];
      return i * st[0]! + j * st[1]! + k * st[2]!;
    });
    expectExact(p, pShape, expected);
    expectExact(p.contiguous(), pShape, expected);

    const m = seq([2, 3]);
    expectExact(m.transpose(0, 1), [3, 2], [0, 3, 1, 4, 2, 5]);
    expectExact(m.transpose(-1, -2), [3, 2], [0, 3, 1, 4, 2, 5]);
    const tr = x.transpose(0, 2); // tr[k][j][i] = x[i][j][k]
    const trExpected = range(24).map((o) => {
      const [k, j, i] = unravel(o, [4, 3, 2]) as [number, number, number];
      return i * 12 + j * 4 + k;
    });
    expectExact(tr, [4, 3, 2], trExpected);
  });

  await step(t, "slice (step, negative start), narrow, select", () => {
    const x = seq([2, 5]); // [[0..4], [5..9]]
    expectExact(x.slice(1, 1, 4), [2, 3], [1, 2, 3, 6, 7, 8]);
    expectExact(x.slice(1, 0, 5, 2), [2, 3], [0, 2, 4, 5, 7, 9]);
    expectExact(x.slice(1, -3), [2, 3], [2, 3, 4, 7, 8, 9]);
    expectExact(x.slice(1, -3, undefined, 2), [2, 2], [2, 4, 7, 9]);
    expectExact(x.slice(0, 1), [1, 5], [5, 6, 7, 8, 9]);
    expectExact(x.slice(-1, 1, -1), [2, 3], [1, 2, 3, 6, 7, 8]);
    expectExact(x.narrow(1, 2, 2), [2, 2], [2, 3, 7, 8]);
    expectExact(x.narrow(0, 1, 1), [1, 5], [5, 6, 7, 8, 9]);
    expectExact(x.select(0, 1), [5], [5, 6, 7, 8, 9]);
    expectExact(x.select(1, -1), [2], [4, 9]);
    expectExact(x.select(1, 0), [2], [0, 5]);
  });

  await step(t, "squeeze, unsqueeze, expand, flatten", () => {
    const x = ft([[[1], [2], [3]]]); // [1, 3, 1]
    expectExact(x.squeeze(0), [3, 1], [1, 2, 3]);
    expectExact(x.squeeze(-1), [1, 3], [1, 2, 3]);
    expectExact(x.squeeze(1), [1, 3, 1], [1, 2, 3]); // size 3: unchanged
    const v = ft([1, 2, 3]);
    expectExact(v.unsqueeze(0), [1, 3], [1, 2, 3]);
    expectExact(v.unsqueeze(1), [3, 1], [1, 2, 3]);
    expectExact(v.unsqueeze(-1), [3, 1], [1, 2, 3]);

    expectExact(v.unsqueeze(1).expand([3, 2]), [3, 2], [1, 1, 2, 2, 3, 3]);
    expectExact(v.expand([2, 3]), [2, 3], [1, 2, 3, 1, 2, 3]);
    expectExact(v.unsqueeze(0).expand([2, -1]), [2, 3], [1, 2, 3, 1, 2, 3]);

    const y = seq([2, 3, 4]);
    expectExact(y.flatten(), [24], range(24));
    expectExact(y.flatten(1), [2, 12], range(24));
    expectExact(y.flatten(0, 1), [6, 4], range(24));
    expectExact(y.flatten(-2, -1), [2, 12], range(24));
    expectExact(y.flatten(1, 1), [2, 3, 4], range(24));
    expectExact(ft(5).flatten(), [1], [5]); // 0-d → 1-d, as torch.flatten
  });

  await step(t, "flatten rejects out-of-range or reversed dims (as torch.flatten)", () => {
    const y = seq([2, 3]);
    const shapeOrError = (f: () => { shape: number[] }) => {
      try {
        return f().shape;
      } catch (e) {
        return (e as Error).name;
      }
    };
    const got = {
      "flatten(1, 0)": shapeOrError(() => y.flatten(1, 0)),
      "flatten(2)": shapeOrError(() => y.flatten(2)),
      "flatten(0, 5)": shapeOrError(() => y.flatten(0, 5)),
      "flatten(-3)": shapeOrError(() => y.flatten(-3)),
    };
    assert.deepEqual(got, {
      "flatten(1, 0)": "RangeError",
      "flatten(2)": "RangeError",
      "flatten(0, 5)": "RangeError",
      "flatten(-3)": "RangeError",
    });
  });

  await step(t, "contiguous and clone", () => {
    const m = seq([2, 3]);
    const tc = m.transpose(0, 1).contiguous();
    expectExact(tc, [3, 2], [0, 3, 1, 4, 2, 5]);
    // A contiguous copy of a view does not alias the base.
    tc.fill_(-1);
    expectExact(m, [2, 3], range(6));

    const c = m.clone();
    expectExact(c, [2, 3], range(6));
    c.fill_(5);
    expectExact(m, [2, 3], range(6), FLOAT, "clone has its own storage");
    expectExact(c, [2, 3], [5, 5, 5, 5, 5, 5]);
  });

  await step(t, "chunk", () => {
    const parts = seq([5]).chunk(2);
    assert.equal(parts.length, 2);
    expectExact(parts[0]!, [3], [0, 1, 2]);
    expectExact(parts[1]!, [2], [3, 4]);
    // As torch.chunk: 6 into 4 gives 3 chunks of 2.
    const six = seq([6]).chunk(4);
    assert.deepEqual(six.map((p) => p.shape[0]), [2, 2, 2]);
    // Along dim 1.
    const cols = seq([2, 4]).chunk(2, 1);
    assert.equal(cols.length, 2);
    expectExact(cols[0]!, [2, 2], [0, 1, 4, 5]);
    expectExact(cols[1]!, [2, 2], [2, 3, 6, 7]);
    // Chunks are views.
    const base = seq([4]);
    base.chunk(2)[1]!.fill_(-1);
    expectExact(base, [4], [0, 1, -1, -1]);
  });

  await step(t, "chunk edge cases (as torch.chunk)", () => {
    const x = seq([5]);
    const shapesOrError = (f: () => { shape: number[] }[]) => {
      try {
        return f().map((c) => c.shape);
      } catch (e) {
        return (e as Error).name;
      }
    };
    const got = {
      "chunk(0)": shapesOrError(() => x.chunk(0)),
      "chunk(2.5)": shapesOrError(() => x.chunk(2.5)),
      "[0, 3].chunk(2)": shapesOrError(() => zeros([0, 3], F).chunk(2)),
    };
    assert.deepEqual(got, {
      "chunk(0)": "RangeError",
      "chunk(2.5)": "RangeError",
      "[0, 3].chunk(2)": [[0, 3]],
    });
  });

  await step(t, "tri (tril / triu with diagonal)", () => {
    const x = ft([[1, 2, 3], [4, 5, 6], [7, 8, 9]]);
    expectExact(x.tri(), [3, 3], [1, 0, 0, 4, 5, 0, 7, 8, 9]);
    expectExact(x.tri(0, true), [3, 3], [1, 2, 3, 0, 5, 6, 0, 0, 9]);
    expectExact(x.tri(1, true), [3, 3], [0, 2, 3, 0, 0, 6, 0, 0, 0]);
    expectExact(x.tri(-1), [3, 3], [0, 0, 0, 4, 0, 0, 7, 8, 0]);
    expectExact(x.tri(1), [3, 3], [1, 2, 0, 4, 5, 6, 7, 8, 9]);
    expectExact(x.tri(-1, true), [3, 3], [1, 2, 3, 4, 5, 6, 0, 8, 9]);
    // Batched: applies to the last two dims.
    const b = ft([[[1, 2], [3, 4]], [[5, 6], [7, 8]]]);
    expectExact(b.tri(), [2, 2, 2], [1, 0, 3, 4, 5, 0, 7, 8]);
  });
});

Deno.test("indexing and joining", async (t) => {
  const x = () => ft([[1, 2, 3], [4, 5, 6], [7, 8, 9]]);

  await step(t, "indexSelect", () => {
    expectExact(x().indexSelect(0, ids([2, 0, 2])), [3, 3], [7, 8, 9, 1, 2, 3, 7, 8, 9]);
    expectExact(x().indexSelect(1, ids([1])), [3, 1], [2, 5, 8]);
    expectExact(x().indexSelect(-1, ids([2, 1])), [3, 2], [3, 2, 6, 5, 9, 8]);
  });

  await step(t, "gather", () => {
    // dim 1: out[i][j] = x[i][idx[i][j]]
    expectExact(x().gather(1, ids([[0, 0], [2, 1], [1, 2]])), [3, 2], [1, 1, 6, 5, 8, 9]);
    // dim 0: out[i][j] = x[idx[i][j]][j]
    expectExact(x().gather(0, ids([[2, 0, 1]])), [1, 3], [7, 2, 6]);
  });

  await step(t, "scatter", () => {
    const base = zeros([2, 4], F);
    const src = ft([[1, 2], [3, 4]]);
    // dim 1: out[i][idx[i][j]] = src[i][j]
    expectExact(base.scatter(1, ids([[3, 0], [1, 2]]), src), [2, 4], [2, 0, 0, 1, 0, 3, 4, 0]);
    expectExact(base, [2, 4], [0, 0, 0, 0, 0, 0, 0, 0], FLOAT, "scatter returns a copy");
    // dim 0: out[idx[i][j]][j] = src[i][j]
    expectExact(zeros([3, 2], F).scatter(0, ids([[2, 0]]), ft([[5, 6]])), [3, 2], [0, 6, 0, 0, 5, 0]);
  });

  await step(t, "indexAdd accumulates repeated indices", () => {
    const base = ft([[1, 1], [1, 1], [1, 1]]);
    const src = ft([[1, 2], [3, 4], [5, 6], [7, 8]]);
    // rows 0, 2, 0, 0 → row 0 += 1+5+7, 2+6+8; row 2 += 3, 4
    const out = base.indexAdd(0, ids([0, 2, 0, 0]), src);
    expectExact(out, [3, 2], [14, 17, 1, 1, 4, 5]);
    expectExact(base, [3, 2], [1, 1, 1, 1, 1, 1], FLOAT, "indexAdd returns a copy");
    const cols = zeros([2, 3], F).indexAdd(1, ids([2, 2]), ft([[1, 2], [3, 4]]));
    expectExact(cols, [2, 3], [0, 0, 3, 0, 0, 7]);
  });

  await step(t, "maskedFill", () => {
    const mask = bt([[true, false, false], [false, true, false], [false, false, true]]);
    expectExact(x().maskedFill(mask, -1), [3, 3], [-1, 2, 3, 4, -1, 6, 7, 8, -1]);
    // The mask broadcasts: one row for every row.
    expectExact(x().maskedFill(bt([false, true, false]), 0.5), [3, 3], [1, 0.5, 3, 4, 0.5, 6, 7, 0.5, 9]);
    expectExact(x().maskedFill(bt([[true], [false], [false]]), -Infinity), [3, 3], [
      -Infinity,
      -Infinity,
      -Infinity,
      4,
      5,
      6,
      7,
      8,
      9,
    ]);
    // A float mask is refused on every libtorch (1.13 would leave the tensor unchanged without a word).
    assert.throws(
      () => x().maskedFill(ft([1, 0, 0]), -1),
      new RegExp(`masked_fill: the mask must be bool, got ${FLOAT}`),
    );
  });

  await step(t, "where (broadcasting)", () => {
    const cond = bt([[true, false, true], [false, false, true]]);
    const a = ft([[1, 2, 3], [4, 5, 6]]);
    const b = ft([[-1, -2, -3], [-4, -5, -6]]);
    expectExact(where(cond, a, b), [2, 3], [1, -2, 3, -4, -5, 6]);
    // cond [2,1], a [3], b scalar-shaped [1]
    expectExact(where(bt([[true], [false]]), ft([1, 2, 3]), ft([0])), [2, 3], [1, 2, 3, 0, 0, 0]);
  });

  await step(t, "cat and stack", () => {
    const a = ft([[1, 2], [3, 4]]);
    const b = ft([[5, 6]]);
    expectExact(cat([a, b]), [3, 2], [1, 2, 3, 4, 5, 6]);
    expectExact(cat([a, ft([[7], [8]])], 1), [2, 3], [1, 2, 7, 3, 4, 8]);
    expectExact(cat([a, a], -1), [2, 4], [1, 2, 1, 2, 3, 4, 3, 4]);
    const c = ft([[5, 6], [7, 8]]);
    expectExact(stack([a, c]), [2, 2, 2], [1, 2, 3, 4, 5, 6, 7, 8]);
    expectExact(stack([a, c], 1), [2, 2, 2], [1, 2, 5, 6, 3, 4, 7, 8]);
    expectExact(stack([a, c], 2), [2, 2, 2], [1, 5, 2, 6, 3, 7, 4, 8]);
    expectExact(stack([ft([1, 2]), ft([3, 4]), ft([5, 6])], -1), [2, 3], [1, 3, 5, 2, 4, 6]);
  });

  await step(t, "embedding", () => {
    const w = ft([[0, 0.5], [1, 1.5], [2, 2.5], [3, 3.5]]);
    expectExact(embedding(w, ids([3, 1, 1])), [3, 2], [3, 3.5, 1, 1.5, 1, 1.5]);
    expectExact(embedding(w, ids([[0, 2], [3, 0]])), [2, 2, 2], [0, 0.5, 2, 2.5, 3, 3.5, 0, 0.5]);
  });
});

Deno.test("in-place writes", async (t) => {
  await step(t, "copy_ into a narrow view writes through to the base", () => {
    const base = zeros([3, 4], F);
    const view = base.narrow(1, 1, 2);
    const ret = view.copy_(ft([[1, 2], [3, 4], [5, 6]]));
    assert.equal(ret, view, "copy_ returns this");
    expectExact(base, [3, 4], [0, 1, 2, 0, 0, 3, 4, 0, 0, 5, 6, 0]);
    // Broadcasting and casting: an int64 row into every row of a select view.
    base.select(0, 2).copy_(ids([7, 8, 9, 10]));
    expectExact(base, [3, 4], [0, 1, 2, 0, 0, 3, 4, 0, 7, 8, 9, 10]);
    base.narrow(0, 0, 2).copy_(ft([-1]));
    expectExact(base, [3, 4], [-1, -1, -1, -1, -1, -1, -1, -1, 7, 8, 9, 10]);
  });

  await step(t, "fill_", () => {
    const x = zeros([2, 3], F);
    assert.equal(x.fill_(2.5), x);
    expectExact(x, [2, 3], [2.5, 2.5, 2.5, 2.5, 2.5, 2.5]);
    x.slice(1, 0, 3, 2).fill_(-4); // columns 0 and 2
    expectExact(x, [2, 3], [-4, 2.5, -4, -4, 2.5, -4]);
    const i = zeros([2], I64);
    i.fill_(3);
    expectExact(i, [2], [3, 3], "int64");
  });

  await step(t, "indexCopy_", () => {
    const x = zeros([4, 2], F);
    const ret = x.indexCopy_(0, ids([3, 0]), ft([[1, 2], [3, 4]]));
    assert.equal(ret, x);
    expectExact(x, [4, 2], [3, 4, 0, 0, 0, 0, 1, 2]);
    const y = zeros([2, 3], F);
    y.indexCopy_(1, ids([2, 1]), ft([[5, 6], [7, 8]]));
    expectExact(y, [2, 3], [0, 6, 5, 0, 8, 7]);
  });
});
