/**
 * Greedy 0-shot GSM8K accuracy of a decoder, its adapters (if any) as they
 * are: the one evaluation loop behind `deno task evaluate` (eval/evaluate.ts),
 * the training loop's periodic evaluations and the supervised warm-up's
 * accuracy. Completions end at the tokenizer's stop tokens and are judged
 * strict and flexible (data/answer.ts `judgeAnswer`). Switch LoRA dropout off
 * first (`policy.train(false)`).
 * @module
 */
import type { Gsm8kExample } from "../data/gsm8k.ts";
import { type AnswerVerdict, judgeAnswer } from "../data/answer.ts";
import { parseGold } from "../data/numbers.ts";
import { buildPrompts, type PromptOptions } from "../data/prompt.ts";
import type { Decoder } from "../model/decoder.ts";
import { type DecodeMode, DecodeSession } from "../model/decode_static.ts";
import { type FinishReason, generate, type GenerateOptions } from "../model/generate.ts";
import type { Tokenizer } from "../model/tokenizer.ts";

/** One problem's result (a line of predictions.jsonl). */
export interface Prediction extends AnswerVerdict {
  /** The problem's id (`<split>-<index>`). */
  id: string;
  /** The question. */
  question: string;
  /** The gold answer (canonical number string). */
  answer_gold: string;
  /** The model's completion (special tokens removed). */
  completion: string;
  /** Generated tokens, EOS included. */
  completion_tokens: number;
  /** Why generation stopped ("length": the token cap). */
  finish_reason: FinishReason;
}

/** The totals of an evaluation. */
export interface EvalTotals {
  /** Problems evaluated. */
  n: number;
  /** Correct under strict extraction. */
  correct_strict: number;
  /** Correct under flexible extraction. */
  correct_flexible: number;
  /** correct_strict / n (0 when n is 0). */
  accuracy_strict: number;
  /** correct_flexible / n. */
  accuracy_flexible: number;
  /** Mean completion length in tokens. */
  completion_tokens_mean: number;
  /** Fraction of completions cut at the token cap. */
  truncated_fraction: number;
  /** Wall time of generation and scoring. */
  seconds: number;
  /** Generated tokens per second. */
  tokens_per_second: number;
}

/** Options of {@link evaluateExamples}. */
export interface EvaluateOptions {
  /** Token cap per completion. */
  maxNewTokens: number;
  /** Prompts per generation batch. */
  batchSize: number;
  /** Prompt rendering (instruction, system). */
  prompt?: PromptOptions;
  /** Called after each batch with the problems done so far and the running totals. */
  onBatch?: (done: number, totals: EvalTotals) => void;
  /**
   * How decode steps run (model/generate.ts `decodeMode`; default "eager"): training evaluates with its
   * `rollout.decode`. Greedy tokens are the same either way; "static" and "graph" keep one set of buffers (and
   * graphs) for the whole evaluation.
   */
  decodeMode?: DecodeMode;
  /** The MoE dispatch of decode steps (model/generate.ts `decodeDispatch`; default "dense"). */
  decodeDispatch?: GenerateOptions["decodeDispatch"];
  /** Buffers and graphs for "static" / "graph" decode, kept by the caller (default: made for this call). */
  session?: DecodeSession;
}

/** What an evaluation needs of a tokenizer (model/tokenizer.ts's Tokenizer has it). */
export type EvalTokenizer = Pick<
  Tokenizer,
  "stopTokenIds" | "padTokenId" | "decode" | "applyChatTemplate" | "encode" | "encodeBatch"
>;

function totals(preds: readonly Prediction[], seconds: number): EvalTotals {
  const n = preds.length;
  const cs = preds.filter((p) => p.correct_strict).length,
    cf = preds.filter((p) => p.correct_flexible).length;
  const tokens = preds.reduce((s, p) => s + p.completion_tokens, 0);
  return {
    n,
    correct_strict: cs,
    correct_flexible: cf,
    accuracy_strict: n ? cs / n : 0,
    accuracy_flexible: n ? cf / n : 0,
    completion_tokens_mean: n ? tokens / n : 0,
    truncated_fraction: n ? preds.filter((p) => p.finish_reason === "length").length / n : 0,
    seconds,
    tokens_per_second: seconds > 0 ? tokens / seconds : 0,
  };
}

/**
 * Greedy completions of examples with decoder (its adapters, if any, as
 * they are), scored strict and flexible.
 */
export async function evaluateExamples(
  decoder: Decoder,
  tok: EvalTokenizer,
  examples: readonly Gsm8kExample[],
  opts: EvaluateOptions,
): Promise<{ predictions: Prediction[]; totals: EvalTotals }> {
  const t0 = performance.now();
  const prompts = await buildPrompts(tok, examples.map((e) => e.question), opts.prompt);
  const eos = tok.stopTokenIds;
  const predictions: Prediction[] = [];
  const mode = opts.decodeMode ?? "eager";
  using own = mode === "eager" || opts.session
    ? null
    : new DecodeSession(decoder, { graphs: mode === "graph" });
  const session = opts.session ?? own;
  for (let i = 0; i < examples.length; i += opts.batchSize) {
    const chunk = examples.slice(i, i + opts.batchSize);
    const out = await generate(decoder, prompts.slice(i, i + opts.batchSize).map((p) => p.ids), {
      maxNewTokens: opts.maxNewTokens,
      eosTokenIds: eos,
      padTokenId: tok.padTokenId ?? eos[0] ?? 0,
      decode: (ids) => tok.decode(ids, { skipSpecialTokens: true, skipUnknownIds: true }),
      decodeMode: mode,
      decodeDispatch: opts.decodeDispatch,
      session: session ?? undefined,
    });
    chunk.forEach((ex, j) => {
      const gold = parseGold(ex.answer);
      if (gold === null) {
        throw new Error(`${ex.id}: the gold answer ${JSON.stringify(ex.answer)} is not a number`);
      }
      predictions.push({
        id: ex.id,
        question: ex.question,
        answer_gold: gold,
        completion: out.text![j]!,
        completion_tokens: out.tokens[j]!.length,
        finish_reason: out.finishReasons[j]!,
        ...judgeAnswer(out.text![j]!, gold),
      });
    });
    opts.onBatch?.(predictions.length, totals(predictions, (performance.now() - t0) / 1000));
  }
  return { predictions, totals: totals(predictions, (performance.now() - t0) / 1000) };
}
