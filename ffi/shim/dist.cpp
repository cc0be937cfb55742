// moerl shim: data-parallel collectives over PyTorch's c10d (see moerl.h,
// "data parallel"). A thin translation like moerl.cpp: the trainer decides
// what to reduce and when; this file only rendezvouses and runs collectives.
//
// Backends are compiled in when their headers are found (ffi/build.ts):
// MOERL_WITH_GLOO needs gloo's headers (Debian: libgloo-dev), MOERL_WITH_NCCL
// a CUDA libtorch and nccl.h. A backend that is missing fails at init with a
// message that says how to get it.
#include "internal.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef MOERL_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef MOERL_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

using namespace mt;

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
#ifdef MOERL_WITH_GLOO
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
#endif
#ifdef MOERL_WITH_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;
#endif
  int rank = 0;
  int size = 1;
  std::chrono::milliseconds timeout{0};
};

Group& G(mt_group g) {
  if (g == nullptr) throw std::invalid_argument("null process group handle");
  return *static_cast<Group*>(g);
}

// Runs f on the group's backend. ProcessGroupGloo/NCCL derive from
// ProcessGroup in libtorch 1.13 and from Backend in 2.x; calling them through
// their own types works with both.
template <typename F>
auto on_backend(Group& g, F f) {
#ifdef MOERL_WITH_GLOO
  if (g.gloo) return f(*g.gloo);
#endif
#ifdef MOERL_WITH_NCCL
  if (g.nccl) return f(*g.nccl);
#endif
  throw std::runtime_error("process group has no backend (destroyed?)");
}

void wait(Group& g, const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
  try {
    if (!work->wait(g.timeout)) throw std::runtime_error("timed out");
  } catch (const c10::Error& e) {
    throw std::runtime_error(std::string(what) + " failed on rank " + std::to_string(g.rank) + " of " +
                             std::to_string(g.size) + ": " + e.what_without_backtrace() +
                             " (a peer may have exited or stalled)");
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(what) + " failed on rank " + std::to_string(g.rank) + " of " +
                             std::to_string(g.size) + ": " + e.what() + " (a peer may have exited or stalled)");
  }
}

// Issues one collective per tensor (c10d reads a list as one tensor per
// device), then waits for all; returns the one-tensor lists it used.
template <typename Issue>
std::vector<std::vector<Tensor>> per_tensor(Group& grp, const mt_tensor* ts, int32_t n, const char* what,
                                            Issue issue) {
  torch::NoGradGuard ng;
  std::vector<std::vector<Tensor>> lists;
  lists.reserve(n);
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (int32_t i = 0; i < n; i++) {
    lists.push_back({T(ts[i])});
    works.push_back(on_backend(grp, [&](auto& pg) { return issue(pg, lists.back()); }));
  }
  for (auto& w : works) wait(grp, w, what);
  // The backends write the tensors in place without an ATen op: bump their version counters as one would, so
  // that what is keyed on a version (model/lora.ts's held adapter casts) sees the new values.
  for (auto& l : lists) l[0].unsafeGetTensorImpl()->bump_version();
  return lists;
}

c10d::ReduceOp reduce_op(int32_t op) {
  switch (op) {
    case 0: case 1: return c10d::ReduceOp::SUM;  // average = sum / size (Gloo has no AVG)
    case 2: return c10d::ReduceOp::MAX;
    case 3: return c10d::ReduceOp::MIN;
    default: throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

// libtorch 2.x's TCPStore serves with a libuv loop by default, from a libuv
// linked into libtorch_cpu whose uv_* symbols are exported. Deno exports uv_*
// functions of its own (for Node-API addons), and the dynamic linker binds
// libtorch's calls to the executable's: the store's server thread then
// crashes. The classic socket server avoids libuv; the field does not exist
// before 2.2, hence the overload.
template <typename O>
auto without_libuv(O& o, int) -> decltype(o.useLibUV = false, void()) {
  o.useLibUV = false;
}
template <typename O>
void without_libuv(O&, long) {}

#ifdef MOERL_WITH_GLOO
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices(const std::string& host) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> out;
  // As torch.distributed does: $GLOO_SOCKET_IFNAME names interfaces (comma-separated).
  if (const char* ifs = std::getenv("GLOO_SOCKET_IFNAME"); ifs && *ifs) {
    std::string s(ifs);
    size_t from = 0;
    while (from <= s.size()) {
      size_t comma = s.find(',', from);
      std::string name = s.substr(from, comma == std::string::npos ? std::string::npos : comma - from);
      if (!name.empty()) out.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      if (comma == std::string::npos) break;
      from = comma + 1;
    }
  }
  if (out.empty()) {
    out.push_back(host.empty() ? c10d::ProcessGroupGloo::createDefaultDevice()
                               : c10d::ProcessGroupGloo::createDeviceForHostname(host));
  }
  return out;
}
#endif

}  // namespace

