/**
 * The training loop end to end on the tiny model (configs/tiny.yaml): run
 * folder contents, and --resume reproducing an uninterrupted run's metrics.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { cuda, liveTensors, tensor } from "../ffi/mod.ts";
import { loadTrainConfig, type TrainConfig } from "../train/config.ts";
import { train } from "../train/loop.ts";
import { escapeHtml } from "../train/report.ts";
import { ppoObjective } from "../rl/objective.ts";
import { valueLoss } from "../rl/losses.ts";
import { reward } from "../rl/reward.ts";
import { lockRunDir, resumeConflicts } from "../train/resume.ts";
import { SafetensorsFile } from "../model/safetensors.ts";

const ROOT = join(import.meta.dirname!, "..");

/**
 * tiny.yaml with rewards that differ within groups (a hot sampler on the random model stops early now and
 * then, and the over-length penalty tells those completions apart), so that updates really train.
 */
async function config(dir: string, updates: number, ...sets: string[]): Promise<TrainConfig> {
  return await loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), [
    `output.dir=${dir}`,
    `train.updates=${updates}`,
    "output.checkpointEvery=2",
    "eval.every=2",
    "rollout.k=4",
    "rollout.temperature=2",
    "rollout.maxNewTokens=24",
    ...sets,
  ]);
}

/** Every tensor of a checkpoint's adapter and value head, by file and name. */
async function checkpointTensors(dir: string): Promise<Record<string, number[]>> {
  const out: Record<string, number[]> = {};
  for (const file of ["adapter/adapter_model.safetensors", "value_head.safetensors"]) {
    const f = await SafetensorsFile.open(join(dir, file));
    for (const n of f.names()) {
      using t = await f.load(n);
      out[`${file}:${n}`] = Array.from(t.toTypedArray() as Float32Array);
    }
    f.close();
  }
  return out;
}

/** Metrics that must repeat exactly (timings excluded). */
function comparable(r: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(r).filter(([k]) => !/seconds|per_second/.test(k)));
}

