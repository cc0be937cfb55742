/**
 * `deno task merge` (eval/merge.ts): a checkpoint's adapter merged into its run's base model gives a model
 * folder whose logits are the base's with the adapter on; bad arguments are refused before anything loads.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors, noGrad, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import { type CausalLM, loadModel } from "../model/model.ts";
import { loadPeftAdapter } from "../model/peft.ts";
import { formatConfig, loadTrainConfig, RUN_CONFIG_FILE } from "../train/config.ts";
import { saveTinyCheckpoint, TINY_MODEL as TINY } from "./tiny.ts";
import { PYTHON, pythonHas } from "./util.ts";

const ROOT = join(import.meta.dirname!, "..");

async function merge(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, "eval", "merge.ts"), ...args],
    cwd: ROOT,
    env: { OMP_NUM_THREADS: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

function logits(model: CausalLM): Tensor {
  return noGrad(() =>
    tidy(() =>
      model.decoder.forward({
        inputIds: tensor([[5, 6, 7, 8, 9]], { dtype: "int64" }),
        positionIds: tensor([[0, 1, 2, 3, 4]], { dtype: "int64" }),
        attentionMask: tensor([[1, 1, 1, 1, 1]]),
      }).logits!
    )
  );
}

/** A copy of a checkpoint's adapter as a standalone PEFT adapter (no run around it) naming base as its base. */
async function standalone(adapter: string, dir: string, base: string): Promise<string> {
  await Deno.mkdir(dir);
  for (const f of ["adapter_config.json", "adapter_model.safetensors"]) {
    await Deno.copyFile(join(adapter, f), join(dir, f));
  }
  const pc = JSON.parse(await Deno.readTextFile(join(dir, "adapter_config.json")));
  await Deno.writeTextFile(
    join(dir, "adapter_config.json"),
    JSON.stringify({ ...pc, base_model_name_or_path: base }),
  );
  return dir;
}

/** A run folder with a checkpoint of non-zero adapters and config.yaml (4-bit base), under tmp. */
async function makeRun(tmp: string): Promise<string> {
  const run = join(tmp, "run");
  await saveTinyCheckpoint(run, 2, { lora: { targetExperts: true }, perturbed: true });
  // As training writes it: the run trained over a 4-bit base, which the merge leaves out.
  const cfg = await loadTrainConfig(join(ROOT, "configs", "tiny.yaml"), ["model.quantize4bit=true"]);
  await Deno.writeTextFile(join(run, RUN_CONFIG_FILE), formatConfig(cfg));
  return run;
}

Deno.test("merge: a run's checkpoint becomes a model folder with the adapter in its weights", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-merge-" });
  const live = liveTensors();
  try {
    const run = await makeRun(tmp);
    const out = join(tmp, "merged");
    const r = await merge("--adapter", run, "--out", out);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stdout,
      /from .*run[\\/]config\.yaml \(the adapter's run\)\); adapter .*checkpoint-2[\\/]adapter/,
    );
    assert.match(r.stdout, /4-bit base: merging into the full-precision weights/);
    assert.match(r.stdout, /saved .*merged: [\d,]+ adapter parameters merged/);
    for (const f of ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]) {
      await Deno.stat(join(out, f));
    }

    using base = await loadModel(TINY);
    using merged = await loadModel(out);
    using plain = logits(base);
    const lora = await loadPeftAdapter(join(run, "checkpoint-2", "adapter"), base);
    try {
      using adapted = logits(base);
      using mergedLogits = logits(merged);
      const gap = tidy(() => mergedLogits.sub(adapted).abs().amax().item());
      const moved = tidy(() => adapted.sub(plain).abs().amax().item());
      assert.ok(moved > 1e-3, `the adapter changes the logits (by ${moved})`);
      assert.ok(gap < 1e-5, `merged logits equal the base's with the adapter on (gap ${gap})`);
    } finally {
      lora.dispose();
    }

    // A standalone PEFT adapter (no run around it) is merged into the base its adapter_config.json names.
    const alone = await standalone(join(run, "checkpoint-2", "adapter"), join(tmp, "alone"), TINY);
    const fromPeft = join(tmp, "from-peft");
    const r2 = await merge("--adapter", alone, "--out", fromPeft, "--set", "model.dtype=float32");
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(
      r2.stdout,
      /^base .*qwen3-moe-tiny \(float32, from adapter_config\.json's base_model_name_or_path\)/m,
    );
    {
      using twice = await loadModel(fromPeft);
      using a = logits(twice), b = logits(merged);
      assert.equal(tidy(() => a.sub(b).abs().amax().item()), 0, "the same merge");
    }

    // Refused before anything loads: a folder that holds a model, a path that holds no adapter, no --out.
    const again = await merge("--adapter", run, "--out", out);
    assert.equal(again.code, 2);
    assert.match(
      again.stderr,
      /^merge: --out .*merged already holds a model \(model\.safetensors\): give a new folder/,
    );
    const none = await merge("--adapter", join(tmp, "nowhere"), "--out", join(tmp, "m2"));
    assert.equal(none.code, 2);
    assert.match(none.stderr, /^merge: .*nowhere: does not exist; give an adapter folder/);
    const missing = await merge("--adapter", run);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /^merge: --adapter and --out are required/);
    await assert.rejects(() => Deno.stat(join(tmp, "m2")), Deno.errors.NotFound);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  assert.equal(liveTensors(), live);
});

