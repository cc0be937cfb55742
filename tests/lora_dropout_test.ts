/**
 * LoRA dropout (inverted, as PEFT's nn.Dropout): in training each input of
 * the adapter path is zeroed with probability p and the kept ones are scaled
 * by 1/(1 − p), so the adapter's expected output is the same as in
 * evaluation; out of training, or with p = 0, the input passes unchanged.
 */
import assert from "node:assert/strict";
import { full, manualSeed, noGrad, ones, randn, tidy } from "../ffi/mod.ts";
import { Linear } from "../model/layers.ts";
import { dropout, LoraLinear, LoraState } from "../model/lora.ts";
import { assertClose, assertNoLeak, DEVICE } from "./util.ts";

const f32 = { dtype: "float32" as const, device: DEVICE };

Deno.test("lora dropout: each value dropped or scaled by 1/(1 − p); the identity out of training", () => {
  assertNoLeak(() =>
    tidy(() => {
      const x = randn([64, 64], f32).add(3); // no zeros: a zero out is a dropped value
      const p = 0.25;
      const y = dropout(x, p, true);
      const xs = x.toArray(), ys = y.toArray();
      let dropped = 0;
      ys.forEach((v, i) => {
        if (v === 0) dropped++;
        else assertClose([v], [xs[i]! / (1 - p)], 1e-6, `value ${i} kept`);
      });
      const frac = dropped / xs.length;
      assert.ok(Math.abs(frac - p) < 0.05, `dropped ${frac} of the values, not about ${p}`);
      assert.deepEqual(dropout(x, p, false).toArray(), xs, "out of training: unchanged");
      assert.deepEqual(dropout(x, 0, true).toArray(), xs, "p = 0: unchanged");
    })
  );
});

Deno.test("lora dropout: an adapter's output keeps its mean in training", () => {
  manualSeed(0);
  assertNoLeak(() =>
    tidy(() => {
      const base = new Linear(randn([4, 8], f32));
      const state = new LoraState();
      const lora = new LoraLinear(base, { in: 8, out: 4, like: base.weight }, {
        r: 2,
        alpha: 4,
        dropout: 0.5,
      }, state);
      try {
        // B starts at zero: give the adapter an output, B·A = 0.2 everywhere, so each output gains
        // α/r · 8 · 0.2 = 3.2 on an input of ones.
        noGrad(() => [lora.A.copy_(full([2, 8], 0.1, f32)), lora.B.copy_(ones([4, 2], f32))]);
        const x = ones([4096, 8], f32);
        const delta = (training: boolean): number => {
          state.training = training;
          return lora.forward(x).sub(base.forward(x)).mean().item();
        };
        assertClose([delta(false)], [3.2], 1e-5, "out of training");
        assertClose(
          [delta(true)],
          [3.2],
          0.02,
          "in training, the mean over 4096 rows with half the inputs dropped",
        );
      } finally {
        lora.dispose();
      }
    })
  );
});
