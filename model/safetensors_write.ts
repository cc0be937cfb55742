/**
 * Writing the safetensors format, byte for byte as the reference
 * implementation (Python `safetensors.torch.save_file`) lays it out: tensors
 * sorted by descending dtype alignment, then by name; header JSON without
 * spaces, `__metadata__` first, padded with spaces to a multiple of 8 bytes.
 * Files are written atomically: a temporary file in the same folder, then a
 * rename, so a crash never leaves a half-written checkpoint under the name.
 * @module
 */
import { Tensor } from "../ffi/tensor.ts";
import { writeAll, writeAtomic } from "./atomic_write.ts";
import { ELEMENT_SIZE } from "../ffi/dtype.ts";
import {
  FROM_SAFETENSORS,
  type SafetensorsDtype,
  SafetensorsError,
  TO_SAFETENSORS,
} from "./safetensors_header.ts";

// The reference's Dtype enum order ("increasing alignment order"); only the
// relative order of these ten matters for the layout.
const DTYPE_RANK: Readonly<Record<SafetensorsDtype, number>> = {
  BOOL: 0,
  U8: 1,
  I8: 2,
  I16: 5,
  F16: 7,
  BF16: 8,
  I32: 9,
  F32: 11,
  F64: 12,
  I64: 13,
};

/** What the header needs to know about one tensor. */
export interface HeaderEntry {
  /** The tensor's name. */
  name: string;
  /** Its safetensors dtype. */
  dtype: SafetensorsDtype;
  /** Its shape. */
  shape: readonly number[];
}

/** The reference compares names as Rust Strings: by UTF-8 bytes, i.e. by code point (not UTF-16 unit). */
function compareCodePoints(a: string, b: string): number {
  const x = [...a], y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i]!.codePointAt(0)! - y[i]!.codePointAt(0)!;
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

/** Entries in the order the reference lays out their data: descending dtype alignment, then name. */
export function layoutOrder<T extends HeaderEntry>(entries: readonly T[]): T[] {
  return [...entries].sort((l, r) =>
    DTYPE_RANK[r.dtype] - DTYPE_RANK[l.dtype] || compareCodePoints(l.name, r.name)
  );
}

/**
 * The first bytes of a safetensors file for entries already in layout order:
 * the 8-byte length, then the JSON header padded with spaces to 8 bytes.
 */
export function headerBytes(entries: readonly HeaderEntry[], metadata?: Record<string, string>): Uint8Array {
  // Built by hand: JSON.stringify of an object would move integer-like keys ("0") to the front.
  const parts: string[] = [];
  if (metadata !== undefined) {
    const kv = Object.entries(metadata).map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`);
    parts.push(`"__metadata__":{${kv.join(",")}}`);
  }
  let offset = 0;
  for (const e of entries) {
    const bytes = e.shape.reduce((a, b) => a * b, 1) * ELEMENT_SIZE[FROM_SAFETENSORS[e.dtype]];
    parts.push(
      `${JSON.stringify(e.name)}:{"dtype":"${e.dtype}","shape":[${e.shape.join(",")}],` +
        `"data_offsets":[${offset},${offset + bytes}]}`,
    );
    offset += bytes;
  }
  const json = new TextEncoder().encode(`{${parts.join(",")}}`);
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20, 8);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  return out;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * Writes tensors (any device; copied to the CPU one at a time) to a
 * safetensors file that Python's `safetensors` reads, atomically.
 * @param path the file to write (replaced if it exists)
 * @param tensors name → tensor; no tensor is freed
 * @param metadata optional `__metadata__` strings (HF writes `{"format": "pt"}`)
 * @throws {SafetensorsError} naming the tensor for a disposed tensor, a reserved name, or a non-string metadata value
 * @example
 * ```ts ignore
 * await writeSafetensors("out/model.safetensors", { "lm_head.weight": w }, { format: "pt" });
 * ```
 */
export async function writeSafetensors(
  path: string,
  tensors: Readonly<Record<string, Tensor>>,
  metadata?: Readonly<Record<string, string>>,
): Promise<void> {
  if (!LITTLE_ENDIAN) throw new SafetensorsError(`${path}: safetensors is little-endian; this host is not`);
  if (metadata !== undefined) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") {
        throw new SafetensorsError(`${path}: metadata value for "${k}" must be a string, got ${typeof v}`);
      }
    }
  }
  const entries: (HeaderEntry & { tensor: Tensor })[] = [];
  for (const [name, tensor] of Object.entries(tensors)) {
    if (name === "__metadata__") {
      throw new SafetensorsError(`${path}: "__metadata__" is reserved and cannot name a tensor`);
    }
    if (!(tensor instanceof Tensor)) {
      throw new SafetensorsError(`${path}: value for "${name}" is not a Tensor`);
    }
    if (tensor.disposed) throw new SafetensorsError(`${path}: tensor "${name}" is disposed`);
    entries.push({ name, dtype: TO_SAFETENSORS[tensor.dtype], shape: tensor.shape, tensor });
  }
  const ordered = layoutOrder(entries);
  const header = headerBytes(ordered, metadata === undefined ? undefined : { ...metadata });

  try {
    await writeAtomic(path, async (file) => {
      await writeAll(file, header);
      for (const e of ordered) {
        const data = e.tensor.toTypedArray(); // contiguous CPU copy of this one tensor
        const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        const expected = e.shape.reduce((a, b) => a * b, 1) * ELEMENT_SIZE[e.tensor.dtype];
        if (bytes.byteLength !== expected) {
          throw new SafetensorsError(
            `${path}: tensor "${e.name}" gave ${bytes.byteLength} bytes, expected ${expected}`,
          );
        }
        await writeAll(file, bytes);
      }
    });
  } catch (e) {
    if (e instanceof SafetensorsError) throw e;
    throw new SafetensorsError((e as Error).message, { cause: e });
  }
}
