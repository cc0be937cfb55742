/**
 * Time and peak memory of NF4 quantisation and dequantisation of one large
 * matrix (default 151936×1024, Qwen3's embedding/LM-head shape).
 *
 *   deno run -A bench/nf4_quant.ts [--device cuda] [--dtype bfloat16] [--rows 151936] [--cols 1024]
 *
 * On CUDA the peak is the allocator's peak above the weight itself; on the
 * CPU it is the peak RSS (VmHWM) above the RSS after creating the weight.
 * Then times a forward pass of --tokens rows through the layer, dense
 * versus NF4 (dequantised on the fly), mean of --iters after a warm-up.
 */
import { benchArgs } from "./cli.ts";
import { cuda, type Device, type DType, manualSeed, noGrad, randn, tidy } from "../ffi/mod.ts";
import { Linear } from "../model/layers.ts";
import { Nf4Linear } from "../model/nf4.ts";
import { quantizeNf4 } from "../model/nf4_codec.ts";

const a = benchArgs("deno run -A bench/nf4_quant.ts", "NF4 quantisation speed (see bench/nf4_quant.ts).", {
  device: { type: "string", default: "cpu" },
  dtype: { type: "string", default: "bfloat16" },
  rows: { type: "string", default: "151936" },
  cols: { type: "string", default: "1024" },
  tokens: { type: "string", default: "256" },
  iters: { type: "string", default: "5" },
});
const device = a.device as Device, dtype = a.dtype as DType, gpu = device.startsWith("cuda");
const rss = (f: "VmRSS" | "VmHWM"): number =>
  Number(Deno.readTextFileSync("/proc/self/status").match(new RegExp(`${f}:\\s+(\\d+) kB`))![1]) * 1024;
const sync = (): void => {
  if (gpu) cuda.synchronize(device);
};
const mark = (): number => {
  sync();
  if (gpu) {
    cuda.resetPeakMemoryStats(device);
    return cuda.memoryStats(device).allocated;
  }
  Deno.writeTextFileSync("/proc/self/clear_refs", "5");
  return rss("VmRSS");
};
const peak = (): number => (gpu ? cuda.memoryStats(device).peakAllocated : rss("VmHWM"));
const mib = (b: number): string => `${(b / 2 ** 20).toFixed(1)} MiB`;

manualSeed(0);
const shape = [Number(a.rows), Number(a.cols)];
using w = tidy(() => randn(shape, { device }).mul(0.02).to(dtype));
const wBytes = w.numel * (dtype === "float32" ? 4 : 2);
console.log(`weight [${shape.join(", ")}] ${dtype} on ${device}: ${mib(wBytes)}`);
for (const doubleQuant of [false, true]) {
  quantizeNf4(w, { doubleQuant }).dispose(); // warm-up
  let base = mark();
  let t0 = performance.now();
  using q = quantizeNf4(w, { doubleQuant });
  sync();
  const tq = performance.now() - t0, pq = peak() - base;
  base = mark();
  t0 = performance.now();
  using d = q.dequantize();
  sync();
  const td = performance.now() - t0, pd = peak() - base;
  console.log(
    `${doubleQuant ? "NF4+DQ" : "NF4   "}: ${mib(q.bytes())} (${
      (q.bytes() / w.numel).toFixed(4)
    } B/param); ` +
      `quantise ${tq.toFixed(0)} ms, peak +${mib(pq)} (${(pq / wBytes).toFixed(2)}× the weight); ` +
      `dequantise ${td.toFixed(0)} ms, peak +${mib(pd)} (${(pd / wBytes).toFixed(2)}×, output ${d.dtype})`,
  );
}

// Forward: dense Linear vs Nf4Linear (dequantise + matmul), no grad.
const x = tidy(() => randn([Number(a.tokens), shape[1]!], { device }).to(dtype));
const time = (f: () => void): number => {
  f();
  sync();
  const t0 = performance.now();
  for (let i = 0; i < Number(a.iters); i++) f();
  sync();
  return (performance.now() - t0) / Number(a.iters);
};
const dense = new Linear(w);
using nf4 = Nf4Linear.fromLinear(dense);
using nf4dq = Nf4Linear.fromLinear(dense, { doubleQuant: true });
const td = time(() => noGrad(() => dense.forward(x).dispose()));
const tn = time(() => noGrad(() => nf4.forward(x).dispose()));
const tq = time(() => noGrad(() => nf4dq.forward(x).dispose()));
console.log(
  `forward [${x.shape.join(", ")}] × Wᵀ: dense ${td.toFixed(2)} ms, NF4 ${tn.toFixed(2)} ms, ` +
    `NF4+DQ ${tq.toFixed(2)} ms (mean of ${a.iters})`,
);
x.dispose();
