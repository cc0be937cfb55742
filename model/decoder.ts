/**
 * The decoder-only transformer both families share: embeddings, then layers
 * of pre-norm attention and a dense or MoE MLP, a final norm and the LM head.
 * The families differ only in the parts they plug in (norms, q/k norms,
 * biases, router), built by model/qwen3_moe.ts and model/phimoe.ts.
 * @module
 */
import { embedding, type Tensor, tidy } from "../ffi/mod.ts";
import type { KVStore } from "./kv_cache.ts";
import {
  applyRope,
  attention,
  type AttentionImpl,
  causalMask,
  type LinearLayer,
  type Norm,
  ropeCosSin,
} from "./layers.ts";
import { dispatch, type ExpertBank, type MoeDispatch, type Routing } from "./moe.ts";

/** Attention projections of one layer. */
export interface AttentionBlock {
  /** Query projection [nH·d, H]. */
  q: LinearLayer;
  /** Key projection [nKV·d, H]. */
  k: LinearLayer;
  /** Value projection [nKV·d, H]. */
  v: LinearLayer;
  /** Output projection [H, nH·d]. */
  o: LinearLayer;
  /** Qwen3's per-head RMSNorm on queries, before RoPE. */
  qNorm?: Norm;
  /** Qwen3's per-head RMSNorm on keys, before RoPE. */
  kNorm?: Norm;
}

/** A dense SwiGLU MLP (Qwen3's mlp_only_layers): down(silu(gate(x)) · up(x)). */
export interface DenseMlp {
  /** Discriminant. */
  kind: "dense";
  /** Gate projection [I, H]. */
  gate: LinearLayer;
  /** Up projection [I, H]. */
  up: LinearLayer;
  /** Down projection [H, I]. */
  down: LinearLayer;
}

/** A sparse MoE block: a router and its experts. */
export interface MoeMlp {
  /** Discriminant. */
  kind: "moe";
  /** The router's linear layer [E, H] (replaceable, e.g. by a LoRA layer). */
  router: LinearLayer;
  /** Module name of the router, e.g. "model.layers.0.mlp.gate". */
  routerName: string;
  /** The family's routing rule applied to router logits computed by router (replay: see ForwardInput). */
  route(x: Tensor, router: LinearLayer, replay?: Tensor | null): Routing;
  /** The experts. */
  experts: ExpertBank;
}

/** One decoder layer. */
export interface DecoderLayer {
  /** Module path, e.g. "model.layers.0" (its parts are named as in Hugging Face checkpoints). */
  name: string;
  /** Module path of the MLP block: "mlp" (Qwen3, PhiMoE v5) or "block_sparse_moe" (PhiMoE 4.x). */
  mlpName: string;
  /** Norm before attention. */
  inputNorm: Norm;
  /** Norm before the MLP. */
  postNorm: Norm;
  /** Attention. */
  attn: AttentionBlock;
  /** Dense or MoE MLP. */
  mlp: DenseMlp | MoeMlp;
}

/** Sizes the forward pass needs. */
export interface DecoderDims {
  /** Query heads. */
  heads: number;
  /** Key/value heads. */
  kvHeads: number;
  /** Per-head width (may differ from hidden/heads). */
  headDim: number;
  /** RoPE base. */
  ropeTheta: number;
  /** The config's sliding attention window, or null: longer sequences are refused (not implemented). */
  slidingWindow?: number | null;
}

/** Inputs of one forward pass. */
export interface ForwardInput {
  /** Token ids [B, S], int64. */
  inputIds: Tensor;
  /** Positions [B, S], int64 (cumsum of the mask − 1 for left-padded rows). */
  positionIds: Tensor;
  /** Which key slots hold real tokens [B, past + S] (1/0 or bool). */
  attentionMask: Tensor;
  /** Cache to read past keys from and write new ones to (a KVCache, or a StaticKVView of one). */
  cache?: KVStore;
  /** Compute logits for only the last n positions (0 = all). */
  logitsToKeep?: number;
  /** Skip the LM head entirely (value heads need only hidden states). */
  skipLogits?: boolean;
  /** MoE dispatch strategy (see {@link dispatch}). */
  dispatch?: MoeDispatch;
  /**
   * Routing replay: per MoE layer (in layer order) the experts each token must use, [B·S, k] integer
   * ids with −1 where the router chooses freely; gate weights still come from the current router.
   */
  replay?: readonly Tensor[] | null;
}

