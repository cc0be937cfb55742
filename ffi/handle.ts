/**
 * Ownership of one native tensor handle: counting, scope tracking, the
 * finalizer backstop, and the helpers every op uses to cross the ABI.
 * @module
 */
import { envVar } from "./env.ts";
import { ctx, lastError, shim, TorchError } from "./lib.ts";
import { track, TRACKED, type Tracked } from "./scope.ts";

let live = 0;

/** Leak warnings: "off", "on" (default), or "stack" to record creation sites. */
let leakMode: "off" | "on" | "stack" = (() => {
  const v = envVar("MOERL_LEAK_CHECK");
  return v === "0" || v === "off" ? "off" : v === "stack" ? "stack" : "on";
})();

interface Held {
  ptr: Deno.PointerObject;
  site?: string;
}

// A backstop only: a handle reaching the GC undisposed is a bug in the
// caller. We warn, then free it so the process does not leak forever.
const finalizer = new FinalizationRegistry<Held>((held) => {
  const where = held.site ? `\n  created at:\n${held.site}` : " (set MOERL_LEAK_CHECK=stack to see where)";
  console.warn(`moerl: a tensor was garbage-collected without dispose()${where}`);
  shim().mt_free(held.ptr);
  live--;
});

/** Sets how leaked (GC'd, undisposed) tensors are reported. */
export function setLeakCheck(mode: "off" | "on" | "stack"): void {
  leakMode = mode;
}

/** Number of tensors created and not yet disposed. */
export function liveTensors(): number {
  return live;
}

/** Base of Tensor: owns one native handle and frees it exactly once. */
export class Handle implements Tracked {
  /** Marks this object for scopes. */
  readonly [TRACKED] = true as const;
  /** Set by `keep()`: no scope will free this handle. */
  kept = false;
  #ptr: Deno.PointerObject | null;

  /** Takes ownership of a handle returned by the shim. */
  constructor(ptr: Deno.PointerObject) {
    this.#ptr = ptr;
    live++;
    track(this);
    if (leakMode !== "off") {
      const held: Held = { ptr };
      if (leakMode === "stack") held.site = new Error().stack?.split("\n").slice(2).join("\n");
      finalizer.register(this, held, this);
    }
  }

  /** The native handle; throws if disposed. */
  get ptr(): Deno.PointerObject {
    if (this.#ptr === null) throw new Error("moerl: tensor used after dispose()");
    return this.#ptr;
  }

  /** True once the handle is freed. */
  get disposed(): boolean {
    return this.#ptr === null;
  }

  /** Frees the native handle now. Idempotent. */
  dispose(): void {
    if (this.#ptr === null) return;
    finalizer.unregister(this);
    shim().mt_free(this.#ptr);
    this.#ptr = null;
    live--;
  }

  /** Frees the handle at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Reusable int64 scratch for shapes and dims (the shim copies before returning). */
const scratch = new BigInt64Array(64);

/** Writes integer list xs into a fresh or scratch int64 buffer. */
export function i64(xs: readonly number[], op: string): BigInt64Array {
  const buf = xs.length <= scratch.length ? scratch : new BigInt64Array(xs.length);
  for (let i = 0; i < xs.length; i++) {
    const v = xs[i];
    if (!Number.isSafeInteger(v)) {
      throw new TypeError(`${op}: expected integers (within ±2^53), got ${xs.join(", ")}`);
    }
    buf[i] = BigInt(v as number);
  }
  return buf;
}

/**
 * One integer argument as int64 (a dim, an index, a length).
 * @throws {RangeError} for a value that is not a safe integer (int64 would wrap it or reject it unclearly)
 */
export function int64(v: number, op: string): bigint {
  if (!Number.isSafeInteger(v)) throw new RangeError(`${op}: expected an integer within ±2^53, got ${v}`);
  return BigInt(v);
}

/** An array of handle addresses, for ops taking a tensor list. */
export function handles(ts: readonly Handle[]): BigUint64Array {
  const buf = new BigUint64Array(ts.length);
  for (let i = 0; i < ts.length; i++) buf[i] = BigInt(Deno.UnsafePointer.value(ts[i]!.ptr));
  return buf;
}

/** Two handles written by the shim into an out array. */
export const pair = new BigUint64Array(2);

/** The handle at out[i], or throws. */
export function outPtr(out: BigUint64Array, i: number): Deno.PointerObject {
  const p = Deno.UnsafePointer.create(out[i]!);
  if (p === null) throw new Error("moerl: shim returned a null handle");
  return p;
}

/** The shim's shared call context. */
export function c(): Deno.PointerObject {
  return ctx();
}

/** Throws the shim's last error as a TorchError for op with the given inputs. */
export function fail(op: string, inputs: readonly { shapeForMessage(): number[] }[]): never {
  throw new TorchError(op, inputs.map((t) => t.shapeForMessage()), lastError());
}
