/**
 * The c10d process group (ffi/dist.ts) across real processes on loopback
 * with Gloo: every collective's result, and that a rank that dies or never
 * comes makes the others fail with a message within the timeout, not hang.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { distBackends, ProcessGroup } from "../ffi/mod.ts";
import { freePort } from "../train/spawn.ts";

const WORKER = fileURLToPath(new URL("./dist_worker.ts", import.meta.url));
const hasGloo = distBackends().includes("gloo");

/** Launches ranks (all of a world of `world` by default) of the worker; their JSON lines by rank. */
async function launch(
  scenario: string,
  world: number,
  opts: { ranks?: number[]; timeoutMs?: number; args?: string[] } = {},
): Promise<{ code: number; json: Record<string, unknown> | null; stderr: string }[]> {
  const port = freePort();
  const ranks = opts.ranks ?? Array.from({ length: world }, (_, r) => r);
  const procs = ranks.map((rank) =>
    new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", WORKER, scenario, ...(opts.args ?? [])],
      env: {
        RANK: String(rank),
        WORLD_SIZE: String(world),
        MASTER_ADDR: "127.0.0.1",
        MASTER_PORT: String(port),
        MOERL_DIST_TIMEOUT_MS: String(opts.timeoutMs ?? 20000),
        OMP_NUM_THREADS: "1",
      },
      stdout: "piped",
      stderr: "piped",
    }).output()
  );
  const dec = new TextDecoder();
  return (await Promise.all(procs)).map((r) => {
    const line = dec.decode(r.stdout).trim().split("\n").pop() ?? "";
    let json: Record<string, unknown> | null = null;
    try {
      json = JSON.parse(line);
    } catch { /* reported below */ }
    return { code: r.code, json, stderr: dec.decode(r.stderr) };
  });
}

Deno.test({
  name: "dist: all-reduce, broadcast, all-gather and barrier across 3 processes (Gloo)",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const runs = await launch("collectives", 3);
    for (const [r, run] of runs.entries()) {
      assert.equal(run.code, 0, `rank ${r}: ${run.stderr}`);
      const j = run.json!;
      assert.equal(j.error, undefined, `rank ${r}: ${j.error}`);
      assert.deepEqual(j.sum, [6, -15]);
      assert.deepEqual(j.ints, [9, 21]);
      assert.deepEqual(j.avg, [2, -5]);
      assert.deepEqual(j.max, [3, -2.5]);
      assert.deepEqual(j.min, [1, -7.5]);
      assert.match(String(j.intAvg), /all_reduce: "avg" divides in place.*tensor 0 of 1 is int64/);
      assert.deepEqual(j.intAvgAfter, [r, 1], "an int64 tensor refused for avg keeps its values");
      assert.deepEqual(j.broadcast, [[2, 2.5]]);
      assert.equal(j.bumped, true, "a broadcast bumps the tensor's version, as an in-place op does");
      assert.deepEqual(j.gathered, [[0, 0], [1, 1], [2, 4]]);
    }
  },
});

Deno.test({
  name:
    "dist: a timeout longer than c10d's clock holds (10^13 ms, 2^63 ns is 9.2·10^12) is a long wait, not an instant failure",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const runs = await launch("collectives", 2, { timeoutMs: 1e13 });
    for (const [r, run] of runs.entries()) {
      assert.equal(run.code, 0, `rank ${r}: ${run.stderr}`);
      assert.equal(run.json!.error, undefined, `rank ${r}: ${run.json!.error}`);
      assert.deepEqual(run.json!.sum, [3, -7.5]);
    }
  },
});

Deno.test({
  name:
    "dist: Replicas sums gradients in flat buffers (a parameter no rank has a gradient for keeps none), gathers numbers and texts",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const runs = await launch("gradients", 2);
    for (const [r, run] of runs.entries()) {
      assert.equal(run.code, 0, `rank ${r}: ${run.stderr}`);
      const j = run.json!;
      assert.equal(j.error, undefined, `rank ${r}: ${j.error}`);
      assert.deepEqual(j.a, [1, 1, 1], "rank 0's gradient, zeros from rank 1");
      assert.equal(j.b, null);
      assert.deepEqual(j.c, [6, 12, 18], "2c + 4c");
      assert.deepEqual(j.d, [[30, 30]]);
      assert.deepEqual(j.gathered, [[0, 10], [1, 11]]);
      assert.deepEqual(j.summed, [2]);
      assert.deepEqual(j.texts, ["héllo, wörld", ""], "texts of different lengths, UTF-8");
    }
  },
});

