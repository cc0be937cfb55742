/**
 * Seeded shuffling into micro-batches, epoch by epoch. Each epoch's order is a
 * pure function of (seed, epoch, number of items), drawn from a small
 * deterministic PRNG (never Math.random), so a run resumed from a saved
 * (seed, epoch, index) sees exactly the batches the uninterrupted run would
 * have seen, with no generator state to save.
 * @module
 */
import { counterHash } from "../model/random.ts";

/** A position in the stream of micro-batches: batch `index` (from 0) of epoch `epoch` (from 0). */
export interface BatchPosition {
  /** The epoch, from 0. */
  epoch: number;
  /** The micro-batch within the epoch, from 0. */
  index: number;
}

/** One micro-batch. */
export interface MicroBatch<T> {
  /** Its epoch. */
  epoch: number;
  /** Its index within the epoch. */
  index: number;
  /** Positions of its items in the item list. */
  indices: number[];
  /** The items. */
  items: T[];
  /** Where the batch after this one is: save it to resume there. */
  next: BatchPosition;
}

/** Options for {@link MicroBatcher}. */
export interface MicroBatcherOptions {
  /** Items per micro-batch. */
  batchSize: number;
  /** The shuffling seed, an integer in [0, 2^32). */
  seed: number;
  /** Drop an epoch's last batch when it is short (default false: it is yielded short). */
  dropLast?: boolean;
  /** Shuffle each epoch (default true); false keeps the items' order. */
  shuffle?: boolean;
}

const UINT32 = 2 ** 32;

/**
 * mulberry32: a tiny 32-bit PRNG (uniform floats in [0, 1)), ample for
 * shuffling, identical on every platform.
 * @param seed any integer; taken modulo 2^32
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / UINT32;
  };
}

/** The PRNG seed of one epoch: word `epoch` of the stream `seed`, so epochs (and seeds) do not give shifted streams. */
export function epochSeed(seed: number, epoch: number): number {
  return counterHash(seed, epoch);
}

/** Shuffles xs in place (Fisher–Yates), drawing from rand; returns xs. */
export function shuffleInPlace<T>(xs: T[], rand: () => number): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

/** The order of n items in an epoch: a Fisher–Yates shuffle of 0..n−1 driven by {@link epochSeed}. */
export function epochOrder(n: number, seed: number, epoch: number): number[] {
  return shuffleInPlace(Array.from({ length: n }, (_, i) => i), mulberry32(epochSeed(seed, epoch)));
}

function checkInt(what: string, v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): void {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min || v > max) {
    throw new Error(`MicroBatcher: ${what} must be an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
  }
}

/**
 * Micro-batches of a fixed item list, reshuffled every epoch.
 * @example
 * ```ts
 * import { MicroBatcher } from "./batches.ts";
 * const b = new MicroBatcher(["a", "b", "c", "d", "e"], { batchSize: 2, seed: 7 });
 * const first = b.batch({ epoch: 0, index: 0 });
 * // ... save first.next; after a restart, b.batches(first.next) goes on from there
 * ```
 */
export class MicroBatcher<T> {
  /** The items, in their original order. */
  readonly items: readonly T[];
  /** Items per batch. */
  readonly batchSize: number;
  /** The seed. */
  readonly seed: number;
  /** Whether a short last batch is dropped. */
  readonly dropLast: boolean;
  /** Whether epochs are shuffled. */
  readonly shuffle: boolean;
  /** Batches in one epoch. */
  readonly batchesPerEpoch: number;
  #cache: { epoch: number; order: number[] } | null = null;

  /**
   * Batches items (kept by reference, not copied) with the given size and seed.
   * @throws {Error} for an empty item list, or a batch size or seed out of range (or a batch size over the
   *   item count with dropLast, which would leave no batch)
   */
  constructor(items: readonly T[], opts: MicroBatcherOptions) {
    if (!Array.isArray(items) || items.length === 0) throw new Error("MicroBatcher: no items to batch");
    checkInt("batchSize", opts.batchSize, 1);
    checkInt("seed", opts.seed, 0, UINT32 - 1);
    this.items = items;
    this.batchSize = opts.batchSize;
    this.seed = opts.seed;
    this.dropLast = opts.dropLast ?? false;
    this.shuffle = opts.shuffle ?? true;
    this.batchesPerEpoch = this.dropLast
      ? Math.floor(items.length / opts.batchSize)
      : Math.ceil(items.length / opts.batchSize);
    if (this.batchesPerEpoch === 0) {
      throw new Error(
        `MicroBatcher: batchSize ${opts.batchSize} exceeds the ${items.length} items and dropLast is set`,
      );
    }
  }

  /** The item order of an epoch (indices into items). */
  order(epoch: number): number[] {
    checkInt("epoch", epoch, 0);
    if (this.#cache?.epoch !== epoch) {
      const n = this.items.length;
      const order = this.shuffle ? epochOrder(n, this.seed, epoch) : Array.from({ length: n }, (_, i) => i);
      this.#cache = { epoch, order };
    }
    return [...this.#cache.order];
  }

  /**
   * The micro-batch at a position.
   * @throws {Error} when the position is outside the epoch (index ≥ batchesPerEpoch) or negative
   */
  batch(pos: BatchPosition): MicroBatch<T> {
    checkInt("epoch", pos.epoch, 0);
    checkInt("index", pos.index, 0, this.batchesPerEpoch - 1);
    this.order(pos.epoch);
    const indices = this.#cache!.order.slice(pos.index * this.batchSize, (pos.index + 1) * this.batchSize);
    const last = pos.index + 1 === this.batchesPerEpoch;
    return {
      epoch: pos.epoch,
      index: pos.index,
      indices,
      items: indices.map((i) => this.items[i]!),
      next: last ? { epoch: pos.epoch + 1, index: 0 } : { epoch: pos.epoch, index: pos.index + 1 },
    };
  }

  /**
   * The micro-batches from a position on (default the start), for `epochs`
   * epochs counted from the start position's epoch (default: endlessly).
   */
  *batches(from: BatchPosition = { epoch: 0, index: 0 }, epochs = Infinity): Generator<MicroBatch<T>> {
    if (epochs !== Infinity) checkInt("epochs", epochs, 0);
    let pos = from;
    while (pos.epoch < from.epoch + epochs) {
      const b = this.batch(pos);
      yield b;
      pos = b.next;
    }
  }
}
