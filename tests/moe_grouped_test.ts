/**
 * The grouped-GEMM MoE dispatch (model/moe.ts "grouped"): the same outputs
 * and gradients as the loop dispatch, for plain and LoRA experts, where
 * libtorch has grouped GEMM (2.8 and later); where it has not, or for a bank
 * without grouped products (4-bit), "grouped" is the loop dispatch. The loop
 * dispatch's uploads and order of additions. And the decode dispatch chosen
 * by measurement.
 */
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import {
  groupedMm,
  groupedMmAvailable,
  hostUploadCount,
  noGrad,
  randn,
  type Tensor,
  tensor,
  tidy,
  zeros,
} from "../ffi/mod.ts";
import { decodeDispatch, groupedCapturable, measureDispatch } from "../model/dispatch_choice.ts";
import { generate } from "../model/generate.ts";
import { LoraState } from "../model/lora.ts";
import { LoraExperts } from "../model/lora_experts.ts";
import { loadModel } from "../model/model.ts";
import { dispatch, type ExpertBank, expertForward, type Routing, StackedExperts } from "../model/moe.ts";
import { assertClose, assertNoLeak, DEVICE, FUSED_EXPERT_NAMES } from "./util.ts";

const o = { dtype: "float32" as const, device: DEVICE };
const E = 6, H = 16, I = 8, T = 11, K = 2;

function setup(): { gu: Tensor; dn: Tensor; x: Tensor; routing: Routing } {
  const gu = randn([E, 2 * I, H], o).mul(0.2), dn = randn([E, H, I], o).mul(0.2);
  const x = randn([T, H], o);
  // Logits that leave one expert without tokens: its group is empty.
  const logits = randn([T, E], o).sub(tensor([0, 0, 0, 0, 0, 50], o));
  const { values, indices } = logits.softmax(-1).topk(K);
  return { gu, dn, x, routing: { experts: indices, weights: values.div(values.sum(-1, true)), logits } };
}

/** Outputs and the gradients of x and of every trainable tensor, under a dispatch mode. */
function run(
  bank: ExpertBank,
  x: Tensor,
  routing: Routing,
  mode: "loop" | "grouped",
  params: Tensor[],
): number[][] {
  return tidy(() => {
    const xi = x.detach().setRequiresGrad();
    const y = dispatch(xi, routing, bank, mode);
    y.square().sum().backward();
    const grads = [xi, ...params].map((p) => p.grad!.toArray());
    for (const p of params) p.clearGrad();
    return [y.detach().toArray(), ...grads];
  });
}

Deno.test({
  name:
    "moe grouped: outputs and gradients equal the loop dispatch (plain and LoRA experts, an empty expert)",
  ignore: !groupedMmAvailable(),
  fn(): void {
    assertNoLeak(() => {
      const { gu, dn, x, routing } = tidy(setup);
      const plain = new StackedExperts(gu, dn, FUSED_EXPERT_NAMES);
      assert.equal(plain.groupable, true);
      const a = run(plain, x, routing, "loop", []), b = run(plain, x, routing, "grouped", []);
      a.forEach((v, i) => assertClose(b[i]!, v, 1e-5, i === 0 ? "output" : "∂x"));

      const lora = new LoraExperts(
        plain,
        { hidden: H, inter: I, like: gu },
        { r: 4, alpha: 8, dropout: 0 },
        new LoraState(),
      );
      const params = [...lora.gateUpAdapters, lora.downAdapter].flatMap((ad) => [ad.A, ad.B]);
      noGrad(() =>
        params.filter((_, i) => i % 2 === 1).forEach((B) => tidy(() => B.copy_(randn(B.shape, o).mul(0.1))))
      );
      const la = run(lora, x, routing, "loop", params), lb = run(lora, x, routing, "grouped", params);
      la.forEach((v, i) => assertClose(lb[i]!, v, 1e-5, `LoRA ${i}`));
      assert.ok(lb[2]!.some((g) => g !== 0), "the adapters get gradients");
      for (const t of [gu, dn, x, ...params, routing.experts, routing.weights, routing.logits]) t.dispose();
    });
  },
});

Deno.test('moe grouped: without grouped products, "grouped" is the loop dispatch', () => {
  assertNoLeak(() => {
    const { gu, dn, x, routing } = tidy(setup);
    const plain = new StackedExperts(gu, dn, FUSED_EXPERT_NAMES);
    // A bank as a 4-bit one is: no grouped products.
    const bank: ExpertBank = {
      count: E,
      names: FUSED_EXPERT_NAMES,
      gateUp: (e, v) => plain.gateUp(e, v),
      down: (e, v) => plain.down(e, v),
      gateUpAll: (v) => plain.gateUpAll(v),
      downAll: (v) => plain.downAll(v),
    };
    const a = run(bank, x, routing, "loop", []), b = run(bank, x, routing, "grouped", []);
    a.forEach((v, i) => assert.deepEqual(b[i], v));
    if (!groupedMmAvailable()) {
      assert.throws(
        () => tidy(() => groupedMm(x, dn.transpose(1, 2), tensor([T], { dtype: "int32" }))),
        /no at::_grouped_mm/,
      );
    }
    for (const t of [gu, dn, x, routing.experts, routing.weights, routing.logits]) t.dispose();
  });
});

