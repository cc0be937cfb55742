/**
 * The collect phase of an update: K sampled completions for every prompt,
 * generated in large batches (each prompt prefilled once, its KV cache
 * copied to its K samples), scored, and kept in a {@link RolloutBuffer} with
 * what the learn phase needs: each token's log-probability under the
 * sampling distribution and, for MoE models, the experts every token used in
 * every layer (for routing replay).
 * @module
 */
import { cat, dispose, full, type Generator, type Tensor, tensor, tidy, TorchError } from "../ffi/mod.ts";
import { epochSeed } from "../data/batches.ts";
import { DecodeSession } from "../model/decode_static.ts";
import { generate } from "../model/generate.ts";
import { kvCacheDemand } from "../model/kv_cache.ts";
import type { Policy } from "./policy.ts";
import { rlConfig, type RlOverrides } from "./config.ts";
import { parseGold } from "../data/numbers.ts";
import { describe } from "../model/settings.ts";
import { type Completion, reward, type RewardConfig, type ScoreResult } from "./reward.ts";
import { RolloutBuffer, type RolloutPrompt, type RolloutSequence } from "./rollout_buffer.ts";

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
 * Scores one completion (default: rl/reward.ts `reward` against the prompt's answer, with the config's
 * `reward` section). It may be async (a verifier, a reward model): a generation batch's completions are scored
 * concurrently. Only `reward` must be set (a finite number, {@link ScoreResult}); `correct`, `marker` and
 * `overLength` feed the metrics accuracy, marker_rate and overlong_rate, counting as false when left out
 * (truncated_fraction comes from the finish reason). `cfg` is
 * the config's `reward` section, checked, for a score that wraps `reward`: `(c, p, cfg) => reward(c, p.answer,
 * cfg)` and more.
 */
export type ScoreFn = (
  completion: Completion,
  prompt: RolloutPrompt,
  cfg: RewardConfig,
) => ScoreResult | Promise<ScoreResult>;

/** A score function's result, checked: an object with a finite reward, and flags that are booleans if given. */
function checkScore(r: unknown, prompt: number, sample: number): ScoreResult {
  const value = (r as { reward?: unknown } | null)?.reward;
  if (typeof r !== "object" || r === null || typeof value !== "number" || !Number.isFinite(value)) {
    // A string is quoted: a verifier's "1" would read as the number it is not.
    const show = (v: unknown): string => (typeof v === "string" ? describe(v) : String(v));
    const shown = typeof r === "object" && r !== null ? `a reward of ${show(value)}` : show(r);
    throw new TypeError(
      `collect: the score function gave ${shown} for sample ${sample} of prompt ${prompt} ` +
        `(it must return a ScoreResult whose reward is a finite number)`,
    );
  }
  for (const flag of ["correct", "marker", "overLength"] as const) {
    const v = (r as ScoreResult)[flag];
    if (v !== undefined && typeof v !== "boolean") {
      throw new TypeError(
        `collect: the score function gave ${flag} ${describe(v)} for sample ${sample} of prompt ${prompt} ` +
          "(true, false, or left out)",
      );
    }
  }
  return r as ScoreResult;
}

/** Options of {@link collect}. */
export interface CollectOptions {
  /** Random source for sampling (seed it for reproducible rollouts). */
  generator?: Generator;
  /**
   * Instead of a generator: each prompt's samples draw from their own streams, keyed by (seed, the
   * prompt's update-wide index) (generate's `sampleSeeds`). A prompt's random numbers then depend on
   * neither `rollout.generationBatch` nor the other prompts, so the prompts of an update can be split
   * over data-parallel ranks and still draw what one process drawing them all would (the same tokens
   * where the batch's size does not round the logits differently: docs/rl-update.md).
   */
  seed?: number;
  /** The update-wide index of prompts[0] (default 0): a data-parallel rank's offset, for `seed`. */
  firstPrompt?: number;
  /** Scores completions instead of the GSM8K reward; it is given the config's `reward` section (see ScoreFn). */
  score?: ScoreFn;
  /** Record each token's experts for routing replay (default true; ignored for a model without MoE layers). */
  recordRouting?: boolean;
  /** Ids that end a completion (default: the tokenizer's stopTokenIds). */
  stopTokenIds?: readonly number[];
  /** Pad id (default: the tokenizer's pad token, else the first stop id). */
  padTokenId?: number;
}

/**
 * Samples rollout.k completions for every prompt from the policy as it is
 * (dropout off), scores them and keeps them in a {@link RolloutBuffer}.
 * Generation runs in batches of rollout.generationBatch sequences (all at
 * once by default), each prompt prefilled once for its K samples.
 * @param cfg overrides of rl/config.ts's defaults (the `rollout` and `reward` sections are used)
 * @throws {RangeError} for no prompts or a bad config
 * @throws {TypeError} for a prompt that is not { ids, answer } (e.g. the question's text)
 */
export async function collect(
  policy: Policy,
  tokenizer: RolloutTokenizer,
  prompts: readonly RolloutPrompt[],
  cfg: RlOverrides = {},
  opts: CollectOptions = {},
): Promise<RolloutBuffer> {
  policy.checkAlive("collect");
  if (prompts.length === 0) throw new RangeError("collect: no prompts");
  const { rollout: c, reward: rewardCfg } = rlConfig(cfg);
  for (const [what, v] of [["seed", opts.seed], ["firstPrompt", opts.firstPrompt]] as const) {
    if (v !== undefined && !(Number.isSafeInteger(v) && v >= 0)) { // hashed as 32-bit: NaN would be seed 0
      throw new RangeError(`collect: ${what} must be an integer >= 0, got ${v}`);
    }
  }
  if (opts.generator && opts.seed !== undefined) {
    throw new RangeError("collect: give a generator or a seed, not both");
  }
  // Questions as text (as TRL takes them) would otherwise fail on their gold answer, or inside generate.
  const unrendered = prompts.findIndex((p) => {
    const ids = (p as { ids?: unknown } | null)?.ids;
    return typeof p !== "object" || !(Array.isArray(ids) || ArrayBuffer.isView(ids));
  });
  if (unrendered >= 0) {
    const p: unknown = prompts[unrendered];
    const shown = typeof p === "object" && p !== null
      ? `'s ids: expected token ids, got ${describe((p as { ids?: unknown }).ids)}`
      : ` is ${describe(p)}`;
    throw new TypeError(
      `collect: prompt ${unrendered}${shown}; a prompt is { ids, answer }, its token ids and gold answer ` +
        "(buildPrompts renders questions into ids)",
    );
  }
  const score: ScoreFn = opts.score ?? ((completion, p, cfg) => reward(completion, p.answer, cfg));
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
  // Each decode step reuses the adapters' casts to a bfloat16 model's dtype (freed when collect returns).
  using _casts = policy.lora.state.holdCasts();
  policy.train(false);
  const seed = opts.seed;
  try {
    for (let first = 0; first < prompts.length; first += perBatch) {
      const chunk = prompts.slice(first, first + perBatch);
      const sampleSeeds = seed === undefined
        ? undefined
        : chunk.map((_, i) => epochSeed(seed, (opts.firstPrompt ?? 0) + first + i));
      const gen = await generate(decoder, chunk.map((p) => [...p.ids]), {
        maxNewTokens: c.maxNewTokens,
        eosTokenIds: stop,
        padTokenId: pad,
        doSample: true,
        temperature: c.temperature,
        topP: c.topP,
        topK: c.topK,
        generator: opts.generator,
        sampleSeeds,
        samplesPerPrompt: c.k,
        recordRouting: record,
        decodeDispatch: c.decodeDispatch,
        decodeMode: c.decode,
        session: session ?? undefined,
        decode: (ids) => tokenizer.decode(ids, { skipSpecialTokens: true, skipUnknownIds: true }),
      }).catch((e: unknown) => {
        throw outOfMemoryHint(e, policy, chunk.length, Math.max(...chunk.map((p) => p.ids.length)), c);
      });
      try {
        prefill += gen.seconds.prefill;
        decode += gen.seconds.decode;
        // Scored together, so that an async scorer (a verifier, a reward model) can work on a batch at once.
        // A scorer's error (a throw or a rejection) names the completion it failed on.
        const scores = await Promise.all(
          gen.tokens.map(async (tokens, r) => {
            try {
              return await score(
                { text: gen.text![r]!, tokens, finishReason: gen.finishReasons[r]! },
                chunk[Math.floor(r / c.k)]!,
                rewardCfg,
              );
            } catch (e) {
              throw new Error(
                `collect: the score function threw on sample ${r % c.k} of prompt ${
                  first + Math.floor(r / c.k)
                }: ` +
                  (e instanceof Error ? e.message : String(e)),
                { cause: e },
              );
            }
          }),
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
    const generated = sequences.reduce((n, s) => n + s.tokens.length, 0);
    const total = (performance.now() - t0) / 1000;
    return new RolloutBuffer({
      prompts,
      promptTexts,
      k: c.k,
      temperature: c.temperature,
      maxNewTokens: c.maxNewTokens,
      pad,
      sequences,
      routing,
      routingStart,
      device,
      timings: {
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

/**
 * A generation batch that ran out of memory, as an error naming the settings that bound it (other errors as
 * they are): the KV cache grows with rows × (prompt + rollout.maxNewTokens), which the bare libtorch message
 * does not say.
 */
function outOfMemoryHint(
  e: unknown,
  policy: Policy,
  prompts: number,
  promptWidth: number,
  c: { k: number; maxNewTokens: number; generationBatch: number | null },
): unknown {
  if (!(e instanceof TorchError) || !e.outOfMemory) return e;
  const rows = prompts * c.k;
  // One prompt's K samples are the fewest a batch holds: a smaller rollout.generationBatch cannot help then.
  const advice = prompts > 1
    ? `Set rollout.generationBatch to fewer sequences (a multiple of rollout.k, e.g. ${
      Math.floor(prompts / 2) * c.k
    }), or lower rollout.maxNewTokens.`
    : "The batch is one prompt's samples already, the fewest rollout.generationBatch allows: lower " +
      "rollout.maxNewTokens (or rollout.k).";
  return new Error(
    `collect: out of memory generating ${rows} sequences at once (${prompts} prompt${
      prompts > 1 ? "s" : ""
    } × rollout.k ${c.k}), ${
      kvCacheDemand(policy.model.decoder, rows, promptWidth + c.maxNewTokens)
    }. ${advice} (${e.message})`,
    { cause: e },
  );
}
