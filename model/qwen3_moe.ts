/**
 * Qwen3-MoE (`qwen3_moe`): RMSNorms, q/k norms before RoPE, softmax top-k
 * routing with optional renormalisation, optional dense layers, optional tied
 * embeddings (transformers' modeling_qwen3_moe; docs/numerics.md).
 * @module
 */
import { isMoeLayer, type Qwen3MoeConfig } from "./config.ts";
import { Decoder, type DecoderLayer } from "./decoder.ts";
import { Linear, RmsNorm } from "./layers.ts";
import { softmaxTopK, StackedExperts } from "./moe.ts";
import type { WeightLoader } from "./weights.ts";

/** Builds a Qwen3-MoE decoder from a checkpoint's tensors. */
export async function buildQwen3Moe(cfg: Qwen3MoeConfig, w: WeightLoader): Promise<Decoder> {
  const h = cfg.hiddenSize, d = cfg.headDim, eps = cfg.rmsNormEps;
  const nH = cfg.numAttentionHeads, nKV = cfg.numKeyValueHeads;
  const bias = cfg.attentionBias;
  const linear = async (name: string, out: number, inp: number, withBias: boolean): Promise<Linear> =>
    new Linear(
      await w.load(`${name}.weight`, [out, inp]),
      withBias ? await w.load(`${name}.bias`, [out]) : null,
    );

  const layers: DecoderLayer[] = [];
  for (let i = 0; i < cfg.numHiddenLayers; i++) {
    const p = `model.layers.${i}`;
    const attn = {
      q: await linear(`${p}.self_attn.q_proj`, nH * d, h, bias),
      k: await linear(`${p}.self_attn.k_proj`, nKV * d, h, bias),
      v: await linear(`${p}.self_attn.v_proj`, nKV * d, h, bias),
      o: await linear(`${p}.self_attn.o_proj`, h, nH * d, bias),
      qNorm: new RmsNorm(await w.load(`${p}.self_attn.q_norm.weight`, [d]), eps),
      kNorm: new RmsNorm(await w.load(`${p}.self_attn.k_norm.weight`, [d]), eps),
    };
    let mlp: DecoderLayer["mlp"];
    if (isMoeLayer(cfg, i)) {
      const e = cfg.numExperts, im = cfg.moeIntermediateSize;
      const router = new Linear(await w.load(`${p}.mlp.gate.weight`, [e, h]));
      const fused = w.has(`${p}.mlp.experts.gate_up_proj`);
      const gateUp = fused
        ? await w.load(`${p}.mlp.experts.gate_up_proj`, [e, 2 * im, h])
        : await w.stackExperts(e, (x) =>
          w.concat([`${p}.mlp.experts.${x}.gate_proj.weight`, `${p}.mlp.experts.${x}.up_proj.weight`], [[
            im,
            h,
          ], [im, h]]));
      const down = fused
        ? await w.load(`${p}.mlp.experts.down_proj`, [e, h, im])
        : await w.stackExperts(e, (x) => w.load(`${p}.mlp.experts.${x}.down_proj.weight`, [h, im]));
      const k = cfg.numExpertsPerTok, norm = cfg.normTopkProb;
      mlp = {
        kind: "moe",
        router,
        routerName: `${p}.mlp.gate`,
        route: (x, r, replay) => softmaxTopK(x, r, k, norm, replay),
        experts: new StackedExperts(gateUp, down, {
          prefix: `${p}.mlp.experts`,
          gate: "gate_proj",
          up: "up_proj",
          down: "down_proj",
          layout: fused ? "fused" : "per-expert",
        }),
      };
    } else {
      const im = cfg.intermediateSize;
      mlp = {
        kind: "dense",
        gate: await linear(`${p}.mlp.gate_proj`, im, h, false),
        up: await linear(`${p}.mlp.up_proj`, im, h, false),
        down: await linear(`${p}.mlp.down_proj`, h, im, false),
      };
    }
    layers.push({
      name: p,
      mlpName: "mlp",
      inputNorm: new RmsNorm(await w.load(`${p}.input_layernorm.weight`, [h]), eps),
      postNorm: new RmsNorm(await w.load(`${p}.post_attention_layernorm.weight`, [h]), eps),
      attn,
      mlp,
    });
  }
  const embed = await w.load("model.embed_tokens.weight", [cfg.vocabSize, h]);
  const lmHead = cfg.tieWordEmbeddings ? new Linear(embed) : await linear("lm_head", cfg.vocabSize, h, false);
  const finalNorm = new RmsNorm(await w.load("model.norm.weight", [h]), eps);
  return new Decoder(embed, layers, finalNorm, lmHead, {
    heads: nH,
    kvHeads: nKV,
    headDim: d,
    ropeTheta: cfg.ropeTheta,
    slidingWindow: cfg.slidingWindow,
  });
}
