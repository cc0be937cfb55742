/**
 * The host allocator setting of ffi/lib.ts (`tuneHostAllocator`: glibc keeps freed blocks instead of
 * returning them to the kernel) against glibc's defaults, on a CPU training run, in one bench:
 *
 *   deno task bench:alloc [--config configs/tiny.yaml] [--updates 20] [--runs 3]
 *
 * Runs `deno task train` on the config as child processes, alternating `MOERL_MALLOC_TUNE=off` and the
 * default (--runs each, one libtorch thread, no evaluation), and prints each side's median seconds per
 * update, the whole run's seconds, and the ratios; the two runs' metrics (timings aside) must be identical.
 */
import { join } from "node:path";
import { benchArgs } from "./cli.ts";

const a = benchArgs(
  "deno task bench:alloc",
  "Training with the host allocator tuned against glibc's defaults (see bench/host_allocator.ts).",
  {
    config: { type: "string", default: "configs/tiny.yaml" },
    updates: { type: "string", default: "20" },
    runs: { type: "string", default: "3" },
  },
);
const root = join(import.meta.dirname!, "..");
const median = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;

/** One training run; its median update seconds, wall seconds and its metrics without the timings. */
async function run(tuned: boolean): Promise<{ update: number; wall: number; metrics: string }> {
  const dir = await Deno.makeTempDir({ prefix: "moerl_bench_alloc_" });
  try {
    const t0 = performance.now();
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "train/main.ts",
        "--config",
        a.config!,
        "--set",
        `output.dir=${dir}`,
        "--set",
        `train.updates=${a.updates}`,
        "--set",
        "eval.every=0",
      ],
      cwd: root,
      env: { OMP_NUM_THREADS: "1", MOERL_MALLOC_TUNE: tuned ? "on" : "off" },
      stdout: "null",
      stderr: "piped",
    }).output();
    const wall = (performance.now() - t0) / 1000;
    if (!out.success) throw new Error(`training failed:\n${new TextDecoder().decode(out.stderr)}`);
    const rows = (await Deno.readTextFile(join(dir, "metrics.jsonl"))).trim().split("\n").map((l) =>
      JSON.parse(l)
    );
    const metrics = JSON.stringify(
      rows.map((r) => Object.fromEntries(Object.entries(r).filter(([k]) => !/seconds|per_second/.test(k)))),
    );
    return { update: median(rows.map((r) => r.update_seconds as number)), wall, metrics };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const sides = {
  glibc: [] as Awaited<ReturnType<typeof run>>[],
  tuned: [] as Awaited<ReturnType<typeof run>>[],
};
for (let i = 0; i < Number(a.runs); i++) {
  sides.glibc.push(await run(false));
  sides.tuned.push(await run(true));
}
if (new Set([...sides.glibc, ...sides.tuned].map((r) => r.metrics)).size !== 1) {
  throw new Error("the runs' metrics differ: the allocator setting changed a result");
}
const base = {
  update: median(sides.glibc.map((r) => r.update)),
  wall: median(sides.glibc.map((r) => r.wall)),
};
console.log(`${a.config}, ${a.updates} updates, ${a.runs} runs each (medians), metrics identical`);
for (const [name, rs] of Object.entries(sides)) {
  const update = median(rs.map((r) => r.update)), wall = median(rs.map((r) => r.wall));
  console.log(
    `${name.padEnd(6)} ${update.toFixed(3)} s/update (×${(update / base.update).toFixed(2)})  ` +
      `${wall.toFixed(1)} s run (×${(wall / base.wall).toFixed(2)})`,
  );
}