/** Outputs of one forward pass; the caller owns every tensor. */
export interface ForwardOutput {
  /** Logits [B, S′, V] (S′ = logitsToKeep or S), in the model dtype; null with skipLogits. */
  logits: Tensor | null;
  /** Final hidden states after the last norm [B, S, H]. */
  hidden: Tensor;
  /** Router logits [B·S, E] of each MoE layer, in layer order. */
  routerLogits: Tensor[];
  /** The experts each token used [B·S, k] (int64) in each MoE layer, in layer order. */
  experts: Tensor[];
}

/** Per-forward state shared by the layers; dispose with `dispose(ctx)` from mod.ts. */
export interface LayerContext {
  /** RoPE cos [B, 1, S, d]. */
  cos: Tensor;
  /** RoPE sin [B, 1, S, d]. */
  sin: Tensor;
  /** Additive attention mask [B, 1, S, past + S]. */
  mask: Tensor;
  /** S: new positions in this pass. */
  queries: number;
  /** The KV cache, if any. */
  cache: KVStore | undefined;
  /** MoE dispatch strategy. */
  dispatch: MoeDispatch | undefined;
  /** Routing replay per MoE layer (ForwardInput.replay), or null. */
  replay: readonly Tensor[] | null;
}

/** A causal LM from its parts. Holds borrowed tensors; dispose via the loader's owner. */
export class Decoder {
  /** Token embeddings [V, H]. */
  readonly embed: Tensor;
  /** The layers. */
  readonly layers: DecoderLayer[];
  /** Final norm. */
  readonly finalNorm: Norm;
  /** LM head [V, H] (+ bias for PhiMoE). */
  lmHead: LinearLayer;
  /** Head counts and RoPE settings. */
  readonly dims: DecoderDims;
  /** For each layer, its index among the MoE layers (-1 for a dense layer). */
  readonly moeIndex: readonly number[];
  /**
   * How attention is computed in every pass (prefill, decode, training): "auto" uses libtorch's fused
   * SDPA where the build has it, else the eager ops; "sdpa" and "eager" force one (see docs/numerics.md).
   */
  attention: AttentionImpl = "auto";

  /** Assembles a decoder from already-built parts. */
  constructor(
    embed: Tensor,
    layers: DecoderLayer[],
    finalNorm: Norm,
    lmHead: LinearLayer,
    dims: DecoderDims,
  ) {
    this.embed = embed;
    this.layers = layers;
    this.finalNorm = finalNorm;
    this.lmHead = lmHead;
    this.dims = dims;
    let n = 0;
    this.moeIndex = layers.map((l) => (l.mlp.kind === "moe" ? n++ : -1));
  }

  /** Number of MoE layers. */
  get moeLayers(): number {
    return this.moeIndex.filter((i) => i >= 0).length;
  }

  /** Runs the model; with a cache, appends this step's keys and values to it. */
  forward(input: ForwardInput): ForwardOutput {
    return tidy(() => {
      const ctx = this.prepare(input);
      let h = embedding(this.embed, input.inputIds);
      const routerLogits: Tensor[] = [], experts: Tensor[] = [];
      for (let i = 0; i < this.layers.length; i++) {
        const out = this.layer(i, h, ctx);
        h.dispose(); // autograd keeps what backward needs; free our handle now
        h = out.h;
        if (out.routing) {
          routerLogits.push(out.routing.logits);
          experts.push(out.routing.experts);
        }
      }
      input.cache?.advance(ctx.queries);
      const hidden = this.finalNorm.forward(h);
      let logits: Tensor | null = null;
      if (!input.skipLogits) {
        const s = ctx.queries, keep = input.logitsToKeep ?? 0;
        logits = this.lmHead.forward(keep > 0 && keep < s ? hidden.narrow(1, s - keep, keep) : hidden);
      }
      return { logits, hidden, routerLogits, experts };
    });
  }

