/**
 * 4-bit NF4 base weights (model/nf4.ts): the codec's layout and error bound,
 * bytes per parameter, bit-exact agreement with bitsandbytes (recorded in
 * tests/fixtures/nf4/ by scripts/make_nf4_fixtures.py, and live where a
 * Python with bitsandbytes runs), whole tiny models quantised (every linear
 * layer and expert, logits close to full precision, LoRA training on top),
 * and no leaks.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  AdamW,
  type DType,
  fromTypedArray,
  liveTensors,
  manualSeed,
  noGrad,
  randn,
  type Tensor,
  tidy,
} from "../ffi/mod.ts";
import { Linear } from "../model/layers.ts";
import { LoraModel } from "../model/lora_apply.ts";
import { type CausalLM, loadModel } from "../model/model.ts";
import type { Decoder } from "../model/decoder.ts";
import { expertSlots, linearSlots } from "../model/modules.ts";
import { type ExpertBank, StackedExperts } from "../model/moe.ts";
import { nf4Bytes, Nf4Experts, Nf4Linear, quantizeModel } from "../model/nf4.ts";
import { DYNAMIC_MAP, midpoints, NF4_CODE, Nf4Tables, Nf4Weight, quantizeNf4 } from "../model/nf4_codec.ts";
import { SafetensorsFile } from "../model/safetensors.ts";
import { writeSafetensors } from "../model/safetensors_write.ts";
import { assertNoLeak, DEVICE, FLOAT, PYTHON, pythonHas } from "./util.ts";

const FIXTURES = join(import.meta.dirname!, "fixtures");
const MODELS = ["qwen3-moe-tiny", "qwen3-moe-fused", "phimoe-tiny"];
const NF4_HALF_GAP = Math.max(...midpoints(NF4_CODE).map((m, i) => m - NF4_CODE[i]!), 0);
const DYN_HALF_GAP = Math.max(...Array.from(DYNAMIC_MAP.subarray(1), (v, i) => (v - DYNAMIC_MAP[i]!) / 2));

const f32 = (t: Tensor): Float32Array => tidy(() => t.to("float32").toTypedArray() as Float32Array);
const u8 = (t: Tensor): number[] => Array.from(t.toTypedArray() as Uint8Array);

/** Per-block absmax (blocks of bs over the flat values, the last may be partial), in float64. */
function blockAbsmax(v: ArrayLike<number>, bs: number): number[] {
  const out: number[] = [];
  for (let s = 0; s < v.length; s += bs) {
    let m = 0;
    for (let i = s; i < Math.min(v.length, s + bs); i++) m = Math.max(m, Math.abs(v[i]!));
    out.push(m);
  }
  return out;
}

Deno.test("nf4: code book and dynamic map", async () => {
  // bitsandbytes' NF4 codes (create_normal_map(offset=0.9677083, use_extra_value=True)).
  const notes = [
    -1.0,
    -0.6961928,
    -0.5250731,
    -0.3949175,
    -0.2844414,
    -0.1847734,
    -0.0910500,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.3379152,
    0.4407098,
    0.5626170,
    0.7229568,
    1.0,
  ];
  NF4_CODE.forEach((c, i) => assert.ok(Math.abs(c - notes[i]!) < 5e-8, `code ${i}: ${c}`));
  assert.equal(DYNAMIC_MAP.length, 256);
  assert.ok(DYNAMIC_MAP.every((v, i) => i === 0 || v > DYNAMIC_MAP[i - 1]!), "dynamic map sorted, distinct");
  assert.equal(DYNAMIC_MAP[127], 0);
  assert.equal(DYNAMIC_MAP[255], 1);
  using file = await SafetensorsFile.open(join(FIXTURES, "nf4", "bnb.safetensors"));
  using code = await file.load("nf4_code");
  using dyn = await file.load("dynamic_map");
  assert.deepEqual(f32(code), NF4_CODE, "bnb's get_4bit_type('nf4')");
  assert.deepEqual(f32(dyn), DYNAMIC_MAP, "bnb's create_dynamic_map(signed=True)");
});

