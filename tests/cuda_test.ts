/**
 * CUDA runtime checks. They run only where libtorch sees a GPU (the device
 * check script, scripts/gpu_check.sh); on CPU machines they report as ignored,
 * and the CPU-side contract (a clear error when CUDA is asked for) is tested.
 */
import assert from "node:assert/strict";
import { cuda, Generator, rand, stack, tensor, tidy, TorchError, zeros } from "../ffi/mod.ts";

const hasCuda = cuda.isAvailable();

Deno.test({ name: "cuda: unavailable device gives a clear error", ignore: hasCuda }, () => {
  assert.equal(cuda.deviceCount(), 0);
  assert.throws(() => zeros([2], { device: "cuda" }), TorchError);
  assert.throws(() => cuda.synchronize(), /CUDA/);
});

Deno.test({ name: "cuda: memory statistics track allocations", ignore: !hasCuda }, () => {
  cuda.synchronize();
  cuda.resetPeakMemoryStats();
  const before = cuda.memoryStats();
  const bytes = 64 << 20;
  const t = zeros([bytes / 4], { device: "cuda" });
  cuda.synchronize();
  const during = cuda.memoryStats();
  assert.ok(
    during.allocated - before.allocated >= bytes,
    `allocated grew by ${during.allocated - before.allocated}`,
  );
  assert.ok(during.peakAllocated >= during.allocated);
  assert.ok(during.reserved >= during.allocated);
  t.dispose();
  const after = cuda.memoryStats();
  assert.ok(after.allocated <= before.allocated, "freeing returns the bytes to the allocator");
  assert.ok(after.peakAllocated >= during.allocated, "peak survives the free");
});

Deno.test({ name: "cuda: seeded generators are reproducible on the device", ignore: !hasCuda }, () => {
  using g1 = new Generator(7, "cuda");
  using g2 = new Generator(7, "cuda");
  using a = rand([16], { device: "cuda", generator: g1 });
  using b = rand([16], { device: "cuda", generator: g2 });
  assert.deepEqual(a.toArray(), b.toArray());
  assert.equal(a.device, "cuda:0");
});

Deno.test({
  name: "cuda: tensors made from host data arrive intact while the uploads queue behind device work",
  ignore: !hasCuda,
}, () => {
  // Uploads are asynchronous from pinned staging blocks (ffi/shim/moerl.cpp mt_from_data): a block reused
  // before its copy ran would show up as a wrong sum. A large matmul keeps the stream busy meanwhile.
  using busy = rand([4096, 4096], { device: "cuda" });
  const n = 64, len = 10_000;
  const sums = tidy(() => {
    const parts = [];
    for (let i = 0; i < n; i++) {
      busy.matmul(busy).dispose(); // queued work; its memory goes back in stream order
      parts.push(tensor(Array.from({ length: len }, (_, j) => (i * 31 + j) % 97), { device: "cuda" }).sum());
    }
    return stack(parts, 0).toArray();
  });
  const expected = Array.from({ length: n }, (_, i) => {
    let s = 0;
    for (let j = 0; j < len; j++) s += (i * 31 + j) % 97;
    return s;
  });
  assert.deepEqual(sums, expected);
});
