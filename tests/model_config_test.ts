/**
 * config.json parsing for qwen3_moe and phimoe: the fixture configs (written
 * by transformers v5, one in v4 key style), HF defaults, v4/v5 key spellings,
 * errors naming the key and file, and the MoE-layer rule. When a Python with
 * transformers is available, our parse is compared field by field with HF's.
 */
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  isMoeLayer,
  loadModelConfig,
  ModelConfigError,
  type MoeConfig,
  parseConfig,
  type PhiMoeConfig,
  type Qwen3MoeConfig,
} from "../model/mod.ts";
import { PYTHON, pythonHas } from "./util.ts";

const MODELS = fileURLToPath(new URL("./fixtures/models/", import.meta.url));

const QWEN_MIN = {
  model_type: "qwen3_moe",
  vocab_size: 300,
  hidden_size: 64,
  num_hidden_layers: 4,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  num_experts: 8,
  num_experts_per_tok: 2,
  moe_intermediate_size: 32,
};
const PHI_MIN = {
  model_type: "phimoe",
  vocab_size: 300,
  hidden_size: 64,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  num_local_experts: 4,
  num_experts_per_tok: 2,
  intermediate_size: 32,
};

function qwen(extra: Record<string, unknown> = {}): Qwen3MoeConfig {
  const c = parseConfig({ ...QWEN_MIN, ...extra }, "test/config.json");
  assert.equal(c.modelType, "qwen3_moe");
  return c as Qwen3MoeConfig;
}
function phi(extra: Record<string, unknown> = {}): PhiMoeConfig {
  const c = parseConfig({ ...PHI_MIN, ...extra }, "test/config.json");
  assert.equal(c.modelType, "phimoe");
  return c as PhiMoeConfig;
}
function fails(raw: Record<string, unknown>, re: RegExp): void {
  assert.throws(() => parseConfig(raw, "test/config.json"), (e: unknown) => {
    assert.ok(e instanceof ModelConfigError, `expected ModelConfigError, got ${e}`);
    assert.match(e.message, /^test\/config\.json: /);
    assert.match(e.message, re);
    return true;
  });
}

Deno.test("config: fixture checkpoints", async (t) => {
  await t.step("qwen3-moe-tiny (v4 keys: num_experts, rope_theta, torch_dtype)", async () => {
    const c = await loadModelConfig(join(MODELS, "qwen3-moe-tiny")) as Qwen3MoeConfig;
    assert.equal(c.modelType, "qwen3_moe");
    assert.equal(c.source, join(MODELS, "qwen3-moe-tiny", "config.json"));
    assert.deepEqual(
      [c.vocabSize, c.hiddenSize, c.numHiddenLayers, c.numAttentionHeads, c.numKeyValueHeads, c.headDim],
      [256, 64, 3, 4, 2, 32],
    );
    assert.deepEqual([c.numExperts, c.numExpertsPerTok, c.moeIntermediateSize, c.intermediateSize], [
      4,
      2,
      32,
      96,
    ]);
    assert.deepEqual([c.normTopkProb, c.mlpOnlyLayers, c.decoderSparseStep], [true, [1], 1]);
    assert.deepEqual([c.ropeTheta, c.ropeType, c.ropeScaling], [10000, "default", null]);
    assert.deepEqual([c.dtype, c.tieWordEmbeddings, c.eosTokenId, c.bosTokenId, c.padTokenId], [
      "float32",
      false,
      2,
      1,
      0,
    ]);
    assert.deepEqual([0, 1, 2].map((i) => isMoeLayer(c, i)), [true, false, true]);
  });
  await t.step("qwen3-moe-fused (v5 keys: num_local_experts, rope_parameters, dtype)", async () => {
    const c = await loadModelConfig(join(MODELS, "qwen3-moe-fused", "config.json")) as Qwen3MoeConfig;
    assert.deepEqual([c.numExperts, c.numExpertsPerTok, c.headDim, c.ropeTheta, c.dtype], [
      3,
      1,
      16,
      10000,
      "float32",
    ]);
    assert.deepEqual([c.tieWordEmbeddings, c.normTopkProb, c.mlpOnlyLayers, c.slidingWindow], [
      true,
      false,
      [],
      null,
    ]);
    assert.deepEqual([0, 1].map((i) => isMoeLayer(c, i)), [true, true]);
  });
  await t.step("phimoe-tiny", async () => {
    const c = await loadModelConfig(join(MODELS, "phimoe-tiny")) as PhiMoeConfig;
    assert.equal(c.modelType, "phimoe");
    assert.deepEqual([c.headDim, c.numExperts, c.numExpertsPerTok, c.intermediateSize], [32, 4, 2, 32]);
    assert.deepEqual([c.attentionBias, c.lmHeadBias, c.slidingWindow, c.rmsNormEps], [
      true,
      true,
      2047,
      1e-5,
    ]);
    assert.deepEqual([c.routerJitterNoise, c.inputJitterNoise, c.routerAuxLossCoef], [0.01, 0.01, 0]);
    assert.deepEqual([c.ropeTheta, c.ropeScaling, c.eosTokenId, c.bosTokenId], [10000, null, 2, 1]);
    assert.deepEqual([0, 1].map((i) => isMoeLayer(c, i)), [true, true]);
  });
});

