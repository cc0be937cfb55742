/**
 * Supervised warm-up: maximise the log-likelihood of reference solutions
 * (each followed by the end-of-turn token) through the policy's adapters.
 * @module
 */
import { AdamW, clipGradNorm, dispose, type Tensor } from "../ffi/mod.ts";
import { mulberry32 } from "../data/batches.ts";
import type { Gsm8kExample } from "../data/gsm8k.ts";
import { buildPrompts, type PromptOptions } from "../data/prompt.ts";
import { checkTokenIds } from "../model/padding.ts";
import type { Tokenizer } from "../model/tokenizer.ts";
import type { Policy, PolicyOutput } from "../rl/policy.ts";
import { sequenceBatch } from "../rl/rollout_buffer.ts";
import { DEFAULT_MAX_GRAD_NORM } from "../rl/learn.ts";

/** −mean log-probability of the completion tokens. */
export function nllLoss(out: PolicyOutput): Tensor {
  return out.logprobs.mul(out.mask).sum().neg().div(out.mask.sum());
}

/** Options of {@link supervisedWarmup}. */
export interface SftOptions {
  /** Optimizer steps. */
  steps: number;
  /** Examples per step. */
  batchSize: number;
  /** AdamW learning rate. */
  lr: number;
  /** Order of examples. */
  seed: number;
  /** Prompt rendering (instruction, system). */
  prompt?: PromptOptions;
  /** Called after each step. */
  onStep?: (step: number, loss: number) => void;
}

/** Token ids of each example's prompt and of its solution followed by the end-of-turn token (else the EOS). */
export async function sftPairs(
  tok: Tokenizer,
  examples: readonly Gsm8kExample[],
  prompt: PromptOptions = {},
): Promise<{ prompt: number[]; completion: number[] }[]> {
  const prompts = await buildPrompts(tok, examples.map((e) => e.question), prompt);
  const end = tok.endOfTurnId ?? tok.eosTokenId;
  if (end === null) {
    throw new Error(
      "supervised warm-up: the tokenizer has no end-of-turn or EOS token to end solutions with",
    );
  }
  const sols = await tok.encodeBatch(examples.map((e) => e.solution), { addSpecialTokens: false });
  return prompts.map((p, i) => ({ prompt: p.ids, completion: [...sols[i]!, end] }));
}

/** Trains the policy's adapters on reference solutions; returns the loss of every step. */
export async function supervisedWarmup(
  policy: Policy,
  tok: Tokenizer,
  examples: readonly Gsm8kExample[],
  opts: SftOptions,
): Promise<number[]> {
  const pairs = await sftPairs(tok, examples, opts.prompt);
  const pad = tok.padTokenId ?? 0, device = policy.model.decoder.embed.device;
  const vocab = policy.model.decoder.embed.size(0);
  checkTokenIds("supervisedWarmup", pairs.map((p) => [...p.prompt, ...p.completion]), vocab, pad);
  using opt = new AdamW([{ params: policy.policyParameters(), lr: opts.lr, weightDecay: 0 }]);
  const rand = mulberry32(opts.seed);
  const losses: number[] = [];
  const wasTraining = policy.lora.state.training;
  policy.train(true);
  try {
    for (let step = 0; step < opts.steps; step++) {
      const picked = Array.from({ length: opts.batchSize }, () => pairs[Math.floor(rand() * pairs.length)]!);
      const batch = sequenceBatch(picked.map((p) => p.prompt), picked.map((p) => p.completion), pad, device);
      try {
        losses.push(policy.backward(batch, nllLoss));
      } finally {
        dispose(batch);
      }
      clipGradNorm(policy.policyParameters(), DEFAULT_MAX_GRAD_NORM);
      opt.step();
      opt.zeroGrad();
      opts.onStep?.(step, losses[losses.length - 1]!);
    }
  } finally {
    policy.train(wasTraining);
  }
  return losses;
}

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
 * \`deno task sft …\` (USAGE above): a supervised warm-up whose result
 * (adapters merged into the weights) is saved as a new model folder, the
 * base for RL. Paths are relative to the folder the command was started in
 * (\`INIT_CWD\` under \`deno task\`). Exit status: 0 done, 1 for an error
 * while running, 2 for a bad argument.
 */
async function main(args: string[]): Promise<number> {
  const { failureText, numberOption, parseCommandLine, startDir } = await import("./cli.ts");
  const { resolve } = await import("node:path");
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
  const { exists } = await import("../model/atomic_write.ts");
  // A folder (relative to where the command started), else a Hub id as loadModel takes it.
  const local = resolve(base, v.model!);
  const modelDir = /^[./]/.test(v.model!) || await exists(local) ? local : v.model!;
  const out = resolve(base, v.out!);
  const { modelWeightsIn } = await import("../model/save.ts"); // the check saveModel makes, before training
  if (out === local || await modelWeightsIn(out)) {
    console.error(`sft: --out ${out} holds a model already (or is --model): give a new folder\n${USAGE}`);
    return 2;
  }
  try {
    const { loadModel } = await import("../model/model.ts");
    const { saveModel } = await import("../model/save.ts");
    const { Tokenizer: Tok } = await import("../model/tokenizer.ts");
    const { Policy: P } = await import("../rl/policy.ts");
    const { DEFAULT_LORA } = await import("../model/lora_apply.ts");
    const { evaluateExamples } = await import("../rl/evaluate.ts");
    const { manualSeed } = await import("../ffi/mod.ts");
    const examples = v.task === "arithmetic"
      ? (await import("../data/arithmetic.ts")).arithmeticSplit(0.25, n.seed).train
      : (await (await import("../data/gsm8k.ts")).loadGsm8k(resolve(base, v.data!))).examples;
    manualSeed(n.seed);
    using model = await loadModel(modelDir);
    const tok = await Tok.load(model.dir);
    const policy = new P(model, {
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
