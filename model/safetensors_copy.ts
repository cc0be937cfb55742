/**
 * Copying a safetensors file's tensors into tensors that already exist
 * (adapters, a value head, optimizer moments): every entry is checked first
 * (key present, shape right, no stranger), then copied, so that a bad file
 * leaves the targets as they were.
 * @module
 */
import { type Device, type DType, noGrad, type Tensor, tidy } from "../ffi/mod.ts";
import { isFloating } from "../ffi/dtype.ts";
import type { SafetensorsFile } from "./safetensors.ts";

/** One tensor to restore: the saved key and shape, and where the data goes. */
export interface RestoreEntry {
  /** The name in the file. */
  key: string;
  /** Another name the file may use instead (an older layout's). */
  legacyKey?: string;
  /** The shape the file must hold. */
  shape: readonly number[];
  /** dtype and device to load as (the target's). */
  like: { dtype: DType; device: Device };
  /** Copies the loaded tensor into place (called inside noGrad and tidy). */
  assign(src: Tensor): void;
}

const sameShape = (a: readonly number[], b: readonly number[]): boolean =>
  a.length === b.length && a.every((s, i) => s === b[i]);

/** The key the file holds for an entry: its key, else its legacy key when the file has that. */
function keyIn(f: SafetensorsFile, e: RestoreEntry): string {
  return !f.has(e.key) && e.legacyKey !== undefined && f.has(e.legacyKey) ? e.legacyKey : e.key;
}

/**
 * Checks a file's header against entries: every key present with its shape,
 * and (unless allowExtra) no other key.
 * @throws {Error} naming the file and the first bad keys
 */
export function checkEntries(f: SafetensorsFile, entries: readonly RestoreEntry[], allowExtra = false): void {
  const problems: string[] = [];
  const used = new Set<string>();
  for (const e of entries) {
    const key = keyIn(f, e);
    used.add(key);
    if (!f.has(key)) {
      problems.push(`missing tensor "${e.key}"`);
      continue;
    }
    const info = f.info(key), got = info.shape;
    if (!sameShape(got, e.shape)) {
      problems.push(`"${key}" has shape [${got.join(", ")}], expected [${e.shape.join(", ")}]`);
    }
    // What f.load would refuse mid-copy (model/safetensors.ts tensorFromBytes casts floating dtypes only).
    if (info.torchDtype !== e.like.dtype && !(isFloating(info.torchDtype) && isFloating(e.like.dtype))) {
      problems.push(`"${key}" is ${info.dtype}, which cannot be loaded as ${e.like.dtype}`);
    }
  }
  if (!allowExtra) {
    for (const k of f.names()) if (!used.has(k)) problems.push(`unexpected tensor "${k}"`);
  }
  if (problems.length) {
    const more = problems.length > 5 ? ` (and ${problems.length - 5} more)` : "";
    throw new Error(`${f.path}: ${problems.slice(0, 5).join("; ")}${more}`);
  }
}

/** Loads every entry's tensor and copies it into place (check first with {@link checkEntries}). */
export async function applyEntries(f: SafetensorsFile, entries: readonly RestoreEntry[]): Promise<void> {
  for (const e of entries) {
    using src = await f.load(keyIn(f, e), e.like);
    noGrad(() => tidy(() => e.assign(src)));
  }
}

/** dtype and device of t, to load a tensor like it. */
export const likeTensor = (t: Tensor): { dtype: DType; device: Device } => ({
  dtype: t.dtype,
  device: t.device,
});

/** An entry copied whole into dst. */
export function wholeEntry(key: string, dst: Tensor): RestoreEntry {
  return { key, shape: dst.shape, like: likeTensor(dst), assign: (src) => void dst.copy_(src) };
}