Deno.test("config: HF defaults", () => {
  const q = qwen();
  assert.deepEqual([q.headDim, q.rmsNormEps, q.ropeTheta, q.maxPositionEmbeddings, q.intermediateSize], [
    16,
    1e-6,
    10000,
    32768,
    6144,
  ]);
  assert.deepEqual([
    q.normTopkProb,
    q.decoderSparseStep,
    q.mlpOnlyLayers,
    q.tieWordEmbeddings,
    q.attentionBias,
  ], [false, 1, [], false, false]);
  assert.deepEqual([q.outputRouterLogits, q.routerAuxLossCoef, q.hiddenAct, q.dtype, q.eosTokenId], [
    false,
    0.001,
    "silu",
    null,
    null,
  ]);
  assert.deepEqual([q.useSlidingWindow, q.slidingWindow, q.initializerRange, q.attentionDropout], [
    false,
    null,
    0.02,
    0,
  ]);
  assert.deepEqual(qwen({ mlp_only_layers: null }).mlpOnlyLayers, []);
  assert.equal(qwen({ use_sliding_window: true }).slidingWindow, 4096);
  const p = phi();
  assert.deepEqual([p.rmsNormEps, p.ropeTheta, p.maxPositionEmbeddings, p.bosTokenId, p.eosTokenId], [
    1e-5,
    1e6,
    131072,
    1,
    2,
  ]);
  assert.deepEqual(
    [p.routerJitterNoise, p.inputJitterNoise, p.lmHeadBias, p.attentionBias, p.slidingWindow],
    [0.01, 0, false, false, null],
  );
  assert.deepEqual([p.expertDropout, p.hiddenDropout], [0, 0]);
  assert.equal(
    phi({ num_key_value_heads: null }).numKeyValueHeads,
    4,
    "phimoe: null KV heads = attention heads",
  );
});

