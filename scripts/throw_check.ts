/**
 * Reproduction for "the device crash": a GPU run segfaulted where libtorch
 * throws, after moerl had loaded the Hugging Face Hub client and the
 * `tokenizers` native addon. This script loads both (offline: no download),
 * then makes libtorch throw many times in every way we know (shape and dtype
 * mismatches, out-of-range indices inside and outside parallel regions,
 * autograd errors, devices that do not exist; on CUDA also cross-device ops
 * and an allocation too large for the GPU), and checks that every one arrives
 * as a TorchError and that ops keep working. It prints one JSON line and exits
 * 0; a crash shows as a signal in its exit status (tests/throw_check_test.ts
 * runs it as a child process for that reason).
 *
 *   deno run -A scripts/throw_check.ts [--order modules-first|torch-first|torch-only] [--rounds N]
 *
 * MOERL_TEST_DEVICE=cuda adds the CUDA cases; MOERL_LIB picks the libtorch build.
 * Findings: docs/shim-and-memory.md, "Native neighbours".
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  type Device,
  embedding,
  sdpa,
  sdpaAvailable,
  tensor,
  tidy,
  TorchError,
  torchVersion,
  zeros,
} from "../ffi/mod.ts";

const { values: a } = parseArgs({
  options: {
    order: { type: "string", default: "modules-first" },
    rounds: { type: "string", default: "20" },
  },
});
const ORDERS = ["modules-first", "torch-first", "torch-only"];
if (!ORDERS.includes(a.order!)) {
  throw new Error(`--order: expected one of ${ORDERS.join(", ")}, got ${a.order}`);
}
const DEVICE = (Deno.env.get("MOERL_TEST_DEVICE") ?? "cpu") as Device;
const FIXTURE = join(import.meta.dirname!, "..", "tests", "fixtures", "models", "qwen3-moe-tiny");

/** Loads and uses the Hub client and the tokenizers addon, offline; returns a check to rerun between errors. */
async function loadModules(): Promise<() => Promise<void>> {
  const hub = await import("@huggingface/hub");
  const cache = await Deno.makeTempDir({ prefix: "moerl-throw-check-" });
  try {
    await hub.scanCacheDir(cache); // an empty cache: files read, nothing fetched
  } finally {
    await Deno.remove(cache, { recursive: true });
  }
  const digest = hub.__internal_sha256(new Blob(["moerl"]));
  let r = await digest.next();
  while (!r.done) r = await digest.next();
  if (typeof r.value !== "string" || r.value.length !== 64) throw new Error("hub sha256 gave no digest");
  const { Tokenizer } = await import("../model/tokenizer.ts");
  const tok = await Tokenizer.load(FIXTURE); // the tokenizers addon loads here
  const ids = await tok.encode("What is 12 * 7? #### 84");
  return async () => {
    const again = await tok.encode("What is 12 * 7? #### 84");
    if (again.join() !== ids.join()) throw new Error("the tokenizer changed its output");
  };
}

/** The library still computes: 1·1 + 2·3 … */
function opWorks(): void {
  const v = tidy(() => {
    const x = tensor([[1, 2], [3, 4]], { device: DEVICE });
    return x.matmul(x).sum().item();
  });
  if (v !== 54) throw new Error(`matmul after an error gave ${v}, not 54`);
}