Deno.test({
  name:
    "dist: every rank evaluates rank 0's choice of adapter (or fails with its error), chosen again when one rank finds it pruned",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const base = await Deno.makeTempDir();
    try {
      for (const r of [0, 1]) { // run-r holds checkpoint-10·(r+1)
        const ck = join(base, `run-${r}`, `checkpoint-${10 * (r + 1)}`);
        await Deno.mkdir(join(ck, "adapter"), { recursive: true });
        await Deno.writeTextFile(join(ck, "adapter", "adapter_config.json"), "{}");
        await Deno.writeTextFile(join(ck, "trainer_state.json"), "{}");
      }
      const runs = await launch("adapter", 2, { args: [base] });
      for (const [r, run] of runs.entries()) {
        assert.equal(run.code, 0, `rank ${r}: ${run.stderr}`);
        assert.equal(run.json!.error, undefined, `rank ${r}: ${run.json!.error}`);
        assert.equal(run.json!.dir, "run-0/checkpoint-20/adapter", `rank ${r}`);
        assert.deepEqual(
          run.json!.seen,
          ["run-0/checkpoint-10/adapter", "run-0/checkpoint-20/adapter"],
          `rank ${r}`,
        );
      }
      // Rank 0 finds nothing where rank 1 finds a checkpoint: every rank reports rank 0's error, none hangs.
      await Deno.remove(join(base, "run-0"), { recursive: true });
      for (const [r, run] of (await launch("adapter", 2, { args: [base], timeoutMs: 8000 })).entries()) {
        assert.match(
          String(run.json?.error),
          /run-0: does not exist; give an adapter folder/,
          `rank ${r}: ${run.stderr}`,
        );
      }
    } finally {
      await Deno.remove(base, { recursive: true });
    }
  },
});

Deno.test({
  name: "dist: a replacement advantages function refused on one rank fails every rank, none waits for it",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const [first, second] = await launch("advantages-refused", 2, { timeoutMs: 20000 });
    assert.match(
      String(second!.json?.error),
      /gave sequence \d+ \d+ advantages for its \d+ completion tokens/,
    );
    assert.match(String(first!.json?.error), /rank 1's advantages were refused/, first!.stderr);
    assert.ok(
      Number(first!.json!.seconds) < 15,
      `rank 0 failed after ${first!.json!.seconds} s, not at once`,
    );
  },
});

Deno.test({
  name: "dist: a rank that dies makes the others' next collective throw, naming it, within the timeout",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const timeoutMs = 8000;
    const [first, dead] = await launch("peer-dies", 2, { timeoutMs });
    assert.equal(dead!.code, 3);
    assert.equal(first!.code, 0, first!.stderr);
    const j = first!.json!;
    assert.match(String(j.error), /all_reduce.*all-reduce failed on rank 0 of 2: .*a peer may have exited/s);
    assert.ok((j.seconds as number) < timeoutMs / 1000 + 2, `took ${j.seconds} s`);
  },
});

Deno.test({
  name: "dist: a rank that never joins makes rendezvous fail after the timeout",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const timeoutMs = 2000;
    const [only] = await launch("collectives", 2, { ranks: [0], timeoutMs });
    const j = only!.json!;
    assert.match(String(j.error), /process group \(gloo, rank 0 of 2, 127\.0\.0\.1:\d+\)/);
    assert.ok(
      (j.seconds as number) >= timeoutMs / 1000 * 0.9,
      `failed after ${j.seconds} s, before the timeout`,
    );
    assert.ok((j.seconds as number) < timeoutMs / 1000 + 5, `took ${j.seconds} s`);
  },
});

Deno.test("dist: bad arguments and a backend not built in are clear errors", () => {
  const base = {
    backend: "gloo" as const,
    host: "127.0.0.1",
    port: freePort(),
    worldSize: 2,
    timeoutMs: 1000,
  };
  assert.throws(() => ProcessGroup.init({ ...base, rank: 2 }), /rank 2 is outside a world of 2/);
  assert.throws(() => ProcessGroup.init({ ...base, rank: 0, port: 70000 }), /port 70000 out of range/);
  if (!distBackends().includes("nccl")) {
    assert.throws(
      () => ProcessGroup.init({ ...base, backend: "nccl", rank: 0 }),
      /built without the NCCL backend: it needs a CUDA libtorch/,
    );
  }
});
