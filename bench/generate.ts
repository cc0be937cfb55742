/**
 * `deno task bench:generate`: new tokens/s of our batched greedy generation
 * against transformers' `model.generate` on the same small Qwen3-MoE, on the
 * CPU, as a ratio measured in one run.
 *
 * bench/generate.py builds a random Qwen3MoeForCausalLM from CFG.model (HF
 * config keys), saves it with save_pretrained into a temp folder, and times
 * `generate` on CFG's prompts (left-padded, greedy, no EOS, so every row makes
 * exactly CFG.newTokens tokens). We then load that folder with loadModel (the
 * same weights) and time our generate() with both MoE dispatch modes. Each
 * side: 1 warm-up run, then CFG.runs timed runs, median; the two processes run
 * one after the other, never at the same time.
 *
 * Threads: left alone, the two libtorches pick different intra-op counts
 * here (Debian's 1.13 takes physical cores, 1 on this 2-vCPU box; PyPI's
 * torch 2.x with MKL takes all logical CPUs). So unless OMP_NUM_THREADS is
 * already set, we set it to the logical CPU count before our libtorch loads
 * (lazily, at the first op); the Python child inherits it. Both counts, as
 * each libtorch reports them, are printed in the header.
 *
 * Env: MOERL_BENCH_PYTHON picks the python (default python3); it needs torch
 * and transformers v5 (scripts/requirements-fixtures.txt).
 */
import { benchArgs } from "./cli.ts";
import { generate } from "../model/generate.ts";
import { loadModel } from "../model/model.ts";
import { torchVersion } from "../ffi/mod.ts";
import { runPythonJson } from "./python.ts";
import { readShapes, SMALL_SHAPES } from "./shapes.ts";

benchArgs(
  "deno task bench:generate",
  "Generation speed of moerl against transformers on a small model (see bench/generate.ts).",
  {},
);

const CFG = {
  seed: 1234,
  model: await readShapes(SMALL_SHAPES),
  initStd: 0.1, // weights ~ N(0, initStd): decisive logits and routing (see generate.py)
  padTokenId: 0,
  batch: 8,
  promptLen: [16, 32], // min, max
  newTokens: 64,
  runs: 3,
};
const PYTHON = Deno.env.get("MOERL_BENCH_PYTHON") ?? "python3";
if (!Deno.env.get("OMP_NUM_THREADS")) Deno.env.set("OMP_NUM_THREADS", String(navigator.hardwareConcurrency));
// The venv goes outside the repo, as scripts/requirements-fixtures.txt asks (deno fmt/lint and tests walk the tree).
const INSTALL_HINT = "Get one with:\n" +
  "  python3 -m venv ../moerl-venv && ../moerl-venv/bin/pip install -r scripts/requirements-fixtures.txt\n" +
  "  MOERL_BENCH_PYTHON=../moerl-venv/bin/python deno task bench:generate";

