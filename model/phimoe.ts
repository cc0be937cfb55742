/**
 * PhiMoE (`phimoe`, and Microsoft's SlimMoE remote code): LayerNorms with
 * bias, attention and LM-head biases, sparsemixer top-2 routing in eval mode
 * (transformers' modeling_phimoe; docs/numerics.md). Reads the 4.x/SlimMoE key names (`block_sparse_moe`,
 * `gate`, per-expert w1/w2/w3) and v5's (`mlp`, `router`, fused experts).
 * @module
 */
import type { PhiMoeConfig } from "./config.ts";
import { Decoder, type DecoderLayer } from "./decoder.ts";
import { LayerNorm, Linear } from "./layers.ts";
import { sparsemixer, StackedExperts } from "./moe.ts";
import type { WeightLoader } from "./weights.ts";

/** Builds a PhiMoE decoder from a checkpoint's tensors. */
export async function buildPhiMoe(cfg: PhiMoeConfig, w: WeightLoader): Promise<Decoder> {
  if (cfg.numExpertsPerTok !== 2) {
    throw new Error(
      `${cfg.source}: phimoe's sparsemixer routes exactly 2 experts per token, got num_experts_per_tok ${cfg.numExpertsPerTok}`,
    );
  }
  const h = cfg.hiddenSize, d = cfg.headDim, eps = cfg.rmsNormEps;
  const nH = cfg.numAttentionHeads, nKV = cfg.numKeyValueHeads;
  const e = cfg.numExperts, im = cfg.intermediateSize;
  const linear = async (name: string, out: number, inp: number, withBias: boolean): Promise<Linear> =>
    new Linear(
      await w.load(`${name}.weight`, [out, inp]),
      withBias ? await w.load(`${name}.bias`, [out]) : null,
    );
  const norm = async (name: string): Promise<LayerNorm> =>
    new LayerNorm(await w.load(`${name}.weight`, [h]), await w.load(`${name}.bias`, [h]), eps);

  const layers: DecoderLayer[] = [];
  for (let i = 0; i < cfg.numHiddenLayers; i++) {
    const p = `model.layers.${i}`;
    const b = cfg.attentionBias;
    const attn = {
      q: await linear(`${p}.self_attn.q_proj`, nH * d, h, b),
      k: await linear(`${p}.self_attn.k_proj`, nKV * d, h, b),
      v: await linear(`${p}.self_attn.v_proj`, nKV * d, h, b),
      o: await linear(`${p}.self_attn.o_proj`, h, nH * d, b),
    };
    const moe = w.has(`${p}.block_sparse_moe.gate.weight`) ? `${p}.block_sparse_moe` : `${p}.mlp`;
    const routerKey = w.pick(`${moe}.gate.weight`, `${moe}.router.weight`);
    const router = new Linear(await w.load(routerKey, [e, h]));
    const fused = w.has(`${moe}.experts.gate_up_proj`);
    const gateUp = fused
      ? await w.load(`${moe}.experts.gate_up_proj`, [e, 2 * im, h])
      : await w.stackExperts(e, (x) =>
        w.concat([`${moe}.experts.${x}.w1.weight`, `${moe}.experts.${x}.w3.weight`], [[im, h], [im, h]]));
    const down = fused
      ? await w.load(`${moe}.experts.down_proj`, [e, h, im])
      : await w.stackExperts(e, (x) => w.load(`${moe}.experts.${x}.w2.weight`, [h, im]));
    const jitter = cfg.routerJitterNoise;
    layers.push({
      name: p,
      mlpName: moe.slice(p.length + 1),
      inputNorm: await norm(`${p}.input_layernorm`),
      postNorm: await norm(`${p}.post_attention_layernorm`),
      attn,
      mlp: {
        kind: "moe",
        router,
        routerName: routerKey.replace(/\.weight$/, ""),
        route: (x, r, replay) => sparsemixer(x, r, jitter, replay),
        experts: new StackedExperts(gateUp, down, {
          prefix: `${moe}.experts`,
          gate: "w1",
          up: "w3",
          down: "w2",
          layout: fused ? "fused" : "per-expert",
        }),
      },
    });
  }
  const embed = await w.load("model.embed_tokens.weight", [cfg.vocabSize, h]);
  const lmHead = cfg.tieWordEmbeddings // tied: the weight is the embedding's, a bias is still its own (as HF)
    ? new Linear(embed, cfg.lmHeadBias ? await w.load("lm_head.bias", [cfg.vocabSize]) : null)
    : await linear("lm_head", cfg.vocabSize, h, cfg.lmHeadBias);
  const finalNorm = await norm("model.norm");
  return new Decoder(embed, layers, finalNorm, lmHead, {
    heads: nH,
    kvHeads: nKV,
    headDim: d,
    ropeTheta: cfg.ropeTheta,
    slidingWindow: cfg.slidingWindow,
  });
}
