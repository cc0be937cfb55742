/**
 * Batched generation with a preallocated KV cache, following transformers'
 * `generate`: left-padded prompts, positions from the attention mask,
 * temperature → top-k → top-p sampling (model/sampling.ts), EOS rows padded afterwards.
 *
 * A decode step runs no host synchronisation: the next token, finished flags
 * and the key mask stay on the device, and stop conditions are read back only
 * every `checkEvery` steps. `decodeMode: "static"` runs the steps on static
 * buffers and `"graph"` also replays them as CUDA graphs (model/decode_static.ts).
 * @module
 */
import {
  arange,
  cat,
  cuda,
  type Device,
  fromTypedArray,
  full,
  type Generator,
  keep,
  noGrad,
  type Tensor,
  tensor,
  tidy,
  tidyAsync,
  where,
  zeros,
} from "../ffi/mod.ts";
import type { Decoder } from "./decoder.ts";
import { DECODE_MODES, type DecodeBuffers, type DecodeMode, DecodeSession } from "./decode_static.ts";
import { KVCache } from "./kv_cache.ts";
import { MOE_DISPATCHES, type MoeDispatch } from "./moe.ts";
import { decodeDispatch, groupedCapturable } from "./dispatch_choice.ts";
import { checkTokenIds, leftPad } from "./padding.ts";
import { counterHash, streamUniform } from "./random.ts";
import { checkSampling, drawNext, type SamplingOptions } from "./sampling.ts";

/** Options for {@link generate}. */
export interface GenerateOptions extends SamplingOptions {
  /** Upper bound on new tokens per row. */
  maxNewTokens: number;
  /** A row stops after emitting any of these (e.g. a Tokenizer's `stopTokenIds`). */
  eosTokenIds?: readonly number[];
  /** Written after a row has stopped, and used to left-pad prompts (default 0). */
  padTokenId?: number;
  /** Random source for sampling (default: libtorch's global generator). */
  generator?: Generator;
  /**
   * Instead of a generator, one seed per prompt (integers in [0, 2^32)): sample j of prompt i takes its
   * step-t token at the uniform number t of the stream (seed i, j) (model/random.ts), by inverse-CDF
   * sampling. Its random numbers then depend on its own seed and j alone, not on the other prompts of the
   * batch nor its place among them, as with vLLM's per-request seeds; so do its tokens, as far as its logits
   * do (another batch size or padding can round them differently, and a draw that close to a token boundary
   * flips). Needs doSample.
   */
  sampleSeeds?: readonly number[];
  /** A row also stops once its decoded text contains one of these (needs decode). */
  stopStrings?: readonly string[];
  /** Turns token ids into text (e.g. a Tokenizer's decode); needed for text output and stop strings. */
  decode?: (ids: number[]) => string | Promise<string>;
  /** Read stop conditions back from the device every this many steps (default 8). */
  checkEvery?: number;
  /**
   * MoE dispatch for the forward passes (default: in the prompt pass "grouped" where the experts allow it,
   * else "dense"; in decode steps "dense", which never waits on the host).
   */
  dispatch?: MoeDispatch;
  /**
   * MoE dispatch of the decode steps, over `dispatch`; "measured": the fastest mode at this batch's size,
   * timed once on the model's own layer (model/dispatch_choice.ts).
   */
  decodeDispatch?: MoeDispatch | "measured";
  /**
   * Continuations per prompt (default 1). Each prompt is prefilled once and its KV cache copied to its
   * samples; the result has prompts × samplesPerPrompt rows, prompt-major.
   */
  samplesPerPrompt?: number;
  /** Record which experts every token used in every MoE layer (GenerateResult.routing). */
  recordRouting?: boolean;
  /**
   * How decode steps run (default "eager"): "static" on static buffers, "graph" on static buffers replayed
   * as CUDA graphs (where graphs are unavailable, e.g. on a CPU, the static-buffer steps run without them).
   * The same tokens; log-probs equal eager's to float32 rounding, since a step attends over a whole window.
   */
  decodeMode?: DecodeMode;
  /** For decodeMode "static" / "graph": buffers and graphs kept across calls (default: made for this call). */
  session?: DecodeSession;
}

