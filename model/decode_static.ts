/**
 * Decode steps on static buffers, the shape CUDA graphs need (gpt-fast's
 * static KV cache idea, in our own terms). A step reads the next tokens,
 * their positions and the cache slot to write from tensors that never move,
 * and writes the next scores (and, when recorded, the experts) into tensors
 * that never move either; the slot, positions and key mask advance on the
 * device, so nothing the host knows is baked into the recorded kernels.
 *
 * The attention of a step spans a fixed window of cache slots (a multiple
 * of `kvBucket`), not the slots filled so far: the key mask hides the rest.
 * Each (window, routing record, dispatch) gets its own {@link CudaGraph},
 * warmed up on its first step, captured on its second and replayed after.
 * On a CPU, or in "static" mode, the same static-buffer steps run op by op,
 * without a graph.
 * @module
 */
import {
  CudaGraph,
  type Device,
  type GraphPool,
  graphPool,
  keep,
  noGrad,
  ones,
  stack,
  type Tensor,
  tidy,
  TorchError,
  zeros,
} from "../ffi/mod.ts";
import type { Decoder } from "./decoder.ts";
import { KVCache, StaticKVView } from "./kv_cache.ts";
import type { MoeDispatch } from "./moe.ts";

/** How generate runs decode steps: per-step shapes, static buffers, or static buffers replayed as CUDA graphs. */
export type DecodeMode = typeof DECODE_MODES[number];

/** Every {@link DecodeMode}. */
export const DECODE_MODES = ["eager", "static", "graph"] as const;

/** Options of {@link DecodeSession}. */
export interface DecodeSessionOptions {
  /**
   * Record CUDA graphs (on a CUDA device with a CUDA build; elsewhere each step's function is called, under
   * the capture checks). Default true.
   */
  graphs?: boolean;
  /** Attention windows are multiples of this many cache slots (default 128): one graph per window. */
  kvBucket?: number;
}

/** What a session has done, for tests and benchmarks. */
export interface DecodeStats {
  /** Steps run for real before a capture (one per new graph). */
  warmups: number;
  /** Graphs captured (eager mode: functions kept). */
  captures: number;
  /** Steps run from a recording (eager mode: recorded functions called). */
  replays: number;
  /** Buffer sets allocated. */
  allocations: number;
  /** Captures that failed (with a warning); those windows' steps run without a graph. */
  fallbacks: number;
}

/**
 * Static decode buffers and their graphs, reusable across generate calls
 * with the same decoder (pass it as `GenerateOptions.session`). Holds one
 * buffer set per batch-size bucket: a batch reuses a set with at least as
 * many rows (at most twice as many; the extra rows decode padding) and slots.
 * A recording replays the ops the decoder issued when it was captured: after
 * changing what the forward does (adapters on or off, merged, other weight
 * tensors) dispose the session. Weights updated in place are fine.
 */
export class DecodeSession {
  /** The decoder whose steps are recorded. */
  readonly decoder: Decoder;
  /** Whether steps are recorded as CUDA graphs where possible. */
  readonly graphs: boolean;
  /** Window granularity in cache slots. */
  readonly kvBucket: number;
  /** Counters. */
  readonly stats: DecodeStats = { warmups: 0, captures: 0, replays: 0, allocations: 0, fallbacks: 0 };
  readonly #sets: DecodeBuffers[] = [];
  #pool: GraphPool | null | undefined;
  #busy = false;

  /** A session for decoder's decode steps. */
  constructor(decoder: Decoder, opts: DecodeSessionOptions = {}) {
    const bucket = opts.kvBucket ?? 128;
    if (!Number.isSafeInteger(bucket) || bucket < 1) {
      throw new RangeError(`DecodeSession: kvBucket must be an integer >= 1, got ${bucket}`);
    }
    this.decoder = decoder;
    this.graphs = opts.graphs ?? true;
    this.kvBucket = bucket;
  }

