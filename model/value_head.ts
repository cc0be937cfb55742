/**
 * The critic: Linear(h→h) → Tanh → Linear(h→1) on a model's final hidden
 * states (rl/policy.ts feeds it the frozen base's), with its own parameters (and so its own optimizer group). It runs
 * in float32 whatever the model's dtype, since its targets are small reward
 * differences.
 * @module
 */
import { join } from "node:path";
import { type Device, type DType, keep, linear, rand, type Tensor, tidy, zeros } from "../ffi/mod.ts";
import { SafetensorsFile } from "./safetensors.ts";
import { writeSafetensors } from "./safetensors_write.ts";

/** The value head's file inside a checkpoint folder. */
export const VALUE_HEAD_FILE = "value_head.safetensors";

/** Linear(h→h) → Tanh → Linear(h→1). */
export class ValueHead {
  /** [h, h]. */
  readonly w1: Tensor;
  /** [h]. */
  readonly b1: Tensor;
  /** [1, h]. */
  readonly w2: Tensor;
  /** [1]. */
  readonly b2: Tensor;

  private constructor(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) {
    [this.w1, this.b1, this.w2, this.b2] = [w1, b1, w2, b2].map((t) => keep(t.setRequiresGrad(true))) as [
      Tensor,
      Tensor,
      Tensor,
      Tensor,
    ];
  }

  /**
   * A fresh head for hidden size h: the hidden layer initialised as
   * torch.nn.Linear (uniform ±1/√fan_in), the output layer at zero, so a
   * fresh critic predicts 0 everywhere and adds no noise to the advantages
   * before it has learnt anything. Seed with manualSeed() for reproducibility.
   */
  static create(hidden: number, opts: { device?: Device; dtype?: DType } = {}): ValueHead {
    const o = { device: opts.device ?? "cpu", dtype: opts.dtype ?? "float32" } as const;
    const u = (shape: number[], fanIn: number): Tensor =>
      tidy(() => rand(shape, o).mul(2 / Math.sqrt(fanIn)).sub(1 / Math.sqrt(fanIn)));
    return new ValueHead(
      u([hidden, hidden], hidden),
      u([hidden], hidden),
      zeros([1, hidden], o),
      zeros([1], o),
    );
  }

  /** Loads a head saved by {@link save} from dir. */
  static async load(dir: string, opts: { device?: Device } = {}): Promise<ValueHead> {
    const f = await SafetensorsFile.open(join(dir, VALUE_HEAD_FILE));
    const got: Tensor[] = [];
    try {
      for (const n of ["w1", "b1", "w2", "b2"]) got.push(await f.load(n, { device: opts.device }));
      const [w1, b1, w2, b2] = got as [Tensor, Tensor, Tensor, Tensor];
      return new ValueHead(w1, b1, w2, b2);
    } catch (e) {
      got.forEach((t) => t.dispose()); // a missing or bad tensor frees those read before it
      throw e;
    } finally {
      f.close();
    }
  }

  /** Per-token values [B, S] from hidden states [B, S, H] (any float dtype). */
  forward(hidden: Tensor): Tensor {
    return tidy(() => {
      const x = hidden.to(this.w1.dtype);
      return linear(linear(x, this.w1, this.b1).tanh(), this.w2, this.b2).squeeze(-1);
    });
  }

  /** The parameters, for the optimizer. */
  parameters(): Tensor[] {
    return [this.w1, this.b1, this.w2, this.b2];
  }

  /** Writes the weights to dir/value_head.safetensors (atomically). */
  async save(dir: string): Promise<void> {
    await writeSafetensors(join(dir, VALUE_HEAD_FILE), {
      w1: this.w1,
      b1: this.b1,
      w2: this.w2,
      b2: this.b2,
    });
  }

  /** Frees the weights. */
  dispose(): void {
    for (const t of this.parameters()) t.dispose();
  }
}
