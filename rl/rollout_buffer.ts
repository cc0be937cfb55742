/**
 * What the collect phase (rl/collect.ts) hands to the learn phase: the
 * prompts, their K completions each with log-probs and rewards, and for MoE
 * models the routing record, in a {@link RolloutBuffer}; and the batches the
 * learn phase builds from it. Between the phases a caller may look at the
 * rollouts, re-score them (assign a sequence's `reward`: the metrics follow)
 * or keep some prompt groups ({@link RolloutBuffer.selectPrompts}).
 * @module
 */
import { type Device, keep, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import type { FinishReason } from "../model/generate.ts";
import { leftPad } from "../model/padding.ts";
import type { SequenceBatch } from "./policy.ts";
import type { ScoreResult } from "./reward.ts";

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
  reward: ScoreResult;
}

/** One completion, for logging. */
export interface Sample {
  /** The prompt's text. */
  prompt: string;
  /** The completion's text. */
  completion: string;
  /** Its reward. */
  reward: number;
  /** Whether its answer was right (null: its score function did not say). */
  correct: boolean | null;
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
  /** Fraction cut off at the token cap (finish reason "length"), whatever the score function says. */
  truncated_fraction: number;
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
  /** Tokens generated / (prefill + decode seconds), of the collect that generated them (a selection keeps it). */
  tokens_per_second: number;
}

/** The collect phase's timings, which a buffer keeps (its other metrics follow from its sequences). */
export type CollectTimings = Pick<
  CollectMetrics,
  "prefill_seconds" | "decode_seconds" | "scoring_seconds" | "tokens_per_second"
>;

const mean = (xs: readonly number[]): number => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);

