/**
 * `deno task bench:ffi`: per-op overhead of moerl (Deno → FFI → C shim →
 * libtorch) against Python torch running the same ops on the same libtorch.
 *
 * Tensors are tiny ([8, 8] float32 on CPU), so the kernels cost next to
 * nothing and the figures are almost all call overhead: argument conversion,
 * the FFI/Python-C boundary, ATen dispatch, allocating the result handle and
 * freeing it (dispose() here, refcounting in Python).
 *
 * Timing (same in bench/ffi_overhead.py): per op, doubling batches until one
 * takes CFG.warmMs (warm-up for the JIT and allocator, and calibration), then
 * CFG.reps batches of about CFG.repMs each; we report the median batch's µs per op
 * and, as "noise", the reps' (max - min) / median: on a loaded machine
 * (both sides run one after the other) a large noise means rerun.
 * GC stays on in both processes: it is part of what real code pays.
 *
 * Threads: libtorch's intra-op pool is OpenMP here. We set OMP_NUM_THREADS=1
 * before the shim loads (moerl loads it lazily at the first op, so setting it
 * at the top of this module is early enough); the Python child inherits it
 * and also calls torch.set_num_threads(1). At [8, 8] nothing parallelises
 * anyway; this only keeps the two processes configured alike.
 *
 * Env: MOERL_BENCH_PYTHON picks the python (default /usr/bin/python3, Debian's,
 * which has python3-torch 1.13).
 */
import { benchArgs } from "./cli.ts";
import { arange, randn, setLeakCheck, type Tensor, tidy, torchVersion } from "../ffi/mod.ts";
import { ctx, shim } from "../ffi/lib.ts";
import { runPythonJson } from "./python.ts";

benchArgs(
  "deno task bench:ffi",
  "Per-op overhead of moerl against Python torch on the same libtorch (see bench/ffi_overhead.ts).",
  {},
);

Deno.env.set("OMP_NUM_THREADS", "1");
Deno.env.set("MKL_NUM_THREADS", "1");

const CFG = { size: 8, reps: 7, repMs: 20, warmMs: 30 };
const PYTHON = Deno.env.get("MOERL_BENCH_PYTHON") ?? "/usr/bin/python3";

const n = CFG.size;
const a = randn([n, n]), b = randn([n, n]);
const idx = arange(0, n, 2);

// The same ops, with the same argument forms, as OPS in ffi_overhead.py.
const OPS: Record<string, () => Tensor> = {
  "add": () => a.add(b),
  "mul(scalar)": () => a.mul(2.0),
  "matmul": () => a.matmul(b),
  "softmax(-1)": () => a.softmax(-1),
  "sum": () => a.sum(),
  "reshape": () => a.reshape([n / 2, n * 2]),
  "transpose": () => a.transpose(0, 1),
  "narrow": () => a.narrow(0, 2, n / 2),
  "exp": () => a.exp(),
  "index_select": () => a.indexSelect(0, idx),
};
const fs = Object.values(OPS);

function batchMs(f: () => void, iters: number): number {
  const t0 = performance.now();
  for (let i = 0; i < iters; i++) f();
  return performance.now() - t0;
}

/** Batch size for f: doubling batches until one takes warmMs (this is also the warm-up), scaled to repMs. */
function calibrate(f: () => void): number {
  let iters = 1, t: number;
  while ((t = batchMs(f, iters)) < CFG.warmMs) iters *= 2;
  return Math.max(1, Math.round((iters * CFG.repMs) / t));
}

const median = (xs: number[]): number => xs.sort((x, y) => x - y)[xs.length >> 1]!;

/** [median, spread] of f's µs per op (f runs opsPerCall ops); spread = (max - min) / median of the reps. */
function measure(f: () => void, opsPerCall = 1): [number, number] {
  const iters = calibrate(f);
  const reps = Array.from({ length: CFG.reps }, () => (batchMs(f, iters) * 1e3) / iters / opsPerCall);
  const med = median(reps);
  return [med, (reps.at(-1)! - reps[0]!) / med]; // median() sorted reps in place
}

/**
 * Like measure for several variants, but with their reps interleaved round-robin,
 * so that drift (frequency, other load) hits all alike: the differences between
 * them, a few tenths of a µs, are the point. setup() runs before each batch, untimed.
 */
function measureInterleaved(vs: { f: () => void; ops: number; setup?: () => void }[]): number[] {
  const iters = vs.map((v) => (v.setup?.(), calibrate(v.f)));
  const reps: number[][] = vs.map(() => []);
  for (let r = 0; r < CFG.reps; r++) {
    vs.forEach((v, i) => {
      v.setup?.();
      reps[i]!.push((batchMs(v.f, iters[i]!) * 1e3) / iters[i]! / v.ops);
    });
  }
  return reps.map(median);
}

const mixDispose = (): void => {
  for (const f of fs) f().dispose();
};
const mixTidy = (): void =>
  tidy(() => {
    for (const f of fs) f();
  });

