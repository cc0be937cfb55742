/**
 * The training config: the defaults and the three shipped configs parse
 * (default.yaml restates the defaults exactly); unknown keys, type mismatches
 * and bad YAML are errors naming the file and the full key path; `--set`
 * overrides; the resolved config round-trips through its YAML; the LR
 * schedule; train/main.ts's command line.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { DEFAULT_INSTRUCTION } from "../data/prompt.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { DEFAULT_RL_CONFIG } from "../rl/config.ts";
import { DEFAULT_REWARD_CONFIG } from "../rl/reward.ts";
import {
  applyOverrides,
  configKeys,
  DEFAULTS,
  formatConfig,
  loadTrainConfig,
  parseSets,
  parseYaml,
  promptsPerUpdate,
  runDir,
  setOptionHint,
  suggestKey,
  TrainConfigError,
} from "../train/config.ts";
import { parseCommandLine } from "../train/cli.ts";
import { lrFactor } from "../train/schedule.ts";
import { dataWarnings, precisionWarning } from "../train/model.ts";

const ROOT = join(import.meta.dirname!, "..");
const CONFIGS = join(ROOT, "configs");

/** The message of the TrainConfigError fn throws. */
function configError(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof TrainConfigError, `expected a TrainConfigError, got ${e}`);
    return e.message;
  }
  assert.fail("expected a TrainConfigError");
}

Deno.test("config: the defaults are valid and every section agrees with the library's defaults", () => {
  assert.deepEqual(applyOverrides(DEFAULTS, {}, "defaults"), structuredClone(DEFAULTS));
  assert.deepEqual(DEFAULTS.lora.targetModules, DEFAULT_LORA.targetModules);
  assert.equal(DEFAULTS.lora.r, DEFAULT_LORA.r);
  assert.equal(DEFAULTS.lora.alpha, DEFAULT_LORA.alpha);
  assert.equal(DEFAULTS.data.instruction, DEFAULT_INSTRUCTION);
  // The RL sections are the library's: a notebook's ppoStep runs what deno task train runs.
  for (const section of ["rollout", "ppo", "reward", "moe"] as const) {
    assert.deepEqual(DEFAULTS[section], structuredClone(DEFAULT_RL_CONFIG[section]), section);
  }
  assert.deepEqual(DEFAULT_RL_CONFIG.reward, DEFAULT_REWARD_CONFIG);
  assert.ok(Object.isFrozen(DEFAULTS.train), "DEFAULTS is deeply frozen");
  assert.ok(configKeys().includes("train.learningRate"));
});

Deno.test("config: configs/default.yaml is exactly the defaults: 4 × 32 = 128 prompts, 1200 updates", async () => {
  const cfg = await loadTrainConfig(join(CONFIGS, "default.yaml"));
  assert.deepEqual(cfg, structuredClone(DEFAULTS));
  assert.equal(cfg.model.id, "huihui-ai/Huihui-MoE-1B-A0.6B-SFT");
  assert.equal(cfg.train.microBatch, 4);
  assert.equal(cfg.train.gradAccum, 32);
  assert.equal(promptsPerUpdate(cfg), 128);
  assert.equal(cfg.train.updates, 1200);
  assert.equal(cfg.train.learningRate, 1e-5);
  assert.equal(cfg.train.valueLearningRate, 5e-5);
  assert.equal(runDir(cfg), "runs/huihui-moe-gsm8k");
});

Deno.test("config: phi-tiny-moe.yaml and tiny.yaml parse", async () => {
  const phi = await loadTrainConfig(join(CONFIGS, "phi-tiny-moe.yaml"));
  assert.equal(phi.model.id, "microsoft/Phi-tiny-MoE-instruct");
  assert.equal(phi.model.quantize4bit, true);
  assert.equal(phi.train.gradientCheckpointing, true);
  assert.equal(promptsPerUpdate(phi), 128);
  assert.equal(phi.train.learningRate, 1e-5, "unlisted keys keep their defaults");

  const tiny = await loadTrainConfig(join(CONFIGS, "tiny.yaml"));
  assert.equal(tiny.model.id, "tests/fixtures/models/qwen3-moe-tiny");
  assert.equal(tiny.model.device, "cpu");
  assert.equal(tiny.model.dtype, "float32");
  assert.deepEqual([tiny.train.microBatch, tiny.train.gradAccum, tiny.train.updates], [2, 2, 10]);
  assert.deepEqual([tiny.rollout.k, tiny.rollout.maxNewTokens], [2, 16]);
  for (const p of [tiny.model.id, tiny.data.source, tiny.eval.source]) {
    const info = await Deno.stat(join(ROOT, p));
    assert.ok(info.isFile || info.isDirectory, `${p} exists`);
  }
});

