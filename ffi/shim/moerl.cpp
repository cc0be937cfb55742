// moerl shim: the C ABI of moerl.h over libtorch. Model logic lives in
// TypeScript; this file only translates handles, codes and errors.
#include "internal.h"
#include "fused.h"

#include <cmath>
#include <cstring>

#ifdef MOERL_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

std::atomic<int64_t> live_count{0};

using namespace mt;
using torch::Tensor;

extern "C" {

// ---- context, version, live handles -----------------------------------------
mt_ctx* mt_ctx_new(void) { return new mt_ctx(); }
void mt_ctx_free(mt_ctx* ctx) { delete ctx; }
const char* mt_ctx_message(mt_ctx* ctx) { return ctx->message.c_str(); }
void mt_ctx_set_grad(mt_ctx* ctx, int32_t enabled) { ctx->grad_enabled = enabled != 0; }
int32_t mt_ctx_grad(mt_ctx* ctx) { return ctx->grad_enabled ? 1 : 0; }
const char* mt_torch_version(void) { return TORCH_VERSION; }
int32_t mt_abi_version(void) { return 10; }
int64_t mt_live_count(void) { return live_count.load(std::memory_order_relaxed); }

// ---- runtime -------------------------------------------------------------------
int32_t mt_manual_seed(mt_ctx* ctx, uint64_t seed) {
  return STATUS_OP(ctx, torch::manual_seed(seed));
}
int32_t mt_set_num_threads(mt_ctx* ctx, int32_t n) {
  return STATUS_OP(ctx, at::set_num_threads(n));
}
int32_t mt_get_num_threads(void) { return at::get_num_threads(); }
int32_t mt_cuda_available(void) { return torch::cuda::is_available() ? 1 : 0; }
int32_t mt_cuda_device_count(void) { return static_cast<int32_t>(torch::cuda::device_count()); }

int32_t mt_cuda_synchronize(mt_ctx* ctx, int32_t device) {
  return STATUS_OP(ctx, {
    if (!torch::cuda::is_available()) throw std::runtime_error("CUDA is not available");
    // A tiny host copy waits for the device's current stream; portable
    // across libtorch versions without CUDA headers.
    torch::zeros({1}, torch::TensorOptions().device(device_of(device))).to(torch::kCPU);
  });
}

int32_t mt_cuda_memory_stats(mt_ctx* ctx, int32_t device, int64_t* out) {
  return STATUS_OP(ctx, {
#ifdef MOERL_WITH_CUDA
    using namespace c10::cuda::CUDACachingAllocator;
    auto stats = getDeviceStats(static_cast<c10::DeviceIndex>(device));
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
    // 2.5 moved StatType to the device-generic allocator header.
    auto agg = static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE);
#else
    auto agg = static_cast<size_t>(StatType::AGGREGATE);
#endif
    out[0] = stats.allocated_bytes[agg].current;
    out[1] = stats.reserved_bytes[agg].current;
    out[2] = stats.allocated_bytes[agg].peak;
    out[3] = stats.reserved_bytes[agg].peak;
#else
    (void)device; (void)out;
    throw std::runtime_error("moerl was built without CUDA headers: no memory statistics");
#endif
  });
}

int32_t mt_cuda_reset_peak(mt_ctx* ctx, int32_t device) {
  return STATUS_OP(ctx, {
#ifdef MOERL_WITH_CUDA
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#else
    (void)device;
    throw std::runtime_error("moerl was built without CUDA headers: no memory statistics");
#endif
  });
}

mt_generator mt_generator_new(mt_ctx* ctx, uint64_t seed, int32_t device) {
  return guarded(ctx, [&]() -> mt_generator {
    torch::Generator g = device < 0
        ? at::detail::createCPUGenerator(seed)
        : at::globalContext().defaultGenerator(device_of(device)).clone();
    g.set_current_seed(seed);
    return new torch::Generator(std::move(g));
  }, nullptr);
}
void mt_generator_free(mt_generator gen) { delete static_cast<torch::Generator*>(gen); }

// ---- handles and metadata ----------------------------------------------------------
void mt_free(mt_tensor t) {
  if (t == nullptr) return;
  live_count.fetch_sub(1, std::memory_order_relaxed);
  delete static_cast<Tensor*>(t);
}

