/**
 * The RL losses and advantages on small hand-computed tensors: masking of
 * prompt and padding tokens (even when they hold NaN or huge values), PPO
 * clipping on both sides for positive and negative advantages, asymmetric
 * clipping, GSPO's sequence ratio, rollout-correction weights, minibatch
 * token means, k1/k2/k3 values, clamps and gradients, the ratio-1 policy
 * gradient, the token-level value loss, the group baseline, token advantages
 * (GAE), normalisation over an update, and no leaked tensors; and the whole
 * objective against TRL's GRPOTrainer loss (tests/fixtures/trl/, recorded by
 * scripts/make_trl_loss_fixture.py).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { randn, type Tensor, tensor, tidy } from "../ffi/mod.ts";
import { loadBalancingLoss } from "../model/moe.ts";
import {
  batchScaledAdvantages,
  flatGroups,
  groupBaseline,
  groupScaledAdvantages,
  tokenAdvantages,
  updateAdvantages,
  zeroSpreadFraction,
} from "../rl/advantages.ts";
import {
  entropyBonus,
  klPenalty,
  lossWeights,
  maskedMean,
  ppoClippedLoss,
  routerAuxLoss,
  valueLoss,
  weightedSum,
} from "../rl/losses.ts";
import { DEFAULT_RL_CONFIG } from "../rl/config.ts";
import { OBJECTIVE_PARTS, ppoObjective, rolloutWeights } from "../rl/objective.ts";
import { assertClose, assertNoLeak, DEVICE } from "./util.ts";

const f32 = { dtype: "float32" as const, device: DEVICE };
const t = (x: number[] | number[][]): Tensor => tensor(x, f32);
const leaf = (x: number[] | number[][]): Tensor => t(x).setRequiresGrad(true);
/** The gradient of a leaf as a flat array (freed). */
const gradOf = (x: Tensor): number[] => tidy(() => x.grad!.toArray());

Deno.test("losses: masked token mean", () => {
  assertNoLeak(() =>
    tidy(() => {
      const x = t([[1, 2, NaN], [Infinity, 5, 6]]);
      const mask = t([[1, 1, 0], [0, 1, 1]]);
      assertClose([maskedMean(x, mask).item()], [3.5]); // (1 + 2 + 5 + 6) / 4
      assertClose([maskedMean(x, t([[0, 0, 0], [0, 0, 0]])).item()], [0], 0, "no valid token");
    })
  );
});

Deno.test("losses: the loss aggregations by hand (token mean, GRPO's sequence mean, Dr. GRPO's divisor)", () => {
  assertNoLeak(() =>
    tidy(() => {
      // Two completions of 1 and 3 tokens (column 0 is prompt); NaN and ∞ off the mask do not leak in.
      const x = t([[NaN, 4, 0, 0], [Infinity, 1, 2, 3]]);
      const mask = t([[0, 1, 0, 0], [0, 1, 1, 1]]);
      const sum = (agg: Parameters<typeof lossWeights>[1], counts = {}): number =>
        weightedSum(x, lossWeights(mask, agg, counts)).item();
      assertClose([sum("token_mean")], [(4 + 1 + 2 + 3) / 4], 1e-6, "Σ x / n");
      assertClose([sum("token_mean", { tokens: 8 })], [10 / 8], 1e-6, "the minibatch's n");
      assertClose(
        [sum("seq_mean_token_mean")],
        [(4 / 1 + 6 / 3) / 2],
        1e-6,
        "mean over sequences of their means",
      );
      assertClose([sum("seq_mean_token_mean", { sequences: 4 })], [(4 + 2) / 4], 1e-6, "the minibatch's S");
      assertClose([sum("seq_mean_token_sum_norm", { maxTokens: 5 })], [10 / (2 * 5)], 1e-6, "Σ x / (S·L)");
      assert.throws(
        () => lossWeights(mask, "seq_mean_token_sum_norm"),
        /divides by the token cap: give maxTokens/,
      );
      assert.throws(() => lossWeights(mask, "token_mean", { tokens: 0 }), /tokens must be > 0, got 0/);
      assert.throws(
        () => lossWeights(mask, "grpo" as "token_mean"),
        /aggregation must be one of token_mean, seq_mean_token_mean, seq_mean_token_sum_norm, got "grpo"/,
      );
    })
  );
});