/** Why a row stopped. */
export type FinishReason = "eos" | "stop" | "length";

/** What {@link generate} returns, per output row (prompt-major with samplesPerPrompt). */
export interface GenerateResult {
  /** New tokens, up to and including the EOS token if one was emitted. */
  tokens: number[][];
  /**
   * log p(token) per new token under the distribution sampled from: the model's logits divided by the
   * temperature when sampling (top-k / top-p truncation is not applied), the raw logits when greedy.
   */
  logprobs: number[][];
  /** Decoded text, truncated before a matched stop string (only with decode). */
  text: string[] | null;
  /** Why each row stopped. */
  finishReasons: FinishReason[];
  /** Width of the left-padded prompt block: row r's new token j sits at position promptWidth + j. */
  promptWidth: number;
  /**
   * With recordRouting: the experts of every position, [moeLayers, rows, promptWidth + steps, k] int16,
   * −1 where none was computed (a row's last token, which is never fed back). The caller frees it.
   */
  routing: Tensor | null;
  /** Seconds spent in the prompt forward pass and in decode steps (device-synchronised). */
  seconds: { prefill: number; decode: number };
}

/**
 * Generates continuations of token-id prompts with a decoder.
 * @example
 * ```ts ignore
 * const out = generate(model.decoder, [tok.encode("Hi")], { maxNewTokens: 32, eosTokenIds: [2] });
 * ```
 */
export async function generate(
  decoder: Decoder,
  prompts: readonly number[][],
  opts: GenerateOptions,
): Promise<GenerateResult> {
  if (prompts.length === 0) throw new RangeError("generate: no prompts");
  if (prompts.some((p) => p.length === 0)) {
    throw new RangeError("generate: an empty prompt (no token to start from)");
  }
  if (!Number.isSafeInteger(opts.maxNewTokens) || opts.maxNewTokens < 1) {
    throw new RangeError(`generate: maxNewTokens must be an integer >= 1, got ${opts.maxNewTokens}`);
  }
  checkChoice("decodeMode", opts.decodeMode, DECODE_MODES);
  checkChoice("dispatch", opts.dispatch, MOE_DISPATCHES);
  checkChoice("decodeDispatch", opts.decodeDispatch, [...MOE_DISPATCHES, "measured"]);
  if (opts.decodeMode === "graph" && (opts.decodeDispatch ?? opts.dispatch) === "loop") {
    // Said before the prompt pass (decode_static.ts would say it at the first step).
    throw new RangeError(
      'generate: decodeMode "graph" needs decodeDispatch "dense", "grouped" or "measured": ' +
        '"loop" reads the routing back to the host',
    );
  }
  if (opts.checkEvery !== undefined && !(Number.isSafeInteger(opts.checkEvery) && opts.checkEvery >= 1)) {
    throw new RangeError(`generate: checkEvery must be an integer >= 1, got ${opts.checkEvery}`);
  }
  const vocab = decoder.embed.size(0);
  for (
    const [what, ids] of [["eosTokenIds", opts.eosTokenIds ?? []], ["padTokenId", [
      opts.padTokenId ?? 0,
    ]]] as const
  ) {
    const bad = ids.find((id) => !(Number.isSafeInteger(id) && id >= 0 && id < vocab));
    if (bad !== undefined) {
      throw new RangeError(
        `generate: ${what} holds ${bad}, not a token id of this model (0 ≤ id < ${vocab})`,
      );
    }
  }
  checkTokenIds("generate", prompts, vocab);
  if (opts.stopStrings?.length && !opts.decode) {
    throw new TypeError("generate: stopStrings need a decode function");
  }
  const samples = opts.samplesPerPrompt ?? 1;
  if (!Number.isSafeInteger(samples) || samples < 1) {
    throw new RangeError(`generate: samplesPerPrompt must be an integer >= 1, got ${samples}`);
  }
  if (opts.doSample) checkSampling(opts);
  if (opts.sampleSeeds) checkSampleSeeds(opts, prompts.length);
  const session = opts.session;
  if (session && session.decoder !== decoder) {
    throw new RangeError("generate: the session records another decoder's steps");
  }
  if (session && opts.decodeMode !== undefined && opts.decodeMode !== "eager") {
    if (session.graphs !== (opts.decodeMode === "graph")) {
      throw new RangeError(
        `generate: decodeMode "${opts.decodeMode}" with a session made with graphs: ${session.graphs} ` +
          `(make it with { graphs: ${opts.decodeMode === "graph"} })`,
      );
    }
  }
  const release = opts.decodeMode === "static" || opts.decodeMode === "graph" ? session?.hold() : undefined;
  try {
    return await tidyAsync(() => run(decoder, prompts, opts));
  } finally {
    release?.();
  }
}

