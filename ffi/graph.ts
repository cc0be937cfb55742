/**
 * CUDA graphs: record the kernels a TypeScript function issues once, then
 * rerun them all with one FFI call. A GPU decode step is hundreds of small
 * kernels, each costing an FFI call and a launch from the host; replaying a
 * graph costs one.
 *
 * The function works on static tensors: inputs are written in place before a
 * replay and outputs copied into tensors made before the capture, because a
 * replay reruns the same kernels on the same addresses. Where graphs are not
 * available (a CPU device, or a shim built without CUDA headers) a
 * {@link CudaGraph} runs the function eagerly on every replay instead, so the
 * caller's code is the same on every device.
 * @module
 */
import { type Device, deviceCode } from "./dtype.ts";
import { check, ctx, lastError, shim, TorchError } from "./lib.ts";
import { tidy } from "./scope.ts";
import { hostReadCount, hostUploadCount } from "./tensor.ts";

/** Whether the loaded shim was compiled with CUDA graph support (a CUDA libtorch with its headers). */
export function cudaGraphsSupported(): boolean {
  return shim().mt_graph_supported() === 1;
}

/** How many CudaGraph functions are running (warm-up, capture or eager replay): 0 or 1 unless they nest. */
let inside = 0;

/**
 * Whether a {@link CudaGraph}'s function is running now (its warm-up, capture, or an eager replay). Such a
 * function must not reuse tensors it did not get from its caller, as a cache would hand it: a recording
 * keeps reading the very tensor it was recorded with, even after the cache has replaced it.
 */
export function inGraphFunction(): boolean {
  return inside > 0;
}

/** fn, with {@link inGraphFunction} true while it runs. */
function asGraphFunction(fn: () => unknown): () => void {
  return () => {
    inside++;
    try {
      fn();
    } finally {
      inside--;
    }
  };
}

/** Number of native CUDA graphs created and not yet disposed (0 where graphs are unsupported). */
export function liveGraphs(): number {
  return Number(shim().mt_graph_live_count());
}

/** A memory pool id that several graphs capture into (see {@link graphPool}). */
export interface GraphPool {
  /** The pool id's two halves, as libtorch's graph_pool_handle gives them. */
  readonly id: BigInt64Array;
}

/**
 * A new pool for graphs that share memory: graphs replayed one at a time,
 * whose temporaries are all freed inside the capture, can share one pool and
 * so need the memory of the largest rather than of all. Null where graphs are
 * unsupported.
 */
export function graphPool(): GraphPool | null {
  if (!cudaGraphsSupported()) return null;
  const id = new BigInt64Array(2);
  check(shim().mt_graph_pool_handle(ctx(), id), "graph_pool_handle", () => []);
  return { id };
}

/** Options of {@link CudaGraph}. */
export interface CudaGraphOptions {
  /** Capture into this shared pool (default: a pool of the graph's own). */
  pool?: GraphPool | null;
  /** Run eagerly even where graphs are available (for comparisons and debugging). */
  eager?: boolean;
}

/**
 * One recorded function. `capture(fn)` records fn without running it;
 * `replay()` runs the recording. Eager mode (CPU, no CUDA build, or
 * `eager: true`) keeps fn and calls it on every replay.
 *
 * Rules for fn under capture: no host synchronisation (`item`, `tolist`,
 * `toArray`, copies to the CPU, tensors made from JS data), no sampling with
 * a {@link Generator} of one's own, and nothing it creates may outlive it:
 * results go into tensors made before the capture (`copy_`, `indexCopy_`).
 * fn runs inside `tidy`, so everything it creates (what it returns too) is freed before the capture
 * ends; tensors made before it are left alone. The first two rules are checked (by
 * {@link hostReadCount} and {@link hostUploadCount}): a capture that broke one fails, and so does a
 * replay of the eager stand-in for a graph (CPU, no CUDA build), so that CPU tests catch code that a
 * GPU could not record. `eager: true` opts out of the checks.
 * @example
 * ```ts ignore
 * const x = zeros([8], { device: "cuda" }), y = zeros([8], { device: "cuda" });
 * using g = new CudaGraph("cuda");
 * const step = () => y.copy_(x.mul(2).add(1));
 * g.warmup(step);
 * g.capture(step);
 * x.fill_(3);
 * g.replay(); // y is now 7 everywhere
 * ```
 */
export class CudaGraph {
  /** The device the recorded work runs on. */
  readonly device: Device;
  /** "graph": recorded with CUDA graphs; "eager": fn is called on each replay. */
  readonly mode: "graph" | "eager";
  readonly #pool: GraphPool | null;
  /** Standing in for a graph (not asked to be eager): replays keep the capture rules. */
  readonly #standIn: boolean;
  #ptr: Deno.PointerObject | null = null;
  #fn: (() => unknown) | null = null;
  #disposed = false;

