/**
 * The chunked LM head (ffi/fused.ts tokenStats, used by Policy with
 * headChunk > 0): log-probs, entropies and their gradients (w.r.t. the
 * states, the head weight and bias) equal the plain computation over full
 * logits in float32, for any chunk size and temperature; the policy's
 * outputs and LoRA gradients do not depend on headChunk; autograd holds no
 * [tokens, vocab] tensor (CPU resident memory), where a plain per-chunk loop
 * still does; bad settings fail clearly; nothing leaks.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  cat,
  dispose,
  linear,
  liveTensors,
  manualSeed,
  noGrad,
  randn,
  type Tensor,
  tensor,
  tidy,
  tokenLogprobs,
  tokenStats,
  TorchError,
} from "../ffi/mod.ts";
import { DEFAULT_LORA } from "../model/lora_apply.ts";
import { loadModel } from "../model/model.ts";
import { sequenceBatch } from "../rl/rollout_buffer.ts";
import { DEFAULT_HEAD_CHUNK, Policy, type PolicyOutput, type SequenceBatch } from "../rl/policy.ts";
import { assertClose, assertNoLeak, DEVICE } from "./util.ts";

const f32 = { dtype: "float32" as const, device: DEVICE };
const arr = (t: Tensor): number[] => tidy(() => t.to("float32").toArray());
const gradOf = (p: Tensor): number[] => tidy(() => arr(p.grad!));

/** The plain computation over full logits (rl/policy.ts's unchunked path). */
function plainStats(x: Tensor, w: Tensor, b: Tensor | null, targets: Tensor, temperature: number): Tensor[] {
  return tidy(() => {
    const logits = linear(x, w, b).to("float32");
    const z = temperature === 1 ? logits : logits.div(temperature);
    const logp = z.sub(z.logsumexp(-1, true));
    return [logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp.exp().mul(logp).sum(-1).neg()];
  });
}

Deno.test("lm head: chunked log-probs, entropy and gradients equal the full-logits computation (float32)", () => {
  manualSeed(21);
  assertNoLeak(() => {
    const n = 13, h = 24, v = 50;
    using x0 = tidy(() => randn([n, h], f32));
    using w0 = tidy(() => randn([v, h], f32).mul(0.3));
    using b0 = tidy(() => randn([v], f32));
    using targets = tensor(Array.from({ length: n }, (_, i) => (i * 7) % v), {
      dtype: "int64",
      device: DEVICE,
    });
    using gLp = tidy(() => randn([n], f32)), gEnt = tidy(() => randn([n], f32));
    for (const temperature of [1, 0.7]) {
      for (const bias of [true, false]) {
        // Every value and gradient of one run: [logprobs, entropy, ∂x, ∂w, ∂b].
        const run = (stats: (x: Tensor, w: Tensor, b: Tensor | null) => Tensor[]): number[][] =>
          tidy(() => {
            const x = x0.detach().setRequiresGrad(), w = w0.detach().setRequiresGrad();
            const b = bias ? b0.detach().setRequiresGrad() : null;
            const [lp, ent] = stats(x, w, b) as [Tensor, Tensor];
            lp.mul(gLp).sum().add(ent.mul(gEnt).sum()).backward();
            return [arr(lp), arr(ent), arr(x.grad!), arr(w.grad!), b ? arr(b.grad!) : []];
          });
        const want = run((x, w, b) => plainStats(x, w, b, targets, temperature));
        for (const chunk of [1, 4, n, n + 5]) {
          const got = run((x, w, b) => {
            const s = tokenStats(x, w, b, targets, temperature, chunk);
            return [s.logprobs, s.entropy];
          });
          const what = `T=${temperature} bias=${bias} chunk=${chunk}`;
          ["logprobs", "entropy", "∂x", "∂w", "∂b"].forEach((name, i) =>
            assertClose(got[i]!, want[i]!, 1e-5, `${what} ${name}`)
          );
        }
      }
    }
    // Only one output in the loss (the other's gradient is absent), and no tokens at all.
    tidy(() => {
      const x = x0.detach().setRequiresGrad();
      tokenStats(x, w0, null, targets, 1, 5).entropy.sum().backward();
      const ref = x0.detach().setRequiresGrad();
      plainStats(ref, w0, null, targets, 1)[1]!.sum().backward();
      assertClose(arr(x.grad!), arr(ref.grad!), 1e-5, "entropy only");
      const none = tokenStats(x0.narrow(0, 0, 0), w0, b0, targets.narrow(0, 0, 0), 1, 4);
      assert.deepEqual([none.logprobs.shape, none.entropy.shape], [[0], [0]]);
    });
  });
});