Deno.test("losses: PPO clipped loss by hand, all four clip cases, prompt and padding masked", () => {
  const clip = 0.2;
  // Row 0 A = +1: r 1.5 (clipped high), r 0.5 (below 1 − ε but A > 0: not clipped).
  // Row 1 A = −2: r 0.5 (clipped low); its last token is padding (NaN).
  // Row 2 A = −1: r 1.5 (above 1 + ε but A < 0: not clipped), r 1.
  // Column 0 is prompt; row 0 holds a huge log-ratio there.
  const r = [[1, 1.5, 0.5], [1, 0.5, 1], [1, 1.5, 1]];
  const old = [[0, -1, -2], [0, -0.5, -1], [0, -3, -0.25]];
  const logp = old.map((row, i) => row.map((o, j) => o + Math.log(r[i]![j]!)));
  logp[0]![0] = 50;
  logp[1]![2] = NaN;
  const mask = [[0, 1, 1], [0, 1, 0], [0, 1, 1]];
  const adv = [1, -2, -1];
  const expectTok = [-Math.min(1.5, 1.2), -Math.min(0.5, 0.8), -Math.min(-1, -1.6), -Math.min(-1.5, -1.2), 1];
  const valid = [[0, 1], [0, 2], [1, 1], [2, 1], [2, 2]] as const;
  const k3 = (x: number): number => x - 1 - Math.log(x);
  assertNoLeak(() =>
    tidy(() => {
      const lp = leaf(logp);
      const out = ppoClippedLoss(lp, t(old), t(adv), t(mask), { clip });
      assertClose([out.loss.item()], [expectTok.reduce((a, b) => a + b) / 5], 1e-5, "loss = 2.4 / 5");
      assertClose([out.clipFraction.item()], [2 / 5], 1e-6, "clip fraction");
      assertClose([out.ratioMean.item()], [(1.5 + 0.5 + 0.5 + 1.5 + 1) / 5], 1e-5, "ratio mean");
      const kl = valid.reduce((s, [i, j]) => s + k3(r[i]![j]!), 0) / 5;
      assertClose([out.approxKl.item()], [kl], 1e-5, "approx KL");
      assert.ok(!out.clipFraction.requiresGrad && !out.approxKl.requiresGrad, "metrics carry no graph");
      out.loss.backward();
      // d/dlogp: −A·r/5 where the unclipped term is the minimum, 0 where the clip is active or masked.
      assertClose(gradOf(lp), [0, 0, -0.5 / 5, 0, 0, 0, 0, 1.5 / 5, 1 / 5], 1e-5, "gradient");
    })
  );
});

Deno.test("losses: the dual clip bounds negative-advantage tokens at −c·A, as verl's clip_ratio_c", () => {
  assertNoLeak(() =>
    tidy(() => {
      // Ratios 5, 3.5, 1, 0.5 with A = −1, ε 0.2, c 3: per token min(max(r, clip(r)), 3) = 3, 3, 1, 0.8.
      const old = t([[0, 0, 0, 0]]), mask = t([[1, 1, 1, 1]]);
      const lp = leaf([[Math.log(5), Math.log(3.5), 0, Math.log(0.5)]]);
      const out = ppoClippedLoss(lp, old, t([-1]), mask, { clip: 0.2, clipRatioC: 3 });
      assertClose([out.loss.item(), out.dualClipFraction!.item()], [1.95, 0.5], 1e-6);
      out.loss.backward();
      assertClose(gradOf(lp), [0, 0, 0.25, 0], 1e-6, "no gradient where a clip binds");
      // Off: the plain PPO loss (5 + 3.5 + 1 + 0.8) / 4, and positive advantages are never bounded.
      const plain = ppoClippedLoss(lp.detach(), old, t([-1]), mask, { clip: 0.2 });
      assertClose([plain.loss.item()], [2.575], 1e-6);
      assert.equal(plain.dualClipFraction, null);
      const pos = ppoClippedLoss(lp.detach(), old, t([1]), mask, { clip: 0.2, clipRatioC: 3 });
      assertClose([pos.loss.item(), pos.dualClipFraction!.item()], [-(1.2 + 1.2 + 1 + 0.5) / 4, 0], 1e-6);
      assert.throws(() => ppoClippedLoss(lp, old, t([1]), mask, { clipRatioC: 1 }), /clipRatioC must be > 1/);
      // A token the policy moved e^99.9-fold: the log-ratio is clamped at 20 (verl), so no inf·0 = NaN gradient.
      const far = leaf([[-0.1, 0, 0, 0]]);
      const huge = ppoClippedLoss(far, t([[-100, 0, 0, 0]]), t([-1]), mask, { clip: 0.2, clipRatioC: 3 });
      assertClose([huge.loss.item()], [(3 + 1 + 1 + 1) / 4], 1e-6);
      huge.loss.backward();
      assertClose(gradOf(far), [0, 0.25, 0.25, 0.25], 1e-6, "finite, and zero where the dual clip binds");
    })
  );
});

