/**
 * 0-shot GSM8K accuracy of a decoder, its adapters (if any) as they are: the
 * one evaluation loop behind `deno task evaluate` (eval/evaluate.ts), the
 * training loop's periodic evaluations and the supervised warm-up's accuracy.
 * Completions end at the tokenizer's stop tokens and are judged strict and
 * flexible (data/answer.ts `judgeAnswer`). Switch LoRA dropout off first
 * (`policy.train(false)`).
 *
 * Greedy by default: one completion per problem. With sampling, `samples`
 * completions per problem give the mean accuracy over completions (pass@1),
 * pass@k (some completion is right, k = samples) and maj@k (the answer most
 * completions give is right; a tie goes to the answer given first).
 * @module
 */
import { TorchError } from "../ffi/mod.ts";
import { epochSeed } from "../data/batches.ts";
import type { Gsm8kExample } from "../data/gsm8k.ts";
import { type AnswerVerdict, judgeAnswer } from "../data/answer.ts";
import { parseGold } from "../data/numbers.ts";
import { buildPrompts, type PromptOptions } from "../data/prompt.ts";
import type { Decoder } from "../model/decoder.ts";
import { type DecodeMode, DecodeSession } from "../model/decode_static.ts";
import { type FinishReason, generate, type GenerateOptions } from "../model/generate.ts";
import { kvCacheDemand } from "../model/kv_cache.ts";
import type { Tokenizer } from "../model/tokenizer.ts";

/** One problem's result (a line of predictions.jsonl). */
export interface Prediction extends AnswerVerdict {
  /** The problem's id (`<split>-<index>`). */
  id: string;
  /** Which of the problem's completions this is (0 … samples − 1). */
  sample: number;
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
  /** Completions per problem (1 when greedy). */
  samples: number;
  /** Completions correct under strict extraction (of n × samples). */
  correct_strict: number;
  /** Completions correct under flexible extraction. */
  correct_flexible: number;
  /** correct_strict / (n × samples): the mean accuracy, pass@1 (0 when n is 0). */
  accuracy_strict: number;
  /** correct_flexible / (n × samples). */
  accuracy_flexible: number;
  /** Fraction of problems with some completion correct under strict extraction: pass@k, k = samples. */
  pass_at_k_strict: number;
  /** pass@k under flexible extraction. */
  pass_at_k_flexible: number;
  /** Fraction of problems whose majority strict answer is correct: maj@k, k = samples. */
  maj_at_k_strict: number;
  /** maj@k under flexible extraction. */
  maj_at_k_flexible: number;
  /** Mean completion length in tokens. */
  completion_tokens_mean: number;
  /** Fraction of completions cut at the token cap. */
  truncated_fraction: number;
  /** Wall time of generation and scoring. */
  seconds: number;
  /** Generated tokens per second. */
  tokens_per_second: number;
}

/** How {@link EvaluateOptions.sampling} draws completions. */
export interface EvalSampling {
  /** Sampling temperature, > 0. */
  temperature: number;
  /** Nucleus mass in (0, 1] (default 1: off). */
  topP?: number;
  /**
   * Each problem's samples draw from their own streams, keyed by (seed, the problem's id) (generate's
   * `sampleSeeds`): a problem draws the same random numbers whatever the batch size, and however the problems
   * are split over processes (the same completions where the batch does not round its logits differently).
   */
  seed: number;
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
  /** Completions per problem (default 1); more than 1 needs {@link sampling}. */
  samples?: number;
  /** Sample completions this way (default: greedy). */
  sampling?: EvalSampling | null;
}

/** What an evaluation needs of a tokenizer (model/tokenizer.ts's Tokenizer has it). */
export type EvalTokenizer = Pick<
  Tokenizer,
  "stopTokenIds" | "padTokenId" | "decode" | "applyChatTemplate" | "encode" | "encodeBatch"
>;

/** Whether the answer most of a problem's completions give (a tie: the one given first) is correct. */
function majorityCorrect(group: readonly Prediction[], mode: "strict" | "flexible"): boolean {
  const votes = new Map<string, { count: number; correct: boolean }>();
  for (const p of group) {
    const value = mode === "strict" ? p.extracted_strict : p.extracted_flexible;
    if (value === null) continue;
    const v = votes.get(value) ??
      { count: 0, correct: mode === "strict" ? p.correct_strict : p.correct_flexible };
    v.count++;
    votes.set(value, v);
  }
  let best: { count: number; correct: boolean } | null = null;
  for (const v of votes.values()) if (best === null || v.count > best.count) best = v; // first seen wins a tie
  return best?.correct ?? false;
}

/** What evaluation totals are counted from: over problems (n, pass, maj) or completions (the rest). */
export interface EvalCounts {
  /** Problems. */
  n: number;
  /** Completions per problem. */
  samples: number;
  /** Completions correct under strict extraction. */
  correctStrict: number;
  /** Completions correct under flexible extraction. */
  correctFlexible: number;
  /** Problems with some completion correct, strict. */
  passStrict: number;
  /** Problems with some completion correct, flexible. */
  passFlexible: number;
  /** Problems whose majority answer is correct, strict. */
  majStrict: number;
  /** Problems whose majority answer is correct, flexible. */
  majFlexible: number;
  /** Generated tokens. */
  tokens: number;
  /** Completions cut at the token cap. */
  truncated: number;
}

