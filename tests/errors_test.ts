/**
 * Bad inputs throw catchable errors that name the op and the input shapes,
 * carry no C++ backtrace, and leave the library usable: after every failure
 * the next op is run and its value checked. That the process is still alive
 * to run the later tests is the proof that no error aborted it.
 *
 * Uses FLOAT on DEVICE, except out-of-range indices and invalid multinomial
 * probabilities, which run on the CPU: on CUDA those are device-side asserts
 * that poison the whole CUDA context instead of raising a catchable error.
 */
import assert from "node:assert/strict";
import {
  cat,
  cuda,
  type Device,
  type DType,
  embedding,
  fromTypedArray,
  liveTensors,
  nativeLiveCount,
  tensor,
  tidy,
  TorchError,
  zeros,
} from "../ffi/mod.ts";
import { assertClose, assertNoLeak, DEVICE, FLOAT } from "./util.ts";
import { loadModel } from "../model/model.ts";

const FL = { dtype: FLOAT, device: DEVICE } as const;
const CPU_I64 = { dtype: "int64", device: "cpu" } as const;
const startJs = liveTensors();
const startNative = nativeLiveCount();

type ErrorClass = new (...args: never[]) => Error;

interface Expect {
  /** Error class expected (TorchError for failures inside libtorch or the shim). */
  type: ErrorClass;
  /** For TorchError: the op name and input shapes it must report. */
  op?: string;
  shapes?: number[][];
  /** Patterns the message must match. */
  match?: RegExp[];
}

/** A simple op whose value is checked: proof that the library still works. */
function nextOpWorks(): void {
  using a = tensor([[1, 2], [3, 4]], FL);
  using b = a.matmul(a);
  using s = b.sum();
  assertClose([s.item()], [7 + 10 + 15 + 22], 0, "matmul after an error");
}