Deno.test("losses: per-token advantages [B, T] and shape checks", () => {
  assertNoLeak(() =>
    tidy(() => {
      const lp = t([[0, -1], [0, -2]]);
      const mask = t([[0, 1], [1, 1]]);
      const perSeq = ppoClippedLoss(lp, lp, t([2, -4]), mask).loss.item(); // (−2 + 4 + 4) / 3
      const perTok = ppoClippedLoss(lp, lp, t([[5, 3], [-1, -4]]), mask).loss.item(); // (−3 + 1 + 4) / 3
      assertClose([perSeq, perTok], [2, 2 / 3], 1e-6);
      assert.throws(() => ppoClippedLoss(lp, lp, t([1, 2, 3]), t([[1, 1], [1, 1]])), /advantages must be/);
      assert.throws(() => ppoClippedLoss(lp, t([[0, 0, 0]]), t([1, 2]), lp), /shapes differ/);
    })
  );
});

Deno.test("losses: asymmetric clip, GSPO sequence ratio, rollout weights and a minibatch's token count", () => {
  assertNoLeak(() =>
    tidy(() => {
      const old = t([[0, 0, 0]]), mask = t([[0, 1, 1]]);
      // r = 1.25 on both tokens, A = +1: clipped at 1.2 with ε_high = ε, not with ε_high = 0.3.
      const lp = leaf([[0, Math.log(1.25), Math.log(1.25)]]);
      const sym = ppoClippedLoss(lp, old, t([1]), mask, { clip: 0.2 });
      assertClose([sym.loss.item(), sym.clipFraction.item()], [-1.2, 1], 1e-6);
      const asym = ppoClippedLoss(lp, old, t([1]), mask, { clip: 0.2, clipHigh: 0.3 });
      assertClose([asym.loss.item(), asym.clipFraction.item()], [-1.25, 0], 1e-6);
      // r = 0.7, A = −1: clipped low at 0.8 either way; clipLowFraction counts it.
      const down = ppoClippedLoss(leaf([[0, Math.log(0.7), Math.log(0.7)]]), old, t([-1]), mask, {
        clip: 0.2,
        clipHigh: 0.3,
      });
      assertClose([down.loss.item(), down.clipLowFraction.item()], [0.8, 1], 1e-6);

      // GSPO: one ratio per sequence, exp(mean log-ratio) = exp((log 2 + 0)/2) = √2 on every token.
      const seqLp = leaf([[0, Math.log(2), 0]]);
      const seq = ppoClippedLoss(seqLp, old, t([1]), mask, { clip: 10, ratioLevel: "sequence" });
      assertClose([seq.ratioMean.item(), seq.loss.item()], [Math.SQRT2, -Math.SQRT2], 1e-6);
      seq.loss.backward();
      assertClose(
        gradOf(seqLp),
        [0, -Math.SQRT2 / 2, -Math.SQRT2 / 2],
        1e-6,
        "s·∇logp_t per token, token mean",
      );
      assert.throws(
        () => ppoClippedLoss(lp, old, t([1]), mask, { ratioLevel: "x" as "token" }),
        /ratioLevel/,
      );

      // Weights multiply each token's loss; `tokens` replaces the batch's token count.
      const w = ppoClippedLoss(lp.detach(), lp.detach(), t([1]), mask, {
        weights: t([[0, 2, 0.5]]),
        tokens: 5,
      });
      assertClose([w.loss.item()], [-(2 + 0.5) / 5], 1e-6);
    })
  );
});

Deno.test("losses: the rollout correction's weight is min(π_old / π_rollout, C), 0 off the mask", () => {
  assertNoLeak(() =>
    tidy(() => {
      const old = t([[0, -1, -1, -2]]), rollout = t([[9, -2, -0.5, -2]]), mask = t([[0, 1, 1, 1]]);
      assertClose(rolloutWeights(old, rollout, mask, 2).toArray(), [0, 2, Math.exp(-0.5), 1], 1e-6);
    })
  );
});