int32_t mt_meta(mt_ctx* ctx, mt_tensor t, int64_t* out, int32_t cap) {
  return guarded(ctx, [&]() -> int32_t {
    const Tensor& x = T(t);
    if (!x.defined()) throw std::invalid_argument("undefined tensor");
    int32_t nd = static_cast<int32_t>(x.dim());
    if (cap < nd + 4)
      throw std::length_error("meta: " + std::to_string(nd) + " dims, the caller's buffer holds " +
                              std::to_string(cap - 4));
    out[0] = static_cast<int64_t>(x.scalar_type());
    out[1] = x.is_cuda() ? x.device().index() : -1;
    out[2] = x.requires_grad() ? 1 : 0;
    out[3] = nd;
    for (int32_t i = 0; i < nd; i++) out[4 + i] = x.size(i);
    return nd;
  }, -1);
}

int64_t mt_version(mt_ctx* ctx, mt_tensor t) {
  return guarded(ctx, [&]() -> int64_t {
    const Tensor& x = T(t);
    if (!x.defined()) throw std::invalid_argument("undefined tensor");
    return static_cast<int64_t>(x._version());
  }, int64_t{-1});
}

// ---- creation -------------------------------------------------------------------------
mt_tensor mt_from_data(mt_ctx* ctx, const void* data, int64_t nbytes, int32_t dtype,
                       const int64_t* shape, int32_t ndim, int32_t device) {
  return TENSOR_OP(ctx, ([&] {
    auto st = dtype_of(dtype);
    auto sizes = ints(shape, ndim);
    int64_t numel = 1;
    for (auto s : sizes) {
      if (s < 0) throw std::invalid_argument("negative size in shape");
      numel *= s;
    }
    int64_t need = numel * static_cast<int64_t>(c10::elementSize(st));
    if (need != nbytes)
      throw std::invalid_argument("data has " + std::to_string(nbytes) + " bytes, shape needs " +
                                  std::to_string(need));
    // For a GPU the host copy is pinned and the upload asynchronous, as PyTorch's
    // pin_memory().to(non_blocking=True): a pageable upload waits for the whole
    // stream, so every tensor made from host data would stall the queued work.
    // The caching host allocator keeps the pinned block until the copy is done.
    // Where pinned memory cannot be had, the upload is an ordinary blocking one.
    bool pinned = device >= 0 && device_of(device).is_cuda();
    torch::Tensor t;
    if (pinned) {
      try {
        t = torch::empty(sizes, torch::TensorOptions().dtype(st).pinned_memory(true));
      } catch (const std::exception&) {
        pinned = false;
      }
    }
    if (!pinned) t = torch::empty(sizes, torch::TensorOptions().dtype(st));
    if (nbytes > 0) std::memcpy(t.data_ptr(), data, nbytes);
    return device < 0 ? t : t.to(device_of(device), /*non_blocking=*/pinned);
  })());
}

mt_tensor mt_full(mt_ctx* ctx, const int64_t* shape, int32_t ndim, double value,
                  int32_t dtype, int32_t device) {
  return TENSOR_OP(ctx, torch::full(ints(shape, ndim), value,
      torch::TensorOptions().dtype(dtype_of(dtype)).device(device_of(device))));
}

mt_tensor mt_arange(mt_ctx* ctx, double start, double end, double step, int32_t dtype,
                    int32_t device) {
  return TENSOR_OP(ctx, torch::arange(start, end, step,
      torch::TensorOptions().dtype(dtype_of(dtype)).device(device_of(device))));
}

mt_tensor mt_rand(mt_ctx* ctx, const int64_t* shape, int32_t ndim, int32_t kind,
                  int32_t dtype, int32_t device, mt_generator gen) {
  return TENSOR_OP(ctx, ([&] {
    auto opts = torch::TensorOptions().dtype(dtype_of(dtype)).device(device_of(device));
    auto sizes = ints(shape, ndim);
    if (kind == 0) {
      auto st = opts.dtype().toScalarType();
      if (st != torch::kHalf && st != torch::kBFloat16) return at::rand(sizes, gen_of(gen), opts);
      // Rounding float32 draws to a half type can give exactly 1.0 (and
      // CUDA's half kernels do; pytorch#96947): keep [0, 1) as promised.
      double below_one = st == torch::kHalf ? 1.0 - 1.0 / 2048 : 1.0 - 1.0 / 256;
      return at::rand(sizes, gen_of(gen), opts.dtype(torch::kFloat)).to(st).clamp_max_(below_one);
    }
    if (kind == 1) return at::randn(sizes, gen_of(gen), opts);
    throw std::invalid_argument("rand kind must be 0 (uniform) or 1 (normal)");
  })());
}