  /** A graph for work on device; eager where graphs are unavailable. */
  constructor(device: Device, opts: CudaGraphOptions = {}) {
    this.device = device;
    const graphs = !opts.eager && device !== "cpu" && cudaGraphsSupported();
    this.mode = graphs ? "graph" : "eager";
    this.#pool = graphs ? opts.pool ?? null : null;
    this.#standIn = !graphs && !opts.eager;
    if (graphs) {
      const p = shim().mt_graph_new(ctx(), deviceCode(device));
      if (p === null) throw new TorchError("graph_new", [], lastError());
      this.#ptr = p;
    }
  }

  /** True once a capture succeeded (eager mode: once a function is held). */
  get captured(): boolean {
    return this.#fn !== null;
  }

  /**
   * Runs fn once, for real, on the stream the capture will use: lazy
   * initialisation (cuBLAS workspaces, kernel loading) must happen before a
   * capture, not inside it. Eager mode just runs fn.
   */
  warmup(fn: () => unknown): void {
    this.#live();
    if (this.mode === "eager") return void tidy(asGraphFunction(fn));
    this.#around(0, fn);
  }

  /**
   * Records fn (without running it) for later replays.
   * @throws {TorchError} when the capture fails, e.g. fn synchronised with the host or made a tensor from
   * JS data; the graph stays empty
   */
  capture(fn: () => unknown): void {
    this.#live();
    if (this.#fn) throw new Error("CudaGraph.capture: already captured (reset() first)");
    if (this.mode === "graph") {
      const broken = brokenRules(() => this.#around(1, fn));
      if (broken) {
        check(shim().mt_graph_reset(ctx(), this.#ptr!), "graph_reset", () => []);
        throw new TorchError("graph_capture", [], `the captured function ${broken}`);
      }
    }
    this.#fn = fn;
  }

  /**
   * Runs the recorded work (eager mode: calls fn).
   * @throws {Error} when the eager stand-in for a graph broke a capture rule (see {@link CudaGraph})
   */
  replay(): void {
    this.#live();
    const fn = this.#fn;
    if (!fn) throw new Error("CudaGraph.replay: nothing captured");
    if (this.mode === "graph") {
      return void check(shim().mt_graph_replay(ctx(), this.#ptr!), "graph_replay", () => []);
    }
    const broken = brokenRules(() => tidy(asGraphFunction(fn)));
    if (broken && this.#standIn) {
      throw new Error(
        `CudaGraph: the recorded function ${broken}, which a CUDA graph cannot record ` +
          "(a read fails the capture; an upload would replay stale host memory). Keep such work outside " +
          "the function, or make the graph with { eager: true }.",
      );
    }
  }

  /** Drops the recording; the graph can capture again. */
  reset(): void {
    this.#live();
    if (this.mode === "graph" && this.#fn) {
      check(shim().mt_graph_reset(ctx(), this.#ptr!), "graph_reset", () => []);
    }
    this.#fn = null;
  }

  /** Frees the graph and its hold on the memory pool. Idempotent. */
  dispose(): void {
    if (this.#ptr !== null) shim().mt_graph_free(this.#ptr);
    this.#ptr = null;
    this.#fn = null;
    this.#disposed = true;
  }

  /** Frees the graph at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  #live(): void {
    if (this.#disposed) throw new Error("moerl: CudaGraph used after dispose()");
  }

  /** begin, fn in a scope, end: end always runs, and fn's own error wins over end's. */
  #around(capture: 0 | 1, fn: () => unknown): void {
    const op = capture ? "graph_capture" : "graph_warmup";
    check(shim().mt_graph_begin(ctx(), this.#ptr!, capture, this.#pool?.id ?? null), op, () => []);
    try {
      tidy(asGraphFunction(fn));
    } catch (e) {
      // fn's error wins; a capture it cut short may still have ended cleanly: drop what it recorded.
      if (shim().mt_graph_end(ctx(), this.#ptr!) === 0 && capture) shim().mt_graph_reset(ctx(), this.#ptr!);
      throw e;
    }
    check(shim().mt_graph_end(ctx(), this.#ptr!), op, () => []);
  }
}

/** Runs fn; says which capture rules it broke (reads back to the host, tensors from JS data), or null. */
function brokenRules(fn: () => void): string | null {
  const reads = hostReadCount(), uploads = hostUploadCount();
  fn();
  const r = hostReadCount() - reads, u = hostUploadCount() - uploads;
  const broken = [
    r ? `read ${r} value${r > 1 ? "s" : ""} back to the host` : "",
    u ? `made ${u} tensor${u > 1 ? "s" : ""} from JS data` : "",
  ].filter(Boolean);
  return broken.length ? broken.join(" and ") : null;
}
