// Builds the C++ shim (ffi/shim/*.cpp) into ffi/build/libmoerl-<key>.so and
// records it in ffi/build/current.json, which the TS loader reads.
//
//   deno task build            build if sources/libtorch/flags changed
//   deno task build --force    rebuild anyway
//   deno task build --print    print where libtorch was found, build nothing
//   GLOO_INCLUDE=/path          where gloo's headers are, when not in the system's include dirs
//
// libtorch is looked for in this order (like tch-rs's torch-sys/build.rs):
//   1. $LIBTORCH: a dir with include/ and lib/ (official zip or a torch
//      python package dir). If set but wrong it is an error, not skipped.
//   2. python torch: `python3`, then `/usr/bin/python3`. Debian's python3-torch
//      gets its headers from libtorch-dev, so it counts as 3.
//   3. the system: Debian's libtorch-dev multiarch layout.
// Only node: modules and Deno APIs are used: JSR and https: are unreachable here.
import { createHash } from "node:crypto";
import { basename, dirname, join, relative } from "node:path";

const FFI = import.meta.dirname!;
const SHIM = join(FFI, "shim");
const OUT = join(FFI, "build");
const FORCE = Deno.args.includes("--force");
const PRINT = Deno.args.includes("--print");

type Source = "LIBTORCH" | "python" | "system";
interface Torch {
  source: Source;
  includeDir: string;
  libDir: string;
  torchVersion: string;
  cxx11Abi: number;
  abiFrom: string; // where cxx11Abi came from (python, env, libc10.so, default)
  torchDir?: string; // the python package dir, when there is one
  pythonCuda?: string | null; // torch.version.cuda as python reports it
}

const tried: string[] = []; // "place: why it failed", for the error message

function exists(p: string): boolean {
  try {
    Deno.statSync(p);
    return true;
  } catch {
    return false;
  }
}

function fail(msg: string): never {
  console.error(`ffi/build.ts: ${msg}`);
  Deno.exit(1);
}

async function run([prog, ...args]: string[]): Promise<{ ok: boolean; out: string; err: string }> {
  try {
    const r = await new Deno.Command(prog!, { args, stdin: "null" }).output();
    const dec = new TextDecoder();
    return { ok: r.success, out: dec.decode(r.stdout), err: dec.decode(r.stderr) };
  } catch (e) { // e.g. the program does not exist
    return { ok: false, out: "", err: String(e) };
  }
}

// Runs the commands, at most `width` at a time; their results in order.
async function runAll(cmds: string[][], width: number): Promise<Awaited<ReturnType<typeof run>>[]> {
  const results: Awaited<ReturnType<typeof run>>[] = new Array(cmds.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    for (let i = next++; i < cmds.length; i = next++) results[i] = await run(cmds[i]!);
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(width, cmds.length)) }, worker));
  return results;
}

// Why include/lib do not look like libtorch, or null if they do.
function layoutProblem(inc: string, lib: string): string | null {
  const api = join(inc, "torch/csrc/api/include/torch/torch.h");
  if (!exists(api)) return `no ${api}`;
  for (const so of ["libtorch.so", "libc10.so"]) {
    if (!exists(join(lib, so))) return `no ${join(lib, so)}`;
  }
  return null;
}

