// Fused attention: libtorch's scaled_dot_product_attention (flash, memory-
// efficient, cuDNN or math back end, libtorch's choice). The shim exposes the
// op and whether this libtorch has it; the decoder decides in TypeScript
// whether to use it (model/layers.ts).
#include "internal.h"

#include <torch/version.h>

#include <limits>

// 2.0 has the op without a scale argument; 2.1 added it. Before 2.1 we say
// "not available" and TypeScript keeps the eager path.
#define MOERL_HAS_SDPA (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1))
// enable_gqa (query heads sharing key/value heads without a copy) came in 2.5.
#define MOERL_HAS_GQA (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5))

using namespace mt;
using torch::Tensor;

namespace {

[[maybe_unused]] const char* const kUnavailable =
    "scaled_dot_product_attention is not available in this libtorch (" TORCH_VERSION "; it needs 2.1 or later)";

#if MOERL_HAS_SDPA
struct SdpaArgs {
  Tensor q, k, v;
  c10::optional<Tensor> mask;
  bool gqa = false;
};

// Checks shapes the way the decoder uses the op, and normalises the mask and
// the key/value heads for this libtorch.
SdpaArgs prepare(mt_tensor q, mt_tensor k, mt_tensor v, mt_tensor mask) {
  SdpaArgs a{T(q), T(k), T(v), opt(mask)};
  if (a.q.dim() != 4 || a.k.dim() != 4 || a.v.dim() != 4)
    throw std::invalid_argument("sdpa: q, k and v must be 4-D [B, heads, S, d]");
  const int64_t nh = a.q.size(1), nkv = a.k.size(1);
  if (nkv < 1 || a.v.size(1) != nkv || nh % nkv != 0)
    throw std::invalid_argument("sdpa: k and v need the same number of heads, dividing q's (" +
                                std::to_string(nh) + " query heads, " + std::to_string(nkv) + " and " +
                                std::to_string(a.v.size(1)) + " key/value heads)");
  if (a.mask && a.mask->scalar_type() == torch::kBool) {
    // libtorch turns a boolean mask into -inf, and a row that sees no key
    // then gives NaN (older releases) or zeros (2.15). The most negative finite
    // value of the dtype instead makes such a row (a left-padding query) average every
    // value, as the eager path's additive mask does, and never NaN.
    double lowest = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, a.q.scalar_type(), "sdpa_mask", [&] {
      lowest = static_cast<double>(std::numeric_limits<scalar_t>::lowest());
    });
    a.mask = torch::zeros(a.mask->sizes(), a.q.options().requires_grad(false))
                 .masked_fill(a.mask->logical_not(), lowest);
  }
  if (nh != nkv) {
#if MOERL_HAS_GQA
    a.gqa = true;
#else
    // Query head h reads key/value head h / (nh / nkv), as enable_gqa does.
    a.k = a.k.repeat_interleave(nh / nkv, 1);
    a.v = a.v.repeat_interleave(nh / nkv, 1);
#endif
  }
  return a;
}
#endif

}  // namespace

extern "C" {

int32_t mt_sdpa_available(void) {
#if MOERL_HAS_GQA
  return 3;
#elif MOERL_HAS_SDPA
  return 1;
#else
  return 0;
#endif
}

mt_tensor mt_sdpa(mt_ctx* ctx, mt_tensor q, mt_tensor k, mt_tensor v, mt_tensor mask, double scale,
                  int32_t is_causal) {
  return TENSOR_OP(ctx, [&]() -> Tensor {
#if MOERL_HAS_SDPA
    SdpaArgs a = prepare(q, k, v, mask);
#if MOERL_HAS_GQA
    return at::scaled_dot_product_attention(a.q, a.k, a.v, a.mask, 0.0, is_causal != 0, scale, a.gqa);
#else
    return at::scaled_dot_product_attention(a.q, a.k, a.v, a.mask, 0.0, is_causal != 0, scale);
#endif
#else
    (void)q; (void)k; (void)v; (void)mask; (void)scale; (void)is_causal;
    throw std::runtime_error(kUnavailable);
#endif
  }());
}

int32_t mt_sdpa_backend(mt_ctx* ctx, mt_tensor q, mt_tensor k, mt_tensor v, mt_tensor mask, double scale,
                        int32_t is_causal, int32_t* out) {
  return STATUS_OP(ctx, {
#if MOERL_HAS_SDPA
    SdpaArgs a = prepare(q, k, v, mask);
#if MOERL_HAS_GQA
    *out = static_cast<int32_t>(
        at::_fused_sdp_choice(a.q, a.k, a.v, a.mask, 0.0, is_causal != 0, scale, a.gqa));
#else
    *out = static_cast<int32_t>(at::_fused_sdp_choice(a.q, a.k, a.v, a.mask, 0.0, is_causal != 0, scale));
#endif
#else
    (void)q; (void)k; (void)v; (void)mask; (void)scale; (void)is_causal; (void)out;
    throw std::runtime_error(kUnavailable);
#endif
  });
}

}  // extern "C"