/** Asserts fn throws as described, then that the next op still works. */
function throwsThen(fn: () => unknown, want: Expect, what: string): Error {
  let caught: unknown;
  try {
    const r = fn();
    (r as { dispose?: () => void } | null)?.dispose?.();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught !== undefined, `${what}: did not throw`);
  assert.ok(caught instanceof want.type, `${what}: expected ${want.type.name}, got ${caught}`);
  const msg = caught.message;
  assert.doesNotMatch(msg, /Exception raised from|frame #\d/, `${what}: C++ backtrace in message:\n${msg}`);
  if (want.op !== undefined) {
    assert.ok(caught instanceof TorchError);
    assert.equal(caught.op, want.op, `${what}: op`);
    const args = (want.shapes ?? []).map((s) => `[${s.join(", ")}]`).join(", ");
    assert.deepEqual(caught.shapes, want.shapes ?? [], `${what}: shapes`);
    assert.ok(
      msg.startsWith(`${want.op}(${args}): `),
      `${what}: message should start with "${want.op}(${args}): "\n${msg}`,
    );
    assert.ok(msg.length > `${want.op}(${args}): `.length, `${what}: empty libtorch detail`);
  }
  for (const re of want.match ?? []) assert.match(msg, re, `${what}: message`);
  nextOpWorks();
  return caught;
}

Deno.test("errors: shape mismatches name the op and both shapes", () => {
  assertNoLeak(() => {
    using a = zeros([2, 3], FL);
    using b = zeros([4, 5], FL);
    using v = zeros([4], FL);
    using c = zeros([3, 4], FL);
    throwsThen(() => a.matmul(b), {
      type: TorchError,
      op: "matmul",
      shapes: [[2, 3], [4, 5]],
      match: [/2x3|shapes/],
    }, "matmul");
    throwsThen(
      () => a.add(v),
      { type: TorchError, op: "add", shapes: [[2, 3], [4]], match: [/size/] },
      "add",
    );
    throwsThen(() => cat([a, c]), {
      type: TorchError,
      op: "cat",
      shapes: [[2, 3], [3, 4]],
      match: [/[Ss]izes/],
    }, "cat");
    throwsThen(() => cat([a, c], 1), { type: TorchError, op: "cat", shapes: [[2, 3], [3, 4]] }, "cat dim 1");
    throwsThen(() => a.reshape([4]), {
      type: TorchError,
      op: "reshape",
      shapes: [[2, 3]],
      match: [/\[4\]/, /6/],
    }, "reshape");
    throwsThen(
      () => a.reshape([-1, -1]),
      { type: TorchError, op: "reshape", shapes: [[2, 3]] },
      "reshape two -1",
    );
  });
});

Deno.test("errors: bad dtypes", () => {
  assertNoLeak(() => {
    using f = zeros([2, 3], FL);
    using i = tensor([[1], [2], [3]], { dtype: "int64", device: DEVICE });
    using w = zeros([5, 3], FL);
    using fi = tensor([0, 1], FL);
    throwsThen(
      () => f.matmul(i),
      { type: TorchError, op: "matmul", shapes: [[2, 3], [3, 1]], match: [/Long|int64|scalar type|dtype/i] },
      "matmul int64 × float",
    );
    throwsThen(
      () => embedding(w, fi),
      { type: TorchError, op: "embedding", shapes: [[5, 3], [2]], match: [/Long|Int|indices/] },
      "embedding float index",
    );
    throwsThen(
      () => fromTypedArray(new Float32Array(5), [2, 3]),
      { type: TypeError, match: [/fromTypedArray/, /\[2, 3\]/, /20 bytes/] },
      "fromTypedArray short buffer",
    );
    throwsThen(
      () => fromTypedArray(new Float64Array(6), [2, 3], { dtype: "float32" }),
      { type: TypeError, match: [/fromTypedArray/, /\[2, 3\]/, /48 bytes/] },
      "fromTypedArray dtype/buffer size disagree",
    );
    // JS-side validation: names the bad dtype (not the op or shape: see report)
    throwsThen(() => f.to("float128" as DType), { type: TypeError, match: [/float128/] }, "to(float128)");
    throwsThen(
      () => zeros([2], { dtype: "complex64" as DType }),
      { type: TypeError, match: [/complex64/] },
      "zeros(complex64)",
    );
    // Names every object has (Object.prototype's) are no dtypes either
    throwsThen(
      () => f.to("constructor" as DType),
      { type: TypeError, match: [/"constructor"/] },
      "to(constructor)",
    );
    throwsThen(
      () => zeros([2], { dtype: "toString" as DType }),
      { type: TypeError, match: [/unknown dtype "toString"/] },
      "zeros(toString)",
    );
    throwsThen(
      () => fromTypedArray(new Uint8Array(2), [2], { dtype: "valueOf" as DType }),
      { type: TypeError, match: [/unknown dtype "valueOf"/] },
      "fromTypedArray(valueOf)",
    );
  });
});

Deno.test("errors: use after dispose throws and says so", () => {
  assertNoLeak(() => {
    const x = tensor([1, 2, 3], FL);
    using y = tensor([1, 1, 1], FL);
    x.dispose();
    x.dispose(); // idempotent
    assert.equal(x.disposed, true);
    const afterDispose = { type: Error, match: [/dispose/] };
    throwsThen(() => x.add(1), afterDispose, "method on disposed");
    throwsThen(() => y.add(x), afterDispose, "disposed argument");
    throwsThen(() => y.matmul(x), afterDispose, "disposed matmul argument");
    throwsThen(() => cat([y, x]), afterDispose, "disposed tensor in a list");
    throwsThen(() => x.item(), afterDispose, "item");
    throwsThen(() => x.toArray(), afterDispose, "toArray");
    throwsThen(() => x.setRequiresGrad(), afterDispose, "setRequiresGrad");
    throwsThen(() => x.requiresGrad, afterDispose, "requiresGrad");
    assert.equal(String(x), "Tensor(disposed)");
  });
});

// Metadata is cached on first read; it must still refuse after dispose().
Deno.test("errors: shape of a disposed tensor throws", () => {
  const x = tensor([1, 2, 3], FL);
  assert.deepEqual(x.shape, [3]);
  x.dispose();
  assert.throws(() => x.shape, /dispose/);
  assert.throws(() => x.dtype, /dispose/);
});

Deno.test("errors: out-of-range indices", () => {
  assertNoLeak(() => {
    // index errors on CPU: on CUDA they are device-side asserts (fatal to the context)
    using m = tensor([[1, 2], [3, 4], [5, 6]], { dtype: "float32", device: "cpu" });
    using i10 = tensor([10], CPU_I64);
    using g = tensor([[0, 7], [1, 1], [0, 0]], CPU_I64);
    throwsThen(
      () => m.indexSelect(0, i10),
      { type: TorchError, op: "index_select", shapes: [[3, 2], [1]], match: [/out of range|bounds/i] },
      "indexSelect 10 of 3",
    );
    throwsThen(
      () => m.gather(1, g),
      { type: TorchError, op: "gather", shapes: [[3, 2], [3, 2]], match: [/index 7 is out of bounds/] },
      "gather",
    );
    using e = zeros([3, 2], { dtype: "float32", device: "cpu" });
    using big = tensor([0, 3], CPU_I64);
    throwsThen(
      () => embedding(e, big),
      { type: TorchError, op: "embedding", shapes: [[3, 2], [2]], match: [/out of range/] },
      "embedding id 3 of 3",
    );

    // host-side checks: fine on any device
    using t = zeros([2, 3], FL);
    throwsThen(
      () => t.select(0, 5),
      { type: TorchError, op: "select", shapes: [[2, 3]], match: [/index 5 out of range/] },
      "select(0, 5)",
    );
    throwsThen(
      () => t.narrow(1, 2, 5),
      { type: TorchError, op: "narrow", shapes: [[2, 3]], match: [/exceeds dimension size/] },
      "narrow past the end",
    );
    throwsThen(() => t.transpose(0, 2), {
      type: TorchError,
      op: "transpose",
      shapes: [[2, 3]],
      match: [/[Dd]imension/],
    }, "transpose dim 2");
    throwsThen(
      () => t.sum(3),
      { type: TorchError, op: "sum", shapes: [[2, 3]], match: [/[Dd]imension/] },
      "sum dim 3",
    );
    throwsThen(() => t.size(5), { type: RangeError, match: [/size\(5\)/, /2 dims/] }, "size(5)");
    throwsThen(() => t.size(-3), { type: RangeError, match: [/size\(-3\)/] }, "size(-3)");
    // Integers past 2^53 would wrap in int64 and pass for small ones: refused before the call.
    throwsThen(() => t.narrow(1, 0, 2 ** 64), {
      type: RangeError,
      match: [/narrow: expected an integer within ±2\^53/],
    }, "narrow 2^64");
    throwsThen(
      () => zeros([2 ** 64, 3]),
      { type: TypeError, match: [/expected integers \(within ±2\^53\)/] },
      "zeros 2^64",
    );
  });
});

Deno.test("errors: multinomial with negative probabilities", () => {
  assertNoLeak(() => {
    // CPU: on CUDA an invalid distribution may be a device-side assert
    using p = tensor([[0.5, -0.1, 0.6]], { dtype: "float32", device: "cpu" });
    throwsThen(
      () => p.multinomial(1),
      { type: TorchError, op: "multinomial", shapes: [[1, 3]], match: [/< 0|negative/] },
      "multinomial",
    );
    using q = tensor([[0.2, 0.8]], FL);
    throwsThen(
      () => q.multinomial(3, false),
      { type: TorchError, op: "multinomial", shapes: [[1, 2]], match: [/sample|replacement/] },
      "3 draws from 2 without replacement",
    );
  });
});

Deno.test("errors: backward on a non-scalar without grad; item() of many elements", () => {
  assertNoLeak(() => {
    using x = tensor([1, 2, 3], FL).setRequiresGrad();
    tidy(() => {
      const y = x.mul(2);
      throwsThen(
        () => y.backward(),
        { type: TorchError, op: "backward", shapes: [[3]], match: [/scalar/] },
        "backward",
      );
      using wrongGrad = zeros([2], FL);
      throwsThen(
        () => y.backward(wrongGrad),
        { type: TorchError, op: "backward", shapes: [[3], [2]], match: [/shape|size/i] },
        "backward with a wrong-shaped grad",
      );
    });
    assert.equal(x.grad === null, true, "failed backward left no grad");
    using m = zeros([2, 3], FL);
    throwsThen(
      () => m.item(),
      { type: TorchError, op: "item", shapes: [[2, 3]], match: [/6 elements/] },
      "item",
    );
  });
});

Deno.test("errors: bad device strings", () => {
  assertNoLeak(() => {
    throwsThen(() => zeros([2], { device: "gpu" as Device }), {
      type: TypeError,
      match: [/"gpu"/, /cpu.*cuda/],
    }, "zeros on gpu");
    throwsThen(
      () => tensor([1], { device: "cuda:x" as Device }),
      { type: TypeError, match: [/"cuda:x"/] },
      "tensor on cuda:x",
    );
    using t = zeros([2], FL);
    // to() treats a non-device string as a dtype, so this says 'unknown dtype "gpu"' (see report)
    throwsThen(() => t.to("gpu" as Device), { type: TypeError, match: [/"gpu"/] }, "to(gpu)");
  });
});

Deno.test({ name: "errors: CUDA requested where it is unavailable", ignore: cuda.isAvailable() }, () => {
  assertNoLeak(() => {
    throwsThen(() => zeros([2], { device: "cuda" }), {
      type: TorchError,
      op: "full",
      shapes: [],
      match: [/CUDA/],
    }, "zeros on cuda");
    using t = zeros([2], FL);
    throwsThen(
      () => t.to("cuda"),
      { type: TorchError, op: "to", shapes: [[2]], match: [/CUDA/] },
      "to(cuda)",
    );
    throwsThen(() => fromTypedArray(new Float32Array(2), [2], { device: "cuda:0" }), {
      type: TorchError,
      op: "from_data",
      match: [/CUDA/],
    }, "fromTypedArray on cuda");
    throwsThen(() => cuda.synchronize(), {
      type: TorchError,
      op: "cuda_synchronize",
      match: [/CUDA is not available/],
    }, "synchronize");
  });
});

Deno.test({
  name: "errors: loadModel on CUDA where it is unavailable names the device before reading the model",
  ignore: cuda.isAvailable(),
}, async () => {
  const live = liveTensors();
  for (const id of ["./fixtures/models/qwen3-moe-tiny", "./fixtures/models/none"]) {
    await assert.rejects(
      loadModel(new URL(id, import.meta.url).pathname, { device: "cuda" }),
      /^Error: loadModel: device "cuda": CUDA is not available here \(libtorch [\d.]+\)$/,
    );
  }
  assert.equal(liveTensors(), live);
});

Deno.test("errors: a model dtype this libtorch cannot compute in on the device is named as the setting", async () => {
  const dir = new URL("./fixtures/models/qwen3-moe-tiny", import.meta.url).pathname;
  const live = liveTensors();
  // float16 matmuls on the CPU exist from libtorch 2.x on; 1.13 lacks them. Either it runs, or the error
  // names the dtype (it named an internal kernel, from deep in the first forward).
  try {
    using model = await loadModel(dir, { dtype: "float16", device: "cpu" });
    assert.equal(model.decoder.embed.dtype, "float16");
  } catch (e) {
    assert.match(
      (e as Error).message,
      /^dtype float16 on cpu: libtorch [\d.]+ cannot compute a matmul in it/,
    );
  }
  assert.equal(liveTensors(), live);
  { // a dtype that passes the probe: its product is freed too
    using model = await loadModel(dir, { dtype: "bfloat16", device: "cpu" });
    assert.equal(model.decoder.embed.dtype, "bfloat16");
  }
  assert.equal(liveTensors(), live, "the probe's tensors are freed");
});

Deno.test("errors: after all of the above, nothing is left alive", () => {
  nextOpWorks();
  assert.equal(liveTensors(), startJs);
  assert.equal(nativeLiveCount(), startNative);
});
