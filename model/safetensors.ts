/**
 * Reading safetensors files one tensor at a time: {@link SafetensorsFile}
 * opens a file, validates its header (safetensors_header.ts) and reads only
 * the byte range of the tensor asked for, so multi-GB shards are never held
 * in memory whole.
 * @module
 */
import { fromTypedArray } from "../ffi/create.ts";
import {
  type Device,
  deviceCode,
  deviceName,
  type DType,
  dtypeCode,
  ELEMENT_SIZE,
  isFloating,
} from "../ffi/dtype.ts";
import type { Tensor } from "../ffi/tensor.ts";
import {
  MAX_HEADER_BYTES,
  parseHeader,
  SafetensorsError,
  type SafetensorsHeader,
  type TensorInfo,
} from "./safetensors_header.ts";

export {
  FROM_SAFETENSORS,
  MAX_HEADER_BYTES,
  parseHeader,
  type SafetensorsDtype,
  SafetensorsError,
  type SafetensorsHeader,
  type TensorInfo,
  TO_SAFETENSORS,
} from "./safetensors_header.ts";

/** Options for loading a tensor. */
export interface LoadOptions {
  /** Cast floating tensors to this floating dtype (non-floating tensors cannot be cast). */
  dtype?: DType;
  /** Device to put the tensor on (default cpu). */
  device?: Device;
}

/**
 * Turns raw little-endian bytes into a Tensor of info's dtype and shape, then
 * casts and moves it as opts ask. Intermediate tensors are freed.
 * @throws {SafetensorsError} for a cast between floating and non-floating dtypes, or BOOL bytes other than 0/1
 */
export function tensorFromBytes(
  bytes: Uint8Array,
  info: TensorInfo,
  opts: LoadOptions,
  source: string,
): Tensor {
  const stored = info.torchDtype;
  const target = opts.dtype ?? stored;
  const where = `${source}: tensor "${info.name}"`;
  dtypeCode(target); // throws a clear TypeError for a bad name before we allocate
  if (target !== stored && !(isFloating(stored) && isFloating(target))) {
    throw new SafetensorsError(
      `${where}: cannot cast ${info.dtype} to ${target}; only floating tensors are cast`,
    );
  }
  const device = deviceName(deviceCode(opts.device ?? "cpu")); // "cuda" -> "cuda:0", as Tensor.device reports
  if (info.dtype === "BOOL" && bytes.some((b) => b > 1)) {
    throw new SafetensorsError(`${where}: BOOL data holds bytes other than 0 and 1`);
  }
  let t = fromTypedArray(bytes, info.shape, { dtype: stored });
  try {
    // Cast on whichever side moves fewer bytes: widen after the copy, narrow before it.
    const moveFirst = device !== "cpu" && ELEMENT_SIZE[target] > ELEMENT_SIZE[stored];
    const steps: (DType | Device)[] = moveFirst ? [device, target] : [target, device];
    for (const step of steps) {
      if (step === t.dtype || step === t.device) continue;
      const next = t.to(step);
      t.dispose();
      t = next;
    }
    return t;
  } catch (e) {
    t.dispose();
    throw e;
  }
}

/**
 * One open safetensors file. Opening reads and validates the header only;
 * {@link SafetensorsFile.load} reads one tensor's bytes on demand.
 * @example
 * ```ts ignore
 * using f = await SafetensorsFile.open("model.safetensors");
 * console.log(f.names(), f.info("lm_head.weight"));
 * const w = await f.load("lm_head.weight", { dtype: "float32" });
 * ```
 */
export class SafetensorsFile {
  /** The file's path. */
  readonly path: string;
  /** The parsed header. */
  readonly header: SafetensorsHeader;
  #file: Deno.FsFile | null;
  #byName: Map<string, TensorInfo>;
  // seek+read is not atomic: concurrent loads on one handle are chained.
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(path: string, file: Deno.FsFile, header: SafetensorsHeader) {
    this.path = path;
    this.#file = file;
    this.header = header;
    this.#byName = new Map(header.tensors.map((t) => [t.name, t]));
  }

