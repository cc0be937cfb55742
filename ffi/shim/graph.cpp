// moerl shim: CUDA graphs (see moerl.h, "CUDA graphs"). A thin layer over
// at::cuda::CUDAGraph: TypeScript issues the ops to record between
// mt_graph_begin and mt_graph_end, exactly as it would run them eagerly, and
// later replays the whole recording with one call. Which ops to record, and
// on which static tensors, stays in TypeScript (ffi/graph.ts).
//
// Without CUDA headers (a CPU libtorch, or Debian's 1.13) every call that
// needs a graph fails with a message; ffi/graph.ts then runs the recorded
// function eagerly instead.
#include "internal.h"

#include <atomic>
#include <memory>
#include <optional>

#ifdef MOERL_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

using namespace mt;

namespace {

std::atomic<int64_t> graphs_alive{0};

// STATUS_OP for bodies with top-level commas and early returns.
template <typename F>
int32_t status(mt_ctx* ctx, F body) {
  return guarded(ctx, [&]() -> int32_t { body(); return 0; }, -1);
}

#ifdef MOERL_WITH_CUDA
struct Graph {
  c10::DeviceIndex device;
  // Capture must not run on the default stream, and warm-up should run on the
  // stream the capture will use (cuBLAS keeps a workspace per stream).
  c10::cuda::CUDAStream side;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  // Set between begin and end: the caller's stream is restored when it goes.
  std::optional<c10::cuda::CUDAStreamGuard> guard;
  bool capturing = false;
  bool captured = false;

  explicit Graph(c10::DeviceIndex d)
      : device(d), side(c10::cuda::getStreamFromPool(false, d)), graph(new at::cuda::CUDAGraph()) {}
};

Graph& G(mt_graph g) {
  if (g == nullptr) throw std::invalid_argument("null graph handle");
  return *static_cast<Graph*>(g);
}

// Ends a begin: restores the caller's stream after waiting for the side
// stream, so work queued after it sees what the warm-up wrote.
void leave(Graph& g) {
  if (!g.guard) return;
  g.guard.reset();
  g.side.synchronize();
}
#else
[[noreturn]] void no_cuda() {
  throw std::runtime_error("CUDA graphs need a CUDA build (moerl was compiled without CUDA headers)");
}
#endif

}  // namespace

extern "C" {

int32_t mt_graph_supported(void) {
#ifdef MOERL_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

int64_t mt_graph_live_count(void) { return graphs_alive.load(std::memory_order_relaxed); }

int32_t mt_graph_pool_handle(mt_ctx* ctx, int64_t* out) {
  return status(ctx, [&] {
#ifdef MOERL_WITH_CUDA
    auto id = at::cuda::graph_pool_handle();
    out[0] = static_cast<int64_t>(id.first);
    out[1] = static_cast<int64_t>(id.second);
#else
    (void)out;
    no_cuda();
#endif
  });
}

mt_graph mt_graph_new(mt_ctx* ctx, int32_t device) {
  return guarded(ctx, [&]() -> mt_graph {
#ifdef MOERL_WITH_CUDA
    if (device < 0) throw std::invalid_argument("CUDA graphs record CUDA work: give a CUDA device");
    auto d = device_of(device);
    auto* g = new Graph(d.index());
    graphs_alive.fetch_add(1, std::memory_order_relaxed);
    return g;
#else
    (void)device;
    no_cuda();
#endif
  }, nullptr);
}

int32_t mt_graph_begin(mt_ctx* ctx, mt_graph g, int32_t capture, const int64_t* pool) {
  return status(ctx, [&] {
#ifdef MOERL_WITH_CUDA
    Graph& gr = G(g);
    if (gr.guard) throw std::logic_error("graph: begin called twice without end");
    if (capture && gr.captured) throw std::logic_error("graph: already captured (reset it first)");
    // The side stream must see everything the caller queued (static inputs).
    c10::cuda::getCurrentCUDAStream(gr.device).synchronize();
    gr.guard.emplace(gr.side);
    if (!capture) return;
    try {
      // std::pair<CaptureId_t, CaptureId_t> in 1.13 and 2.x alike; {0, 0}: a private pool.
      decltype(at::cuda::graph_pool_handle()) id{0, 0};
      if (pool != nullptr) {
        id.first = static_cast<uint64_t>(pool[0]);
        id.second = static_cast<uint64_t>(pool[1]);
      }
      gr.graph->capture_begin(id);
      gr.capturing = true;
    } catch (...) {
      leave(gr);
      throw;
    }
#else
    (void)g; (void)capture; (void)pool;
    no_cuda();
#endif
  });
}

int32_t mt_graph_end(mt_ctx* ctx, mt_graph g) {
  return status(ctx, [&] {
#ifdef MOERL_WITH_CUDA
    Graph& gr = G(g);
    if (!gr.guard) throw std::logic_error("graph: end without begin");
    if (!gr.capturing) {
      leave(gr);
      return;
    }
    gr.capturing = false;
    try {
      gr.graph->capture_end();  // instantiates the graph
      gr.captured = true;
    } catch (...) {
      // An invalidated capture (a host sync, a foreign allocation): drop what
      // was recorded and give back the pool, then report libtorch's reason.
      try { gr.graph->reset(); } catch (...) {}
      leave(gr);
      throw;
    }
    leave(gr);
#else
    (void)g;
    no_cuda();
#endif
  });
}

int32_t mt_graph_replay(mt_ctx* ctx, mt_graph g) {
  return status(ctx, [&] {
#ifdef MOERL_WITH_CUDA
    Graph& gr = G(g);
    if (!gr.captured) throw std::logic_error("graph: replay before a successful capture");
    if (gr.guard) throw std::logic_error("graph: replay between begin and end");
    gr.graph->replay();
#else
    (void)g;
    no_cuda();
#endif
  });
}

int32_t mt_graph_reset(mt_ctx* ctx, mt_graph g) {
  return status(ctx, [&] {
#ifdef MOERL_WITH_CUDA
    Graph& gr = G(g);
    if (gr.guard) throw std::logic_error("graph: reset between begin and end");
    gr.graph->reset();
    gr.captured = false;
#else
    (void)g;
    no_cuda();
#endif
  });
}

void mt_graph_free(mt_graph g) {
#ifdef MOERL_WITH_CUDA
  if (g == nullptr) return;
  auto* gr = static_cast<Graph*>(g);
  // Freed mid-capture (an exception in TypeScript): end it so the stream and
  // the allocator leave capture mode; the recording is discarded.
  if (gr->capturing) {
    try { gr->graph->capture_end(); } catch (...) {}
  }
  try { gr->graph->reset(); } catch (...) {}
  try { leave(*gr); } catch (...) {}
  delete gr;
  graphs_alive.fetch_sub(1, std::memory_order_relaxed);
#else
  (void)g;
#endif
}

}  // extern "C"