Deno.test("nf4: packing layout, code points round-trip exactly, odd tails padded with code 7", () => {
  assertNoLeak(() => {
    const opts = { device: DEVICE };
    // 64 values exactly at code points × 2.5: absmax 2.5, codes 0..15 in order.
    const w = Float32Array.from({ length: 64 }, (_, i) => Math.fround(NF4_CODE[i % 16]! * 2.5));
    using t = fromTypedArray(w, [4, 16], opts);
    using q = quantizeNf4(t);
    assert.deepEqual(q.packed.shape, [1, 32]);
    assert.deepEqual(
      u8(q.packed),
      Array.from({ length: 32 }, (_, i) => ((2 * i) % 16) * 16 + ((2 * i + 1) % 16)),
    );
    assert.deepEqual(Array.from(f32(q.absmax!)), [2.5]);
    using back = q.dequantize();
    assert.deepEqual(back.shape, [4, 16]);
    assert.deepEqual(f32(back), w, "code points come back exactly");
    // Nibble order: first element high. Odd count: the pad nibble is code 7 (0.0).
    const pack = (vals: number[]): number[] => {
      using x = fromTypedArray(Float32Array.from(vals), [vals.length], opts);
      using qq = quantizeNf4(x);
      return u8(qq.packed);
    };
    assert.deepEqual(pack([1, -1]), [0xf0]);
    assert.deepEqual(pack([1]), [0xf7]);
    assert.deepEqual(pack([0.5, 0, -0.5]), [0xf7, 0x07]);
    // Half-precision input dequantises to its own dtype by default, or to any asked.
    using h = tidy(() => randn([3, 37], { device: DEVICE }).to("bfloat16"));
    using qh = quantizeNf4(h);
    using dh = qh.dequantize();
    using df = qh.dequantize("float32");
    assert.equal(dh.dtype, "bfloat16");
    assert.equal(df.dtype, "float32");
    assert.deepEqual(qh.packed.shape, [1, 56]); // ⌈111 / 2⌉
    assert.deepEqual(qh.absmax!.shape, [1, 2]); // 64 + a partial block of 47
  });
});

/** Checks |w − deq| ≤ absmax·(max half gap) (+ the absmax error when double quantised) for every element. */
function checkBound(w: Tensor, doubleQuant: boolean, chunk?: number): { worst: number; rms: number } {
  using q = quantizeNf4(w, { doubleQuant, chunk });
  using deq = q.dequantize("float32");
  using am = q.blockAbsmax();
  const x = f32(w), y = f32(deq), amq = f32(am);
  const am64 = blockAbsmax(x, 64);
  let amBound = am64.map(() => 0);
  if (doubleQuant) {
    const mean = Math.fround(am64.reduce((a, b) => a + b, 0) / am64.length);
    const a2 = blockAbsmax(am64.map((a) => a - mean), 256);
    amBound = am64.map((_, b) => a2[Math.floor(b / 256)]! * DYN_HALF_GAP * (1 + 1e-5) + 1e-6 * am64[b]!);
    am64.forEach((a, b) => {
      const err = Math.abs(a - amq[b]!);
      assert.ok(err <= amBound[b]!, `absmax ${b}: |${a} − ${amq[b]}| > ${amBound[b]}`);
    });
  } else assert.deepEqual(Array.from(amq), am64.map(Math.fround), "absmax stored exactly");
  let worst = 0, sq = 0;
  for (let i = 0; i < x.length; i++) {
    const b = Math.floor(i / 64), err = Math.abs(x[i]! - y[i]!);
    const bound = am64[b]! * NF4_HALF_GAP * (1 + 1e-6) + amBound[b]!;
    assert.ok(err <= bound, `element ${i}: |${x[i]} − ${y[i]}| = ${err} > ${bound}`);
    worst = Math.max(worst, err / bound);
    sq += err * err;
  }
  return { worst, rms: Math.sqrt(sq / x.length) };
}

Deno.test("nf4: round-trip error within the NF4 bound (and the absmax error when double quantised)", () => {
  // The widest gap is between −1 and −0.6961928 (NF4 is asymmetric: 7 negative, 8 positive codes).
  assert.ok(Math.abs(NF4_HALF_GAP - 0.1519036) < 1e-6, `max half gap ${NF4_HALF_GAP}`);
  manualSeed(7);
  assertNoLeak(() => {
    for (const shape of [[256, 300], [3, 37], [5000]]) {
      using w = tidy(() => randn(shape, { device: DEVICE }).to(FLOAT));
      for (const dq of [false, true]) {
        const r = checkBound(w, dq);
        if (shape.length === 2 && shape[0] === 256) {
          console.log(
            `  N(0,1) ${shape.join("×")} ${FLOAT}${dq ? " +DQ" : ""}: rms error ${r.rms.toFixed(4)}, ` +
              `worst ${(100 * r.worst).toFixed(1)}% of the bound`,
          );
        }
      }
    }
  });
});

