/**
 * The functions of the learn phase (rl/learn.ts) that a caller may replace, for an estimator or a loss the
 * settings do not offer: GRPO's per-group std scaling, a Huber critic loss, an extra penalty term. Each
 * takes the arguments of the library function it stands in for, so that a replacement can wrap it:
 *
 * ```ts ignore
 * const objective: ObjectiveFn = (out, inputs, cfg) => {
 *   const r = ppoObjective(out, inputs, cfg);
 *   return { ...r, loss: r.loss.add(myPenalty(out)) };
 * };
 * learn(policy, opt, buffer, cfg, { objective });
 * ```
 *
 * Under data parallelism every rank must be given the same functions, and they must keep the token means
 * global: `tokens` (the objective's `inputs.tokens`, valueLoss's fourth argument) is the count of the whole
 * step's tokens over all ranks (`inputs.sequences` its sequences), and updateAdvantages' `cfg.reduce` sums
 * statistics over the ranks.
 * @module
 */
import { Tensor } from "../ffi/mod.ts";
import { describe } from "../model/settings.ts";
import { type UpdateAdvantages, updateAdvantages } from "./advantages.ts";
import { valueLoss } from "./losses.ts";
import { OBJECTIVE_PARTS, type ObjectiveResult, ppoObjective } from "./objective.ts";

/** The update's advantages (see {@link updateAdvantages}, the default). */
export type AdvantagesFn = typeof updateAdvantages;
/** The policy's loss on one micro-batch (see rl/objective.ts `ppoObjective`, the default). */
export type ObjectiveFn = typeof ppoObjective;
/** The critic's loss on one micro-batch (see rl/losses.ts `valueLoss`, the default). */
export type ValueLossFn = typeof valueLoss;

/** The replaceable functions, each defaulting to the library's. */
export interface LearnFunctions {
  /** Advantages of the whole update, from the rewards, lengths and (with a critic) values. */
  advantages?: AdvantagesFn;
  /** The policy's objective. */
  objective?: ObjectiveFn;
  /** The critic's loss; refused with ppo.advantage "group", which trains no critic (it would never be called). */
  valueLoss?: ValueLossFn;
}

/** The functions to use: the given ones, else the library's. */
export function learnFunctions(f: LearnFunctions): Required<LearnFunctions> {
  return {
    advantages: f.advantages ?? updateAdvantages,
    objective: f.objective ?? ppoObjective,
    valueLoss: f.valueLoss ?? valueLoss,
  };
}

/**
 * Refuses functions the settings would never call: a valueLoss with ppo.advantage "group", which trains no
 * critic. learn checks it; train checks it before its first rollout.
 * @param who the caller, for the message
 * @throws {Error} saying which function and what to change
 */
export function checkUsedFunctions(f: LearnFunctions, advantage: string, who: string): void {
  if (f.valueLoss && advantage === "group") {
    throw new Error(
      `${who}: a valueLoss function was given, but ppo.advantage "group" trains no critic ` +
        '(use "token_value" or "prompt_value", or leave valueLoss out)',
    );
  }
}

/**
 * An advantages function's result, checked against the update: a sequence may be trained only where the
 * reference pass has its log-probs (a group whose rewards differ, a completion that is not empty), with one
 * finite advantage per completion token.
 * @throws {Error} naming the sequence and what is wrong
 */
