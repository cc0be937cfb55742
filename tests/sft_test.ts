/**
 * The arithmetic task and the supervised warm-up on the tiny model: problems
 * are well-formed GSM8K records, splits are disjoint and seeded, and a short
 * warm-up lowers the loss and lifts greedy accuracy on what it trained on.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors, manualSeed } from "../ffi/mod.ts";
import { arithmeticProblems, arithmeticSplit } from "../data/arithmetic.ts";
import { loadModel } from "../model/model.ts";
import { generate } from "../model/generate.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { extractAnswer } from "../data/answer.ts";
import { answersMatch } from "../data/numbers.ts";
import { Policy } from "../rl/policy.ts";
import { supervisedWarmup } from "../train/sft.ts";
import { evaluateExamples } from "../rl/evaluate.ts";

Deno.test("arithmetic: well-formed problems, disjoint seeded splits", () => {
  const all = arithmeticProblems({ ops: ["+", "-"] });
  assert.ok(all.every((e) => answersMatch(extractAnswer(e.solution).value, e.answer) && e.answerValue >= 0));
  assert.equal(new Set(all.map((e) => e.id)).size, all.length);
  const a = arithmeticSplit(0.25, 1), b = arithmeticSplit(0.25, 1);
  assert.deepEqual(a, b);
  assert.equal(a.train.length + a.heldOut.length, 100);
  const held = new Set(a.heldOut.map((e) => e.id));
  assert.ok(a.train.every((e) => !held.has(e.id)));
  assert.notDeepEqual(arithmeticSplit(0.25, 2).heldOut, a.heldOut);
  const mixed = arithmeticProblems({ plainAnswerFraction: 0.5 });
  const plain = mixed.filter((e) => extractAnswer(e.solution, { mode: "strict" }).value === null);
  assert.ok(plain.length > 30 && plain.length < 70, `about half the solutions lack ####: ${plain.length}`);
  assert.ok(plain.every((e) => answersMatch(extractAnswer(e.solution).value, e.answer)));
});

Deno.test("sft: a short warm-up lowers the loss and lifts training accuracy", async () => {
  manualSeed(0);
  const dir = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
  const live = liveTensors();
  {
    using model = await loadModel(dir);
    const tok = await Tokenizer.load(dir);
    const policy = new Policy(model, {
      lora: { r: 16, alpha: 32, dropout: 0, targetModules: "all-linear", targetExperts: true },
    });
    const { train } = arithmeticSplit(0.25, 1);
    const prompt = { instruction: "" };
    const accuracy = async (): Promise<number> =>
      (await evaluateExamples(model.decoder, tok, train, { maxNewTokens: 10, batchSize: 32, prompt })).totals
        .accuracy_flexible;
    const before = await accuracy();
    const losses = await supervisedWarmup(policy, tok, train, {
      steps: 120,
      batchSize: 16,
      lr: 3e-3,
      seed: 1,
      prompt,
    });
    const after = await accuracy();
    const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
    assert.ok(
      mean(losses.slice(-10)) < 0.5 * mean(losses.slice(0, 10)),
      `loss ${mean(losses.slice(0, 10))} → ${mean(losses.slice(-10))}`,
    );
    assert.ok(after >= before + 0.2, `training accuracy ${before} → ${after}`);
    policy.dispose();
  }
  assert.equal(liveTensors(), live);
});

Deno.test("sft: the command refuses bad arguments with the reason and exit status 2", async () => {
  const run = async (...args: string[]): Promise<{ code: number; stderr: string }> => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "train/sft_main.ts", ...args],
      cwd: join(import.meta.dirname!, ".."),
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  };
  const ok = ["--model", "m", "--out", "o", "--task", "arithmetic"];
  for (
    const [args, reason] of [
      [[...ok, "--steps", "abc"], /--steps: expected an integer >= 1, got "abc"/],
      [[...ok, "--lr", "0"], /--lr: expected a number > 0, got "0"/],
      [[...ok, "--batch", "1.5"], /--batch: expected an integer >= 1/],
      [[...ok, "--step", "3"], /unknown option --step \(did you mean --steps\?\)/],
      [["--model", "m", "--task", "arithmetic"], /--model and --out are required/],
      [["--model", "m", "--out", "o"], /give one of --data FILE\.jsonl, --task arithmetic/],
      [[...ok, "--data", "x.jsonl"], /give one of/],
      [["--model", "m", "--out", "o", "--task", "poetry"], /--task: unknown task "poetry"/],
      [
        ["--model", "m", "--out", "m", "--task", "arithmetic"],
        /--out .* holds a model already \(or is --model\)/,
      ],
      [
        [...ok.slice(0, 2), "--out", "tests/fixtures/models/qwen3-moe-tiny", ...ok.slice(4)],
        /holds a model already/,
      ],
    ] as const
  ) {
    const r = await run(...args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, reason);
    assert.match(r.stderr, /usage: deno task sft/);
  }
});

Deno.test("sft: the command saves a model that loads, with the warm-up merged in; a missing model exits 1", async () => {
  const root = join(import.meta.dirname!, "..");
  const tmp = await Deno.makeTempDir({ prefix: "moerl_sft_cli_" });
  const run = (...args: string[]): Promise<Deno.CommandOutput> =>
    new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "train/sft_main.ts", ...args],
      cwd: root,
      env: { INIT_CWD: root },
    }).output();
  try {
    const base = "tests/fixtures/models/qwen3-moe-tiny", out = join(tmp, "warm");
    const r = await run(
      "--model",
      base,
      "--out",
      out,
      "--task",
      "arithmetic",
      "--steps",
      "2",
      "--batch",
      "2",
    );
    assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
    assert.match(new TextDecoder().decode(r.stdout), /saved .*warm: final loss \d/);
    using before = await loadModel(join(root, base));
    using after = await loadModel(out);
    const ids = [[5, 6, 7]];
    const last = async (m: typeof before): Promise<number[]> =>
      (await generate(m.decoder, ids, { maxNewTokens: 1 })).logprobs[0]!;
    assert.notDeepEqual(await last(after), await last(before), "the merged adapter changed the model");
    // A Hub id goes to the Hub (offline here: the error names the repo and the cache), not to a local path.
    const hub = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "train/sft_main.ts",
        "--model",
        "org/some-model",
        "--out",
        join(tmp, "h"),
        "--task",
        "arithmetic",
      ],
      cwd: root,
      env: { INIT_CWD: root, HF_HUB_OFFLINE: "1", HF_HUB_CACHE: join(tmp, "hub") },
    }).output();
    assert.equal(hub.code, 1);
    assert.match(
      new TextDecoder().decode(hub.stderr),
      /^sft: org\/some-model@main: offline \(HF_HUB_OFFLINE\)/m,
    );
    const missing = await run("--model", join(tmp, "none"), "--out", join(tmp, "x"), "--task", "arithmetic");
    assert.equal(missing.code, 1);
    assert.match(new TextDecoder().decode(missing.stderr), /^sft: .*none/m);
    assert.doesNotMatch(new TextDecoder().decode(missing.stderr), /Uncaught|\n {4}at /);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