Deno.test("nf4: chunking and per-expert quantisation change nothing", () => {
  manualSeed(3);
  assertNoLeak(() => {
    using w = randn([100, 130], { device: DEVICE }); // 13000 values: 203 blocks + 8
    for (const doubleQuant of [false, true]) {
      using a = quantizeNf4(w, { doubleQuant });
      using b = quantizeNf4(w, { doubleQuant, chunk: 3 * 64 });
      using da = a.dequantize(), db = b.dequantize();
      assert.deepEqual(u8(a.packed), u8(b.packed));
      assert.deepEqual(f32(da), f32(db));
    }
    // [E, out, in] with batchDims 1 = each expert quantised on its own (130 values each: blocks never straddle).
    using e = randn([3, 10, 13], { device: DEVICE });
    using qe = quantizeNf4(e, { batchDims: 1, doubleQuant: true });
    assert.equal(qe.rows, 3);
    for (let i = 0; i < 3; i++) {
      using slice = e.select(0, i);
      using qi = quantizeNf4(slice, { doubleQuant: true });
      using row = qe.packed.select(0, i);
      assert.deepEqual(u8(row), u8(qi.packed));
      using d1 = qe.dequantize(FLOAT, i), d2 = qi.dequantize(FLOAT);
      assert.deepEqual(d1.shape, [10, 13]);
      assert.deepEqual(f32(d1), f32(d2));
    }
  });
});

Deno.test("nf4: large weights dequantise in pieces to the reference decoding", () => {
  manualSeed(9);
  assertNoLeak(() => {
    // [5, 600000]: groups of rows per piece; [2, 2^21 + 100]: pieces within a row, partial last block.
    for (const shape of [[5, 600000], [2, (1 << 21) + 100]]) {
      using w = tidy(() => randn(shape, { device: DEVICE }).to(FLOAT));
      using q = quantizeNf4(w, { batchDims: 1 });
      using d = q.dequantize("float32");
      using am = q.blockAbsmax();
      const got = f32(d), packed = q.packed.toTypedArray() as Uint8Array, absmax = f32(am);
      const [rows, n] = shape as [number, number];
      const nb = Math.ceil(n / 64), m = Math.ceil(n / 2);
      for (let r = 0; r < rows; r++) {
        for (let i = 0; i < n; i++) {
          const byte = packed[r * m + (i >> 1)]!;
          const want = Math.fround(
            NF4_CODE[i % 2 ? byte & 15 : byte >> 4]! * absmax[r * nb + Math.floor(i / 64)]!,
          );
          if (got[r * n + i] !== want) assert.fail(`[${r}, ${i}]: ${got[r * n + i]} != ${want}`);
        }
      }
      using d1 = q.dequantize("float32", rows - 1);
      assert.deepEqual(f32(d1), got.subarray((rows - 1) * n));
    }
  });
});

Deno.test("nf4: bytes per parameter", () => {
  assertNoLeak(() => {
    using w = randn([1024, 1024], { device: DEVICE });
    using q = quantizeNf4(w);
    using qd = quantizeNf4(w, { doubleQuant: true });
    const n = 1024 * 1024;
    assert.equal(q.bytes(), n / 2 + (n / 64) * 4); // 0.5625 B/param
    assert.equal(qd.bytes(), n / 2 + n / 64 + (n / 64 / 256) * 4 + 4); // codes + 8-bit absmax + its absmax + offset
    console.log(
      `  1024×1024: ${(q.bytes() / n).toFixed(4)} B/param, with double quantisation ` +
        `${(qd.bytes() / n).toFixed(4)} (float32 ${4}, bf16 ${2})`,
    );
    assert.equal(q.bytes() / n, 0.5625);
    assert.ok(Math.abs(qd.bytes() / n - 0.5159) < 1e-4);
  });
});

// ---- bitsandbytes parity ------------------------------------------------------------------------

interface Reader {
  names: string[];
  has(name: string): boolean;
  load(name: string): Promise<Tensor>;
}

