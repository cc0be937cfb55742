/**
 * The training loop end to end on the tiny model (configs/tiny.yaml): run
 * folder contents, and --resume reproducing an uninterrupted run's metrics.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors } from "../ffi/mod.ts";
import { loadTrainConfig, type TrainConfig } from "../train/config.ts";
import { train } from "../train/loop.ts";

const ROOT = join(import.meta.dirname!, "..");

async function config(dir: string, updates: number): Promise<TrainConfig> {
  return await loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), [
    `output.dir=${dir}`,
    `train.updates=${updates}`,
    "output.checkpointEvery=2",
    "eval.every=2",
  ]);
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
    for (
      const f of ["config.yaml", "metrics.jsonl", "samples.jsonl", "report.html", "latest", "checkpoint-4"]
    ) {
      await Deno.stat(join(full.dir, f));
    }
    // The random tiny model earns no reward, so no group has signal: the critic trains, the policy does not.
    assert.ok(full.records.every((r) => Number.isFinite(r.reward_mean) && Number.isFinite(r.value_loss)));
    assert.ok(full.records.some((r) => "eval_accuracy_flexible" in r));

    const part = join(tmp, "part");
    await train(await config(part, 2), { quiet: true }); // "interrupted" after update 2
    const resumed = await train(await config(part, 4), { quiet: true, resume: true });
    assert.deepEqual(resumed.records.map((r) => r.step), [3, 4]);
    assert.deepEqual(resumed.records.map(comparable), full.records.slice(2).map(comparable));
    const lines = (await Deno.readTextFile(join(part, "metrics.jsonl"))).trim().split("\n");
    assert.equal(lines.length, 4, "the metrics log continues the interrupted one");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  assert.equal(liveTensors(), live, "the run frees everything");
});