Deno.test("train: a tiny run writes its folder, and --resume repeats the uninterrupted run", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_train_" });
  const live = liveTensors();
  try {
    const full = await train(await config(join(tmp, "full"), 4), { quiet: true });
    assert.equal(full.records.length, 4);
    // tiny.yaml: learning rate 1e-3 after 2 warm-up updates, the first at half of it.
    assert.deepEqual(full.records.map((r) => r.lr), [0.0005, 0.001, 0.001, 0.001]);
    for (
      const f of ["config.yaml", "metrics.jsonl", "samples.jsonl", "report.html", "latest", "checkpoint-4"]
    ) {
      await Deno.stat(join(full.dir, f));
    }
    // Some groups have a reward spread: the policy steps in some updates, so a resume has something to repeat.
    assert.ok(full.records.some((r) => (r.optimizer_steps as number) > 0), "the policy stepped");
    assert.ok(full.records.some((r) => "eval_accuracy_flexible" in r));
    // tiny.yaml logs 2 completions every 2 updates, a line each, and the report shows the latest ones.
    const logged = (await Deno.readTextFile(join(full.dir, "samples.jsonl"))).trim().split("\n").map((l) =>
      JSON.parse(l)
    );
    assert.deepEqual(logged.map((r) => r.step), [2, 2, 4, 4]);
    assert.ok(logged.every((r) => typeof r.completion === "string" && typeof r.correct === "boolean"));
    const report = await Deno.readTextFile(join(full.dir, "report.html"));
    for (const r of logged.slice(2)) assert.ok(report.includes(`<pre>${escapeHtml(r.completion)}</pre>`));

    const part = join(tmp, "part");
    await train(await config(part, 2), { quiet: true }); // "interrupted" after update 2
    const resumed = await train(await config(part, 4), { quiet: true, resume: true });
    assert.deepEqual(resumed.records.map((r) => r.step), [3, 4]);
    assert.deepEqual(resumed.records.map(comparable), full.records.slice(2).map(comparable));
    assert.deepEqual(
      await checkpointTensors(join(part, "checkpoint-4")),
      await checkpointTensors(join(full.dir, "checkpoint-4")),
    );
    const lines = (await Deno.readTextFile(join(part, "metrics.jsonl"))).trim().split("\n");
    assert.equal(lines.length, 4, "the metrics log continues the interrupted one");

    // What an update learns may not change on resume; the refusal names each setting and writes nothing.
    const yaml = await Deno.readTextFile(join(part, "config.yaml"));
    await assert.rejects(
      async () =>
        train(await config(part, 6, "seed=7", "train.learningRate=0.5"), { quiet: true, resume: true }),
      /checkpoint-4: the run was trained with other settings:\n {2}seed: 0 → 7\n {2}train\.learningRate: 0\.001 → 0\.5\n/,
    );
    // A new run is refused a folder that holds one, before config.yaml is touched.
    await assert.rejects(
      async () => train(await config(part, 4, "seed=99"), { quiet: true }),
      /already holds a run \(metrics\.jsonl with 4 lines, checkpoint-4\): resume it/,
    );
    assert.equal(await Deno.readTextFile(join(part, "config.yaml")), yaml);
    // A run killed after its last save: leftovers of interrupted writes, a half-removed checkpoint, one more
    // checkpoint than keepLast, a stale report. Resuming the finished run tidies all of it and redraws the report.
    await Deno.writeTextFile(join(part, ".report.html.4242.0123abcd.tmp"), "half a report");
    await Deno.mkdir(join(part, ".checkpoint-2.4242-abcd1234.old"));
    await Deno.writeTextFile(join(part, "report.html"), "stale");
    const kept = (await Deno.readTextFile(join(part, "latest"))).trim();
    const again = await train(await config(part, 4, "output.keepLast=1"), { quiet: true, resume: true });
    assert.equal(again.records.length, 0, "nothing left to train");
    const left: string[] = [];
    for await (const e of Deno.readDir(part)) left.push(e.name);
    assert.deepEqual(
      left.filter((n) => (n.startsWith(".") && n !== ".lock") || n.startsWith("checkpoint-")),
      [kept],
    );
    assert.ok((await Deno.readTextFile(join(part, "report.html"))).startsWith("<!DOCTYPE html>"));
    // A mistyped run folder is not a run to resume, and a checkpoint folder is not a run folder.
    await assert.rejects(
      async () => train(await config(join(tmp, "typo"), 2), { quiet: true, resume: true }),
      /typo: nothing to resume \(no checkpoint, no metrics\)/,
    );
    await assert.rejects(
      () => Deno.stat(join(tmp, "typo")),
      Deno.errors.NotFound,
      "a refused start leaves no folder",
    );
    // A job killed while its model loaded left only the lock file: a requeued --resume starts that run.
    const loading = join(tmp, "loading");
    await Deno.mkdir(loading);
    await Deno.writeTextFile(join(loading, ".lock"), "pid 1\n");
    const begun = await train(await config(loading, 1, "eval.every=0"), { quiet: true, resume: true });
    assert.deepEqual(begun.records.map((r) => r.step), [1]);
    // One trainer per run folder: a second one (a requeued job while the first still runs) is refused, and
    // the folder is left as it was (two used to append the same steps twice, or lose them).
    const held = await lockRunDir(part);
    assert.ok(held.file, "this file system has flock");
    try {
      await assert.rejects(
        async () => train(await config(part, 6), { quiet: true, resume: true }),
        new RegExp(`is being written by another trainer \\(pid ${Deno.pid}\\b.*then --resume\\)`),
      );
    } finally {
      held.file?.close();
    }
    assert.equal((await Deno.readTextFile(join(part, "latest"))).trim(), kept);
    // A run whose first metrics line was torn (a full disk) is a run to start over, not "nothing to resume".
    const torn = join(tmp, "torn");
    await Deno.mkdir(torn);
    await Deno.writeTextFile(join(torn, "metrics.jsonl"), '{"step":1,"rew');
    const restarted = await train(await config(torn, 1, "eval.every=0"), { quiet: true, resume: true });
    assert.deepEqual(restarted.records.map((r) => r.step), [1]);
    for (const resume of [false, true]) {
      await assert.rejects(
        async () => train(await config(join(part, "checkpoint-4"), 6), { quiet: true, resume }),
        /checkpoint-4 is a checkpoint folder: the run folder is the one that holds it/,
      );
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  assert.equal(liveTensors(), live, "the run frees everything");
});

Deno.test("train: a refused --resume leaves no lock file in a folder that was there, so it is refused again", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_train_" });
  try {
    // An empty folder (made by a job script, say): a lock file left by the first refusal would read as a run
    // started there, and the second --resume would start one.
    const empty = join(tmp, "empty");
    await Deno.mkdir(empty);
    for (let i = 0; i < 2; i++) {
      await assert.rejects(
        async () => train(await config(empty, 1, "eval.every=0"), { quiet: true, resume: true }),
        /empty: nothing to resume \(no checkpoint, no metrics\)/,
        `attempt ${i + 1}`,
      );
      assert.deepEqual(await Array.fromAsync(Deno.readDir(empty)), [], "the folder is left as it was");
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("train: a sampled evaluation logs pass@k and maj@k, and leaves the training as it was", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_train_" });
  try {
    const sampled = ["eval.every=1", "eval.samples=3", "eval.temperature=1", "eval.limit=3"];
    const withEval = await train(await config(join(tmp, "sampled"), 2, ...sampled), { quiet: true });
    const keys = [
      "eval_pass_at_k_strict",
      "eval_pass_at_k_flexible",
      "eval_maj_at_k_strict",
      "eval_maj_at_k_flexible",
    ];
    for (const r of withEval.records) {
      for (const k of keys) assert.ok(typeof r[k] === "number" && r[k] >= 0 && r[k] <= 1, `${k} ${r[k]}`);
      assert.ok((r.eval_pass_at_k_flexible as number) >= (r.eval_accuracy_flexible as number));
    }
    const logged = JSON.parse((await Deno.readTextFile(join(withEval.dir, "metrics.jsonl"))).split("\n")[0]!);
    for (const k of keys) assert.equal(logged[k], withEval.records[0]![k], k);
    // Its draws come from streams of its own (keyed by problem): the updates are those of a run that does not evaluate.
    const without = await train(await config(join(tmp, "none"), 2, "eval.every=0"), { quiet: true });
    const trained = (r: Record<string, unknown>): Record<string, unknown> =>
      Object.fromEntries(Object.entries(comparable(r)).filter(([k]) => !k.startsWith("eval_")));
    assert.deepEqual(withEval.records.map(trained), without.records.map(trained));
    // Greedy: pass@1 and maj@1 are the accuracy, so they are not logged.
    const greedy = await train(await config(join(tmp, "greedy"), 1, "eval.every=1"), { quiet: true });
    assert.ok("eval_accuracy_flexible" in greedy.records[0]!);
    for (const k of keys) assert.ok(!(k in greedy.records[0]!), k);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("lockRunDir: a file system without flock warns and goes on unguarded", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_lock_" });
  const tryLock = Deno.FsFile.prototype.tryLock, warn = console.warn;
  const warned: string[] = [];
  // What Lustre or NFS mounts without locking answer (EOPNOTSUPP / ENOLCK).
  Deno.FsFile.prototype.tryLock = () => Promise.reject(new Error("Operation not supported (os error 95)"));
  console.warn = (...a: unknown[]) => void warned.push(a.join(" "));
  try {
    const dir = join(tmp, "run");
    const held = await lockRunDir(dir);
    assert.equal(held.file, null);
    assert.equal(held.created, true);
    assert.equal(warned.length, 1);
    assert.match(
      warned[0]!,
      /run[\\/]\.lock: cannot lock here \(Operation not supported \(os error 95\)\); one trainer per folder is unchecked/,
    );
    assert.equal((await lockRunDir(dir)).created, false, "the folder stays; a second call warns again");
    assert.equal(warned.length, 2);
  } finally {
    Deno.FsFile.prototype.tryLock = tryLock;
    console.warn = warn;
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("train: every update gets its full batch when the data does not divide into micro-batches", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_train_" });
  try {
    // 5 problems in micro-batches of 2: each epoch's fifth is left out, so updates 3 and 4 (the second
    // epoch) still hold 2 prompts × k 4 = 8 sequences, which ppo.minibatches 4 divides.
    const cfg = await config(
      tmp,
      4,
      "data.limit=5",
      "train.gradAccum=1",
      "ppo.minibatches=4",
      "eval.every=0",
    );
    let scored = 0, objectives = 0;
    const run = await train(cfg, {
      quiet: true,
      score: (c) => ({ ...reward(c, 1), reward: (scored++ % 4) / 4 }), // a notebook's own reward and loss
      objective: (...args) => (objectives++, ppoObjective(...args)),
    });
    assert.deepEqual(run.records.map((r) => r.step), [1, 2, 3, 4]);
    assert.deepEqual(run.records.map((r) => r.reward_mean), [0.375, 0.375, 0.375, 0.375], "its rewards");
    assert.equal(scored, 4 * 8);
    assert.ok(objectives >= 4, `its objective: ${objectives} calls`);
    // A checkpoint written before short micro-batches were dropped may point at one: resuming starts the next epoch.
    const state = join(tmp, "checkpoint-4", "trainer_state.json");
    const saved = JSON.parse(await Deno.readTextFile(state));
    saved.rng.batcherPosition = { epoch: 1, index: 2 };
    await Deno.writeTextFile(state, JSON.stringify(saved));
    const more = await config(
      tmp,
      5,
      "data.limit=5",
      "train.gradAccum=1",
      "ppo.minibatches=4",
      "eval.every=0",
    );
    assert.deepEqual((await train(more, { quiet: true, resume: true })).records.map((r) => r.step), [5]);
    await assert.rejects(
      () => config(join(tmp, "b"), 1, "data.limit=1"),
      /data\.limit \(1\) is below train\.microBatch \(2\): no full micro-batch/,
    );
    // A device this machine lacks is named as the setting, before anything loads or is written.
    const missing = cuda.isAvailable() ? `cuda:${cuda.deviceCount()}` : "cuda";
    await assert.rejects(
      async () => train(await config(join(tmp, "c"), 1, `model.device=${missing}`), { quiet: true }),
      new RegExp(`model\\.device "${missing}": `),
    );
    await assert.rejects(() => Deno.stat(join(tmp, "c")), Deno.errors.NotFound);
    // A replacement the settings would never call is refused before the first rollout, with nothing written.
    await assert.rejects(
      async () =>
        train(await config(join(tmp, "f"), 1, "ppo.advantage=group"), {
          quiet: true,
          valueLoss: () => tensor(0),
        }),
      /^Error: train: a valueLoss function was given, but ppo\.advantage "group" trains no critic/,
    );
    await assert.rejects(() => Deno.stat(join(tmp, "f")), Deno.errors.NotFound);
    // A data file that is not there is named with its key, before anything is written.
    await assert.rejects(
      async () => train(await config(join(tmp, "e"), 1, "data.source=gsm8k/nowhere.jsonl"), { quiet: true }),
      /^Error: data\.source: GSM8K file gsm8k\/nowhere\.jsonl does not exist$/,
    );
    await assert.rejects(() => Deno.stat(join(tmp, "e")), Deno.errors.NotFound);
    // Evaluating on no problems is refused before the first update, not logged as accuracy 0.
    const empty = join(tmp, "empty.jsonl");
    await Deno.writeTextFile(empty, "");
    await assert.rejects(
      async () => train(await config(join(tmp, "d"), 1, `eval.source=${empty}`), { quiet: true }),
      /empty\.jsonl \(train\): no problems to evaluate \(eval\.every is 2; 0 trains without evaluating\)/,
    );
    await assert.rejects(() => Deno.stat(join(tmp, "d", "metrics.jsonl")), Deno.errors.NotFound);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("resume: the settings a resume may change, and the run length under a decaying schedule", async () => {
  const cfg = await config("runs/x", 10);
  const saved = JSON.parse(JSON.stringify(cfg));
  assert.deepEqual(resumeConflicts(saved, cfg), []);
  assert.deepEqual(resumeConflicts(null, cfg), [], "a checkpoint saved without its config");
  const longer = await config("runs/x", 20, "eval.every=3", "rollout.decode=static");
  assert.deepEqual(resumeConflicts(saved, longer), [], "length, evaluation and decoding may change");
  const { ["lora"]: _lora, ...older } = saved; // a key the checkpoint's moerl did not have is not compared
  assert.deepEqual(resumeConflicts(older, await config("runs/x", 10, "lora.r=8")), []);
  assert.deepEqual(resumeConflicts(saved, await config("runs/x", 10, "lora.r=8")), ["lora.r: 4 → 8"]);
  assert.deepEqual(
    resumeConflicts(saved, await config("runs/x", 10, "ppo.clip=0.3", "reward.correct=2")),
    ["ppo.clip: 0.2 → 0.3", "reward.correct: 1 → 2"],
    "the objective and the reward are what an update learns",
  );
  const cosine = await config("runs/x", 10, "train.schedule=cosine");
  const cosineLonger = await config("runs/x", 20, "train.schedule=cosine");
  assert.deepEqual(resumeConflicts(JSON.parse(JSON.stringify(cosine)), cosineLonger), [
    "train.updates: 10 → 20 (the cosine schedule's learning rates depend on it)",
  ]);
});

Deno.test("train: the critic learns at train.valueLearningRate, in micro-batches of train.microBatch prompts", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_train_" });
  try {
    // 2 × 2 prompts, K 4: 16 sequences an update, micro-batches of 2 prompts (8 sequences), whole groups.
    const rows: number[] = [];
    const cfg = await config(tmp, 1, "eval.every=0", "train.valueLearningRate=0");
    await train(cfg, {
      quiet: true,
      valueLoss: (v, ...rest) => (rows.push(v.size(0)), valueLoss(v, ...rest)),
    });
    assert.deepEqual(rows, [8, 8], "two critic micro-batches of 8 sequences");
    // The value head's output layer starts at zero: at a learning rate of 0 it stays there.
    const f = await SafetensorsFile.open(join(tmp, "checkpoint-1", "value_head.safetensors"));
    try {
      for (const name of ["w2", "b2"]) {
        using t = await f.load(name);
        assert.ok((t.toTypedArray() as Float32Array).every((x) => x === 0), `${name} moved`);
      }
    } finally {
      f.close();
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
