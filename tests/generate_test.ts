/**
 * Generation beyond greedy parity (tests/model_parity_test.ts): the sampling processors against hand-computed allowed sets,
 * seeded reproducibility, draws at seeded uniforms that do not depend on the batch, EOS and stop strings, a prefill shared by several samples of a prompt, the routing
 * record against a full forward, log-probs at the sampling temperature, and no leaked tensors.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fromTypedArray, Generator, liveTensors, randn, tensor, tidy } from "../ffi/mod.ts";
import { generate, type GenerateOptions } from "../model/generate.ts";
import { counterHash, streamUniform } from "../model/random.ts";
import { drawNext, sampleNext } from "../model/sampling.ts";
import type { RmsNorm } from "../model/layers.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { assertClose, DEVICE } from "./util.ts";

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

Deno.test("sampling at given uniforms takes each kept token for its share, and never a removed one", () => {
  const logp = [0.5, 0.3, 0.15, 0.05].map(Math.log);
  const n = 20000;
  const draw = (us: readonly number[], opts: Parameters<typeof drawNext>[1]): number[] =>
    tidy(() => {
      const u = fromTypedArray(Float64Array.from(us), [us.length, 1], { device: DEVICE });
      return drawNext(tensor(us.map(() => logp), { device: DEVICE }), opts, undefined, u).toArray();
    });
  // top-p 0.9 removes the 0.05 token: the rest renormalised.
  const ids = draw(Array.from({ length: n }, (_, i) => streamUniform(3, i)), { topP: 0.9 });
  const counts = [0, 1, 2, 3].map((k) => ids.filter((id) => id === k).length);
  assert.equal(counts[3], 0, "the removed token is never taken");
  [0.5, 0.3, 0.15].forEach((q, k) => {
    const p = q / 0.95, sd = Math.sqrt(p * (1 - p) / n);
    assert.ok(Math.abs(counts[k]! / n - p) < 5 * sd, `token ${k}: ${counts[k]! / n} vs ${p}`);
  });
  // The ends of [0, 1) take the first and the last kept token; either side of a boundary (to float32 softmax
  // rounding) the tokens on each side.
  assert.deepEqual(draw([0, 1 - 2 ** -53, 0.499, 0.501], { topP: 0.9 }), [0, 2, 0, 0]);
  assert.deepEqual(draw([0.5 / 0.95 - 1e-6, 0.5 / 0.95 + 1e-6], { topP: 0.9 }), [0, 1]);
  // u = 0 (a value the streams give) skips removed tokens at the front too: with the order reversed, top-p
  // 0.9 removes token 0 and u = 0 takes token 1.
  const front = tidy(() => {
    const u = fromTypedArray(Float64Array.from([0]), [1, 1], { device: DEVICE });
    return drawNext(tensor([[...logp].reverse()], { device: DEVICE }), { topP: 0.9 }, undefined, u).toArray();
  });
  assert.deepEqual(front, [1], "a removed first token is never taken, even at u = 0");
  // top-k 1 is greedy whatever u is.
  assert.deepEqual(draw([0, 0.5, 1 - 2 ** -53], { topK: 1 }), [0, 0, 0]);
  // A row's token depends on its scores and u alone: alone, or at another place among other rows.
  const rows = tidy(() => randn([6, 1000], { device: DEVICE }).mul(3).tolist() as number[][]);
  const us = rows.map((_, i) => streamUniform(9, i));
  const pick = (order: number[]): number[] =>
    tidy(() => {
      const u = fromTypedArray(Float64Array.from(order.map((i) => us[i]!)), [order.length, 1], {
        device: DEVICE,
      });
      return drawNext(tensor(order.map((i) => rows[i]!), { device: DEVICE }), { topP: 0.95 }, undefined, u)
        .toArray();
    });
  const all = pick([0, 1, 2, 3, 4, 5]);
  assert.deepEqual(pick([5, 4, 3, 2, 1, 0]), [...all].reverse());
  assert.deepEqual(pick([3]), [all[3]]);
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

  await t.step("sampleSeeds: a row's tokens depend on its prompt, seed and sample alone", async () => {
    // Top-k 8 keeps each draw far from a token boundary (1.5e-3 at the least here, against 5e-5 without), so
    // that another build's rounding of a batch of another size does not flip one.
    const run = (
      prompts: number[][],
      sampleSeeds: number[],
      more: Partial<GenerateOptions> = {},
    ): Promise<{ tokens: number[][]; logprobs: number[][] }> =>
      generate(model.decoder, prompts, {
        maxNewTokens: 10,
        doSample: true,
        temperature: 1.5,
        topK: 8,
        samplesPerPrompt: 2,
        sampleSeeds,
        ...more,
      });
    const all = await run(PROMPTS, [11, 12, 0]);
    const alone = await run([PROMPTS[1]!], [12]);
    assert.deepEqual(alone.tokens, all.tokens.slice(2, 4), "prompt 1 alone draws what it drew in the batch");
    assertClose(alone.logprobs.flat(), all.logprobs.slice(2, 4).flat(), 1e-4, "its log-probs");
    const moved = await run([PROMPTS[2]!, PROMPTS[0]!], [0, 11], { samplesPerPrompt: 3 });
    assert.deepEqual(moved.tokens.slice(0, 2), all.tokens.slice(4, 6), "at another place, with more samples");
    assert.deepEqual(moved.tokens.slice(3, 5), all.tokens.slice(0, 2));
    const padded = await run(PROMPTS, [11, 12, 0], { decodeMode: "static" });
    assert.deepEqual(padded.tokens, all.tokens, "static decode steps (padding rows in the bucket) too");
    const other = await run(PROMPTS, [11, 12, 1]);
    assert.deepEqual(other.tokens.slice(0, 4), all.tokens.slice(0, 4));
    assert.notDeepEqual(other.tokens.slice(4), all.tokens.slice(4), "another seed draws other tokens");
    assert.ok(
      all.tokens.some((row, r) => r % 2 === 0 && row.join() !== all.tokens[r + 1]!.join()),
      "samples differ",
    );
    // Step t of sample j takes uniform t of the stream (seed, j): replayed from a forward over each row's
    // whole sequence, the token holds u_t in its stretch of the cumulative top-8 distribution (to rounding).
    const seeds = [11, 12, 0];
    for (let r = 0; r < all.tokens.length; r++) {
      const prompt = PROMPTS[Math.floor(r / 2)]!, seq = [...prompt, ...all.tokens[r]!];
      const scores = tidy(() =>
        model.decoder.forward({
          inputIds: tensor([seq], { dtype: "int64", device: DEVICE }),
          positionIds: tensor([seq.map((_, j) => j)], { dtype: "int64", device: DEVICE }),
          attentionMask: tensor([seq.map(() => 1)], { dtype: "int64", device: DEVICE }),
        }).logits!.to("float32").div(1.5).tolist() as number[][][]
      );
      const key = counterHash(seeds[Math.floor(r / 2)]!, r % 2);
      all.tokens[r]!.forEach((id, t) => {
        const s = scores[0]![prompt.length - 1 + t]!;
        const kth = [...s].sort((a, b) => b - a)[7]!, top = Math.max(...s);
        const p = s.map((x) => (x < kth ? 0 : Math.exp(x - top))); // top-k: below the 8th removed
        const below = p.slice(0, id).reduce((a, x) => a + x, 0), total = p.reduce((a, x) => a + x, 0);
        const u = streamUniform(key, t);
        assert.ok(
          below / total - 1e-4 <= u && u <= (below + p[id]!) / total + 1e-4,
          `row ${r} step ${t}: u ${u} outside [${below / total}, ${(below + p[id]!) / total})`,
        );
      });
    }
    for (
      const [bad, reason] of [
        [{ doSample: false }, /sampleSeeds need doSample/],
        [{ sampleSeeds: [1, 2] }, /2 sampleSeeds for 3 prompts \(one per prompt\)/],
        [{ sampleSeeds: [1, 2, -1] }, /sampleSeeds\[2\] must be an integer in \[0, 2\^32\), got -1/],
        [{ sampleSeeds: [1, 2 ** 32, 3] }, /sampleSeeds\[1\] must be an integer/],
      ] as const
    ) {
      await assert.rejects(() => run(PROMPTS, [1, 2, 3], bad as Partial<GenerateOptions>), reason);
    }
    using g = new Generator(1, DEVICE);
    await assert.rejects(
      () => run(PROMPTS, [1, 2, 3], { generator: g }),
      /a generator or sampleSeeds, not both/,
    );
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
    // A stop string at the very start of the text: the row keeps its first two tokens, not those drawn
    // before the check saw it.
    const early = greedy.text![1]!.slice(0, 2);
    const first = await generate(model.decoder, PROMPTS, {
      maxNewTokens: 10,
      decode,
      stopStrings: [early],
      checkEvery: 4,
    });
    assert.deepEqual([first.finishReasons[1], first.text![1]], ["stop", ""]);
    assert.deepEqual(first.tokens[1], greedy.tokens[1]!.slice(0, 2));
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

  await t.step(
    "samplesPerPrompt: one prefill per prompt gives what repeating the prompts gives",
    async () => {
      const repeated = PROMPTS.flatMap((p) => [p, p, p]);
      const a = await generate(model.decoder, repeated, { maxNewTokens: 8 });
      const b = await generate(model.decoder, PROMPTS, { maxNewTokens: 8, samplesPerPrompt: 3 });
      assert.deepEqual(b.tokens, a.tokens, "greedy tokens, prompt-major");
      b.logprobs.flat().forEach((x, i) => assert.ok(Math.abs(x - a.logprobs.flat()[i]!) < 1e-5));
      // Sampling: the K samples of a prompt differ from each other.
      using g = new Generator(5, DEVICE);
      const s = await generate(model.decoder, [PROMPTS[0]!], {
        maxNewTokens: 8,
        samplesPerPrompt: 4,
        doSample: true,
        generator: g,
      });
      assert.equal(new Set(s.tokens.map((r) => r.join())).size, 4);
      await assert.rejects(
        () => generate(model.decoder, PROMPTS, { maxNewTokens: 2, samplesPerPrompt: 0 }),
        /samples/,
      );
    },
  );

  await t.step(
    "the routing record holds each token's experts, as a forward over the whole sequence",
    async () => {
      const out = await generate(model.decoder, PROMPTS, {
        maxNewTokens: 6,
        samplesPerPrompt: 2,
        recordRouting: true,
      });
      const rec = out.routing!;
      const s = out.promptWidth;
      const moe = model.decoder.moeLayers;
      assert.deepEqual(rec.shape, [moe, 6, s + 6, model.config.numExpertsPerTok]);
      const record = rec.tolist() as number[][][][];
      rec.dispose();
      for (let r = 0; r < 6; r++) {
        const prompt = PROMPTS[Math.floor(r / 2)]!, seq = [...prompt, ...out.tokens[r]!];
        const full = tidy(() =>
          model.decoder.forward({
            inputIds: tensor([seq], { dtype: "int64", device: DEVICE }),
            positionIds: tensor([seq.map((_, j) => j)], { dtype: "int64", device: DEVICE }),
            attentionMask: tensor([seq.map(() => 1)], { dtype: "int64", device: DEVICE }),
            skipLogits: true,
            dispatch: "loop",
          }).experts.map((e) => e.tolist() as number[][])
        );
        for (let l = 0; l < moe; l++) {
          for (let j = 0; j < seq.length; j++) {
            const at = s - prompt.length + j;
            const got = record[l]![r]![at]!;
            if (j === seq.length - 1) {
              assert.ok(
                got.every((e) => e === -1),
                "the last token was never fed back",
              );
            } else {assert.deepEqual(
                [...got].sort(),
                [...full[l]![j]!].sort(),
                `row ${r} layer ${l} token ${j}`,
              );}
          }
        }
      }
    },
  );

  await t.step("log-probs are of the tempered distribution the tokens were sampled from", async () => {
    const run = async (temperature: number): Promise<{ tokens: number[][]; logprobs: number[][] }> => {
      using g = new Generator(9, DEVICE);
      return await generate(model.decoder, PROMPTS, {
        maxNewTokens: 6,
        doSample: true,
        temperature,
        generator: g,
      });
    };
    const hot = await run(1.7);
    const row = [...PROMPTS[0]!, ...hot.tokens[0]!];
    const want = tidy(() => {
      const logits = model.decoder.forward({
        inputIds: tensor([row], { dtype: "int64", device: DEVICE }),
        positionIds: tensor([row.map((_, j) => j)], { dtype: "int64", device: DEVICE }),
        attentionMask: tensor([row.map(() => 1)], { dtype: "int64", device: DEVICE }),
      }).logits!.to("float32").div(1.7).logSoftmax(-1).tolist() as number[][][];
      return hot.tokens[0]!.map((id, j) => logits[0]![PROMPTS[0]!.length - 1 + j]![id]!);
    });
    want.forEach((w, j) =>
      assert.ok(Math.abs(hot.logprobs[0]![j]! - w) < 1e-4, `token ${j}: ${hot.logprobs[0]![j]} vs ${w}`)
    );
  });

  await t.step("bad arguments are rejected", async () => {
    await assert.rejects(() => generate(model.decoder, [], { maxNewTokens: 2 }), /no prompts/);
    await assert.rejects(() => generate(model.decoder, [[1], []], { maxNewTokens: 2 }), /empty prompt/);
    await assert.rejects(() => generate(model.decoder, [[1]], { maxNewTokens: 0 }), /maxNewTokens/);
    await assert.rejects(
      () => generate(model.decoder, [[1]], { maxNewTokens: 2, stopStrings: ["x"] }),
      /decode/,
    );
    for (
      const [bad, reason] of [
        [{ temperature: 0 }, /temperature must be a number > 0/],
        [{ temperature: -1 }, /temperature must be a number > 0/],
        [{ topP: 0 }, /topP must be in \(0, 1\]/],
        [{ topP: 1.5 }, /topP must be in \(0, 1\]/],
        [{ topK: 2.5 }, /topK must be an integer >= 0/],
      ] as const
    ) {
      await assert.rejects(
        () => generate(model.decoder, [[1]], { maxNewTokens: 2, doSample: true, ...bad }),
        reason,
      );
    }
    // Named before any work: wrong types and unknown names used to be read as defaults or to fail inside an op.
    const vocab = model.decoder.embed.size(0);
    for (
      const [bad, reason] of [
        [{ maxNewTokens: 2.5 }, /maxNewTokens must be an integer >= 1, got 2\.5/],
        [{ maxNewTokens: Infinity }, /maxNewTokens must be an integer >= 1/],
        [{ decodeMode: "gpu" }, /decodeMode "gpu"; expected one of eager, static, graph/],
        [{ dispatch: "fast" }, /dispatch "fast"; expected one of loop, dense, grouped/],
        [{ decodeDispatch: "best" }, /decodeDispatch "best"; expected one of loop, dense, grouped, measured/],
        [{ checkEvery: NaN }, /checkEvery must be an integer >= 1, got NaN/],
        [{ eosTokenIds: [NaN] }, /eosTokenIds holds NaN, not a token id of this model/],
        [{ padTokenId: vocab }, new RegExp(`padTokenId holds ${vocab}, not a token id .*< ${vocab}`)],
      ] as const
    ) {
      await assert.rejects(
        () => generate(model.decoder, [[1]], { maxNewTokens: 2, ...bad } as GenerateOptions),
        reason,
      );
    }
    // A tokenizer that is not the model's: an id past the embeddings is named, not left to the lookup
    // (on a GPU a device-side assert that ends the CUDA context).
    await assert.rejects(
      () => generate(model.decoder, [[1, 2], [3, vocab + 4]], { maxNewTokens: 2 }),
      new RegExp(`sequence 1 has token id ${vocab + 4} at index 1; the model has ${vocab} token embeddings`),
    );
  });

  await t.step("scores that are not finite are an error, not a token", async () => {
    const norm = (model.decoder.finalNorm as RmsNorm).weight;
    using saved = norm.clone();
    norm.fill_(NaN);
    try {
      for (const more of [{}, { doSample: true, sampleSeeds: [3, 4] }] as const) {
        await assert.rejects(
          () => generate(model.decoder, [[1, 2], [3]], { maxNewTokens: 3, samplesPerPrompt: 2, ...more }),
          /generate: the scores of row 0 \(prompt 0, sample 0\) at new token 0 are not finite \(NaN or infinity\)/,
        );
      }
    } finally {
      norm.copy_(saved);
    }
    assert.equal((await generate(model.decoder, [[1, 2]], { maxNewTokens: 2 })).tokens[0]!.length, 2);
  });

  await t.step("a failure mid-generation frees what it made (the routing record too)", async () => {
    const before = liveTensors();
    const failing = (): string => {
      throw new Error("decode failed");
    };
    await assert.rejects(
      () => generate(model.decoder, [[1, 2]], { maxNewTokens: 3, recordRouting: true, decode: failing }),
      /decode failed/,
    );
    assert.equal(liveTensors(), before);
  });

  assert.equal(liveTensors(), live, "generation leaves no tensor behind");
});
