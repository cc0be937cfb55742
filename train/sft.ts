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
