/**
 * Generation beyond greedy parity (tests/model_parity_test.ts): the sampling processors against hand-computed allowed sets,
 * seeded reproducibility, EOS and stop strings, and no leaked tensors.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Generator, liveTensors, tensor, tidy } from "../mod.ts";
import { generate, sampleNext } from "../model/generate.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { DEVICE } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
const PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]];

/** Draws n tokens from logits [V] with opts, returns counts per token. */
function histogram(logits: number[], opts: Parameters<typeof sampleNext>[1], n: number, seed = 1): number[] {
  using g = new Generator(seed, DEVICE);
  return tidy(() => {
    const scores = tensor(Array(n).fill(logits), { device: DEVICE });
    const ids = sampleNext(scores, opts, g).toArray();
    const counts = Array(logits.length).fill(0);
    for (const id of ids) counts[id]++;
    return counts;
  });
}

Deno.test("generate: sampling processors keep exactly HF's allowed sets", async (t) => {
  const logp = [0.5, 0.3, 0.15, 0.05].map(Math.log); // already normalised
  await t.step("top-k keeps the k largest (ties survive)", () => {
    const c = histogram(logp, { topK: 2 }, 4000);
    assert.deepEqual([c[2], c[3]], [0, 0]);
    assert.ok(Math.abs(c[0]! / 4000 - 0.5 / 0.8) < 0.03, `p(0) ≈ 0.625, got ${c[0]! / 4000}`);
    const ties = histogram([1, 1, 1, 0], { topK: 2 }, 3000);
    assert.ok(
      ties[0]! > 0 && ties[1]! > 0 && ties[2]! > 0 && ties[3] === 0,
      `ties at the k-th value survive: ${ties}`,
    );
  });
  await t.step("top-p removes the tail whose mass is at most 1 − p", () => {
    // ascending cumulative mass: 0.05, 0.20, 0.50, 1.0; remove where <= 0.3 → tokens 3 and 2
    const c = histogram(logp, { topP: 0.7 }, 4000);
    assert.deepEqual([c[2], c[3]], [0, 0]);
    const keepOne = histogram(logp, { topP: 0.01 }, 500);
    assert.deepEqual(keepOne, [500, 0, 0, 0], "the most likely token is always kept");
  });
  await t.step("temperature sharpens before top-k/top-p", () => {
    const c = histogram(logp, { temperature: 0.05 }, 1000);
    assert.ok(c[0]! > 990, `near-greedy at low temperature: ${c}`);
    const flat = histogram(logp, { temperature: 100 }, 4000);
    assert.ok(
      flat.every((x) => Math.abs(x / 4000 - 0.25) < 0.04),
      `near-uniform at high temperature: ${flat}`,
    );
  });
});

Deno.test("generate: the tiny model's generation", async (t) => {
  using model = await loadModel(MODEL, { device: DEVICE });
  const live = liveTensors();

  await t.step("seeded sampling is reproducible and seed-dependent", async () => {
    const run = async (seed: number): Promise<number[][]> => {
      using g = new Generator(seed, DEVICE);
      return (await generate(model.decoder, PROMPTS, {
        maxNewTokens: 12,
        doSample: true,
        topK: 50,
        topP: 0.9,
        generator: g,
      })).tokens;
    };
    assert.deepEqual(await run(3), await run(3));
    assert.notDeepEqual(await run(3), await run(4));
  });

  await t.step("a row that emits EOS stops and reports it; others run to the length", async () => {
    const greedy = await generate(model.decoder, PROMPTS, { maxNewTokens: 10 });
    const eos = greedy.tokens[0]![3]!; // make row 0's 4th token an EOS
    const out = await generate(model.decoder, PROMPTS, {
      maxNewTokens: 10,
      eosTokenIds: [eos],
      checkEvery: 4,
    });
    assert.deepEqual(out.tokens[0], greedy.tokens[0]!.slice(0, greedy.tokens[0]!.indexOf(eos) + 1));
    assert.equal(out.finishReasons[0], "eos");
    out.tokens.forEach((row, i) => {
      const first = greedy.tokens[i]!.indexOf(eos);
      assert.deepEqual(row, first >= 0 ? greedy.tokens[i]!.slice(0, first + 1) : greedy.tokens[i]);
      assert.equal(out.logprobs[i]!.length, row.length);
      assert.ok(out.logprobs[i]!.every((lp) => lp <= 0 && Number.isFinite(lp)));
    });
  });

  await t.step("stop strings end a row and are cut from its text", async () => {
    const decode = (ids: number[]): string => ids.map((id) => String.fromCharCode(97 + (id % 26))).join("");
    const greedy = await generate(model.decoder, PROMPTS, { maxNewTokens: 10, decode });
    const stop = greedy.text![1]!.slice(2, 4); // a string row 1 will produce
    const out = await generate(model.decoder, PROMPTS, {
      maxNewTokens: 10,
      decode,
      stopStrings: [stop],
      checkEvery: 2,
    });
    assert.equal(out.finishReasons[1], "stop");
    assert.equal(out.text![1], greedy.text![1]!.slice(0, greedy.text![1]!.indexOf(stop)));
    assert.ok(decode(out.tokens[1]!).includes(stop) && !decode(out.tokens[1]!.slice(0, -1)).includes(stop));
  });

  await t.step("end to end from one folder: tokenizer, chat template, generation, text", async () => {
    const tok = await Tokenizer.load(MODEL);
    const prompt = await tok.encodeChat([{ role: "user", content: "What is 12+30?" }], {
      addGenerationPrompt: true,
    });
    assert.equal(
      await tok.decode(prompt),
      "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
    );
    const eos = tok.eosTokenIds;
    const out = await generate(model.decoder, [prompt], {
      maxNewTokens: 16,
      eosTokenIds: [...eos],
      decode: (ids) => tok.decode(ids),
    });
    assert.equal(out.text![0], await tok.decode(out.tokens[0]!));
    assert.ok(out.tokens[0]!.length >= 1 && out.tokens[0]!.length <= 16);
  });

  await t.step("bad arguments are rejected", async () => {
    await assert.rejects(() => generate(model.decoder, [], { maxNewTokens: 2 }), /no prompts/);
    await assert.rejects(() => generate(model.decoder, [[1], []], { maxNewTokens: 2 }), /empty prompt/);
    await assert.rejects(() => generate(model.decoder, [[1]], { maxNewTokens: 0 }), /maxNewTokens/);
    await assert.rejects(
      () => generate(model.decoder, [[1]], { maxNewTokens: 2, stopStrings: ["x"] }),
      /decode/,
    );
  });

  assert.equal(liveTensors(), live, "generation leaves no tensor behind");
});
