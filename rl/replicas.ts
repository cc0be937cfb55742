/**
 * The ranks of a data-parallel run, as the RL update sees them: each rank
 * holds whole prompt groups of the update, and these few reductions make the
 * update the same as one process holding them all (rl/learn.ts). With one
 * process ({@link Replicas.single}) every reduction is the identity and costs
 * nothing.
 * @module
 */
import {
  cat,
  type Device,
  type DType,
  fromTypedArray,
  noGrad,
  type ProcessGroup,
  type Tensor,
  tensor,
  tidy,
} from "../ffi/mod.ts";

/** One rank among `size`, joined by a process group (null: a single process). */
export class Replicas {
  /** The group (null for a single process). */
  readonly group: ProcessGroup | null;
  /** Where reductions of host numbers run: the CPU for Gloo, the rank's GPU for NCCL. */
  readonly device: Device;

  /**
   * Wraps a joined process group.
   * @param group the joined process group, or null for a single process
   * @param device the device of the group's backend ("cpu" for Gloo, the rank's CUDA device for NCCL)
   */
  constructor(group: ProcessGroup | null, device: Device = "cpu") {
    this.group = group;
    this.device = device;
  }

  /** A single process: every reduction is the identity. */
  static single(): Replicas {
    return new Replicas(null);
  }

  /** This process's rank (0 for a single process). */
  get rank(): number {
    return this.group?.rank ?? 0;
  }

  /** Number of ranks. */
  get size(): number {
    return this.group?.size ?? 1;
  }

  #reduce(xs: readonly number[], op: "sum" | "max"): number[] {
    if (!this.group || xs.length === 0) return [...xs];
    return tidy(() => {
      const t = tensor([...xs], { dtype: "float64", device: this.device });
      this.group!.allReduce([t], op);
      return t.toArray();
    });
  }

  /** Element-wise sums over the ranks (in float64). */
  sum(xs: readonly number[]): number[] {
    return this.#reduce(xs, "sum");
  }

  /** Element-wise maxima over the ranks. */
  max(xs: readonly number[]): number[] {
    return this.#reduce(xs, "max");
  }

  /**
   * Every rank's xs, in rank order (float64, exact for integers below 2^53).
   * @throws {RangeError} when the ranks' lists differ in length
   */
  gather(xs: readonly number[]): number[][] {
    if (!this.group) return [[...xs]];
    const [lo, hi] = [-this.max([-xs.length])[0]!, this.max([xs.length])[0]!];
    if (lo !== hi) {
      throw new RangeError(`Replicas.gather: ranks hold lists of ${lo} to ${hi} numbers; they must be equal`);
    }
    if (hi === 0) return Array.from({ length: this.size }, () => []);
    return tidy(() => {
      const t = this.group!.allGather(tensor([...xs], { dtype: "float64", device: this.device }));
      return t.tolist() as number[][];
    });
  }

  /** Every rank's text, in rank order (UTF-8 bytes through the group, padded to the longest). */
  gatherText(text: string): string[] {
    if (!this.group) return [text];
    const bytes = new TextEncoder().encode(text);
    const lengths = this.gather([bytes.length]).map((r) => r[0]!);
    const longest = Math.max(...lengths);
    if (longest === 0) return lengths.map(() => "");
    const padded = new Uint8Array(longest);
    padded.set(bytes);
    const all = tidy(() => {
      const t = fromTypedArray(padded, [longest], { dtype: "uint8", device: "cpu" }).to(this.device);
      return this.group!.allGather(t).to("cpu").toTypedArray() as Uint8Array;
    });
    const dec = new TextDecoder();
    return lengths.map((n, r) => dec.decode(all.subarray(r * longest, r * longest + n)));
  }

  /**
   * Sums the parameters' gradients over the ranks, in place, as one flat
   * buffer per dtype (one collective each). A parameter without a gradient
   * on this rank counts as zeros; one that has none on any rank (an expert
   * no token reached) keeps none, so that the optimizer skips it as a single
   * process would.
   */
  sumGradients(params: readonly Tensor[]): void {
    if (!this.group || params.length === 0) return;
    const anywhere = this.max(tidy(() => params.map((p) => (p.grad === null ? 0 : 1))));
    noGrad(() => {
      const byType = new Map<DType, Tensor[]>();
      const has = new Map(params.map((p, i) => [p, anywhere[i] === 1]));
      for (const p of params) {
        if (!byType.has(p.dtype)) byType.set(p.dtype, []);
        byType.get(p.dtype)!.push(p);
      }
      for (const group of byType.values()) {
        tidy(() => {
          const flat = cat(group.map((p) => (p.grad ?? p.detach().mul(0)).reshape([-1])));
          this.group!.allReduce([flat]);
          let offset = 0;
          for (const p of group) {
            const n = p.numel;
            if (has.get(p)) p.setGrad(flat.narrow(0, offset, n).reshape(p.shape));
            offset += n;
          }
        });
      }
    });
  }

  /** Leaves the process group (if any). Idempotent. */
  dispose(): void {
    this.group?.dispose();
  }

  /** Leaves the process group at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Gives every rank rank 0's values of the tensors, in place (e.g. the trained parameters at start). */
  broadcastFromFirst(tensors: readonly Tensor[]): void {
    if (!this.group || tensors.length === 0) return;
    noGrad(() => this.group!.broadcast(tensors, 0));
  }
}

/**
 * The update across the ranks: every sequence's length and reward, in global
 * order (rank-major), and which of them this rank holds.
 */
export interface GlobalView {
  /** Every sequence's completion length. */
  lengths: number[];
  /** Every sequence's reward. */
  rewards: number[];
  /** Global index of this rank's first sequence. */
  offset: number;
}

/** Shares lengths and rewards over the ranks (each must hold the same number of whole groups). */
export function globalView(dp: Replicas, lengths: readonly number[], rewards: readonly number[]): GlobalView {
  if (dp.size === 1) return { lengths: [...lengths], rewards: [...rewards], offset: 0 };
  const rows = dp.gather([...lengths, ...rewards]);
  return {
    lengths: rows.flatMap((r) => r.slice(0, lengths.length)),
    rewards: rows.flatMap((r) => r.slice(lengths.length)),
    offset: dp.rank * lengths.length,
  };
}
