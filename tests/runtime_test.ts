/**
 * Process-wide settings: libtorch's CPU thread count is ours to set, and by
 * default moerl uses every CPU a user has (or OMP_NUM_THREADS).
 */
import assert from "node:assert/strict";
import { Generator, manualSeed, numThreads, rand, setNumThreads, useAvailableCores } from "../ffi/mod.ts";

Deno.test("runtime: the CPU thread count round-trips; by default every available CPU", () => {
  const before = numThreads();
  try {
    setNumThreads(1);
    assert.equal(numThreads(), 1);
    setNumThreads(2);
    assert.equal(numThreads(), 2);
    assert.throws(() => setNumThreads(0), /setNumThreads: expected an integer >= 1, got 0/);
    const omp = Deno.env.get("OMP_NUM_THREADS");
    assert.equal(useAvailableCores(), omp ? Number(omp) : navigator.hardwareConcurrency);
  } finally {
    setNumThreads(before);
  }
});

Deno.test("runtime: a shim that cannot load is an error that says what was tried and how to fix it", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", `import("./ffi/mod.ts").then((m) => m.zeros([1])).catch((e) => console.log(e.message))`],
    cwd: import.meta.dirname + "/..",
    env: { MOERL_LIB: "/nonexistent/libmoerl.so" },
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.match(
    text,
    /cannot load the libtorch shim\.\nTried:\n {2}\/nonexistent\/libmoerl\.so \(\$MOERL_LIB\): \//,
  );
  assert.doesNotMatch(text, /Could not open library: Could not open library/);
  assert.match(text, /Fix: run `deno task build`/);
});

Deno.test("runtime: a seed that is no integer or needs more than 64 bits is refused by name; uint64 would wrap it", () => {
  const draw = (): number[] => {
    using t = rand([3]);
    return t.toArray();
  };
  assert.throws(
    () => manualSeed(2n ** 64n + 5n),
    /manualSeed: the seed must fit 64 bits .*got 18446744073709551621/,
  );
  assert.throws(() => manualSeed(1.5), /manualSeed: the seed must be an integer within ±2\^53, got 1\.5/);
  assert.throws(() => new Generator(-(2n ** 63n) - 1n), /Generator: the seed must fit 64 bits/);
  assert.throws(() => new Generator(Number.NaN), /Generator: the seed must be an integer/);
  // The ends of the range are seeds, as in PyTorch: a negative one stands for its 64-bit two's complement.
  manualSeed(-1);
  const a = draw();
  manualSeed(2n ** 64n - 1n);
  assert.deepEqual(draw(), a);
  manualSeed(-(2n ** 63n));
  new Generator(2n ** 64n - 1n).dispose();
});
