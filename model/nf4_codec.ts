/**
 * The NF4 codec of bitsandbytes (QLoRA's 4-bit NormalFloat), in Tensor ops
 * on the weight's own device: blocks of 64 values share a float32 absmax,
 * each value becomes the index of the nearest of 16 normal-quantile codes,
 * two indices per byte, the first in the high nibble. Double quantisation
 * (bnb `compress_statistics`) stores the absmax minus its mean as 8-bit
 * codes of bnb's signed dynamic map, in blocks of 256 with their own float32
 * absmax. Layouts and rounding follow bnb's reference path (see
 * {@link quantizeNf4}).
 * @module
 */
import {
  cat,
  type Device,
  type DType,
  embedding,
  fromTypedArray,
  isFloating,
  keep,
  nf4Linear,
  type Tensor,
  tidy,
  zeros,
} from "../ffi/mod.ts";

// deno-fmt-ignore
/** The 16 NF4 code values (bnb `create_normal_map(0.9677083, use_extra_value=True)`), as float32. */
export const NF4_CODE: Float32Array = Float32Array.of(
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
  0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
);

// Positive half of bnb's create_dynamic_map(signed=True) (float32, shortest repr).
// deno-fmt-ignore
const DYN_POS = [
  5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
  0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501,
  0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503,
  0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875,
  0.01140625, 0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375,
  0.03390625, 0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375,
  0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375,
  0.07890625, 0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375,
  0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874,
  0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873,
  0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874,
  0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
  0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375,
  0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124, 0.79609376, 0.8101562,
  0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876,
  0.9507812, 0.96484375, 0.9789063, 0.99296874,
];

/** bnb's 8-bit signed dynamic map (`create_dynamic_map(signed=True)`), sorted, as float32. */
export const DYNAMIC_MAP: Float32Array = Float32Array.from([
  ...DYN_POS.map((v) => -v).reverse(),
  0,
  ...DYN_POS,
  1,
]);

/** NF4 block size (the only one supported; bnb's default). */
export const NF4_BLOCK = 64;
/** Block size of the double-quantised absmax (bnb's). */
export const DQ_BLOCK = 256;
/**
 * Values decoded per piece by {@link Nf4Weight.dequantize} (multiples of 64):
 * small on the CPU, where memory is what matters; large on a GPU, where each
 * piece costs kernel launches (a piece's temporaries are ≈ 10 bytes per value).
 */
const DEQUANT_CHUNK = { cpu: 1 << 21, gpu: 1 << 26 };

/** Midpoints between sorted codes, as torch computes (a + b) / 2 in float32. */
export function midpoints(code: Float32Array): Float32Array {
  return Float32Array.from({ length: code.length - 1 }, (_, i) => Math.fround(code[i]! + code[i + 1]!) / 2);
}

/**
 * The small constant tables the codec needs on one device (about 3 KB),
 * shared by reference count: every {@link Nf4Weight} holds one reference and
 * the tables are freed with the last one.
 */
export class Nf4Tables {
  /** The device they live on. */
  readonly device: Device;
  /** [256, 2] float32: the two NF4 values a packed byte decodes to (high nibble first). */
  readonly pairs: Tensor;
  /** [15] float32 midpoints between NF4 codes. */
  readonly nf4Mids: Tensor;
  /** [256, 1] float32: the dynamic map, for decoding 8-bit absmax codes. */
  readonly dynamic: Tensor;
  /** [255] float32 midpoints of the dynamic map. */
  readonly dynamicMids: Tensor;
  #refs = 1;

