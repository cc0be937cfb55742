/**
 * The collect phase of an update: K sampled completions for every prompt,
 * generated in large batches (each prompt prefilled once, its KV cache
 * copied to its K samples), scored, and kept in a {@link RolloutBuffer} with
 * what the learn phase needs: each token's log-probability under the
 * sampling distribution and, for MoE models, the experts every token used in
 * every layer (for routing replay).
 * @module
 */
import { cat, type Device, dispose, full, Generator, keep, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import { epochSeed } from "../data/batches.ts";
import { DecodeSession } from "../model/decode_static.ts";
import { type FinishReason, generate } from "../model/generate.ts";
import { leftPad } from "../model/padding.ts";
import type { Policy, SequenceBatch } from "./policy.ts";
import { rlConfig, type RlOverrides } from "./config.ts";
import { parseGold } from "../data/answer.ts";
import { type Completion, reward, type RewardResult } from "./reward.ts";

/** One prompt: its token ids (e.g. data/prompt.ts `buildPrompt`) and the gold answer. */
export interface RolloutPrompt {
  /** The rendered prompt's token ids. */
  ids: readonly number[];
  /** The gold answer: a number, a number string, or a GSM8K solution ending in `#### n`. */
  answer: string | number;
  /** The prompt's text, for logging (decoded from ids when absent). */
  text?: string;
}

/** What collecting needs of a tokenizer: model/tokenizer.ts's `Tokenizer` has it. */
export interface RolloutTokenizer {
  /** Ids that end a completion (model/tokenizer.ts `stopTokenIds`: EOS ids and the end-of-turn token). */
  readonly stopTokenIds: readonly number[];
  /** The pad token's id, if any. */
  readonly padTokenId: number | null;
  /** Text of token ids (sampled ids past the vocabulary's end are dropped: `skipUnknownIds`). */
  decode(
    ids: readonly number[],
    opts?: { skipSpecialTokens?: boolean; skipUnknownIds?: boolean },
  ): Promise<string>;
}

/**
 * Scores one completion (default: rl/reward.ts `reward` against the prompt's answer). It may be async (a
 * verifier, a reward model): a generation batch's completions are scored concurrently. Only `reward` must be
 * set (a finite number); `correct`, `marker` and `overLength` feed the metrics.
 */
export type ScoreFn = (completion: Completion, prompt: RolloutPrompt) => RewardResult | Promise<RewardResult>;

/** A score function's result, checked: an object with a finite reward. */
function checkScore(r: unknown, prompt: number, sample: number): RewardResult {
  const value = (r as { reward?: unknown } | null)?.reward;
  if (typeof r !== "object" || r === null || typeof value !== "number" || !Number.isFinite(value)) {
    const shown = typeof r === "object" && r !== null ? `a reward of ${String(value)}` : String(r);
    throw new TypeError(
      `collect: the score function gave ${shown} for sample ${sample} of prompt ${prompt} ` +
        `(it must return a RewardResult whose reward is a finite number)`,
    );
  }
  return r as RewardResult;
}

/** Options of {@link collect}. */
export interface CollectOptions {
  /** Random source for sampling (seed it for reproducible rollouts). */
  generator?: Generator;
  /**
   * Instead of a generator: each generation batch samples from its own generator, seeded from
   * (seed, the update-wide index of the batch's first prompt). A batch's samples then depend only
   * on its own prompts, so the prompts of an update can be split over data-parallel ranks (in
   * whole generation batches) and still draw what one process drawing them all would.
   */
  seed?: number;
  /** The update-wide index of prompts[0] (default 0): a data-parallel rank's offset, for `seed`. */
  firstPrompt?: number;
  /** Scores completions instead of the GSM8K reward of the config's `reward` section. */
  score?: ScoreFn;
  /** Record each token's experts for routing replay (default true; ignored for a model without MoE layers). */
  recordRouting?: boolean;
  /** Ids that end a completion (default: the tokenizer's stopTokenIds). */
  stopTokenIds?: readonly number[];
  /** Pad id (default: the tokenizer's pad token, else the first stop id). */
  padTokenId?: number;
}

/** One sampled completion and its reward. */
export interface RolloutSequence {
  /** Index of its prompt in the buffer's prompt list. */
  prompt: number;
  /** Generated ids, up to and including the first stop token when one was emitted. */
  tokens: number[];
  /** Log-probs of those tokens under the sampling distribution (tempered, untruncated). */
  logprobs: number[];
  /** Decoded text (special tokens skipped). */
  text: string;
  /** Why generation stopped. */
  finishReason: FinishReason;
  /** The reward and its parts. */
  reward: RewardResult;
}

/** One completion, for logging. */
export interface Sample {
  /** The prompt's text. */
  prompt: string;
  /** The completion's text. */
  completion: string;
  /** Its reward. */
  reward: number;
  /** Whether its answer was right. */
  correct: boolean;
}

/** Numbers of a collect phase. */
export interface CollectMetrics {
  /** Mean of the rewards. */
  reward_mean: number;
  /** Their std (population). */
  reward_std: number;
  /** Fraction of completions whose answer is correct. */
  accuracy: number;
  /** Fraction paid the final-answer marker bonus. */
  marker_rate: number;
  /** Fraction charged the over-length penalty. */
  overlong_rate: number;
  /** Mean completion length in tokens (the stop token included). */
  completion_len_mean: number;
  /** Generated tokens in all. */
  tokens_generated: number;
  /** Seconds in prompt forward passes. */
  prefill_seconds: number;
  /** Seconds in decode steps. */
  decode_seconds: number;
  /** Seconds decoding text and scoring. */
  scoring_seconds: number;
  /** tokens_generated / (prefill + decode seconds). */
  tokens_per_second: number;
}

const mean = (xs: readonly number[]): number => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);

