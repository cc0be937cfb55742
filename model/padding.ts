/**
 * Left-padding a batch of token id lists for generation, as HF does
 * (transformers' generate): pads on the left, an attention mask of 1 for real
 * tokens, and position ids `cumsum(mask) - 1` with pads set to 1, so every
 * row's real tokens start at position 0. Plain arrays: turn them into
 * tensors where they are used.
 * @module
 */

/** A left-padded batch. */
export interface PaddedBatch {
  /** [batch][length] token ids, pads first. */
  inputIds: number[][];
  /** [batch][length] 1 for real tokens, 0 for pads. */
  attentionMask: number[][];
  /** [batch][length] position of each real token (0, 1, …); 1 at pads, as HF fills them. */
  positionIds: number[][];
}

/**
 * Left-pads sequences to a common length.
 * @param seqs token id lists (may differ in length; may be empty)
 * @param padId the id to pad with (the tokenizer's pad token, else an EOS id)
 * @param length pad to this length instead of the longest sequence's
 * @throws {RangeError} for a non-integer or negative id or padId, or a length shorter than a sequence
 * @example
 * ```ts
 * import { leftPad } from "./padding.ts";
 * const b = leftPad([[5, 6, 7], [8]], 0);
 * // b.inputIds     [[5, 6, 7], [0, 0, 8]]
 * // b.attentionMask [[1, 1, 1], [0, 0, 1]]
 * // b.positionIds   [[0, 1, 2], [1, 1, 0]]
 * ```
 */
export function leftPad(seqs: readonly (readonly number[])[], padId: number, length?: number): PaddedBatch {
  const isId = (x: unknown): boolean => typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
  if (!isId(padId)) throw new RangeError(`leftPad: padId must be a non-negative integer, got ${padId}`);
  const longest = seqs.reduce((m, s) => Math.max(m, s.length), 0);
  const len = length ?? longest;
  if (!Number.isSafeInteger(len) || len < longest) {
    throw new RangeError(`leftPad: length ${len} is shorter than the longest sequence (${longest} tokens)`);
  }
  const out: PaddedBatch = { inputIds: [], attentionMask: [], positionIds: [] };
  seqs.forEach((s, row) => {
    const bad = s.findIndex((x) => !isId(x));
    if (bad >= 0) {
      throw new RangeError(`leftPad: sequence ${row} has an invalid token id ${s[bad]} at index ${bad}`);
    }
    const pads = len - s.length;
    out.inputIds.push([...new Array<number>(pads).fill(padId), ...s]);
    out.attentionMask.push([...new Array<number>(pads).fill(0), ...new Array<number>(s.length).fill(1)]);
    out.positionIds.push([...new Array<number>(pads).fill(1), ...s.map((_, i) => i)]);
  });
  return out;
}

/**
 * Checks that every id of seqs (and the pad id) names one of the model's vocabSize embeddings. An id past the
 * end would fail deep in the embedding lookup, and on a GPU as a device-side assert that ends the process's
 * CUDA context; the usual cause is a tokenizer that is not the model's own.
 * @throws {RangeError} naming the sequence, the index and the id
 */
export function checkTokenIds(
  what: string,
  seqs: readonly (readonly number[])[],
  vocabSize: number,
  padId?: number,
): void {
  const hint =
    `the model has ${vocabSize} token embeddings (config.json vocab_size): is the tokenizer its own?`;
  seqs.forEach((s, row) => {
    const bad = s.findIndex((x) => x >= vocabSize);
    if (bad >= 0) {
      throw new RangeError(`${what}: sequence ${row} has token id ${s[bad]} at index ${bad}; ${hint}`);
    }
  });
  if (padId !== undefined && padId >= vocabSize) throw new RangeError(`${what}: pad id ${padId}; ${hint}`);
}
