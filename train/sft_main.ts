/**
 * `deno task sft` (train/sft.ts's supervised warm-up as a command): warms a
 * model up on question/answer records or the arithmetic task and saves the
 * result, adapters merged, as a new model folder.
 * @module
 */
import { resolve } from "node:path";
import { arithmeticSplit } from "../data/arithmetic.ts";
import { loadGsm8k } from "../data/gsm8k.ts";
import { manualSeed } from "../ffi/mod.ts";
import { exists } from "../model/atomic_write.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { modelWeightsIn, saveModel } from "../model/save.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { evaluateExamples } from "../rl/evaluate.ts";
import { Policy } from "../rl/policy.ts";
import { failureText, numberOption, parseCommandLine, startDir } from "./cli.ts";
import { supervisedWarmup } from "./sft.ts";

const USAGE = `usage: deno task sft --model DIR --out DIR (--data FILE.jsonl | --task arithmetic)
  [--steps N (200)] [--lr X (3e-3)] [--batch N (16)] [--seed N (1)] [--instruction TEXT ("")]

  --model DIR        a model folder or a Hub id; it loads on the CPU in its stored dtype
  --out DIR          a new folder for the warmed-up model (the adapters merged into its weights)
  --data FILE.jsonl  question/answer records, as GSM8K's
  --task arithmetic  75 of the 100 single-digit sums (the other 25 held out, chosen by --seed)
  --instruction TEXT appended to each question; default none (deno task train's default asks for "#### n")
  -h, --help         this text

The adapters are fixed: LoRA r 16, alpha 32 on every linear layer but the routers and the LM head, and on
every expert. Exit status: 0 done, 1 an error while running, 2 a bad argument.`;

/**
 * `deno task sft …` (USAGE above): a supervised warm-up whose result
 * (adapters merged into the weights) is saved as a new model folder, the
 * base for RL. Paths are relative to the folder the command was started in
 * (`INIT_CWD` under `deno task`). Exit status: 0 done, 1 for an error
 * while running, 2 for a bad argument.
 */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine("sft", USAGE, args, {
    model: { type: "string" },
    out: { type: "string" },
    data: { type: "string" },
    task: { type: "string" },
    steps: { type: "string", default: "200" },
    lr: { type: "string", default: "3e-3" },
    batch: { type: "string", default: "16" },
    seed: { type: "string", default: "1" },
    instruction: { type: "string", default: "" },
  });
  if (typeof parsed === "number") return parsed;
  const v = parsed.values;
  let n: { steps: number; lr: number; batch: number; seed: number };
  try {
    if (!v.model || !v.out) throw new TypeError("--model and --out are required");
    if (!v.data === (v.task === undefined)) {
      throw new TypeError("give one of --data FILE.jsonl, --task arithmetic");
    }
    if (v.task !== undefined && v.task !== "arithmetic") {
      throw new TypeError(`--task: unknown task "${v.task}"`);
    }
    n = {
      steps: numberOption("steps", v.steps, { integer: true, min: 1 }),
      lr: numberOption("lr", v.lr, { above: 0 }),
      batch: numberOption("batch", v.batch, { integer: true, min: 1 }),
      seed: numberOption("seed", v.seed, { integer: true, min: 0 }),
    };
  } catch (e) {
    console.error(`sft: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  const base = startDir();
  // A folder (relative to where the command started), else a Hub id as loadModel takes it.
  const local = resolve(base, v.model!);
  const modelDir = /^[./]/.test(v.model!) || await exists(local) ? local : v.model!;
  const out = resolve(base, v.out!);
  // The check saveModel makes, made before training.
  if (out === local || await modelWeightsIn(out)) {
    console.error(`sft: --out ${out} holds a model already (or is --model): give a new folder\n${USAGE}`);
    return 2;
  }
  try {
    const examples = v.task === "arithmetic"
      ? arithmeticSplit(0.25, n.seed).train
      : (await loadGsm8k(resolve(base, v.data!))).examples;
    manualSeed(n.seed);
    using model = await loadModel(modelDir);
    const tok = await Tokenizer.load(model.dir);
    const policy = new Policy(model, {
      lora: { ...DEFAULT_LORA, targetModules: "all-linear" },
    });
    const prompt = { instruction: v.instruction };
    const losses = await supervisedWarmup(policy, tok, examples, {
      steps: n.steps,
      batchSize: n.batch,
      lr: n.lr,
      seed: n.seed,
      prompt,
      onStep: (s, l) => {
        if ((s + 1) % 50 === 0) console.log(`step ${s + 1}: loss ${l.toFixed(4)}`);
      },
    });
    policy.train(false);
    const acc =
      (await evaluateExamples(model.decoder, tok, examples, { maxNewTokens: 32, batchSize: 32, prompt }))
        .totals.accuracy_flexible;
    policy.lora.merge();
    await saveModel(model, out);
    policy.dispose();
    console.log(
      `saved ${out}: final loss ${losses[losses.length - 1]?.toFixed(4)}, greedy accuracy on its data ${
        acc.toFixed(3)
      }`,
    );
    return 0;
  } catch (e) {
    console.error(`sft: ${failureText(e)}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