/**
 * An update's rollouts: prompts, K completions each (prompt-major), their
 * rewards, and on the model's device the routing record. Owns native memory:
 * dispose it (or `using`).
 */
export class RolloutBuffer {
  /** The prompts, in order. */
  readonly prompts: readonly RolloutPrompt[];
  /** The prompts' texts (given or decoded). */
  readonly promptTexts: readonly string[];
  /** Completions per prompt. */
  readonly k: number;
  /** The sampling temperature (the learn phase uses it too). */
  readonly temperature: number;
  /** The pad id of every batch built from the buffer. */
  readonly pad: number;
  /** The completions, prompt-major: `[p0c0, …, p0c(k−1), p1c0, …]`. */
  readonly sequences: readonly RolloutSequence[];
  /** The collect phase's numbers. */
  readonly metrics: CollectMetrics;
  /**
   * Experts of every recorded token, [moeLayers, 1 + tokens, k] int16, row 0 all −1; sequence i's
   * prompt and completion tokens from row `routingStart[i]`. Null when not recorded.
   */
  readonly routing: Tensor | null;
  readonly #routingStart: readonly number[];
  readonly #device: Device;

  /** Assembles a buffer (see {@link collect}); takes ownership of routing. */
  constructor(init: {
    prompts: readonly RolloutPrompt[];
    promptTexts: readonly string[];
    k: number;
    temperature: number;
    pad: number;
    sequences: readonly RolloutSequence[];
    metrics: CollectMetrics;
    routing: Tensor | null;
    routingStart: readonly number[];
    device: Device;
  }) {
    this.prompts = init.prompts;
    this.promptTexts = init.promptTexts;
    this.k = init.k;
    this.temperature = init.temperature;
    this.pad = init.pad;
    this.sequences = init.sequences;
    this.metrics = init.metrics;
    this.routing = init.routing && keep(init.routing); // the buffer's to free, not a scope's (it may outlive one)
    this.#routingStart = init.routingStart;
    this.#device = init.device;
  }

  /** Number of completions. */
  get size(): number {
    return this.sequences.length;
  }

  /** The first n completions (all by default) as {prompt, completion, reward, correct}, for logs. */
  samples(n = this.size): Sample[] {
    return this.sequences.slice(0, n).map((s) => ({
      prompt: this.promptTexts[s.prompt]!,
      completion: s.text,
      reward: s.reward.reward,
      correct: s.reward.correct,
    }));
  }

  /** The rewards, one per completion. */
  get rewards(): number[] {
    return this.sequences.map((s) => s.reward.reward);
  }

