/**
 * A preallocated key/value cache: one [B, nKV, maxLength, headDim] buffer per
 * layer, written in place at the current length. No per-step concatenation,
 * so a decode step's memory traffic and allocations stay constant.
 *
 * {@link StaticKVView} writes the same buffers at a slot held in a device
 * tensor instead, for decode steps recorded once and replayed (CUDA graphs).
 * @module
 */
import { type Device, type DType, ELEMENT_SIZE, keep, type Tensor, tidy, zeros } from "../ffi/mod.ts";
import type { Decoder } from "./decoder.ts";

/** What a forward pass needs of a cache (model/decoder.ts). */
export interface KVStore {
  /** Key slots before this pass's first token: its queries sit at slots length.. of the attention mask. */
  readonly length: number;
  /** Stores layer's new k and v [B, nKV, S, d] and returns the keys and values to attend over. */
  update(layer: number, k: Tensor, v: Tensor): [Tensor, Tensor];
  /** Called once per forward pass, after every layer has written its S new slots. */
  advance(s: number): void;
}

/** Bytes of decoder's {@link KVCache} for batch rows of maxLength slots: keys and values of every layer. */
export function kvCacheBytes(decoder: Decoder, batch: number, maxLength: number): number {
  const { kvHeads, headDim } = decoder.dims;
  return 2 * decoder.layers.length * batch * kvHeads * maxLength * headDim *
    ELEMENT_SIZE[decoder.embed.dtype];
}

/**
 * What a generation batch of rows × slots asks of memory, for an out-of-memory message: "up to S tokens each;
 * their KV cache alone takes G GiB".
 */
export function kvCacheDemand(decoder: Decoder, rows: number, slots: number): string {
  const gib = kvCacheBytes(decoder, rows, slots) / 2 ** 30;
  return `up to ${slots} tokens each; their KV cache alone takes ${gib.toPrecision(3)} GiB`;
}

/** Keys and values of every layer for a batch being generated. */
export class KVCache implements KVStore {
  /** Per layer [B, nKV, maxLength, headDim]. */
  readonly keys: Tensor[];
  /** Per layer [B, nKV, maxLength, headDim]. */
  readonly values: Tensor[];
  /** Slots allocated per row. */
  readonly maxLength: number;
  /** Slots filled so far (the same for every row: prompts are left-padded). */
  length = 0;

  /** Allocates zeroed buffers for layers × batch × kvHeads × maxLength × headDim. */
  constructor(
    layers: number,
    batch: number,
    kvHeads: number,
    maxLength: number,
    headDim: number,
    opts: { dtype: DType; device: Device },
  ) {
    const shape = [batch, kvHeads, maxLength, headDim];
    // In a scope, so that an allocation that fails (out of memory) frees the layers made before it.
    const [keys, values] = tidy(() =>
      [0, 1].map(() => Array.from({ length: layers }, () => zeros(shape, opts)))
    );
    this.keys = keys!.map(keep);
    this.values = values!.map(keep);
    this.maxLength = maxLength;
  }

  /**
   * Writes layer's new k and v [B, nKV, S, d] at slots length..length+S−1
   * and returns views of every filled slot including them. Call
   * {@link advance} once all layers have written.
   */
  update(layer: number, k: Tensor, v: Tensor): [Tensor, Tensor] {
    const s = k.size(2);
    if (this.length + s > this.maxLength) {
      throw new RangeError(`KVCache: ${this.length} + ${s} tokens exceed maxLength ${this.maxLength}`);
    }
    const kc = this.keys[layer]!, vc = this.values[layer]!;
    {
      using kSlot = kc.narrow(2, this.length, s);
      using vSlot = vc.narrow(2, this.length, s);
      kSlot.copy_(k);
      vSlot.copy_(v);
    }
    return [kc.narrow(2, 0, this.length + s), vc.narrow(2, 0, this.length + s)];
  }

  /** Marks s more slots as filled. */
  advance(s: number): void {
    this.length += s;
  }

  /**
   * Fills this cache's first src.length slots with rows of src: row i gets
   * src's row `rows[i]` (an int64 index tensor [B]). Shares one prefill
   * among several continuations of a prompt.
   */
  fillFrom(src: KVCache, rows: Tensor): void {
    if (src.length > this.maxLength) {
      throw new RangeError(`KVCache.fillFrom: ${src.length} slots exceed maxLength ${this.maxLength}`);
    }
    for (const [dst, from] of [[this.keys, src.keys], [this.values, src.values]] as const) {
      dst.forEach((t, l) => {
        using slot = t.narrow(2, 0, src.length);
        using filled = from[l]!.narrow(2, 0, src.length);
        using picked = filled.indexSelect(0, rows);
        slot.copy_(picked);
      });
    }
    this.length = src.length;
  }

  /** Frees every buffer. */
  dispose(): void {
    for (const t of [...this.keys, ...this.values]) t.dispose();
  }

  /** Frees every buffer at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * One-token decode steps over a {@link KVCache} with nothing host-side baked
 * in: each layer writes its new key and value at the slot held in `slot` (an
 * int64 [1] tensor on the cache's device, advanced by the caller on the
 * device), and attends over the first `width` slots. The caller's attention
 * mask hides the slots after the current one (still zero, or left over from an
 * earlier batch), so the pass needs no causal offset: {@link length} puts the
 * query at the window's last slot, from where every earlier slot is visible.
 */
export class StaticKVView implements KVStore {
  /** The cache written to. */
  readonly cache: KVCache;
  /** The slot this step writes, int64 [1] on the device (borrowed). */
  readonly slot: Tensor;
  /** Slots attended over: the step's slot must be below it. */
  readonly width: number;

  /** A view writing at slot and attending over the first width slots of cache. */
  constructor(cache: KVCache, slot: Tensor, width: number) {
    if (!(width >= 1 && width <= cache.maxLength)) {
      throw new RangeError(`StaticKVView: width ${width} outside 1..${cache.maxLength}`);
    }
    this.cache = cache;
    this.slot = slot;
    this.width = width;
  }

  /** width − 1: the query is placed at the window's last slot (the mask does the rest). */
  get length(): number {
    return this.width - 1;
  }

  /** Writes k and v [B, nKV, 1, d] at the device slot; returns the window's keys and values. */
  update(layer: number, k: Tensor, v: Tensor): [Tensor, Tensor] {
    if (k.size(2) !== 1) throw new RangeError(`StaticKVView: one token per step, got ${k.size(2)}`);
    const kc = this.cache.keys[layer]!, vc = this.cache.values[layer]!;
    kc.indexCopy_(2, this.slot, k);
    vc.indexCopy_(2, this.slot, v);
    return [kc.narrow(2, 0, this.width), vc.narrow(2, 0, this.width)];
  }

  /** Nothing: the slot tensor is advanced on the device by the caller. */
  advance(_s: number): void {}
}
