/**
 * Value tests for tensor creation, metadata, reading values back, random
 * draws, dtype casts and device moves. Runs on MOERL_TEST_DEVICE with float
 * dtype MOERL_TEST_DTYPE (see tests/util.ts).
 */
import assert from "node:assert/strict";
import {
  arange,
  fromTypedArray,
  full,
  Generator,
  manualSeed,
  ones,
  rand,
  randn,
  tensor,
  TorchError,
  zeros,
} from "../ffi/mod.ts";
import { DEVICE, FLOAT } from "./util.ts";
import { BOOL, DEVICE_NAME, expectExact, F, ft, I64, ids, meanOf, step, varOf } from "./ops_helpers.ts";

Deno.test("creation", async (t) => {
  await step(t, "tensor from nested arrays", () => {
    const x = tensor([[1, 2, 3], [4, 5, 6]], F);
    assert.deepEqual(x.shape, [2, 3]);
    assert.equal(x.dtype, FLOAT);
    assert.equal(x.device, DEVICE_NAME);
    assert.deepEqual(x.tolist(), [[1, 2, 3], [4, 5, 6]]);

    const cube = ft([[[0.5, -1]], [[2.25, 4]]]);
    expectExact(cube, [2, 1, 2], [0.5, -1, 2.25, 4]);

    const scalar = ft(2.5);
    assert.deepEqual(scalar.shape, []);
    assert.equal(scalar.ndim, 0);
    assert.equal(scalar.numel, 1);
    assert.equal(scalar.item(), 2.5);

    // Defaults: float32 on the CPU.
    const d = tensor([[0.5], [1.5]]);
    assert.equal(d.dtype, "float32");
    assert.equal(d.device, "cpu");
    assert.deepEqual(d.shape, [2, 1]);

    assert.throws(() => tensor([[1, 2], [3]]), TypeError);
  });

  await step(t, "tensor of bools and int64", () => {
    const b = tensor([[true, false], [false, true]], { device: DEVICE });
    assert.equal(b.dtype, "bool");
    expectExact(b, [2, 2], [1, 0, 0, 1], "bool");
    assert.ok(b.toTypedArray() instanceof Uint8Array);

    const i = tensor([[3, -4], [2 ** 40, 7]], I64);
    expectExact(i, [2, 2], [3, -4, 2 ** 40, 7], "int64");
    assert.deepEqual(i.toTypedArray(), BigInt64Array.from([3n, -4n, 2n ** 40n, 7n]));
    // Non-integers are truncated toward zero on the way in.
    expectExact(ids([2.7, -2.7]), [2], [2, -2], "int64");
    // Numbers with dtype bool: non-zero is true.
    expectExact(tensor([0, 2, -1], BOOL), [3], [0, 1, 1], "bool");
    // Values an integer dtype cannot hold are refused, as PyTorch does (a typed array would wrap them).
    for (
      const [values, dtype, reason] of [
        [[1, 300], "uint8", /value 300 at 1 does not fit uint8/],
        [[-1], "uint8", /value -1 at 0 does not fit uint8/],
        [[200], "int8", /value 200 at 0 does not fit int8/],
        [[1e10], "int32", /value 10000000000 at 0 does not fit int32/],
        [[NaN], "int64", /value NaN at 0 does not fit int64/],
        [[2 ** 63], "int64", /does not fit int64/],
      ] as const
    ) {
      assert.throws(() => tensor([...values], { dtype, device: DEVICE }), reason);
    }
    expectExact(tensor([255, 0], { dtype: "uint8", device: DEVICE }), [2], [255, 0], "uint8");
  });

  await step(t, "fromTypedArray", () => {
    const f = fromTypedArray(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3], { device: DEVICE });
    expectExact(f, [2, 3], [1, 2, 3, 4, 5, 6], "float32");

    const i32 = fromTypedArray(new Int32Array([-1, 7, 2 ** 30]), [3], { device: DEVICE });
    expectExact(i32, [3], [-1, 7, 2 ** 30], "int32");

    const i64 = fromTypedArray(BigInt64Array.from([-(2n ** 50n), 9n]), [2, 1], { device: DEVICE });
    expectExact(i64, [2, 1], [-(2 ** 50), 9], "int64");

    const b = fromTypedArray(new Uint8Array([0, 1, 1, 0]), [2, 2], { dtype: "bool", device: DEVICE });
    expectExact(b, [2, 2], [0, 1, 1, 0], "bool");
    const u8 = fromTypedArray(new Uint8Array([0, 200, 255]), [3], { device: DEVICE });
    expectExact(u8, [3], [0, 200, 255], "uint8");

    // Raw 16-bit floats: 1.0 and -2.0 and 3.0 in each format.
    const bf = fromTypedArray(new Uint16Array([0x3f80, 0xc000, 0x4040]), [3], {
      dtype: "bfloat16",
      device: DEVICE,
    });
    expectExact(bf, [3], [1, -2, 3], "bfloat16");
    const hf = fromTypedArray(new Uint16Array([0x3c00, 0xc000, 0x4200]), [3], {
      dtype: "float16",
      device: DEVICE,
    });
    expectExact(hf, [3], [1, -2, 3], "float16");

    // A view with a byte offset copies only its own elements.
    const sub = new Float32Array([9, 1, 2, 3, 4]).subarray(1);
    expectExact(fromTypedArray(sub, [4], { device: DEVICE }), [4], [1, 2, 3, 4], "float32");

    // The data is copied: changing the source afterwards does not change the tensor.
    const src = new Float32Array([1, 2]);
    const copied = fromTypedArray(src, [2], { device: DEVICE });
    src[0] = 100;
    expectExact(copied, [2], [1, 2], "float32");

    // Byte count must match the shape and dtype.
    assert.throws(() => fromTypedArray(new Float32Array(5), [2, 3]), TypeError);
    assert.throws(() => fromTypedArray(new Float32Array(4), [4], { dtype: "int64" }), TypeError);
    // An array of one type is not read as another of the same width; raw bytes come as a Uint8Array.
    assert.throws(
      () => fromTypedArray(new Float32Array([1, 2]), [2], { dtype: "int32" }),
      /a Float32Array does not hold int32 values/,
    );
    assert.throws(() => fromTypedArray(new BigInt64Array(2), [4], { dtype: "int32" }), /does not hold int32/);
    using raw = fromTypedArray(new Uint8Array(new Float32Array([1.5]).buffer), [1], { dtype: "float32" });
    assert.deepEqual(raw.toArray(), [1.5]);
    // Ragged lists are refused wherever the extra depth or length appears.
    assert.throws(() => tensor([[1, 2], [3, [4]]] as unknown as number[][]), /ragged nested array/);
    assert.throws(() => tensor([1, [2, 3]] as unknown as number[]), /ragged nested array/);
    assert.throws(() => tensor([[1, 2], [3]]), /ragged nested array/);
  });

  await step(t, "zeros, ones, full", () => {
    expectExact(zeros([2, 3], F), [2, 3], [0, 0, 0, 0, 0, 0]);
    expectExact(ones([3], F), [3], [1, 1, 1]);
    expectExact(full([2, 2], -2.5, F), [2, 2], [-2.5, -2.5, -2.5, -2.5]);
    expectExact(full([3], 7, I64), [3], [7, 7, 7], "int64");
    expectExact(ones([2], BOOL), [2], [1, 1], "bool");
    expectExact(full([], 3.5, F), [], [3.5]);
    const empty = zeros([0, 3], F);
    assert.deepEqual(empty.shape, [0, 3]);
    assert.equal(empty.numel, 0);
    assert.deepEqual(empty.toArray(), []);
    // Defaults: float32 on the CPU.
    const d = zeros([1]);
    assert.equal(d.dtype, "float32");
    assert.equal(d.device, "cpu");
  });

  await step(t, "arange", () => {
    expectExact(arange(0, 5, 1, { device: DEVICE }), [5], [0, 1, 2, 3, 4], "int64");
    expectExact(arange(2, 11, 3, { device: DEVICE }), [3], [2, 5, 8], "int64");
    expectExact(arange(5, 0, -2, { device: DEVICE }), [3], [5, 3, 1], "int64");
    expectExact(arange(0, 1, 0.25, F), [4], [0, 0.25, 0.5, 0.75]);
    expectExact(arange(-1, 1, 0.5, F), [4], [-1, -0.5, 0, 0.5]);
    expectExact(arange(0, 3, 1, F), [3], [0, 1, 2]);
    assert.equal(arange(0, 3).dtype, "int64");
  });

  await step(t, "metadata", () => {
    const x = zeros([2, 3, 4], F);
    assert.deepEqual(x.shape, [2, 3, 4]);
    assert.equal(x.dtype, FLOAT);
    assert.equal(x.device, DEVICE_NAME);
    assert.equal(x.ndim, 3);
    assert.equal(x.numel, 24);
    assert.equal(x.size(0), 2);
    assert.equal(x.size(-1), 4);
    assert.equal(x.size(-3), 2);
    assert.throws(() => x.size(3), RangeError);
    assert.throws(() => x.size(-4), RangeError);
    assert.throws(() => x.size(NaN), /size\(NaN\): tensor has 3 dims/);
    assert.throws(() => x.size(0.5), RangeError);
    // shape is a copy.
    const s = x.shape;
    s[0] = 99;
    assert.deepEqual(x.shape, [2, 3, 4]);
    assert.equal(String(x), `Tensor([2, 3, 4], ${FLOAT}, ${DEVICE_NAME})`);
  });

  await step(t, "reading values: toTypedArray, toArray, tolist, item", () => {
    const f32 = tensor([1.5, -2], { dtype: "float32", device: DEVICE }).toTypedArray();
    assert.ok(f32 instanceof Float32Array);
    assert.deepEqual(Array.from(f32), [1.5, -2]);
    const i32 = tensor([3, -4], { dtype: "int32", device: DEVICE }).toTypedArray();
    assert.ok(i32 instanceof Int32Array);
    assert.deepEqual(Array.from(i32), [3, -4]);
    // Half types come back as raw bits.
    const bf = tensor([1, -2], { dtype: "bfloat16", device: DEVICE }).toTypedArray();
    assert.ok(bf instanceof Uint16Array);
    assert.deepEqual(Array.from(bf), [0x3f80, 0xc000]);
    const hf = tensor([1, -2], { dtype: "float16", device: DEVICE }).toTypedArray();
    assert.ok(hf instanceof Uint16Array);
    assert.deepEqual(Array.from(hf), [0x3c00, 0xc000]);

    const x = ft([[[1, 2], [3, 4]], [[5, 6], [7, 8]]]);
    assert.deepEqual(x.toArray(), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(x.tolist(), [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]);
    assert.deepEqual(ids([[1], [2]]).tolist(), [[1], [2]]);
    assert.deepEqual(ft(4.5).tolist(), 4.5);

    assert.equal(ft([[4.5]]).item(), 4.5);
    assert.equal(ids([-7]).item(), -7);
    assert.equal(tensor([true], BOOL).item(), 1);
    assert.throws(() => ft([1, 2]).item(), TorchError);
  });
});

