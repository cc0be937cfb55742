/**
 * Finding, loading and talking to the native shim. Loading is lazy: importing
 * moerl never touches the library until the first tensor op.
 * @module
 */
import { fileURLToPath } from "node:url";
import { type ShimLibrary, symbols } from "./symbols.ts";
import { envVar } from "./env.ts";

/** The ABI version this TypeScript expects from the shim (mt_abi_version). */
const ABI_VERSION = 10;

/** An error raised by libtorch (or by the shim's argument checks). */
export class TorchError extends Error {
  /** The op that failed, e.g. "matmul". */
  readonly op: string;
  /** Shapes of the tensor inputs, in argument order. */
  readonly shapes: readonly (readonly number[])[];
  /**
   * Builds the message `op([shape], ...): detail`.
   * @param op The op that failed.
   * @param shapes Shapes of the tensor inputs.
   * @param detail libtorch's message.
   */
  constructor(op: string, shapes: readonly (readonly number[])[], detail: string) {
    const args = shapes.map((s) => `[${s.join(", ")}]`).join(", ");
    super(`${op}(${args}): ${detail}`);
    this.name = "TorchError";
    this.op = op;
    this.shapes = shapes;
  }

  /** Whether an allocation failed: CUDA's "out of memory", or the CPU allocator's "can't allocate memory". */
  get outOfMemory(): boolean {
    return /out of memory|can't allocate memory/i.test(this.message);
  }
}

interface Loaded {
  lib: ShimLibrary;
  ctx: Deno.PointerObject;
  path: string;
}

let loaded: Loaded | undefined;

/** Paths to try, in order: $MOERL_LIB, then the build's ffi/build/current.json; and why the build's is not. */
function candidates(): { paths: { path: string; from: string }[]; noBuild: string | null } {
  const paths: { path: string; from: string }[] = [];
  const env = envVar("MOERL_LIB");
  if (env) paths.push({ path: env, from: "$MOERL_LIB" });
  const url = new URL("./build/current.json", import.meta.url);
  if (url.protocol !== "file:") return { paths, noBuild: `no local build beside ${url.href}` };
  const manifest = fileURLToPath(url);
  try {
    const info = JSON.parse(Deno.readTextFileSync(manifest)) as { lib?: unknown };
    if (typeof info.lib !== "string") return { paths, noBuild: `${manifest} names no library` };
    paths.push({ path: info.lib, from: manifest });
    return { paths, noBuild: null };
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "not built yet" : (e as Error).message;
    return { paths, noBuild: `${manifest}: ${why}` };
  }
}

/**
 * glibc's malloc returns freed blocks above its trim threshold to the kernel, and serves large blocks with
 * mmap/munmap: libtorch's CPU tensors (posix_memalign) of a few MB are then freshly page-faulted on every
 * allocation. Raising both thresholds keeps freed memory in the process for the next tensor of that size.
 * Only on Linux, with the whole environment and FFI granted (so that the user's settings can be seen, and no
 * permission is asked for), and where the user set none of MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
 * GLIBC_TUNABLES; MOERL_MALLOC_TUNE=off skips it.
 */
function tuneHostAllocator(): void {
  if (Deno.build.os !== "linux") return;
  const granted = (name: "env" | "ffi"): boolean => Deno.permissions.querySync({ name }).state === "granted";
  if (!granted("env") || !granted("ffi") || envVar("MOERL_MALLOC_TUNE") === "off") return;
  if (envVar("GLIBC_TUNABLES") || envVar("MALLOC_TRIM_THRESHOLD_") || envVar("MALLOC_MMAP_THRESHOLD_")) {
    return;
  }
  let libc;
  try {
    libc = Deno.dlopen("libc.so.6", { mallopt: { parameters: ["i32", "i32"], result: "i32" } });
  } catch {
    return; // not glibc (musl): leave the allocator as it is
  }
  try {
    const M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3;
    // 32 MiB, the most any glibc accepts (older ones refuse more): larger blocks still come from mmap. Only
    // if it took: a fixed trim threshold alone would also freeze glibc's adaptive mmap threshold at 128 KiB.
    if (libc.symbols.mallopt(M_MMAP_THRESHOLD, 32 << 20) === 1) {
      libc.symbols.mallopt(M_TRIM_THRESHOLD, 0x7fffffff);
    }
  } finally {
    libc.close();
  }
}

function load(): Loaded {
  tuneHostAllocator();
  const tried: string[] = [];
  const { paths, noBuild } = candidates();
  for (const { path, from } of paths) {
    try {
      const lib = Deno.dlopen(path, symbols);
      const abi = lib.symbols.mt_abi_version();
      if (abi === ABI_VERSION) {
        const ctx = lib.symbols.mt_ctx_new();
        if (ctx === null) throw new Error("mt_ctx_new returned null");
        return { lib, ctx, path };
      }
      lib.close();
      tried.push(`${path} (${from}): ABI ${abi}, expected ${ABI_VERSION}; rebuild`);
    } catch (e) {
      tried.push(`${path} (${from}): ${(e as Error).message.replace(/^(Could not open library: )+/, "")}`);
    }
    // A library named by $MOERL_LIB is the one asked for: falling back to another build would hide the mistake.
    if (from === "$MOERL_LIB") break;
  }
  throw new Error(
    "moerl: cannot load the libtorch shim.\n" +
      (tried.length ? `Tried:\n  ${tried.join("\n  ")}\n` : "") +
      (noBuild && !envVar("MOERL_LIB") ? `No build: ${noBuild}.\n` : "") +
      "Fix: run `deno task build` (or scripts/setup.sh), or set MOERL_LIB to a built libmoerl .so.",
  );
}

/** The loaded shim's symbols, loading it on first use. */
export function shim(): ShimLibrary["symbols"] {
  return (loaded ??= load()).lib.symbols;
}

/** The shim's error/grad context for calls made from this thread. */
export function ctx(): Deno.PointerObject {
  return (loaded ??= load()).ctx;
}

/** Path of the loaded shim library. */
export function libraryPath(): string {
  return (loaded ??= load()).path;
}

/** The message of the last failure on the shared context. */
export function lastError(): string {
  const p = shim().mt_ctx_message(ctx());
  return p === null ? "" : Deno.UnsafePointerView.getCString(p);
}

/** Throws a TorchError for op if status is negative. */
export function check(status: number, op: string, shapes: () => (readonly number[])[]): void {
  if (status < 0) throw new TorchError(op, shapes(), lastError());
}

/** The libtorch version the shim was built against, e.g. "1.13.0". */
export function torchVersion(): string {
  const p = shim().mt_torch_version();
  return p === null ? "" : Deno.UnsafePointerView.getCString(p);
}

/** Number of native tensor handles alive in the shim. */
export function nativeLiveCount(): number {
  return Number(shim().mt_live_count());
}