Deno.test("config: unknown keys at any depth are named with the file, the full path and a suggestion", () => {
  const msg = configError(() =>
    applyOverrides(
      DEFAULTS,
      parseYaml("train:\n  lerning_rate: 1e-5\nlr: 3\nmaxNewTokens: 9\n", "x.yaml"),
      "x.yaml",
    )
  );
  assert.match(msg, /x\.yaml: unknown key train\.lerning_rate \(did you mean learningRate\?\)/);
  assert.match(msg, /x\.yaml: unknown key lr \(did you mean train\.learningRate\?\)/);
  assert.match(
    msg,
    /unknown key maxNewTokens \(did you mean rollout\.maxNewTokens or eval\.maxNewTokens\?\)/,
  );
  assert.match(msg, /^3 config errors/);
  const deep = configError(() => applyOverrides(DEFAULTS, { lora: { targetExpert: true } }, "y.yaml"));
  assert.equal(deep, "y.yaml: unknown key lora.targetExpert (did you mean targetExperts?)");
  assert.equal(suggestKey("zzzzzz", ["r", "alpha"]), null);
  // Two letters swapped is one slip, also in short section names.
  const sections = Object.keys(DEFAULTS);
  for (
    const [typo, meant] of [["trian", "train"], ["modle", "model"], ["lroa", "lora"], [
      "rolluot",
      "rollout",
    ]] as const
  ) {
    assert.equal(suggestKey(typo, sections), meant);
  }
});

