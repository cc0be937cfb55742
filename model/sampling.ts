/**
 * Choosing the next token from scores, as transformers' generate does: greedy, or temperature → top-k →
 * top-p, then one draw per row.
 * @module
 */
import { type Generator, type Tensor, tidy } from "../ffi/mod.ts";

/** How the next token is chosen. Greedy unless doSample. */
export interface SamplingOptions {
  /** Sample instead of taking the argmax (default false). */
  doSample?: boolean;
  /** Divide logits by this before sampling (default 1). */
  temperature?: number;
  /** Keep only the k most likely tokens (0 = off, the default). */
  topK?: number;
  /** Keep the smallest set of tokens whose probability reaches p (1 = off, the default). */
  topP?: number;
}

/**
 * Checks sampling settings as transformers' generation config does.
 * @throws {RangeError} naming the setting: temperature must be > 0, topP in (0, 1], topK an integer >= 0
 */
export function checkSampling(opts: SamplingOptions): void {
  const { temperature: t, topP: p, topK: k } = opts;
  if (t !== undefined && !(Number.isFinite(t) && t > 0)) {
    throw new RangeError(`sampling: temperature must be a number > 0 (greedy: doSample false), got ${t}`);
  }
  if (p !== undefined && !(p > 0 && p <= 1)) {
    throw new RangeError(`sampling: topP must be in (0, 1], got ${p}`);
  }
  if (k !== undefined && !(Number.isSafeInteger(k) && k >= 0)) {
    throw new RangeError(`sampling: topK must be an integer >= 0 (0: off), got ${k}`);
  }
}

/**
 * Applies temperature, top-k and top-p to float32 scores [B, V] and draws one token per row.
 * @throws {RangeError} for a bad setting (see {@link checkSampling})
 */
export function sampleNext(scores: Tensor, opts: SamplingOptions, generator?: Generator): Tensor {
  checkSampling(opts);
  return drawNext(scores, opts, generator);
}

/** {@link sampleNext} without the settings check: generate checks them once, not at every step. */
export function drawNext(scores: Tensor, opts: SamplingOptions, generator?: Generator): Tensor {
  return tidy(() => {
    let s = scores;
    const v = s.size(-1);
    if (opts.temperature !== undefined && opts.temperature !== 1) s = s.div(opts.temperature);
    if (opts.topK && opts.topK > 0) {
      const k = Math.min(opts.topK, v);
      const kth = s.topk(k, -1).values.narrow(-1, k - 1, 1);
      s = s.maskedFill(s.lt(kth), -Infinity); // strictly below the k-th: ties survive, as HF
    }
    if (opts.topP !== undefined && opts.topP < 1) {
      const { values, indices } = s.sort(-1, false);
      const remove = values.softmax(-1).cumsum(-1).le(1 - opts.topP);
      remove.narrow(-1, v - 1, 1).fill_(0); // always keep the most likely token
      s = s.maskedFill(remove.scatter(-1, indices, remove), -Infinity);
    }
    return s.softmax(-1).multinomial(1, false, generator).squeeze(-1);
  });
}
