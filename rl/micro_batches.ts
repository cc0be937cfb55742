/**
 * How learn (rl/learn.ts) cuts an update's sequences into micro-batches, and
 * reads device values back without stalling the device between them.
 * @module
 */
import { keep, type Tensor } from "../ffi/mod.ts";

/** Sequence ids in chunks of at most size, longest first (similar lengths pad less). */
export function chunks(ids: readonly number[], lengths: readonly number[], size: number): number[][] {
  const sorted = [...ids].sort((a, b) => lengths[b]! - lengths[a]! || a - b);
  const out: number[][] = [];
  for (let i = 0; i < sorted.length; i += size) out.push(sorted.slice(i, i + size));
  return out;
}

/**
 * Whole prompt groups (K consecutive sequences) in chunks of at most size
 * sequences (at least one group), longest groups first.
 */
export function groupChunks(n: number, k: number, lengths: readonly number[], size: number): number[][] {
  const groups = Array.from({ length: n / k }, (_, g) => Array.from({ length: k }, (_, j) => g * k + j));
  const longest = (g: number[]): number => Math.max(...g.map((i) => lengths[i]!));
  groups.sort((a, b) => longest(b) - longest(a) || a[0]! - b[0]!);
  const per = Math.max(1, Math.floor(size / k));
  const out: number[][] = [];
  for (let i = 0; i < groups.length; i += per) out.push(groups.slice(i, i + per).flat());
  return out;
}

/** Each row's last n[r] entries of a [B, T] tensor, on the host. */
export function rowTails(x: Tensor, n: readonly number[]): number[][] {
  const rows = x.tolist() as number[][];
  return rows.map((r, i) => r.slice(r.length - n[i]!));
}

/**
 * Reads of device values put off until a step is queued. A read waits for the
 * device to finish its queued work, so reading inside a micro-batch loop would
 * leave the device idle while the host prepares the next micro-batch.
 */
export class DeferredReads {
  #reads: { t: Tensor; use: (t: Tensor) => void }[] = [];
  /** Keeps t (detached) for use() at the next {@link flush}. */
  read(t: Tensor, use: (t: Tensor) => void): void {
    this.#reads.push({ t: keep(t.detach()), use });
  }
  /** Hands every kept tensor to its use, in order, and frees it. */
  flush(): void {
    const reads = this.#reads.splice(0);
    try {
      for (const { t, use } of reads) use(t);
    } finally {
      for (const { t } of reads) t.dispose();
    }
  }
  /** Frees what was never read (after an error). */
  [Symbol.dispose](): void {
    for (const { t } of this.#reads.splice(0)) t.dispose();
  }
}