  /**
   * Opens a file and validates its header.
   * @throws {SafetensorsError} naming the file (and tensor) when the header is malformed or the file truncated
   */
  static async open(path: string): Promise<SafetensorsFile> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true });
    } catch (e) {
      throw new SafetensorsError(`${path}: cannot open: ${(e as Error).message}`, { cause: e });
    }
    try {
      const stat = await file.stat();
      if (!stat.isFile) throw new SafetensorsError(`${path}: not a regular file`);
      const size = stat.size;
      if (size < 8) {
        throw new SafetensorsError(
          `${path}: ${size} bytes is too short for a safetensors file (8-byte header length missing)`,
        );
      }
      const lenBytes = await readExactly(file, 0, 8, path, "the header length");
      const n = new DataView(lenBytes.buffer).getBigUint64(0, true);
      if (n > BigInt(MAX_HEADER_BYTES)) {
        throw new SafetensorsError(
          `${path}: header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit (corrupt file?)`,
        );
      }
      const headerLength = Number(n);
      if (8 + headerLength > size) {
        throw new SafetensorsError(
          `${path}: header length ${headerLength} runs past the end of the ${size}-byte file`,
        );
      }
      const headerBytes = await readExactly(file, 8, headerLength, path, "the header");
      let json: string;
      try {
        json = new TextDecoder("utf-8", { fatal: true }).decode(headerBytes);
      } catch (e) {
        throw new SafetensorsError(`${path}: header is not valid UTF-8`, { cause: e });
      }
      return new SafetensorsFile(path, file, parseHeader(json, headerLength, size, path));
    } catch (e) {
      file.close();
      throw e;
    }
  }

  /** Tensor names in file order. */
  names(): string[] {
    return this.header.tensors.map((t) => t.name);
  }

  /** True if the file holds a tensor of that name. */
  has(name: string): boolean {
    return this.#byName.has(name);
  }

  /**
   * A tensor's dtype, shape and byte range, without reading its data.
   * @throws {SafetensorsError} if the file has no such tensor
   */
  info(name: string): TensorInfo {
    const t = this.#byName.get(name);
    if (!t) {
      throw new SafetensorsError(
        `${this.path}: no tensor named "${name}" (${this.#byName.size} tensors in the file)`,
      );
    }
    return t;
  }

  /** The header's `__metadata__` strings. */
  get metadata(): Record<string, string> {
    return { ...this.header.metadata };
  }

  /**
   * Reads one tensor into a new Tensor, optionally cast (floating only) and moved.
   * @throws {SafetensorsError} for an unknown name, a file that shrank since it was opened, or a bad cast
   */
  async load(name: string, opts: LoadOptions = {}): Promise<Tensor> {
    const info = this.info(name);
    const bytes = await this.readBytes(name);
    return tensorFromBytes(bytes, info, opts, this.path);
  }

  /** The raw little-endian bytes of one tensor. */
  readBytes(name: string): Promise<Uint8Array> {
    const info = this.info(name);
    const file = this.#file;
    if (!file) return Promise.reject(new SafetensorsError(`${this.path}: file is closed`));
    const run = this.#queue.then(() =>
      readExactly(file, info.byteOffset, info.byteLength, this.path, `tensor "${name}"`)
    );
    this.#queue = run.catch(() => undefined);
    return run;
  }

  /** Closes the file; later loads fail. Idempotent. */
  close(): void {
    this.#file?.close();
    this.#file = null;
  }

  /** Closes the file (for `using`). */
  [Symbol.dispose](): void {
    this.close();
  }
}

async function readExactly(
  file: Deno.FsFile,
  offset: number,
  length: number,
  path: string,
  what: string,
): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await file.seek(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < length) {
    const n = await file.read(buf.subarray(done));
    if (n === null) {
      throw new SafetensorsError(
        `${path}: file ended at byte ${
          offset + done
        } while reading ${what} (truncated or changed since opened?)`,
      );
    }
    done += n;
  }
  return buf;
}