Deno.test("lm head: tokenLogprobs gives tokenStats' log-probs bit for bit, and their gradient alone", () => {
  manualSeed(23);
  assertNoLeak(() => {
    const n = 11, h = 16, v = 40;
    using x0 = tidy(() => randn([n, h], f32));
    using w0 = tidy(() => randn([v, h], f32).mul(0.3));
    using b0 = tidy(() => randn([v], f32));
    using targets = tensor(Array.from({ length: n }, (_, i) => (i * 5) % v), {
      dtype: "int64",
      device: DEVICE,
    });
    using gLp = tidy(() => randn([n], f32));
    for (const [temperature, chunk] of [[1, 4], [0.6, 3], [1, n + 2]] as const) {
      // [logprobs, ∂x, ∂w, ∂b] with the loss Σ gLp · logprobs.
      const run = (lp: (x: Tensor, w: Tensor, b: Tensor) => Tensor): number[][] =>
        tidy(() => {
          const x = x0.detach().setRequiresGrad(), w = w0.detach().setRequiresGrad();
          const b = b0.detach().setRequiresGrad();
          const out = lp(x, w, b);
          out.mul(gLp).sum().backward();
          return [arr(out), arr(x.grad!), arr(w.grad!), arr(b.grad!)];
        });
      const stats = run((x, w, b) => tokenStats(x, w, b, targets, temperature, chunk).logprobs);
      const alone = run((x, w, b) => tokenLogprobs(x, w, b, targets, temperature, chunk));
      const plain = run((x, w, b) => plainStats(x, w, b, targets, temperature)[0]!);
      assert.deepEqual(alone[0], stats[0], `T=${temperature} chunk=${chunk}: the same log-probs`);
      ["logprobs", "∂x", "∂w", "∂b"].forEach((name, i) => {
        assertClose(alone[i]!, stats[i]!, 1e-6, `T=${temperature} chunk=${chunk} ${name} against tokenStats`);
        assertClose(
          alone[i]!,
          plain[i]!,
          1e-5,
          `T=${temperature} chunk=${chunk} ${name} against full logits`,
        );
      });
    }
    assert.throws(
      () => tokenLogprobs(x0, w0, null, targets, 1, 0),
      /tokenLogprobs: chunk must be a whole number of tokens ≥ 1, got 0/,
    );
    assert.throws(
      () => tidy(() => tokenLogprobs(x0, w0.narrow(1, 0, 8), null, targets, 1, 2)),
      /does not fit states/,
    );
  });
});

/** Prompts with completions, left-padded (as tests/policy_test.ts). */
function batch(): SequenceBatch {
  const prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]];
  const completions = [[20, 21, 22], [23, 24, 25, 26], [27]];
  return sequenceBatch(prompts, completions, 0, DEVICE);
}

