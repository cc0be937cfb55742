/**
 * Memory: long create/compute/dispose loops leave no tensor behind (JS count,
 * native count, and process RSS), a training loop inside tidy is flat, and
 * the FinalizationRegistry backstop frees a tensor that was never disposed.
 *
 * Run via `deno task test` (it passes --v8-flags=--expose-gc, which the GC
 * tests need). Uses FLOAT on DEVICE.
 */
import assert from "node:assert/strict";
import {
  AdamW,
  fromTypedArray,
  linear,
  liveTensors,
  nativeLiveCount,
  setLeakCheck,
  type Tensor,
  tensor,
  tidy,
} from "../ffi/mod.ts";
import { DEVICE, FLOAT } from "./util.ts";

const FL = { dtype: FLOAT, device: DEVICE } as const;

/** V8's gc(), present only with --v8-flags=--expose-gc. */
function gc(): void {
  const g = (globalThis as { gc?: () => void }).gc;
  assert.ok(
    typeof g === "function",
    "globalThis.gc is missing: run the tests via `deno task test` (--v8-flags=--expose-gc)",
  );
  g();
}

const tick = (ms = 0): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Resident set size in MB, after a full GC so the JS heap does not blur it. */
function rssMB(): number {
  gc();
  return Deno.memoryUsage().rss / 2 ** 20;
}

// [64, 64]: a float32 leak would be 16 KiB per tensor, and each iteration makes
// ~6 tensors, so leaking even one per iteration adds 160 MB over 10,000.
const N = 64;
const data = Float32Array.from({ length: N * N }, (_, i) => ((i * 7919) % 101) / 101 - 0.5);
const nested: number[][] = Array.from({ length: N }, (_, r) => Array.from(data.subarray(r * N, (r + 1) * N)));

let checked = 0;

/** One iteration: make, compute, read back, free. Alternates `using` and tidy. */
function iteration(i: number): void {
  let total: number;
  if (i % 2 === 0) {
    using raw = fromTypedArray(data, [N, N], { device: DEVICE });
    using x = raw.to(FLOAT);
    using y = x.matmul(x);
    using z = y.add(x);
    using s = z.softmax(-1);
    using t = s.sum();
    total = t.item();
  } else {
    total = tidy(() => {
      // tensor() from nested JS arrays on alternate odd iterations
      const x = i % 4 === 1 ? tensor(nested, FL) : fromTypedArray(data, [N, N], { device: DEVICE }).to(FLOAT);
      const row = x.matmul(x.transpose(0, 1)).mul(0.5).softmax(1).sum(1);
      return row.sum().item();
    });
  }
  // each softmax row sums to 1, so the total is N (loose: bf16 rounding)
  if (i % 1000 === 0) {
    assert.ok(Math.abs(total - N) < 0.05 * N, `iteration ${i}: sum of softmax rows ${total}, expected ${N}`);
    checked++;
  }
}

Deno.test("memory: 10,000 create/compute/dispose iterations leave counts and RSS flat", () => {
  const js0 = liveTensors(), native0 = nativeLiveCount();
  for (let i = 0; i < 1_000; i++) iteration(i);
  assert.equal(liveTensors(), js0, "warm-up leaked JS handles");
  assert.equal(nativeLiveCount(), native0, "warm-up leaked native handles");
  const rssWarm = rssMB();
  const t0 = performance.now();
  for (let i = 1_000; i < 10_000; i++) iteration(i);
  const ms = performance.now() - t0;
  const rssEnd = rssMB();
  const growth = rssEnd - rssWarm;
  console.log(
    `RSS after 1,000-iteration warm-up ${rssWarm.toFixed(1)} MB, after 10,000 ${rssEnd.toFixed(1)} MB ` +
      `(growth ${growth.toFixed(1)} MB; 9,000 iterations in ${ms.toFixed(0)} ms; ${DEVICE} ${FLOAT})`,
  );
  assert.equal(liveTensors(), js0, "loop leaked JS handles");
  assert.equal(nativeLiveCount(), native0, "loop leaked native handles");
  assert.equal(checked, 10);
  // Observed growth on CPU is a few MB (allocator and JIT noise); one leaked
  // [64, 64] float32 tensor per iteration would be +140 MB over these 9,000.
  assert.ok(growth < 20, `RSS grew ${growth.toFixed(1)} MB over 9,000 iterations: a leak?`);
});

