/**
 * Data-parallel training end to end through the CLI (`deno task train`),
 * over Gloo on loopback: 2 processes make the same updates as 1 process with
 * the same prompts per update; a rank that dies stops the other with an
 * error and leaves the run folder intact; --resume continues with the same
 * number of processes and refuses another.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { distBackends, tidyAsync } from "../ffi/mod.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { latestCheckpoint, readTrainerState } from "../train/checkpoint.ts";
import { readRecords } from "../train/metrics.ts";
import { freePort } from "../train/spawn.ts";

const ROOT = join(import.meta.dirname!, "..");
const MAIN = join(ROOT, "train", "main.ts");
const hasGloo = distBackends().includes("gloo");

/**
 * The tiny config with rewards that differ within groups: a hot sampler on a random model stops early
 * now and then, and the over-length penalty tells those completions apart.
 */
function settings(dir: string, updates: number, extra: string[] = []): string[] {
  return [
    "--config",
    join(ROOT, "configs", "tiny.yaml"),
    ...[
      `output.dir=${dir}`,
      `train.updates=${updates}`,
      "eval.every=0",
      "rollout.k=4",
      "rollout.temperature=2",
      "rollout.maxNewTokens=24",
      // A rank's share (2 prompts × 4) per generation batch in both runs: batches of one shape round the logits
      // alike on any build, so the hot sampler's draws cannot flip between the runs (docs/data-parallel.md).
      "rollout.generationBatch=8",
      ...extra,
    ].flatMap((s) => ["--set", s]),
  ];
}

const ENV = { OMP_NUM_THREADS: "1", MOERL_DIST_TIMEOUT_S: "30" };