Deno.test("objective: the loss and its parts by hand (weights, KL, entropy bonus, router loss share)", () => {
  assertNoLeak(() =>
    tidy(() => {
      // Two sequences, 3 of the minibatch's 6 trained tokens; old = logp (ratio 1).
      const logprobs = leaf([[0, -1, -2], [0, -0.5, -1]]), entropy = leaf([[9, 1, 2], [9, 3, 9]]);
      const mask = t([[0, 1, 1], [0, 1, 0]]), n = 6;
      const routerLogits = [randn([6, 4], f32)];
      const attentionMask = tensor([[1, 1, 1], [1, 1, 1]], { dtype: "int64", device: DEVICE });
      const cfg = {
        ...DEFAULT_RL_CONFIG.ppo,
        klCoef: 0.1,
        entropyCoef: 0.01,
        rolloutCorrection: 2,
        routerAuxCoef: 0.02,
      };
      const r = ppoObjective({ logprobs, entropy, mask, routerLogits }, {
        advantages: t([[0, 2, 2], [0, -1, -1]]),
        refLogprobs: t([[0, -1.5, -1], [0, -0.5, -1]]), // δ = ref − logp: −0.5, 1; 0
        rolloutLogprobs: t([[5, -2, -1.5], [5, -0.5, 7]]), // old − rollout: 1 → w = min(e, 2) = 2; −0.5; 0
        tokens: n,
        attentionMask,
        routerTopK: 2,
      }, cfg);
      const w = [2, Math.exp(-0.5), 1], a = [2, 2, -1], d = [-0.5, 1, 0];
      const policy = -(w[0]! * a[0]! + w[1]! * a[1]! + w[2]! * a[2]!) / n;
      const kl = d.reduce((s, x) => s + Math.exp(x) - x - 1, 0) / n;
      const ent = (1 + 2 + 3) / n;
      // The router loss is a mean over the forward: weighted by this batch's share (3 of 6) of the tokens.
      const aux = loadBalancingLoss(routerLogits, 2, attentionMask).item() * 3 / n;
      assertClose([r.loss.item()], [policy + 0.1 * kl - 0.01 * ent + 0.02 * aux], 1e-6, "loss");
      const parts = Object.fromEntries(OBJECTIVE_PARTS.map((p, i) => [p, r.parts.toArray()[i]!]));
      assertClose(
        [
          parts.policy_loss!,
          parts.kl!,
          parts.kl_k1!,
          parts.entropy!,
          parts.router_aux_loss!,
          parts.is_weight_mean!,
        ],
        [policy, kl, -d.reduce((s, x) => s + x, 0) / n, ent, aux, (w[0]! + w[1]! + w[2]!) / n],
        1e-6,
        "parts",
      );
      r.loss.backward();
      // The entropy is a bonus: raising it lowers the loss.
      assertClose(gradOf(entropy), [0, 1, 1, 0, 1, 0].map((m) => -0.01 * m / n), 1e-6, "entropy gradient");
      const g = [0, 1, 2].map((i) => (-w[i]! * a[i]! + 0.1 * (1 - Math.exp(d[i]!))) / n);
      assertClose(
        gradOf(logprobs),
        [0, g[0]!, g[1]!, 0, g[2]!, 0],
        1e-6,
        "−w·A/n, plus 0.1·(1 − e^δ)/n from k3",
      );
    })
  );
});

Deno.test("losses: with old = logp.detach() the ratio is 1 and the gradient is the vanilla policy gradient", () => {
  assertNoLeak(() =>
    tidy(() => {
      const lp = randn([3, 5], f32).sub(2).setRequiresGrad(true);
      const adv = t([0.7, -1.3, 0.2]);
      const mask = t([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0]]);
      const out = ppoClippedLoss(lp, lp.detach(), adv, mask, { clip: 0.2 });
      assertClose([out.ratioMean.item(), out.clipFraction.item(), out.approxKl.item()], [1, 0, 0], 1e-6);
      out.loss.backward();
      const g = gradOf(lp);
      const a = adv.toArray(), m = mask.toArray(), n = m.reduce((x, y) => x + y);
      assertClose(g, m.map((mi, i) => -a[Math.floor(i / 5)]! * mi / n), 1e-6, "−A·mask/n");
      // the same as differentiating −maskedMean(A·logp)
      const vanilla = lp.detach().setRequiresGrad(true);
      maskedMean(vanilla.mul(adv.unsqueeze(1)), mask).neg().backward();
      assertClose(g, gradOf(vanilla), 1e-6);
    })
  );
});

