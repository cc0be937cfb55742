/**
 * CUDA graphs through the shim (ffi/graph.ts). Everywhere: the eager stand-in
 * a CPU (or a shim without CUDA headers) gets, and the shim's errors as data.
 * With a GPU (ignored otherwise): capture and replay on static tensors, a
 * capture broken by a host sync, a shared pool, and no graph left behind.
 */
import assert from "node:assert/strict";
import {
  cuda,
  CudaGraph,
  cudaGraphsSupported,
  graphPool,
  liveGraphs,
  liveTensors,
  nativeLiveCount,
  tensor,
  TorchError,
  zeros,
} from "../ffi/mod.ts";
import { ctx, lastError, shim } from "../ffi/lib.ts";
import { DEVICE } from "./util.ts";

const hasCuda = cuda.isAvailable();
const onGpu = hasCuda && DEVICE !== "cpu" && cudaGraphsSupported();

Deno.test("graph: eager mode defers to replay, and runs warm-ups at once", () => {
  const js = liveTensors(), native = nativeLiveCount();
  const x = tensor([1, 2, 3]), y = zeros([3]);
  using g = new CudaGraph("cpu");
  assert.equal(g.mode, "eager");
  let calls = 0;
  const fn = (): void => {
    calls++;
    y.copy_(x.mul(2).add(1)); // temporaries: freed by the graph's scope
  };
  g.warmup(fn);
  assert.equal(calls, 1);
  assert.equal(g.captured, false);
  assert.throws(() => g.replay(), /nothing captured/);
  g.capture(fn);
  assert.equal(calls, 1, "capture records, it does not run");
  assert.ok(g.captured);
  assert.throws(() => g.capture(fn), /already captured/);
  x.fill_(3);
  g.replay();
  assert.deepEqual(y.toArray(), [7, 7, 7]);
  assert.equal(calls, 2);
  g.reset();
  assert.equal(g.captured, false);
  g.capture(() => y.fill_(-1));
  g.replay();
  assert.deepEqual(y.toArray(), [-1, -1, -1]);
  g.dispose();
  g.dispose(); // idempotent
  assert.throws(() => g.replay(), /after dispose/);
  x.dispose();
  y.dispose();
  assert.equal(liveTensors(), js);
  assert.equal(nativeLiveCount(), native);
});

Deno.test("graph: the eager stand-in refuses what a capture could not record; eager: true allows it", () => {
  const x = zeros([2]), y = zeros([2]);
  const reads = (): void => void y.fill_(x.sum().item()); // waits for the device
  const uploads = (): void => void y.copy_(tensor([4, 5])); // host memory a replay would read again
  for (
    const [fn, rule] of [[reads, /read 1 value back to the host/], [uploads, /made 1 tensor from JS data/]]
  ) {
    using g = new CudaGraph("cpu");
    g.warmup(fn as () => void); // a real run: allowed
    g.capture(fn as () => void);
    assert.throws(() => g.replay(), rule as RegExp);
    using e = new CudaGraph("cpu", { eager: true });
    e.capture(fn as () => void);
    e.replay();
  }
  assert.deepEqual(y.toArray(), [4, 5]);
  x.dispose();
  y.dispose();
});

Deno.test("graph: eager: { eager: true } forces eager mode on any device", () => {
  using g = new CudaGraph(hasCuda ? "cuda" : "cpu", { eager: true });
  assert.equal(g.mode, "eager");
});

Deno.test("graph: the shim reports a missing CUDA build or device as an error, not a crash", () => {
  const lib = shim();
  const pool = new BigInt64Array(2);
  if (!cudaGraphsSupported()) {
    assert.equal(graphPool(), null);
    assert.equal(lib.mt_graph_new(ctx(), 0), null);
    assert.match(lastError(), /CUDA graphs need a CUDA build/);
    assert.equal(lib.mt_graph_pool_handle(ctx(), pool), -1);
    assert.match(lastError(), /CUDA graphs need a CUDA build/);
    assert.equal(lib.mt_graph_replay(ctx(), null), -1);
    assert.match(lastError(), /CUDA graphs need a CUDA build/);
  } else if (!hasCuda) {
    assert.equal(lib.mt_graph_new(ctx(), 0), null);
    assert.match(lastError(), /CUDA is not available/);
    assert.equal(lib.mt_graph_replay(ctx(), null), -1);
    assert.match(lastError(), /null graph handle/);
  } else {
    assert.equal(lib.mt_graph_new(ctx(), -1), null);
    assert.match(lastError(), /give a CUDA device/);
  }
  lib.mt_graph_free(null); // does nothing
  assert.equal(liveGraphs(), 0);
  assert.equal(zeros([2]).add(1).sum().item(), 2, "the next op still works");
});

