// Shared by the shim's translation units that take a context (all but fused.cpp): the context, handle helpers
// and the error guard. Not part of the C ABI.
#ifndef MOERL_SHIM_INTERNAL_H
#define MOERL_SHIM_INTERNAL_H

#include "moerl.h"

#include <torch/torch.h>

#include <atomic>
#include <string>
#include <vector>

struct mt_ctx {
  bool grad_enabled = true;
  std::string message;
};

// Tensor handles alive (moerl.cpp defines it).
extern std::atomic<int64_t> live_count;

namespace mt {

using torch::Tensor;

inline Tensor& T(mt_tensor t) {
  if (t == nullptr) throw std::invalid_argument("null tensor handle");
  return *static_cast<Tensor*>(t);
}

inline mt_tensor wrap(Tensor t) {
  live_count.fetch_add(1, std::memory_order_relaxed);
  return new Tensor(std::move(t));
}

inline c10::optional<Tensor> opt(mt_tensor t) {
  if (t == nullptr) return c10::nullopt;
  return T(t);
}

inline torch::Device device_of(int32_t d) {
  if (d < 0) return torch::Device(torch::kCPU);
  // libtorch's own message here lists every registered backend; say it plainly.
  if (!torch::cuda::is_available()) throw std::runtime_error("CUDA is not available");
  if (d >= static_cast<int32_t>(torch::cuda::device_count()))
    throw std::out_of_range("cuda:" + std::to_string(d) + " does not exist (" +
                            std::to_string(torch::cuda::device_count()) + " CUDA devices)");
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(d));
}

inline torch::ScalarType dtype_of(int32_t code) {
  switch (code) {
    case 0: case 1: case 2: case 3: case 4: case 5: case 6: case 7: case 11: case 15:
      return static_cast<torch::ScalarType>(code);
    default:
      throw std::invalid_argument("unsupported dtype code " + std::to_string(code));
  }
}

inline std::vector<int64_t> ints(const int64_t* p, int32_t n) {
  if (n < 0) throw std::invalid_argument("negative list length");
  return std::vector<int64_t>(p, p + n);
}

inline std::vector<Tensor> tensors(const mt_tensor* ts, int32_t n) {
  std::vector<Tensor> out;
  out.reserve(n);
  for (int32_t i = 0; i < n; i++) out.push_back(T(ts[i]));
  return out;
}

inline c10::optional<torch::Generator> gen_of(mt_generator g) {
  if (g == nullptr) return c10::nullopt;
  return *static_cast<torch::Generator*>(g);
}

// Runs body with the context's grad mode; turns any C++ exception into a
// message on the context. c10::Error carries a backtrace we do not want.
template <typename F>
auto guarded(mt_ctx* ctx, F body, decltype(body()) on_error) -> decltype(body()) {
  try {
    torch::AutoGradMode grad(ctx->grad_enabled);
    return body();
  } catch (const c10::Error& e) {
    ctx->message = e.what_without_backtrace();
  } catch (const std::exception& e) {
    ctx->message = e.what();
  } catch (...) {
    ctx->message = "unknown C++ exception";
  }
  return on_error;
}

#define TENSOR_OP(ctx, expr) guarded(ctx, [&]() -> mt_tensor { return wrap(expr); }, nullptr)
#define STATUS_OP(ctx, stmts) guarded(ctx, [&]() -> int32_t { stmts; return 0; }, -1)

}  // namespace mt

#endif  // MOERL_SHIM_INTERNAL_H