/**
 * Compares our quantisation of every input in r with bitsandbytes' record:
 * packed codes, absmax, offset and 256-block absmax bit for bit; the 8-bit
 * absmax codes equal to nearest rounding (and within one entry of bnb's CPU
 * lookup table); and dequantising bnb's own parts with our code gives bnb's
 * dequantised values exactly. Returns the count of 8-bit codes where bnb's
 * CPU kernel differs from nearest rounding, and the total.
 */
async function compareWithBnb(r: Reader, inputs: string[]): Promise<{ lutOff: number; codes: number }> {
  const exact = DEVICE === "cpu"; // the mean (offset) is a reduction: its last bit may differ on a GPU
  let lutOff = 0, codes = 0;
  for (const name of inputs) {
    const ld = async (k: string): Promise<Tensor> => (await r.load(`${name}.${k}`));
    using x = await r.load(name);
    using xd = x.to(DEVICE);
    using bPacked = await ld("packed"), bAbsmax = await ld("absmax");
    using bCodes = await ld("dq.codes"), bNearest = await ld("dq.nearest");
    using bAbs2 = await ld("dq.absmax"), bOffset = await ld("dq.offset");
    using q = quantizeNf4(xd);
    using qd = quantizeNf4(xd, { doubleQuant: true });
    assert.deepEqual(u8(q.packed), u8(bPacked), `${name}: packed codes`);
    assert.deepEqual(u8(qd.packed), u8(bPacked), `${name}: packed codes (double quant)`);
    assert.deepEqual(f32(q.absmax!), f32(bAbsmax), `${name}: absmax`);
    const dq = qd.dq!;
    if (exact) {
      assert.deepEqual(f32(dq.offset), f32(bOffset), `${name}: offset`);
      assert.deepEqual(f32(dq.absmax), f32(bAbs2), `${name}: 256-block absmax`);
      assert.deepEqual(u8(dq.codes), u8(bNearest), `${name}: 8-bit absmax codes = nearest`);
    } else {
      const rel = Math.abs(f32(dq.offset)[0]! - f32(bOffset)[0]!) / Math.abs(f32(bOffset)[0]! || 1);
      assert.ok(rel < 1e-6, `${name}: offset off by ${rel}`);
    }
    const ours = u8(dq.codes), bnb = u8(bCodes);
    ours.forEach((c, i) =>
      assert.ok(Math.abs(c - bnb[i]!) <= 1, `${name}: 8-bit code ${i}: ${c} vs bnb ${bnb[i]}`)
    );
    lutOff += ours.filter((c, i) => c !== bnb[i]).length;
    codes += ours.length;
    // Dequantising bnb's parts with our code reproduces bnb's dequantisation bit for bit.
    if (r.has(`${name}.deq`)) {
      const tables = Nf4Tables.create(DEVICE);
      const rows = (t: Tensor): Tensor => tidy(() => t.to(DEVICE).reshape([1, -1]));
      const parts = { shape: x.shape, dtype: x.dtype, batchDims: 0 as const, packed: rows(bPacked) };
      using plain = new Nf4Weight({ ...parts, absmax: rows(bAbsmax), dq: null, tables: tables.retain() });
      const dqParts = { codes: rows(bCodes), absmax: rows(bAbs2), offset: rows(bOffset) };
      using nested = new Nf4Weight({ ...parts, packed: rows(bPacked), absmax: null, dq: dqParts, tables });
      using bDeq = await ld("deq"), bDeqDq = await ld("dq.deq");
      using a = plain.dequantize(), b = nested.dequantize();
      assert.equal(a.dtype, x.dtype);
      assert.deepEqual(f32(a), f32(bDeq), `${name}: dequantised`);
      if (exact) assert.deepEqual(f32(b), f32(bDeqDq), `${name}: dequantised (double quant)`);
      using ours1 = q.dequantize();
      assert.deepEqual(f32(ours1), f32(bDeq), `${name}: our round trip = bnb's`);
    }
  }
  return { lutOff, codes };
}