Deno.test("losses: KL k1, k2 and k3 values, masking, clamps and gradients", () => {
  // δ = ref − logp = [·, −0.5, 1]; column 0 is masked (ref −inf there).
  const logp = [[0, -1, -2]], ref = [[-Infinity, -1.5, -1]], mask = [[0, 1, 1]];
  const d = [-0.5, 1];
  assertNoLeak(() =>
    tidy(() => {
      const lp1 = leaf(logp);
      const k1 = klPenalty(lp1, t(ref), t(mask), "k1");
      assertClose(k1.perToken.toArray(), [0, 0.5, -1], 1e-6, "k1 per token");
      assertClose([k1.mean.item()], [-0.25], 1e-6);
      k1.mean.backward();
      assertClose(gradOf(lp1), [0, 0.5, 0.5], 1e-6, "k1 gradient: 1/n whatever δ (zero in expectation)");

      const lp2 = leaf(logp);
      const k2 = klPenalty(lp2, t(ref), t(mask), "k2");
      assertClose(k2.perToken.toArray(), [0, ...d.map((x) => x * x / 2)], 1e-6, "k2 per token: ½δ²");
      k2.mean.backward();
      assertClose(gradOf(lp2), [0, ...d.map((x) => -x / 2)], 1e-6, "k2 gradient: −δ/n");

      const lp3 = leaf(logp);
      const k3 = klPenalty(lp3, t(ref), t(mask), "k3");
      const want = d.map((x) => Math.exp(x) - x - 1);
      assertClose(k3.perToken.toArray(), [0, ...want], 1e-6, "k3 per token");
      assertClose([k3.mean.item()], [(want[0]! + want[1]!) / 2], 1e-6);
      k3.mean.backward();
      assertClose(gradOf(lp3), [0, ...d.map((x) => (1 - Math.exp(x)) / 2)], 1e-6, "k3 gradient: (1 − r)/n");

      // A token the reference finds far likelier (δ = 30) is clamped to 10 instead of e^30.
      const far = klPenalty(t([[-40]]), t([[-10]]), t([[1]]), "k3");
      assertClose([far.mean.item()], [10], 1e-6, "k3 clamped at 10");

      const a = randn([4, 6], f32), b = randn([4, 6], f32);
      const ones = t(Array.from({ length: 4 }, () => Array(6).fill(1)));
      assert.ok(klPenalty(a, b, ones, "k3").perToken.amin().item() >= 0, "k3 ≥ 0");
      assert.equal(klPenalty(a, a, ones, "k3").mean.item(), 0);
      assert.throws(() => klPenalty(a, b, ones, "k4" as "k1"), /estimator/);
    })
  );
});

/** tests/fixtures/trl/grpo_loss.json (scripts/make_trl_loss_fixture.py). */
interface TrlFixture {
  trl: string;
  clip: number;
  clipHigh: number;
  klCoef: number;
  rolloutCorrection: number;
  maxCompletion: number;
  mask: number[][];
  logprobs: number[][];
  old: number[][];
  ref: number[][];
  rollout: number[][];
  entropy: number[][];
  advantages: number[];
  cases: {
    lossType: "dapo" | "grpo" | "dr_grpo";
    level: "token" | "sequence";
    splits: number[][];
    ranks: boolean;
    correction: boolean;
    entropyCoef: number;
    loss: number;
    gradLogprobs: number[][];
    gradEntropy: number[][];
  }[];
}

/** TRL's loss_type as ppo.lossAggregation. */
const AGGREGATION_OF = {
  dapo: "token_mean",
  grpo: "seq_mean_token_mean",
  dr_grpo: "seq_mean_token_sum_norm",
} as const;

