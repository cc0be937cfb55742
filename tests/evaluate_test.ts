/**
 * rl/evaluate.ts on the tiny model: greedy predictions are the same with
 * eager decode steps and with static buffers, whose one session serves every
 * batch (the last, smaller one on padding rows), and nothing leaks.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors } from "../ffi/mod.ts";
import { arithmeticSplit } from "../data/arithmetic.ts";
import { DecodeSession } from "../model/decode_static.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { evaluateExamples } from "../rl/evaluate.ts";
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