/** Prompts of random ids in [1, vocab) (never the pad id), lengths spread over promptLen, from a seeded PRNG. */
function makePrompts(): number[][] {
  let s = CFG.seed;
  const rand = (): number => { // mulberry32
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  const [lo, hi] = CFG.promptLen as [number, number];
  return Array.from({ length: CFG.batch }, (_, i) => {
    const len = lo + Math.round((i * (hi - lo)) / (CFG.batch - 1));
    return Array.from({ length: len }, () => 1 + Math.floor(rand() * ((CFG.model.vocab_size as number) - 1)));
  });
}

interface Run {
  name: string;
  seconds: number;
  tokensPerS: number;
  spread: number; // (max - min) / median of the timed runs
  ids: number[][];
}
interface PyResult {
  torch: string;
  transformers: string;
  python: string;
  threads: number;
  attn: string;
  runs: { experts: string; seconds: number; tokens_per_s: number; spread: number; ids: number[][] }[];
}

/** Runs bench/generate.py (which also writes the model into dir); returns its result, or why it could not. */
async function runPython(dir: string, prompts: number[][]): Promise<PyResult | string> {
  return await runPythonJson<PyResult>(PYTHON, "generate.py", { ...CFG, dir, prompts });
}

/** at::get_num_threads() of the libtorch this process loaded (by its mangled name; dlopen of a loaded lib is a lookup). */
function ourThreads(): number | string {
  const lib = Deno.readTextFileSync("/proc/self/maps").split("\n")
    .find((l) => l.includes("libtorch_cpu"))?.trim().split(/\s+/).at(-1);
  try {
    const sym = { nt: { name: "_ZN2at15get_num_threadsEv", parameters: [], result: "i32" } } as const;
    const dl = Deno.dlopen(lib!, sym);
    const n = dl.symbols.nt();
    dl.close();
    return n;
  } catch {
    return "?";
  }
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

// ---- transformers: make the model, time its generate ---------------------------------------
const prompts = makePrompts();
const dir = await Deno.makeTempDir({ prefix: "moerl-bench-generate-" });
try {
  const py = await runPython(dir, prompts);
  if (typeof py === "string") {
    console.error(`bench:generate needs Python with torch and transformers v5: ${py}\n${INSTALL_HINT}`);
    await Deno.remove(dir, { recursive: true }); // Deno.exit skips the finally below
    Deno.exit(1);
  }

  // ---- ours: same weights, same prompts ------------------------------------------------------
  using model = await loadModel(dir, { dtype: "float32", device: "cpu" });
  const ours: Run[] = [];
  for (const dispatch of ["loop", "dense"] as const) {
    const opts = { maxNewTokens: CFG.newTokens, padTokenId: CFG.padTokenId, dispatch };
    const gen = async (): Promise<number[][]> => (await generate(model.decoder, prompts, opts)).tokens;
    await gen(); // warm-up
    const times: number[] = [];
    let ids: number[][] = [];
    for (let r = 0; r < CFG.runs; r++) {
      const t0 = performance.now();
      ids = await gen();
      times.push((performance.now() - t0) / 1e3);
    }
    const seconds = median(times), n = ids.flat().length;
    const spread = (Math.max(...times) - Math.min(...times)) / seconds;
    ours.push({ name: `moerl, ${dispatch} dispatch`, seconds, tokensPerS: n / seconds, spread, ids });
  }

  // ---- report ----------------------------------------------------------------------------------
  const theirs: Run[] = py.runs.map((r) => ({
    name: `transformers, ${r.experts} experts${r === py.runs[0] ? " (default)" : ""}`,
    seconds: r.seconds,
    tokensPerS: r.tokens_per_s,
    spread: r.spread,
    ids: r.ids,
  }));
  const ref = theirs[0]!;
  const m = CFG.model, [lo, hi] = CFG.promptLen;
  console.log([
    `model : qwen3_moe, hidden ${m.hidden_size}, ${m.num_hidden_layers} layers, ${m.num_experts} experts ` +
    `top-${m.num_experts_per_tok}, moe_intermediate ${m.moe_intermediate_size}, vocab ${m.vocab_size}, float32, CPU`,
    `batch : ${CFG.batch} prompts of ${lo}..${hi} tokens (left-padded), greedy, ${CFG.newTokens} new tokens each; ` +
    `median of ${CFG.runs} runs after 1 warm-up`,
    `moerl : libtorch ${torchVersion()}, intra-op threads ${ourThreads()}, Deno ${Deno.version.deno}`,
    `HF    : torch ${py.torch}, transformers ${py.transformers}, intra-op threads ${py.threads}, ` +
    `attn ${py.attn}, Python ${py.python}\n`,
  ].join("\n"));
  const row = (a: string, ...c: string[]): string => a.padEnd(44) + c.map((x) => x.padStart(10)).join(" ");
  console.log(row("implementation", "seconds", "tokens/s", "ratio", "noise"));
  for (const r of [...theirs, ...ours]) {
    const ratio = (r.tokensPerS / ref.tokensPerS).toFixed(2);
    console.log(
      row(r.name, r.seconds.toFixed(3), r.tokensPerS.toFixed(1), ratio, `${Math.round(100 * r.spread)}%`),
    );
  }
  console.log(
    "ratio = tokens/s ÷ the first row's (above 1: faster than transformers' default)\n" +
      "noise = (max - min) / median of the timed runs: more than ~10% means the machine was busy; rerun\n",
  );
  for (const r of [...theirs.slice(1), ...ours]) {
    const same = r.ids.filter((row, i) => JSON.stringify(row) === JSON.stringify(ref.ids[i])).length;
    const yes = same === CFG.batch ? "yes" : "no";
    console.log(`tokens identical to the first row's, ${r.name}: ${yes} (${same} of ${CFG.batch} rows)`);
  }
} finally {
  await Deno.remove(dir, { recursive: true });
}
