/**
 * A preallocated key/value cache: one [B, nKV, maxLength, headDim] buffer per
 * layer, written in place at the current length. No per-step concatenation,
 * so a decode step's memory traffic and allocations stay constant.
 * @module
 */
import { type Device, type DType, keep, type Tensor, zeros } from "../ffi/mod.ts";

/** Keys and values of every layer for a batch being generated. */
export class KVCache {
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
    this.keys = Array.from({ length: layers }, () => keep(zeros(shape, opts)));
    this.values = Array.from({ length: layers }, () => keep(zeros(shape, opts)));
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
