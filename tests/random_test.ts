/**
 * The counter-based streams that sampling draws from (model/random.ts): uniform within a stream and across
 * keys (the first draw of many rows is what a decode step takes), uncorrelated between neighbours, pinned
 * (so seeded runs repeat across versions), and the data order's seeds unchanged by sharing their hash.
 */
import assert from "node:assert/strict";
import { epochSeed } from "../data/batches.ts";
import { counterHash, streamUniform } from "../model/random.ts";

const N = 1 << 16;

/** Pearson's χ² of values in [0, 1) over `bins` equal bins. */
function chiSquare(xs: readonly number[], bins: number): number {
  const counts = new Array<number>(bins).fill(0);
  for (const x of xs) counts[Math.floor(x * bins)]!++;
  const want = xs.length / bins;
  return counts.reduce((s, c) => s + (c - want) ** 2 / want, 0);
}

function correlation(a: readonly number[], b: readonly number[]): number {
  const mean = (xs: readonly number[]): number => xs.reduce((s, x) => s + x, 0) / xs.length;
  const ma = mean(a), mb = mean(b);
  let ab = 0, aa = 0, bb = 0;
  a.forEach((x, i) => {
    ab += (x - ma) * (b[i]! - mb);
    aa += (x - ma) ** 2;
    bb += (b[i]! - mb) ** 2;
  });
  return ab / Math.sqrt(aa * bb);
}

// χ² over 256 bins has 255 degrees of freedom: mean 255, sd 22.6; 370 is 5 sd out.
const CHI_BOUND = 370;
// A correlation of N independent pairs has sd 1/√N ≈ 0.004; 0.02 is 5 sd out.
const CORR_BOUND = 0.02;

Deno.test("streamUniform: uniform in [0, 1) along a stream, and across keys at each index", () => {
  const along = Array.from({ length: N }, (_, i) => streamUniform(12345, i));
  assert.ok(along.every((u) => u >= 0 && u < 1));
  assert.ok(chiSquare(along, 256) < CHI_BOUND, `along a stream: χ² ${chiSquare(along, 256)}`);
  for (const index of [0, 1, 255]) {
    // Keys 0, 1, 2, ...: the streams of consecutive seeds, key 0 among them.
    const across = Array.from({ length: N }, (_, k) => streamUniform(k, index));
    const chi = chiSquare(across, 256);
    assert.ok(chi < CHI_BOUND, `index ${index} across keys: χ² ${chi}`);
  }
  assert.ok(streamUniform(0, 0) > 2 ** -20, "key 0's first number is not stuck near 0");
});

Deno.test("streamUniform: neighbours are uncorrelated (next index, next key, next sample's key)", () => {
  const base = Array.from({ length: N }, (_, i) => streamUniform(7, i));
  const cases: [string, number[], number[]][] = [
    ["index i and i + 1", base.slice(0, -1), base.slice(1)],
    ["key k and k + 1", base, Array.from({ length: N }, (_, i) => streamUniform(8, i))],
    [
      "samples 0 and 1 of a prompt",
      Array.from({ length: N }, (_, p) => streamUniform(counterHash(p, 0), 0)),
      Array.from({ length: N }, (_, p) => streamUniform(counterHash(p, 1), 0)),
    ],
  ];
  for (const [what, a, b] of cases) {
    const r = correlation(a, b);
    assert.ok(Math.abs(r) < CORR_BOUND, `${what}: correlation ${r}`);
  }
  // 53 bits: values below 2^-32 are possible, so both words contribute.
  assert.ok(base.some((u) => u * 2 ** 32 % 1 !== 0), "the low word reaches the value");
});

Deno.test("streamUniform's values are pinned: a seeded run samples what it sampled before", () => {
  const pinned: [number, number, number][] = [
    [0, 0, 0.007765129353267897],
    [1, 0, 0.6957482285077939],
    [12345, 7, 0.44384827139307115],
    [2 ** 32 - 1, 255, 0.48706587527372325],
  ];
  for (const [key, index, want] of pinned) {
    assert.equal(streamUniform(key, index), want, `(${key}, ${index})`);
  }
});

Deno.test("epochSeed is word `epoch` of stream `seed`: the data order of earlier runs is unchanged", () => {
  // Values of the formula before the hash moved to model/random.ts.
  const pinned: [number, number, number][] = [
    [1, 0, 1492470133],
    [0, 1, 33350994],
    [42, 7, 1859326787],
    [2 ** 32 - 1, 123456, 3610413947],
  ];
  for (const [seed, epoch, want] of pinned) {
    assert.equal(epochSeed(seed, epoch), want, `epochSeed(${seed}, ${epoch})`);
    assert.equal(counterHash(seed, epoch), want);
  }
});