function checkSampleSeeds(opts: GenerateOptions, prompts: number): void {
  const seeds = opts.sampleSeeds!;
  if (!opts.doSample) throw new RangeError("generate: sampleSeeds need doSample");
  if (opts.generator) throw new RangeError("generate: give a generator or sampleSeeds, not both");
  if (seeds.length !== prompts) {
    throw new RangeError(`generate: ${seeds.length} sampleSeeds for ${prompts} prompts (one per prompt)`);
  }
  const bad = seeds.findIndex((x) => !(Number.isSafeInteger(x) && x >= 0 && x < 2 ** 32));
  if (bad >= 0) {
    throw new RangeError(`generate: sampleSeeds[${bad}] must be an integer in [0, 2^32), got ${seeds[bad]}`);
  }
}

/**
 * The uniform numbers of every real row's sample stream, [b, steps] float64 on the device: made once per
 * call, so a decode step only takes a column (no host-to-device copy, which would wait on the device).
 */
function rowUniforms(seeds: readonly number[], samples: number, steps: number, device: Device): Tensor {
  const u = new Float64Array(seeds.length * samples * steps);
  for (let r = 0; r < seeds.length * samples; r++) {
    const key = counterHash(seeds[Math.floor(r / samples)]!, r % samples);
    for (let t = 0; t < steps; t++) u[r * steps + t] = streamUniform(key, t);
  }
  return fromTypedArray(u, [seeds.length * samples, steps], { device });
}

function checkChoice(what: string, value: string | undefined, allowed: readonly string[]): void {
  if (value !== undefined && !allowed.includes(value)) {
    throw new RangeError(`generate: ${what} ${JSON.stringify(value)}; expected one of ${allowed.join(", ")}`);
  }
}

/** Waits for the device's queued work, so that host clocks measure it. */
function sync(device: Device): void {
  if (device !== "cpu") cuda.synchronize(device);
}

