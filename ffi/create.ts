/**
 * Making tensors: from JS arrays and typed arrays, constants, ranges and
 * random draws.
 * @module
 */
import { type Device, deviceCode, type DType, dtypeCode, ELEMENT_SIZE, type Shape } from "./dtype.ts";
import { c, i64 } from "./handle.ts";
import { shim } from "./lib.ts";
import type { Generator } from "./runtime.ts";
import { countHostUpload, type Tensor, wrap } from "./tensor.ts";
import type { TensorData } from "./dtype.ts";

export type { TensorData } from "./dtype.ts";

/** Nested arrays of numbers or booleans. */
export type NestedArray = number | boolean | NestedArray[];

/** Where and how to create a tensor. */
export interface CreateOptions {
  /** Element type (default float32, or the typed array's own type). */
  dtype?: DType;
  /** Device to create on (default cpu). */
  device?: Device;
}

function typedDtype(a: TensorData): DType {
  if (a instanceof Float32Array) return "float32";
  if (a instanceof Float64Array) return "float64";
  if (a instanceof Int32Array) return "int32";
  if (a instanceof Int16Array) return "int16";
  if (a instanceof Int8Array) return "int8";
  if (a instanceof BigInt64Array) return "int64";
  if (a instanceof Uint16Array) return "bfloat16"; // raw 16-bit floats: say which via dtype
  return "uint8";
}

function flatten(x: NestedArray, shape: number[], out: number[], depth: number): void {
  if (!Array.isArray(x)) {
    if (depth !== shape.length) throw new TypeError("tensor: ragged nested array");
    out.push(typeof x === "boolean" ? (x ? 1 : 0) : x);
    return;
  }
  if (depth === shape.length) {
    // A new dimension shows only on the first descent, before any value: later, it is a deeper list.
    if (out.length) throw new TypeError("tensor: ragged nested array");
    shape.push(x.length);
  } else if (shape[depth] !== x.length) throw new TypeError("tensor: ragged nested array");
  for (const v of x) flatten(v, shape, out, depth + 1);
}

/** The values each integer dtype holds (int64: the doubles below 2^63, which is itself a double). */
const INT_RANGE: Partial<Record<DType, [number, number]>> = {
  int64: [-(2 ** 63), 2 ** 63 - 1024],
  int32: [-(2 ** 31), 2 ** 31 - 1],
  int16: [-(2 ** 15), 2 ** 15 - 1],
  int8: [-128, 127],
  uint8: [0, 255],
};

function toTyped(values: number[], dtype: DType): TensorData {
  const range = INT_RANGE[dtype];
  if (range) { // a typed array would wrap them (300 → 44 as uint8) where PyTorch refuses
    const i = values.findIndex((v) => !(Math.trunc(v) >= range[0] && Math.trunc(v) <= range[1]));
    if (i >= 0) throw new RangeError(`tensor: value ${values[i]} at ${i} does not fit ${dtype}`);
  }
  switch (dtype) {
    case "float64":
      return Float64Array.from(values);
    case "int64":
      return BigInt64Array.from(values, (v) => BigInt(Math.trunc(v)));
    case "int32":
      return Int32Array.from(values);
    case "int16":
      return Int16Array.from(values);
    case "int8":
      return Int8Array.from(values);
    case "uint8":
    case "bool":
      return Uint8Array.from(values, (v) => (dtype === "bool" ? (v ? 1 : 0) : v));
    default:
      return Float32Array.from(values);
  }
}

/**
 * A tensor holding a copy of data: a typed array with an explicit shape, or
 * nested JS arrays (shape inferred).
 * @example
 * ```ts ignore
 * const x = tensor([[1, 2], [3, 4]]);                   // float32 [2, 2]
 * const ids = tensor([5, 7], { dtype: "int64" });
 * const y = fromTypedArray(new Float32Array(6), [2, 3]);
 * ```
 */
export function tensor(data: NestedArray, opts: CreateOptions = {}): Tensor {
  const shape: number[] = [];
  const flat: number[] = [];
  flatten(data, shape, flat, 0);
  const dtype = opts.dtype ?? (typeof firstLeaf(data) === "boolean" ? "bool" : "float32");
  const half = dtype === "bfloat16" || dtype === "float16";
  const t = fromTypedArray(toTyped(flat, half ? "float32" : dtype), shape, {
    dtype: half ? "float32" : dtype,
    device: opts.device,
  });
  if (!half) return t;
  using _ = t;
  return t.to(dtype);
}

