/**
 * The safetensors header: an 8-byte little-endian length, then JSON
 * `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?: {str: str}}`.
 * {@link parseHeader} validates it as the reference Rust implementation does:
 * supported dtypes, sizes matching shape × dtype, offsets contiguous from 0
 * (no gaps, no overlaps) and ending exactly at the end of the file.
 * @module
 */
import { type DType, ELEMENT_SIZE } from "../ffi/dtype.ts";
import { isJsonObject } from "./json.ts";

/** A failure to read or write a safetensors file; the message names the file and tensor. */
export class SafetensorsError extends Error {
  /** Makes a SafetensorsError (name "SafetensorsError"). */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "SafetensorsError";
  }
}

/** The safetensors dtype names we read and write (those libtorch and our Tensor support). */
export type SafetensorsDtype = "F64" | "F32" | "BF16" | "F16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

/** Our dtype for each safetensors dtype. */
export const FROM_SAFETENSORS: Readonly<Record<SafetensorsDtype, DType>> = {
  F64: "float64",
  F32: "float32",
  BF16: "bfloat16",
  F16: "float16",
  I64: "int64",
  I32: "int32",
  I16: "int16",
  I8: "int8",
  U8: "uint8",
  BOOL: "bool",
};

/** The safetensors dtype name for each of our dtypes. */
export const TO_SAFETENSORS: Readonly<Record<DType, SafetensorsDtype>> = {
  float64: "F64",
  float32: "F32",
  bfloat16: "BF16",
  float16: "F16",
  int64: "I64",
  int32: "I32",
  int16: "I16",
  int8: "I8",
  uint8: "U8",
  bool: "BOOL",
};

/** The reference implementation refuses headers over 100 MB; so do we (a corrupt length could be huge). */
export const MAX_HEADER_BYTES = 100_000_000;

/** One tensor's entry in a header. */
export interface TensorInfo {
  /** The tensor's name (header key). */
  name: string;
  /** Its dtype as written in the file. */
  dtype: SafetensorsDtype;
  /** The same dtype as a Tensor dtype. */
  torchDtype: DType;
  /** Its shape ([] for a scalar). */
  shape: number[];
  /** Where its bytes start, counted from the start of the file. */
  byteOffset: number;
  /** How many bytes it has (numel × element size). */
  byteLength: number;
}

/** A parsed, validated header. */
export interface SafetensorsHeader {
  /** Tensor entries in file order (ascending offsets). */
  tensors: TensorInfo[];
  /** The `__metadata__` strings (empty when absent). */
  metadata: Record<string, string>;
  /** Bytes before the data section: 8 + the header's length. */
  dataStart: number;
}

function isDtype(x: unknown): x is SafetensorsDtype {
  return typeof x === "string" && Object.hasOwn(FROM_SAFETENSORS, x);
}

function nonNegInt(x: unknown): x is number {
  return typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
}

/**
 * Parses and validates a header's JSON text.
 * @param json the header bytes after the 8-byte length, decoded as UTF-8
 * @param headerLength the length field (bytes of JSON, padding included)
 * @param fileSize the whole file's size, to check the data section is exactly covered
 * @param source the file, for messages
 * @throws {SafetensorsError} naming source and the offending tensor
 */
export function parseHeader(
  json: string,
  headerLength: number,
  fileSize: number,
  source: string,
): SafetensorsHeader {
  const fail = (msg: string): never => {
    throw new SafetensorsError(`${source}: ${msg}`);
  };
  // The reference refuses a header that does not open with "{" (InvalidHeaderStart), even with leading spaces.
  if (!json.startsWith("{")) fail(`header must start with "{"`);
  let raw: unknown;
  try {
    raw = JSON.parse(json);
  } catch (e) {
    throw new SafetensorsError(`${source}: header is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
  if (!isJsonObject(raw)) fail("header must be a JSON object");
  const header = raw as Record<string, unknown>;
  const metadata: Record<string, string> = {};
  const tensors: TensorInfo[] = [];
  const dataStart = 8 + headerLength;
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") {
      if (entry === null) continue; // the reference reads null as "no metadata"
      if (!isJsonObject(entry)) fail(`"__metadata__" must be an object of strings`);
      for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof v !== "string") {
          fail(`"__metadata__" value for "${k}" must be a string, got ${JSON.stringify(v)}`);
        }
        metadata[k] = v as string;
      }
      continue;
    }
    const where = `tensor "${name}"`;
    if (!isJsonObject(entry)) fail(`${where}: entry must be an object with dtype, shape and data_offsets`);
    const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
    if (!isDtype(dtype)) {
      fail(
        `${where}: unsupported dtype ${JSON.stringify(dtype)} (supported: ${
          Object.keys(FROM_SAFETENSORS).join(", ")
        })`,
      );
    }
    if (!Array.isArray(shape) || !shape.every(nonNegInt)) {
      fail(`${where}: shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(nonNegInt)) {
      fail(
        `${where}: data_offsets must be [begin, end] non-negative integers, got ${JSON.stringify(offsets)}`,
      );
    }
    const [begin, end] = offsets as [number, number];
    if (end < begin) fail(`${where}: data_offsets [${begin}, ${end}] end before they begin`);
    const dt = dtype as SafetensorsDtype;
    let numel = 1;
    for (const d of shape as number[]) numel *= d;
    const bytes = numel * ELEMENT_SIZE[FROM_SAFETENSORS[dt]];
    if (!Number.isSafeInteger(bytes)) {
      fail(`${where}: shape [${(shape as number[]).join(", ")}] is too large`);
    }
    if (end - begin !== bytes) {
      fail(
        `${where}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes but shape ` +
          `[${(shape as number[]).join(", ")}] of ${dt} needs ${bytes}`,
      );
    }
    tensors.push({
      name,
      dtype: dt,
      torchDtype: FROM_SAFETENSORS[dt],
      shape: [...(shape as number[])],
      byteOffset: dataStart + begin,
      byteLength: bytes,
    });
  }
  // As the reference: sorted by offset, each tensor starts where the last one ended
  // (no gaps, no overlaps), and the last one ends exactly at the end of the file.
  tensors.sort((a, b) => a.byteOffset - b.byteOffset || a.byteLength - b.byteLength);
  let expected = dataStart;
  let previous = "the header";
  for (const t of tensors) {
    if (t.byteOffset < expected) {
      fail(
        `tensor "${t.name}" overlaps ${previous} (starts at data byte ${t.byteOffset - dataStart}, expected ${
          expected - dataStart
        })`,
      );
    }
    if (t.byteOffset > expected) {
      fail(
        `tensor "${t.name}" leaves a gap after ${previous} (starts at data byte ${
          t.byteOffset - dataStart
        }, expected ${expected - dataStart})`,
      );
    }
    expected = t.byteOffset + t.byteLength;
    previous = `tensor "${t.name}"`;
  }
  if (expected > fileSize) {
    fail(`file is truncated: ${previous} ends at byte ${expected} but the file has ${fileSize} bytes`);
  }
  if (expected < fileSize) {
    fail(
      `${fileSize - expected} unexpected bytes after the data of ${previous} (the data must end the file)`,
    );
  }
  return { tensors, metadata, dataStart };
}