Deno.test("merge: an unknown option is named, and only model settings are suggested", async () => {
  const updates = await merge("--adapter", "a", "--out", "b", "--updates", "3");
  assert.equal(updates.code, 2);
  assert.match(
    updates.stderr,
    /unknown option --updates \(merge reads only the model\.\* settings of a config\)/,
  );
  const dtype = await merge("--adapter", "a", "--out", "b", "--dtype", "bfloat16");
  assert.equal(dtype.code, 2);
  assert.match(
    dtype.stderr,
    /unknown option --dtype \(settings are given as --set key=value: --set model\.dtype=…\)/,
  );
  // Nor a model setting merge overrides: following that hint would change nothing.
  const device = await merge("--adapter", "a", "--out", "b", "--device", "cuda");
  assert.equal(device.code, 2);
  assert.match(
    device.stderr,
    /unknown option --device \(the base loads on the CPU at full precision: merge has no use for model\.device,/,
  );
});

Deno.test("merge: --set model.id overrules a standalone adapter's base, however the --set is spaced", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl-merge-" });
  try {
    await saveTinyCheckpoint(join(tmp, "run"), 1);
    const adapter = join(tmp, "run", "checkpoint-1", "adapter");
    const alone = await standalone(adapter, join(tmp, "alone"), join(tmp, "no-such-base"));
    // `--set "model.id = DIR"` sets model.id as `--set model.id=DIR` does (parseSets trims the key and value).
    const r = await merge("--adapter", alone, "--out", join(tmp, "merged"), "--set", ` model.id = ${TINY}`);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^base .*qwen3-moe-tiny \(/m);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test({
  name: "merge: transformers loads the merged folder and computes moerl's logits",
  ignore: !pythonHas("transformers", "torch"),
  async fn(): Promise<void> {
    const tmp = await Deno.makeTempDir({ prefix: "moerl-merge-" });
    try {
      const out = join(tmp, "merged");
      const r = await merge("--adapter", await makeRun(tmp), "--out", out);
      assert.equal(r.code, 0, r.stderr);
      const py = await new Deno.Command(PYTHON, {
        args: [
          "-c",
          "import json, sys, torch\n" +
          "from transformers import AutoModelForCausalLM\n" +
          "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n" +
          "print(json.dumps(m(torch.tensor([[5, 6, 7, 8, 9]])).logits[0].tolist()))",
          out,
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(py.code, 0, new TextDecoder().decode(py.stderr));
      const theirs = JSON.parse(new TextDecoder().decode(py.stdout)) as number[][];
      using merged = await loadModel(out);
      using ours = logits(merged);
      const mine = tidy(() => ours.squeeze(0).tolist()) as number[][];
      let gap = 0;
      mine.forEach((row, i) => row.forEach((x, j) => (gap = Math.max(gap, Math.abs(x - theirs[i]![j]!)))));
      assert.ok(gap < 1e-4, `transformers' logits of the merged folder differ from moerl's by ${gap}`);
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});