/** The totals of counts over `seconds` of generation and scoring. */
export function evalTotalsFromCounts(c: EvalCounts, seconds: number): EvalTotals {
  const m = c.n * c.samples;
  const perCompletion = (x: number): number => m ? x / m : 0,
    perProblem = (x: number): number => c.n ? x / c.n : 0;
  return {
    n: c.n,
    samples: c.samples,
    correct_strict: c.correctStrict,
    correct_flexible: c.correctFlexible,
    accuracy_strict: perCompletion(c.correctStrict),
    accuracy_flexible: perCompletion(c.correctFlexible),
    pass_at_k_strict: perProblem(c.passStrict),
    pass_at_k_flexible: perProblem(c.passFlexible),
    maj_at_k_strict: perProblem(c.majStrict),
    maj_at_k_flexible: perProblem(c.majFlexible),
    completion_tokens_mean: perCompletion(c.tokens),
    truncated_fraction: perCompletion(c.truncated),
    seconds,
    tokens_per_second: seconds > 0 ? c.tokens / seconds : 0,
  };
}

/** The totals of predictions, `samples` consecutive ones per problem. */
export function evalTotals(preds: readonly Prediction[], samples: number, seconds: number): EvalTotals {
  const n = Math.floor(preds.length / samples);
  const count = (f: (p: Prediction) => boolean): number => preds.filter(f).length;
  const groups = Array.from({ length: n }, (_, i) => preds.slice(i * samples, (i + 1) * samples));
  const problems = (f: (g: readonly Prediction[]) => boolean): number => groups.filter(f).length;
  return evalTotalsFromCounts({
    n,
    samples,
    correctStrict: count((p) => p.correct_strict),
    correctFlexible: count((p) => p.correct_flexible),
    passStrict: problems((g) => g.some((p) => p.correct_strict)),
    passFlexible: problems((g) => g.some((p) => p.correct_flexible)),
    majStrict: problems((g) => majorityCorrect(g, "strict")),
    majFlexible: problems((g) => majorityCorrect(g, "flexible")),
    tokens: preds.reduce((s, p) => s + p.completion_tokens, 0),
    truncated: count((p) => p.finish_reason === "length"),
  }, seconds);
}

/** A 32-bit FNV-1a hash of a problem id. */
function idHash(id: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** The checked number of completions per problem. */
function checkSamples(samples: number, sampling: EvalSampling | null): number {
  if (!Number.isSafeInteger(samples) || samples < 1) {
    throw new RangeError(`evaluate: samples must be an integer >= 1, got ${samples}`);
  }
  if (samples > 1 && sampling === null) {
    throw new RangeError(
      `evaluate: ${samples} greedy completions of a problem would all be the same: sample them`,
    );
  }
  return samples;
}

/**
 * Completions of examples with decoder (its adapters, if any, as they are),
 * greedy or sampled, scored strict and flexible. Predictions come problem by
 * problem, each problem's samples together.
 */
export async function evaluateExamples(
  decoder: Decoder,
  tok: EvalTokenizer,
  examples: readonly Gsm8kExample[],
  opts: EvaluateOptions,
): Promise<{ predictions: Prediction[]; totals: EvalTotals }> {
  const t0 = performance.now();
  const sampling = opts.sampling ?? null;
  const samples = checkSamples(opts.samples ?? 1, sampling);
  const golds = examples.map((ex) => {
    const gold = parseGold(ex.answer);
    if (gold === null) {
      throw new Error(`${ex.id}: the gold answer ${JSON.stringify(ex.answer)} is not a number`);
    }
    return gold;
  });
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
    const batch = prompts.slice(i, i + opts.batchSize).map((p) => p.ids);
    const out = await generate(decoder, batch, {
      maxNewTokens: opts.maxNewTokens,
      eosTokenIds: eos,
      padTokenId: tok.padTokenId ?? eos[0] ?? 0,
      decode: (ids) => tok.decode(ids, { skipSpecialTokens: true, skipUnknownIds: true }),
      decodeMode: mode,
      decodeDispatch: opts.decodeDispatch,
      session: session ?? undefined,
      samplesPerPrompt: samples,
      ...(sampling
        ? {
          doSample: true,
          temperature: sampling.temperature,
          topP: sampling.topP,
          sampleSeeds: chunk.map((ex) => epochSeed(sampling.seed, idHash(ex.id))),
        }
        : {}),
    }).catch((e: unknown) => {
      if (!(e instanceof TorchError) || !e.outOfMemory) throw e;
      const rows = batch.length * samples,
        slots = Math.max(...batch.map((p) => p.length)) + opts.maxNewTokens;
      // A batch of one problem is the smallest: then only fewer tokens (or samples) can help.
      const advice = batch.length > 1
        ? "Lower the batch size (eval.batchSize), or the token cap (eval.maxNewTokens)."
        : `The batch is one problem already: lower the token cap (eval.maxNewTokens)${
          samples > 1 ? " or the samples per problem (eval.samples)" : ""
        }.`;
      throw new Error(
        `evaluate: out of memory generating ${rows} completions at once (${batch.length} problem${
          batch.length > 1 ? "s" : ""
        } × ${samples} samples), ${kvCacheDemand(decoder, rows, slots)}. ${advice} (${e.message})`,
        { cause: e },
      );
    });
    out.tokens.forEach((tokens, r) => { // prompt-major: problem j's samples are rows j·samples …
      const j = Math.floor(r / samples), ex = chunk[j]!, text = out.text![r]!;
      predictions.push({
        id: ex.id,
        sample: r % samples,
        question: ex.question,
        answer_gold: golds[i + j]!,
        completion: text,
        completion_tokens: tokens.length,
        finish_reason: out.finishReasons[r]!,
        ...judgeAnswer(text, golds[i + j]!),
      });
    });
    opts.onBatch?.(
      predictions.length / samples,
      evalTotals(predictions, samples, (performance.now() - t0) / 1000),
    );
  }
  return { predictions, totals: evalTotals(predictions, samples, (performance.now() - t0) / 1000) };
}