export function checkAdvantages(
  adv: UpdateAdvantages,
  lengths: readonly number[],
  trainable: readonly boolean[],
): UpdateAdvantages {
  const n = lengths.length;
  if ((adv as unknown) instanceof Promise) {
    throw new TypeError(
      `learn: the advantages function returned a Promise (it must not be async); it must give trained and ` +
        `advantages for each of the ${n} sequences`,
    );
  }
  if (!(Array.isArray(adv?.trained) && adv.trained.length === n && adv.advantages?.length === n)) {
    throw new Error(
      `learn: the advantages function must give trained and advantages for each of the ${n} sequences`,
    );
  }
  if (!(Array.isArray(adv.centered) && Number.isFinite(adv.mean) && Number.isFinite(adv.std))) {
    throw new Error("learn: the advantages function must give centered rewards and a finite mean and std");
  }
  for (let i = 0; i < n; i++) {
    if (!adv.trained[i]) continue;
    if (!trainable[i]) {
      throw new Error(
        `learn: the advantages function trains sequence ${i}, whose group's rewards are all equal ` +
          `(or whose completion is empty): such sequences are left out of the update`,
      );
    }
    const a: unknown = adv.advantages[i];
    if (!Array.isArray(a)) {
      throw new TypeError(
        `learn: the advantages function gave sequence ${i} ${shown(a)}, not a list of its ${lengths[i]} ` +
          `completion tokens' advantages`,
      );
    }
    if (a.length !== lengths[i] || !a.every(Number.isFinite)) {
      throw new Error(
        `learn: the advantages function gave sequence ${i} ${a.length} advantages for its ${lengths[i]} ` +
          `completion tokens${a.length === lengths[i] ? ", not all finite" : ""}`,
      );
    }
  }
  return adv;
}

/** What a replacement gave, for errors. */
function shown(v: unknown): string {
  if (v instanceof Tensor) return `a Tensor of shape [${v.shapeForMessage().join(", ")}]`;
  if (v instanceof Promise) return "a Promise (it must not be async)";
  return describe(v);
}

/**
 * A replacement's loss, checked before the backward pass: a scalar tensor with autograd history.
 * @param what the function's name in {@link LearnFunctions}, for errors
 * @throws {TypeError} for anything but a Tensor; {@link RangeError} for more than one element;
 *   {@link Error} for a loss without autograd history
 */
export function checkLoss(loss: unknown, what: "objective" | "valueLoss"): Tensor {
  if (!(loss instanceof Tensor)) {
    throw new TypeError(`learn: the ${what} function's loss must be a Tensor, got ${shown(loss)}`);
  }
  if (loss.numel !== 1) {
    throw new RangeError(
      `learn: the ${what} function's loss must be a scalar (a mean over the tokens), got shape ` +
        `[${loss.shape.join(", ")}]`,
    );
  }
  if (!loss.requiresGrad) {
    throw new Error(
      `learn: the ${what} function's loss carries no gradient (detached, or made under noGrad)`,
    );
  }
  return loss;
}

/**
 * An objective function's result, checked: `{ loss, parts }` as {@link ppoObjective} returns it, the loss as
 * {@link checkLoss}, one part per {@link OBJECTIVE_PARTS}.
 * @throws {TypeError} or {@link RangeError} naming what is wrong
 */
export function checkObjective(r: unknown): ObjectiveResult {
  if (typeof r !== "object" || r === null || r instanceof Tensor || r instanceof Promise || !("loss" in r)) {
    throw new TypeError(
      `learn: the objective function must return { loss, parts } (an ObjectiveResult, as ppoObjective does), ` +
        `got ${shown(r)}`,
    );
  }
  const { loss, parts } = r as { loss: unknown; parts?: unknown };
  checkLoss(loss, "objective");
  if (!(parts instanceof Tensor)) {
    throw new TypeError(
      `learn: the objective function's parts must be a Tensor of the ${OBJECTIVE_PARTS.length} OBJECTIVE_PARTS ` +
        `(ppoObjective's, or your own values of them), got ${shown(parts)}`,
    );
  }
  if (parts.numel !== OBJECTIVE_PARTS.length) {
    throw new RangeError(
      `learn: the objective function gave ${parts.numel} parts, not the ${OBJECTIVE_PARTS.length} ` +
        `of OBJECTIVE_PARTS (${OBJECTIVE_PARTS.join(", ")})`,
    );
  }
  return r as ObjectiveResult;
}