Deno.test("nf4: bit-exact with bitsandbytes (recorded fixture)", async () => {
  const live = liveTensors();
  {
    using file = await SafetensorsFile.open(join(FIXTURES, "nf4", "bnb.safetensors"));
    const names = file.names();
    const reader: Reader = { names, has: (n) => file.has(n), load: (n) => file.load(n) };
    const inputs = names.filter((n) => !n.includes(".") && n !== "nf4_code" && n !== "dynamic_map");
    assert.ok(inputs.length >= 8, `inputs: ${inputs.join(", ")}`);
    const { lutOff, codes } = await compareWithBnb(reader, inputs);
    console.log(
      `  ${inputs.length} inputs (bitsandbytes ${file.metadata.bitsandbytes}): packed codes, absmax, ` +
        `offsets exact; 8-bit absmax codes: ${lutOff} of ${codes} differ by one entry from bnb's CPU lookup table`,
    );
  }
  assert.equal(liveTensors(), live);
});

const bnbPython = pythonHas("bitsandbytes", "safetensors", "torch");

Deno.test({
  name: "nf4: bit-exact with bitsandbytes (live, fresh random inputs)",
  ignore: !bnbPython,
  async fn(): Promise<void> {
    const dir = await Deno.makeTempDir({ prefix: "moerl-nf4-" });
    try {
      manualSeed(11);
      const make = (shape: number[], dtype: DType, scale: number): Tensor =>
        tidy(() => randn(shape).mul(scale).to(dtype));
      const inputs: Record<string, Tensor> = {
        a: make([256, 320], "float32", 1), // 1280 blocks: 5 absmax blocks of 256
        b: make([33, 65], "float32", 0.1), // 2145 values: partial block, odd count
        c: make([128, 192], "bfloat16", 0.02),
        d: make([4097], "float16", 1),
      };
      await writeSafetensors(join(dir, "in.safetensors"), inputs);
      Object.values(inputs).forEach((t) => t.dispose());
      const script = join(import.meta.dirname!, "..", "scripts", "make_nf4_fixtures.py");
      const args = [script, "--inputs", join(dir, "in.safetensors"), "--out", join(dir, "out.safetensors")];
      const res = await new Deno.Command(PYTHON, { args, stdout: "piped", stderr: "piped" }).output();
      assert.ok(res.success, new TextDecoder().decode(res.stderr));
      using file = await SafetensorsFile.open(join(dir, "out.safetensors"));
      const reader: Reader = { names: file.names(), has: (n) => file.has(n), load: (n) => file.load(n) };
      const { lutOff, codes } = await compareWithBnb(reader, ["a", "b", "c", "d"]);
      console.log(
        `  live bitsandbytes ${file.metadata.bitsandbytes}: exact; ${lutOff} of ${codes} 8-bit codes ` +
          `one entry off (bnb's CPU lookup table)`,
      );
      assert.ok(lutOff <= 0.01 * codes, "bnb's lookup table rarely differs from nearest rounding");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---- whole models -------------------------------------------------------------------------------

async function parityInputs(name: string): Promise<{ ids: Tensor; mask: Tensor; pos: Tensor }> {
  using file = await SafetensorsFile.open(join(FIXTURES, "parity", `${name}.safetensors`));
  const o = { device: DEVICE };
  return {
    ids: await file.load("input_ids", o),
    mask: await file.load("attention_mask", o),
    pos: await file.load("position_ids", o),
  };
}

/** Mean |Δ| over real positions relative to the logits' std there, and greedy top-1 agreement. */
function closeness(a: Tensor, b: Tensor, mask: Tensor): { rel: number; top1: number; maxAbs: number } {
  return tidy(() => {
    const m = mask.to("float32").unsqueeze(-1); // [B, S, 1]
    const n = m.sum().item(), v = a.size(-1);
    const x = a.to("float32"), y = b.to("float32");
    const d = x.sub(y).abs().mul(m);
    const mean = x.mul(m).sum().item() / (n * v);
    const std = Math.sqrt(x.sub(mean).square().mul(m).sum().item() / (n * v - 1));
    const agree = x.argmax(-1).eq(y.argmax(-1)).to("float32").mul(m.squeeze(-1)).sum().item() / n;
    return { rel: d.sum().item() / (n * v) / std, top1: agree, maxAbs: d.amax().item() };
  });
}

/**
 * Replaces, in place, every weight quantizeModel would quantise by w + noise(w):
 * for the round trip, noise = dequant(quant(w)) − w; for the baseline, Gaussian
 * noise of the same RMS per tensor.
 */
function perturb(decoder: Decoder, how: "nf4" | "nf4-dq" | "gaussian"): void {
  const apply = (w: Tensor, batchDims: 0 | 1): void =>
    noGrad(() =>
      tidy(() => {
        using q = quantizeNf4(w, { batchDims, doubleQuant: how === "nf4-dq" });
        const d = q.dequantize();
        if (how !== "gaussian") return void w.copy_(d);
        const rms = d.sub(w).square().mean().sqrt().item();
        w.copy_(w.add(randn(w.shape, { dtype: w.dtype, device: w.device }).mul(rms)));
      })
    );
  for (const s of linearSlots(decoder)) {
    const l = s.get();
    if (s.role !== "lm_head" && l instanceof Linear) apply(l.weight, 0);
  }
  for (const s of expertSlots(decoder)) {
    const b = s.get() as StackedExperts;
    apply(b.gateUpWeight, 1);
    apply(b.downWeight, 1);
  }
}

// Logit deviation of the 4-bit models from full precision, mean |Δ| / std (calibrated: measured
// 0.35, 0.24, 0.73 in float32). The fixture models are deliberately sensitive (weights N(0, 0.3²) at
// width 64, so every layer has gain ≈ 2.4; PhiMoE's routers are built with near ties), so NF4
// moves their logits a lot; the test pins that NF4 does no worse than Gaussian noise of the same
// RMS on every weight, and that the 4-bit forward pass is exactly the full-precision forward pass
// of the dequantised weights.
const CLOSE: Record<string, { rel: number; top1: number }> = {
  "qwen3-moe-tiny": { rel: 0.45, top1: 0.5 },
  "qwen3-moe-fused": { rel: 0.32, top1: 0.6 },
  "phimoe-tiny": { rel: 0.9, top1: 0.1 },
};

Deno.test("nf4: tiny models quantised: every part NF4, forward = dequantised weights, logits vs full precision", async (t) => {
  const load = (name: string) => loadModel(join(FIXTURES, "models", name), { dtype: FLOAT, device: DEVICE });
  for (const name of MODELS) {
    for (const doubleQuant of [false, true]) {
      await t.step(`${name}${doubleQuant ? " + double quant" : ""}`, async () => {
        const live = liveTensors();
        {
          using model = await load(name);
          using ref = await load(name); // full precision, then its own dequantised weights
          using noisy = await load(name);
          const { ids, mask, pos } = await parityInputs(name);
          using _i = ids, _m = mask, _p = pos;
          const run = (m: CausalLM): Tensor =>
            noGrad(() =>
              tidy(() => m.decoder.forward({ inputIds: ids, positionIds: pos, attentionMask: mask }).logits!)
            );
          using full = run(model);
          const before = nf4Bytes(model.decoder);
          using q = quantizeModel(model, { doubleQuant });
          const after = nf4Bytes(model.decoder);
          using quant = run(model);
          // Every linear layer but the LM head, and every expert bank, is NF4 now.
          for (const s of linearSlots(model.decoder)) {
            if (s.role === "lm_head") assert.ok(s.get() instanceof Linear, s.name);
            else assert.ok(s.get() instanceof Nf4Linear, `${s.name} is not NF4`);
          }
          const banks = expertSlots(model.decoder);
          assert.ok(banks.length > 0);
          for (const s of banks) {
            const b = s.get();
            assert.ok(b instanceof Nf4Experts, `${s.name} is not NF4`);
            assert.equal(b.names.prefix, s.name);
            assert.equal(q.entries.find((e) => e.name === s.name)?.role, "experts");
          }
          assert.deepEqual(q.skipped, ["lm_head"]);
          assert.equal(q.entries.length, linearSlots(model.decoder).length - 1 + banks.length);
          assert.equal(after.nf4Params, q.params);
          assert.equal(before.params, after.params, "same parameters, fewer bytes");
          assert.ok(
            Math.abs(q.bytesPerParam - (doubleQuant ? 0.517 : 0.5625)) < (doubleQuant ? 0.002 : 1e-12),
          );
          // The 4-bit forward pass is the full-precision one over the dequantised weights.
          perturb(ref.decoder, doubleQuant ? "nf4-dq" : "nf4");
          using deq = run(ref);
          const exact = closeness(deq, quant, mask);
          assert.ok(
            exact.maxAbs <= (FLOAT === "float32" ? 1e-4 : 0.1),
            `vs dequantised: max |Δ| ${exact.maxAbs}`,
          );
          // Against full precision, and against Gaussian noise of the same RMS.
          manualSeed(0);
          perturb(noisy.decoder, "gaussian");
          using noise = run(noisy);
          const c = closeness(full, quant, mask), g = closeness(full, noise, mask);
          console.log(
            `    ${q}\n    whole model ${before.bytes} → ${after.bytes} bytes; logits vs full precision: ` +
              `mean |Δ| ${c.rel.toFixed(3)}·std, max |Δ| ${c.maxAbs.toFixed(2)}, top-1 agreement ` +
              `${(100 * c.top1).toFixed(1)}% (Gaussian noise of the same RMS: ${g.rel.toFixed(3)}·std, ` +
              `${(100 * g.top1).toFixed(1)}%)`,
          );
          assert.ok(c.rel <= CLOSE[name]!.rel, `mean |Δlogits| ${c.rel}·std`);
          assert.ok(c.top1 >= CLOSE[name]!.top1, `top-1 agreement ${c.top1}`);
          assert.ok(c.rel <= 1.25 * g.rel, `NF4 ${c.rel} vs matched noise ${g.rel}`);
        }
        assert.equal(liveTensors(), live, "quantise + forward + dispose leaves no tensor");
      });
    }
  }
});

Deno.test("nf4: skipping routers and the tied LM head; refusing banks it cannot quantise", async () => {
  const live = liveTensors();
  {
    // Tied embeddings: quantising lm_head must not free the embedding it shares.
    using model = await loadModel(join(FIXTURES, "models", "qwen3-moe-fused"), {
      dtype: FLOAT,
      device: DEVICE,
    });
    const routers = linearSlots(model.decoder).filter((s) => s.role === "router").map((s) => s.name);
    assert.ok(routers.length > 0);
    using q = quantizeModel(model, { skip: (_n, role) => role === "router" });
    assert.deepEqual(q.skipped, routers);
    for (const s of linearSlots(model.decoder)) {
      assert.ok(s.get() instanceof (s.role === "router" ? Linear : Nf4Linear), s.name);
    }
    assert.ok(!model.decoder.embed.disposed, "tied embedding kept");
    const { ids, mask, pos } = await parityInputs("qwen3-moe-fused");
    using _i = ids, _m = mask, _p = pos;
    noGrad(() =>
      tidy(() => void model.decoder.forward({ inputIds: ids, positionIds: pos, attentionMask: mask }))
    );
  }
  {
    using model = await loadModel(join(FIXTURES, "models", "phimoe-tiny"), { dtype: FLOAT, device: DEVICE });
    const slot = expertSlots(model.decoder)[0]!;
    const orig = slot.get() as StackedExperts;
    const wrapped: ExpertBank = {
      count: orig.count,
      names: orig.names,
      gateUp: (e, x) => orig.gateUp(e, x),
      down: (e, h) => orig.down(e, h),
      gateUpAll: (x) => orig.gateUpAll(x),
      downAll: (h) => orig.downAll(h),
    };
    slot.set(wrapped);
    assert.throws(() => quantizeModel(model), /not StackedExperts/);
    assert.ok(linearSlots(model.decoder).every((s) => s.get() instanceof Linear), "nothing changed");
    using q = quantizeModel(model, { skip: (n) => n === "lm_head" || n === slot.name });
    assert.equal(slot.get(), wrapped, "explicitly skipped bank stays");
    assert.ok(q.skipped.includes(slot.name));
  }
  assert.equal(liveTensors(), live);
});

Deno.test("nf4: an NF4 expert bank computes what a full-precision bank of its dequantised weights does", () => {
  manualSeed(5);
  assertNoLeak(() => {
    const o = { device: DEVICE };
    using gu = tidy(() => randn([4, 48, 64], o).mul(0.1).to(FLOAT));
    using dn = tidy(() => randn([4, 64, 24], o).mul(0.1).to(FLOAT));
    const names = {
      prefix: "m.experts",
      gate: "gate_proj",
      up: "up_proj",
      down: "down_proj",
      layout: "fused" as const,
    };
    using bank = Nf4Experts.fromStacked(new StackedExperts(gu, dn, names), { doubleQuant: true });
    assert.notEqual(bank.names, names);
    assert.deepEqual(bank.names, names);
    using guD = bank.gateUpWeight.dequantize(), dnD = bank.downWeight.dequantize();
    const ref = new StackedExperts(guD, dnD, names);
    using x = tidy(() => randn([5, 64], o).to(FLOAT));
    using h = tidy(() => randn([5, 24], o).to(FLOAT));
    const tol = FLOAT === "float32" ? 1e-5 : 2e-2;
    const close = (a: Tensor, b: Tensor): void => {
      const d = tidy(() => a.to("float32").sub(b.to("float32")).abs().amax().item());
      assert.ok(d <= tol, `max |Δ| ${d}`);
    };
    for (let e = 0; e < 4; e++) {
      tidy(() => close(bank.gateUp(e, x), ref.gateUp(e, x)));
      tidy(() => close(bank.down(e, h), ref.down(e, h)));
    }
    tidy(() =>
      close(
        bank.gateUpAll(x.unsqueeze(0).expand([4, 5, 64])),
        ref.gateUpAll(x.unsqueeze(0).expand([4, 5, 64])),
      )
    );
    tidy(() =>
      close(bank.downAll(h.unsqueeze(0).expand([4, 5, 24])), ref.downAll(h.unsqueeze(0).expand([4, 5, 24])))
    );
  });
});

Deno.test("nf4: LoRA trains on top of a 4-bit model; the 4-bit base does not change", async () => {
  const live = liveTensors();
  {
    manualSeed(1);
    using model = await loadModel(join(FIXTURES, "models", "qwen3-moe-tiny"), {
      dtype: FLOAT,
      device: DEVICE,
    });
    using q = quantizeModel(model, { doubleQuant: true });
    const lora = new LoraModel(model.decoder, model.config, {
      r: 4,
      alpha: 8,
      dropout: 0,
      targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
      targetExperts: true,
    });
    try {
      const snapshot = (): number[][] =>
        q.entries.length > 0
          ? [...linearSlotsBase(model.decoder), ...expertBase(model.decoder)].map((w) => [
            ...u8(w.packed),
            ...u8(w.dq!.codes),
            ...f32(w.dq!.absmax),
          ])
          : [];
      const before = snapshot();
      const { ids, mask, pos } = await parityInputs("qwen3-moe-tiny");
      using _i = ids, _m = mask, _p = pos;
      // Next-token cross-entropy on the real tokens.
      const lossFn = (): Tensor =>
        tidy(() => {
          const logits = model.decoder.forward({ inputIds: ids, positionIds: pos, attentionMask: mask })
            .logits!;
          const s = ids.size(1);
          const lp = logits.narrow(1, 0, s - 1).logSoftmax(-1, "float32");
          const tgt = ids.narrow(1, 1, s - 1).unsqueeze(-1);
          const m = mask.narrow(1, 1, s - 1).to("float32").mul(mask.narrow(1, 0, s - 1).to("float32"));
          return lp.gather(-1, tgt).squeeze(-1).mul(m).sum().neg().div(m.sum());
        });
      using opt = new AdamW([{ params: lora.parameters(), lr: 1e-2, weightDecay: 0 }]);
      const losses: number[] = [];
      for (let step = 0; step < 8; step++) {
        using loss = lossFn();
        losses.push(loss.item());
        loss.backward();
        opt.step();
        lora.parameters().forEach((p) => p.clearGrad());
      }
      console.log(`  LoRA r=4 on a 4-bit (DQ) model: loss ${losses.map((l) => l.toFixed(3)).join(" → ")}`);
      assert.ok(losses.at(-1)! < losses[0]! - 0.05, "loss decreases");
      assert.deepEqual(snapshot(), before, "4-bit base weights unchanged");
    } finally {
      lora.dispose();
    }
  }
  assert.equal(liveTensors(), live);
});

function linearSlotsBase(decoder: Parameters<typeof linearSlots>[0]): Nf4Weight[] {
  return linearSlots(decoder).flatMap((s) => {
    let l: unknown = s.get();
    while (l && typeof l === "object" && "base" in l) l = (l as { base: unknown }).base;
    return l instanceof Nf4Linear ? [l.weight] : [];
  });
}

function expertBase(decoder: Parameters<typeof expertSlots>[0]): Nf4Weight[] {
  return expertSlots(decoder).flatMap((s) => {
    let b: unknown = s.get();
    while (b && typeof b === "object" && "base" in b) b = (b as { base: unknown }).base;
    return b instanceof Nf4Experts ? [b.gateUpWeight, b.downWeight] : [];
  });
}
