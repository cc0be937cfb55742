/**
 * Shared test helpers. Tests run on the device and float dtype named by
 * MOERL_TEST_DEVICE (default "cpu") and MOERL_TEST_DTYPE (default "float32"),
 * so the same suite checks CUDA and bf16 on a GPU machine.
 */
import assert from "node:assert/strict";
import { type Device, type DType, liveTensors, nativeLiveCount, type Tensor, tidy } from "../ffi/mod.ts";
import type { ExpertNames } from "../model/moe.ts";
import type { StepOptimizer } from "../rl/learn.ts";
import type { RewardResult } from "../rl/reward.ts";
import { RolloutBuffer, type RolloutSequence } from "../rl/rollout_buffer.ts";

/** Device the suite runs on. */
export const DEVICE: Device = (Deno.env.get("MOERL_TEST_DEVICE") ?? "cpu") as Device;
/** Float dtype for value tests. */
export const FLOAT: DType = (Deno.env.get("MOERL_TEST_DTYPE") ?? "float32") as DType;
/** Tolerance matching FLOAT: exact-ish for f32, ~3 significant digits for bf16. */
export const TOL: number = FLOAT === "bfloat16" ? 2e-2 : FLOAT === "float16" ? 2e-3 : 1e-5;

/** Asserts |a - e| <= tol·max(1, |e|) elementwise, with a message naming the first bad index. */
export function assertClose(
  actual: readonly number[],
  expected: readonly number[],
  tol = TOL,
  what = "",
): void {
  assert.equal(actual.length, expected.length, `${what} length ${actual.length} != ${expected.length}`);
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!, e = expected[i]!;
    if (Number.isNaN(e) && Number.isNaN(a)) continue;
    if (a === e) continue; // covers ±Infinity
    const ok = Math.abs(a - e) <= tol * Math.max(1, Math.abs(e));
    assert.ok(
      ok,
      `${what} [${i}]: got ${a}, expected ${e} (tol ${tol})\n  got ${actual.join(", ")}\n  exp ${
        expected.join(", ")
      }`,
    );
  }
}

/** Runs fn and asserts it leaves no tensor alive, JS-side and native-side. */
export function assertNoLeak(fn: () => void, what = "block"): void {
  const js = liveTensors(), native = nativeLiveCount();
  fn();
  assert.equal(liveTensors(), js, `${what} leaked ${liveTensors() - js} tensors`);
  assert.equal(nativeLiveCount(), native, `${what} leaked ${nativeLiveCount() - native} native handles`);
}

/**
 * A Python for the optional cross-checks against the reference libraries
 * (transformers, safetensors): $MOERL_TEST_PYTHON, else `python3`. Tests that
 * need it are reported as ignored when it lacks the modules, since the
 * committed fixtures already pin the reference results.
 */
export const PYTHON: string = Deno.env.get("MOERL_TEST_PYTHON") ?? "python3";

/** Versions pinned in scripts/requirements-fixtures.txt, by distribution name. */
function pinnedVersions(): Map<string, string> {
  const text = Deno.readTextFileSync(new URL("../scripts/requirements-fixtures.txt", import.meta.url));
  return new Map([...text.matchAll(/^([A-Za-z0-9_.-]+)==(\S+)/gm)].map((m) => [m[1]!.toLowerCase(), m[2]!]));
}

/**
 * True if PYTHON runs, imports every module named, and each has the version
 * the fixtures were made with (scripts/requirements-fixtures.txt): another
 * transformers renders templates or lays out checkpoints differently, which
 * would test that version rather than our code.
 */
export function pythonHas(...modules: string[]): boolean {
  const pins = pinnedVersions();
  const checks = modules.map((m) => {
    const pin = pins.get(m.toLowerCase());
    return pin ? `assert ${m}.__version__.split("+")[0] == "${pin}", "${m}"` : "";
  }).filter(Boolean);
  try {
    const args = ["-c", [`import ${modules.join(", ")}`, ...checks].join("\n")];
    return new Deno.Command(PYTHON, { args, stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
}

/** Runs fn with the environment variables set (undefined: unset), then puts the old values back. */
export async function withEnv<T>(vars: Record<string, string | undefined>, fn: () => Promise<T>): Promise<T> {
  const old = Object.fromEntries(Object.keys(vars).map((k) => [k, Deno.env.get(k)]));
  const set = (v: Record<string, string | undefined>): void => {
    for (const [k, x] of Object.entries(v)) x === undefined ? Deno.env.delete(k) : Deno.env.set(k, x);
  };
  set(vars);
  try {
    return await fn();
  } finally {
    set(old);
  }
}

/** Checkpoint names of a stacked expert bank in the fused layout (transformers v5's). */
export const FUSED_EXPERT_NAMES: ExpertNames = {
  prefix: "m.experts",
  gate: "gate_proj",
  up: "up_proj",
  down: "down_proj",
  layout: "fused",
};

/**
 * A score function whose i-th call (0, 1, …) rewards r(i), correct when above 0: tests set the rewards of a
 * rollout instead of drawing them from the model's answers.
 */
export function scriptedScore(r: (i: number) => number): (..._ignored: unknown[]) => RewardResult {
  let i = 0;
  return () => {
    const reward = r(i++);
    return {
      reward,
      correct: reward > 0,
      marker: false,
      overLength: false,
      extracted: { value: null, method: null, marker: false },
    };
  };
}

/** An optimizer that records the gradients it is asked to apply, and applies none. */
export class GradientRecorder implements StepOptimizer {
  /** Per step, each parameter's gradient as a flat array. */
  steps: number[][][] = [];
  /** Records the gradients of only. */
  step(only: readonly Tensor[]): void {
    this.steps.push(only.map((p) => tidy(() => p.grad?.toArray() ?? [])));
  }
  /** Clears the gradients of only. */
  zeroGrad(only: readonly Tensor[]): void {
    only.forEach((p) => p.clearGrad());
  }
}

/** A buffer with collected's prompts, rewards and metrics but other sequences (an edited rollout), on DEVICE. */
export function withSequences(collected: RolloutBuffer, sequences: RolloutSequence[]): RolloutBuffer {
  return new RolloutBuffer({
    ...collected,
    sequences,
    routing: null,
    routingStart: [],
    device: DEVICE,
    timings: collected.metrics,
  });
}
