/**
 * Deterministic lifetimes for native tensors: scopes that free what was made
 * inside them, `keep` to let one escape, and `dispose` for containers.
 *
 * Sync scopes (`tidy`) use a stack: a sync function cannot interleave with
 * other code. Async scopes (`tidyAsync`) use AsyncLocalStorage, so two scopes
 * awaiting at once each collect only their own tensors.
 * @module
 */
import { AsyncLocalStorage } from "node:async_hooks";

/** Marks objects that scopes track (tensors). */
export const TRACKED: unique symbol = Symbol("moerl.tracked");

/** Something a scope can free. */
export interface Tracked {
  /** Present on every tracked object. */
  readonly [TRACKED]: true;
  /** Excluded from every scope's cleanup (see {@link keep}). */
  kept: boolean;
  /** True once freed. */
  readonly disposed: boolean;
  /** Frees the native resource; idempotent. */
  dispose(): void;
}

type Bag = Set<Tracked>;

const syncStack: Bag[] = [];
const asyncScopes = new AsyncLocalStorage<Bag>();
let asyncDepth = 0;

function currentBag(): Bag | undefined {
  if (syncStack.length > 0) return syncStack[syncStack.length - 1];
  return asyncDepth > 0 ? asyncScopes.getStore() : undefined;
}

/** Adds a new tracked object to the innermost scope, if any. */
export function track(t: Tracked): void {
  currentBag()?.add(t);
}

function isTracked(x: unknown): x is Tracked {
  return typeof x === "object" && x !== null && (x as Tracked)[TRACKED] === true;
}

/** Every tracked object reachable from value through arrays, Maps (keys and values), Sets and plain objects. */
function reachable(value: unknown, out = new Set<Tracked>(), depth = 0): Set<Tracked> {
  if (depth > 8 || typeof value !== "object" || value === null) return out;
  if (isTracked(value)) {
    out.add(value);
  } else if (Array.isArray(value) || value instanceof Set) {
    for (const v of value) reachable(v, out, depth + 1);
  } else if (value instanceof Map) {
    for (const [k, v] of value) {
      reachable(k, out, depth + 1);
      reachable(v, out, depth + 1);
    }
  } else if (Object.getPrototypeOf(value) === Object.prototype || Object.getPrototypeOf(value) === null) {
    for (const v of Object.values(value)) reachable(v, out, depth + 1);
  }
  return out;
}

function release(bag: Bag, result: unknown, parent: Bag | undefined): void {
  const escaping = reachable(result);
  for (const t of bag) {
    if (t.kept || t.disposed) continue;
    if (escaping.has(t)) parent?.add(t);
    else t.dispose();
  }
  bag.clear();
}

/**
 * Runs fn and frees every tensor created during it, except those it returns
 * (in arrays, Maps, Sets or plain objects) and those passed to {@link keep}.
 * Returned tensors move to the enclosing scope.
 * @throws {TypeError} if fn returns a Promise (use {@link tidyAsync}).
 * @example
 * ```ts ignore
 * const y = tidy(() => x.mul(2).add(1)); // the x.mul(2) temporary is freed
 * ```
 */
export function tidy<T>(fn: () => T): T {
  const bag: Bag = new Set();
  syncStack.push(bag);
  let result: T | undefined;
  try {
    result = fn();
    if (result instanceof Promise) {
      throw new TypeError("tidy: fn returned a Promise; use tidyAsync for async work");
    }
    return result;
  } finally {
    syncStack.pop();
    release(bag, result, currentBag());
  }
}

/**
 * The async form of {@link tidy}: frees every tensor created by fn, across
 * its awaits, except those returned or kept. Concurrent scopes stay separate.
 */
export async function tidyAsync<T>(fn: () => Promise<T>): Promise<T> {
  // The parent is the enclosing async scope: an enclosing sync tidy ends
  // before this promise settles, so it cannot receive the results.
  const parent = asyncDepth > 0 ? asyncScopes.getStore() : undefined;
  const bag: Bag = new Set();
  asyncDepth++;
  let result: T | undefined;
  // Until its first await fn runs synchronously, possibly inside a sync
  // tidy: hide that tidy's stack so fn's tensors land in this scope's bag.
  const outerSync = syncStack.splice(0);
  let pending: Promise<T>;
  try {
    pending = asyncScopes.run(bag, fn);
  } catch (e) { // thrown before fn's first await: no promise to wait for
    pending = Promise.reject(e);
  } finally {
    syncStack.push(...outerSync);
  }
  try {
    result = await pending;
    return result;
  } finally {
    asyncDepth--;
    release(bag, result, parent);
  }
}

/** Excludes t from cleanup by every scope; the caller must dispose it. */
export function keep<T extends Tracked>(t: T): T {
  t.kept = true;
  return t;
}

/** Disposes every tensor reachable from value (a tensor, array, Map, Set or plain object). */
export function dispose(value: unknown): void {
  for (const t of reachable(value)) t.dispose();
}