int32_t mt_copy_to(mt_ctx* ctx, mt_tensor t, void* dst, int64_t nbytes) {
  return STATUS_OP(ctx, {
    auto x = T(t).detach().to(torch::kCPU).contiguous();
    int64_t have = x.numel() * static_cast<int64_t>(x.element_size());
    if (have != nbytes)
      throw std::invalid_argument("tensor has " + std::to_string(have) +
                                  " bytes, destination " + std::to_string(nbytes));
    if (nbytes > 0) std::memcpy(dst, x.data_ptr(), nbytes);
  });
}

int32_t mt_item(mt_ctx* ctx, mt_tensor t, double* out) {
  return STATUS_OP(ctx, *out = T(t).item().toDouble());
}

mt_tensor mt_to(mt_ctx* ctx, mt_tensor t, int32_t dtype, int32_t device, int32_t copy) {
  return TENSOR_OP(ctx, ([&] {
    const Tensor& x = T(t);
    auto st = dtype < 0 ? x.scalar_type() : dtype_of(dtype);
    return x.to(device_of(device), st, /*non_blocking=*/false, copy != 0);
  })());
}

// ---- views and shape ops -----------------------------------------------------------------
mt_tensor mt_reshape(mt_ctx* ctx, mt_tensor t, const int64_t* shape, int32_t nd) {
  return TENSOR_OP(ctx, T(t).reshape(ints(shape, nd)));
}
mt_tensor mt_permute(mt_ctx* ctx, mt_tensor t, const int64_t* dims, int32_t nd) {
  return TENSOR_OP(ctx, T(t).permute(ints(dims, nd)));
}
mt_tensor mt_expand(mt_ctx* ctx, mt_tensor t, const int64_t* shape, int32_t nd) {
  return TENSOR_OP(ctx, T(t).expand(ints(shape, nd)));
}
mt_tensor mt_transpose(mt_ctx* ctx, mt_tensor t, int64_t d0, int64_t d1) {
  return TENSOR_OP(ctx, T(t).transpose(d0, d1));
}
mt_tensor mt_slice(mt_ctx* ctx, mt_tensor t, int64_t dim, int64_t start, int64_t end,
                   int64_t step) {
  return TENSOR_OP(ctx, T(t).slice(dim, start, end, step));
}
mt_tensor mt_narrow(mt_ctx* ctx, mt_tensor t, int64_t dim, int64_t start, int64_t length) {
  return TENSOR_OP(ctx, T(t).narrow(dim, start, length));
}
mt_tensor mt_select(mt_ctx* ctx, mt_tensor t, int64_t dim, int64_t index) {
  return TENSOR_OP(ctx, T(t).select(dim, index));
}
mt_tensor mt_squeeze(mt_ctx* ctx, mt_tensor t, int64_t dim) {
  return TENSOR_OP(ctx, T(t).squeeze(dim));
}
mt_tensor mt_unsqueeze(mt_ctx* ctx, mt_tensor t, int64_t dim) {
  return TENSOR_OP(ctx, T(t).unsqueeze(dim));
}
mt_tensor mt_contiguous(mt_ctx* ctx, mt_tensor t) { return TENSOR_OP(ctx, T(t).contiguous()); }
mt_tensor mt_clone(mt_ctx* ctx, mt_tensor t) { return TENSOR_OP(ctx, T(t).clone()); }
mt_tensor mt_cat(mt_ctx* ctx, const mt_tensor* ts, int32_t n, int64_t dim) {
  return TENSOR_OP(ctx, torch::cat(tensors(ts, n), dim));
}
mt_tensor mt_stack(mt_ctx* ctx, const mt_tensor* ts, int32_t n, int64_t dim) {
  return TENSOR_OP(ctx, torch::stack(tensors(ts, n), dim));
}
mt_tensor mt_tri(mt_ctx* ctx, mt_tensor t, int64_t diagonal, int32_t upper) {
  return TENSOR_OP(ctx, upper ? T(t).triu(diagonal) : T(t).tril(diagonal));
}

