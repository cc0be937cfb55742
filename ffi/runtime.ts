/**
 * Process-wide state: libtorch's seeding, random generators, grad mode and CUDA, and a watch on the parent
 * process.
 * @module
 */
import { envVar } from "./env.ts";
import { type Device, deviceCode } from "./dtype.ts";
import { check, ctx, lastError, shim, TorchError } from "./lib.ts";

/**
 * A seed as the uint64 the shim takes, refusing what it cannot hold (the FFI would wrap 2^64 + 5 to 5): as
 * PyTorch, any integer from -2^63 to 2^64 - 1, a negative one standing for its two's complement.
 */
function seed64(seed: number | bigint, op: string): bigint {
  if (typeof seed === "number" && !Number.isSafeInteger(seed)) {
    throw new RangeError(`${op}: the seed must be an integer within ±2^53, got ${seed}`);
  }
  const s = BigInt(seed);
  if (s < -(2n ** 63n) || s >= 2n ** 64n) {
    throw new RangeError(`${op}: the seed must fit 64 bits (-2^63 to 2^64 - 1), got ${s}`);
  }
  return s;
}

/**
 * Seeds libtorch's default generators (CPU and every CUDA device).
 * @throws {RangeError} for a seed that is not an integer from -2^63 to 2^64 - 1
 */
export function manualSeed(seed: number | bigint): void {
  check(shim().mt_manual_seed(ctx(), seed64(seed, "manualSeed")), "manual_seed", () => []);
}

/**
 * Ends this process (status 1, after writing message to stderr) once its parent is gone, checked every
 * intervalMs on a native thread, so also while JavaScript waits in a blocking call such as a rendezvous or a
 * collective, where no timer could run.
 * @param parent the parent's pid now (`Deno.ppid`); an orphan's parent changes to a reaper
 * @param message what to say when it ends the process (a newline is added)
 */
export function exitWithParent(parent: number, message: string, intervalMs = 1000): void {
  if (!Number.isSafeInteger(parent) || parent < 1) {
    throw new RangeError(`exitWithParent: parent must be a pid (an integer >= 1), got ${parent}`);
  }
  if (!Number.isSafeInteger(intervalMs) || intervalMs < 1 || intervalMs > 2 ** 31 - 1) {
    throw new RangeError(`exitWithParent: intervalMs must be an integer >= 1, got ${intervalMs}`);
  }
  const text = new TextEncoder().encode(message + "\n\0");
  check(shim().mt_exit_with_parent(ctx(), parent, text, intervalMs), "exit_with_parent", () => []);
}

/** libtorch's intra-op thread count (CPU kernels). */
export function numThreads(): number {
  return shim().mt_get_num_threads();
}

/** Sets libtorch's intra-op thread count. */
export function setNumThreads(n: number): void {
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new RangeError(`setNumThreads: expected an integer >= 1, got ${n}`);
  }
  check(shim().mt_set_num_threads(ctx(), n), "set_num_threads", () => []);
}

/**
 * Gives libtorch the CPU cores a user has, as PyTorch does: OMP_NUM_THREADS
 * when set, else every logical CPU this process may run on (Debian's
 * libtorch alone would take the physical cores, 1 on a 2-vCPU machine),
 * split evenly among `processes` processes sharing the machine (at least one
 * each). Returns the count in force.
 */
export function useAvailableCores(processes = 1): number {
  const env = Number(envVar("OMP_NUM_THREADS") ?? "");
  const share = Math.max(1, Math.floor(navigator.hardwareConcurrency / Math.max(1, processes)));
  setNumThreads(Number.isSafeInteger(env) && env >= 1 ? env : share);
  return numThreads();
}

/** A seeded random generator of its own, for reproducible sampling. */
export class Generator {
  #ptr: Deno.PointerObject | null;
  /**
   * Creates a generator on device seeded with seed.
   * @throws {RangeError} for a seed that is not an integer from -2^63 to 2^64 - 1
   */
  constructor(seed: number | bigint, device: Device = "cpu") {
    const p = shim().mt_generator_new(ctx(), seed64(seed, "Generator"), deviceCode(device));
    if (p === null) throw new TorchError("generator", [], lastError());
    this.#ptr = p;
  }
  /** The native handle; throws if disposed. */
  get ptr(): Deno.PointerObject {
    if (this.#ptr === null) throw new Error("moerl: generator used after dispose()");
    return this.#ptr;
  }
  /** Frees the generator. Idempotent. */
  dispose(): void {
    if (this.#ptr !== null) shim().mt_generator_free(this.#ptr);
    this.#ptr = null;
  }
  /** Frees the generator at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Whether ops record autograd history (true by default). */
export function isGradEnabled(): boolean {
  return shim().mt_ctx_grad(ctx()) === 1;
}

/** Turns autograd recording on or off; returns the previous setting. */
export function setGradEnabled(enabled: boolean): boolean {
  const prev = isGradEnabled();
  shim().mt_ctx_set_grad(ctx(), enabled ? 1 : 0);
  return prev;
}

/**
 * Runs fn with autograd recording off (torch.no_grad), restoring the
 * previous mode afterwards, also on throw.
 */
export function noGrad<T>(fn: () => T): T {
  const prev = setGradEnabled(false);
  try {
    return fn();
  } finally {
    setGradEnabled(prev);
  }
}

/** CUDA runtime queries (see {@link cuda}). */
export interface CudaRuntime {
  /** True if libtorch sees a usable CUDA device. */
  isAvailable(): boolean;
  /** Number of CUDA devices. */
  deviceCount(): number;
  /** Waits until all queued work on device has finished. */
  synchronize(device?: Device): void;
  /** The caching allocator's byte counts for device. */
  memoryStats(device?: Device): CudaMemoryStats;
  /** Restarts peak tracking on device. */
  resetPeakMemoryStats(device?: Device): void;
}

/** CUDA runtime queries. */
export const cuda: CudaRuntime = {
  /** True if libtorch sees a usable CUDA device. */
  isAvailable(): boolean {
    return shim().mt_cuda_available() === 1;
  },
  /** Number of CUDA devices. */
  deviceCount(): number {
    return shim().mt_cuda_device_count();
  },
  /** Waits until all queued work on device has finished. */
  synchronize(device: Device = "cuda"): void {
    check(shim().mt_cuda_synchronize(ctx(), deviceCode(device)), "cuda_synchronize", () => []);
  },
  /** The caching allocator's byte counts for device. */
  memoryStats(device: Device = "cuda"): CudaMemoryStats {
    const out = new BigInt64Array(4);
    check(shim().mt_cuda_memory_stats(ctx(), deviceCode(device), out), "cuda_memory_stats", () => []);
    return {
      allocated: Number(out[0]),
      reserved: Number(out[1]),
      peakAllocated: Number(out[2]),
      peakReserved: Number(out[3]),
    };
  },
  /** Restarts peak tracking on device. */
  resetPeakMemoryStats(device: Device = "cuda"): void {
    check(shim().mt_cuda_reset_peak(ctx(), deviceCode(device)), "cuda_reset_peak", () => []);
  },
};

/** Bytes held by the CUDA caching allocator. */
export interface CudaMemoryStats {
  /** Bytes in live tensors. */
  allocated: number;
  /** Bytes reserved from the driver. */
  reserved: number;
  /** Highest `allocated` since the last reset. */
  peakAllocated: number;
  /** Highest `reserved` since the last reset. */
  peakReserved: number;
}