async function trainCli(args: string[], env: Record<string, string> = {}): Promise<Deno.CommandOutput> {
  return await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    env: { ...ENV, ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
}

const text = (b: Uint8Array): string => new TextDecoder().decode(b);
const readJsonl = async (path: string): Promise<Record<string, unknown>[]> =>
  (await readRecords(path)).records;

/** Every tensor of a safetensors file, flattened. */
async function tensors(path: string): Promise<Map<string, number[]>> {
  using f = await SafetensorsFile.open(path);
  const out = new Map<string, number[]>();
  for (const name of f.names()) {
    out.set(name, await tidyAsync(async () => (await f.load(name, { dtype: "float32" })).toArray()));
  }
  return out;
}

Deno.test({
  name:
    "data parallel: 2 Gloo processes make the same 3 updates as 1 process (adapters, value head, metrics)",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const tmp = await Deno.makeTempDir({ prefix: "moerl_dp_" });
    try {
      // 4 prompts per update either way: 1 process × micro-batches of 4, or 2 ranks × micro-batches of 2.
      const one = join(tmp, "one"), two = join(tmp, "two");
      // The last update is evaluated too, on 3 problems (2 on rank 0, 1 on rank 1).
      const evaluate = ["eval.every=3", "eval.limit=3", "eval.batchSize=2", "eval.maxNewTokens=8"];
      const single = await trainCli(
        settings(one, 3, ["train.microBatch=4", "train.gradAccum=1", ...evaluate]),
      );
      assert.equal(single.code, 0, text(single.stderr));
      const dp = await trainCli([
        ...settings(two, 3, ["train.microBatch=2", "train.gradAccum=2", ...evaluate]),
        "--nproc",
        "2",
      ]);
      assert.equal(dp.code, 0, text(dp.stderr));
      assert.match(text(dp.stdout), /data parallel: 2 processes \(gloo\)/);
      // tiny.yaml evaluates on its training problems; rank 0 alone says so.
      assert.equal(
        text(dp.stderr).match(/evaluation reads the training problems/g)?.length,
        1,
        text(dp.stderr),
      );

      for (const file of ["adapter/adapter_model.safetensors", "value_head.safetensors"]) {
        const a = await tensors(join(one, "checkpoint-3", file));
        const b = await tensors(join(two, "checkpoint-3", file));
        assert.deepEqual([...b.keys()].sort(), [...a.keys()].sort());
        let diff = 0;
        for (const [name, x] of a) {
          const y = b.get(name)!;
          for (let i = 0; i < x.length; i++) diff = Math.max(diff, Math.abs(x[i]! - y[i]!));
        }
        assert.ok(diff <= 1e-5, `${file}: 1 and 2 processes differ by ${diff}`);
      }
      // The updates did move the adapters (LoRA B starts at zero), by far more than the tolerance.
      const b = await tensors(join(two, "checkpoint-3", "adapter/adapter_model.safetensors"));
      const moved = Math.max(
        ...[...b].filter(([n]) => n.includes("lora_B")).flatMap(([, v]) => v.map(Math.abs)),
      );
      assert.ok(moved > 1e-3, `the adapters hardly moved (max |B| ${moved})`);

      const m1 = await readJsonl(join(one, "metrics.jsonl")),
        m2 = await readJsonl(join(two, "metrics.jsonl"));
      assert.equal(m2.length, 3, "rank 0 alone writes the metrics, once per update");
      assert.ok(m2.some((r) => (r.trained_fraction as number) > 0), "some group had signal");
      for (const [i, r] of m2.entries()) {
        const keys = [
          "reward_mean",
          "accuracy",
          "trained_fraction",
          "tokens_generated",
          "value_loss",
          "loss",
        ];
        if (i === 2) keys.push("eval_accuracy_strict", "eval_accuracy_flexible");
        for (const key of keys) {
          const [x, y] = [m1[i]![key] as number, r[key] as number];
          assert.ok(
            Math.abs(x - y) <= 1e-5 * Math.max(1, Math.abs(x)),
            `update ${i + 1} ${key}: ${x} vs ${y}`,
          );
        }
      }
      const state = await readTrainerState(join(two, "checkpoint-3"));
      assert.equal(state.worldSize, 2);
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});

Deno.test({
  name: "data parallel: a rank that dies stops the other with an error; the run folder is intact and resumes",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const tmp = await Deno.makeTempDir({ prefix: "moerl_dp_kill_" });
    try {
      const dir = join(tmp, "run");
      const args = settings(dir, 40, ["output.checkpointEvery=1", "output.keepLast=2"]);
      const port = freePort();
      const ranks = [0, 1].map((rank) =>
        new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", MAIN, ...args],
          env: { ...ENV, RANK: `${rank}`, WORLD_SIZE: "2", MASTER_ADDR: "127.0.0.1", MASTER_PORT: `${port}` },
          stdout: "piped",
          stderr: "piped",
        }).spawn()
      );
      const outputs = ranks.map((r) => r.output());
      // Let a few updates land, then kill rank 1 as a crash would.
      const metrics = join(dir, "metrics.jsonl");
      for (let i = 0; i < 600 && (await readJsonl(metrics).catch(() => [])).length < 3; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      ranks[1]!.kill("SIGKILL");
      const t0 = performance.now();
      const [first] = await Promise.all(outputs);
      const seconds = (performance.now() - t0) / 1000;
      assert.notEqual(first!.code, 0, "rank 0 must fail when its peer dies");
      assert.ok(seconds < 30, `rank 0 took ${seconds} s to stop`);
      assert.match(
        text(first!.stderr),
        /train: .*failed on rank 0 of 2: .*a peer may have exited or stalled/s,
      );

      // Nothing written is damaged: every metrics line parses, and the latest checkpoint is complete.
      const lines = (await Deno.readTextFile(metrics)).trim().split("\n");
      assert.ok(lines.length >= 3 && lines.length < 40, `${lines.length} metrics lines`);
      for (const line of lines) JSON.parse(line);
      const latest = await latestCheckpoint(dir);
      assert.ok(latest, "a checkpoint was kept");
      const state = await readTrainerState(latest!);
      assert.equal(state.worldSize, 2);

      // Resuming with another number of processes is refused, saying why.
      const wrong = await trainCli([...args, "--resume"]);
      assert.equal(wrong.code, 1);
      assert.match(
        text(wrong.stderr),
        /written by a run of 2 processes, resumed with 1: resume with the same/,
      );
      // With the same number it carries on to the end.
      const resumed = await trainCli([
        ...settings(dir, state.step + 2, ["output.checkpointEvery=1"]),
        "--resume",
        "--nproc",
        "2",
      ]);
      assert.equal(resumed.code, 0, text(resumed.stderr));
      const after = await readJsonl(metrics);
      assert.deepEqual(after.map((r) => r.step), Array.from({ length: state.step + 2 }, (_, i) => i + 1));
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});

Deno.test({
  name: "data parallel: `deno task evaluate --nproc 2` writes what one process writes, greedy and sampled",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const tmp = await Deno.makeTempDir({ prefix: "moerl_dp_eval_" });
    try {
      // Batches of one problem: each problem is decoded alone on either side, so its logits, and with them greedy
      // and sampled tokens (drawn from streams keyed by the problem's id), match exactly.
      const args = (out: string, sets: string[] = []): string[] => [
        "run",
        "-A",
        join(ROOT, "eval", "evaluate.ts"),
        "--config",
        join(ROOT, "configs", "tiny.yaml"),
        "--limit",
        "5",
        "--out",
        out,
        ...["eval.batchSize=1", "eval.maxNewTokens=8", ...sets].flatMap((x) => ["--set", x]),
      ];
      const run = async (a: string[]): Promise<Deno.CommandOutput> =>
        await new Deno.Command(Deno.execPath(), { args: a, env: ENV, stdout: "piped", stderr: "piped" })
          .output();
      const [one, two] = [join(tmp, "one"), join(tmp, "two")];
      const single = await run(args(one));
      assert.equal(single.code, 0, text(single.stderr));
      const dp = await run([...args(two), "--nproc", "2"]);
      assert.equal(dp.code, 0, text(dp.stderr));
      assert.equal(
        await Deno.readTextFile(join(two, "predictions.jsonl")),
        await Deno.readTextFile(join(one, "predictions.jsonl")),
      );
      const [s1, s2] = await Promise.all(
        [one, two].map(async (d) => JSON.parse(await Deno.readTextFile(join(d, "summary.json")))),
      );
      for (
        const key of [
          "n",
          "correct_strict",
          "correct_flexible",
          "completion_tokens_mean",
          "truncated_fraction",
        ]
      ) {
        assert.equal(s2[key], s1[key], key);
      }
      assert.equal(s2.n, 5);
      const sampled = ["eval.samples=2", "eval.temperature=1"];
      const [three, four] = [join(tmp, "three"), join(tmp, "four")];
      const sampledOne = await run(args(three, sampled));
      assert.equal(sampledOne.code, 0, text(sampledOne.stderr));
      const sampledTwo = await run([...args(four, sampled), "--nproc", "2"]);
      assert.equal(sampledTwo.code, 0, text(sampledTwo.stderr));
      const lines = await Deno.readTextFile(join(three, "predictions.jsonl"));
      assert.equal(await Deno.readTextFile(join(four, "predictions.jsonl")), lines);
      assert.equal(lines.trim().split("\n").length, 10, "5 problems × 2 samples");
      const [s3, s4] = await Promise.all(
        [three, four].map(async (d) => JSON.parse(await Deno.readTextFile(join(d, "summary.json")))),
      );
      for (const key of ["n", "samples", "correct_flexible", "pass_at_k_flexible", "maj_at_k_flexible"]) {
        assert.equal(s4[key], s3[key], key);
      }
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "data parallel: --resume of a run stopped while it loaded (only its lock file) starts it on every rank",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const tmp = await Deno.makeTempDir({ prefix: "moerl_dp_lock_" });
    try {
      // Rank 0 alone takes the lock and sees it was there; the other ranks must not refuse the run.
      const run = join(tmp, "run");
      await Deno.mkdir(run);
      await Deno.writeTextFile(join(run, ".lock"), "pid 1\n");
      const r = await trainCli([...settings(run, 1), "--resume", "--nproc", "2"]);
      assert.equal(r.code, 0, text(r.stderr));
      assert.deepEqual((await readJsonl(join(run, "metrics.jsonl"))).map((x) => x.step), [1]);
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});

Deno.test("train --nproc: an update that does not split over the processes is refused before any starts", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_dp_split_" });
  try {
    const r = await trainCli([...settings(tmp, 1), "--nproc", "3"]); // 4 prompts per update
    assert.equal(r.code, 2);
    assert.match(text(r.stderr), /^train: --nproc 3: an update's 4 prompts .* do not split evenly/m);
    assert.equal(text(r.stderr).match(/do not split/g)!.length, 1, "said once, by no rank");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test({
  name: "data parallel: ranks with different settings are refused by all of them, before anything loads",
  ignore: !hasGloo,
  async fn(): Promise<void> {
    const tmp = await Deno.makeTempDir({ prefix: "moerl_dp_cfg_" });
    try {
      const env = { WORLD_SIZE: "2", MASTER_ADDR: "127.0.0.1", MASTER_PORT: String(freePort()) };
      const base = settings(join(tmp, "run"), 1);
      const [r0, r1] = await Promise.all([
        trainCli(base, { ...env, RANK: "0", LOCAL_RANK: "0", LOCAL_WORLD_SIZE: "2" }),
        trainCli([...base, "--set", "train.learningRate=0.5"], {
          ...env,
          RANK: "1",
          LOCAL_RANK: "1",
          LOCAL_WORLD_SIZE: "2",
        }),
      ]);
      for (const r of [r0, r1]) {
        assert.equal(r.code, 1);
        assert.match(text(r.stderr), /rank 1's config differs from rank 0's/);
      }
      await assert.rejects(() => Deno.stat(join(tmp, "run")), Deno.errors.NotFound, "nothing written");
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});