// ---- indexing ----------------------------------------------------------------------------------
mt_tensor mt_index_select(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index) {
  return TENSOR_OP(ctx, T(t).index_select(dim, T(index)));
}
mt_tensor mt_gather(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index) {
  return TENSOR_OP(ctx, T(t).gather(dim, T(index)));
}
mt_tensor mt_scatter(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index, mt_tensor src) {
  return TENSOR_OP(ctx, T(t).scatter(dim, T(index), T(src)));
}
mt_tensor mt_index_add(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index, mt_tensor src) {
  return TENSOR_OP(ctx, T(t).index_add(dim, T(index), T(src)));
}
mt_tensor mt_masked_fill(mt_ctx* ctx, mt_tensor t, mt_tensor mask, double value) {
  return TENSOR_OP(ctx, T(t).masked_fill(T(mask), value));
}
mt_tensor mt_where(mt_ctx* ctx, mt_tensor cond, mt_tensor a, mt_tensor b) {
  return TENSOR_OP(ctx, torch::where(T(cond), T(a), T(b)));
}
mt_tensor mt_embedding(mt_ctx* ctx, mt_tensor weight, mt_tensor index) {
  return TENSOR_OP(ctx, torch::embedding(T(weight), T(index)));
}

// ---- in-place writes -----------------------------------------------------------------------------
int32_t mt_copy_(mt_ctx* ctx, mt_tensor dst, mt_tensor src) {
  return STATUS_OP(ctx, { torch::NoGradGuard ng; T(dst).copy_(T(src)); });
}
int32_t mt_fill_(mt_ctx* ctx, mt_tensor t, double value) {
  return STATUS_OP(ctx, { torch::NoGradGuard ng; T(t).fill_(value); });
}
int32_t mt_index_copy_(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index, mt_tensor src) {
  return STATUS_OP(ctx, { torch::NoGradGuard ng; T(t).index_copy_(dim, T(index), T(src)); });
}

// ---- elementwise -------------------------------------------------------------------------------------
mt_tensor mt_unary(mt_ctx* ctx, int32_t op, mt_tensor t) {
  return TENSOR_OP(ctx, ([&]() -> Tensor {
    const Tensor& x = T(t);
    switch (op) {
      case MT_NEG: return x.neg();
      case MT_EXP: return x.exp();
      case MT_LOG: return x.log();
      case MT_SQRT: return x.sqrt();
      case MT_RSQRT: return x.rsqrt();
      case MT_TANH: return x.tanh();
      case MT_SIGMOID: return x.sigmoid();
      case MT_SILU: return torch::silu(x);
      case MT_RELU: return x.relu();
      case MT_GELU: return torch::gelu(x);
      case MT_ABS: return x.abs();
      case MT_SIN: return x.sin();
      case MT_COS: return x.cos();
      case MT_RECIPROCAL: return x.reciprocal();
      case MT_SQUARE: return x.square();
      case MT_LOG1P: return x.log1p();
      case MT_FLOOR: return x.floor();
      case MT_CEIL: return x.ceil();
      case MT_ROUND: return x.round();
      case MT_SIGN: return x.sign();
      case MT_LOGICAL_NOT: return x.logical_not();
      case MT_ISNAN: return x.isnan();
      case MT_ISFINITE: return x.isfinite();
    }
    throw std::invalid_argument("unknown unary op " + std::to_string(op));
  })());
}

static Tensor binary(int32_t op, const Tensor& a, const Tensor& b) {
  switch (op) {
    case MT_ADD: return a.add(b);
    case MT_SUB: return a.sub(b);
    case MT_MUL: return a.mul(b);
    case MT_DIV: return a.div(b);
    case MT_POW: return a.pow(b);
    case MT_MAXIMUM: return torch::maximum(a, b);
    case MT_MINIMUM: return torch::minimum(a, b);
    case MT_EQ: return a.eq(b);
    case MT_NE: return a.ne(b);
    case MT_LT: return a.lt(b);
    case MT_LE: return a.le(b);
    case MT_GT: return a.gt(b);
    case MT_GE: return a.ge(b);
    case MT_LOGICAL_AND: return a.logical_and(b);
    case MT_LOGICAL_OR: return a.logical_or(b);
    case MT_RSUB: return b.sub(a);
    case MT_REMAINDER: return a.remainder(b);
  }
  throw std::invalid_argument("unknown binary op " + std::to_string(op));
}