/** The metrics of completions' rewards and lengths. */
function sequenceMetrics(sequences: readonly RolloutSequence[]): Omit<CollectMetrics, keyof CollectTimings> {
  const rewards = sequences.map((s) => s.reward.reward);
  const rewardMean = mean(rewards);
  const rate = (f: (s: RolloutSequence) => boolean): number => mean(sequences.map((s) => (f(s) ? 1 : 0)));
  const generated = sequences.reduce((n, s) => n + s.tokens.length, 0);
  return {
    reward_mean: rewardMean,
    reward_std: Math.sqrt(mean(rewards.map((r) => (r - rewardMean) ** 2))),
    accuracy: rate((s) => s.reward.correct === true),
    marker_rate: rate((s) => s.reward.marker === true),
    overlong_rate: rate((s) => s.reward.overLength === true),
    truncated_fraction: rate((s) => s.finishReason === "length"),
    completion_len_mean: generated / sequences.length,
    tokens_generated: generated,
  };
}

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
  /** The token cap the completions were sampled with (Dr. GRPO's divisor uses it); null when not known. */
  readonly maxNewTokens: number | null;
  /** The pad id of every batch built from the buffer. */
  readonly pad: number;
  /** The completions, prompt-major: `[p0c0, …, p0c(k−1), p1c0, …]`. */
  readonly sequences: readonly RolloutSequence[];
  /**
   * Experts of every recorded token, [moeLayers, 1 + tokens, k] int16, row 0 all −1; sequence i's
   * prompt and completion tokens from row `routingStart[i]`. Null when not recorded.
   */
  readonly routing: Tensor | null;
  readonly #routingStart: readonly number[];
  readonly #device: Device;
  readonly #timings: CollectTimings;
  #disposed = false;

  /** Assembles a buffer (see {@link collect}); takes ownership of routing. */
  constructor(init: {
    prompts: readonly RolloutPrompt[];
    promptTexts: readonly string[];
    k: number;
    temperature: number;
    /** The token cap of the sampling (default null: not known, e.g. a buffer assembled by hand). */
    maxNewTokens?: number | null;
    pad: number;
    sequences: readonly RolloutSequence[];
    timings: CollectTimings;
    routing: Tensor | null;
    routingStart: readonly number[];
    device: Device;
  }) {
    this.prompts = init.prompts;
    this.promptTexts = init.promptTexts;
    this.k = init.k;
    this.temperature = init.temperature;
    this.maxNewTokens = init.maxNewTokens ?? null;
    this.pad = init.pad;
    this.sequences = init.sequences;
    this.routing = init.routing && keep(init.routing); // the buffer's to free, not a scope's (it may outlive one)
    this.#routingStart = init.routingStart;
    this.#device = init.device;
    this.#timings = init.timings;
  }

  /** The collect phase's numbers: those of the completions as they are now (re-scored ones too), and its timings. */
  get metrics(): CollectMetrics {
    return { ...sequenceMetrics(this.sequences), ...this.#timings };
  }

  /**
   * A new buffer of the chosen prompts, each with its K completions, in the given order, and its own copy
   * of their routing rows: e.g. to drop prompt groups before learning. It keeps this buffer's timings.
   * @throws {RangeError} for no prompts, a repeated one, or an index out of range
   */
  selectPrompts(indices: readonly number[]): RolloutBuffer {
    this.checkAlive("RolloutBuffer.selectPrompts");
    if (indices.length === 0) throw new RangeError("selectPrompts: no prompts chosen");
    const bad = indices.findIndex((p, i) =>
      !Number.isInteger(p) || p < 0 || p >= this.prompts.length || indices.indexOf(p) !== i
    );
    if (bad >= 0) {
      throw new RangeError(
        `selectPrompts: index ${
          indices[bad]
        } (at ${bad}) is repeated or not one of the ${this.prompts.length} prompts`,
      );
    }
    const order = indices.flatMap((p) => Array.from({ length: this.k }, (_, j) => p * this.k + j));
    const wrong = order.find((i) => this.sequences[i]?.prompt !== Math.floor(i / this.k));
    if (wrong !== undefined) {
      throw new RangeError(
        `selectPrompts: sequence ${wrong} is not of prompt ${
          Math.floor(wrong / this.k)
        }: the buffer is not ` +
          `prompt-major with ${this.k} completions per prompt`,
      );
    }
    // Each its own reward object, so that re-scoring one buffer leaves the other as it was.
    const sequences = order.map((i, n) => {
      const s = this.sequences[i]!;
      return { ...s, prompt: Math.floor(n / this.k), reward: { ...s.reward } };
    });
    const rows = [0], routingStart: number[] = []; // row 0: the −1 sentinel of padding
    if (this.routing) {
      for (const i of order) {
        const s = this.sequences[i]!, n = this.prompts[s.prompt]!.ids.length + s.tokens.length;
        routingStart.push(rows.length);
        for (let j = 0; j < n; j++) rows.push(this.#routingStart[i]! + j);
      }
    }
    const routing = this.routing &&
      tidy(() =>
        this.routing!.indexSelect(1, tensor(rows, { dtype: "int64", device: this.routing!.device }))
      );
    return new RolloutBuffer({
      prompts: indices.map((p) => this.prompts[p]!),
      promptTexts: indices.map((p) => this.promptTexts[p]!),
      k: this.k,
      temperature: this.temperature,
      maxNewTokens: this.maxNewTokens,
      pad: this.pad,
      sequences,
      routing,
      routingStart,
      device: this.#device,
      timings: this.#timings,
    });
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
      correct: s.reward.correct ?? null,
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
    this.checkAlive("RolloutBuffer.batch");
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

  /** True once {@link dispose}d: its batches can no longer be built. */
  get disposed(): boolean {
    return this.#disposed;
  }

  /**
   * Throws when the buffer was disposed (its routing record would fail as "tensor used after dispose()").
   * @throws {Error} naming what tried to use it
   */
  checkAlive(what: string): void {
    if (this.#disposed) {
      throw new Error(`${what}: the rollout buffer was disposed (at the end of its \`using\` block?)`);
    }
  }

  /** Frees the routing record. */
  dispose(): void {
    this.#disposed = true;
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