  /** One memory pool for every graph of the session: they run one at a time and keep nothing in it. */
  get pool(): GraphPool | null {
    return (this.#pool ??= this.graphs && this.decoder.embed.device !== "cpu" ? graphPool() : null);
  }

  /** Buffers for rows ≥ batch and slots ≥ length: a held set that fits, or a new one. */
  acquire(batch: number, length: number): DecodeBuffers {
    const fits = this.#sets.filter((s) => s.rows >= batch && s.rows <= 2 * batch);
    const best = fits.sort((a, b) => a.rows - b.rows)[0];
    if (best && best.length >= length) return best;
    if (best) { // right rows, too few slots: replace it (its graphs go with it)
      this.#sets.splice(this.#sets.indexOf(best), 1);
      best.dispose();
    }
    const slots = Math.max(best?.length ?? 0, Math.ceil(length / 64) * 64);
    const set = new DecodeBuffers(this, best?.rows ?? batch, slots);
    this.#sets.push(set);
    this.stats.allocations++;
    return set;
  }

  /**
   * Claims the session for one generate call, whose steps write its buffers across awaits: a second call
   * at the same time would decode into them too. Returns the release.
   * @throws {Error} when another call holds it
   */
  hold(): () => void {
    if (this.#busy) {
      throw new Error(
        "DecodeSession: in use by another generate call; give concurrent calls their own sessions",
      );
    }
    this.#busy = true;
    return () => void (this.#busy = false);
  }

  /** Frees every buffer and graph. */
  dispose(): void {
    for (const s of this.#sets.splice(0)) s.dispose();
  }

  /** Frees everything at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * One batch-size bucket: the KV cache, the step's static inputs and outputs,
 * and its graphs by window. Made by {@link DecodeSession.acquire}.
 */
export class DecodeBuffers {
  /** Rows decoded (≥ the batch; extra rows are padding). */
  readonly rows: number;
  /** Cache slots per row. */
  readonly length: number;
  /** The KV cache [rows, nKV, length, d] per layer. */
  readonly cache: KVCache;
  /** Which key slots hold real tokens [rows, length], int64. */
  readonly keyMask: Tensor;
  /** Input tokens of a step [rows, 1], int64. */
  readonly tokens: Tensor;
  /** Their positions [rows, 1], int64; advanced by each step. */
  readonly positions: Tensor;
  /** The cache slot the step writes, int64 [1]; advanced by each step. */
  readonly slot: Tensor;
  readonly #session: DecodeSession;
  readonly #one: Tensor;
  readonly #graphs = new Map<string, CudaGraph>();
  #scores: Tensor | null = null;
  #routing: Tensor | null = null;

  /** Allocates buffers for rows × length (see {@link DecodeSession.acquire}). */
  constructor(session: DecodeSession, rows: number, length: number) {
    const d = session.decoder, device: Device = d.embed.device;
    const i64 = { dtype: "int64" as const, device };
    this.#session = session;
    this.rows = rows;
    this.length = length;
    this.cache = new KVCache(d.layers.length, rows, d.dims.kvHeads, length, d.dims.headDim, {
      dtype: d.embed.dtype,
      device,
    });
    let made: Tensor[];
    try { // in a scope: an allocation that fails frees the others, the cache too
      made = tidy(() => [
        zeros([rows, length], i64),
        zeros([rows, 1], i64),
        zeros([rows, 1], i64),
        zeros([1], i64),
        ones([rows, 1], i64),
      ]);
    } catch (e) {
      this.cache.dispose();
      throw e;
    }
    [this.keyMask, this.tokens, this.positions, this.slot, this.#one] = made.map(keep) as [
      Tensor,
      Tensor,
      Tensor,
      Tensor,
      Tensor,
    ];
  }

  /** Scores of the next token [rows, V], float32: the prefill's, then each step's. */
  get scores(): Tensor {
    if (!this.#scores) throw new Error("DecodeBuffers: no scores before begin()");
    return this.#scores;
  }

  /** The routing record [moeLayers, rows, length, k] int16, filled with −1 (allocated on first use). */
  routing(moeLayers: number, k: number): Tensor {
    const shape = [moeLayers, this.rows, this.length, k];
    if (this.#routing && this.#routing.shape.join() !== shape.join()) {
      throw new Error("routing shape changed");
    }
    this.#routing ??= keep(zeros(shape, { dtype: "int16", device: this.keyMask.device }));
    return this.#routing.fill_(-1);
  }

  /** Starts decoding after a prefill of `filled` slots: the first scores [rows, V] and positions [rows, 1]. */
  begin(scores: Tensor, positions: Tensor, filled: number): void {
    if (this.#scores && this.#scores.size(1) !== scores.size(1)) throw new Error("vocabulary changed");
    this.#scores ??= keep(zeros(scores.shape, { dtype: "float32", device: scores.device }));
    this.#scores.copy_(scores);
    this.positions.copy_(positions);
    this.slot.fill_(filled);
  }

  /**
   * Feeds tokens next [rows] to the step writing cache slot `at` (the
   * host's count, used only to pick the window) and leaves the following
   * scores in {@link scores}.
   */
  step(next: Tensor, at: number, record: boolean, dispatch: MoeDispatch): void {
    if (at >= this.length) throw new RangeError(`DecodeBuffers: slot ${at} beyond ${this.length}`);
    this.tokens.copy_(next.reshape([this.rows, 1]));
    const s = this.#session, cap = Math.min(this.length, s.decoder.dims.slidingWindow ?? Infinity);
    const width = Math.min(cap, Math.ceil((at + 1) / s.kvBucket) * s.kvBucket);
    const key = `${width}/${record}/${dispatch}`;
    const fn = (): void => this.#forward(width, record, dispatch);
    if (record && !this.#routing) throw new Error("DecodeBuffers: recording routing needs routing() first");
    let g = this.#graphs.get(key);
    if (!g) {
      // On every device, so that a CPU run refuses what a GPU would.
      if (s.graphs && dispatch === "loop") {
        throw new RangeError(
          'decode "graph" needs dispatch "dense" or "grouped": "loop" reads the routing back to the host',
        );
      }
      const fresh = new CudaGraph(this.keyMask.device, { pool: s.pool, eager: !s.graphs });
      try {
        fresh.warmup(fn);
      } catch (e) {
        fresh.dispose(); // kept, the window's next step would be captured without its warm-up
        throw e;
      }
      this.#graphs.set(key, fresh);
      s.stats.warmups++;
      return;
    }
    if (!g.captured) g = this.#capture(g, key, fn);
    g.replay();
    s.stats.replays++;
  }

  /**
   * Captures fn. A capture that fails (an op that syncs or allocates outside the pool, say) says why and
   * leaves that window's steps to run without a graph, rather than failing a long generation: nothing ran,
   * so the step is simply called directly.
   */
  #capture(g: CudaGraph, key: string, fn: () => void): CudaGraph {
    const stats = this.#session.stats;
    try {
      g.capture(fn);
      stats.captures++;
      return g;
    } catch (e) {
      if (!(e instanceof TorchError)) throw e;
      console.warn(`moerl: decode step ${key} not captured, it runs without a graph: ${e.message}`);
      g.dispose();
      const eager = new CudaGraph(g.device, { eager: true });
      eager.capture(fn);
      this.#graphs.set(key, eager);
      stats.fallbacks++;
      return eager;
    }
  }

  /** One decode step over the first width slots, every index read from the device. */
  #forward(width: number, record: boolean, dispatch: MoeDispatch): void {
    noGrad(() => {
      this.keyMask.indexCopy_(1, this.slot, this.#one);
      const out = this.#session.decoder.forward({
        inputIds: this.tokens,
        positionIds: this.positions,
        attentionMask: this.keyMask.narrow(1, 0, width),
        cache: new StaticKVView(this.cache, this.slot, width),
        logitsToKeep: 1,
        dispatch,
      });
      this.scores.copy_(out.logits!.select(1, 0));
      if (record && out.experts.length) {
        this.#routing!.indexCopy_(2, this.slot, stack(out.experts, 0).unsqueeze(2).to("int16"));
      }
      this.positions.copy_(this.positions.add(1));
      this.slot.copy_(this.slot.add(1));
    });
  }

  /** Frees the buffers and graphs. */
  dispose(): void {
    for (const g of this.#graphs.values()) g.dispose();
    this.#graphs.clear();
    this.cache.dispose();
    for (const t of [this.keyMask, this.tokens, this.positions, this.slot, this.#one]) t.dispose();
    this.#scores?.dispose();
    this.#routing?.dispose();
  }
}
