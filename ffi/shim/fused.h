// Custom autograd functions behind the shim's fused ops. They exist for
// memory: each recomputes in its backward pass what a chain of plain ops
// would keep alive in the autograd graph. moerl.cpp wraps them in the C ABI.
#ifndef MOERL_FUSED_H
#define MOERL_FUSED_H

#include <torch/torch.h>

#include <vector>

namespace moerl {

// An NF4 weight as stored by model/nf4_codec.ts (every tensor borrowed).
struct Nf4Parts {
  torch::Tensor packed;     // uint8 [r, ceil(n/2)], two codes per byte, high nibble first
  torch::Tensor absmax;     // float32 [r, ceil(n/64)], or undefined when double quantised
  torch::Tensor dq_codes;   // uint8 [r, nb]: dynamic-map indices of absmax - offset
  torch::Tensor dq_absmax;  // float32 [r, ceil(nb/256)]
  torch::Tensor dq_offset;  // float32 [r, 1]
  torch::Tensor pairs;      // float32 [256, 2]: the two NF4 values of each byte
  torch::Tensor dynamic;    // float32 [256, 1]: the 8-bit dynamic map
  std::vector<int64_t> shape;  // [out, in], or [r, out, in] for stacked experts
  int64_t chunk = 0;           // values decoded per piece (a multiple of 64)
};

// Throws std::invalid_argument unless the parts fit together and x fits the weight.
void check_nf4(const torch::Tensor& x, const Nf4Parts& w);

// y = x W^T + b (2-D weight) or x.bmm(W^T) (3-D weight), W decoded in x's
// dtype; only the 4-bit parts are saved for backward, which decodes W again.
torch::Tensor nf4_linear(const torch::Tensor& x, const Nf4Parts& w, const c10::optional<torch::Tensor>& bias);

// {log p(targets), entropy}, float32 [N] each, of softmax((x W^T + b) / temperature)
// for x [N, H], computed `chunk` rows at a time; backward recomputes each chunk's logits.
// Without with_entropy, only {log p(targets)}: the entropy's work is skipped.
std::vector<torch::Tensor> token_stats(const torch::Tensor& x, const torch::Tensor& w,
                                       const c10::optional<torch::Tensor>& bias,
                                       const torch::Tensor& targets, double temperature, int64_t chunk,
                                       bool with_entropy);

}  // namespace moerl

#endif
