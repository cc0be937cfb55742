/**
 * `deno task bench:sampling`: one decode step's draw, from a generator against at seeded uniforms, in one run:
 *
 *   deno task bench:sampling --device cuda --rows 512               # the default update's batch, Huihui's vocab
 *   deno task bench:sampling --device cpu --rows 16 --top-p 0.9 --runs 5
 *
 * A generator draw is libtorch's multinomial; a seeded draw (generate's `sampleSeeds`, which collect and
 * evaluate use) finds each row's uniform number along its float64 cumulative distribution. Both take the same
 * float32 scores [rows, vocab] through temperature and top-p; each round times --steps steps of one, then of
 * the other (--runs rounds, medians); prints each one's milliseconds per step and the ratio seeded / generator.
 */
import { benchArgs } from "./cli.ts";
import { cuda, type Device, fromTypedArray, Generator, manualSeed, noGrad, randn, tidy } from "../ffi/mod.ts";
import { streamUniform } from "../model/random.ts";
import { drawNext, type SamplingOptions } from "../model/sampling.ts";

const a = benchArgs(
  "deno task bench:sampling",
  "A decode step's draw from a generator and at seeded uniforms (see bench/sampling.ts).",
  {
    device: { type: "string", default: "cpu" },
    rows: { type: "string", default: "64" },
    vocab: { type: "string", default: "151936" },
    temperature: { type: "string", default: "1" },
    "top-p": { type: "string", default: "1" },
    steps: { type: "string", default: "10" },
    runs: { type: "string", default: "5" },
  },
);
const device = a.device as Device;
const [rows, vocab, steps, runs] = [a.rows, a.vocab, a.steps, a.runs].map(Number) as [
  number,
  number,
  number,
  number,
];
for (const [name, x] of Object.entries({ rows, vocab, steps, runs })) {
  if (!Number.isInteger(x) || x < 1) {
    console.error(`bench:sampling: --${name} must be a whole number ≥ 1, got ${x}`);
    Deno.exit(2);
  }
}
const opts: SamplingOptions = {
  doSample: true,
  temperature: Number(a.temperature),
  topP: Number(a["top-p"]),
};
const onGpu = device.startsWith("cuda");
const sync = (): void => onGpu ? cuda.synchronize(device) : undefined;

manualSeed(0);
using scores = randn([rows, vocab], { dtype: "float32", device });
using generator = new Generator(1, device);
const table = new Float64Array(rows * steps);
table.forEach((_, i) => (table[i] = streamUniform(Math.floor(i / steps), i % steps)));
using uniforms = fromTypedArray(table, [rows, steps], { device });

const ways = {
  generator: () => drawNext(scores, opts, generator),
  seeded: (step: number) => drawNext(scores, opts, undefined, uniforms.narrow(1, step, 1)),
} as const;
type Way = keyof typeof ways;

function time(way: Way): number {
  sync();
  const start = performance.now();
  for (let step = 0; step < steps; step++) noGrad(() => tidy(() => void ways[way](step)));
  sync();
  return (performance.now() - start) / steps;
}

const ms = new Map<Way, number[]>([["generator", []], ["seeded", []]]);
for (const way of ms.keys()) time(way); // warm-up
for (let r = 0; r < runs; r++) for (const [way, xs] of ms) xs.push(time(way));
const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;

console.log(
  `one draw from [${rows}, ${vocab}] float32 scores, temperature ${opts.temperature}, top-p ${opts.topP}, on ${device} ` +
    `(medians of ${runs} rounds × ${steps} steps)`,
);
for (const [way, xs] of ms) console.log(`  ${way.padEnd(9)} ${median(xs).toFixed(3)} ms per step`);
const ratio = median(ms.get("seeded")!) / median(ms.get("generator")!);
console.log(`  seeded / generator: ${ratio.toFixed(2)}×`);
