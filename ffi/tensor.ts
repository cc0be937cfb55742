/**
 * The Tensor class: one native libtorch tensor, its metadata, and methods for
 * every op the shim exposes. Ops return new tensors and never free their
 * inputs; free results with dispose(), `using`, or a scope.
 * @module
 */
import {
  type Device,
  deviceCode,
  deviceName,
  type DType,
  dtypeCode,
  dtypeName,
  ELEMENT_SIZE,
  type Shape,
  type TensorData,
} from "./dtype.ts";
import { c, fail, Handle, i64, int64, outPtr, pair } from "./handle.ts";
import { check, shim } from "./lib.ts";
import type { Generator } from "./runtime.ts";

const U = {
  neg: 0,
  exp: 1,
  log: 2,
  sqrt: 3,
  rsqrt: 4,
  tanh: 5,
  sigmoid: 6,
  silu: 7,
  relu: 8,
  gelu: 9,
  abs: 10,
  sin: 11,
  cos: 12,
  reciprocal: 13,
  square: 14,
  log1p: 15,
  floor: 16,
  ceil: 17,
  round: 18,
  sign: 19,
  logicalNot: 20,
  isnan: 21,
  isfinite: 22,
} as const;
const B = {
  add: 0,
  sub: 1,
  mul: 2,
  div: 3,
  pow: 4,
  maximum: 5,
  minimum: 6,
  eq: 7,
  ne: 8,
  lt: 9,
  le: 10,
  gt: 11,
  ge: 12,
  logicalAnd: 13,
  logicalOr: 14,
  rsub: 15,
  remainder: 16,
} as const;
const R = {
  sum: 0,
  mean: 1,
  amax: 2,
  amin: 3,
  logsumexp: 4,
  prod: 5,
  any: 6,
  all: 7,
  var: 8,
  std: 9,
  norm: 10,
} as const;

const metaBuf = new BigInt64Array(72);
const itemBuf = new Float64Array(1);
let hostReads = 0;

/**
 * How many times values were read back to the host so far (`item`, `toTypedArray` and what uses them,
 * `clipGradNorm`'s norm). Each read waits for the device's queued work, so tests count them in loops.
 */
export function hostReadCount(): number {
  return hostReads;
}

/** Counts one read back to the host (for {@link hostReadCount}). */
export function countHostRead(): void {
  hostReads++;
}

let hostUploads = 0;

/**
 * How many tensors were made from JavaScript data so far (`tensor`, `fromTypedArray`): on a GPU each is a
 * copy from host memory, which a CUDA graph cannot record (see ffi/graph.ts).
 */
export function hostUploadCount(): number {
  return hostUploads;
}

/** Counts one tensor made from host data (for {@link hostUploadCount}). */
export function countHostUpload(): void {
  hostUploads++;
}

interface Meta {
  dtype: DType;
  device: Device;
  shape: number[];
}

/** Values and indices, as returned by max, min, topk and sort. */
export interface ValuesIndices {
  /** The selected values. */
  values: Tensor;
  /** Their int64 indices along the reduced dimension. */
  indices: Tensor;
}

/** Wraps a handle the shim returned, or throws its error naming op and input shapes. */
export function wrap(op: string, p: Deno.PointerValue, ...inputs: Tensor[]): Tensor {
  if (p === null) fail(op, inputs);
  return new Tensor(p);
}

function dims(d: number | readonly number[] | undefined): readonly number[] {
  return d === undefined ? [] : typeof d === "number" ? [d] : d;
}

/** A libtorch tensor owned by TypeScript. */
export class Tensor extends Handle {
  #meta: Meta | undefined;