Deno.test("losses: the objective gives TRL's GRPO loss and gradients (dapo, grpo, dr_grpo), over micro-batches and ranks", () => {
  const fx: TrlFixture = JSON.parse(
    Deno.readTextFileSync(join(import.meta.dirname!, "fixtures", "trl", "grpo_loss.json")),
  );
  const tokens = fx.mask.flat().reduce((a, b) => a + b, 0);
  const rowsOf = (x: number[][], rows: number[]): Tensor => t(rows.map((r) => x[r]!));
  assertNoLeak(() => {
    for (const c of fx.cases) {
      const what = `${c.lossType}, ${c.level} ${JSON.stringify(c.splits)}${
        c.ranks ? " over ranks" : ""
      } (TRL ${fx.trl})`;
      // A micro-batch or a rank each: the loss is summed and the gradients add up, each part dividing by
      // the tokens of all of them, as learn runs them (ranks sum their gradients; DDP averages TRL's).
      let loss = 0;
      const gradLogprobs = fx.mask.map((r) => r.map(() => 0)),
        gradEntropy = fx.mask.map((r) => r.map(() => 0));
      for (const rows of c.splits) {
        tidy(() => {
          const logprobs = rowsOf(fx.logprobs, rows).setRequiresGrad(true);
          const entropy = rowsOf(fx.entropy, rows).setRequiresGrad(true);
          const mask = rowsOf(fx.mask, rows);
          const r = ppoObjective({ logprobs, entropy, mask }, {
            advantages: t(rows.map((i) => fx.mask[i]!.map(() => fx.advantages[i]!))),
            oldLogprobs: rowsOf(fx.old, rows),
            refLogprobs: rowsOf(fx.ref, rows),
            rolloutLogprobs: rowsOf(fx.rollout, rows),
            tokens,
            sequences: fx.mask.length,
            maxTokens: fx.maxCompletion,
          }, {
            ...DEFAULT_RL_CONFIG.ppo,
            clip: fx.clip,
            clipHigh: fx.clipHigh,
            klCoef: fx.klCoef,
            klEstimator: "k3",
            entropyCoef: c.entropyCoef,
            rolloutCorrection: c.correction ? fx.rolloutCorrection : null,
            ratioLevel: c.level,
            lossAggregation: AGGREGATION_OF[c.lossType],
          });
          // The logged kl is a token mean under every aggregation (only the loss's term follows it).
          const klLogged = (r.parts.toArray() as number[])[OBJECTIVE_PARTS.indexOf("kl")]!;
          const klMean = klPenalty(logprobs, rowsOf(fx.ref, rows), mask, "k3", tokens).mean.item();
          assertClose([klLogged], [klMean], 1e-6, `${what}: logged kl`);
          r.loss.backward();
          loss += r.loss.item();
          const gl = logprobs.grad!.tolist() as number[][], ge = entropy.grad!.tolist() as number[][];
          rows.forEach((row, j) => [gradLogprobs[row], gradEntropy[row]] = [gl[j]!, ge[j]!]);
        });
      }
      assertClose([loss], [c.loss], 1e-6, `${what}: loss`);
      assertClose(gradLogprobs.flat(), c.gradLogprobs.flat(), 1e-6, `${what}: gradient of the log-probs`);
      assertClose(gradEntropy.flat(), c.gradEntropy.flat(), 1e-6, `${what}: gradient of the entropies`);
    }
  });
});

Deno.test("losses: entropy bonus and the token-level value loss", () => {
  assertNoLeak(() =>
    tidy(() => {
      const ent = leaf([[9, 1, 2], [9, 3, 9]]);
      const e = entropyBonus(ent, t([[0, 1, 1], [0, 1, 0]]));
      assertClose([e.item()], [2]); // (1 + 2 + 3) / 3
      e.backward();
      assertClose(gradOf(ent), [0, 1, 1, 0, 1, 0].map((m) => m / 3), 1e-6);

      // Values per token [2, 3], one target per sequence, the mask on completion tokens.
      const v = leaf([[7, 1, -1], [7, 7, 0.5]]), target = leaf([0, 0.5]), m = t([[0, 1, 1], [0, 0, 1]]);
      const l = valueLoss(v, target, m);
      assertClose([l.item()], [0.5 * (1 + 1 + 0) / 3], 1e-6, "½·token-mean((v − target)²)");
      l.backward();
      assertClose(gradOf(v), [0, 1 / 3, -1 / 3, 0, 0, 0], 1e-6, "gradient (v − target)/n on the mask");
      assert.equal(tidy(() => target.grad), null, "targets are constants");
      assert.throws(() => valueLoss(v, t([1, 2, 3]), m), /targets must be/);
    })
  );
});

Deno.test("losses: router aux loss is the model's load-balancing loss", () => {
  assertNoLeak(() =>
    tidy(() => {
      const logits = [randn([6, 4], f32), randn([6, 4], f32)];
      const am = tensor([[1, 1, 1], [0, 1, 1]], { dtype: "int64", device: DEVICE });
      assertClose([routerAuxLoss(logits, 2, am).item()], [loadBalancingLoss(logits, 2, am).item()], 1e-6);
      assert.throws(() => routerAuxLoss([], 2), /no router logits/);
    })
  );
});