// The same mix straight on the shim symbols: no Tensor objects, no scope
// tracking, no finalizer, constants pre-converted to BigInt. What is left is
// the FFI crossing, the shim and libtorch; the gap to the main mix is what the
// Tensor wrapper costs.
const S = shim(), C = ctx(), A = a.ptr, Bp = b.ptr, I = idx.ptr;
const noDims = new BigInt64Array(0), half = BigInt(n / 2), shape2 = new BigInt64Array([half, BigInt(n * 2)]);
const RAW: (() => Deno.PointerValue)[] = [
  () => S.mt_binary(C, 0, A, Bp), // add
  () => S.mt_binary_scalar(C, 2, A, 2.0), // mul
  () => S.mt_matmul(C, A, Bp),
  () => S.mt_softmax(C, A, -1n, -1),
  () => S.mt_reduce(C, 0, A, noDims, 0, 0), // sum
  () => S.mt_reshape(C, A, shape2, 2),
  () => S.mt_transpose(C, A, 0n, 1n),
  () => S.mt_narrow(C, A, 0n, 2n, half),
  () => S.mt_unary(C, 1, A), // exp
  () => S.mt_index_select(C, A, 0n, I),
];
const mixRaw = (): void => {
  for (const f of RAW) S.mt_free(f());
};

/** The libtorch_cpu file this process mapped, and at::get_num_threads() read from it. */
function libtorchInfo(): { lib: string; threads: number | string } {
  const lib = Deno.readTextFileSync("/proc/self/maps").split("\n")
    .find((l) => l.includes("libtorch_cpu"))?.trim().split(/\s+/).at(-1) ?? "?";
  try {
    // at::get_num_threads() by its mangled name; dlopen of a loaded library is a lookup.
    const dl = Deno.dlopen(lib, { nt: { name: "_ZN2at15get_num_threadsEv", parameters: [], result: "i32" } });
    const threads = dl.symbols.nt();
    dl.close();
    return { lib, threads };
  } catch {
    return { lib, threads: "?" };
  }
}

interface PyResult {
  version: string;
  lib: string;
  threads: number;
  python: string;
  us: Record<string, [number, number]>; // [median µs, spread]
}

/** Runs the Python side; returns its result, or a reason it could not. */
async function runPython(): Promise<PyResult | string> {
  return await runPythonJson<PyResult>(PYTHON, "ffi_overhead.py", CFG);
}

const f2 = (x: number): string => x.toFixed(2).padStart(9);
const row = (name: string, ...cells: string[]): string => name.padEnd(36) + cells.join(" ");

// ---- our side first, so our numbers print even without Python ------------------
setLeakCheck("on"); // the default; pinned so MOERL_LEAK_CHECK cannot skew the main table
const ours: Record<string, [number, number]> = {};
for (const [name, f] of Object.entries(OPS)) ours[name] = measure(() => f().dispose());
ours.mix = measure(mixDispose, fs.length);

const on = (): void => setLeakCheck("on"), off = (): void => setLeakCheck("off");
const variants = [
  { name: "explicit dispose, leak check on", f: mixDispose, ops: fs.length, setup: on },
  { name: "explicit dispose, leak check off", f: mixDispose, ops: fs.length, setup: off },
  { name: "tidy per mix, leak check on", f: mixTidy, ops: fs.length, setup: on },
  { name: "tidy per mix, leak check off", f: mixTidy, ops: fs.length, setup: off },
  { name: "raw shim calls + mt_free (floor)", f: mixRaw, ops: fs.length },
  { name: "empty FFI call (mt_abi_version)", f: (): void => void S.mt_abi_version(), ops: 1 },
];
const scopeUs = measureInterleaved(variants);
setLeakCheck("on");

const py = await runPython();
const info = libtorchInfo();

// ---- report ---------------------------------------------------------------------------
console.log(
  `moerl : libtorch ${torchVersion()}, ${info.lib}, intra-op threads ${info.threads}, Deno ${Deno.version.deno}`,
);
if (typeof py !== "string") {
  console.log(`torch : ${py.version}, ${py.lib}, intra-op threads ${py.threads}, Python ${py.python}`);
}
console.log(`ops on [${n}, ${n}] float32 CPU; µs/op = median of ${CFG.reps} reps of ~${CFG.repMs} ms\n`);
console.log(row("op", "  moerl µs", "  torch µs", "    ratio", "  noise"));
for (const name of [...Object.keys(OPS), "mix"]) {
  const [us, spread] = ours[name]!;
  const [p, pSpread] = typeof py === "string" ? [NaN, 0] : py.us[name]!;
  const noise = `${Math.round(100 * Math.max(spread, pSpread))}%`.padStart(7);
  const label = name === "mix" ? "mix (all ops in a row, per op)" : name;
  console.log(row(label, f2(us), p ? f2(p) : "        -", p ? f2(us / p) : "        -", noise));
}
console.log(
  "ratio = moerl / torch (below 1: moerl faster); noise = (max - min) / median of the reps, worse side",
);

console.log("\nscope tracking and leak check (moerl, mix, µs per op)");
console.log(row("variant (reps interleaved)", "       µs", "  vs row 1"));
variants.forEach((v, i) => console.log(row(v.name, f2(scopeUs[i]!), f2(scopeUs[i]! - scopeUs[0]!))));

if (typeof py === "string") {
  console.error(
    `\nNo PyTorch comparison: ${py}\n` +
      "Install Debian's PyTorch (apt-get install python3-torch, the same libtorch 1.13 moerl builds against),\n" +
      "or set MOERL_BENCH_PYTHON to a python whose torch matches torchVersion() above.",
  );
  Deno.exit(1);
}