Deno.test("config: type mismatches name the key, what was expected and what came", () => {
  const cases: [unknown, RegExp][] = [
    [{ train: { microBatch: "4" } }, /train\.microBatch: expected an integer ≥ 1, got "4" \(a string\)/],
    [{ train: { microBatch: 2.5 } }, /train\.microBatch: expected an integer ≥ 1, got 2\.5 \(a number\)/],
    [{ train: { learningRate: 0 } }, /train\.learningRate: expected a number > 0, got 0/],
    [{ model: { device: "gpu" } }, /model\.device: expected "cuda", "cuda:N" or "cpu", got "gpu"/],
    [
      { model: { attention: "flash" } },
      /model\.attention: expected one of "auto", "sdpa", "eager", got "flash"/,
    ],
    [
      { ppo: { klEstimator: "k1" } },
      /ppo\.klEstimator: expected "k2" or "k3" \(k1's expected gradient is zero/,
    ],
    [
      { rollout: { generationBatch: 2 } },
      /f\.yaml: rollout\.generationBatch: 2 is smaller than rollout\.k \(4\)/,
    ],
    [{ ppo: { epochs: 0 } }, /ppo\.epochs: expected an integer ≥ 1, got 0/],
    [{ ppo: { minibatches: 0 } }, /ppo\.minibatches: expected an integer ≥ 1, got 0/],
    [{ ppo: { minibatches: 3 } }, /ppo\.minibatches \(3\) must divide the update's 512 sequences/],
    [{ ppo: { advantage: "gae" } }, /ppo\.advantage: expected one of "group", "token_value", "prompt_value"/],
    [{ moe: { routingReplay: "R3" } }, /moe\.routingReplay: expected one of "off", "rollout", got "R3"/],
    [{ reward: { markerMethods: ["####", "answer"] } }, /reward\.markerMethods: expected a list of/],
    [{ train: { betas: [0.9] } }, /train\.betas: expected two numbers in \[0, 1\)/],
    // β = 1 would make Adam's bias correction 1 − β^t zero: a division by zero at the first step.
    [
      { train: { betas: [0.9, 1] } },
      /train\.betas: expected two numbers in \[0, 1\), as \[0\.9, 0\.999\], got/,
    ],
    [{ lora: 16 }, /lora is a section \(keys r, alpha, .*\), got 16 \(a number\)/],
    [{ seed: null }, /seed: expected an integer in \[0, 2\^32\), got null/],
    [{ train: { gradientCheckpointing: "yes" } }, /expected true or false, got "yes"/],
    [{ train: { headChunk: 0.5 } }, /train\.headChunk: expected an integer ≥ 0, got 0\.5/],
    [{ lora: { targetModules: "(" } }, /lora\.targetModules: not a regular expression/],
    [
      { train: { gradientCheckpointing: true }, lora: { dropout: 0.1, expertForm: "split" } },
      /gradientCheckpointing needs lora\.dropout 0/,
    ],
    [
      { train: { gradientCheckpointing: true }, ppo: { routerAuxCoef: 0.01 } },
      /routerAuxCoef > 0 needs router logits, which train\.gradientCheckpointing's backward does not keep/,
    ],
    // PEFT's ParamWrapper, which adapts fused expert parameters, refuses dropout: such an adapter would not load.
    [{ lora: { dropout: 0.1 } }, /lora\.dropout 0\.1 with targetExperts in the fused form: PEFT cannot load/],
  ];
  for (const [over, re] of cases) {
    assert.match(configError(() => applyOverrides(DEFAULTS, over, "f.yaml")), re);
  }
  // Nullable keys take null; lists replace rather than merge.
  const ok = applyOverrides(DEFAULTS, {
    data: { limit: null, system: "Be brief." },
    lora: { targetModules: ["q_proj"] },
  }, "f");
  assert.deepEqual(ok.lora.targetModules, ["q_proj"]);
  assert.equal(ok.data.system, "Be brief.");
  assert.equal(
    applyOverrides(DEFAULTS, { lora: { targetModules: "all-linear" } }, "f").lora.targetModules,
    "all-linear",
  );
});

Deno.test("config: YAML details: scientific notation, empty file, bad YAML, duplicate keys, a list at the top", async () => {
  assert.equal(
    applyOverrides(DEFAULTS, parseYaml("train:\n  learningRate: 3e-6\n", "f"), "f").train.learningRate,
    3e-6,
  );
  assert.deepEqual(applyOverrides(DEFAULTS, parseYaml("# nothing\n", "f"), "f"), structuredClone(DEFAULTS));
  assert.match(configError(() => parseYaml("train: [1,\n", "bad.yaml")), /^bad\.yaml: invalid YAML/);
  assert.match(configError(() => parseYaml("seed: 1\nseed: 2\n", "dup.yaml")), /^dup\.yaml: invalid YAML.*/);
  assert.match(
    configError(() => applyOverrides(DEFAULTS, [1, 2], "list.yaml")),
    /list\.yaml: expected a mapping/,
  );
  const missing = join(await Deno.makeTempDir(), "nope.yaml");
  await assert.rejects(
    () => loadTrainConfig(missing),
    (e: Error) => e instanceof TrainConfigError && e.message.includes(missing),
  );
});

Deno.test("config: --set overrides, parsed as YAML scalars", async () => {
  assert.deepEqual(
    parseSets(["train.learningRate=2e-5", "lora.targetModules=[q_proj, v_proj]", "data.system=null"]),
    {
      train: { learningRate: 2e-5 },
      lora: { targetModules: ["q_proj", "v_proj"] },
      data: { system: null },
    },
  );
  assert.deepEqual(parseSets(["data.instruction=Answer: briefly", "name=my-run"]), {
    data: { instruction: "Answer: briefly" },
    name: "my-run",
  });
  assert.match(
    configError(() => parseSets(["train.learningRate"])),
    /--set train\.learningRate: expected key\.path=value/,
  );
  const cfg = await loadTrainConfig(join(CONFIGS, "tiny.yaml"), [
    "train.updates=3",
    "model.device=cuda:1",
    "model.attention=eager",
  ]);
  assert.equal(cfg.train.updates, 3);
  assert.equal(cfg.model.attention, "eager");
  assert.equal(cfg.model.device, "cuda:1");
  assert.equal(cfg.rollout.k, 2, "the file's values stay");
  await assert.rejects(
    () => loadTrainConfig(undefined, ["rollout.kk=3"]),
    (e: Error) => e.message === "--set: unknown key rollout.kk (did you mean k?)",
  );
});

Deno.test("config: the printed config is itself a config that gives the same settings", async () => {
  const cfg = await loadTrainConfig(join(CONFIGS, "phi-tiny-moe.yaml"), ["data.system=Be brief."]);
  const again = applyOverrides(DEFAULTS, parseYaml(formatConfig(cfg), "printed"), "printed");
  assert.deepEqual(again, cfg);
});

Deno.test("schedule: linear warm-up, then constant or cosine to the floor", () => {
  const s = { updates: 100, warmupUpdates: 10, schedule: "constant" as const, minLrRatio: 0.1 };
  assert.equal(lrFactor(0, s), 0.1);
  assert.equal(lrFactor(9, s), 1);
  assert.equal(lrFactor(50, s), 1);
  const c = { ...s, schedule: "cosine" as const };
  assert.equal(lrFactor(10, c), 1);
  assert.ok(Math.abs(lrFactor(99, c) - 0.1) < 1e-12);
  assert.ok(Math.abs(lrFactor(10 + 89 / 2, c) - 0.55) < 1e-12);
  assert.equal(lrFactor(0, { ...s, warmupUpdates: 0 }), 1);
});

Deno.test("train/main.ts: prints the resolved config; a bad config exits 2 naming the key", async () => {
  const run = async (...args: string[]): Promise<Deno.CommandOutput> =>
    await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "train/main.ts", ...args],
      cwd: ROOT,
      env: { INIT_CWD: ROOT },
    }).output();
  const ok = await run("--config", "configs/tiny.yaml", "--set", "train.updates=7", "--print-config");
  const out = new TextDecoder().decode(ok.stdout);
  assert.equal(ok.code, 0, new TextDecoder().decode(ok.stderr));
  assert.match(out, /updates: 7/);
  assert.match(out, /id: tests\/fixtures\/models\/qwen3-moe-tiny/);
  const bad = await run("--config", "configs/tiny.yaml", "--set", "train.lerning_rate=1");
  assert.equal(bad.code, 2);
  assert.match(
    new TextDecoder().decode(bad.stderr),
    /unknown key train\.lerning_rate \(did you mean learningRate\?\)/,
  );
});