Deno.test("advantages: group baseline", () => {
  assert.deepEqual(groupBaseline([1.05, 0, -0.05], 1), [1.05, 0, -0.05], "K = 1: raw rewards");
  assertClose(groupBaseline([1, 0, 0, 1, 1, 1], 3), [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], 1e-12);
  assertClose(groupBaseline([1.05, 0, 0.95, -0.05], 2), [0.525, -0.525, 0.5, -0.5], 1e-12);
  assert.throws(() => groupBaseline([1, 2, 3], 2), /groups of k = 2/);
  assert.throws(() => groupBaseline([1, 2], 0), /k must be/);
  assert.throws(() => groupBaseline([1, NaN], 1), /finite/);
  assert.equal(zeroSpreadFraction([1, 1, 0, 1, 0.5, 0.5], 2), 2 / 3);
  assert.equal(zeroSpreadFraction([1, 0], 1), 1, "K = 1: every group has zero spread");
});

Deno.test("advantages: flat groups, per-token estimates and GAE by hand", () => {
  assert.deepEqual(flatGroups([1, 1, 0, 1, 0.5, 0.5], 2), [true, true, false, false, true, true]);
  assert.deepEqual(flatGroups([1, 1], 1), [false, false], "K = 1: no group is flat");
  assert.deepEqual(tokenAdvantages(0.5, 3, null, "group"), [0.5, 0.5, 0.5]);
  assert.deepEqual(tokenAdvantages(0.5, 3, [0.25, 9, 9], "prompt_value"), [0.25, 0.25, 0.25]);
  const v = [0.1, 0.4, 0.2];
  assertClose(tokenAdvantages(1, 3, v, "token_value"), [0.9, 0.6, 0.8], 1e-12, "λ = 1: target − V(s_t)");
  // λ = 0: δ_t = V(s_t+1) − V(s_t), last δ = target − V.
  assertClose(tokenAdvantages(1, 3, v, "token_value", 0), [0.3, -0.2, 0.8], 1e-12, "λ = 0: TD errors");
  // λ = 0.5: A_2 = 0.8, A_1 = −0.2 + 0.4 = 0.2, A_0 = 0.3 + 0.1 = 0.4.
  assertClose(tokenAdvantages(1, 3, v, "token_value", 0.5), [0.4, 0.2, 0.8], 1e-12, "λ = 0.5");
  assert.throws(() => tokenAdvantages(1, 3, [0, 0], "token_value"), /needs 3 values/);
});

Deno.test("advantages: TRL's GRPO scalings, each group by its own std (its default) or by the update's", () => {
  // Two groups of 3 whose rewards differ only by the marker bonus, and a flat one; lengths 2, 1, 1 | 1, 1, 2 | 1.
  const rewards = [1.05, 1.05, 1, 0, 0, 0.05, 1, 1, 1], lengths = [2, 1, 1, 1, 1, 2, 1, 1, 1];
  const a = groupScaledAdvantages(rewards, 3, lengths, null, { estimator: "group", gaeLambda: 1 });
  // TRL's GRPOTrainer (scale_rewards="group") on these rewards gives ±0.575 / ∓1.151 (its std 0.0289 + 1e-4).
  assertClose(a.advantages.flat(), [
    0.5754,
    0.5754,
    0.5754,
    -1.1508,
    -0.5754,
    -0.5754,
    1.1508,
    1.1508,
    0,
    0,
    0,
  ], 1e-4);
  assert.deepEqual(a.trained, [true, true, true, true, true, true, false, false, false]);
  assert.deepEqual(
    a.centered,
    updateAdvantages(rewards, 3, lengths, null, { estimator: "group", gaeLambda: 1 }).centered,
  );
  assert.throws(
    () => groupScaledAdvantages(rewards, 3, lengths, null, { estimator: "token_value", gaeLambda: 1 }),
    /needs ppo\.advantage "group"/,
  );
  assert.throws(
    () => groupScaledAdvantages([1, 0], 1, [1, 1], null, { estimator: "group", gaeLambda: 1 }),
    /k >= 2/,
  );
  // scale_rewards="batch": one std of all 9 raw rewards (TRL's formula in torch: ±0.0333, ∓0.0666; flat 0).
  const b = batchScaledAdvantages(rewards, 3, lengths, null, { estimator: "group", gaeLambda: 1 });
  assertClose(b.advantages.flat(), [
    0.03329,
    0.03329,
    0.03329,
    -0.06657,
    -0.03329,
    -0.03329,
    0.06657,
    0.06657,
    0,
    0,
    0,
  ], 1e-5);
  // Over two ranks the std is the whole update's: each rank's [count, sum, sum of squares] are summed.
  const half = batchScaledAdvantages(rewards.slice(0, 6), 3, lengths.slice(0, 6), null, {
    estimator: "group",
    gaeLambda: 1,
    reduce: (s) => s.map((x, i) => x + [3, 3, 3][i]!), // the other rank: the flat group, rewards 1, 1, 1
  });
  assertClose(half.advantages.flat(), b.advantages.flat().slice(0, 8), 1e-12);
  assert.throws(
    () => batchScaledAdvantages([1, 0], 1, [1, 1], null, { estimator: "group", gaeLambda: 1 }),
    /k >= 2/,
  );
});

