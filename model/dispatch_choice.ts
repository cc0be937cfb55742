/**
 * Choosing the MoE dispatch of decode steps by measurement. Which mode is
 * fastest depends on the batch (tokens per step), the expert count and
 * top-k, the device and the libtorch: "dense" does E/k times the work but
 * never waits on the host, "loop" does only the routed work but reads the
 * routing back every layer, "grouped" needs grouped GEMM. So rather than
 * guess, time each mode on the model's own first MoE layer at the batch's
 * size, and remember the winner per (decoder, rows).
 * @module
 */
import { cuda, type Device, type DType, noGrad, randn, tidy } from "../ffi/mod.ts";
import type { Decoder } from "./decoder.ts";
import { dispatch, type MoeDispatch } from "./moe.ts";

const chosen = new WeakMap<Decoder, Map<string, MoeDispatch>>();

/**
 * Whether a grouped GEMM on device in dtype can be recorded in a CUDA graph. libtorch's CUDA `_grouped_mm`
 * (2.8 to 2.15) runs on the device only for bfloat16 (on sm90/sm100 GPUs); otherwise it falls back to a loop
 * that copies the group offsets to the host, which a capture refuses. Off CUDA nothing is captured.
 */
export function groupedCapturable(device: Device, dtype: DType): boolean {
  return !device.startsWith("cuda") || dtype === "bfloat16";
}

/** What {@link measureDispatch} timed: seconds per call of each mode it tried, and the fastest. */
export interface DispatchMeasurement {
  /** The fastest mode. */
  best: MoeDispatch;
  /** Median seconds per MoE-layer call, per mode tried. */
  seconds: Partial<Record<MoeDispatch, number>>;
}

/** Options of {@link measureDispatch}. */
export interface MeasureOptions {
  /** Timed calls per mode, after a warm-up (default 5; the median counts). */
  reps?: number;
  /** Only modes that never wait on the host (not "loop"), e.g. for steps captured as CUDA graphs. */
  syncFree?: boolean;
}

/**
 * Times one MoE layer's dispatch (router included) on `rows` random tokens
 * for every mode the experts support, and returns the fastest; a model
 * without MoE layers gets "dense" (unused).
 */
export function measureDispatch(
  decoder: Decoder,
  rows: number,
  opts: MeasureOptions = {},
): DispatchMeasurement {
  const reps = opts.reps ?? 5;
  const layer = decoder.layers.find((l) => l.mlp.kind === "moe");
  if (!layer || layer.mlp.kind !== "moe") return { best: "dense", seconds: {} };
  const mlp = layer.mlp, device = decoder.embed.device;
  const modes: MoeDispatch[] = [
    "dense",
    ...(opts.syncFree ? [] : ["loop" as const]),
    ...(mlp.experts.groupable && (!opts.syncFree || groupedCapturable(device, decoder.embed.dtype))
      ? ["grouped" as const]
      : []),
  ];
  const sync = (): void => device.startsWith("cuda") ? cuda.synchronize(device) : undefined;
  const seconds: Partial<Record<MoeDispatch, number>> = {};
  noGrad(() =>
    tidy(() => {
      const x = randn([rows, decoder.embed.size(1)], { device }).to(decoder.embed.dtype);
      for (const mode of modes) {
        const once = (): number => {
          sync();
          const t0 = performance.now();
          tidy(() => dispatch(x, mlp.route(x, mlp.router), mlp.experts, mode));
          sync();
          return (performance.now() - t0) / 1000;
        };
        once(); // warm-up: kernels, allocator
        const times = Array.from({ length: reps }, once).sort((a, b) => a - b);
        seconds[mode] = times[Math.floor(reps / 2)]!;
      }
    })
  );
  const best = modes.reduce((a, b) => (seconds[b]! < seconds[a]! ? b : a));
  return { best, seconds };
}

/** The measured decode dispatch for `rows` tokens per step, measured once per decoder, size and options. */
export function decodeDispatch(
  decoder: Decoder,
  rows: number,
  opts: { syncFree?: boolean } = {},
): MoeDispatch {
  let sizes = chosen.get(decoder);
  if (!sizes) chosen.set(decoder, sizes = new Map());
  const key = `${rows}${opts.syncFree ? ":sync-free" : ""}`;
  let mode = sizes.get(key);
  if (!mode) sizes.set(key, mode = measureDispatch(decoder, rows, opts).best);
  return mode;
}