  /**
   * What every layer of one forward pass shares: RoPE tables and the
   * attention mask. For running layers one at a time (gradient checkpointing);
   * the caller disposes the context.
   */
  prepare(input: ForwardInput): LayerContext {
    const replay = input.replay ?? null;
    if (replay && replay.length !== this.moeLayers) {
      throw new RangeError(
        `routing replay: ${replay.length} layers of experts for ${this.moeLayers} MoE layers`,
      );
    }
    const window = this.dims.slidingWindow;
    const total = (input.cache?.length ?? 0) + input.inputIds.size(1);
    if (window && total > window) {
      throw new RangeError(
        `forward: ${total} positions exceed the model's sliding_window ${window}; windowed attention is not ` +
          "implemented, so longer sequences would attend too far",
      );
    }
    return tidy(() => {
      const s = input.inputIds.size(1);
      const past = input.cache?.length ?? 0;
      const dtype = this.embed.dtype;
      const [cos, sin] = ropeCosSin(input.positionIds, this.dims.headDim, this.dims.ropeTheta, dtype);
      const mask = causalMask(input.attentionMask, past, s, dtype);
      // [B, 1, S, d]: broadcast over heads once here rather than in every layer.
      return {
        cos: cos.unsqueeze(1),
        sin: sin.unsqueeze(1),
        mask,
        queries: s,
        cache: input.cache,
        dispatch: input.dispatch,
        replay,
      };
    });
  }

  /** Layer i on hidden states h [B, S, H]: the new hidden states and, in an MoE layer, its routing. */
  layer(i: number, h: Tensor, ctx: LayerContext): { h: Tensor; routing: Routing | null } {
    const layer = this.layers[i]!;
    return tidy(() => {
      const [b, s] = h.shape as [number, number];
      const a = this.#attention(layer.attn, layer.inputNorm.forward(h), ctx, i);
      const mid = h.add(a);
      const x = layer.postNorm.forward(mid).reshape([b * s, -1]);
      if (layer.mlp.kind === "dense") {
        const { gate, up, down } = layer.mlp;
        const y = down.forward(gate.forward(x).silu().mul(up.forward(x)));
        return { h: mid.add(y.reshape(mid.shape)), routing: null };
      }
      const r = layer.mlp.route(x, layer.mlp.router, ctx.replay?.[this.moeIndex[i]!]);
      const y = dispatch(x, r, layer.mlp.experts, ctx.dispatch);
      return { h: mid.add(y.reshape(mid.shape)), routing: r };
    });
  }

  #attention(blk: AttentionBlock, x: Tensor, ctx: LayerContext, layer: number): Tensor {
    return tidy(() => {
      const { heads, kvHeads, headDim } = this.dims;
      const [b, s] = x.shape as [number, number];
      const split = (t: Tensor, n: number, norm?: Norm): Tensor => {
        const r = t.reshape([b, s, n, headDim]);
        return (norm ? norm.forward(r) : r).transpose(1, 2); // norm over d before the transpose, as Qwen3
      };
      const q = applyRope(split(blk.q.forward(x), heads, blk.qNorm), ctx.cos, ctx.sin);
      let k = applyRope(split(blk.k.forward(x), kvHeads, blk.kNorm), ctx.cos, ctx.sin);
      let v = split(blk.v.forward(x), kvHeads);
      if (ctx.cache) [k, v] = ctx.cache.update(layer, k, v);
      return blk.o.forward(attention(q, k, v, ctx.mask, 1 / Math.sqrt(headDim), this.attention));
    });
  }
}
