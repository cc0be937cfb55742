/**
 * Process groups for data-parallel training, over PyTorch's own c10d
 * (the shim's dist.cpp): a TCPStore rendezvous, then Gloo for CPU tensors or
 * NCCL for CUDA tensors. Every collective waits up to the group's timeout; a
 * peer that exited or stalled makes it throw a {@link TorchError} naming the
 * collective and the rank, never hang.
 * @module
 */
import { check, ctx, lastError, shim, TorchError } from "./lib.ts";
import { isFloating } from "./dtype.ts";
import { handles } from "./handle.ts";
import { type Tensor, wrap } from "./tensor.ts";

/** A c10d backend: Gloo (CPU tensors) or NCCL (CUDA tensors). */
export type DistBackend = "gloo" | "nccl";
/** How all-reduce combines the ranks' tensors ("avg" is the sum divided by the world size). */
export type ReduceOp = "sum" | "avg" | "max" | "min";

const REDUCE_OPS: Record<ReduceOp, number> = { sum: 0, avg: 1, max: 2, min: 3 };

/** The backends the loaded shim was built with. */
export function distBackends(): DistBackend[] {
  const bits = shim().mt_dist_backends();
  return [...(bits & 1 ? ["gloo" as const] : []), ...(bits & 2 ? ["nccl" as const] : [])];
}

/** Where and how to join a process group. */
export interface ProcessGroupOptions {
  /** The backend: "gloo" for CPU tensors, "nccl" for CUDA tensors. */
  backend: DistBackend;
  /** The TCPStore's host (torchrun's MASTER_ADDR). */
  host: string;
  /** The TCPStore's port (MASTER_PORT). */
  port: number;
  /** Number of ranks (WORLD_SIZE). */
  worldSize: number;
  /** This process's rank (RANK). */
  rank: number;
  /**
   * How long rendezvous and each collective may wait, in milliseconds; a longer wait than 10^12 ms (about 31.7
   * years) is cut to that, the most c10d's clock arithmetic holds.
   */
  timeoutMs: number;
  /** Host the TCPStore here (default: rank 0 does); false joins an existing store (torchrun's agent store). */
  server?: boolean;
  /** Namespace of the group's keys in the store (default "moerl/"). */
  prefix?: string;
  /**
   * Address Gloo binds to (default: the loopback address when host is a loopback address, else
   * Gloo's choice from the hostname or $GLOO_SOCKET_IFNAME).
   */
  deviceHost?: string;
}

// The longest wait a group keeps, 10^12 ms (about 31.7 years): c10d adds a timeout to the clock in int64
// nanoseconds, so one past about 9.2·10^12 ms (2^63 ns) overflows and the rendezvous fails at once ("timed out
// after 10000000000s"), and past 2^63 ms the int64 argument itself wraps ("must be at least 1 ms"). A longer
// timeout means "keep waiting", so it is cut to this.
const MAX_TIMEOUT_MS = 1e12;

const cstr = (s: string): Uint8Array => new TextEncoder().encode(s + "\0");
const LOOPBACK = /^(127\.\d+\.\d+\.\d+|localhost|::1)$/;

/** A joined process group. Owns native resources: dispose it (or `using`). */
export class ProcessGroup {
  #ptr: Deno.PointerObject | null;
  /** This process's rank. */
  readonly rank: number;
  /** Number of ranks. */
  readonly size: number;
  /** The backend. */
  readonly backend: DistBackend;

  private constructor(ptr: Deno.PointerObject, o: ProcessGroupOptions) {
    this.#ptr = ptr;
    this.rank = o.rank;
    this.size = o.worldSize;
    this.backend = o.backend;
  }

  /**
   * Joins a group: blocks until all worldSize ranks have joined (or the timeout passes).
   * @throws {TorchError} when rendezvous fails or times out, or the backend is not built in (the
   *   message says how to get it)
   */
  static init(o: ProcessGroupOptions): ProcessGroup {
    const p = shim().mt_dist_init(
      ctx(),
      cstr(o.backend),
      cstr(o.host),
      o.port,
      o.worldSize,
      o.rank,
      BigInt(Math.min(MAX_TIMEOUT_MS, Math.max(1, Math.round(o.timeoutMs)))),
      (o.server ?? o.rank === 0) ? 1 : 0,
      cstr(o.prefix ?? "moerl/"),
      cstr(o.deviceHost ?? (LOOPBACK.test(o.host) ? "127.0.0.1" : "")),
    );
    if (p === null) {
      throw new TorchError(
        `process group (${o.backend}, rank ${o.rank} of ${o.worldSize}, ${o.host}:${o.port})`,
        [],
        lastError(),
      );
    }
    return new ProcessGroup(p, o);
  }

  get #handle(): Deno.PointerObject {
    if (this.#ptr === null) throw new Error("moerl: process group used after dispose()");
    return this.#ptr;
  }

  /**
   * Reduces each tensor over the ranks, in place (each on its own; flatten them first for one call).
   * @throws {TypeError} for "avg" over a tensor that is not floating-point, before any rank's values change
   */
  allReduce(tensors: readonly Tensor[], op: ReduceOp = "sum"): void {
    if (tensors.length === 0) return;
    if (op === "avg") {
      // The shim sums, then divides in place: an integer tensor would fail the division holding the sum.
      const i = tensors.findIndex((t) => !isFloating(t.dtype));
      if (i >= 0) {
        throw new TypeError(
          `all_reduce: "avg" divides in place, so it needs floating-point tensors; tensor ${i} of ${tensors.length} ` +
            `is ${tensors[i]!.dtype} (reduce it with "sum" and divide)`,
        );
      }
    }
    const status = shim().mt_dist_allreduce(
      ctx(),
      this.#handle,
      handles(tensors),
      tensors.length,
      REDUCE_OPS[op],
    );
    check(status, "all_reduce", () => tensors.map((t) => t.shape));
  }

  /** Gives every tensor root's values, in place. */
  broadcast(tensors: readonly Tensor[], root = 0): void {
    if (tensors.length === 0) return;
    const status = shim().mt_dist_broadcast(ctx(), this.#handle, handles(tensors), tensors.length, root);
    check(status, "broadcast", () => tensors.map((t) => t.shape));
  }

  /** Every rank's t (same shape on all ranks), stacked in rank order: [size, ...t.shape]. */
  allGather(t: Tensor): Tensor {
    return wrap("all_gather", shim().mt_dist_allgather(ctx(), this.#handle, t.ptr), t);
  }

  /** Waits until every rank has reached it. */
  barrier(): void {
    check(shim().mt_dist_barrier(ctx(), this.#handle), "barrier", () => []);
  }

  /** Leaves the group. Idempotent. */
  dispose(): void {
    if (this.#ptr !== null) shim().mt_dist_free(this.#ptr);
    this.#ptr = null;
  }

  /** Leaves the group at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}
