/**
 * Reading a family's tensors out of a checkpoint with shape checks, and
 * normalising expert layouts (one module per expert, or v5's fused 3-D
 * tensors) to stacked [E, 2I, H] / [E, H, I] weights.
 * @module
 */
import { cat, type Device, type DType, keep, randn, stack, type Tensor, tidy } from "../ffi/mod.ts";
import type { Checkpoint } from "./checkpoint.ts";
import { SafetensorsError } from "./safetensors.ts";

/** Where named weights come from: a checkpoint, or random draws for benchmarks. */
export interface TensorSource {
  /** A description for error messages (the folder). */
  readonly name: string;
  /** True if the source has a tensor of that name. */
  has(name: string): boolean;
  /** Reads name, which must have the given shape. */
  load(name: string, shape: readonly number[], opts: WeightOptions): Promise<Tensor>;
}

/** Serves a checkpoint's tensors, checking each shape against the config's. */
export class CheckpointSource implements TensorSource {
  readonly #ckpt: Checkpoint;
  readonly #read = new Set<string>();
  /** Reads from ckpt. */
  constructor(ckpt: Checkpoint) {
    this.#ckpt = ckpt;
  }
  /** The folder. */
  get name(): string {
    return this.#ckpt.dir;
  }
  /** True if the checkpoint has name. */
  has(name: string): boolean {
    return this.#ckpt.has(name);
  }
  /** Loads name after checking its stored shape. */
  async load(name: string, shape: readonly number[], opts: WeightOptions): Promise<Tensor> {
    const info = this.#ckpt.info(name);
    if (info.shape.length !== shape.length || info.shape.some((s, i) => s !== shape[i])) {
      throw new SafetensorsError(
        `${info.file}: tensor "${name}" has shape [${info.shape.join(", ")}], the config implies [${
          shape.join(", ")
        }]`,
      );
    }
    this.#read.add(name);
    return await this.#ckpt.load(name, opts);
  }
  /** The checkpoint's tensors that no load asked for, in file order. */
  unread(): string[] {
    return this.#ckpt.names().filter((n) => !this.#read.has(n));
  }
}

/**
 * Random weights of the right shapes (normal, std 0.02; norm weights 1) for
 * speed and memory measurements with real model sizes. Offers the
 * one-module-per-expert layout and every optional tensor.
 */
export class RandomSource implements TensorSource {
  /** Describes the source in errors. */
  readonly name = "random weights";
  /** Every tensor name except the fused-layout and v5 router ones. */
  has(name: string): boolean {
    return !/(gate_up_proj|experts\.down_proj|\.router\.weight)$/.test(name);
  }
  /** A fresh N(0, 0.02²) tensor (1 + that for norm weights, which sit near 1). */
  load(name: string, shape: readonly number[], opts: WeightOptions): Promise<Tensor> {
    return Promise.resolve(tidy(() => {
      const t = randn(shape, { dtype: opts.dtype ?? "float32", device: opts.device }).mul(0.02);
      return /norm\.weight$/.test(name) ? t.add(1) : t;
    }));
  }
}

/** Where and in what dtype to put weights. */
export interface WeightOptions {
  /** Floating dtype for the weights (default: as stored). */
  dtype?: DType;
  /** Device (default cpu). */
  device?: Device;
}

/** Loads named tensors, checks their shapes, and remembers them for disposal. */
export class WeightLoader {
  /** Every tensor loaded so far; the model frees them. */
  readonly owned: Tensor[] = [];
  readonly #src: TensorSource;
  readonly #opts: WeightOptions;

  /** Reads from src with opts. */
  constructor(src: TensorSource, opts: WeightOptions) {
    this.#src = src;
    this.#opts = opts;
  }

  /** True if the source has name. */
  has(name: string): boolean {
    return this.#src.has(name);
  }

  /** The first of names present in the checkpoint, or an error naming them all. */
  pick(...names: string[]): string {
    const found = names.find((n) => this.#src.has(n));
    if (found === undefined) {
      throw new SafetensorsError(
        `${this.#src.name}: missing tensor ${names.map((n) => `"${n}"`).join(" or ")}`,
      );
    }
    return found;
  }

  /**
   * Loads name, which must have the given shape; the result is kept out of
   * every scope and owned by this loader.
   */
  async load(name: string, shape: readonly number[]): Promise<Tensor> {
    const t = await this.#read(name, shape);
    this.owned.push(keep(t));
    return t;
  }

  /** Loads name if present, else returns null. */
  async maybe(name: string, shape: readonly number[]): Promise<Tensor | null> {
    return this.has(name) ? await this.load(name, shape) : null;
  }

  /** Concatenates tensors along dim 0 (e.g. gate and up rows), owned by this loader. */
  async concat(names: readonly string[], shapes: readonly (readonly number[])[]): Promise<Tensor> {
    const parts: Tensor[] = [];
    try { // a later part that fails (missing, mis-shaped) frees the ones read before it
      for (let i = 0; i < names.length; i++) parts.push(await this.#read(names[i]!, shapes[i]!));
      return this.#own(cat(parts, 0));
    } finally {
      parts.forEach((p) => p.dispose());
    }
  }

  /** Stacks per-expert tensors into [E, ...], each built by part(e). */
  async stackExperts(count: number, part: (e: number) => Promise<Tensor>): Promise<Tensor> {
    const parts: Tensor[] = [];
    try {
      for (let e = 0; e < count; e++) parts.push(await part(e));
      return this.#own(stack(parts, 0));
    } finally {
      for (const p of parts) this.#disown(p);
    }
  }

  /** Frees every owned tensor. */
  dispose(): void {
    for (const t of this.owned) t.dispose();
    this.owned.length = 0;
  }

  async #read(name: string, shape: readonly number[]): Promise<Tensor> {
    return await this.#src.load(name, shape, this.#opts);
  }

  #own(t: Tensor): Tensor {
    this.owned.push(keep(t));
    return t;
  }

  #disown(t: Tensor): void {
    const i = this.owned.indexOf(t);
    if (i >= 0) this.owned.splice(i, 1);
    t.dispose();
  }
}