function firstLeaf(x: NestedArray): number | boolean {
  return Array.isArray(x) ? (x.length ? firstLeaf(x[0]!) : 0) : x;
}

/** The dtypes an array holds: its own; 16-bit floats as Uint16Array bits; any as Uint8Array raw bytes. */
function holds(data: TensorData, dtype: DType): boolean {
  const own = typedDtype(data);
  if (own === "bfloat16") return dtype === "bfloat16" || dtype === "float16";
  return own === "uint8" || own === dtype;
}

/**
 * A tensor copied from a typed array, viewed with shape. dtype defaults to the array's type.
 * A Uint8Array is taken as raw bytes of any dtype.
 * @throws {TypeError} when the array's length does not fill shape, or its type does not hold dtype (its
 *   values would be reinterpreted)
 */
export function fromTypedArray(data: TensorData, shape: Shape, opts: CreateOptions = {}): Tensor {
  const dtype = opts.dtype ?? typedDtype(data);
  const code = dtypeCode(dtype); // first: an unknown dtype has no element size to check the length with
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const numel = shape.reduce((a, b) => a * b, 1);
  if (numel * ELEMENT_SIZE[dtype] !== bytes.byteLength) {
    throw new TypeError(
      `fromTypedArray: ${bytes.byteLength} bytes cannot hold shape [${shape.join(", ")}] of ${dtype}`,
    );
  }
  if (!holds(data, dtype)) {
    throw new TypeError(
      `fromTypedArray: a ${data.constructor.name} does not hold ${dtype} values (convert them, or pass raw bytes ` +
        "as a Uint8Array)",
    );
  }
  countHostUpload();
  const p = shim().mt_from_data(
    c(),
    bytes,
    BigInt(bytes.byteLength),
    code,
    i64(shape, "fromTypedArray"),
    shape.length,
    deviceCode(opts.device ?? "cpu"),
  );
  return wrap("from_data", p);
}

/** A tensor of shape filled with value. */
export function full(shape: Shape, value: number, opts: CreateOptions = {}): Tensor {
  const p = shim().mt_full(
    c(),
    i64(shape, "full"),
    shape.length,
    value,
    dtypeCode(opts.dtype ?? "float32"),
    deviceCode(opts.device ?? "cpu"),
  );
  return wrap("full", p);
}

/** A tensor of zeros. */
export function zeros(shape: Shape, opts: CreateOptions = {}): Tensor {
  return full(shape, 0, opts);
}

/** A tensor of ones. */
export function ones(shape: Shape, opts: CreateOptions = {}): Tensor {
  return full(shape, 1, opts);
}

/** start, start+step, ... below end (default dtype int64, as torch.arange with integers). */
export function arange(start: number, end: number, step = 1, opts: CreateOptions = {}): Tensor {
  const p = shim().mt_arange(
    c(),
    start,
    end,
    step,
    dtypeCode(opts.dtype ?? "int64"),
    deviceCode(opts.device ?? "cpu"),
  );
  return wrap("arange", p);
}

/** Options for random tensors. */
export interface RandomOptions extends CreateOptions {
  /** Draw from this generator instead of the global one. */
  generator?: Generator;
}

function random(op: string, kind: number, shape: Shape, opts: RandomOptions): Tensor {
  const p = shim().mt_rand(
    c(),
    i64(shape, op),
    shape.length,
    kind,
    dtypeCode(opts.dtype ?? "float32"),
    deviceCode(opts.device ?? "cpu"),
    opts.generator ? opts.generator.ptr : null,
  );
  return wrap(op, p);
}

/** Uniform draws in [0, 1). */
export function rand(shape: Shape, opts: RandomOptions = {}): Tensor {
  return random("rand", 0, shape, opts);
}

/** Standard normal draws. */
export function randn(shape: Shape, opts: RandomOptions = {}): Tensor {
  return random("randn", 1, shape, opts);
}