Deno.test({ name: "graph: capture once, replay on new inputs (CUDA)", ignore: !onGpu }, () => {
  const graphs = liveGraphs(), js = liveTensors();
  const x = zeros([1024], { device: DEVICE }), y = zeros([1024], { device: DEVICE });
  {
    using g = new CudaGraph(DEVICE);
    assert.equal(g.mode, "graph");
    const fn = (): void => void y.copy_(x.mul(2).add(1).relu());
    g.warmup(fn);
    g.capture(fn);
    for (const v of [3, -5, 0.5]) {
      x.fill_(v);
      g.replay();
      assert.deepEqual(new Set(y.toArray()), new Set([Math.max(0, 2 * v + 1)]));
    }
    assert.equal(liveGraphs(), graphs + 1);
  }
  assert.equal(liveGraphs(), graphs);
  x.dispose();
  y.dispose();
  assert.equal(liveTensors(), js);
});

Deno.test({ name: "graph: a host sync breaks the capture cleanly (CUDA)", ignore: !onGpu }, () => {
  const x = zeros([4], { device: DEVICE });
  using g = new CudaGraph(DEVICE);
  g.warmup(() => x.sum().item());
  assert.throws(() => g.capture(() => x.sum().item()), TorchError);
  assert.equal(g.captured, false);
  assert.equal(x.add(1).sum().item(), 4, "the stream is usable afterwards");
  g.capture(() => x.fill_(2)); // and the graph can capture again
  g.replay();
  assert.equal(x.sum().item(), 8);
  x.dispose();
});

Deno.test({ name: "graph: an upload from JS data fails the capture (CUDA)", ignore: !onGpu }, () => {
  const y = zeros([2], { device: DEVICE });
  using g = new CudaGraph(DEVICE);
  const upload = (): void => void y.copy_(tensor([4, 5], { device: DEVICE }));
  g.warmup(upload);
  assert.throws(() => g.capture(upload), /made 1 tensor from JS data/);
  assert.equal(g.captured, false);
  g.capture(() => y.fill_(2));
  g.replay();
  assert.deepEqual(y.toArray(), [2, 2]);
  y.dispose();
});

Deno.test(
  { name: "graph: a function that throws mid-capture leaves the graph empty (CUDA)", ignore: !onGpu },
  () => {
    const y = zeros([2], { device: DEVICE });
    using g = new CudaGraph(DEVICE);
    g.warmup(() => y.fill_(1));
    assert.throws(() =>
      g.capture(() => {
        y.fill_(3);
        throw new Error("not this time");
      }), /not this time/);
    assert.equal(g.captured, false);
    g.capture(() => y.fill_(2)); // the graph records again
    g.replay();
    assert.deepEqual(y.toArray(), [2, 2]);
    y.dispose();
  },
);

Deno.test({ name: "graph: graphs sharing a pool replay in any order (CUDA)", ignore: !onGpu }, () => {
  const pool = graphPool();
  assert.ok(pool);
  const x = tensor([1, 2, 3, 4], { device: DEVICE }), a = zeros([4], { device: DEVICE });
  const b = zeros([4], { device: DEVICE });
  using ga = new CudaGraph(DEVICE, { pool });
  using gb = new CudaGraph(DEVICE, { pool });
  const fa = (): void => void a.copy_(x.mul(10).add(x));
  const fb = (): void => void b.copy_(x.square().sub(1));
  for (const [g, f] of [[ga, fa], [gb, fb]] as const) {
    g.warmup(f);
    g.capture(f);
  }
  x.fill_(2);
  gb.replay();
  ga.replay();
  assert.deepEqual([a.toArray(), b.toArray()], [[22, 22, 22, 22], [3, 3, 3, 3]]);
  for (const t of [x, a, b]) t.dispose();
});