async function run(
  decoder: Decoder,
  prompts: readonly number[][],
  opts: GenerateOptions,
): Promise<GenerateResult> {
  const t0 = performance.now();
  const device = decoder.embed.device, dtype = decoder.embed.dtype;
  const pad = opts.padTokenId ?? 0;
  const checkEvery = Math.max(1, opts.checkEvery ?? 8);
  const samples = opts.samplesPerPrompt ?? 1;
  const p = prompts.length, b = p * samples, t = opts.maxNewTokens;
  const padded = leftPad(prompts, pad);
  const s = padded.inputIds[0]!.length;
  const i64 = { dtype: "int64" as const, device };
  const temperature = opts.doSample ? opts.temperature ?? 1 : 1;
  const decodeOpt = opts.decodeDispatch ?? opts.dispatch ?? "dense";
  // Captured steps must not wait on the host: "measured" then leaves "loop" out, and "grouped", which falls
  // back to "loop" for a bank that cannot group (libtorch < 2.8, some adapters) and copies to the host on CUDA
  // outside bfloat16 (groupedCapturable), becomes "dense" there.
  const captured = opts.decodeMode === "graph";
  const allGroup = groupedCapturable(device, decoder.embed.dtype) &&
    decoder.layers.every((l) => l.mlp.kind !== "moe" || l.mlp.experts.groupable === true);
  const dispatchMode = decodeOpt === "measured"
    ? decodeDispatch(decoder, b, { syncFree: captured })
    : decodeOpt === "grouped" && captured && !allGroup
    ? "dense"
    : decodeOpt;
  // The prompt pass is one large forward: grouped GEMM where the experts allow it does only the routed work.
  const groupable = decoder.layers.some((l) => l.mlp.kind === "moe" && l.mlp.experts.groupable === true);
  const prefillMode = opts.dispatch ?? (groupable ? "grouped" : "dense");
  const kv = { dtype, device };
  const { kvHeads, headDim } = decoder.dims, layers = decoder.layers.length;

  // Static buffers (with padding rows past b when the session's bucket is larger), or a cache for this call.
  const window = decoder.dims.slidingWindow;
  const mode = opts.decodeMode ?? "eager";
  const staticMode = mode !== "eager" && !(window && s + t > window); // too long: eager, which refuses it
  using own = staticMode && !opts.session ? new DecodeSession(decoder, { graphs: mode === "graph" }) : null;
  const bufs: DecodeBuffers | null = staticMode ? (opts.session ?? own)!.acquire(b, s + t) : null;
  const rows = bufs?.rows ?? b;
  using fresh = bufs ? null : new KVCache(layers, b, kvHeads, s + t, headDim, kv);
  const cache = bufs?.cache ?? fresh!;
  cache.length = 0;
  // Row r of the output continues prompt rowPrompt[r] (padding rows repeat prompt 0).
  const rowPrompt = tensor(Array.from({ length: rows }, (_, r) => r < b ? Math.floor(r / samples) : 0), i64);
  const expand = (x: Tensor): Tensor => (rows === p ? x.clone() : x.indexSelect(0, rowPrompt));
  const keyMask = bufs?.keyMask.fill_(0) ?? zeros([b, s + t], i64);
  keyMask.narrow(1, 0, s).copy_(expand(tensor(padded.attentionMask, i64)));
  const tokens = zeros([rows, t], i64).fill_(pad);
  const logprobs = zeros([rows, t], { dtype: "float32", device });
  const eos = tensor(opts.eosTokenIds?.length ? [...opts.eosTokenIds] : [-1], i64);
  const padT = tensor([pad], i64);
  const uniforms = opts.doSample && opts.sampleSeeds
    ? rowUniforms(opts.sampleSeeds, samples, t, device)
    : null;
  // [moeLayers, rows, positions, k], allocated at the prefill once k is known.
  let routing: Tensor | null = null;
  const record = (experts: readonly Tensor[], at: number, width: number): void => {
    if (!opts.recordRouting || experts.length === 0) return;
    const k = experts[0]!.size(1);
    routing ??= bufs?.routing(experts.length, k) ??
      keep(full([experts.length, b, s + t, k], -1, { dtype: "int16", device }));
    experts.forEach((e, l) => {
      using slot = routing!.select(0, l).narrow(1, at, width);
      using rows = e.reshape([-1, width, k]);
      if (at !== 0) {
        slot.copy_(rows); // copy_ casts to int16 from the view itself: no clone needed
        return;
      }
      using picked = expand(rows);
      slot.copy_(picked);
    });
  };

  try {
    // Prefill: each prompt once, its cache (and routing) copied to its samples.
    let scores = noGrad(() =>
      tidy(() => {
        using small = rows === p ? null : new KVCache(layers, p, kvHeads, s, headDim, kv);
        const out = decoder.forward({
          inputIds: tensor(padded.inputIds, i64),
          positionIds: tensor(padded.positionIds, i64),
          attentionMask: tensor(padded.attentionMask, i64),
          cache: small ?? cache,
          logitsToKeep: 1,
          dispatch: prefillMode,
        });
        if (small) cache.fillFrom(small, rowPrompt);
        record(out.experts, 0, s);
        return expand(out.logits!.select(1, 0).to("float32"));
      })
    );
    let positions = expand(tensor(padded.positionIds, i64).narrow(1, s - 1, 1).add(1));
    if (bufs) {
      bufs.begin(scores, positions, s);
      [scores, positions].forEach((x) => x.dispose());
      [scores, positions] = [bufs.scores, bufs.positions]; // the session's: never disposed here
    }
    sync(device);
    const t1 = performance.now();

    // Padding rows are finished from the start: they emit pad and never stop the loop.
    let finished = rows === b ? zeros([rows], { dtype: "bool", device }) : arange(0, rows, 1, i64).ge(b);
    const stoppedByString = new Set<number>();
    let steps = 0;
    for (let step = 0; step < t; step++) {
      // One decode step, all on the device. Grad mode is switched off per step
      // (not across awaits) so concurrent code keeps its own mode.
      const last = step + 1 === t;
      const state = noGrad(() =>
        tidy(() => {
          // Padding rows (past b) draw nothing, so a row's samples do not depend on the session's bucket.
          const real = rows === b ? scores : scores.narrow(0, 0, b);
          let chosen = opts.doSample
            ? drawNext(real, opts, opts.generator, uniforms?.narrow(1, step, 1))
            : real.argmax(-1);
          if (rows > b) chosen = cat([chosen, full([rows - b], pad, i64)], 0);
          const next = where(finished, padT, chosen);
          const tempered = temperature === 1 ? scores : scores.div(temperature);
          logprobs.narrow(1, step, 1).copy_(tempered.logSoftmax(-1).gather(-1, next.unsqueeze(-1)));
          tokens.narrow(1, step, 1).copy_(next.unsqueeze(-1));
          const done = finished.logicalOr(next.unsqueeze(-1).eq(eos).any(-1));
          if (last) return { done, scores: null, pos: null };
          if (bufs) { // the key mask, cache slot, positions and routing advance inside the step
            bufs.step(next, s + step, routing !== null, dispatchMode);
            return { done, scores: null, pos: null };
          }
          keyMask.narrow(1, s + step, 1).fill_(1);
          const out = decoder.forward({
            inputIds: next.unsqueeze(-1),
            positionIds: positions,
            attentionMask: keyMask.narrow(1, 0, cache.length + 1),
            cache,
            logitsToKeep: 1,
            dispatch: dispatchMode,
          });
          record(out.experts, s + step, 1);
          return { done, scores: out.logits!.select(1, 0).to("float32"), pos: positions.add(1) };
        })
      );
      if (!bufs) [scores, positions].forEach((x) => x.dispose());
      finished.dispose();
      finished = state.done;
      steps = step + 1;
      if (state.scores) [scores, positions] = [state.scores, state.pos!];
      if (steps % checkEvery === 0 || last) {
        if (opts.stopStrings?.length) await markStopStrings(tokens, steps, opts, stoppedByString, pad);
        if (stoppedByString.size) {
          const host = tensor(Array.from({ length: rows }, (_, i) => stoppedByString.has(i)), {
            dtype: "bool",
            device,
          });
          const merged = finished.logicalOr(host);
          finished.dispose();
          finished = merged;
        }
        if (last || finished.all().item() === 1) break;
      }
    }
    if (steps < t && !bufs) [scores, positions].forEach((x) => x.dispose());
    sync(device);
    const t2 = performance.now();
    const real = (x: Tensor): Tensor => (rows === b ? x : x.narrow(0, 0, b));
    const result = await finishRows(real(tokens), real(logprobs), steps, opts);
    const kept = routing as Tensor | null;
    let routed: Tensor | null = null;
    if (kept && bufs) routed = tidy(() => kept.narrow(1, 0, b).narrow(2, 0, s + steps).clone());
    else if (kept) {
      routed = kept.narrow(2, 0, s + steps);
      kept.dispose(); // the view holds the storage
    }
    return {
      ...result,
      promptWidth: s,
      routing: routed,
      seconds: { prefill: (t1 - t0) / 1000, decode: (t2 - t1) / 1000 },
    };
  } catch (err) {
    // The eager record is kept out of the step scopes; on a failure (a throwing decode, say) it is freed here.
    if (!bufs) (routing as Tensor | null)?.dispose();
    throw err;
  }
}