  // ---- metadata ------------------------------------------------------------
  #m(): Meta {
    const ptr = this.ptr; // throws after dispose, even when the metadata is cached
    if (this.#meta) return this.#meta;
    const nd = shim().mt_meta(c(), ptr, metaBuf, metaBuf.length);
    check(nd, "meta", () => []);
    const shape: number[] = [];
    for (let i = 0; i < nd; i++) shape.push(Number(metaBuf[4 + i]));
    this.#meta = { dtype: dtypeName(Number(metaBuf[0])), device: deviceName(Number(metaBuf[1])), shape };
    return this.#meta;
  }
  /** Sizes of each dimension (a copy). */
  get shape(): number[] {
    return [...this.#m().shape];
  }
  /** Element type. */
  get dtype(): DType {
    return this.#m().dtype;
  }
  /** Where the data lives. */
  get device(): Device {
    return this.#m().device;
  }
  /**
   * The version counter (torch's `t._version`): every in-place write bumps it (an optimizer step, a load
   * into the tensor, `copy_`), so an equal version means unchanged data since it was read.
   */
  get version(): number {
    const v = Number(shim().mt_version(c(), this.ptr));
    check(v < 0 ? -1 : 0, "version", () => []);
    return v;
  }
  /** Number of dimensions. */
  get ndim(): number {
    return this.#m().shape.length;
  }
  /** Number of elements. */
  get numel(): number {
    return this.#m().shape.reduce((a, b) => a * b, 1);
  }
  /** The shape, or [] once disposed; for error messages, which must not throw. */
  shapeForMessage(): number[] {
    return this.disposed ? [] : this.shape;
  }
  /** Size of dimension d (negative counts from the end). */
  size(d: number): number {
    const s = this.#m().shape;
    const i = d < 0 ? s.length + d : d;
    if (!Number.isInteger(i) || i < 0 || i >= s.length) {
      throw new RangeError(`size(${d}): tensor has ${s.length} dims`);
    }
    return s[i]!;
  }

  // ---- reading values ----------------------------------------------------------
  /** Copies the values to a typed array of the dtype (bf16/f16 as raw Uint16 bits, bool as Uint8). */
  toTypedArray(): TensorData {
    const d = this.dtype;
    const n = this.numel;
    const out = d === "float32"
      ? new Float32Array(n)
      : d === "float64"
      ? new Float64Array(n)
      : d === "int64"
      ? new BigInt64Array(n)
      : d === "int32"
      ? new Int32Array(n)
      : d === "int16"
      ? new Int16Array(n)
      : d === "int8"
      ? new Int8Array(n)
      : d === "bfloat16" || d === "float16"
      ? new Uint16Array(n)
      : new Uint8Array(n);
    const bytes = new Uint8Array(out.buffer);
    hostReads++;
    check(
      shim().mt_copy_to(c(), this.ptr, bytes, BigInt(n * ELEMENT_SIZE[d])),
      "toTypedArray",
      () => [this.shape],
    );
    return out;
  }
  /** The values as a flat array of numbers (half types are converted via float32). */
  toArray(): number[] {
    if (this.dtype === "bfloat16" || this.dtype === "float16") {
      using f = this.to("float32");
      return f.toArray();
    }
    const a = this.toTypedArray();
    return a instanceof BigInt64Array ? Array.from(a, Number) : Array.from(a as ArrayLike<number>);
  }
  /** The values as nested arrays, like PyTorch's tolist(). */
  tolist(): unknown {
    const flat = this.toArray();
    const shape = this.shape;
    const build = (dim: number, off: number): unknown => {
      if (dim === shape.length) return flat[off];
      const stride = shape.slice(dim + 1).reduce((a, b) => a * b, 1);
      return Array.from({ length: shape[dim]! }, (_, i) => build(dim + 1, off + i * stride));
    };
    return build(0, 0);
  }
  /** The single value of a one-element tensor. */
  item(): number {
    hostReads++;
    check(shim().mt_item(c(), this.ptr, itemBuf), "item", () => [this.shape]);
    return itemBuf[0]!;
  }

  // ---- conversion --------------------------------------------------------------------
  /** A copy or view with another dtype or on another device (same tensor if nothing changes). */
  to(target: DType | Device, opts: { copy?: boolean } = {}): Tensor {
    const isDev = target === "cpu" || target.startsWith("cuda");
    if (!isDev && !Object.hasOwn(ELEMENT_SIZE, target)) {
      throw new TypeError(`to([${this.shape.join(", ")}]): "${target}" is neither a dtype nor a device`);
    }
    const dt = isDev ? -1 : dtypeCode(target as DType);
    const dev = deviceCode(isDev ? (target as Device) : this.device);
    return wrap("to", shim().mt_to(c(), this.ptr, dt, dev, opts.copy ? 1 : 0), this);
  }

  // ---- views and shape ------------------------------------------------------------------
  /** Same data, new shape (one size may be -1). */
  reshape(shape: Shape): Tensor {
    return wrap("reshape", shim().mt_reshape(c(), this.ptr, i64(shape, "reshape"), shape.length), this);
  }
  /** Reorders dimensions. */
  permute(order: readonly number[]): Tensor {
    return wrap("permute", shim().mt_permute(c(), this.ptr, i64(order, "permute"), order.length), this);
  }
  /** Broadcasts size-1 dimensions to shape (-1 keeps a size). */
  expand(shape: Shape): Tensor {
    return wrap("expand", shim().mt_expand(c(), this.ptr, i64(shape, "expand"), shape.length), this);
  }
  /** Swaps two dimensions. */
  transpose(d0: number, d1: number): Tensor {
    return wrap(
      "transpose",
      shim().mt_transpose(c(), this.ptr, int64(d0, "transpose"), int64(d1, "transpose")),
      this,
    );
  }
  /** Elements start..end (exclusive) with step along dim. */
  slice(dim: number, start: number, end: number = Number.MAX_SAFE_INTEGER, step = 1): Tensor {
    return wrap(
      "slice",
      shim().mt_slice(
        c(),
        this.ptr,
        int64(dim, "slice"),
        int64(start, "slice"),
        int64(end, "slice"),
        int64(step, "slice"),
      ),
      this,
    );
  }
  /** length elements from start along dim. */
  narrow(dim: number, start: number, length: number): Tensor {
    return wrap(
      "narrow",
      shim().mt_narrow(c(), this.ptr, int64(dim, "narrow"), int64(start, "narrow"), int64(length, "narrow")),
      this,
    );
  }
  /** The slice at index along dim, with that dim removed. */
  select(dim: number, index: number): Tensor {
    return wrap(
      "select",
      shim().mt_select(c(), this.ptr, int64(dim, "select"), int64(index, "select")),
      this,
    );
  }
  /** Removes dim if its size is 1. */
  squeeze(dim: number): Tensor {
    return wrap("squeeze", shim().mt_squeeze(c(), this.ptr, int64(dim, "squeeze")), this);
  }
  /** Inserts a size-1 dimension at dim. */
  unsqueeze(dim: number): Tensor {
    return wrap("unsqueeze", shim().mt_unsqueeze(c(), this.ptr, int64(dim, "unsqueeze")), this);
  }
  /** Merges dims start..end into one. */
  flatten(start = 0, end = -1): Tensor {
    const s = this.shape;
    const a = start < 0 ? s.length + start : start;
    const b = end < 0 ? s.length + end : end;
    if (s.length === 0) return this.reshape([1]);
    if (!(0 <= a && a <= b && b < s.length)) {
      throw new RangeError(`flatten(${start}, ${end}): bad dims for a tensor of shape [${s.join(", ")}]`);
    }
    const merged = s.slice(a, b + 1).reduce((x, y) => x * y, 1);
    return this.reshape([...s.slice(0, a), merged, ...s.slice(b + 1)]);
  }
  /** A contiguous copy, or this data if already contiguous. */
  contiguous(): Tensor {
    return wrap("contiguous", shim().mt_contiguous(c(), this.ptr), this);
  }
  /** A copy with its own storage (autograd-tracked). */
  clone(): Tensor {
    return wrap("clone", shim().mt_clone(c(), this.ptr), this);
  }
  /** Splits into n pieces along dim, as torch.chunk (views). */
  chunk(n: number, dim = 0): Tensor[] {
    if (!Number.isInteger(n) || n < 1) {
      throw new RangeError(`chunk(${n}): the number of chunks must be an integer >= 1`);
    }
    const size = this.size(dim);
    if (size === 0) return [this.narrow(dim, 0, 0)];
    const step = Math.ceil(size / n);
    const out: Tensor[] = [];
    for (let s = 0; s < size; s += step) out.push(this.narrow(dim, s, Math.min(step, size - s)));
    return out;
  }
  /** Lower (upper=false) or upper triangle of the last two dims. */
  tri(diagonal = 0, upper = false): Tensor {
    return wrap(
      upper ? "triu" : "tril",
      shim().mt_tri(c(), this.ptr, int64(diagonal, "tri"), upper ? 1 : 0),
      this,
    );
  }

  // ---- indexing -----------------------------------------------------------------------------
  /** Rows of dim picked by an int64 index. */
  indexSelect(dim: number, index: Tensor): Tensor {
    return wrap(
      "index_select",
      shim().mt_index_select(c(), this.ptr, int64(dim, "indexSelect"), index.ptr),
      this,
      index,
    );
  }
  /** out[i][j] = this[index[i][j]][j] for dim 0, and so on. */
  gather(dim: number, index: Tensor): Tensor {
    return wrap("gather", shim().mt_gather(c(), this.ptr, int64(dim, "gather"), index.ptr), this, index);
  }
  /** A copy with src written at index along dim. */
  scatter(dim: number, index: Tensor, src: Tensor): Tensor {
    return wrap(
      "scatter",
      shim().mt_scatter(c(), this.ptr, int64(dim, "scatter"), index.ptr, src.ptr),
      this,
      index,
      src,
    );
  }
  /** A copy with src's rows added at index along dim. */
  indexAdd(dim: number, index: Tensor, src: Tensor): Tensor {
    return wrap(
      "index_add",
      shim().mt_index_add(c(), this.ptr, int64(dim, "indexAdd"), index.ptr, src.ptr),
      this,
      index,
      src,
    );
  }
  /**
   * A copy with value where mask is true.
   * @throws {TypeError} for a mask that is not bool (libtorch 1.13 ignores a float one silently; 2.x refuses it)
   */
  maskedFill(mask: Tensor, value: number): Tensor {
    if (mask.dtype !== "bool") throw new TypeError(`masked_fill: the mask must be bool, got ${mask.dtype}`);
    return wrap("masked_fill", shim().mt_masked_fill(c(), this.ptr, mask.ptr, value), this, mask);
  }

  // ---- in place (no autograd history) ----------------------------------------------------------
  /** Copies src into this (broadcasting, casting); returns this. */
  copy_(src: Tensor): this {
    check(shim().mt_copy_(c(), this.ptr, src.ptr), "copy_", () => [this.shape, src.shape]);
    return this;
  }
  /** Sets every element to value; returns this. */
  fill_(value: number): this {
    check(shim().mt_fill_(c(), this.ptr, value), "fill_", () => [this.shape]);
    return this;
  }
  /** Writes src's slices at index along dim; returns this. */
  indexCopy_(dim: number, index: Tensor, src: Tensor): this {
    check(
      shim().mt_index_copy_(c(), this.ptr, int64(dim, "indexCopy_"), index.ptr, src.ptr),
      "index_copy_",
      () => [this.shape, index.shape, src.shape],
    );
    return this;
  }

  // ---- elementwise -----------------------------------------------------------------------------
  #u(op: keyof typeof U): Tensor {
    return wrap(op, shim().mt_unary(c(), U[op], this.ptr), this);
  }
  #b(op: keyof typeof B, other: Tensor | number): Tensor {
    if (typeof other === "number") {
      return wrap(op, shim().mt_binary_scalar(c(), B[op], this.ptr, other), this);
    }
    return wrap(op, shim().mt_binary(c(), B[op], this.ptr, other.ptr), this, other);
  }
  /** -x */ neg(): Tensor {
    return this.#u("neg");
  }
  /** e^x */ exp(): Tensor {
    return this.#u("exp");
  }
  /** ln x */ log(): Tensor {
    return this.#u("log");
  }
  /** √x */ sqrt(): Tensor {
    return this.#u("sqrt");
  }
  /** 1/√x */ rsqrt(): Tensor {
    return this.#u("rsqrt");
  }
  /** tanh x */ tanh(): Tensor {
    return this.#u("tanh");
  }
  /** 1/(1+e^-x) */ sigmoid(): Tensor {
    return this.#u("sigmoid");
  }
  /** x·sigmoid(x) */ silu(): Tensor {
    return this.#u("silu");
  }
  /** max(x, 0) */ relu(): Tensor {
    return this.#u("relu");
  }
  /** GELU (erf form) */ gelu(): Tensor {
    return this.#u("gelu");
  }
  /** |x| */ abs(): Tensor {
    return this.#u("abs");
  }
  /** sin x */ sin(): Tensor {
    return this.#u("sin");
  }
  /** cos x */ cos(): Tensor {
    return this.#u("cos");
  }
  /** 1/x */ reciprocal(): Tensor {
    return this.#u("reciprocal");
  }
  /** x² */ square(): Tensor {
    return this.#u("square");
  }
  /** ln(1+x) */ log1p(): Tensor {
    return this.#u("log1p");
  }
  /** ⌊x⌋ */ floor(): Tensor {
    return this.#u("floor");
  }
  /** ⌈x⌉ */ ceil(): Tensor {
    return this.#u("ceil");
  }
  /** round half to even */ round(): Tensor {
    return this.#u("round");
  }
  /** -1, 0 or 1 */ sign(): Tensor {
    return this.#u("sign");
  }
  /** !x (bool) */ logicalNot(): Tensor {
    return this.#u("logicalNot");
  }
  /** x is NaN (bool) */ isnan(): Tensor {
    return this.#u("isnan");
  }
  /** x is finite (bool) */ isfinite(): Tensor {
    return this.#u("isfinite");
  }
  /** this + o */ add(o: Tensor | number): Tensor {
    return this.#b("add", o);
  }
  /** this - o */ sub(o: Tensor | number): Tensor {
    return this.#b("sub", o);
  }
  /** this · o */ mul(o: Tensor | number): Tensor {
    return this.#b("mul", o);
  }
  /** this / o (true division) */ div(o: Tensor | number): Tensor {
    return this.#b("div", o);
  }
  /** this ^ o */ pow(o: Tensor | number): Tensor {
    return this.#b("pow", o);
  }
  /** elementwise max */ maximum(o: Tensor | number): Tensor {
    return this.#b("maximum", o);
  }
  /** elementwise min */ minimum(o: Tensor | number): Tensor {
    return this.#b("minimum", o);
  }
  /** this == o (bool) */ eq(o: Tensor | number): Tensor {
    return this.#b("eq", o);
  }
  /** this != o (bool) */ ne(o: Tensor | number): Tensor {
    return this.#b("ne", o);
  }
  /** this < o (bool) */ lt(o: Tensor | number): Tensor {
    return this.#b("lt", o);
  }
  /** this <= o (bool) */ le(o: Tensor | number): Tensor {
    return this.#b("le", o);
  }
  /** this > o (bool) */ gt(o: Tensor | number): Tensor {
    return this.#b("gt", o);
  }
  /** this >= o (bool) */ ge(o: Tensor | number): Tensor {
    return this.#b("ge", o);
  }
  /** this && o */ logicalAnd(o: Tensor): Tensor {
    return this.#b("logicalAnd", o);
  }
  /** this || o */ logicalOr(o: Tensor): Tensor {
    return this.#b("logicalOr", o);
  }
  /** o - this */ rsub(o: Tensor | number): Tensor {
    return this.#b("rsub", o);
  }
  /** Python-style modulo */ remainder(o: Tensor | number): Tensor {
    return this.#b("remainder", o);
  }
  /** Limits values to [min, max]; either bound may be omitted. */
  clamp(min?: number, max?: number): Tensor {
    const flags = (min === undefined ? 0 : 1) | (max === undefined ? 0 : 2);
    return wrap("clamp", shim().mt_clamp(c(), this.ptr, min ?? 0, max ?? 0, flags), this);
  }

  // ---- reductions -------------------------------------------------------------------------------
  #r(op: keyof typeof R, dim: number | readonly number[] | undefined, keepdim: boolean): Tensor {
    const d = dims(dim);
    return wrap(op, shim().mt_reduce(c(), R[op], this.ptr, i64(d, op), d.length, keepdim ? 1 : 0), this);
  }
  /** Sum over dims (all if omitted). */
  sum(dim?: number | readonly number[], keepdim = false): Tensor {
    return this.#r("sum", dim, keepdim);
  }
  /** Mean over dims (all if omitted). */
  mean(dim?: number | readonly number[], keepdim = false): Tensor {
    return this.#r("mean", dim, keepdim);
  }
  /** Maximum value over dims (all if omitted). */
  amax(dim?: number | readonly number[], keepdim = false): Tensor {
    return this.#r("amax", dim, keepdim);
  }
  /** Minimum value over dims (all if omitted). */
  amin(dim?: number | readonly number[], keepdim = false): Tensor {
    return this.#r("amin", dim, keepdim);
  }
  /** log Σ exp over dims (required). */
  logsumexp(dim: number | readonly number[], keepdim = false): Tensor {
    return this.#r("logsumexp", dim, keepdim);
  }
  /** Product over one dim (all if omitted). */
  prod(dim?: number, keepdim = false): Tensor {
    return this.#r("prod", dim, keepdim);
  }
  /** Any true over one dim (all if omitted). */
  any(dim?: number, keepdim = false): Tensor {
    return this.#r("any", dim, keepdim);
  }
  /** All true over one dim (all if omitted). */
  all(dim?: number, keepdim = false): Tensor {
    return this.#r("all", dim, keepdim);
  }
  /** Unbiased variance over dims (all if omitted). */
  var(dim?: number | readonly number[], keepdim = false): Tensor {
    return this.#r("var", dim, keepdim);
  }
  /** Unbiased standard deviation over dims (all if omitted). */
  std(dim?: number | readonly number[], keepdim = false): Tensor {
    return this.#r("std", dim, keepdim);
  }
  /** L2 norm over dims (all if omitted). */
  norm(dim?: number | readonly number[], keepdim = false): Tensor {
    return this.#r("norm", dim, keepdim);
  }
  #mm(op: "max" | "min", dim: number, keepdim: boolean): ValuesIndices {
    check(
      shim().mt_max_dim(c(), this.ptr, int64(dim, op), keepdim ? 1 : 0, op === "min" ? 1 : 0, pair),
      op,
      () => [this.shape],
    );
    return { values: new Tensor(outPtr(pair, 0)), indices: new Tensor(outPtr(pair, 1)) };
  }
  /** Largest values along dim and where they are. */
  max(dim: number, keepdim = false): ValuesIndices {
    return this.#mm("max", dim, keepdim);
  }
  /** Smallest values along dim and where they are. */
  min(dim: number, keepdim = false): ValuesIndices {
    return this.#mm("min", dim, keepdim);
  }
  /** Index of the largest value along dim. */
  argmax(dim: number, keepdim = false): Tensor {
    return wrap("argmax", shim().mt_argmax(c(), this.ptr, int64(dim, "argmax"), keepdim ? 1 : 0, 0), this);
  }
  /** Index of the smallest value along dim. */
  argmin(dim: number, keepdim = false): Tensor {
    return wrap("argmin", shim().mt_argmax(c(), this.ptr, int64(dim, "argmin"), keepdim ? 1 : 0, 1), this);
  }
  /** Running sum along dim. */
  cumsum(dim: number): Tensor {
    return wrap("cumsum", shim().mt_cumsum(c(), this.ptr, int64(dim, "cumsum")), this);
  }

  // ---- linear algebra and NN ---------------------------------------------------------------------
  /** Matrix product with broadcasting (torch.matmul). */
  matmul(o: Tensor): Tensor {
    return wrap("matmul", shim().mt_matmul(c(), this.ptr, o.ptr), this, o);
  }
  /** Batched matrix product of [b, n, m] and [b, m, p]. */
  bmm(o: Tensor): Tensor {
    return wrap("bmm", shim().mt_bmm(c(), this.ptr, o.ptr), this, o);
  }
  /** Softmax along dim, optionally computed in dtype. */
  softmax(dim: number, dtype?: DType): Tensor {
    return wrap(
      "softmax",
      shim().mt_softmax(c(), this.ptr, int64(dim, "softmax"), dtype ? dtypeCode(dtype) : -1),
      this,
    );
  }
  /** Log-softmax along dim, optionally computed in dtype. */
  logSoftmax(dim: number, dtype?: DType): Tensor {
    return wrap(
      "log_softmax",
      shim().mt_log_softmax(c(), this.ptr, int64(dim, "logSoftmax"), dtype ? dtypeCode(dtype) : -1),
      this,
    );
  }

  // ---- selection and sampling -----------------------------------------------------------------------
  /** The k largest (or smallest) values along dim. */
  topk(k: number, dim = -1, largest = true, sorted = true): ValuesIndices {
    check(
      shim().mt_topk(
        c(),
        this.ptr,
        int64(k, "topk"),
        int64(dim, "topk"),
        largest ? 1 : 0,
        sorted ? 1 : 0,
        pair,
      ),
      "topk",
      () => [this.shape],
    );
    return { values: new Tensor(outPtr(pair, 0)), indices: new Tensor(outPtr(pair, 1)) };
  }
  /** Sorted values along dim and their original indices. */
  sort(dim = -1, descending = false): ValuesIndices {
    check(
      shim().mt_sort(c(), this.ptr, int64(dim, "sort"), descending ? 1 : 0, pair),
      "sort",
      () => [this.shape],
    );
    return { values: new Tensor(outPtr(pair, 0)), indices: new Tensor(outPtr(pair, 1)) };
  }
  /** n draws per row from the (unnormalised) probabilities in the last dim. */
  multinomial(n: number, replacement = false, generator?: Generator): Tensor {
    const g = generator ? generator.ptr : null;
    return wrap(
      "multinomial",
      shim().mt_multinomial(c(), this.ptr, int64(n, "multinomial"), replacement ? 1 : 0, g),
      this,
    );
  }

  // ---- autograd ---------------------------------------------------------------------------------------
  /** Whether autograd records ops on this tensor. */
  get requiresGrad(): boolean {
    const nd = shim().mt_meta(c(), this.ptr, metaBuf, metaBuf.length);
    check(nd, "requires_grad", () => []);
    return metaBuf[2] === 1n;
  }
  /** Turns gradient recording on or off for this leaf; returns this. */
  setRequiresGrad(flag = true): this {
    check(shim().mt_set_requires_grad(c(), this.ptr, flag ? 1 : 0), "set_requires_grad", () => [this.shape]);
    return this;
  }
  /** Back-propagates from this tensor (a scalar, or with an explicit grad of its shape). */
  backward(grad?: Tensor, opts: { retainGraph?: boolean } = {}): void {
    const status = shim().mt_backward(c(), this.ptr, grad ? grad.ptr : null, opts.retainGraph ? 1 : 0);
    check(status, "backward", () => (grad ? [this.shape, grad.shape] : [this.shape]));
  }
  /**
   * A new handle to the accumulated gradient, or null if there is none. Every read makes one for the caller
   * to free (unlike PyTorch's `.grad` attribute): `tidy(() => w.grad?.tolist())`, or `using g = w.grad`.
   */
  get grad(): Tensor | null {
    check(shim().mt_grad(c(), this.ptr, pair), "grad", () => [this.shape]);
    return pair[0] === 0n ? null : new Tensor(outPtr(pair, 0));
  }
  /** Drops the accumulated gradient. */
  clearGrad(): void {
    check(shim().mt_clear_grad(c(), this.ptr), "clear_grad", () => [this.shape]);
  }
  /** Sets the accumulated gradient to a copy of grad (its shape, dtype and device must match). */
  setGrad(grad: Tensor): void {
    check(shim().mt_set_grad(c(), this.ptr, grad.ptr), "set_grad", () => [this.shape, grad.shape]);
  }
  /** The same data, cut from the autograd graph. */
  detach(): Tensor {
    return wrap("detach", shim().mt_detach(c(), this.ptr), this);
  }

  /** A short description (no values): shape, dtype, device. */
  override toString(): string {
    return this.disposed
      ? "Tensor(disposed)"
      : `Tensor([${this.shape.join(", ")}], ${this.dtype}, ${this.device})`;
  }
  /** Shown by console.log. */
  [Symbol.for("Deno.customInspect")](): string {
    return this.toString();
  }
}
