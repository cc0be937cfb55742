/**
 * `deno task bench:head`: the LM head of a no-grad pass, with and without the entropy, in one run:
 *
 *   deno task bench:head --device cuda --dtype bfloat16 --tokens 8192        # Huihui's head: 1024 × 151,936
 *   deno task bench:head --device cpu --dtype float32 --tokens 256 --runs 5
 *
 * The reference and old-policy passes of an update read the completion tokens' log-probs only; they call
 * tokenLogprobs, which skips the [chunk, vocab] exp and product that tokenStats spends on the entropy. Both
 * run on the same random states and head, chunk by chunk as rl/policy.ts runs them (--chunk, default
 * DEFAULT_HEAD_CHUNK), alternating round by round (--runs rounds, medians); prints each one's seconds and
 * the ratio logprobs-only / with-entropy, and checks that the two give the same log-probs.
 */
import { benchArgs } from "./cli.ts";
import {
  cuda,
  type Device,
  type DType,
  manualSeed,
  noGrad,
  randn,
  tensor,
  tidy,
  tokenLogprobs,
  tokenStats,
} from "../ffi/mod.ts";
import { DEFAULT_HEAD_CHUNK } from "../rl/policy.ts";

const a = benchArgs(
  "deno task bench:head",
  "The LM head's log-probs with and without the entropy (see bench/head.ts).",
  {
    device: { type: "string", default: "cpu" },
    dtype: { type: "string", default: "float32" },
    tokens: { type: "string", default: "512" },
    hidden: { type: "string", default: "1024" },
    vocab: { type: "string", default: "151936" },
    chunk: { type: "string", default: String(DEFAULT_HEAD_CHUNK) },
    runs: { type: "string", default: "5" },
  },
);
const device = a.device as Device, dtype = a.dtype as DType;
const [n, h, v, chunk, runs] = [a.tokens, a.hidden, a.vocab, a.chunk, a.runs].map(Number) as number[] as [
  number,
  number,
  number,
  number,
  number,
];
for (const [name, x] of Object.entries({ tokens: n, hidden: h, vocab: v, chunk, runs })) {
  if (!Number.isInteger(x) || x < 1) {
    console.error(`bench:head: --${name} must be a whole number ≥ 1, got ${a[name as keyof typeof a]}`);
    Deno.exit(2);
  }
}
const onGpu = device.startsWith("cuda");
const sync = (): void => onGpu ? cuda.synchronize(device) : undefined;

manualSeed(0);
using states = tidy(() => randn([n, h], { dtype: "float32", device }).to(dtype));
using weight = tidy(() => randn([v, h], { dtype: "float32", device }).mul(0.02).to(dtype));
using targets = tensor(Array.from({ length: n }, (_, i) => (i * 7919) % v), { dtype: "int64", device });

const ways = {
  "with entropy": () => tokenStats(states, weight, null, targets, 1, chunk).logprobs,
  "log-probs only": () => tokenLogprobs(states, weight, null, targets, 1, chunk),
} as const;
type Way = keyof typeof ways;

function time(way: Way): number {
  sync();
  const start = performance.now();
  noGrad(() => tidy(() => void ways[way]()));
  sync();
  return (performance.now() - start) / 1000;
}

const same = noGrad(() =>
  tidy(() => ways["with entropy"]().sub(ways["log-probs only"]()).abs().amax().item() === 0)
);
if (!same) {
  console.error("bench:head: the two ways gave different log-probs");
  Deno.exit(1);
}
const seconds = new Map<Way, number[]>([["with entropy", []], ["log-probs only", []]]);
for (const way of seconds.keys()) time(way); // warm-up
for (let r = 0; r < runs; r++) for (const [way, xs] of seconds) xs.push(time(way));
const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;

console.log(
  `LM head ${h} × ${v}, ${n} tokens in chunks of ${chunk}, ${dtype} on ${device}, no grad (medians of ${runs} rounds)`,
);
for (const [way, xs] of seconds) console.log(`  ${way.padEnd(15)} ${median(xs).toFixed(4)} s`);
const ratio = median(seconds.get("log-probs only")!) / median(seconds.get("with entropy")!);
console.log(`  log-probs only / with entropy: ${ratio.toFixed(2)}× (the same log-probs, bit for bit)`);