/** Marks rows whose decoded text so far contains a stop string. */
async function markStopStrings(
  tokens: Tensor,
  steps: number,
  opts: GenerateOptions,
  stopped: Set<number>,
  pad: number,
): Promise<void> {
  const rows = tidy(() => tokens.narrow(1, 0, steps).tolist() as number[][]);
  for (const [i, row] of rows.entries()) {
    if (stopped.has(i)) continue;
    const text = await opts.decode!(row.filter((id) => id !== pad));
    if (opts.stopStrings!.some((str) => text.includes(str))) stopped.add(i);
  }
}

async function finishRows(
  tokens: Tensor,
  logprobs: Tensor,
  steps: number,
  opts: GenerateOptions,
): Promise<Pick<GenerateResult, "tokens" | "logprobs" | "text" | "finishReasons">> {
  const ids = tidy(() => tokens.narrow(1, 0, steps).tolist() as number[][]);
  const lps = tidy(() => logprobs.narrow(1, 0, steps).tolist() as number[][]);
  const eos = new Set(opts.eosTokenIds ?? []);
  const stops = opts.stopStrings ?? [];
  const out: Pick<GenerateResult, "tokens" | "logprobs" | "text" | "finishReasons"> = {
    tokens: [],
    logprobs: [],
    text: opts.decode ? [] : null,
    finishReasons: [],
  };
  for (const [i, row] of ids.entries()) {
    const end = row.findIndex((id) => eos.has(id));
    let n = end >= 0 ? end + 1 : row.length;
    let reason: FinishReason = end >= 0 ? "eos" : "length";
    let text: string | undefined;
    if (opts.decode) {
      text = await opts.decode(row.slice(0, n));
      const cut = stopIndex(text, stops);
      if (cut >= 0) {
        // Keep the shortest token prefix whose text contains the stop string.
        while (n > 1 && stopIndex(await opts.decode(row.slice(0, n - 1)), stops) >= 0) n--;
        text = text.slice(0, cut);
        reason = "stop";
      }
    }
    // A NaN log-prob means the step's scores held NaN or infinity: the token was chosen from nothing (the
    // seeded draw then takes token 0, argmax the NaN's index). Read here, with the tokens, not at every step.
    const bad = lps[i]!.slice(0, n).findIndex(Number.isNaN);
    if (bad >= 0) {
      const samples = opts.samplesPerPrompt ?? 1, prompt = Math.floor(i / samples), sample = i % samples;
      throw new Error(
        `generate: the scores of row ${i} (prompt ${prompt}, sample ${sample}) at new token ${bad} are not ` +
          "finite (NaN or infinity): the model's weights or activations hold NaN, or overflowed (float16?)",
      );
    }
    out.tokens.push(row.slice(0, n));
    out.logprobs.push(lps[i]!.slice(0, n));
    out.finishReasons.push(reason);
    if (text !== undefined) out.text!.push(text);
  }
  return out;
}

function stopIndex(text: string, stops: readonly string[]): number {
  let best = -1;
  for (const s of stops) {
    const i = text.indexOf(s);
    if (i >= 0 && (best < 0 || i < best)) best = i;
  }
  return best;
}