Deno.test("moe loop: one upload of each index per layer; a token's rows added in ascending expert order", () => {
  assertNoLeak(() => {
    const { gu, dn, x, routing } = tidy(setup);
    const bank = new StackedExperts(gu, dn, FUSED_EXPERT_NAMES);
    // Three experts per token: the order of a token's three additions shows in the last bits.
    const three: Routing = tidy(() => {
      const { values, indices } = routing.logits.softmax(-1).topk(3);
      return { experts: indices, weights: values.div(values.sum(-1, true)), logits: routing.logits.clone() };
    });
    const i64 = { dtype: "int64" as const, device: DEVICE };
    // Each expert's rows added by an index_add of their own, expert after expert (transformers' loop).
    const byExpert = (xi: Tensor): Tensor => {
      const ids = three.experts.toArray();
      let out = zeros(xi.shape, o);
      for (let e = 0; e < E; e++) {
        const pairs = ids.flatMap((id, i) => (id === e ? [i] : []));
        if (pairs.length === 0) continue;
        const tok = tensor(pairs.map((i) => Math.floor(i / 3)), i64);
        const w = three.weights.reshape([-1]).indexSelect(0, tensor(pairs, i64)).unsqueeze(-1);
        out = out.indexAdd(0, tok, expertForward(bank, e, xi.indexSelect(0, tok)).mul(w));
      }
      return out;
    };
    const outputs = (f: (xi: Tensor) => Tensor): number[][] =>
      tidy(() => {
        const xi = x.detach().setRequiresGrad();
        const y = f(xi);
        y.square().sum().backward();
        return [y.detach().toArray(), xi.grad!.toArray()];
      });
    const before = hostUploadCount();
    const loop = outputs((xi) => dispatch(xi, three, bank, "loop"));
    assert.equal(hostUploadCount() - before, 2, "the pairs' token and slot indices, once for every expert");
    assert.deepEqual(loop, outputs(byExpert), "outputs and ∂x, bit for bit");
    for (const t of [gu, dn, x, routing.experts, routing.weights, routing.logits]) t.dispose();
    for (const t of [three.experts, three.weights, three.logits]) t.dispose();
  });
});

Deno.test("moe dispatch: measured per batch size on the model's own layer, then used by decode steps", async () => {
  using model = await loadModel(fileURLToPath(new URL("./fixtures/models/qwen3-moe-tiny", import.meta.url)), {
    device: DEVICE,
  });
  const m = measureDispatch(model.decoder, 6);
  const tried = Object.keys(m.seconds).sort();
  assert.deepEqual(tried, groupedMmAvailable() ? ["dense", "grouped", "loop"] : ["dense", "loop"]);
  assert.ok(Object.values(m.seconds).every((s) => s! > 0));
  assert.ok(tried.includes(m.best));
  const free = measureDispatch(model.decoder, 6, { syncFree: true, reps: 1 });
  assert.ok(
    !("loop" in free.seconds) && free.best !== "loop",
    "steps that must not wait on the host skip loop",
  );
  // CUDA graphs cannot record libtorch's grouped GEMM outside bfloat16 (it copies its offsets to the host).
  assert.deepEqual(
    [
      groupedCapturable("cuda:0", "float32"),
      groupedCapturable("cuda", "float16"),
      groupedCapturable("cuda:1", "bfloat16"),
      groupedCapturable("cpu", "float32"),
    ],
    [false, false, true, true],
  );
  const mode = decodeDispatch(model.decoder, 6);
  assert.equal(decodeDispatch(model.decoder, 6), mode, "measured once per size, then remembered");
  const prompts = [[1, 5, 9], [4, 4, 7, 8]];
  const opts = { maxNewTokens: 5, eosTokenIds: [], padTokenId: 0 };
  const measured = await generate(model.decoder, prompts, {
    ...opts,
    decodeDispatch: "measured",
    samplesPerPrompt: 3,
  });
  const fixed = await generate(model.decoder, prompts, {
    ...opts,
    decodeDispatch: mode,
    samplesPerPrompt: 3,
  });
  assert.deepEqual(measured.tokens, fixed.tokens);
});