Deno.test("config: v4 and v5 spellings, rope, eos lists, dtype", () => {
  assert.equal(qwen({ num_experts: undefined, num_local_experts: 6 }).numExperts, 6);
  assert.equal(qwen({ rope_parameters: { rope_type: "default", rope_theta: 1e6 } }).ropeTheta, 1e6);
  assert.equal(
    qwen({ rope_theta: 5e5, rope_parameters: { rope_type: "default", rope_theta: 5e5 } }).ropeTheta,
    5e5,
  );
  const yarn = qwen({
    rope_theta: 1e6,
    rope_scaling: { rope_type: "yarn", factor: 4, original_max_position_embeddings: 32768 },
  });
  assert.deepEqual([yarn.ropeTheta, yarn.ropeType, yarn.ropeScaling?.factor], [1e6, "yarn", 4]);
  const half = 8; // head_dim 16 / 2
  const longrope = phi({
    original_max_position_embeddings: 4096,
    rope_scaling: {
      type: "longrope",
      short_factor: new Array(half).fill(1),
      long_factor: new Array(half).fill(2),
      short_mscale: 1.243,
      long_mscale: 1.243,
    },
  });
  assert.equal(longrope.ropeType, "longrope");
  assert.equal(longrope.ropeScaling?.original_max_position_embeddings, 4096);
  assert.deepEqual(qwen({ eos_token_id: [151645, 151643] }).eosTokenId, [151645, 151643]);
  assert.equal(qwen({ torch_dtype: "bfloat16" }).dtype, "bfloat16");
  assert.equal(qwen({ dtype: "float16" }).dtype, "float16");
  assert.equal(
    qwen({ head_dim: 128 }).headDim,
    128,
    "head_dim may differ from hidden/heads (Qwen3-30B-A3B, Phi-tiny)",
  );
  // extra keys from real configs are ignored
  const real = phi({
    auto_map: { AutoConfig: "configuration_slimmoe.PhiMoEConfig" },
    _name_or_path: "Phi-tiny-MoE",
    use_cache: true,
    transformers_version: "4.43.3",
  });
  assert.equal(real.modelType, "phimoe");
});

Deno.test("config: errors name the key and the file", () => {
  fails(
    { ...QWEN_MIN, model_type: "mixtral" },
    /model_type "mixtral" is not supported \(supported: qwen3_moe, phimoe\)/,
  );
  fails({ vocab_size: 3 }, /required key "model_type" is missing/);
  fails({ ...QWEN_MIN, hidden_size: undefined }, /required key "hidden_size" is missing/);
  // Both families compute SiLU: another activation is refused, not silently replaced.
  fails(
    { ...PHI_MIN, hidden_act: "gelu_pytorch_tanh" },
    /"hidden_act" is "gelu_pytorch_tanh", which is not supported/,
  );
  assert.equal(parseConfig({ ...QWEN_MIN, hidden_act: "swish" }, "test/config.json").hiddenAct, "swish");
  fails({ ...QWEN_MIN, num_experts: undefined }, /required key "num_experts" is missing/);
  fails({ ...PHI_MIN, intermediate_size: undefined }, /required key "intermediate_size" is missing/);
  fails({ ...QWEN_MIN, hidden_size: "64" }, /"hidden_size" must be an integer ≥ 1, got "64"/);
  fails({ ...QWEN_MIN, num_hidden_layers: 2.5 }, /"num_hidden_layers" must be an integer/);
  fails({ ...QWEN_MIN, norm_topk_prob: "yes" }, /"norm_topk_prob" must be true or false/);
  fails({ ...QWEN_MIN, rms_norm_eps: -1 }, /"rms_norm_eps" must be a number/);
  fails(
    { ...QWEN_MIN, eos_token_id: "</s>" },
    /"eos_token_id" must be a token id, a list of token ids, or null/,
  );
  fails(
    { ...QWEN_MIN, mlp_only_layers: [0, -1] },
    /"mlp_only_layers" must be a list of non-negative integers/,
  );
  fails({ ...QWEN_MIN, mlp_only_layers: [9] }, /"mlp_only_layers" names layer 9 but the model has 4 layers/);
  fails({ ...QWEN_MIN, decoder_sparse_step: 0 }, /"decoder_sparse_step" must be an integer ≥ 1/);
  fails(
    { ...QWEN_MIN, num_key_value_heads: 3 },
    /"num_key_value_heads" \(3\) must divide num_attention_heads \(4\)/,
  );
  fails(
    { ...QWEN_MIN, num_experts_per_tok: 9 },
    /"num_experts_per_tok" \(9\) exceeds the number of experts \(8\)/,
  );
  fails(
    { ...QWEN_MIN, num_experts: 8, num_local_experts: 4 },
    /"num_experts" \(8\) disagrees with "num_local_experts" \(4\)/,
  );
  fails(
    { ...QWEN_MIN, hidden_size: 66 },
    /"head_dim" is missing and hidden_size 66 is not divisible by num_attention_heads 4/,
  );
  fails(
    { ...QWEN_MIN, rope_theta: 1e4, rope_parameters: { rope_theta: 1e6 } },
    /"rope_theta" \(10000\) disagrees with rope_parameters.rope_theta \(1000000\)/,
  );
  fails({ ...QWEN_MIN, rope_scaling: 3 }, /"rope_scaling" must be an object or null/);
  fails({
    ...PHI_MIN,
    rope_scaling: { type: "longrope", short_factor: [1], long_factor: [1], short_mscale: 1, long_mscale: 1 },
  }, /"rope_scaling.short_factor" must be 8 numbers/);
  fails(
    { ...QWEN_MIN, torch_dtype: "int8" },
    /"torch_dtype" must be one of bfloat16, float16, float32, float64, got "int8"/,
  );
  fails(
    { ...QWEN_MIN, torch_dtype: "float32", dtype: "bfloat16" },
    /"dtype" \(bfloat16\) disagrees with "torch_dtype" \(float32\)/,
  );
  fails(
    { ...PHI_MIN, num_experts_per_tok: 3 },
    /"num_experts_per_tok" is 3, but PhiMoE's sparsemixer routing supports only 2/,
  );
  assert.throws(() => parseConfig([1, 2], "x.json"), /x\.json: must be a JSON object/);
});