mt_tensor mt_binary(mt_ctx* ctx, int32_t op, mt_tensor a, mt_tensor b) {
  return TENSOR_OP(ctx, binary(op, T(a), T(b)));
}

mt_tensor mt_binary_scalar(mt_ctx* ctx, int32_t op, mt_tensor a, double s) {
  return TENSOR_OP(ctx, ([&]() -> Tensor {
    const Tensor& x = T(a);
    // Integer tensors keep their dtype when s is integral, as in PyTorch.
    bool integral = std::isfinite(s) && std::fabs(s) < 9.2e18 && s == std::trunc(s);
    torch::Scalar sc = (integral && !x.is_floating_point()) ? torch::Scalar(static_cast<int64_t>(s))
                                                            : torch::Scalar(s);
    switch (op) {
      case MT_ADD: return x.add(sc);
      case MT_SUB: return x.sub(sc);
      case MT_MUL: return x.mul(sc);
      case MT_DIV: return x.div(sc);
      case MT_POW: return x.pow(sc);
      case MT_MAXIMUM: return x.clamp_min(sc);
      case MT_MINIMUM: return x.clamp_max(sc);
      case MT_EQ: return x.eq(sc);
      case MT_NE: return x.ne(sc);
      case MT_LT: return x.lt(sc);
      case MT_LE: return x.le(sc);
      case MT_GT: return x.gt(sc);
      case MT_GE: return x.ge(sc);
      case MT_RSUB: return torch::rsub(x, sc);
      case MT_REMAINDER: return x.remainder(sc);
    }
    throw std::invalid_argument("binary op " + std::to_string(op) + " takes no scalar");
  })());
}

mt_tensor mt_clamp(mt_ctx* ctx, mt_tensor t, double lo, double hi, int32_t flags) {
  return TENSOR_OP(ctx, T(t).clamp((flags & 1) ? c10::optional<torch::Scalar>(lo) : c10::nullopt,
                                   (flags & 2) ? c10::optional<torch::Scalar>(hi) : c10::nullopt));
}

// ---- reductions --------------------------------------------------------------------------------------
static Tensor reduce(int32_t op, const Tensor& x, const std::vector<int64_t>& d, bool kd, bool all);

mt_tensor mt_reduce(mt_ctx* ctx, int32_t op, mt_tensor t, const int64_t* dims, int32_t nd,
                    int32_t keepdim) {
  return TENSOR_OP(ctx, ([&]() -> Tensor {
    const Tensor& x = T(t);
    auto d = ints(dims, nd);
    bool kd = keepdim != 0;
    bool all = nd == 0;
    Tensor r = reduce(op, x, d, kd, all);
    // Full reductions drop every dim; keepdim asks for them back as size 1.
    return all && kd && r.dim() == 0 ? r.reshape(std::vector<int64_t>(x.dim(), 1)) : r;
  })());
}

static Tensor reduce(int32_t op, const Tensor& x, const std::vector<int64_t>& d, bool kd, bool all) {
  int32_t nd = static_cast<int32_t>(d.size());
  switch (op) {
    case MT_SUM: return all ? x.sum() : x.sum(d, kd);
    case MT_MEAN: return all ? x.mean() : x.mean(d, kd);
    case MT_AMAX: return x.amax(d, kd);
    case MT_AMIN: return x.amin(d, kd);
    case MT_LOGSUMEXP:
      if (all) throw std::invalid_argument("logsumexp needs dims");
      return x.logsumexp(d, kd);
    case MT_PROD:
      if (all) return x.prod();
      if (nd != 1) throw std::invalid_argument("prod takes one dim");
      return x.prod(d[0], kd);
    case MT_ANY:
      if (all) return x.any();
      if (nd != 1) throw std::invalid_argument("any takes one dim");
      return x.any(d[0], kd);
    case MT_ALL:
      if (all) return x.all();
      if (nd != 1) throw std::invalid_argument("all takes one dim");
      return x.all(d[0], kd);
    case MT_VAR: return all ? x.var() : x.var(d, /*unbiased=*/true, kd);
    case MT_STD: return all ? x.std() : x.std(d, /*unbiased=*/true, kd);
    case MT_NORM: return all ? x.norm() : x.norm(2, d, kd);
  }
  throw std::invalid_argument("unknown reduce op " + std::to_string(op));
}