Deno.test("lm head: Policy outputs and LoRA gradients do not depend on headChunk", async () => {
  const live = liveTensors();
  using model = await loadModel(join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny"), f32);
  const b = batch();
  try {
    const loss = (out: PolicyOutput): Tensor =>
      out.logprobs.mul(out.mask).sum().neg().add(out.entropy.mul(out.mask).sum().mul(0.1));
    const runs = [0, 1, 2, DEFAULT_HEAD_CHUNK].map((headChunk) => {
      manualSeed(22); // the same adapters each time, moved off zero so every one gets a gradient
      const policy = new Policy(model, { lora: { ...DEFAULT_LORA, r: 2, alpha: 4 }, headChunk });
      try {
        noGrad(() =>
          tidy(() => policy.policyParameters().forEach((p) => p.copy_(randn(p.shape, f32).mul(0.05))))
        );
        const out = tidy(() => {
          const o = noGrad(() => policy.forward(b, { temperature: 0.8 }));
          return [arr(o.logprobs), arr(o.entropy), arr(policy.reference(b).logprobs!)];
        });
        // The log-probs-only pass (old policy) computes them as the full pass does, bit for bit.
        assert.deepEqual(
          tidy(() => arr(policy.logprobs(b, { temperature: 0.8 }))),
          out[0],
          `headChunk ${headChunk}`,
        );
        const value = policy.backward(b, loss, { temperature: 0.8 });
        const grads = policy.policyParameters().map(gradOf);
        policy.checkpointing = true;
        policy.policyParameters().forEach((p) => p.clearGrad());
        policy.backward(b, loss, { temperature: 0.8 });
        const ckpt = policy.policyParameters().map(gradOf);
        return { headChunk, out, value, grads, ckpt };
      } finally {
        policy.dispose();
      }
    });
    const plain = runs[0]!;
    assert.ok(plain.grads.every((g) => g.some((v) => v !== 0)), "every adapter gets a gradient");
    for (const r of runs.slice(1)) {
      const what = `headChunk ${r.headChunk}`;
      r.out.forEach((o, i) => assertClose(o, plain.out[i]!, 1e-5, `${what} output ${i}`));
      assert.ok(Math.abs(r.value - plain.value) < 1e-5, `${what} loss ${r.value} vs ${plain.value}`);
      r.grads.forEach((g, i) => assertClose(g, plain.grads[i]!, 1e-5, `${what} param ${i}`));
      r.ckpt.forEach((g, i) => assertClose(g, plain.grads[i]!, 1e-4, `${what} checkpointed param ${i}`));
    }
  } finally {
    dispose(b);
  }
  model.dispose();
  assert.equal(liveTensors(), live, "policies, model and batch freed");
});

Deno.test({
  name:
    "lm head: autograd keeps no [tokens, vocab] tensor; a plain per-chunk loop does (CPU resident memory)",
  ignore: DEVICE !== "cpu",
  fn(): void {
    manualSeed(23);
    // [1024, 16384] float32 logits are 64 MiB, above glibc's largest mmap threshold: resident while alive.
    const n = 1024, v = 16384;
    using x0 = randn([n, 64]);
    using w = tidy(() => randn([v, 64]).mul(0.1));
    using targets = tensor(Array.from({ length: n }, (_, i) => (i * 31) % v), { dtype: "int64" });
    const held = (stats: (x: Tensor) => Tensor[]): number =>
      tidy(() => {
        const x = x0.detach().setRequiresGrad();
        const before = Deno.memoryUsage().rss;
        const [lp, ent] = stats(x) as [Tensor, Tensor];
        const during = Deno.memoryUsage().rss - before;
        lp.sum().add(ent.sum()).backward();
        return during;
      });
    const fused = (x: Tensor): Tensor[] => {
      const s = tokenStats(x, w, null, targets, 1, 128);
      return [s.logprobs, s.entropy];
    };
    const loop = (x: Tensor): Tensor[] => {
      const parts = Array.from(
        { length: n / 128 },
        (_, i) => plainStats(x.narrow(0, 128 * i, 128), w, null, targets.narrow(0, 128 * i, 128), 1),
      );
      return [cat(parts.map((p) => p[0]!)), cat(parts.map((p) => p[1]!))];
    };
    held(fused); // warm-up
    const plain = held((x) => plainStats(x, w, null, targets, 1)),
      chunkLoop = held(loop),
      chunked = held(fused);
    const mib = (b: number): string => `${(b / 2 ** 20).toFixed(1)} MiB`;
    console.log(
      `  held until backward: full logits ${mib(plain)}, per-chunk loop ${mib(chunkLoop)}, fused ${
        mib(chunked)
      }`,
    );
    assert.ok(plain > 2 * 64 * 2 ** 20, `the plain path held only ${mib(plain)}`);
    assert.ok(
      chunkLoop > 0.5 * plain,
      `a plain per-chunk loop held ${mib(chunkLoop)}: its graph keeps every chunk`,
    );
    assert.ok(chunked < 0.1 * plain, `the fused op held ${mib(chunked)}`);
  },
});

Deno.test("lm head: bad settings and shapes fail clearly", async () => {
  using model = await loadModel(join(import.meta.dirname!, "fixtures", "models", "qwen3-moe-tiny"), f32);
  for (const headChunk of [-1, 2.5, Number.NaN, "64" as unknown as number]) {
    assert.throws(
      () => new Policy(model, { lora: DEFAULT_LORA, headChunk }),
      /headChunk must be a whole number of tokens ≥ 1, or 0 for the unchunked head; got/,
    );
  }
  assertNoLeak(() => {
    using x = randn([4, 8], f32), w = randn([10, 8], f32);
    using t = tensor([1, 2, 3, 4], { dtype: "int64", device: DEVICE });
    assert.throws(() => tokenStats(x, w, null, t, 1, 0), /chunk must be a whole number of tokens ≥ 1, got 0/);
    // Past 2^53 the int64 argument would be built from an inexact number (1e300 wrapped to 0 at the FFI).
    assert.throws(
      () => tokenStats(x, w, null, t, 1, 1e300),
      /tokenStats: expected an integer within ±2\^53, got 1e\+300/,
    );
    using wBad = randn([10, 6], f32);
    assert.throws(() => tokenStats(x, wBad, null, t, 1, 2), (e: unknown) => {
      assert.ok(e instanceof TorchError);
      assert.match(
        e.message,
        /^token_stats\(\[4, 8\], \[10, 6\], \[4\]\): .*head weight \[10, 6\] does not fit states \[4, 8\]/,
      );
      return true;
    });
    using t3 = tensor([1, 2, 3], { dtype: "int64", device: DEVICE });
    assert.throws(() => tokenStats(x, w, null, t3, 1, 2), /targets must be int64 \[4\]/);
    assert.throws(() => tokenStats(x, w, null, t, 0, 2), /temperature must be > 0/);
  });
});