Deno.test("random", async (t) => {
  await step(t, "rand with a seeded Generator", () => {
    using g1 = new Generator(42, DEVICE);
    using g2 = new Generator(42, DEVICE);
    using g3 = new Generator(43, DEVICE);
    const a = rand([200], { ...F, generator: g1 }).toArray();
    const b = rand([200], { ...F, generator: g2 }).toArray();
    const c = rand([200], { ...F, generator: g3 }).toArray();
    const a2 = rand([200], { ...F, generator: g1 }).toArray();
    assert.deepEqual(a, b, "same seed, same values");
    assert.notDeepEqual(a, c, "different seed, different values");
    assert.notDeepEqual(a, a2, "a generator advances");
    assert.ok(new Set(a).size > 20, "rand values vary");
    const r = rand([2, 3], { ...F, generator: g1 });
    assert.deepEqual(r.shape, [2, 3]);
    assert.equal(r.dtype, FLOAT);
    assert.equal(r.device, DEVICE_NAME);
  });

  // 100k draws so that an upper bound of 1 shows up reliably if it can occur. Known to
  // FAIL on (cuda, bfloat16/float16): CUDA uniform_ rounds values near 1 up to 1.0 when
  // casting to the half type (pytorch/pytorch#96947). Not skipped: it is a real hazard
  // for code such as log(1 - u).
  await step(t, "rand stays in [0, 1) (100k draws, global and seeded)", () => {
    using g = new Generator(99, DEVICE);
    for (const r of [rand([100_000], F), rand([100_000], { ...F, generator: g })]) {
      const xs = r.toArray();
      const bad = xs.filter((v) => !(v >= 0 && v < 1));
      assert.deepEqual(bad.slice(0, 5), [], `${bad.length} of ${xs.length} rand values outside [0, 1)`);
      const m = meanOf(xs);
      assert.ok(Math.abs(m - 0.5) < 0.01, `rand mean ${m}`);
      assert.ok(
        Math.min(...xs.slice(0, 1000)) < 0.01 && Math.max(...xs.slice(0, 1000)) > 0.99,
        "rand spans [0, 1)",
      );
    }
  });

  await step(t, "randn with a seeded Generator: reproducible, mean ~0, std ~1", () => {
    using g1 = new Generator(7, DEVICE);
    using g2 = new Generator(7, DEVICE);
    using g3 = new Generator(8, DEVICE);
    const a = randn([10_000], { ...F, generator: g1 }).toArray();
    const b = randn([10_000], { ...F, generator: g2 }).toArray();
    const c = randn([10_000], { ...F, generator: g3 }).toArray();
    assert.deepEqual(a, b);
    assert.notDeepEqual(a, c);
    for (const xs of [a, c]) {
      const m = meanOf(xs), s = Math.sqrt(varOf(xs));
      assert.ok(Math.abs(m) < 0.05, `randn mean ${m}`);
      assert.ok(Math.abs(s - 1) < 0.05, `randn std ${s}`);
      assert.ok(xs.some((v) => v < -2) && xs.some((v) => v > 2), "randn has tails");
    }
  });

  await step(t, "manualSeed makes the global generator reproducible", () => {
    manualSeed(1234);
    const a = rand([64], F).toArray();
    const an = randn([64], F).toArray();
    manualSeed(1234);
    const b = rand([64], F).toArray();
    const bn = randn([64], F).toArray();
    manualSeed(1235);
    const c = rand([64], F).toArray();
    assert.deepEqual(a, b);
    assert.deepEqual(an, bn);
    assert.notDeepEqual(a, c);
    manualSeed(5n); // bigint seeds too
  });
});