int32_t mt_max_dim(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t keepdim, int32_t is_min,
                   mt_tensor* out) {
  return STATUS_OP(ctx, {
    auto r = is_min ? T(t).min(dim, keepdim != 0) : T(t).max(dim, keepdim != 0);
    out[0] = wrap(std::get<0>(r));
    out[1] = wrap(std::get<1>(r));
  });
}

mt_tensor mt_argmax(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t keepdim, int32_t is_min) {
  return TENSOR_OP(ctx, is_min ? T(t).argmin(dim, keepdim != 0) : T(t).argmax(dim, keepdim != 0));
}

mt_tensor mt_cumsum(mt_ctx* ctx, mt_tensor t, int64_t dim) {
  return TENSOR_OP(ctx, T(t).cumsum(dim));
}

// ---- linear algebra and NN -------------------------------------------------------------------------
mt_tensor mt_matmul(mt_ctx* ctx, mt_tensor a, mt_tensor b) {
  return TENSOR_OP(ctx, T(a).matmul(T(b)));
}
mt_tensor mt_bmm(mt_ctx* ctx, mt_tensor a, mt_tensor b) { return TENSOR_OP(ctx, T(a).bmm(T(b))); }
mt_tensor mt_linear(mt_ctx* ctx, mt_tensor x, mt_tensor w, mt_tensor bias) {
  return TENSOR_OP(ctx, torch::linear(T(x), T(w), opt(bias)));
}
mt_tensor mt_softmax(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t dtype) {
  return TENSOR_OP(ctx, dtype < 0 ? T(t).softmax(dim) : T(t).softmax(dim, dtype_of(dtype)));
}
mt_tensor mt_log_softmax(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t dtype) {
  return TENSOR_OP(ctx, dtype < 0 ? T(t).log_softmax(dim) : T(t).log_softmax(dim, dtype_of(dtype)));
}
mt_tensor mt_layer_norm(mt_ctx* ctx, mt_tensor x, const int64_t* shape, int32_t nd,
                        mt_tensor weight, mt_tensor bias, double eps) {
  return TENSOR_OP(ctx, torch::layer_norm(T(x), ints(shape, nd), opt(weight), opt(bias), eps));
}

// ---- selection and sampling ------------------------------------------------------------------------
int32_t mt_topk(mt_ctx* ctx, mt_tensor t, int64_t k, int64_t dim, int32_t largest, int32_t sorted,
                mt_tensor* out) {
  return STATUS_OP(ctx, {
    auto r = T(t).topk(k, dim, largest != 0, sorted != 0);
    out[0] = wrap(std::get<0>(r));
    out[1] = wrap(std::get<1>(r));
  });
}
int32_t mt_sort(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t descending, mt_tensor* out) {
  return STATUS_OP(ctx, {
    auto r = T(t).sort(dim, descending != 0);
    out[0] = wrap(std::get<0>(r));
    out[1] = wrap(std::get<1>(r));
  });
}
mt_tensor mt_multinomial(mt_ctx* ctx, mt_tensor probs, int64_t n, int32_t replacement,
                         mt_generator gen) {
  return TENSOR_OP(ctx, at::multinomial(T(probs), n, replacement != 0, gen_of(gen)));
}

