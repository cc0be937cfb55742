/**
 * Counter-based random numbers on the host: the n-th number of a stream is a
 * hash of (key, n), computed on its own. Sampling draws from them so that a
 * row's tokens depend on its stream's key alone, not on the batch it is
 * decoded in (the data order's shuffles use the same hash to seed theirs).
 * @module
 */

/** A finalizer of 32-bit integers (the "lowbias32" hash): close inputs give unrelated outputs. */
export function hash32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d);
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b);
  return (x ^ (x >>> 16)) >>> 0;
}

/**
 * Word `counter` of the stream `key`, a 32-bit integer: both inputs hashed, so close keys (and counters)
 * do not give shifted streams.
 * @param key any integer; taken modulo 2^32
 * @param counter any integer; taken modulo 2^32
 */
export function counterHash(key: number, counter: number): number {
  return hash32((hash32(key >>> 0) + Math.imul(counter >>> 0, 0x9e3779b9)) >>> 0);
}

/**
 * The `index`-th uniform number in [0, 1) of the stream `key`: 53 random bits from words 2·index + 1 and
 * 2·index + 2 (as a float64's mantissa holds them), so every value k / 2^53 can come out. Word 0 is left
 * out: word 0 of key 0 is 0, and key 0 is a common seed.
 * @param key any integer; taken modulo 2^32
 * @param index an integer in [0, 2^31 − 1)
 */
export function streamUniform(key: number, index: number): number {
  const hi = counterHash(key, 2 * index + 1) >>> 5, lo = counterHash(key, 2 * index + 2) >>> 6;
  return (hi * 2 ** 26 + lo) / 2 ** 53;
}