/** Each case must throw a TorchError whose message matches. */
const cases: [string, RegExp, () => unknown][] = [
  [
    "shape mismatch (matmul)",
    /shapes cannot be multiplied/,
    () => tidy(() => zeros([2, 3], { device: DEVICE }).matmul(zeros([4, 5], { device: DEVICE }))),
  ],
  [
    "broadcast mismatch (add)",
    /size of tensor a \(3\) must match/,
    () => tidy(() => zeros([3], { device: DEVICE }).add(zeros([4], { device: DEVICE }))),
  ],
  [
    "bad dtype (float index)",
    /Long|Int|indices|index/i,
    () => tidy(() => embedding(zeros([4, 2], { device: DEVICE }), zeros([3], { device: DEVICE }))),
  ],
  [
    "bad dtype (matmul float × int64)",
    /dtype|same|expected/i,
    () =>
      tidy(() => zeros([2, 2], { device: DEVICE }).matmul(zeros([2, 2], { dtype: "int64", device: DEVICE }))),
  ],
  [
    "wrong numel (reshape)",
    /invalid for input of size/,
    () => tidy(() => zeros([6], { device: DEVICE }).reshape([4, 2])),
  ],
  // Index checks run on the CPU: on CUDA an out-of-range index is a device-side assert that ends the context.
  [
    "out-of-range index (index_select)",
    /out of range|index/i,
    () => tidy(() => zeros([3, 2]).indexSelect(0, tensor([0, 10], { dtype: "int64" }))),
  ],
  ["out-of-range index in a parallel loop", /out of range|index/i, () =>
    tidy(() => {
      const idx = Array.from({ length: 200_000 }, (_, i) => (i === 150_000 ? 99 : i % 3));
      return zeros([3, 64]).indexSelect(0, tensor(idx, { dtype: "int64" }));
    })],
  [
    "out-of-range index (gather)",
    /out of bounds|index/i,
    () => tidy(() => zeros([2, 3]).gather(1, tensor([[0, 7]], { dtype: "int64" }))),
  ],
  [
    "invalid probabilities (multinomial)",
    /probability|invalid|negative/i,
    () => tidy(() => tensor([0.5, -1, 0.2]).multinomial(1)),
  ],
  [
    "backward without grad",
    /does not require grad/,
    () => tidy(() => zeros([2], { device: DEVICE }).sum().backward()),
  ],
  ["backward with a wrong-shape gradient", /[Mm]ismatch in shape|shape/, () =>
    tidy(() => {
      const w = zeros([3], { device: DEVICE }).setRequiresGrad();
      w.mul(2).backward(zeros([4], { device: DEVICE }));
    })],
  [
    "a CUDA device that does not exist",
    /CUDA is not available|does not exist/,
    () => tidy(() => zeros([2], { device: "cuda:97" })),
  ],
];
if (DEVICE.startsWith("cuda")) {
  cases.push(
    [
      "cross-device op (cpu + cuda)",
      /device/i,
      () => tidy(() => zeros([2]).add(zeros([2], { device: DEVICE }))),
    ],
    ["out of GPU memory", /out of memory|CUDA/i, () => tidy(() => zeros([2 ** 40], { device: DEVICE }))],
  );
}
if (sdpaAvailable()) {
  cases.push(["sdpa head mismatch", /query heads/, () =>
    tidy(() => {
      const q = zeros([1, 3, 4, 8], { device: DEVICE }), k = zeros([1, 2, 4, 8], { device: DEVICE });
      return sdpa(q, k, k, null);
    })]);
}

let rerunModules: (() => Promise<void>) | null = null;
if (a.order === "modules-first") rerunModules = await loadModules();
opWorks(); // libtorch loads here
if (a.order === "torch-first") rerunModules = await loadModules();

const counts = new Map<string, number>();
const samples = new Map<string, string>();
for (let round = 0; round < Number(a.rounds); round++) {
  for (const [name, pattern, fn] of cases) {
    let caught: unknown = null;
    try {
      fn();
    } catch (e) {
      caught = e;
    }
    if (!(caught instanceof TorchError)) {
      throw new Error(
        `${name}: expected a TorchError, got ${caught instanceof Error ? caught.stack : caught}`,
      );
    }
    if (!pattern.test(caught.message)) throw new Error(`${name}: unexpected message ${caught.message}`);
    if (/Exception raised from|frame #\d/.test(caught.message)) {
      throw new Error(`${name}: C++ backtrace in message`);
    }
    counts.set(name, (counts.get(name) ?? 0) + 1);
    samples.set(name, caught.message.slice(0, 120));
    opWorks();
  }
  await rerunModules?.();
}
console.log(JSON.stringify({
  alive: true,
  order: a.order,
  torch: torchVersion(),
  device: DEVICE,
  errors: [...counts.values()].reduce((s, n) => s + n, 0),
  cases: Object.fromEntries(counts),
  samples: Object.fromEntries(samples),
}));
