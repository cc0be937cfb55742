/**
 * `deno task evaluate` as a subprocess on the tiny model (random weights, so
 * accuracy is ~0: the structure is tested, not the accuracy): files written,
 * counts consistent, an adapter resolved from a run folder, and exit statuses.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { scoreText } from "../eval/score.ts";
import { saveTinyCheckpoint } from "./tiny.ts";
import { runEvaluation } from "../eval/evaluate.ts";
import { formatConfig, loadTrainConfig, RUN_CONFIG_FILE } from "../train/config.ts";

const ROOT = join(import.meta.dirname!, "..");

async function evaluate(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return await evaluateWith({}, ...args);
}

async function evaluateWith(
  env: Record<string, string>,
  ...args: string[]
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "eval/evaluate.ts", ...args],
    cwd: ROOT,
    env: { INIT_CWD: ROOT, ...env },
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

interface Summary {
  n: number;
  correct_strict: number;
  correct_flexible: number;
  accuracy_strict: number;
  accuracy_flexible: number;
  adapter: string | null;
  split: string;
  limit: number | null;
  max_new_tokens: number;
}

async function readOutputs(dir: string): Promise<{ preds: Record<string, unknown>[]; summary: Summary }> {
  const text = await Deno.readTextFile(join(dir, "predictions.jsonl"));
  const preds = text.trim().split("\n").map((l) => JSON.parse(l));
  const summary = JSON.parse(await Deno.readTextFile(join(dir, "summary.json")));
  return { preds, summary };
}

Deno.test("evaluate: --limit 4 on the tiny model writes 4 predictions and a consistent summary", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-eval-" });
  const r = await evaluate("--config", "configs/tiny.yaml", "--limit", "4", "--split", "test", "--out", tmp);
  assert.equal(r.code, 0, r.stderr);
  // tiny.yaml's problems are a head of GSM8K's train split; --split test only relabels them, and says so.
  assert.match(r.stderr, /train-head\.jsonl is named as GSM8K's train split but is labelled "test"/);
  const { preds, summary } = await readOutputs(tmp);
  assert.equal(preds.length, 4);
  assert.deepEqual(preds.map((p) => p.id), ["test-0", "test-1", "test-2", "test-3"]);
  for (const p of preds) {
    for (const k of ["question", "answer_gold", "completion", "extracted_strict", "extracted_flexible"]) {
      assert.ok(k in p, `prediction has ${k}`);
    }
    assert.ok((p.completion_tokens as number) >= 1 && (p.completion_tokens as number) <= 16);
  }
  assert.equal(preds[0]!.answer_gold, "72");
  assert.equal(summary.n, 4);
  assert.equal(summary.limit, 4);
  assert.equal(summary.split, "test");
  assert.equal(summary.max_new_tokens, 16);
  assert.equal(summary.adapter, null);
  assert.equal(summary.correct_strict, preds.filter((p) => p.correct_strict).length);
  assert.equal(summary.correct_flexible, preds.filter((p) => p.correct_flexible).length);
  assert.equal(summary.accuracy_strict, summary.correct_strict / 4);
  assert.equal(summary.accuracy_flexible, summary.correct_flexible / 4);
  assert.match(r.stdout, /"n": 4/);
  // Each row's verdict is the scorer's on its completion and gold (deno task score reads the file as it is).
  const scored = scoreText(await Deno.readTextFile(join(tmp, "predictions.jsonl")));
  assert.equal(scored.verdicts.length, 4);
  scored.verdicts.forEach((v, i) => {
    const p = preds[i]!;
    assert.deepEqual(
      [p.extracted_strict, p.extracted_flexible, p.correct_strict, p.correct_flexible],
      [v.extracted_strict, v.extracted_flexible, v.correct_strict, v.correct_flexible],
      `row ${i}`,
    );
  });
  const names = [];
  for await (const e of Deno.readDir(tmp)) names.push(e.name);
  assert.deepEqual(names.sort(), ["predictions.jsonl", "summary.json"], "no temporary files left");
  await Deno.remove(tmp, { recursive: true });
});

Deno.test("evaluate: --adapter takes a run folder (its newest checkpoint); outputs go under the run", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-eval-" });
  const run = join(tmp, "run");
  await saveTinyCheckpoint(run, 3);
  const r = await evaluate(
    "--config",
    "configs/tiny.yaml",
    "--adapter",
    run,
    "--limit",
    "2",
  );
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /evaluation reads the training problems .*: its accuracy is not held out/);
  // Into the adapter's own run folder, not the config's (runs/tiny).
  const { preds, summary } = await readOutputs(join(run, "eval", "checkpoint-3-train"));
  assert.equal(preds.length, 2);
  assert.equal(summary.adapter, join(run, "checkpoint-3", "adapter"));
  assert.match(r.stdout, /adapter .*checkpoint-3[\\/]adapter: [\d,]+ parameters/);
  // Without --config, the run's own config.yaml (as training writes it) says how it was trained.
  const runConfig = await loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), ["eval.maxNewTokens=5"]);
  await Deno.writeTextFile(join(run, RUN_CONFIG_FILE), formatConfig(runConfig));
  const own = await evaluate("--adapter", join(run, "checkpoint-3"), "--limit", "2");
  assert.equal(own.code, 0, own.stderr);
  assert.match(own.stdout, /^config .*run[\\/]config\.yaml \(the adapter's run\):$/m);
  const again = await readOutputs(join(run, "eval", "checkpoint-3-train"));
  assert.equal(again.summary.max_new_tokens, 5);
  assert.ok(again.preds.every((p) => (p.completion_tokens as number) <= 5));
  await Deno.remove(tmp, { recursive: true });
});

Deno.test("evaluate: sampled (eval.samples, eval.temperature) writes every sample, and pass@k / maj@k", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-eval-" });
  const run = join(tmp, "run");
  await saveTinyCheckpoint(run, 2);
  const sets = ["--set", "eval.samples=3", "--set", "eval.temperature=0.8", "--set", "eval.topP=0.9"];
  const r = await evaluate("--config", "configs/tiny.yaml", "--adapter", run, "--limit", "2", ...sets);
  assert.equal(r.code, 0, r.stderr);
  // Beside the greedy results, not over them.
  const { preds, summary } = await readOutputs(join(run, "eval", "checkpoint-2-train-t0.8-p0.9-n3"));
  assert.deepEqual(preds.map((p) => [p.id, p.sample]), [
    ["train-0", 0],
    ["train-0", 1],
    ["train-0", 2],
    ["train-1", 0],
    ["train-1", 1],
    ["train-1", 2],
  ]);
  const s = summary as unknown as Record<string, number>;
  assert.deepEqual([s.n, s.samples, s.temperature, s.top_p], [2, 3, 0.8, 0.9]);
  assert.equal(s.correct_flexible, preds.filter((p) => p.correct_flexible).length);
  assert.equal(s.accuracy_flexible, s.correct_flexible / 6);
  const anyRight = ["train-0", "train-1"].filter((id) =>
    preds.some((p) => p.id === id && p.correct_flexible)
  );
  assert.equal(s.pass_at_k_flexible, anyRight.length / 2);
  assert.match(r.stdout, /pass@3 [\d.]+% \/ [\d.]+%, maj@3 [\d.]+% \/ [\d.]+%/);
  // Several greedy completions of a problem would be one completion several times.
  const greedy = await evaluate("--config", "configs/tiny.yaml", "--limit", "2", "--set", "eval.samples=3");
  assert.equal(greedy.code, 2);
  assert.match(
    greedy.stderr,
    /eval\.samples: 3 greedy completions of a problem are all the same: set eval\.temperature > 0/,
  );
  await Deno.remove(tmp, { recursive: true });
});

Deno.test("evaluate: bad arguments and configs exit 2, a missing data file 1", async () => {
  const bad = await evaluate("--config", "configs/tiny.yaml", "--limit", "0");
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--limit: expected an integer >= 1, got "0"/);
  const nproc = await evaluate("--config", "configs/tiny.yaml", "--nproc", "1.5");
  assert.equal(nproc.code, 2);
  assert.match(nproc.stderr, /--nproc: expected an integer >= 1, got "1\.5"/);
  assert.equal((await evaluate("--config", "configs/tiny.yaml", "--bogus")).code, 2);
  const cfg = await evaluate("--config", "configs/tiny.yaml", "--set", "eval.batchsize=3");
  assert.equal(cfg.code, 2);
  assert.match(cfg.stderr, /unknown key eval\.batchsize \(did you mean batchSize\?\)/);
  const missing = await evaluate(
    "--config",
    "configs/tiny.yaml",
    "--set",
    "eval.source=tests/fixtures/gsm8k/none.jsonl",
  );
  assert.equal(missing.code, 1);
  assert.match(
    missing.stderr,
    /^evaluate: eval\.source: GSM8K file tests\/fixtures\/gsm8k\/none\.jsonl does not exist$/m,
  );
  assert.doesNotMatch(missing.stderr, /\n\s+at /, "the message alone");
  // MOERL_DEBUG=1 adds the stack, as for deno task train.
  const debug = await evaluateWith(
    { MOERL_DEBUG: "1" },
    ...["--config", "configs/tiny.yaml", "--set", "eval.source=tests/fixtures/gsm8k/none.jsonl"],
  );
  assert.equal(debug.code, 1);
  assert.match(debug.stderr, /none\.jsonl does not exist[^]*\n\s+at /);
  // An output folder that cannot be written is found before the evaluation, whose results would be lost.
  const file = await Deno.makeTempFile({ prefix: "moerl-eval-out-" });
  try {
    const out = await evaluate(
      "--config",
      "configs/tiny.yaml",
      "--limit",
      "2",
      "--out",
      join(file, "results"),
    );
    assert.equal(out.code, 1);
    assert.match(out.stderr, /results: cannot write the results there: Not a directory/);
    assert.doesNotMatch(out.stdout, /2\/2: strict/, "nothing was evaluated");
  } finally {
    await Deno.remove(file);
  }
});

Deno.test("evaluate: a mistyped --adapter is named before the model is read", async () => {
  // A model folder whose weights are missing: reading it would fail first, naming the weights.
  const model = await Deno.makeTempDir({ prefix: "moerl-eval-noweights-" });
  try {
    await Deno.copyFile(
      join(ROOT, "tests/fixtures/models/qwen3-moe-tiny/config.json"),
      join(model, "config.json"),
    );
    const cfg = await loadTrainConfig(join(ROOT, "configs/tiny.yaml"), [
      `model.id=${model}`,
      `eval.source=${join(ROOT, "tests/fixtures/gsm8k/train-head.jsonl")}`,
    ]);
    await assert.rejects(
      runEvaluation(cfg, { adapter: join(model, "checkpont-10"), limit: 1, log: () => {} }),
      /checkpont-10: does not exist; give an adapter folder/,
    );
  } finally {
    await Deno.remove(model, { recursive: true });
  }
});

Deno.test("evaluate: static-buffer and graph decode steps give eager's predictions, one session across batches", async () => {
  const completions: Record<string, unknown[]> = {};
  for (const mode of ["eager", "static", "graph"]) {
    const tmp = await Deno.makeTempDir({ prefix: "moerl-eval-" });
    // Batches of 4 then 2: the second reuses the first's buffers with 2 padding rows.
    const r = await evaluate(
      ...["--config", "configs/tiny.yaml", "--limit", "6", "--split", "test", "--out", tmp],
      ...["--set", "eval.batchSize=4", "--set", `rollout.decode=${mode}`],
    );
    assert.equal(r.code, 0, r.stderr);
    const { preds } = await readOutputs(tmp);
    completions[mode] = preds.map((p) => [p.id, p.completion, p.completion_tokens, p.finish_reason]);
    await Deno.remove(tmp, { recursive: true });
  }
  assert.equal(completions.eager!.length, 6);
  assert.ok(
    new Set(completions.eager!.map((c) => (c as unknown[])[1])).size > 1,
    "completions differ by problem",
  );
  assert.deepEqual(completions.static, completions.eager);
  assert.deepEqual(completions.graph, completions.eager);
});

Deno.test("train and evaluate --help: exit 0 with every option described", async () => {
  const ev = await evaluate("--help");
  assert.equal(ev.code, 0);
  for (const o of ["--config", "--adapter", "--limit", "--split", "--out", "--set", "--nproc"]) {
    assert.match(ev.stdout, new RegExp(`^\\s+(-\\w, )?${o} `, "m"), `evaluate --help describes ${o}`);
  }
  const tr = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "train/main.ts", "--help"],
    cwd: ROOT,
  })
    .output();
  assert.equal(tr.code, 0);
  const text = new TextDecoder().decode(tr.stdout);
  for (const o of ["--config", "--set", "--resume", "--print-config", "--nproc"]) {
    assert.match(text, new RegExp(`^\\s+(-\\w, )?${o} `, "m"), `train --help describes ${o}`);
  }
});
