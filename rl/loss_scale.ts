/**
 * Dynamic loss scaling for a float16 policy, as PyTorch's GradScaler does it.
 * float16 flushes values below ~6e-8 to zero, and the backward pass of a
 * float16 model carries activation gradients that small. learn() multiplies
 * the policy's loss by the scale before backward, so that they stay in range,
 * and divides the gradients by it before clipping. A step whose gradients
 * overflowed (inf or NaN) is skipped and the scale halved; after
 * `growthInterval` steps in a row without overflow it doubles. Gradients that
 * overflow at a scale of 1 or less come from a loss that is not finite, and
 * learn() throws, as it does without scaling. Powers of two
 * leave float32 and bfloat16 gradients bit for bit as they were.
 * @module
 */

/** What a checkpoint keeps of a {@link LossScaler}, so that a resumed run scales as the uninterrupted one. */
export interface LossScaleState {
  /** The factor the loss is multiplied by. */
  scale: number;
  /** Steps without overflow since the scale last changed. */
  goodSteps: number;
}

/** Whether s is a state some scaler could be in: a finite scale > 0 and a whole count of good steps. */
export function isLossScaleState(s: unknown): s is LossScaleState {
  const { scale, goodSteps } = (s ?? {}) as Partial<LossScaleState>;
  return Number.isFinite(scale) && scale! > 0 && Number.isSafeInteger(goodSteps) && goodSteps! >= 0;
}

/** Settings of a {@link LossScaler}; the defaults are GradScaler's. */
export interface LossScalerOptions {
  /** The first scale (default 2^16). */
  initScale?: number;
  /** The scale is multiplied by this after growthInterval good steps (default 2). */
  growthFactor?: number;
  /** And by this after an overflow (default 0.5). */
  backoffFactor?: number;
  /** Good steps in a row before the scale grows (default 2000). */
  growthInterval?: number;
}

/** The scale of the policy's loss and how it moves with overflows; see the module doc. */
export class LossScaler {
  /** The factor the loss is multiplied by. */
  scale: number;
  /** Steps without overflow since the scale last changed. */
  goodSteps = 0;
  /** Skipped steps (overflows) over this scaler's life. */
  skipped = 0;
  readonly #growth: number;
  readonly #backoff: number;
  readonly #interval: number;

  /**
   * A scaler at `initScale`, with no steps counted yet.
   * @throws {RangeError} naming a bad setting: initScale must be finite and > 0, growthFactor > 1,
   * backoffFactor in (0, 1), growthInterval an integer >= 1
   */
  constructor(opts: LossScalerOptions = {}) {
    const { initScale = 2 ** 16, growthFactor = 2, backoffFactor = 0.5, growthInterval = 2000 } = opts;
    const bad = !(Number.isFinite(initScale) && initScale > 0)
      ? `initScale must be a finite number > 0, got ${initScale}`
      : !(Number.isFinite(growthFactor) && growthFactor > 1)
      ? `growthFactor must be a finite number > 1, got ${growthFactor}`
      : !(backoffFactor > 0 && backoffFactor < 1)
      ? `backoffFactor must be in (0, 1), got ${backoffFactor}`
      : !(Number.isSafeInteger(growthInterval) && growthInterval >= 1)
      ? `growthInterval must be an integer >= 1, got ${growthInterval}`
      : null;
    if (bad) throw new RangeError(`LossScaler: ${bad}`);
    this.scale = initScale;
    this.#growth = growthFactor;
    this.#backoff = backoffFactor;
    this.#interval = growthInterval;
  }

  /** Records a step's outcome: an overflow backs the scale off, the growthInterval-th good step grows it. */
  update(overflowed: boolean): void {
    if (overflowed) {
      this.scale *= this.#backoff;
      this.goodSteps = 0;
      this.skipped++;
      return;
    }
    if (++this.goodSteps < this.#interval) return;
    this.scale *= this.#growth;
    this.goodSteps = 0;
  }

  /** What a checkpoint keeps. */
  state(): LossScaleState {
    return { scale: this.scale, goodSteps: this.goodSteps };
  }

  /**
   * Continues from a checkpoint's state.
   * @throws {RangeError} for a state that no scaler could have reached (a scale not finite and > 0, a negative count)
   */
  restore(state: LossScaleState): void {
    if (!isLossScaleState(state)) {
      const { scale, goodSteps } = state as LossScaleState;
      throw new RangeError(`LossScaler: a saved state holds scale ${scale} and goodSteps ${goodSteps}`);
    }
    this.scale = state.scale;
    this.goodSteps = state.goodSteps;
  }
}