  /**
   * Prompt + completion of the chosen sequences as a left-padded batch on
   * the model's device, and (when recorded) each token's experts per MoE
   * layer, [B·T, k] with −1 on padding, for routing replay.
   */
  batch(indices: readonly number[]): { batch: SequenceBatch; replay: Tensor[] | null } {
    const seqs = indices.map((i) => this.sequences[i]!);
    const batch = sequenceBatch(
      seqs.map((s) => this.prompts[s.prompt]!.ids),
      seqs.map((s) => s.tokens),
      this.pad,
      this.#device,
    );
    if (!this.routing) return { batch, replay: null };
    const width = batch.inputIds.size(1);
    const rows: number[] = [];
    indices.forEach((i, r) => {
      const n = this.prompts[seqs[r]!.prompt]!.ids.length + seqs[r]!.tokens.length;
      for (let j = 0; j < width; j++) rows.push(j < width - n ? 0 : this.#routingStart[i]! + j - (width - n));
    });
    const replay = tidy(() => {
      const idx = tensor(rows, { dtype: "int64", device: this.#device });
      return Array.from(
        { length: this.routing!.size(0) },
        (_, l) => this.routing!.select(0, l).indexSelect(0, idx),
      );
    });
    return { batch, replay };
  }

  /**
   * Per-token numbers of the chosen sequences as a [B, T] float32 tensor laid
   * out like {@link batch}'s: `values(i)` (one number per completion token of
   * sequence i) right-aligned, 0 elsewhere.
   */
  perToken(indices: readonly number[], width: number, values: (i: number) => readonly number[]): Tensor {
    const rows = indices.map((i) => {
      const v = values(i);
      return [...new Array<number>(width - v.length).fill(0), ...v];
    });
    return tensor(rows, { dtype: "float32", device: this.#device });
  }

  /** Frees the routing record. */
  dispose(): void {
    this.routing?.dispose();
  }

  /** Frees the routing record at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
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
  device: Device,
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
    completionLengths: completions.map((c) => c.length),
  };
}

/**
 * Samples rollout.k completions for every prompt from the policy as it is
 * (dropout off), scores them and keeps them in a {@link RolloutBuffer}.
 * Generation runs in batches of rollout.generationBatch sequences (all at
 * once by default), each prompt prefilled once for its K samples.
 * @param cfg overrides of rl/config.ts's defaults (the `rollout` and `reward` sections are used)
 * @throws {RangeError} for no prompts or a bad config
 */
export async function collect(
  policy: Policy,
  tokenizer: RolloutTokenizer,
  prompts: readonly RolloutPrompt[],
  cfg: RlOverrides = {},
  opts: CollectOptions = {},
): Promise<RolloutBuffer> {
  if (prompts.length === 0) throw new RangeError("collect: no prompts");
  const { rollout: c, reward: rewardCfg } = rlConfig(cfg);
  if (opts.generator && opts.seed !== undefined) {
    throw new RangeError("collect: give a generator or a seed, not both");
  }
  const score: ScoreFn = opts.score ?? ((completion, p) => reward(completion, p.answer, rewardCfg));
  if (!opts.score) { // before generating: the default reward needs a numeric gold answer
    const bad = prompts.findIndex((p) => parseGold(p.answer) === null);
    if (bad >= 0) {
      throw new RangeError(
        `collect: prompt ${bad}'s gold answer ${JSON.stringify(prompts[bad]!.answer)} is not a number`,
      );
    }
  }
  const stop = [...(opts.stopTokenIds ?? tokenizer.stopTokenIds)];
  const pad = opts.padTokenId ?? tokenizer.padTokenId ?? stop[0];
  if (pad === undefined) throw new Error("collect: no pad id (set padTokenId, or give stop ids)");
  const decoder = policy.model.decoder, device = decoder.embed.device;
  const record = (opts.recordRouting ?? true) && decoder.moeLayers > 0;
  const perBatch = c.generationBatch === null ? prompts.length : Math.floor(c.generationBatch / c.k);
  const wasTraining = policy.lora.state.training;
  const sequences: RolloutSequence[] = [];
  const routingParts: Tensor[] = [];
  const routingStart: number[] = [];
  let routedRows = 1; // row 0 is the −1 sentinel
  let prefill = 0, decode = 0;
  const t0 = performance.now();
  // One session for the update's generation batches: its buffers and graphs serve every batch.
  using session = c.decode === "eager" ? null : new DecodeSession(decoder, { graphs: c.decode === "graph" });
  policy.train(false);
  try {
    for (let first = 0; first < prompts.length; first += perBatch) {
      const chunk = prompts.slice(first, first + perBatch);
      using own = opts.seed === undefined
        ? null
        : new Generator(epochSeed(opts.seed, (opts.firstPrompt ?? 0) + first), device);
      const gen = await generate(decoder, chunk.map((p) => [...p.ids]), {
        maxNewTokens: c.maxNewTokens,
        eosTokenIds: stop,
        padTokenId: pad,
        doSample: true,
        temperature: c.temperature,
        topP: c.topP,
        topK: c.topK,
        generator: own ?? opts.generator,
        samplesPerPrompt: c.k,
        recordRouting: record,
        decodeDispatch: c.decodeDispatch,
        decodeMode: c.decode,
        session: session ?? undefined,
        decode: (ids) => tokenizer.decode(ids, { skipSpecialTokens: true, skipUnknownIds: true }),
      });
      try {
        prefill += gen.seconds.prefill;
        decode += gen.seconds.decode;
        // Scored together, so that an async scorer (a verifier, a reward model) can work on a batch at once.
        const scores = await Promise.all(
          gen.tokens.map((tokens, r) =>
            score(
              { text: gen.text![r]!, tokens, finishReason: gen.finishReasons[r]! },
              chunk[Math.floor(r / c.k)]!,
            )
          ),
        );
        const rows: number[] = [];
        gen.tokens.forEach((tokens, r) => {
          const p = first + Math.floor(r / c.k), prompt = prompts[p]!;
          const scored = checkScore(scores[r], p, r % c.k);
          const text = gen.text![r]!, finishReason = gen.finishReasons[r]!;
          sequences.push({
            prompt: p,
            tokens,
            logprobs: gen.logprobs[r]!,
            text,
            finishReason,
            reward: scored,
          });
          if (!gen.routing) return;
          // This row's prompt tokens (after its left padding) and completion tokens, in the record's layout.
          const width = gen.routing.size(2), from = r * width + gen.promptWidth - prompt.ids.length;
          routingStart.push(routedRows);
          for (let j = 0; j < prompt.ids.length + tokens.length; j++) rows.push(from + j);
          routedRows += prompt.ids.length + tokens.length;
        });
        if (gen.routing) {
          const routing = gen.routing;
          routingParts.push(tidy(() => {
            const [layers, b, w, k] = routing.shape as [number, number, number, number];
            const idx = tensor(rows, { dtype: "int64", device });
            return routing.reshape([layers, b * w, k]).indexSelect(1, idx);
          }));
        }
      } finally {
        gen.routing?.dispose(); // also when scoring throws
      }
    }
    const promptTexts = await Promise.all(prompts.map((p) => p.text ?? tokenizer.decode(p.ids)));
    let routing: Tensor | null = null;
    if (routingParts.length) {
      const [layers, , k] = routingParts[0]!.shape as [number, number, number];
      routing = tidy(() => cat([full([layers, 1, k], -1, { dtype: "int16", device }), ...routingParts], 1));
    }
    const rewards = sequences.map((s) => s.reward.reward);
    const rewardMean = mean(rewards);
    const generated = sequences.reduce((n, s) => n + s.tokens.length, 0);
    const rate = (f: (s: RolloutSequence) => boolean): number => mean(sequences.map((s) => (f(s) ? 1 : 0)));
    const total = (performance.now() - t0) / 1000;
    return new RolloutBuffer({
      prompts,
      promptTexts,
      k: c.k,
      temperature: c.temperature,
      pad,
      sequences,
      routing,
      routingStart,
      device,
      metrics: {
        reward_mean: rewardMean,
        reward_std: Math.sqrt(mean(rewards.map((r) => (r - rewardMean) ** 2))),
        accuracy: rate((s) => s.reward.correct),
        marker_rate: rate((s) => s.reward.marker),
        overlong_rate: rate((s) => s.reward.overLength),
        completion_len_mean: generated / sequences.length,
        tokens_generated: generated,
        prefill_seconds: prefill,
        decode_seconds: decode,
        scoring_seconds: Math.max(0, total - prefill - decode),
        tokens_per_second: generated / Math.max(prefill + decode, 1e-9),
      },
    });
  } finally {
    dispose(routingParts);
    policy.train(wasTraining);
  }
}
