/**
 * A generation batch too large for memory fails with an error that names the
 * settings bounding it (rollout.generationBatch, rollout.maxNewTokens) and the
 * KV cache's size, not with the allocator's message alone; the process lives on.
 * An evaluation batch too large names eval.batchSize, and a learn pass train.microBatch. A batch of one prompt (one problem), which no smaller
 * batch setting can shrink, is told to cut the tokens instead.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { liveTensors, TorchError, zeros } from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import { evaluateExamples } from "../rl/evaluate.ts";
import { learn } from "../rl/learn.ts";
import { ppoObjective } from "../rl/objective.ts";
import { policyOptimizer } from "../rl/ppo.ts";
import { Policy } from "../rl/policy.ts";
import { DEVICE, FLOAT, scriptedScore } from "./util.ts";

const MODEL = join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny");

Deno.test("collect: out of memory in generation names rollout.generationBatch and the KV cache's size", async () => {
  const live = liveTensors();
  {
    using model = await loadModel(MODEL, { dtype: FLOAT, device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    using policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    const prompts = [[5, 6, 7], [8, 9]].map((ids, i) => ({ ids, answer: i }));
    // 2^40 new tokens: no allocator grants their cache, so it fails at once rather than filling the memory.
    const cfg = { rollout: { k: 2, maxNewTokens: 2 ** 40 } };
    const err = await collect(policy, tok, prompts, cfg, { seed: 1, score: scriptedScore(() => 1) }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(err instanceof Error, "collect must fail");
    assert.match(
      err.message,
      /^collect: out of memory generating 4 sequences at once \(2 prompts × rollout\.k 2\), up to 1099511627779 tokens each; their KV cache alone takes [\d.e+]+ GiB\. Set rollout\.generationBatch to fewer sequences \(a multiple of rollout\.k, e\.g\. 2\), or lower rollout\.maxNewTokens\./,
    );
    assert.ok(err.cause instanceof TorchError && err.cause.outOfMemory, "the allocator's error is its cause");
    // The process and the policy live on: a collect that fits runs.
    using buf = await collect(policy, tok, prompts, { rollout: { k: 2, maxNewTokens: 3 } }, {
      seed: 1,
      score: scriptedScore(() => 1),
    });
    assert.equal(buf.size, 4);
  }
  assert.equal(liveTensors(), live);
});

Deno.test("evaluate: out of memory in generation names eval.batchSize and the KV cache's size", async () => {
  const live = liveTensors();
  {
    using model = await loadModel(MODEL, { dtype: FLOAT, device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    const examples = [1, 2, 3].map((i) => ({
      id: `test-${i}`,
      question: `What is ${i} + ${i}?`,
      solution: `${i} + ${i} = ${2 * i}
#### ${2 * i}`,
      answer: String(2 * i),
      answerValue: 2 * i,
    }));
    const err = await evaluateExamples(model.decoder, tok, examples, { maxNewTokens: 2 ** 40, batchSize: 2 })
      .then(
        () => null,
        (e: unknown) => e,
      );
    assert.ok(err instanceof Error, "the evaluation must fail");
    assert.match(
      err.message,
      /^evaluate: out of memory generating 2 completions at once \(2 problems × 1 samples\), up to \d+ tokens each; their KV cache alone takes [\d.e+]+ GiB\. Lower the batch size \(eval\.batchSize\), or the token cap \(eval\.maxNewTokens\)\./,
    );
    assert.ok(err.cause instanceof TorchError && err.cause.outOfMemory);
  }
  assert.equal(liveTensors(), live);
});

Deno.test("out of memory with one prompt (one problem) per batch advises no smaller batch, which there is not", async () => {
  const live = liveTensors();
  {
    using model = await loadModel(MODEL, { dtype: FLOAT, device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    using policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    const prompts = [[5, 6, 7], [8, 9]].map((ids, i) => ({ ids, answer: i }));
    const cfg = { rollout: { k: 2, generationBatch: 2, maxNewTokens: 2 ** 40 } };
    const err = await collect(policy, tok, prompts, cfg, { seed: 1, score: scriptedScore(() => 1) }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(err instanceof Error && err.cause instanceof TorchError, "collect must fail out of memory");
    assert.match(
      err.message,
      /^collect: out of memory generating 2 sequences at once \(1 prompt × rollout\.k 2\)/,
    );
    assert.doesNotMatch(err.message, /generationBatch to fewer/, "the batch is one prompt's samples already");
    assert.match(err.message, /lower rollout\.maxNewTokens/);

    const examples = [{
      id: "test-1",
      question: "What is 1 + 1?",
      solution: "1 + 1 = 2\n#### 2",
      answer: "2",
      answerValue: 2,
    }];
    const sampling = { temperature: 1, topP: 1, seed: 1 };
    const ev = await evaluateExamples(model.decoder, tok, examples, {
      maxNewTokens: 2 ** 40,
      batchSize: 4,
      samples: 2,
      sampling,
    }).then(() => null, (e: unknown) => e);
    assert.ok(
      ev instanceof Error && ev.cause instanceof TorchError,
      "the evaluation must fail out of memory",
    );
    assert.match(
      ev.message,
      /^evaluate: out of memory generating 2 completions at once \(1 problem × 2 samples\)/,
    );
    assert.doesNotMatch(ev.message, /eval\.batchSize/, "the batch is one problem already");
    assert.match(ev.message, /eval\.maxNewTokens/);
    assert.match(ev.message, /eval\.samples/);
  }
  assert.equal(liveTensors(), live);
});

Deno.test("learn: out of memory in a pass names train.microBatch and gradient checkpointing; no gradient is left", async () => {
  const live = liveTensors();
  {
    using model = await loadModel(MODEL, { dtype: FLOAT, device: DEVICE });
    const tok = await Tokenizer.load(MODEL);
    using policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
    const prompts = [[5, 6, 7], [8, 9]].map((ids, i) => ({ ids, answer: i }));
    const collected = { rollout: { k: 2, maxNewTokens: 3 } };
    using buf = await collect(policy, tok, prompts, collected, {
      seed: 1,
      score: scriptedScore((i) => i % 2),
    });
    using opt = policyOptimizer(policy);
    const failure = (advantage: "token_value" | "group"): unknown => {
      let calls = 0;
      try {
        learn(policy, opt, buf, { ...collected, ppo: { advantage } }, {
          microBatch: 2,
          // The second pass asks for 2^50 bytes, as a pass too large for the device would: the first pass's
          // gradients are then waiting for the step.
          objective: (out, inputs, c) => {
            if (++calls === 2) zeros([2 ** 48], { dtype: "float32", device: DEVICE }).dispose();
            return ppoObjective(out, inputs, c);
          },
        });
      } catch (e) {
        return e;
      }
      return null;
    };
    const head =
      /^learn: out of memory in a pass of up to 2 sequences \(LearnOptions\.microBatch; deno task train passes train\.microBatch × rollout\.k\)\. /;
    // Without a critic the micro-batches split the passes only.
    const plain = failure("group");
    assert.ok(plain instanceof Error, "learn must fail");
    assert.match(plain.message, head);
    assert.match(
      plain.message,
      /Fewer sequences per pass change the passes, not the update: lower train\.microBatch and raise train\.gradAccum as much, or set train\.gradientCheckpointing: true, or a smaller train\.headChunk/,
    );
    // The critic steps once per micro-batch of prompt groups: fewer sequences per pass give it more, smaller steps.
    const err = failure("token_value");
    assert.ok(err instanceof Error, "learn must fail");
    assert.match(err.message, head);
    assert.match(
      err.message,
      /train\.gradientCheckpointing: true or a smaller train\.headChunk change the passes, not the update; a lower train\.microBatch \(train\.gradAccum raised as much\) also gives the critic \(ppo\.advantage "token_value"\) more, smaller steps: it steps once per micro-batch of prompt groups/,
    );
    assert.doesNotMatch(err.message, /not the update: lower train\.microBatch/);
    assert.ok(err.cause instanceof TorchError && err.cause.outOfMemory);
    assert.ok(
      policy.policyParameters().every((p) => p.grad === null),
      "the failed step's gradients are dropped",
    );
  }
  assert.equal(liveTensors(), live);
});
