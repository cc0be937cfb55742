/**
 * Dtypes and devices as TypeScript types, and their codes in the C ABI
 * (c10::ScalarType numbers; -1 for the CPU, k for CUDA device k).
 * @module
 */

/** Element types a Tensor can hold. */
export type DType =
  | "uint8"
  | "int8"
  | "int16"
  | "int32"
  | "int64"
  | "float16"
  | "float32"
  | "float64"
  | "bool"
  | "bfloat16";

/** Where a tensor lives: the CPU or a CUDA device ("cuda" is "cuda:0"). */
export type Device = "cpu" | "cuda" | `cuda:${number}`;

/** A tensor shape: one size per dimension. */
export type Shape = readonly number[];

const CODES: Record<DType, number> = {
  uint8: 0,
  int8: 1,
  int16: 2,
  int32: 3,
  int64: 4,
  float16: 5,
  float32: 6,
  float64: 7,
  bool: 11,
  bfloat16: 15,
};
const NAMES = new Map<number, DType>(Object.entries(CODES).map(([k, v]) => [v, k as DType]));

/** Bytes per element of each dtype. */
export const ELEMENT_SIZE: Readonly<Record<DType, number>> = {
  uint8: 1,
  int8: 1,
  int16: 2,
  int32: 4,
  int64: 8,
  float16: 2,
  float32: 4,
  float64: 8,
  bool: 1,
  bfloat16: 2,
};

/** The C ABI code of a dtype; throws on an unknown name. */
export function dtypeCode(d: DType): number {
  // Own keys only: "toString" or "constructor" would find Object.prototype's function.
  if (!Object.hasOwn(CODES, d)) throw new TypeError(`unknown dtype "${d}"`);
  return CODES[d];
}

/** The dtype of a C ABI code. */
export function dtypeName(code: number): DType {
  const d = NAMES.get(code);
  if (d === undefined) throw new TypeError(`unsupported dtype code ${code}`);
  return d;
}

/** True for float16, bfloat16, float32 and float64. */
export function isFloating(d: DType): boolean {
  return d === "float32" || d === "bfloat16" || d === "float16" || d === "float64";
}

/** The C ABI code of a device; throws on a malformed name. */
export function deviceCode(d: Device): number {
  if (d === "cpu") return -1;
  if (d === "cuda") return 0;
  const m = /^cuda:(\d+)$/.exec(d);
  if (!m) throw new TypeError(`unknown device "${d}" (use "cpu", "cuda" or "cuda:N")`);
  return Number(m[1]);
}

/** The device of a C ABI code. */
export function deviceName(code: number): Device {
  return code < 0 ? "cpu" : `cuda:${code}`;
}

/** Typed arrays accepted as tensor data. */
export type TensorData =
  | Float32Array
  | Float64Array
  | Int32Array
  | Int16Array
  | Int8Array
  | Uint8Array
  | Uint16Array
  | BigInt64Array;
