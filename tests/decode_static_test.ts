/**
 * Decode steps on static buffers (model/decode_static.ts) against today's
 * eager steps, on both tiny fixture models: left-padded prompts of different
 * lengths, several samples per prompt, the routing record, EOS, seeded
 * sampling, a session reused across batches (padding rows, a longer cache),
 * collect with rollout.decode, and no tensor left behind. On a CPU "graph"
 * runs the same static-buffer steps without graphs; on a GPU
 * (MOERL_TEST_DEVICE=cuda) it captures.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Generator, liveGraphs, liveTensors, nativeLiveCount, zeros } from "../ffi/mod.ts";
import { DecodeSession } from "../model/decode_static.ts";
import { generate, type GenerateOptions, type GenerateResult } from "../model/generate.ts";
import { KVCache, StaticKVView } from "../model/kv_cache.ts";
import { loadModel } from "../model/model.ts";
import { Tokenizer } from "../model/tokenizer.ts";
import { collect } from "../rl/collect.ts";
import type { RolloutPrompt } from "../rl/rollout_buffer.ts";
import { rlConfig } from "../rl/config.ts";
import { Policy } from "../rl/policy.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { assertClose, DEVICE, FLOAT } from "./util.ts";

const FIXTURES = join(import.meta.dirname!, "fixtures", "models");
const PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]; // widths 7, 2, 4: left padding
// Static windows are wider than the filled slots, so softmax and attention sums run over more (masked)
// terms: float32 log-probs agree to rounding, not bit for bit (observed ≤ 3e-6 on the CPU).
const LP_TOL = 1e-5;
// In bf16 such a rounding step can flip a near-tie of the tiny random models, and a row's continuation
// then differs: there the first token (the shared prefill's) must agree and the rest is reported.
const EXACT = FLOAT === "float32";

function assertSame(got: GenerateResult, want: GenerateResult, what: string): void {
  assert.equal(got.promptWidth, want.promptWidth);
  if (!EXACT) {
    assert.deepEqual(got.tokens.map((r) => r[0]), want.tokens.map((r) => r[0]), `${what}: first tokens`);
    const same = got.tokens.flat().filter((x, i) => x === want.tokens.flat()[i]).length;
    console.log(`${what}: ${same} of ${want.tokens.flat().length} tokens as eager (${FLOAT})`);
    return;
  }
  assert.deepEqual(got.tokens, want.tokens, `${what}: tokens`);
  assert.deepEqual(got.finishReasons, want.finishReasons, `${what}: finish reasons`);
  assertClose(got.logprobs.flat(), want.logprobs.flat(), LP_TOL, `${what}: log-probs`);
}

function routingOf(r: GenerateResult): number[][][][] | null {
  const t = r.routing;
  if (!t) return null;
  const list = t.tolist() as number[][][][];
  t.dispose();
  return list;
}

for (const name of ["qwen3-moe-tiny", "phimoe-tiny"]) {
  Deno.test(`decode static: ${name}: the same greedy tokens, log-probs and routing as eager`, async (t) => {
    using model = await loadModel(join(FIXTURES, name), { dtype: FLOAT, device: DEVICE });
    const js = liveTensors(), native = nativeLiveCount(), graphs = liveGraphs();
    const run = (o: Partial<GenerateOptions>): Promise<GenerateResult> =>
      generate(model.decoder, PROMPTS, { maxNewTokens: 24, samplesPerPrompt: 2, recordRouting: true, ...o });

    await t.step("static and graph modes, with a small window (several windows per call)", async () => {
      const eager = await run({});
      const eagerRouting = routingOf(eager);
      for (const decodeMode of ["static", "graph"] as const) {
        // kvBucket 8: windows of 8, 16, 24, 32 slots over the 7 + 24 filled: warm-up, capture, replays.
        using session = new DecodeSession(model.decoder, { graphs: decodeMode === "graph", kvBucket: 8 });
        const got = await run({ decodeMode, session });
        assertSame(got, eager, decodeMode);
        const routing = routingOf(got);
        if (EXACT) assert.deepEqual(routing, eagerRouting, `${decodeMode}: routing`);
        // 23 steps write slots 7..29: windows 8 (1 step: warm-up only, never captured), 16 (8), 24 (8), 32 (6).
        const st = session.stats;
        assert.deepEqual([st.warmups, st.captures, st.replays, st.allocations, st.fallbacks], [
          4,
          3,
          19,
          1,
          0,
        ]);
      }
    });

    await t.step("default session, default window; EOS and checkEvery as eager", async () => {
      const greedy = await run({ recordRouting: false });
      const eos = greedy.tokens[2]![5]!; // row 2 stops at its 6th token (others may too)
      const opts = { recordRouting: false, eosTokenIds: [eos], checkEvery: 3 };
      const eager = await run(opts);
      assert.equal(eager.finishReasons[2], "eos");
      for (const decodeMode of ["static", "graph"] as const) {
        assertSame(await run({ ...opts, decodeMode }), eager, decodeMode);
      }
    });

    await t.step("seeded sampling: reproducible, and the same draws as eager", async () => {
      const sample = async (decodeMode: "eager" | "static", seed: number): Promise<GenerateResult> => {
        using g = new Generator(seed, DEVICE);
        return await run({ decodeMode, doSample: true, temperature: 0.8, topK: 20, topP: 0.9, generator: g });
      };
      const a = await sample("static", 11), b = await sample("static", 11), e = await sample("eager", 11);
      for (const r of [a, b, e]) r.routing?.dispose();
      assert.deepEqual(a.tokens, b.tokens);
      assertSame(a, e, "sampled");
      const c = await sample("static", 12);
      c.routing?.dispose();
      assert.notDeepEqual(c.tokens, a.tokens);
    });

    await t.step("a session serves smaller batches (padding rows) and grows for longer ones", async () => {
      using session = new DecodeSession(model.decoder, { kvBucket: 16 });
      const mode = { decodeMode: "graph" as const, session, recordRouting: false };
      const big = await run({ ...mode, maxNewTokens: 10 });
      assertSame(big, await run({ maxNewTokens: 10, recordRouting: false }), "6 rows");
      const two = PROMPTS.slice(0, 2); // 4 rows: reuses the 6-row buffers
      const small = await generate(model.decoder, two, { ...mode, maxNewTokens: 10, samplesPerPrompt: 2 });
      const eagerSmall = await generate(model.decoder, two, { maxNewTokens: 10, samplesPerPrompt: 2 });
      assertSame(small, eagerSmall, "4 rows in 6");
      // Seeded sampling too: the padding rows draw nothing, so the real rows' draws match eager decoding's.
      const seeded = async (opts: Partial<GenerateOptions>): Promise<GenerateResult> => {
        using gen = new Generator(7, DEVICE);
        return await generate(model.decoder, two, {
          maxNewTokens: 10,
          samplesPerPrompt: 2,
          doSample: true,
          generator: gen,
          ...opts,
        });
      };
      assertSame(await seeded(mode), await seeded({}), "sampled: 4 rows in 6");
      assert.equal(session.stats.allocations, 1);
      const long = await run({ ...mode, maxNewTokens: 70 }); // 7 + 70 slots > 64: new, longer buffers
      assertSame(long, await run({ maxNewTokens: 70, recordRouting: false }), "longer");
      assert.equal(session.stats.allocations, 2);
      const one = await generate(model.decoder, [PROMPTS[1]!], { ...mode, maxNewTokens: 5 }); // 1 row: own set
      assertSame(one, await generate(model.decoder, [PROMPTS[1]!], { maxNewTokens: 5 }), "1 row");
      assert.equal(session.stats.allocations, 3);
    });

    assert.equal(liveTensors(), js, "no tensor left behind");
    assert.equal(nativeLiveCount(), native, "no native handle left behind");
    assert.equal(liveGraphs(), graphs, "no CUDA graph left behind");
  });
}

Deno.test("decode static: bad settings and views are refused with the reason", async () => {
  using model = await loadModel(join(FIXTURES, "qwen3-moe-tiny"), { dtype: FLOAT, device: DEVICE });
  assert.throws(() => new DecodeSession(model.decoder, { kvBucket: 0 }), /kvBucket must be an integer >= 1/);
  assert.throws(
    () => rlConfig({ rollout: { decode: "fast" as "graph" } }),
    /rollout\.decode: expected one of/,
  );
  using cache = new KVCache(1, 2, 1, 8, 4, { dtype: FLOAT, device: DEVICE });
  using slot = zeros([1], { dtype: "int64", device: DEVICE });
  assert.throws(() => new StaticKVView(cache, slot, 9), /width 9 outside 1\.\.8/);
  const view = new StaticKVView(cache, slot, 8);
  assert.equal(view.length, 7, "the query sits at the window's last slot");
  using two = zeros([2, 1, 2, 4], { dtype: FLOAT, device: DEVICE });
  assert.throws(() => view.update(0, two, two), /one token per step/);
  // A session serves one decoder, in the mode it was made for.
  using graphs = new DecodeSession(model.decoder);
  await assert.rejects(
    () => generate(model.decoder, [[1, 2]], { maxNewTokens: 4, decodeMode: "static", session: graphs }),
    /decodeMode "static" with a session made with graphs: true \(make it with \{ graphs: false \}\)/,
  );
  using other = await loadModel(join(FIXTURES, "qwen3-moe-tiny"), { dtype: FLOAT, device: DEVICE });
  await assert.rejects(
    () => generate(other.decoder, [[1, 2]], { maxNewTokens: 4, decodeMode: "graph", session: graphs }),
    /the session records another decoder's steps/,
  );
  // "grouped" where a bank cannot group (libtorch < 2.8) would fall back to "loop": graph steps use "dense".
  const grouped = await generate(model.decoder, [[1, 2, 3]], {
    maxNewTokens: 6,
    decodeMode: "graph",
    decodeDispatch: "grouped",
  });
  assert.deepEqual(grouped.tokens, (await generate(model.decoder, [[1, 2, 3]], { maxNewTokens: 6 })).tokens);
  // Refused on every device, so that a CPU run refuses what a GPU could not record.
  await assert.rejects(
    () => generate(model.decoder, [[1, 2]], { maxNewTokens: 4, decodeMode: "graph", dispatch: "loop" }),
    /needs decodeDispatch "dense", "grouped" or "measured"/,
  );
  assert.throws(
    () => rlConfig({ rollout: { decode: "graph", decodeDispatch: "loop" } }),
    /rollout\.decodeDispatch: "loop" reads the routing back/,
  );
});

Deno.test("decode static: collect with rollout.decode draws what eager draws, one session per update", async () => {
  const dir = join(FIXTURES, "qwen3-moe-tiny");
  using model = await loadModel(dir, { dtype: FLOAT, device: DEVICE });
  const tok = await Tokenizer.load(dir);
  const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 4, alpha: 8 } });
  const prompts: RolloutPrompt[] = [
    { ids: await tok.encode("What is 3 + 4?"), answer: "7" },
    { ids: await tok.encode("Tom has 2 apples and buys 5. How many apples?"), answer: "7" },
  ];
  const js = liveTensors(), native = nativeLiveCount();
  const draw = async (decode: "eager" | "static" | "graph") => {
    // generationBatch 3 with k 2: one prompt per generation batch, so the session serves two batches.
    const cfg = { rollout: { k: 2, maxNewTokens: 8, topK: 50, generationBatch: 3, decode } };
    using buf = await collect(policy, tok, prompts, cfg, { seed: 5 });
    return {
      tokens: buf.sequences.map((s) => s.tokens),
      logprobs: buf.sequences.flatMap((s) => s.logprobs),
      routing: buf.routing?.tolist(),
    };
  };
  const eager = await draw("eager");
  for (const decode of ["static", "graph"] as const) {
    const got = await draw(decode);
    if (!EXACT) continue; // see EXACT
    assert.deepEqual(got.tokens, eager.tokens, decode);
    assertClose(got.logprobs, eager.logprobs, LP_TOL, decode);
    assert.deepEqual(got.routing, eager.routing, `${decode}: routing record`);
  }
  assert.equal(liveTensors(), js, "collect leaves no tensor behind");
  assert.equal(nativeLiveCount(), native);
  policy.dispose();
});

Deno.test("decode static: a step that fails in its warm-up leaves no half-made graph behind", async () => {
  using model = await loadModel(join(FIXTURES, "qwen3-moe-tiny"), { dtype: FLOAT, device: DEVICE });
  const decoder = model.decoder;
  const want = await generate(decoder, [[1, 2, 3]], { maxNewTokens: 5 });
  using session = new DecodeSession(decoder, { graphs: true });
  const forward = decoder.forward;
  // The first decode step (the only pass on the static cache) fails, as an out-of-memory would.
  decoder.forward = (input) => {
    if (input.cache instanceof StaticKVView) throw new Error("out of memory in the warm-up");
    return forward.call(decoder, input);
  };
  try {
    await assert.rejects(
      () => generate(decoder, [[1, 2, 3]], { maxNewTokens: 5, decodeMode: "graph", session }),
      /out of memory in the warm-up/,
    );
  } finally {
    decoder.forward = forward;
  }
  assert.equal(session.stats.warmups, 0);
  // The window is warmed up again before it is captured (a kept graph would have been captured unwarmed).
  const again = await generate(decoder, [[1, 2, 3]], { maxNewTokens: 5, decodeMode: "graph", session });
  assert.deepEqual(again.tokens, want.tokens);
  assert.deepEqual([session.stats.warmups, session.stats.captures], [1, 1]);
});
