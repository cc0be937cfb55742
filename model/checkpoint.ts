/**
 * A checkpoint folder as Hugging Face saves it: one `model.safetensors`, or
 * shards listed by `model.safetensors.index.json` (`weight_map`: tensor →
 * shard file). {@link Checkpoint} opens every shard's header up front, so a
 * missing shard or a tensor the index misplaces fails at open, not mid-load.
 * @module
 */
import { isAbsolute, join, normalize } from "node:path";
import type { Tensor } from "../ffi/tensor.ts";
import { isDirectory, isFile, isJsonObject, readJsonObject } from "./json.ts";
import { type LoadOptions, SafetensorsError, SafetensorsFile, type TensorInfo } from "./safetensors.ts";

/** The single-file weights name. */
export const SINGLE_FILE = "model.safetensors";
/** The shard index name. */
export const INDEX_FILE = "model.safetensors.index.json";

/** A tensor's entry, with the file that holds it. */
export interface CheckpointTensorInfo extends TensorInfo {
  /** The safetensors file holding the tensor. */
  file: string;
}

/**
 * Reads the weight_map of an index file: tensor name → shard file name.
 * @throws {SafetensorsError} naming the index when it is malformed or names a shard outside the folder
 */
export async function readIndex(path: string): Promise<Map<string, string>> {
  const index = await readJsonObject(path, "safetensors index");
  const wm = index.weight_map;
  if (!isJsonObject(wm)) {
    throw new SafetensorsError(`${path}: "weight_map" must be an object of tensor name → shard file`);
  }
  const map = new Map<string, string>();
  for (const [name, shard] of Object.entries(wm)) {
    if (typeof shard !== "string" || shard === "") {
      throw new SafetensorsError(
        `${path}: weight_map["${name}"] must be a shard file name, got ${JSON.stringify(shard)}`,
      );
    }
    // Shards live in the checkpoint folder; refuse paths that would escape it.
    if (isAbsolute(shard) || normalize(shard).split(/[\\/]/).includes("..")) {
      throw new SafetensorsError(
        `${path}: weight_map["${name}"] = "${shard}" points outside the checkpoint folder`,
      );
    }
    map.set(name, shard);
  }
  return map;
}

/**
 * The weights of one checkpoint folder, single-file or sharded.
 * @example
 * ```ts ignore
 * using ckpt = await Checkpoint.open("/models/qwen3-moe");
 * const w = await ckpt.load("model.embed_tokens.weight", { device: "cuda" });
 * ```
 */
export class Checkpoint {
  /** The folder. */
  readonly dir: string;
  /** True when the weights come from an index and shards. */
  readonly sharded: boolean;
  #files: SafetensorsFile[];
  #where: Map<string, SafetensorsFile>;

  private constructor(
    dir: string,
    sharded: boolean,
    files: SafetensorsFile[],
    where: Map<string, SafetensorsFile>,
  ) {
    this.dir = dir;
    this.sharded = sharded;
    this.#files = files;
    this.#where = where;
  }

  /**
   * Opens a folder's weights: `model.safetensors` if present (as transformers
   * prefers), else the index and every shard it names.
   * @throws {SafetensorsError} for a missing folder or weights, a shard the index names that is missing,
   *   or a tensor the index maps to a shard that lacks it
   */
  static async open(dir: string): Promise<Checkpoint> {
    if (!(await isDirectory(dir))) throw new SafetensorsError(`${dir}: checkpoint folder does not exist`);
    const single = join(dir, SINGLE_FILE);
    if (await isFile(single)) {
      const f = await SafetensorsFile.open(single);
      return new Checkpoint(dir, false, [f], new Map(f.names().map((n) => [n, f])));
    }
    const indexPath = join(dir, INDEX_FILE);
    if (!(await isFile(indexPath))) {
      throw new SafetensorsError(`${dir}: no ${SINGLE_FILE} or ${INDEX_FILE} in the checkpoint folder`);
    }
    const map = await readIndex(indexPath);
    const byShard = new Map<string, string[]>();
    for (const [name, shard] of map) byShard.set(shard, [...(byShard.get(shard) ?? []), name]);
    const files: SafetensorsFile[] = [];
    try {
      const where = new Map<string, SafetensorsFile>();
      for (const [shard, names] of byShard) {
        const path = join(dir, shard);
        if (!(await isFile(path))) {
          throw new SafetensorsError(
            `${indexPath}: shard file ${shard} is missing (it should hold ${names.length} tensors, e.g. "${
              names[0]
            }")`,
          );
        }
        const f = await SafetensorsFile.open(path);
        files.push(f);
        for (const name of names) {
          if (!f.has(name)) {
            throw new SafetensorsError(
              `${indexPath}: maps tensor "${name}" to ${shard}, which has no such tensor`,
            );
          }
          where.set(name, f);
        }
      }
      return new Checkpoint(dir, true, files, where);
    } catch (e) {
      for (const f of files) f.close();
      throw e;
    }
  }

  /** Every tensor name, sorted. */
  names(): string[] {
    return [...this.#where.keys()].sort();
  }

  /** True if the checkpoint has a tensor of that name. */
  has(name: string): boolean {
    return this.#where.has(name);
  }

  /**
   * A tensor's dtype, shape and file, without reading its data.
   * @throws {SafetensorsError} naming the tensor and folder when it is absent
   */
  info(name: string): CheckpointTensorInfo {
    const f = this.#file(name);
    return { ...f.info(name), file: f.path };
  }

  /**
   * Reads one tensor, optionally cast (floating only) and moved to a device.
   * @throws {SafetensorsError} naming the tensor and folder when it is absent
   */
  async load(name: string, opts: LoadOptions = {}): Promise<Tensor> {
    return await this.#file(name).load(name, opts);
  }

  #file(name: string): SafetensorsFile {
    const f = this.#where.get(name);
    if (!f) {
      const from = this.sharded
        ? `the weight_map of ${join(this.dir, INDEX_FILE)}`
        : join(this.dir, SINGLE_FILE);
      throw new SafetensorsError(`tensor "${name}" is not in ${from}`);
    }
    return f;
  }

  /** Closes every file. Idempotent. */
  close(): void {
    for (const f of this.#files) f.close();
  }

  /** Closes every file (for `using`). */
  [Symbol.dispose](): void {
    this.close();
  }
}