/** A seeded [rows, cols] FLOAT parameter on DEVICE with values in ±scale. */
function param(shape: number[], scale: number, seed: number): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const vals = Float32Array.from({ length: n }, (_, i) => scale * Math.sin(seed * 1000 + i * 1.7));
  return tidy(() => fromTypedArray(vals, shape, { device: DEVICE }).to(FLOAT)).setRequiresGrad();
}

Deno.test("memory: 200 training steps in tidy leave the live count where it started", () => {
  const js0 = liveTensors(), native0 = nativeLiveCount();
  const w1 = param([8, 4], 0.5, 1),
    b1 = param([8], 0.1, 2),
    w2 = param([1, 8], 0.5, 3),
    b2 = param([1], 0.1, 4);
  const params = [w1, b1, w2, b2];
  const x = param([16, 4], 1, 5).setRequiresGrad(false);
  const y = tidy(() => x.sum(1, true).sin()); // a smooth target the MLP can fit
  const opt = new AdamW([{ params: [w1, w2], lr: 0.02 }, { params: [b1, b2], lr: 0.02, weightDecay: 0 }]);
  const losses: number[] = [];
  let afterFirst = -1;
  for (let step = 0; step < 200; step++) {
    losses.push(tidy(() => {
      const pred = linear(linear(x, w1, b1).tanh(), w2, b2);
      const loss = pred.sub(y).square().mean();
      loss.backward();
      opt.step();
      opt.zeroGrad();
      return loss.item();
    }));
    if (step === 0) afterFirst = liveTensors(); // params, x, y + 2 moments per param
    else assert.equal(liveTensors(), afterFirst, `step ${step} changed the live count`);
  }
  assert.equal(afterFirst, js0 + 6 + 8);
  assert.ok(losses[199]! < losses[0]!, `loss did not go down: ${losses[0]} -> ${losses[199]}`);
  opt.dispose();
  for (const t of [...params, x, y]) t.dispose();
  assert.equal(liveTensors(), js0);
  assert.equal(nativeLiveCount(), native0);
});

/** Makes a tensor and drops it undisposed (outside any scope): a leak for the backstop to catch. */
function leakOne(): void {
  const t = tensor([1, 2, 3]);
  assert.equal(t.numel, 3);
}

Deno.test("memory: the finalizer frees a tensor that was never disposed, with a warning", async () => {
  gc(); // fails with a clear message when --expose-gc is missing
  setLeakCheck("on");
  const warnings: string[] = [];
  const originalWarn = console.warn;
  console.warn = (...args: unknown[]): void => {
    warnings.push(args.map(String).join(" "));
  };
  const js0 = liveTensors(), native0 = nativeLiveCount();
  let tries = 0;
  try {
    leakOne();
    assert.equal(liveTensors(), js0 + 1);
    assert.equal(nativeLiveCount(), native0 + 1);
    for (; tries < 50 && liveTensors() > js0; tries++) {
      gc();
      await tick(10); // FinalizationRegistry callbacks run as their own tasks
    }
  } finally {
    console.warn = originalWarn;
    const env = Deno.env.get("MOERL_LEAK_CHECK");
    setLeakCheck(env === "0" || env === "off" ? "off" : env === "stack" ? "stack" : "on");
  }
  assert.equal(liveTensors(), js0, `the finalizer did not run after ${tries} gc() + timer rounds`);
  assert.equal(nativeLiveCount(), native0, "the finalizer did not free the native handle");
  assert.ok(
    warnings.some((w) => /garbage-collected without dispose/.test(w)),
    `no leak warning printed; got: ${JSON.stringify(warnings)}`,
  );
});