Deno.test("command line: an unknown option is named plainly, with the nearest option or its --set", () => {
  const said: string[] = [];
  const error = console.error;
  console.error = (m: string) => void said.push(m.split("\n")[0]!);
  try {
    const parse = (args: string[], positionals = false): number | object =>
      parseCommandLine(
        "train",
        "usage",
        args,
        { resume: { type: "boolean" }, set: { type: "string" } },
        positionals,
        setOptionHint,
      );
    assert.equal(parse(["--resum"]), 2);
    assert.equal(parse(["--updates", "3"]), 2);
    assert.equal(parse(["--learning_rate=1e-5"]), 2);
    assert.equal(parse(["--limit", "3"]), 2);
    assert.equal(parse(["--bogus"], true), 2);
  } finally {
    console.error = error;
  }
  assert.deepEqual(said, [
    "train: unknown option --resum (did you mean --resume?)",
    "train: unknown option --updates (settings are given as --set key=value: --set train.updates=…)",
    "train: unknown option --learning_rate (settings are given as --set key=value: --set train.learningRate=…)",
    "train: unknown option --limit (settings are given as --set key=value: --set data.limit=… or --set eval.limit=…)",
    'train: unknown option --bogus; to pass --bogus as an argument, put it after "--"',
  ]);
});

