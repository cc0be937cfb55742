/**
 * ppo.lossAggregation over ranks: two Gloo processes, each holding half of the prompt groups, take the same
 * steps as one process holding all of them (the per-sequence divisors count the minibatch's sequences over
 * every rank), under GRPO's sequence mean and Dr. GRPO's divisor, with several minibatches and epochs, cut
 * completions left out (maskTruncated), the sequence ratio and the rollout correction. A control that divides
 * by a rank's own sequences shows the comparison would catch that.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { distBackends } from "../ffi/mod.ts";
import { freePort } from "../train/spawn.ts";

const WORKER = fileURLToPath(new URL("./loss_aggregation_dp_worker.ts", import.meta.url));
const hasGloo = distBackends().includes("gloo");

interface Learned {
  steps: number[][];
  metrics: Record<string, number>;
}

/** The worker in `world` processes; rank 0's output. */
async function learnOn(world: number, ppo: object, control = false): Promise<Learned> {
  const port = freePort();
  const outs = await Promise.all(
    Array.from({ length: world }, (_, rank) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", WORKER, JSON.stringify(ppo), ...(control ? ["localS"] : [])],
        env: {
          RANK: String(rank),
          WORLD_SIZE: String(world),
          MASTER_PORT: String(port),
          OMP_NUM_THREADS: "1",
        },
        stdout: "piped",
        stderr: "piped",
      }).output()),
  );
  const dec = new TextDecoder();
  for (const [r, o] of outs.entries()) assert.equal(o.code, 0, `rank ${r}: ${dec.decode(o.stderr)}`);
  return JSON.parse(dec.decode(outs[0]!.stdout).trim().split("\n").pop()!);
}

/** The largest difference between two runs' step gradients, and the largest gradient entry. */
function compare(a: Learned, b: Learned): { diff: number; size: number } {
  assert.equal(b.steps.length, a.steps.length, "as many optimizer steps");
  let diff = 0, size = 0;
  a.steps.forEach((s, i) =>
    s.forEach((x, j) => {
      diff = Math.max(diff, Math.abs(x - b.steps[i]![j]!));
      size = Math.max(size, Math.abs(x));
    })
  );
  return { diff, size };
}

const VARIANTS: Record<string, object> = {
  "seq_mean_token_mean, 2 minibatches × 2 epochs, maskTruncated": {
    lossAggregation: "seq_mean_token_mean",
    minibatches: 2,
    epochs: 2,
    maskTruncated: true,
  },
  "seq_mean_token_sum_norm, sequence ratio, 2 epochs": {
    lossAggregation: "seq_mean_token_sum_norm",
    ratioLevel: "sequence",
    epochs: 2,
  },
};

for (const [name, ppo] of Object.entries(VARIANTS)) {
  Deno.test({
    name: `loss aggregation: 2 Gloo ranks take the steps of 1 process (${name})`,
    ignore: !hasGloo,
    async fn(): Promise<void> {
      const one = await learnOn(1, ppo), two = await learnOn(2, ppo);
      assert.ok(one.steps.length >= 2, "several optimizer steps");
      const { diff, size } = compare(one, two);
      assert.ok(size > 0, "the steps have gradients");
      assert.ok(diff <= 1e-4 * size, `1 and 2 processes differ by ${diff} (largest entry ${size})`);
      for (const key of ["policy_loss", "kl", "trained_fraction"]) {
        assert.ok(
          Math.abs(one.metrics[key]! - two.metrics[key]!) < 1e-6,
          `${key}: ${one.metrics[key]} vs ${two.metrics[key]}`,
        );
      }
      if (name.startsWith("seq_mean_token_mean")) {
        // Dividing by a rank's own sequences instead of the minibatch's would be caught.
        const { diff: off } = compare(one, await learnOn(2, ppo, true));
        assert.ok(off > 1e-2 * size, `a per-rank divisor differs by only ${off}`);
      }
    },
  });
}