Deno.test("config: loadModelConfig file errors", async () => {
  const dir = await Deno.makeTempDir({ prefix: "moerl_cfg_" });
  try {
    await assert.rejects(() => loadModelConfig(dir), new RegExp(`cannot read ${join(dir, "config.json")}`));
    await Deno.writeTextFile(join(dir, "config.json"), "{ nope");
    await assert.rejects(
      () => loadModelConfig(dir),
      new RegExp(`${join(dir, "config.json")} is not valid JSON`),
    );
    await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify({ ...QWEN_MIN, vocab_size: null }));
    await assert.rejects(
      () => loadModelConfig(dir),
      new RegExp(`${join(dir, "config.json")}: "vocab_size" must be an integer`),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("config: isMoeLayer follows transformers' decoder_sparse_step and mlp_only_layers", () => {
  const every2 = qwen({ decoder_sparse_step: 2 });
  assert.deepEqual([0, 1, 2, 3].map((i) => isMoeLayer(every2, i)), [false, true, false, true]);
  const forced = qwen({ mlp_only_layers: [0, 3] });
  assert.deepEqual([0, 1, 2, 3].map((i) => isMoeLayer(forced, i)), [false, true, true, false]);
  const dense = qwen({ num_experts: 0, num_experts_per_tok: 1 });
  assert.deepEqual([0, 1, 2, 3].map((i) => isMoeLayer(dense, i)), [false, false, false, false]);
  assert.throws(() => isMoeLayer(every2, 4), /layer 4 is out of range \(test\/config\.json has 4 layers\)/);
  assert.throws(() => isMoeLayer(every2, 1.5), RangeError);
});

const hasTransformers = pythonHas("transformers");

Deno.test({
  name: "config: matches transformers' parse of the same config.json",
  ignore: !hasTransformers,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "moerl_cfg_py_" });
    try {
      const cases: Record<string, string> = {
        "qwen3-moe-tiny": join(MODELS, "qwen3-moe-tiny", "config.json"),
        "qwen3-moe-fused": join(MODELS, "qwen3-moe-fused", "config.json"),
        "phimoe-tiny": join(MODELS, "phimoe-tiny", "config.json"),
        "qwen-min": join(dir, "qwen.json"),
        "phi-min": join(dir, "phi.json"),
      };
      await Deno.writeTextFile(cases["qwen-min"]!, JSON.stringify(QWEN_MIN));
      await Deno.writeTextFile(cases["phi-min"]!, JSON.stringify(PHI_MIN));
      const script = `
import json, sys
from transformers import AutoConfig
out = {}
for name, path in json.loads(sys.argv[1]).items():
    c = AutoConfig.from_pretrained(path)
    qwen = c.model_type == "qwen3_moe"
    out[name] = dict(
        vocabSize=c.vocab_size, hiddenSize=c.hidden_size, numHiddenLayers=c.num_hidden_layers,
        numAttentionHeads=c.num_attention_heads, numKeyValueHeads=c.num_key_value_heads,
        headDim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        maxPositionEmbeddings=c.max_position_embeddings, rmsNormEps=c.rms_norm_eps,
        tieWordEmbeddings=c.tie_word_embeddings, ropeTheta=c.rope_parameters["rope_theta"],
        attentionBias=c.attention_bias, slidingWindow=c.sliding_window, numExpertsPerTok=c.num_experts_per_tok,
        numExperts=c.num_experts if qwen else c.num_local_experts, routerAuxLossCoef=c.router_aux_loss_coef,
        bosTokenId=c.bos_token_id, eosTokenId=c.eos_token_id, padTokenId=c.pad_token_id,
        **(dict(mlpOnlyLayers=c.mlp_only_layers, decoderSparseStep=c.decoder_sparse_step,
                normTopkProb=c.norm_topk_prob, moeIntermediateSize=c.moe_intermediate_size,
                intermediateSize=c.intermediate_size) if qwen else
           dict(lmHeadBias=c.lm_head_bias, routerJitterNoise=c.router_jitter_noise,
                inputJitterNoise=c.input_jitter_noise, intermediateSize=c.intermediate_size)))
print(json.dumps(out))
`;
      const out = await new Deno.Command(PYTHON, { args: ["-c", script, JSON.stringify(cases)] }).output();
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      const hf = JSON.parse(new TextDecoder().decode(out.stdout)) as Record<string, Record<string, unknown>>;
      for (const [name, path] of Object.entries(cases)) {
        const ours = parseConfig(JSON.parse(await Deno.readTextFile(path)), path) as
          & MoeConfig
          & Record<string, unknown>;
        for (const [key, value] of Object.entries(hf[name]!)) {
          assert.deepEqual(ours[key], value, `${name}: ${key}`);
        }
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("model: a config with scaled RoPE is refused, not run with plain RoPE", async () => {
  const { parseConfig } = await import("../model/config.ts");
  const { randomModel } = await import("../model/model.ts");
  const raw = JSON.parse(
    await Deno.readTextFile(new URL("./fixtures/models/qwen3-moe-tiny/config.json", import.meta.url)),
  );
  const cfg = parseConfig({ ...raw, rope_scaling: { rope_type: "yarn", factor: 4 } }, "tiny/config.json");
  await assert.rejects(() => randomModel(cfg), /tiny\/config\.json: RoPE scaling "yarn" is not implemented/);
});

Deno.test("model: a sequence longer than the sliding window is refused, not attended in full", async () => {
  const { loadModel } = await import("../model/model.ts");
  const { zeros } = await import("../ffi/mod.ts");
  using model = await loadModel(fileURLToPath(new URL("./fixtures/models/phimoe-tiny/", import.meta.url)));
  assert.equal(model.config.slidingWindow, 2047);
  using ids = zeros([1, 2048], { dtype: "int64" });
  assert.throws(
    () => model.decoder.forward({ inputIds: ids, positionIds: ids, attentionMask: ids }),
    /2048 positions exceed the model's sliding_window 2047/,
  );
});
