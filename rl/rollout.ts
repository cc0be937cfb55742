/**
 * Rollouts: K sampled completions per prompt from the current policy, their
 * rewards, and the prompt + completion batch the losses are computed on.
 * @module
 */
import { type Generator, type Tensor, tensor } from "../ffi/mod.ts";
import { generate } from "../model/generate.ts";
import { leftPad } from "../model/padding.ts";
import type { Policy, SequenceBatch } from "./policy.ts";
import { type FinishReason, reward, type RewardConfig, rewardConfig, type RewardResult } from "./reward.ts";

/** How rollouts are sampled and scored. */
export interface RolloutConfig {
  /** Completions sampled per prompt (the group size K). */
  k: number;
  /** Token cap per completion. */
  maxNewTokens: number;
  /** Sampling temperature (1 = the policy's own distribution). */
  temperature: number;
  /** Nucleus sampling mass (1 = off). */
  topP: number;
  /** Top-k sampling (0 = off). */
  topK: number;
  /** Reward weights and rules (overrides of rl/reward.ts's defaults). */
  reward: Partial<RewardConfig>;
  /** Ids that end a completion (default: the tokenizer's `stopTokenIds`). */
  eosTokenIds?: readonly number[];
  /** Pad id for the batch (default: the tokenizer's pad token, else the first EOS id). */
  padTokenId?: number;
}

/** What a rollout needs of a tokenizer: model/tokenizer.ts's `Tokenizer` has it. */
export interface RolloutTokenizer {
  /** Ids that end a completion (model/tokenizer.ts `stopTokenIds`: EOS ids and the end-of-turn token). */
  readonly stopTokenIds: readonly number[];
  /** The pad token's id, if any. */
  readonly padTokenId: number | null;
  /** Text of token ids. */
  decode(ids: readonly number[], opts?: { skipSpecialTokens?: boolean }): Promise<string>;
}

/** One prompt: its token ids (e.g. data/prompt.ts `buildPrompt`) and the gold answer. */
export interface RolloutPrompt {
  /** The rendered prompt's token ids. */
  ids: readonly number[];
  /** The gold answer: a number, a number string, or a GSM8K solution ending in `#### n`. */
  answer: string | number;
  /** The prompt's text, for logging (decoded from ids when absent). */
  text?: string;
}

/** One sampled completion and its reward. */
export interface RolloutCompletion {
  /** Index of its prompt in the prompt list. */
  prompt: number;
  /** Generated ids, including the EOS token when one was emitted. */
  tokens: number[];
  /** Log-probs of those tokens under the sampling model (temperature 1, no filtering). */
  logprobs: number[];
  /** Decoded text (special tokens skipped). */
  text: string;
  /** Why generation stopped. */
  finishReason: FinishReason;
  /** The reward and its parts. */
  reward: RewardResult;
}

/** What {@link rollout} returns. The batch's tensors are the caller's: free them with `dispose(batch)`. */
export interface Rollout {
  /** k completions per prompt, prompt-major (`[p0c0, …, p0c(k−1), p1c0, …]`). */
  completions: RolloutCompletion[];
  /** Their rewards, in the same order. */
  rewards: number[];
  /** The prompts' texts (given or decoded). */
  promptTexts: string[];
  /** Prompt + completion, left-padded, on the model's device; completionMask marks the completions. */
  batch: SequenceBatch;
  /** Generated tokens in all (EOS included). */
  tokensGenerated: number;
  /** Wall-clock seconds of generation and scoring. */
  seconds: number;
}

/** The EOS and pad ids in force. */
export function specialIds(
  cfg: Pick<RolloutConfig, "eosTokenIds" | "padTokenId">,
  tokenizer: RolloutTokenizer,
): { eos: number[]; pad: number } {
  const eos = [...(cfg.eosTokenIds ?? tokenizer.stopTokenIds)];
  const pad = cfg.padTokenId ?? tokenizer.padTokenId ?? eos[0];
  if (pad === undefined) throw new Error("rollout: no pad id (set padTokenId, or give EOS ids)");
  return { eos, pad };
}

/**
 * Prompt + completion sequences as a {@link SequenceBatch} on device:
 * left-padded with pad, positions `cumsum(mask) − 1` (pads 1), and
 * completionMask 1 on each row's completion tokens (its last tokens).
 */
export function sequenceBatch(
  prompts: readonly (readonly number[])[],
  completions: readonly (readonly number[])[],
  pad: number,
  device: Tensor["device"],
): SequenceBatch {
  if (prompts.length !== completions.length || prompts.length === 0) {
    throw new RangeError(`sequenceBatch: ${prompts.length} prompts for ${completions.length} completions`);
  }
  const padded = leftPad(prompts.map((p, i) => [...p, ...completions[i]!]), pad);
  const width = padded.inputIds[0]!.length;
  const comp = completions.map((c) => [...Array(width - c.length).fill(0), ...Array(c.length).fill(1)]);
  const i64 = { dtype: "int64" as const, device };
  return {
    inputIds: tensor(padded.inputIds, i64),
    attentionMask: tensor(padded.attentionMask, i64),
    positionIds: tensor(padded.positionIds, i64),
    completionMask: tensor(comp, i64),
  };
}

/**
 * Samples cfg.k completions for every prompt from the policy as it is (call
 * `policy.train(false)` first for dropout-free sampling), scores them with
 * rl/reward.ts and builds the training batch. Each prompt is repeated k
 * times in one generation batch; pass a seeded generator for reproducible
 * samples.
 * @throws {RangeError} for no prompts or a bad k; {@link rewardConfig}'s errors for a bad reward config
 */
export async function rollout(
  policy: Policy,
  tokenizer: RolloutTokenizer,
  prompts: readonly RolloutPrompt[],
  cfg: RolloutConfig,
  generator?: Generator,
): Promise<Rollout> {
  if (prompts.length === 0) throw new RangeError("rollout: no prompts");
  if (!Number.isSafeInteger(cfg.k) || cfg.k < 1) {
    throw new RangeError(`rollout: k must be >= 1, got ${cfg.k}`);
  }
  const rewardCfg = rewardConfig(cfg.reward);
  const { eos, pad } = specialIds(cfg, tokenizer);
  const start = performance.now();
  const rows = prompts.flatMap((p) => Array.from({ length: cfg.k }, () => [...p.ids]));
  const gen = await generate(policy.model.decoder, rows, {
    maxNewTokens: cfg.maxNewTokens,
    eosTokenIds: eos,
    padTokenId: pad,
    doSample: true,
    temperature: cfg.temperature,
    topP: cfg.topP,
    topK: cfg.topK,
    generator,
    decode: (ids) => tokenizer.decode(ids, { skipSpecialTokens: true }),
  });
  const completions: RolloutCompletion[] = gen.tokens.map((tokens, i) => {
    const p = Math.floor(i / cfg.k);
    const finishReason = gen.finishReasons[i]!, text = gen.text![i]!;
    return {
      prompt: p,
      tokens,
      logprobs: gen.logprobs[i]!,
      text,
      finishReason,
      reward: reward({ text, tokens, finishReason }, prompts[p]!.answer, rewardCfg),
    };
  });
  const promptTexts = await Promise.all(prompts.map((p) => p.text ?? tokenizer.decode(p.ids)));
  const seconds = (performance.now() - start) / 1000;
  const batch = sequenceBatch(rows, gen.tokens, pad, policy.model.decoder.embed.device);
  return {
    completions,
    rewards: completions.map((c) => c.reward.reward),
    promptTexts,
    batch,
    tokensGenerated: gen.tokens.reduce((s, t) => s + t.length, 0),
    seconds,
  };
}