Deno.test("casts and devices", async (t) => {
  const f32 = { dtype: "float32", device: DEVICE } as const;

  await step(t, "float → int64 / int32 truncates toward zero", () => {
    const x = tensor([2.7, -2.7, 0.5, -0.5, 3, -3], f32);
    expectExact(x.to("int64"), [6], [2, -2, 0, 0, 3, -3], "int64");
    expectExact(x.to("int32"), [6], [2, -2, 0, 0, 3, -3], "int32");
    // From FLOAT as well (bf16(2.7) = 2.703125, still truncates to 2).
    const y = ft([2.7, -2.7, 1.5, -1.5]);
    expectExact(y.to("int64"), [4], [2, -2, 1, -1], "int64");
    assert.ok(y.to("int64").toTypedArray() instanceof BigInt64Array);
  });

  await step(t, "→ bool and bool →", () => {
    expectExact(tensor([0, 2, -0.5, 0], f32).to("bool"), [4], [0, 1, 1, 0], "bool");
    expectExact(ft([0, 2]).to("bool"), [2], [0, 1], "bool");
    expectExact(ids([0, 3, -1]).to("bool"), [3], [0, 1, 1], "bool");
    const b = tensor([true, false, true], BOOL);
    expectExact(b.to("float32"), [3], [1, 0, 1], "float32");
    expectExact(b.to(FLOAT), [3], [1, 0, 1], FLOAT);
    expectExact(b.to("int64"), [3], [1, 0, 1], "int64");
    expectExact(b.to("uint8"), [3], [1, 0, 1], "uint8");
  });

  await step(t, "→ uint8 (wraps modulo 256 from integers)", () => {
    expectExact(ids([0, 255, 256, -1, 513]).to("uint8"), [5], [0, 255, 0, 255, 1], "uint8");
    expectExact(tensor([3.9, 200, 0.25], f32).to("uint8"), [3], [3, 200, 0], "uint8");
    expectExact(
      tensor([0, 7, 255], { dtype: "uint8", device: DEVICE }).to("float32"),
      [3],
      [0, 7, 255],
      "float32",
    );
  });

  await step(t, "float32 ↔ bfloat16 / float16 rounding", () => {
    const x = tensor([1.5, -2.25, 257, 2049, 1 / 3], f32);
    // bf16 keeps 8 significant bits: 257 → 256 (tie to even), 2049 → 2048, 1/3 → 171/512.
    const bf = x.to("bfloat16");
    assert.equal(bf.dtype, "bfloat16");
    expectExact(bf.to("float32"), [5], [1.5, -2.25, 256, 2048, 171 / 512], "float32");
    // f16 keeps 11: 257 exact, 2049 → 2048 (tie to even), 1/3 → 1365/4096.
    const hf = x.to("float16");
    assert.equal(hf.dtype, "float16");
    expectExact(hf.to("float32"), [5], [1.5, -2.25, 257, 2048, 1365 / 4096], "float32");
    // toArray converts half types to numbers itself.
    assert.deepEqual(bf.toArray(), [1.5, -2.25, 256, 2048, 171 / 512]);
    // Between the two half types.
    expectExact(hf.to("bfloat16").to("float32"), [5], [1.5, -2.25, 256, 2048, 171 / 512], "float32");
    // Integers → half.
    expectExact(ids([3, -4, 257]).to("bfloat16"), [3], [3, -4, 256], "bfloat16");
  });

  await step(t, "between integer types and floats", () => {
    const i = ids([-3, 5, 2 ** 31 + 1]);
    const i32 = i.to("int32");
    assert.ok(i32.toTypedArray() instanceof Int32Array);
    expectExact(i32, [3], [-3, 5, -(2 ** 31) + 1], "int32"); // wraps modulo 2^32
    expectExact(i32.to("int64"), [3], [-3, 5, -(2 ** 31) + 1], "int64");
    expectExact(ids([-3, 5]).to("float32"), [2], [-3, 5], "float32");
    expectExact(ids([-3, 5]).to(FLOAT), [2], [-3, 5], FLOAT);
  });

  await step(t, "to(): same dtype aliases, copy option copies", () => {
    const x = ft([1, 2, 3]);
    const same = x.to(FLOAT);
    same.fill_(9);
    assert.deepEqual(x.toArray(), [9, 9, 9], "to() with nothing to change returns the same storage");
    const copy = x.to(FLOAT, { copy: true });
    copy.fill_(4);
    assert.deepEqual(x.toArray(), [9, 9, 9], "copy: true gives independent storage");
    assert.deepEqual(copy.toArray(), [4, 4, 4]);
  });

  await step(t, "to(DEVICE) and back to cpu", () => {
    const cpu = tensor([[1.5, -2], [3, 4.25]]);
    assert.equal(cpu.device, "cpu");
    const dev = cpu.to(DEVICE);
    assert.equal(dev.device, DEVICE_NAME);
    assert.equal(dev.dtype, "float32");
    assert.deepEqual(dev.tolist(), [[1.5, -2], [3, 4.25]]);
    const back = dev.to("cpu");
    assert.equal(back.device, "cpu");
    assert.deepEqual(back.tolist(), [[1.5, -2], [3, 4.25]]);
    // Integer and bool tensors move too.
    const idx = ids([4, 5]).to("cpu");
    assert.equal(idx.device, "cpu");
    assert.equal(idx.dtype, "int64");
    assert.deepEqual(idx.toArray(), [4, 5]);
    // A cast on DEVICE stays on DEVICE.
    assert.equal(ft([1]).to("int64").device, DEVICE_NAME);
  });
});
