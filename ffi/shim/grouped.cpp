// moerl shim: grouped matrix products (see moerl.h, "grouped GEMM"), for MoE
// experts: one call multiplies each expert's rows by its own weight.
#include "internal.h"

#if __has_include(<ATen/ops/_grouped_mm.h>)
#include <ATen/ops/_grouped_mm.h>
#define MOERL_HAS_GROUPED_MM 1
#endif

using namespace mt;

extern "C" {

int32_t mt_grouped_mm_available(void) {
#ifdef MOERL_HAS_GROUPED_MM
  return 1;
#else
  return 0;
#endif
}

mt_tensor mt_grouped_mm(mt_ctx* ctx, mt_tensor a, mt_tensor b, mt_tensor offs) {
#ifdef MOERL_HAS_GROUPED_MM
  return TENSOR_OP(ctx, at::_grouped_mm(T(a), T(b), T(offs)));
#else
  (void)a, (void)b, (void)offs;
  ctx->message = "grouped_mm: this libtorch has no at::_grouped_mm (it came with 2.8)";
  return nullptr;
#endif
}

}  // extern "C"