// TORCH_VERSION from torch/version.h (its location moved between releases).
function headerVersion(inc: string): string {
  for (
    const h of ["torch/csrc/api/include/torch/version.h", "torch/version.h", "torch/headeronly/version.h"]
  ) {
    try {
      const m = Deno.readTextFileSync(join(inc, h)).match(/#define\s+TORCH_VERSION\s*\\?\s*"([^"]+)"/);
      if (m?.[1]) return m[1];
    } catch { /* try the next */ }
  }
  return "unknown";
}

// Without Python to ask, pick the std::string ABI libtorch was built with:
// $LIBTORCH_CXX11_ABI, else read it off libc10.so's exported symbols (pip
// wheels before 2.7 and the official "pre-cxx11" zips use 0; a mismatch still
// links but fails at load with undefined symbols), else 1.
function guessAbi(libDir: string): { cxx11Abi: number; abiFrom: string } {
  const env = Deno.env.get("LIBTORCH_CXX11_ABI");
  if (env === "0" || env === "1") return { cxx11Abi: Number(env), abiFrom: "LIBTORCH_CXX11_ABI" };
  try {
    const text = new TextDecoder("latin1").decode(Deno.readFileSync(join(libDir, "libc10.so")));
    const sym = "_ZN3c106detail14torchCheckFailEPKcS2_jRK"; // takes a const std::string&
    if (text.includes(sym + "NSt7__cxx11")) return { cxx11Abi: 1, abiFrom: "libc10.so" };
    if (text.includes(sym + "Ss")) return { cxx11Abi: 0, abiFrom: "libc10.so" };
  } catch { /* fall back to the default */ }
  return { cxx11Abi: 1, abiFrom: "default" };
}

function fromDirs(source: Source, includeDir: string, libDir: string, torchDir?: string): Torch {
  const torchVersion = headerVersion(includeDir);
  return { source, includeDir, libDir, torchVersion, ...guessAbi(libDir), torchDir };
}

const PY = `import json, os, torch
print(json.dumps({"dir": os.path.dirname(torch.__file__), "version": torch.__version__,
  "abi": int(torch._C._GLIBCXX_USE_CXX11_ABI), "cuda": torch.version.cuda}))`;

async function discover(): Promise<Torch | null> {
  const env = Deno.env.get("LIBTORCH");
  if (env) {
    const problem = layoutProblem(join(env, "include"), join(env, "lib"));
    if (problem) {
      fail(
        `LIBTORCH=${env} is not a libtorch dir (${problem}).\n` +
          `  Point it at a dir with include/ and lib/ (the libtorch zip, or .../site-packages/torch), or unset it.`,
      );
    }
    return fromDirs("LIBTORCH", join(env, "include"), join(env, "lib"), env);
  }
  tried.push("$LIBTORCH: not set");

  for (const py of ["python3", "/usr/bin/python3"]) {
    const r = await run([py, "-c", PY]);
    if (!r.ok) {
      tried.push(`${py}: ${r.err.trim().split("\n").pop() || "failed"}`); // e.g. "No module named 'torch'"
      continue;
    }
    const t = JSON.parse(r.out.trim().split("\n").pop()!);
    const [includeDir, libDir] = [join(t.dir, "include"), join(t.dir, "lib")];
    // pip never installs into dist-packages: this is Debian's python3-torch, whose
    // include/ and lib/ are (possibly dangling) links into libtorch-dev's files.
    if (t.dir.startsWith("/usr/lib/python3/dist-packages/")) {
      tried.push(
        `${py}: Debian's python3-torch ${t.version}: its headers come from libtorch-dev (system, below)`,
      );
      continue;
    }
    const problem = layoutProblem(includeDir, libDir);
    if (problem) {
      tried.push(`${py}: torch ${t.version} at ${t.dir}: ${problem}`);
      continue;
    }
    const abi = { cxx11Abi: t.abi, abiFrom: "python" };
    return {
      source: "python",
      includeDir,
      libDir,
      torchVersion: t.version,
      ...abi,
      torchDir: t.dir,
      pythonCuda: t.cuda,
    };
  }

  const ma = (await run(["gcc", "-print-multiarch"])).out.trim() || "x86_64-linux-gnu";
  const [inc, lib] = ["/usr/include", `/usr/lib/${ma}`];
  const problem = layoutProblem(inc, lib);
  if (!problem) return fromDirs("system", inc, lib);
  tried.push(`system (${inc}, ${lib}): ${problem}`);
  return null;
}

// CUDA runtime headers, needed by the shim's c10/cuda includes (memory stats).
// cuda_runtime_api.h includes crt/host_defines.h, which pip's
// nvidia-cuda-runtime-cu12 lacks (nvidia-cuda-nvcc-cu12 has it): require both,
// else build without CUDA stats rather than fail.
function cudaIncludes(t: Torch): string[] {
  if (!exists(join(t.libDir, "libc10_cuda.so"))) return []; // a CPU-only libtorch
  const home = Deno.env.get("CUDA_HOME");
  const sets = [home ? [join(home, "include")] : [], ["/usr/local/cuda/include"]];
  if (t.torchDir) { // pip's nvidia-* wheels sit next to torch in site-packages
    const nv = join(dirname(t.torchDir), "nvidia");
    sets.push([join(nv, "cuda_runtime/include"), join(nv, "cuda_nvcc/include")]);
    // CUDA 13 wheels put the runtime in nvidia/cu13; crt/ then comes with nvcc's wheel or triton's copy.
    const cu13 = join(nv, "cu13/include");
    sets.push([cu13, join(nv, "cuda_nvcc/include")], [
      cu13,
      join(dirname(t.torchDir), "triton/backends/nvidia/include"),
    ]);
  }
  for (const dirs of sets) {
    const has = (f: string) => dirs.some((d) => exists(join(d, f)));
    if (has("cuda_runtime_api.h") && has("crt/host_defines.h")) return dirs.filter(exists);
  }
  return [];
}

// The c10d backends the shim's dist.cpp can use, with the flags that enable
// them. Gloo's c10d header includes gloo's own headers, which libtorch does
// not always ship (Debian puts them in libgloo-dev); NCCL's needs nccl.h and
// a CUDA build.
function distFlags(t: Torch, cudaInc: string[]): { flags: string[]; backends: string[]; missing: string[] } {
  const c10d = join(t.includeDir, "torch/csrc/distributed/c10d");
  const flags: string[] = [], backends: string[] = [], missing: string[] = [];
  const env = Deno.env.get("GLOO_INCLUDE"); // a folder holding gloo/ (e.g. unpacked from libgloo-dev)
  const glooDirs = [...(env ? [env] : []), t.includeDir, "/usr/include", "/usr/local/include"];
  const gloo = glooDirs.find((d) => exists(join(d, "gloo/algorithm.h")));
  if (!exists(join(c10d, "ProcessGroupGloo.hpp"))) {
    missing.push(`gloo: no ${join(c10d, "ProcessGroupGloo.hpp")}`);
  } else if (!gloo) {
    missing.push("gloo: gloo's headers not found (Debian/Ubuntu: apt-get install libgloo-dev)");
  } else {
    flags.push("-DUSE_C10D_GLOO", "-DMOERL_WITH_GLOO", `-I${gloo}`);
    backends.push("gloo");
  }
  // The headers of the NCCL torch loads (pip's nvidia-nccl wheel beside torch) before a system copy, whose
  // version may differ: ProcessGroupNCCL.hpp's layout follows NCCL's version.
  const ncclDirs = [
    ...(t.torchDir ? [join(dirname(t.torchDir), "nvidia/nccl/include")] : []),
    ...cudaInc,
    "/usr/include",
    "/usr/local/cuda/include",
  ];
  const nccl = ncclDirs.find((d) => exists(join(d, "nccl.h")));
  if (!cudaInc.length) missing.push("nccl: no CUDA libtorch with CUDA headers");
  else if (!exists(join(c10d, "ProcessGroupNCCL.hpp"))) {
    missing.push(`nccl: no ${join(c10d, "ProcessGroupNCCL.hpp")}`);
  } else if (!nccl) {
    missing.push("nccl: nccl.h not found (pip install nvidia-nccl-cu12, or the NCCL dev package)");
  } else {
    flags.push("-DUSE_C10D_NCCL", "-DMOERL_WITH_NCCL", `-I${nccl}`);
    backends.push("nccl");
  }
  return { flags, backends, missing };
}

// ---------------------------------------------------------------------------
const torch = await discover();
if (!torch) {
  fail(
    `libtorch not found. Looked in:\n${tried.map((s) => `  - ${s}\n`).join("")}` +
      `Fix one of:\n` +
      `  - Debian/Ubuntu: sudo apt-get install libtorch-dev\n` +
      `  - pip install torch          (then python3 -c 'import torch' must work)\n` +
      `  - export LIBTORCH=/path/to/libtorch   (a dir with include/ and lib/)`,
  );
}
const cudaInc = cudaIncludes(torch);
// Linking the CUDA libs with --no-as-needed keeps them as dependencies even
// though the shim calls nothing in them directly: loading them is what
// registers the CUDA kernels (tch-rs#177).
const cudaLibs = ["libtorch_cuda.so", "libc10_cuda.so"].every((so) => exists(join(torch.libDir, so)));
const dist = distFlags(torch, cudaInc);

if (PRINT) {
  console.log(JSON.stringify({ ...torch, cudaLibs, cudaIncludes: cudaInc, dist, tried }, null, 2));
  Deno.exit(0);
}

const sources = [...Deno.readDirSync(SHIM)]
  .filter((e) => e.isFile && /\.(cpp|h)$/.test(e.name))
  .map((e) => e.name)
  .sort();
const cpps = sources.filter((n) => n.endsWith(".cpp")).map((n) => join(SHIM, n));
if (cpps.length === 0) fail(`no C++ sources in ${SHIM}`);

const cxx = (Deno.env.get("CXX") || "g++").split(/\s+/).filter(Boolean); // allows "ccache g++"
// -D_GLIBCXX_USE_CXX11_ABI must match libtorch's std::string ABI.
// The C++ standard libtorch's headers ask for: recent 2.x releases refuse anything before C++20.
function cxxStandard(t: Torch): string {
  try {
    const all = Deno.readTextFileSync(join(t.includeDir, "torch/csrc/api/include/torch/all.h"));
    if (all.includes("C++20 or later")) return "-std=c++20";
  } catch { /* an older layout: C++17 */ }
  return "-std=c++17";
}
const flags = [cxxStandard(torch), "-O2", "-fPIC", "-shared", `-D_GLIBCXX_USE_CXX11_ABI=${torch.cxx11Abi}`];
if (cudaInc.length) flags.push("-DMOERL_WITH_CUDA", ...cudaInc.map((d) => `-I${d}`));
flags.push(...dist.flags);
flags.push(`-I${torch.includeDir}`, `-I${join(torch.includeDir, "torch/csrc/api/include")}`);
// The rpath lets the lib find libtorch at load without LD_LIBRARY_PATH.
const libs = [`-L${torch.libDir}`, `-Wl,-rpath,${torch.libDir}`];
libs.push("-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10");
if (cudaLibs) libs.push("-ltorch_cuda", "-lc10_cuda");
libs.push("-Wl,--as-needed");

// The cache key covers everything that changes the output.
const hash = createHash("sha256");
for (const name of sources) hash.update(`${name}\0`).update(Deno.readFileSync(join(SHIM, name))).update("\0");
hash.update(JSON.stringify([torch.torchVersion, torch.libDir, torch.cxx11Abi, cxx, flags, libs]));
const key = hash.digest("hex").slice(0, 16);
const lib = join(OUT, `libmoerl-${key}.so`);
const rel = relative(Deno.cwd(), lib);
Deno.mkdirSync(OUT, { recursive: true });

if (exists(lib) && !FORCE) {
  console.log(`${rel} is up to date (libtorch ${torch.torchVersion}, ${torch.source})`);
} else {
  console.log(
    `building ${rel} against libtorch ${torch.torchVersion} (${torch.source}: ${torch.libDir}, ` +
      `cxx11 abi ${torch.cxx11Abi}, cuda ${cudaInc.length ? "on" : "off"}, ` +
      `c10d backends: ${dist.backends.join(", ") || "none"})`,
  );
  for (const m of dist.missing) console.log(`  without ${m}`);
  // Each source compiles on its own core (libtorch's headers make every one slow), then one link. Objects and
  // the library get temp names, renamed at the end: an interrupted build leaves no half lib.
  const tmp = join(OUT, `.libmoerl-${key}.${Deno.pid}.tmp.so`);
  const objDir = join(OUT, `.obj-${key}.${Deno.pid}`);
  Deno.mkdirSync(objDir, { recursive: true });
  let failed: string | null = null;
  try {
    const compile = flags.filter((f) => f !== "-shared");
    const objects = cpps.map((cpp) => join(objDir, `${basename(cpp, ".cpp")}.o`));
    const jobs = cpps.map((cpp, i) => [...cxx, ...compile, "-c", cpp, "-o", objects[i]!]);
    for (const [i, r] of (await runAll(jobs, navigator.hardwareConcurrency)).entries()) {
      if (r.err.trim()) console.error(r.err.trimEnd()); // errors, or warnings
      if (!r.ok) failed ??= `the compiler failed: ${jobs[i]!.join(" ")}`;
    }
    if (!failed) {
      const link = [...cxx, "-shared", ...objects, "-o", tmp, ...libs]; // libs after objects, for --as-needed
      const r = await run(link);
      if (r.err.trim()) console.error(r.err.trimEnd());
      if (!r.ok) failed = `the linker failed: ${link.join(" ")}`;
    }
  } finally {
    Deno.removeSync(objDir, { recursive: true });
  }
  if (failed) {
    await Deno.remove(tmp).catch(() => {});
    fail(failed);
  }
  Deno.renameSync(tmp, lib);
  console.log(`built ${rel}`);
}

// Written every time (also when up to date): it may point at another build.
const { torchVersion, source, libDir, includeDir, cxx11Abi } = torch;
const current = {
  lib,
  key,
  torchVersion,
  source,
  libDir,
  includeDir,
  cxx11Abi,
  cuda: cudaInc.length > 0,
  distBackends: dist.backends,
};
const tmpJson = join(OUT, `.current.${Deno.pid}.tmp.json`);
Deno.writeTextFileSync(tmpJson, JSON.stringify(current, null, 2) + "\n");
Deno.renameSync(tmpJson, join(OUT, "current.json"));
