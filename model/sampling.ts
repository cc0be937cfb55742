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

/**
 * {@link sampleNext} without the settings check: generate checks them once, not at every step. With
 * `uniforms` ([B, 1] float64 in [0, 1)), row i takes the token at uniforms[i] along its distribution instead
 * of a draw from the generator: see {@link drawAtUniforms}.
 */
export function drawNext(
  scores: Tensor,
  opts: SamplingOptions,
  generator?: Generator,
  uniforms?: Tensor,
): Tensor {
  return tidy(() => {
    const probs = filtered(scores, opts).softmax(-1);
    return uniforms ? drawAtUniforms(probs, uniforms) : probs.multinomial(1, false, generator).squeeze(-1);
  });
}

/** The scores with temperature, top-k and top-p applied: tokens left out score −∞. */
function filtered(scores: Tensor, opts: SamplingOptions): Tensor {
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
  return s;
}

/**
 * Inverse-CDF sampling: row i takes the first token whose cumulative probability exceeds u_i × the row's
 * total, so token j is taken for a share p_j of the values of u. The sums run in float64, which keeps a
 * share exact to about 1e-16 over a 150k-token vocabulary; a token of probability 0 is never taken. The
 * result depends on the row and its u alone, not on the other rows.
 * @param probs [B, V] probabilities (rows need not sum to exactly 1)
 * @param uniforms [B, 1] float64 values in [0, 1)
 * @returns [B] int64 token ids
 */
export function drawAtUniforms(probs: Tensor, uniforms: Tensor): Tensor {
  return tidy(() => {
    const v = probs.size(-1);
    const cdf = probs.to("float64").cumsum(-1);
    const target = uniforms.mul(cdf.narrow(-1, v - 1, 1));
    return cdf.le(target).sum(-1).minimum(v - 1); // an integral bound keeps int64
  });
}
