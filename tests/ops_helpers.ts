/**
 * Helpers shared by the op value tests (tests/ops_*_test.ts): tensor makers on
 * DEVICE/FLOAT, a leak-checked step, and small JS reference implementations
 * (reductions, matmul, erf) used to compute expected values without calling
 * the op under test.
 */
import assert from "node:assert/strict";
import { type DType, type NestedArray, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import { assertClose, assertNoLeak, DEVICE, FLOAT, TOL } from "./util.ts";

/** Options for float inputs under test. */
export const F = { dtype: FLOAT, device: DEVICE } as const;
/** Options for int64 index tensors. */
export const I64 = { dtype: "int64", device: DEVICE } as const;
/** Options for bool masks. */
export const BOOL = { dtype: "bool", device: DEVICE } as const;
/** The name Tensor.device reports for DEVICE ("cuda" is reported as "cuda:0"). */
export const DEVICE_NAME: string = DEVICE === "cuda" ? "cuda:0" : DEVICE;
/** True for the one combination where libtorch 1.13 lacks some CPU kernels. */
export const CPU_BF16: boolean = DEVICE === "cpu" && FLOAT === "bfloat16";

/** A FLOAT tensor on DEVICE. */
export function ft(data: NestedArray): Tensor {
  return tensor(data, F);
}

/** An int64 tensor on DEVICE. */
export function ids(data: NestedArray): Tensor {
  return tensor(data, I64);
}

/** A bool tensor on DEVICE. */
export function bt(data: NestedArray): Tensor {
  return tensor(data, BOOL);
}

/**
 * A test step whose body runs inside tidy (so every tensor it makes is freed)
 * and which fails if anything survives, JS-side or native-side. `ignore`
 * skips it (used only for kernels libtorch lacks on the CPU in bf16).
 */
export function step(
  t: Deno.TestContext,
  name: string,
  fn: () => void,
  opts: { ignore?: boolean } = {},
): Promise<boolean> {
  return t.step({ name, ignore: opts.ignore ?? false, fn: () => assertNoLeak(() => tidy(fn), name) });
}

/** Asserts shape, dtype (default FLOAT) and values within tol. */
export function expectClose(
  x: Tensor,
  shape: readonly number[],
  values: readonly number[],
  opts: { tol?: number; dtype?: DType; what?: string } = {},
): void {
  const what = opts.what ?? "";
  assert.deepEqual(x.shape, shape, `${what} shape`);
  assert.equal(x.dtype, opts.dtype ?? FLOAT, `${what} dtype`);
  assert.equal(x.device, DEVICE_NAME, `${what} device`);
  assertClose(x.toArray(), values, opts.tol ?? TOL, what);
}

/** Asserts shape, dtype and exact values (ints, bools, exactly representable floats; -0 equals 0). */
export function expectExact(
  x: Tensor,
  shape: readonly number[],
  values: readonly number[],
  dtype: DType = FLOAT,
  what = "",
): void {
  assert.deepEqual(x.shape, shape, `${what} shape`);
  assert.equal(x.dtype, dtype, `${what} dtype`);
  assert.equal(x.device, DEVICE_NAME, `${what} device`);
  // deepEqual tells -0 from 0; the sign of a zero is not what these checks are about.
  const noNegZero = (v: number) => (v === 0 ? 0 : v);
  assert.deepEqual(x.toArray().map(noNegZero), values.map(noNegZero), `${what} values`);
}

// ---- JS references ------------------------------------------------------------------------------

/** Row-major strides of shape. */
export function strides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length).fill(1);
  for (let i = shape.length - 2; i >= 0; i--) s[i] = s[i + 1]! * shape[i + 1]!;
  return s;
}

/** The multi-index of flat offset i in shape. */
export function unravel(i: number, shape: readonly number[]): number[] {
  const st = strides(shape);
  return st.map((s, d) => Math.floor(i / s) % shape[d]!);
}

/** Product of sizes. */
export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/**
 * Reduces flat data of shape over dims (all when undefined) with fn applied to
 * each group of values (in increasing flat order).
 */
export function reduceRef(
  data: readonly number[],
  shape: readonly number[],
  dims: readonly number[] | undefined,
  keepdim: boolean,
  fn: (xs: number[]) => number,
): { shape: number[]; values: number[] } {
  const nd = shape.length;
  const red = new Set((dims ?? shape.map((_, i) => i)).map((d) => (d < 0 ? nd + d : d)));
  const outFull = shape.map((s, d) => (red.has(d) ? 1 : s));
  const groups: number[][] = Array.from({ length: numel(outFull) }, () => []);
  const ost = strides(outFull);
  for (let i = 0; i < data.length; i++) {
    const idx = unravel(i, shape);
    let o = 0;
    for (let d = 0; d < nd; d++) if (!red.has(d)) o += idx[d]! * ost[d]!;
    groups[o]!.push(data[i]!);
  }
  const outShape = keepdim ? outFull : shape.filter((_, d) => !red.has(d));
  return { shape: outShape, values: groups.map(fn) };
}

/** Plain matrix product of row-major a [n, k] and b [k, m]. */
export function matmulRef(
  a: readonly number[],
  b: readonly number[],
  n: number,
  k: number,
  m: number,
): number[] {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < m; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += a[i * k + p]! * b[p * m + j]!;
      out.push(s);
    }
  }
  return out;
}

/** erf by its Maclaurin series (double precision for |x| <= 4, plenty here). */
export function erf(x: number): number {
  let term = x, sum = x;
  for (let n = 1; n < 200 && Math.abs(term) > 1e-17 * Math.abs(sum); n++) {
    term *= (-x * x) / n;
    sum += term / (2 * n + 1);
  }
  return (2 / Math.sqrt(Math.PI)) * sum;
}

/** Sum of xs. */
export const sumOf = (xs: readonly number[]): number => xs.reduce((a, b) => a + b, 0);
/** Mean of xs. */
export const meanOf = (xs: readonly number[]): number => sumOf(xs) / xs.length;
/** Unbiased variance of xs. */
export const varOf = (xs: readonly number[]): number => {
  const m = meanOf(xs);
  return sumOf(xs.map((x) => (x - m) ** 2)) / (xs.length - 1);
};