Deno.test("config: --set completes a file, keeps text as typed, and YAML merge keys work", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "moerl_cfg_" });
  try {
    // Alone the file is inconsistent (generationBatch 2 < k 4); its --set makes it whole: checked once, at the end.
    const file = join(tmp, "layer.yaml");
    await Deno.writeTextFile(file, "rollout:\n  generationBatch: 2\n");
    assert.equal((await loadTrainConfig(file, ["rollout.k=2"])).rollout.generationBatch, 2);
    await assert.rejects(() => loadTrainConfig(file), /layer\.yaml: rollout\.generationBatch: 2 is smaller/);
    await assert.rejects(
      () => loadTrainConfig(file, ["seed=1"]),
      /layer\.yaml with --set: rollout\.generationBatch/,
    );
    // Text: what YAML would cut (a comment) or empty (an anchor) is kept as typed; "key=" is the empty string.
    const sets = parseSets([
      "data.system=Answer #1 first",
      "data.instruction=",
      "name=#1",
      "train.learningRate=1e-5",
    ]);
    assert.deepEqual(sets, {
      data: { system: "Answer #1 first", instruction: "" },
      name: "#1",
      train: { learningRate: 1e-5 },
    });
    assert.deepEqual(parseSets(["data.limit=null", "data.system=~"]), {
      data: { limit: null, system: null },
    });
    // Merge keys share settings within a file.
    const merged = join(tmp, "merged.yaml");
    await Deno.writeTextFile(merged, "train:\n  <<: {updates: 7, microBatch: 2}\n  gradAccum: 3\n");
    const cfg = await loadTrainConfig(merged);
    assert.deepEqual([cfg.train.updates, cfg.train.microBatch, cfg.train.gradAccum], [7, 2, 3]);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
  // Messages: a non-finite number is shown as it is; Object.prototype's names are not suggestions.
  assert.match(
    configError(() => applyOverrides(DEFAULTS, { train: { learningRate: Infinity } }, "f.yaml")),
    /got Infinity/,
  );
  assert.doesNotMatch(
    configError(() => applyOverrides(DEFAULTS, { constructor: 1 }, "f.yaml")),
    /native code/,
  );
});

Deno.test("dataWarnings: a local file labelled as the other split, and evaluation on the training problems", async () => {
  const all = { training: true, evalSplit: "test" } as const;
  assert.deepEqual(dataWarnings(await loadTrainConfig(join(CONFIGS, "default.yaml")), all), []);
  const tiny = await loadTrainConfig(join(CONFIGS, "tiny.yaml"));
  assert.deepEqual(
    dataWarnings(tiny, { training: true, evalSplit: tiny.eval.split }),
    ["evaluation reads the training problems (tests/fixtures/gsm8k/train-head.jsonl): its accuracy is not held out"],
  );
  const mislabelled = await loadTrainConfig(join(CONFIGS, "tiny.yaml"), [
    "eval.split=test",
    "data.split=test",
  ]);
  const warnings = dataWarnings(mislabelled, all);
  assert.equal(warnings.length, 3, warnings.join("\n"));
  assert.match(warnings[0]!, /^tests\/fixtures\/gsm8k\/train-head\.jsonl is named as GSM8K's train split/);
  assert.deepEqual(
    dataWarnings(mislabelled, { training: false, evalSplit: null }),
    [],
    "nothing read, nothing said",
  );
  // A local file is the same problems whatever split labels it, and however its path is written.
  const oneFile = await loadTrainConfig(join(CONFIGS, "default.yaml"), [
    "data.source=mine/gsm8k.jsonl",
    "eval.source=./mine/gsm8k.jsonl",
  ]);
  assert.deepEqual(dataWarnings(oneFile, all), [
    "evaluation reads the training problems (./mine/gsm8k.jsonl): its accuracy is not held out",
  ]);
  const hubEvalOnTrain = await loadTrainConfig(join(CONFIGS, "default.yaml"), ["eval.split=train"]);
  assert.deepEqual(dataWarnings(hubEvalOnTrain, { training: false, evalSplit: "train" }), [
    "evaluation reads the training problems (openai/gsm8k): its accuracy is not held out",
  ]);
});

Deno.test("precisionWarning: float16 with train.lossScale off is warned of; scaled float16, bfloat16 and float32 are not", async () => {
  const of = async (dtype: string, lossScale = "auto") =>
    precisionWarning(
      await loadTrainConfig(join(CONFIGS, "default.yaml"), [
        `model.dtype=${dtype}`,
        `train.lossScale=${lossScale}`,
      ]),
    );
  assert.match(
    (await of("float16", "off"))!,
    /float16 with train\.lossScale off: gradients below ~6e-8 become zero/,
  );
  assert.deepEqual([await of("float16"), await of("bfloat16", "off"), await of("float32")], [
    null,
    null,
    null,
  ]);
  await assert.rejects(
    () => loadTrainConfig(join(CONFIGS, "default.yaml"), ["train.lossScale=static"]),
    /train\.lossScale/,
  );
});