  private constructor(device: Device) {
    this.device = device;
    const pairs = new Float32Array(512);
    for (let b = 0; b < 256; b++) [pairs[2 * b], pairs[2 * b + 1]] = [NF4_CODE[b >> 4]!, NF4_CODE[b & 15]!];
    const put = (a: Float32Array, shape: number[]): Tensor => keep(fromTypedArray(a, shape, { device }));
    this.pairs = put(pairs, [256, 2]);
    this.nf4Mids = put(midpoints(NF4_CODE), [15]);
    this.dynamic = put(DYNAMIC_MAP, [256, 1]);
    this.dynamicMids = put(midpoints(DYNAMIC_MAP), [255]);
  }
  /** New tables on device, with one reference (the caller's). */
  static create(device: Device): Nf4Tables {
    return new Nf4Tables(device);
  }
  /** Adds a reference; returns this. */
  retain(): this {
    if (this.#refs <= 0) throw new Error("Nf4Tables: retain after the last release");
    this.#refs++;
    return this;
  }
  /** Drops a reference; the last one frees the tables. */
  release(): void {
    if (this.#refs <= 0) return;
    if (--this.#refs === 0) {
      [this.pairs, this.nf4Mids, this.dynamic, this.dynamicMids].forEach((t) => t.dispose());
    }
  }
  /** Bytes held. */
  bytes(): number {
    return (512 + 15 + 256 + 255) * 4;
  }
}

/** Double-quantised absmax: 8-bit codes of (absmax − offset), blockwise over 256. */
export interface Nf4DoubleQuant {
  /** uint8 [rows, nb]: dynamic-map indices. */
  codes: Tensor;
  /** float32 [rows, ⌈nb/256⌉]: absmax of each 256-block of (absmax − offset). */
  absmax: Tensor;
  /** float32 [rows, 1]: the mean absmax subtracted first. */
  offset: Tensor;
}

/** The stored parts of an {@link Nf4Weight}; ownership passes to it. */
export interface Nf4Parts {
  /** Full shape of the weight. */
  shape: readonly number[];
  /** Dtype it dequantises to by default (the original's). */
  dtype: DType;
  /** Leading dims that index independent matrices (0, or 1 for [E, out, in] experts). */
  batchDims: 0 | 1;
  /** uint8 [rows, ⌈n/2⌉]: two codes per byte, first in the high nibble; an odd tail is padded with code 7 (0.0). */
  packed: Tensor;
  /** float32 [rows, ⌈n/64⌉] absmax per block (null when double quantised). */
  absmax: Tensor | null;
  /** The double-quantised absmax (null when not). */
  dq: Nf4DoubleQuant | null;
  /** Tables on the same device; the weight takes over one reference. */
  tables: Nf4Tables;
}

/**
 * A 4-bit NF4 weight: `rows` independent matrices of n values each (rows = 1
 * for a plain weight, E for stacked experts, so blocks never straddle
 * experts). Owns its tensors: dispose it.
 */
export class Nf4Weight {
  /** Full shape. */
  readonly shape: readonly number[];
  /** Default dequantisation dtype. */
  readonly dtype: DType;
  /** Leading independent dims (0 or 1). */
  readonly batchDims: 0 | 1;
  /** Number of independent matrices. */
  readonly rows: number;
  /** Values per matrix. */
  readonly n: number;
  /** Packed codes, uint8 [rows, ⌈n/2⌉]. */
  readonly packed: Tensor;
  /** float32 absmax [rows, ⌈n/64⌉], or null when double quantised. */
  readonly absmax: Tensor | null;
  /** Double-quantised absmax, or null. */
  readonly dq: Nf4DoubleQuant | null;
  readonly #tables: Nf4Tables;
  #disposed = false;

  /** Wraps stored parts (see {@link quantizeNf4}); takes ownership of their tensors. */
  constructor(p: Nf4Parts) {
    this.shape = [...p.shape];
    this.dtype = p.dtype;
    this.batchDims = p.batchDims;
    const numel = p.shape.reduce((a, b) => a * b, 1);
    this.rows = p.batchDims === 1 ? p.shape[0]! : 1;
    this.n = this.rows === 0 ? 0 : numel / this.rows;
    this.packed = keep(p.packed);
    this.absmax = p.absmax && keep(p.absmax);
    this.dq = p.dq && { codes: keep(p.dq.codes), absmax: keep(p.dq.absmax), offset: keep(p.dq.offset) };
    this.#tables = p.tables;
  }
  /** Number of weight values. */
  get numel(): number {
    return this.rows * this.n;
  }
  /** True if the absmax is double quantised. */
  get doubleQuant(): boolean {
    return this.dq !== null;
  }
  /** Bytes held (packed codes and statistics; the shared {@link Nf4Tables} are not counted). */
  bytes(): number {
    if (this.dq) {
      return this.packed.numel + this.dq.codes.numel + 4 * (this.dq.absmax.numel + this.dq.offset.numel);
    }
    return this.packed.numel + 4 * this.absmax!.numel;
  }
  /** The float32 absmax [r, nb] of matrix `row` (all if omitted), decoding double quantisation. */
  blockAbsmax(row?: number): Tensor {
    return tidy(() => {
      const pick = (t: Tensor): Tensor => (row === undefined ? t : t.narrow(0, row, 1));
      if (!this.dq) return this.absmax!.narrow(0, row ?? 0, row === undefined ? this.rows : 1); // a view
      const codes = pick(this.dq.codes);
      const [r, nb] = codes.shape as [number, number];
      const vals = embedding(this.#tables.dynamic, codes.to("int32")).reshape([r, nb]);
      return scaleBlocks(vals, pick(this.dq.absmax), DQ_BLOCK).add(pick(this.dq.offset));
    });
  }
  /**
   * The weight in dtype (default: the original's), or only matrix `row`
   * (shape without the batch dim): code × absmax in float32, then cast, as
   * bnb. Large weights are decoded in pieces into the output, so the
   * temporaries stay small next to the result.
   */
  dequantize(dtype: DType = this.dtype, row?: number): Tensor {
    if (this.#disposed) throw new Error("Nf4Weight: used after dispose()");
    return tidy(() => {
      const r0 = row ?? 0, r = row === undefined ? this.rows : 1, n = this.n;
      const shape = row === undefined ? this.shape : this.shape.slice(this.batchDims);
      const absmax = this.blockAbsmax(row);
      const nb = absmax.size(1);
      const chunk = this.packed.device === "cpu" ? DEQUANT_CHUNK.cpu : DEQUANT_CHUNK.gpu;
      if (r * n <= chunk) return this.#decode(r0, r, absmax, 0, nb, dtype).reshape(shape);
      const out = zeros([r, n], { dtype, device: this.packed.device });
      if (n <= chunk) {
        const g = Math.floor(chunk / n);
        for (let i = 0; i < r; i += g) {
          const k = Math.min(g, r - i);
          tidy(() =>
            out.narrow(0, i, k).copy_(this.#decode(r0 + i, k, absmax.narrow(0, i, k), 0, nb, "float32"))
          );
        }
      } else {
        const step = chunk / NF4_BLOCK;
        for (let i = 0; i < r; i++) {
          for (let b0 = 0; b0 < nb; b0 += step) {
            tidy(() => {
              const part = this.#decode(
                r0 + i,
                1,
                absmax.narrow(0, i, 1),
                b0,
                Math.min(step, nb - b0),
                "float32",
              );
              out.narrow(0, i, 1).narrow(1, b0 * NF4_BLOCK, part.size(1)).copy_(part);
            });
          }
        }
      }
      return out.reshape(shape);
    });
  }
  /**
   * x·Wᵀ (+ bias) for matrix `row` (W [out, in]), or for every matrix at once
   * (x [E, N, in] times a stacked W [E, out, in]), through the shim's fused
   * NF4 linear: W is decoded in x's dtype as {@link dequantize} does, in the
   * forward pass and again in the backward pass, so autograd never keeps a
   * full-precision copy (the layer's memory stays 4-bit while training).
   */
  linear(x: Tensor, bias: Tensor | null = null, row?: number): Tensor {
    if (this.#disposed) throw new Error("Nf4Weight: used after dispose()");
    return tidy(() => {
      const pick = (t: Tensor): Tensor => (row === undefined ? t : t.narrow(0, row, 1));
      const dq = this.dq &&
        { codes: pick(this.dq.codes), absmax: pick(this.dq.absmax), offset: pick(this.dq.offset) };
      return nf4Linear(x, {
        packed: pick(this.packed),
        absmax: this.absmax && pick(this.absmax),
        dq,
        pairs: this.#tables.pairs,
        dynamic: this.#tables.dynamic,
        shape: row === undefined ? this.shape : this.shape.slice(this.batchDims),
        chunk: this.packed.device === "cpu" ? DEQUANT_CHUNK.cpu : DEQUANT_CHUNK.gpu,
      }, bias);
    });
  }
  /** Rows r0..r0+r, blocks b0..b0+cnt of the weight, [r, len], in dtype; absmax [r, nb] of those rows. */
  #decode(r0: number, r: number, absmax: Tensor, b0: number, cnt: number, dtype: DType): Tensor {
    return tidy(() => {
      const len = Math.min(cnt * NF4_BLOCK, this.n - b0 * NF4_BLOCK), bytes = Math.ceil(len / 2);
      const idx = this.packed.narrow(0, r0, r).narrow(1, (b0 * NF4_BLOCK) / 2, bytes).to("int32");
      const pairs = embedding(this.#tables.pairs, idx);
      idx.dispose();
      let vals = pairs.reshape([r, 2 * bytes]);
      if (2 * bytes !== len) vals = vals.narrow(1, 0, len);
      const scaled = scaleBlocks(vals, absmax.narrow(1, b0, cnt), NF4_BLOCK);
      pairs.dispose();
      return scaled.dtype === dtype ? scaled : scaled.to(dtype);
    });
  }
  /** Frees the tensors and this weight's reference to the tables. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.packed.dispose();
    this.absmax?.dispose();
    if (this.dq) [this.dq.codes, this.dq.absmax, this.dq.offset].forEach((t) => t.dispose());
    this.#tables.release();
  }
  /** Frees at the end of a `using` block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** v [r, n] float32 times scales [r, ⌈n/bs⌉] broadcast over blocks of bs (the last may be partial). */
function scaleBlocks(v: Tensor, s: Tensor, bs: number): Tensor {
  const [r, n] = v.shape as [number, number];
  const full = Math.floor(n / bs) * bs, nf = full / bs;
  const head = (): Tensor => v.narrow(1, 0, full).reshape([r, nf, bs]).mul(s.narrow(1, 0, nf).unsqueeze(-1));
  if (full === n) return head().reshape([r, n]);
  const tail = v.narrow(1, full, n - full).mul(s.narrow(1, nf, 1));
  return full === 0 ? tail : cat([head().reshape([r, full]), tail], 1);
}

/**
 * Number of mids strictly below each v (torch.bucketize, right=False): the
 * nearest code, ties to the lower. mids is sorted, of length 2^k − 1; a
 * branch-free binary search of k steps keeps temporaries at a few bytes per
 * value. Returns int32 of v's shape.
 */
function countBelow(v: Tensor, mids: Tensor): Tensor {
  return tidy(() => {
    const flat = v.reshape([-1]);
    let pos = zeros(flat.shape, { dtype: "int32", device: v.device });
    for (let step = (mids.size(0) + 1) / 2; step >= 1; step /= 2) {
      const prev = pos; // each step's temporaries freed at once: the peak stays a few bytes per value
      pos = tidy(() => prev.add(flat.gt(mids.indexSelect(0, prev.add(step - 1))).to("int32").mul(step)));
      prev.dispose();
    }
    return pos.reshape(v.shape);
  });
}

/** Codes [2k] (int32) → bytes [k], first of each pair in the high nibble. */
function pack(codes: Tensor): Tensor {
  const p = codes.reshape([-1, 2]);
  return p.select(1, 0).mul(16).add(p.select(1, 1)).to("uint8");
}

/** Options for {@link quantizeNf4}. */
export interface Nf4Options {
  /** Block size: 64 only (bnb's default). */
  blockSize?: 64;
  /** Quantise the absmax too (bnb compress_statistics). Default false. */
  doubleQuant?: boolean;
  /** 1 to quantise each w[i] separately (stacked experts). Default 0. */
  batchDims?: 0 | 1;
  /** Shared tables on w's device (retained); default: new ones. */
  tables?: Nf4Tables;
  /** Values processed per step, bounding temporaries (default 2^21, a multiple of 64). */
  chunk?: number;
}

/**
 * Quantises a float weight to NF4 as bitsandbytes' `quantize_4bit(w,
 * quant_type="nf4", blocksize=64, compress_statistics=doubleQuant)` does:
 * flatten; per block of 64 the float32 absmax; full blocks scaled by
 * 1/max(absmax, 1e-38), a partial last block divided by its (clamped) absmax;
 * code = number of code midpoints below the value (the nearest code, ties to
 * the lower); an odd count padded with code 7. Double quantisation: offset =
 * mean absmax; (absmax − offset) scaled per 256-block by 1/its absmax and
 * rounded to the nearest dynamic-map entry (bnb's CUDA rule; bnb 0.50's CPU
 * kernel uses a 65536-bin lookup that differs in ~0.1% of codes by one step).
 * Works on w's device, in chunks; w is not modified.
 */
export function quantizeNf4(w: Tensor, opts: Nf4Options = {}): Nf4Weight {
  if ((opts.blockSize ?? NF4_BLOCK) !== NF4_BLOCK) {
    throw new RangeError("quantizeNf4: only blockSize 64 is supported");
  }
  if (!isFloating(w.dtype)) throw new TypeError(`quantizeNf4: ${w.dtype} is not a float dtype`);
  const shape = w.shape, batchDims = opts.batchDims ?? 0;
  if (batchDims === 1 && shape.length < 2) {
    throw new RangeError("quantizeNf4: batchDims 1 needs a tensor of ≥ 2 dims");
  }
  const rows = batchDims === 1 ? shape[0]! : 1;
  const n = rows === 0 ? 0 : w.numel / rows;
  const nb = Math.ceil(n / NF4_BLOCK), full = Math.floor(n / NF4_BLOCK) * NF4_BLOCK;
  const chunkBlocks = Math.max(1, Math.floor((opts.chunk ?? 1 << 21) / NF4_BLOCK));
  const device = w.device;
  const tables = opts.tables ? opts.tables.retain() : Nf4Tables.create(device);
  const made: Tensor[] = [];
  try {
    const packed = keep(zeros([rows, Math.ceil(n / 2)], { dtype: "uint8", device }));
    const absmax = keep(zeros([rows, nb], { device }));
    made.push(packed, absmax);
    tidy(() => {
      const flat = w.reshape([rows, n]);
      for (let r = 0; r < rows; r++) {
        const row = flat.select(0, r);
        for (let b0 = 0; b0 < full / NF4_BLOCK; b0 += chunkBlocks) {
          tidy(() => {
            const cnt = Math.min(chunkBlocks, full / NF4_BLOCK - b0);
            // Temporaries are freed as soon as used: a few bytes per value of the chunk at a time.
            const x = tidy(() =>
              row.narrow(0, b0 * NF4_BLOCK, cnt * NF4_BLOCK).to("float32").reshape([cnt, 64])
            );
            const am = tidy(() => x.abs().amax(1));
            const scaled = tidy(() => x.mul(am.clamp(1e-38).reciprocal().unsqueeze(1)).reshape([-1]));
            x.dispose();
            const codes = countBelow(scaled, tables.nf4Mids);
            scaled.dispose();
            packed.select(0, r).narrow(0, (b0 * NF4_BLOCK) / 2, (cnt * NF4_BLOCK) / 2).copy_(pack(codes));
            absmax.select(0, r).narrow(0, b0, cnt).copy_(am);
          });
        }
        if (full < n) {
          tidy(() => {
            const x = row.narrow(0, full, n - full).to("float32");
            const am = x.abs().amax().clamp(1e-38);
            let codes = countBelow(x.div(am), tables.nf4Mids);
            if ((n - full) % 2) codes = cat([codes, zeros([1], { dtype: "int32", device }).add(7)]);
            packed.select(0, r).narrow(0, full / 2, codes.size(0) / 2).copy_(pack(codes));
            absmax.select(0, r).narrow(0, nb - 1, 1).copy_(am.reshape([1]));
          });
        }
      }
    });
    const dtype = w.dtype;
    if (!opts.doubleQuant) {
      return new Nf4Weight({ shape, dtype, batchDims, packed, absmax, dq: null, tables });
    }
    const dq = doubleQuantize(absmax, tables);
    absmax.dispose();
    return new Nf4Weight({ shape, dtype, batchDims, packed, absmax: null, dq, tables });
  } catch (e) {
    made.forEach((t) => t.dispose());
    tables.release();
    throw e;
  }
}

/** bnb's compress_statistics on absmax [rows, nb]: per row, offset = mean; 8-bit blockwise (256) codes. */
function doubleQuantize(absmax: Tensor, tables: Nf4Tables): Nf4DoubleQuant {
  return tidy(() => {
    const [rows, nb] = absmax.shape as [number, number];
    const device = absmax.device;
    // Per-row 1-D mean, exactly as bnb's `_absmax.mean()`.
    const offset = rows === 0
      ? zeros([0, 1], { device })
      : cat(Array.from({ length: rows }, (_, r) => absmax.select(0, r).mean().reshape([1, 1])), 0);
    const d = absmax.sub(offset);
    const full = Math.floor(nb / DQ_BLOCK) * DQ_BLOCK, nf = full / DQ_BLOCK;
    const quant = (x: Tensor): { codes: Tensor; am: Tensor } => {
      // x [k, len]: the C++ kernel scales by 1/absmax; an all-zero block gets code 0.
      const am = x.abs().amax(1);
      const codes = countBelow(x.mul(am.reciprocal().unsqueeze(1)), tables.dynamicMids);
      return { codes: codes.maskedFill(am.eq(0).unsqueeze(1), 0).to("uint8"), am };
    };
    const parts: { codes: Tensor; am: Tensor }[] = [];
    if (full > 0) {
      const h = quant(d.narrow(1, 0, full).reshape([rows * nf, DQ_BLOCK]));
      parts.push({ codes: h.codes.reshape([rows, full]), am: h.am.reshape([rows, nf]) });
    }
    if (full < nb) {
      const t = quant(d.narrow(1, full, nb - full));
      parts.push({ codes: t.codes, am: t.am.reshape([rows, 1]) });
    }
    const one = parts.length === 1;
    return {
      codes: one ? parts[0]!.codes : cat(parts.map((p) => p.codes), 1),
      absmax: one ? parts[0]!.am : cat(parts.map((p) => p.am), 1),
      offset,
    };
  });
}

/** The weight q in dtype (default: its original dtype); see {@link Nf4Weight.dequantize}. */
export function dequantizeNf4(q: Nf4Weight, dtype?: DType): Tensor {
  return q.dequantize(dtype);
}