Deno.test("advantages: over the update, flat groups carry none and normalisation is over the update", () => {
  // Groups of 2: [1, 0] has signal, [1, 1] is flat. Lengths 2, 1, 3, 1.
  const rewards = [1, 0, 1, 1], lengths = [2, 1, 3, 1];
  const g = updateAdvantages(rewards, 2, lengths, null, { estimator: "group", gaeLambda: 1 });
  assert.deepEqual(g.trained, [true, true, false, false]);
  assert.deepEqual(g.centered, [0.5, -0.5, 0, 0]);
  // Raw token advantages [0.5, 0.5, −0.5]: mean 1/6, sample std √(1/3); "group" divides without centring.
  const std = Math.sqrt(1 / 3);
  assertClose([g.std], [std], 1e-12);
  assertClose(g.advantages.flat(), [0.5 / std, 0.5 / std, -0.5 / std, 0, 0, 0, 0], 1e-12);
  assert.deepEqual(g.advantages.map((a) => a.length), lengths);
  const unscaled = updateAdvantages(rewards, 2, lengths, null, {
    estimator: "group",
    gaeLambda: 1,
    normalize: false,
  });
  assertClose(
    unscaled.advantages.flat(),
    [0.5, 0.5, -0.5, 0, 0, 0, 0],
    1e-12,
    "normalize: false keeps them raw",
  );

  // With a critic: centred − V, then whitened over the trained tokens only.
  const values = [[0.25, 0], [0.5], [9, 9, 9], [9]];
  const c = updateAdvantages(rewards, 2, lengths, values, { estimator: "token_value", gaeLambda: 1 });
  const raw = [0.25, 0.5, -1];
  const m = (0.25 + 0.5 - 1) / 3, sd = Math.sqrt(raw.reduce((s, x) => s + (x - m) ** 2, 0) / 2);
  assertClose(c.advantages.flat(), [...raw.map((x) => (x - m) / sd), 0, 0, 0, 0], 1e-12);

  // Normalised over the update, a group whose rewards differ only by the 0.05 marker bonus gets small
  // advantages beside groups with real signal (whitening over one such group alone would make them ±1).
  const marker = updateAdvantages([1.05, 0, 0, 1, 0.05, 0], 2, [1, 1, 1, 1, 1, 1], null, {
    estimator: "group",
    gaeLambda: 1,
  });
  assert.ok(marker.advantages.slice(4).flat().every((a) => Math.abs(a) < 0.1), `${marker.advantages}`);
  assert.ok(marker.advantages.slice(0, 4).flat().every((a) => Math.abs(a) > 0.8));

  // K = 1: every completion trains, and the update's mean is the baseline.
  const one = updateAdvantages([1, 0], 1, [1, 1], null, { estimator: "group", gaeLambda: 1 });
  assert.deepEqual(one.trained, [true, true]);
  assertClose(one.advantages.flat(), [0.5 / Math.SQRT1_2, -0.5 / Math.SQRT1_2], 1e-12);
  // Everything flat: nothing trains, no division by a zero std.
  const flat = updateAdvantages([1, 1], 2, [2, 2], null, { estimator: "group", gaeLambda: 1 });
  assert.deepEqual([flat.trained, flat.advantages.flat()], [[false, false], [0, 0, 0, 0]]);
  assert.throws(
    () => updateAdvantages([1, 0], 2, [1], null, { estimator: "group", gaeLambda: 1 }),
    /lengths/,
  );
});