// ---- autograd ----------------------------------------------------------------------------------------
int32_t mt_set_requires_grad(mt_ctx* ctx, mt_tensor t, int32_t flag) {
  return STATUS_OP(ctx, T(t).set_requires_grad(flag != 0));
}
int32_t mt_backward(mt_ctx* ctx, mt_tensor t, mt_tensor grad, int32_t retain_graph) {
  return STATUS_OP(ctx, {
    torch::AutoGradMode on(true);
    T(t).backward(grad ? T(grad) : Tensor(), retain_graph != 0);
  });
}
int32_t mt_grad(mt_ctx* ctx, mt_tensor t, mt_tensor* out) {
  return STATUS_OP(ctx, {
    const Tensor& g = T(t).grad();
    *out = g.defined() ? wrap(g) : nullptr;
  });
}
int32_t mt_clear_grad(mt_ctx* ctx, mt_tensor t) {
  return STATUS_OP(ctx, T(t).mutable_grad().reset());
}
int32_t mt_set_grad(mt_ctx* ctx, mt_tensor t, mt_tensor grad) {
  return STATUS_OP(ctx, {
    torch::NoGradGuard ng;
    Tensor& p = T(t);
    const Tensor& g = T(grad);
    if (g.sizes() != p.sizes() || g.scalar_type() != p.scalar_type() || g.device() != p.device())
      throw std::invalid_argument("set_grad: the gradient must match the tensor's shape, dtype and device");
    p.mutable_grad() = g.detach().clone();
  });
}
mt_tensor mt_detach(mt_ctx* ctx, mt_tensor t) { return TENSOR_OP(ctx, T(t).detach()); }

// ---- optimizer kernels ---------------------------------------------------------------------------------
int32_t mt_adamw_step(mt_ctx* ctx, mt_tensor param, mt_tensor exp_avg, mt_tensor exp_avg_sq,
                      int64_t step, double lr, double beta1, double beta2, double eps,
                      double weight_decay) {
  return STATUS_OP(ctx, {
    torch::NoGradGuard ng;
    Tensor& p = T(param);
    const Tensor& g = p.grad();
    if (!g.defined()) return 0;
    if (step < 1) throw std::invalid_argument("adamw step must be >= 1");
    Tensor& m = T(exp_avg);
    Tensor& v = T(exp_avg_sq);
    p.mul_(1.0 - lr * weight_decay);
    m.mul_(beta1).add_(g, 1.0 - beta1);
    v.mul_(beta2).addcmul_(g, g, 1.0 - beta2);
    double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    Tensor denom = (v.sqrt() / std::sqrt(bc2)).add_(eps);
    p.addcdiv_(m, denom, -lr / bc1);
  });
}

int32_t mt_clip_grad_norm(mt_ctx* ctx, const mt_tensor* params, int32_t n, double max_norm,
                          double* total_norm) {
  return STATUS_OP(ctx, {
    torch::NoGradGuard ng;
    std::vector<Tensor> grads;
    for (int32_t i = 0; i < n; i++) {
      const Tensor& g = T(params[i]).grad();
      if (g.defined()) grads.push_back(g);
    }
    if (grads.empty()) { *total_norm = 0.0; return 0; }
    std::vector<Tensor> norms;
    // Each norm in the grad's precision (at least float32), summed in float64.
    for (auto& g : grads) {
      auto x = g.detach();
      if (!x.is_floating_point() || x.element_size() < 4) x = x.to(torch::kFloat);
      norms.push_back(x.norm(2).to(torch::kDouble));
    }
    double total = torch::stack(norms).norm(2).item().toDouble();
    *total_norm = total;
    double coef = max_norm / (total + 1e-6);
    if (coef < 1.0)
      for (auto& g : grads) g.mul_(coef);
  });
}

// ---- fused ops (fused.cpp) -----------------------------------------------------------------------
mt_tensor mt_nf4_linear(mt_ctx* ctx, mt_tensor x, const mt_tensor* parts, const int64_t* shape,
                        int32_t ndim, mt_tensor bias, int64_t chunk) {
  return TENSOR_OP(ctx, ([&] {
    auto part = [&](int i) { return parts[i] ? T(parts[i]) : Tensor(); };
    moerl::Nf4Parts w{part(0), part(1), part(2), part(3), part(4), part(5), part(6), ints(shape, ndim), chunk};
    return moerl::nf4_linear(T(x), w, opt(bias));
  })());
}

int32_t mt_token_stats(mt_ctx* ctx, mt_tensor x, mt_tensor w, mt_tensor bias, mt_tensor targets,
                       double temperature, int64_t chunk, int32_t entropy, mt_tensor* out) {
  return STATUS_OP(ctx, {
    auto r = moerl::token_stats(T(x), T(w), opt(bias), T(targets), temperature, chunk, entropy != 0);
    out[0] = wrap(r[0]);
    out[1] = entropy ? wrap(r[1]) : nullptr;
  });
}

}  // extern "C"
