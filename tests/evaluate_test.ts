/**
 * rl/evaluate.ts on the tiny model: greedy predictions are the same with
 * eager decode steps and with static buffers, whose one session serves every
 * batch (the last, smaller one on padding rows), and nothing leaks; each
 * batch generates from its own problems' prompts, and the totals count the
 * truncated completions. Sampled: several completions per problem, seeded,
 * with pass@k and maj@k.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors } from "../ffi/mod.ts";
import { arithmeticSplit } from "../data/arithmetic.ts";
import { DecodeSession } from "../model/decode_static.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { evalTotals, evaluateExamples, type Prediction } from "../rl/evaluate.ts";
import { DEVICE, FLOAT } from "./util.ts";

Deno.test("evaluate: static decode steps give eager's predictions, one session across batches", async () => {
  const dir = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
  const live = liveTensors();
  {
    using model = await loadModel(dir, { device: DEVICE, dtype: FLOAT });
    const tok = await Tokenizer.load(dir);
    const problems = arithmeticSplit(0.25, 1).heldOut.slice(0, 10);
    const opts = { maxNewTokens: 12, batchSize: 4, prompt: { instruction: "" } }; // batches of 4, 4 and 2
    const eager = await evaluateExamples(model.decoder, tok, problems, opts);
    using session = new DecodeSession(model.decoder, { graphs: false });
    const fixed = await evaluateExamples(model.decoder, tok, problems, {
      ...opts,
      decodeMode: "static",
      session,
    });
    assert.equal(eager.predictions.length, 10);
    assert.ok(new Set(eager.predictions.map((p) => p.completion)).size > 1, "completions differ by problem");
    assert.deepEqual(
      fixed.predictions.map((p) => [p.id, p.completion, p.completion_tokens, p.finish_reason]),
      eager.predictions.map((p) => [p.id, p.completion, p.completion_tokens, p.finish_reason]),
    );
    assert.equal(session.stats.allocations, 1, "the batches of 4, 4 and 2 share one buffer set");
    assert.ok(session.stats.replays > 0, "decode steps ran from the session's recordings");
  }
  assert.equal(liveTensors(), live);
});

Deno.test("evaluate: every batch answers its own problems; truncated_fraction counts completions cut at the cap", async () => {
  const dir = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
  using model = await loadModel(dir, { device: DEVICE, dtype: FLOAT });
  const tok = await Tokenizer.load(dir);
  const problems = arithmeticSplit(0.25, 1).heldOut.slice(0, 4);
  const opts = { maxNewTokens: 12, batchSize: 2, prompt: { instruction: "" } };
  const all = await evaluateExamples(model.decoder, tok, problems, opts);
  // The second batch alone: the same two prompts in one batch, so the same greedy completions.
  const second = await evaluateExamples(model.decoder, tok, problems.slice(2), opts);
  const row = (
    p: Prediction,
  ): unknown[] => [p.id, p.question, p.completion, p.completion_tokens, p.finish_reason];
  assert.notDeepEqual(
    all.predictions.slice(0, 2).map((p) => p.completion),
    second.predictions.map((p) => p.completion),
  );
  assert.deepEqual(all.predictions.slice(2).map(row), second.predictions.map(row));
  const cut =
    all.predictions.filter((p) => p.completion_tokens === 12 && p.finish_reason === "length").length;
  assert.ok(cut > 0, "some completion ran to the cap");
  assert.equal(all.totals.truncated_fraction, cut / 4);
});

Deno.test("evaluate: sampled, each problem's samples together, seeded, with pass@k and maj@k of its predictions", async () => {
  const dir = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");
  const live = liveTensors();
  {
    using model = await loadModel(dir, { device: DEVICE, dtype: FLOAT });
    const tok = await Tokenizer.load(dir);
    const problems = arithmeticSplit(0.25, 1).heldOut.slice(0, 5);
    const opts = { maxNewTokens: 10, batchSize: 2, prompt: { instruction: "" }, samples: 3 };
    const run = (seed: number) =>
      evaluateExamples(model.decoder, tok, problems, { ...opts, sampling: { temperature: 1, seed } });
    const a = await run(7), b = await run(7), c = await run(8);
    assert.deepEqual(
      a.predictions.map((p) => [p.id, p.sample]),
      problems.flatMap((ex) => [0, 1, 2].map((s) => [ex.id, s])),
      "problem by problem, each problem's samples together",
    );
    const texts = (r: typeof a): string[] => r.predictions.map((p) => p.completion);
    assert.deepEqual(texts(a), texts(b), "the same seed draws the same completions");
    assert.notDeepEqual(texts(a), texts(c), "another seed draws others");
    const fixed = await evaluateExamples(model.decoder, tok, problems, {
      ...opts,
      sampling: { temperature: 1, seed: 7 },
      decodeMode: "static",
    });
    assert.deepEqual(texts(fixed), texts(a), "static decode steps draw what eager ones draw");
    // Equal draws need equal logits: a batch of another size can round a row's logits differently, and a draw
    // near a token boundary then flips (the draws themselves are tested on every device in
    // tests/generate_test.ts). A sharper distribution keeps draws far from the boundaries, so that float32
    // rounding does not reach them; bfloat16 rounding on CUDA (GEMM kernels chosen by the shape) would.
    if (DEVICE === "cpu" || FLOAT === "float32") {
      const sharp = { ...opts, sampling: { temperature: 0.5, topP: 0.8, seed: 7 } };
      const base = texts(await evaluateExamples(model.decoder, tok, problems, sharp));
      assert.ok(problems.some((_, i) => new Set(base.slice(3 * i, 3 * i + 3)).size > 1), "still sampled");
      for (const batchSize of [1, 5]) {
        const other = await evaluateExamples(model.decoder, tok, problems, { ...sharp, batchSize });
        assert.deepEqual(texts(other), base, `batches of ${batchSize} problems draw the same completions`);
      }
      const later = await evaluateExamples(model.decoder, tok, problems.slice(1), sharp);
      assert.deepEqual(texts(later), base.slice(3), "so does a problem at another place in its batch");
    }
    assert.ok(
      problems.some((_, i) => new Set(texts(a).slice(3 * i, 3 * i + 3)).size > 1),
      "a problem's samples differ",
    );
    assert.deepEqual({ ...a.totals, seconds: 0, tokens_per_second: 0 }, {
      ...evalTotals(a.predictions, 3, 0),
      seconds: 0,
      tokens_per_second: 0,
    });
    assert.deepEqual([a.totals.n, a.totals.samples], [5, 3]);
    // The greedy run of the same problems: one completion each, pass@1 and maj@1 its accuracy.
    const greedy = await evaluateExamples(model.decoder, tok, problems, { ...opts, samples: 1 });
    assert.equal(greedy.predictions.length, 5);
    const g = greedy.totals;
    assert.deepEqual([g.pass_at_k_strict, g.maj_at_k_flexible], [g.accuracy_strict, g.accuracy_flexible]);
    await assert.rejects(
      () => evaluateExamples(model.decoder, tok, problems, opts),
      /evaluate: 3 greedy completions of a problem would all be the same: sample them/,
    );
    await assert.rejects(
      () => evaluateExamples(model.decoder, tok, problems, { ...opts, samples: 0 }),
      /evaluate: samples must be an integer >= 1, got 0/,
    );
  }
  assert.equal(liveTensors(), live);
});