extern "C" {

int32_t mt_dist_backends(void) {
  int32_t bits = 0;
#ifdef MOERL_WITH_GLOO
  bits |= 1;
#endif
#ifdef MOERL_WITH_NCCL
  bits |= 2;
#endif
  return bits;
}

mt_group mt_dist_init(mt_ctx* ctx, const char* backend, const char* host, int32_t port, int32_t world,
                      int32_t rank, int64_t timeout_ms, int32_t server, const char* prefix,
                      const char* device_host) {
  return guarded(ctx, [&]() -> mt_group {
    const std::string name(backend);
    if (world < 1 || rank < 0 || rank >= world)
      throw std::invalid_argument("rank " + std::to_string(rank) + " is outside a world of " +
                                  std::to_string(world));
    if (port < 1 || port > 65535) throw std::invalid_argument("port " + std::to_string(port) + " out of range");
    if (timeout_ms < 1) throw std::invalid_argument("timeout must be at least 1 ms");
    if (name != "gloo" && name != "nccl") throw std::invalid_argument("unknown backend \"" + name + "\"");
#ifndef MOERL_WITH_GLOO
    if (name == "gloo")
      throw std::runtime_error(
          "this shim was built without the Gloo backend (gloo's headers were not found): install them "
          "(Debian/Ubuntu: apt-get install libgloo-dev) and run `deno task build --force`");
#endif
#ifndef MOERL_WITH_NCCL
    if (name == "nccl")
      throw std::runtime_error(
          "this shim was built without the NCCL backend: it needs a CUDA libtorch 2.x and nccl.h "
          "(pip's nvidia-nccl wheel or the NCCL dev package); install them and run `deno task build --force`");
#endif
    auto g = std::make_unique<Group>();
    g->rank = rank;
    g->size = world;
    g->timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = server != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;  // clients count themselves in; the server waits for all
    opts.timeout = g->timeout;
    without_libuv(opts, 0);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    g->store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
#ifdef MOERL_WITH_GLOO
    if (name == "gloo") {
      auto o = c10d::ProcessGroupGloo::Options::create(g->timeout);
      o->devices = gloo_devices(device_host);
      o->threads = static_cast<int>(o->devices.size()) * 2;
      g->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store, rank, world, o);
    }
#endif
#ifdef MOERL_WITH_NCCL
    if (name == "nccl") {
      // Without blocking wait, Work::wait only orders the stream and a dead peer surfaces as a hang at the
      // next host sync, or as the watchdog ending the process; with it, wait blocks up to the timeout and
      // throws, which reaches TypeScript as an error. Read by the constructor; a user's setting is kept.
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = g->timeout;
      g->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->store, rank, world, o);
    }
#endif
    (void)device_host;
    return g.release();
  }, nullptr);
}

void mt_dist_free(mt_group g) { delete static_cast<Group*>(g); }

int32_t mt_dist_allreduce(mt_ctx* ctx, mt_group g, const mt_tensor* ts, int32_t n, int32_t op) {
  return STATUS_OP(ctx, {
    Group& grp = G(g);
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    o.timeout = grp.timeout;
    auto lists = per_tensor(grp, ts, n, "all-reduce", [&](auto& pg, std::vector<Tensor>& l) {
      return pg.allreduce(l, o);
    });
    if (op == 1)
      for (auto& l : lists) l[0].div_(grp.size);
  });
}

int32_t mt_dist_broadcast(mt_ctx* ctx, mt_group g, const mt_tensor* ts, int32_t n, int32_t root) {
  return STATUS_OP(ctx, {
    Group& grp = G(g);
    if (root < 0 || root >= grp.size)
      throw std::invalid_argument("broadcast root " + std::to_string(root) + " is outside the world");
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = grp.timeout;
    per_tensor(grp, ts, n, "broadcast", [&](auto& pg, std::vector<Tensor>& l) { return pg.broadcast(l, o); });
  });
}

mt_tensor mt_dist_allgather(mt_ctx* ctx, mt_group g, mt_tensor t) {
  return TENSOR_OP(ctx, [&] {
    Group& grp = G(g);
    torch::NoGradGuard ng;
    std::vector<Tensor> in{T(t).contiguous()};
    std::vector<std::vector<Tensor>> out(1);
    for (int i = 0; i < grp.size; i++) out[0].push_back(torch::empty_like(in[0]));
    c10d::AllgatherOptions o;
    o.timeout = grp.timeout;
    wait(grp, on_backend(grp, [&](auto& pg) { return pg.allgather(out, in, o); }), "all-gather");
    return torch::stack(out[0]);
  }());
}

int32_t mt_dist_barrier(mt_ctx* ctx, mt_group g) {
  return STATUS_OP(ctx, {
    Group& grp = G(g);
    c10d::BarrierOptions o;
    o.timeout = grp.timeout;
    wait(grp, on_backend(grp, [&](auto& pg) { return pg.barrier(o); }), "barrier");
  });
}

}  // extern "C"
